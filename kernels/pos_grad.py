"""The position-embedding gradient of the fused ops that add `pos_embed` [1 or B, L, D] to gathered or
restored rows (masking.py, restore.py), written once. A per-sample embedding ([B, L, D]) gets the
per-row gradient the op has anyway; a shared one ([1, L, D]) gets its sum over the batch, which the
backward kernel accumulates in fp32 per batch chunk (`partials` [chunks, L, D]) and torch adds up."""

from __future__ import annotations

import torch


def pos_meta(pos_embed: torch.Tensor | None) -> tuple[int, torch.dtype] | None:
    """What the backward needs to know of `pos_embed` (saved by `setup_context`): its batch size and dtype."""
    return None if pos_embed is None else (pos_embed.shape[0], pos_embed.dtype)


def pos_grad_plan(ctx, grad: torch.Tensor, index: int) -> tuple[bool, bool]:
    """(whether input `index`, the embedding, needs a gradient; whether it is the batch sum: a shared one)."""
    need = ctx.pos_meta is not None and ctx.needs_input_grad[index]
    return need, need and ctx.pos_meta[0] != grad.shape[0]


def pos_sums(shape_like: torch.Tensor, sum_pos: bool, chunks: int, L: int, D: int) -> torch.Tensor:
    """The fp32 buffer the kernel writes per-chunk sums into ([chunks, L, D]; [0, L, D] when not summing)."""
    return shape_like.new_empty(chunks if sum_pos else 0, L, D, dtype=torch.float32)


def reduce_pos_sums(partials: torch.Tensor, sum_pos: bool) -> torch.Tensor:
    """[1, L, D], the batch sum of the chunks' sums (the buffer as it is when not summing)."""
    return partials.sum(dim=0, keepdim=True) if sum_pos else partials


def pos_grad(ctx, need: bool, sum_pos: bool, batch_sum: torch.Tensor, per_sample: torch.Tensor
             ) -> torch.Tensor | None:
    """The gradient to return for the embedding, in its dtype (None when it needs none)."""
    if not need:
        return None
    return (batch_sum if sum_pos else per_sample).to(ctx.pos_meta[1])
