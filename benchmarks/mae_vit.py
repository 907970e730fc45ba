"""facebookresearch/mae's `MaskedAutoencoderViT`, restated: the unpatched model that `kernels.patch_mae`
is held to (tests/test_kernel_mae_patch.py) and timed against (benchmarks/bench_mae_patch.py).

The attribute names, method signatures and the operations inside each method, in their order, are
MAE's `models_mae.py` (timm blocks and patch embedding, fixed 2-D sin-cos position embeddings with a
zero CLS slot, norm-pix loss); widened only to rectangular images and any channel count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from crossmae_fast.model.crossmae import mae_init_
from crossmae_fast.model.losses import NORM_PIX_EPS
from crossmae_fast.model.pos_embed import sincos_2d


def mae_random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """MAE's per-sample masking: sort the noise, keep the lowest, remember how to undo the shuffle."""
    batch, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep_index = ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim)
    x_masked = torch.gather(x, dim=1, index=keep_index)
    mask = torch.ones([batch, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


@dataclass(frozen=True)
class MAEConfig:
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True


PRESETS = {
    "vit_b16": MAEConfig(),  # MAE's mae_vit_base_patch16 with its recommended norm-pix loss
    "tiny": MAEConfig(img_size=(20, 28), patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2),
}


class MAEViT(nn.Module):
    """MAE's masked autoencoder: ViT encoder on the visible patches, light decoder on all of them."""

    def __init__(self, cfg: MAEConfig = PRESETS["vit_b16"]):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dim, ddim = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        grid, n = self.patch_embed.grid_size, self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid, cls_token=True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(cfg.depth)]
        )
        self.norm = norm_layer(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(ddim, grid, cls_token=True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(ddim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = norm_layer(ddim)
        self.decoder_pred = nn.Linear(ddim, cfg.patch_size**2 * cfg.in_chans)
        self.norm_pix_loss = cfg.norm_pix_loss
        assert n == self.pos_embed.shape[1] - 1
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(mae_init_)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order, pixels (row, col, channel)."""
        p = self.patch_embed.patch_size[0]
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def random_masking(self, x, mask_ratio):
        noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
        return mae_random_masking(x, mask_ratio, noise)

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
