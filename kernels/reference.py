"""Pure-torch references of the fused ops: the semantics every Triton kernel must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- random masking -----------------------------------------------------------------------------


def masking_indices(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample shuffle of `noise` [B, L]: (ids_restore, ids_keep, mask), mask 1 = removed."""
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_restore, ids_shuffle[:, :len_keep], mask


def random_masking_reference(
    x: torch.Tensor,
    mask_ratio: float,
    pos_embed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking of `x + pos_embed` ([B, L, D]): (x_visible, mask, ids_restore, ids_keep)."""
    B, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_restore, ids_keep, mask = masking_indices(noise, int(L * (1 - mask_ratio)))
    x_visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
    return x_visible, mask, ids_restore, ids_keep


# --- token restore ------------------------------------------------------------------------------


def restore_tokens_reference(
    x_visible: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE decoder un-shuffle: visible tokens [B, K, D] then mask tokens, reordered by `ids_restore`
    [B, L] back to the original order, plus `pos_embed` [1 or B, L, D] when given."""
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    tokens = torch.cat([x_visible, mask_token.reshape(1, 1, D).expand(B, L - K, D)], dim=1)
    out = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, D))
    return out if pos_embed is None else out + pos_embed


# --- CLS-attention top-k ------------------------------------------------------------------------


def cls_attention_topk_reference(
    q_cls: torch.Tensor, k: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT-style token ranking: softmax of the CLS query `q_cls` [B, H, D] over all keys `k`
    [B, H, 1+N, D] (scale 1/sqrt(D), in fp32), CLS column dropped, mean over heads.

    Returns (indices [B, topk] int64 into the N non-CLS tokens, by descending prob; probs [B, N] fp32).
    """
    scores = torch.einsum("bhd,bhnd->bhn", q_cls.float(), k.float()) * q_cls.shape[-1] ** -0.5
    probs = scores.softmax(dim=-1)[:, :, 1:].mean(dim=1)
    return probs.topk(topk, dim=-1).indices, probs


# --- cross-attention ----------------------------------------------------------------------------


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal SDPA of `q` [B, H, Lq, D] over K/V rows `kv_index[b, :]` ([B, S]; all Lk rows when None).

    K/V are gathered explicitly, so the backward scatters dK/dV into [B, H, Lk, D] (zeros elsewhere).
    """
    if kv_index is not None:
        idx = kv_index.long()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        k, v = k.gather(2, idx), v.gather(2, idx)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
