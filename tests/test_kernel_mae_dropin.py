"""Drop-in check: an MAE-style model (facebookresearch/mae `models_mae.py` structure) gives the same
outputs and gradients with our `random_masking` / `restore_tokens` as with MAE's own masking and
decoder un-shuffle, written out here the way MAE writes them, for the same noise."""

from __future__ import annotations

import pytest
import torch
from kernel_marks import DEVICE, needs_triton
from mae_style import mae_random_masking
from torch import nn

from kernels import random_masking, restore_tokens

pytestmark = needs_triton


class TinyMAE(nn.Module):
    """Encoder and decoder laid out like MAE's (CLS token, pos embeds with a CLS slot, mask token);
    the transformer blocks are replaced by an MLP to keep the test fast."""

    def __init__(self, num_patches=49, patch_dim=12, dim=48, decoder_dim=32, learn_pos=False):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim), requires_grad=learn_pos)
        self.blocks = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, decoder_dim), requires_grad=learn_pos)
        self.decoder_blocks = nn.Sequential(nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, decoder_dim), nn.GELU())
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)

    def forward_encoder(self, patches, mask_ratio, noise, fused):
        x = self.patch_embed(patches)
        if fused:
            x, mask, ids_restore, _ = random_masking(x, mask_ratio, self.pos_embed[:, 1:, :], noise)
        else:
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = mae_random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.blocks(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore, fused):
        x = self.decoder_embed(x)
        if fused:
            x_ = restore_tokens(x[:, 1:, :], self.mask_token, ids_restore, self.decoder_pos_embed[:, 1:, :])
            x = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], x_], dim=1)
        else:
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
            x = x + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_blocks(x))[:, 1:, :]

    def forward(self, patches, mask_ratio, noise, fused):
        latent, mask, ids_restore = self.forward_encoder(patches, mask_ratio, noise, fused)
        pred = self.forward_decoder(latent, ids_restore, fused)
        loss = ((pred - patches) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("learn_pos", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_kernel_mae_dropin_equal_outputs_and_grads(learn_pos, mask_ratio):
    torch.manual_seed(0)
    model = TinyMAE(learn_pos=learn_pos).to(DEVICE)
    patches = torch.randn(3, 49, 12, device=DEVICE)
    noise = torch.rand(3, 49, device=DEVICE)
    results = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss, pred, mask = model(patches, mask_ratio, noise, fused)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[fused] = (loss.detach(), pred.detach(), mask, grads)
    (loss_mae, pred_mae, mask_mae, grads_mae), (loss_ours, pred_ours, mask_ours, grads_ours) = results.values()
    assert torch.equal(mask_ours, mask_mae) and mask_ours.dtype == mask_mae.dtype
    assert torch.equal(pred_ours, pred_mae)  # same values through every op
    assert torch.equal(loss_ours, loss_mae)
    assert grads_ours.keys() == grads_mae.keys() and ("pos_embed" in grads_ours) == learn_pos
    for name, grad in grads_mae.items():
        # summed gradients (mask token, batch-shared pos embeds) may differ in summation order only
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-5, atol=1e-6, msg=name)
