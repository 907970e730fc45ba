"""facebookresearch/mae's `random_masking`, written out as MAE writes it: the oracle the tests hold
our masking (the model's and the fused op's) to, for the same noise."""

import torch


def mae_random_masking(x, mask_ratio, noise):
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
