"""Random masking: MAE's per-sample shuffle (argsort in torch), then one Triton pass that gathers the
kept rows and adds their position embeddings.

The backward needs no atomics: each kept row came from exactly one source row, so a program per
source row block reads its gradient through `ids_restore` (zero for removed rows). A batch-shared
`pos_embed` [1, L, D] gets the sum over the batch from a loop over batch chunks (fp32 partial sums,
then a torch sum over the few chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pos_grad import pos_grad, pos_grad_plan, pos_meta, pos_sums, reduce_pos_sums
from kernels.reference import masking_indices, random_masking_reference
from kernels.utils import batch_chunk, row_blocks, use_triton


@triton.jit(do_not_specialize=["K"])
def _gather_add_kernel(
    x_ptr, pos_ptr, idx_ptr, out_ptr, K, D,
    sxb, sxl, sxd, spb, spl, spd, sib, sik, sob, sok,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, k] = x[b, idx[b, k]] + pos[b or 0, idx[b, k]] (the add in fp32, rounded once)."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < K
    m = rmask[:, None] & (cols < D)[None, :]
    src = tl.load(idx_ptr + b * sib + rows * sik, mask=rmask, other=0)
    val = tl.load(x_ptr + b * sxb + src[:, None] * sxl + cols[None, :] * sxd, mask=m).to(tl.float32)
    if HAS_POS:
        val += tl.load(pos_ptr + b * spb + src[:, None] * spl + cols[None, :] * spd, mask=m).to(tl.float32)
    out = out_ptr + b * sob + rows[:, None] * sok + cols[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["B", "K", "L", "b_chunk"])
def _gather_add_bwd_kernel(
    g_ptr, ids_ptr, dx_ptr, dpos_ptr, B, K, L, D, b_chunk,
    sgb, sgk, sgd, sib, sil,
    SUM_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[b, l] = g[b, ids_restore[b, l]] if kept else 0, for b in this program's batch chunk;
    with SUM_POS also the chunk's fp32 sum over b into dpos[chunk, l]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2).to(tl.int64)
    lmask = rows < L
    m = lmask[:, None] & (cols < D)[None, :]
    out_off = rows[:, None] * D + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b0 = chunk * b_chunk
    for b in range(b0, tl.minimum(b0 + b_chunk, B)):
        r = tl.load(ids_ptr + b * sib + rows * sil, mask=lmask, other=K)
        kept = r < K
        g_off = b * sgb + r[:, None] * sgk + cols[None, :] * sgd
        g = tl.load(g_ptr + g_off, mask=m & kept[:, None], other=0.0)
        tl.store(dx_ptr + b * L * D + out_off, g, mask=m)
        if SUM_POS:
            acc += g.to(tl.float32)
    if SUM_POS:
        tl.store(dpos_ptr + chunk * L * D + out_off, acc, mask=m)


def _gather_add(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    B, L, D = x.shape
    K = ids_keep.shape[1]
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    out = torch.empty(B, K, D, device=x.device, dtype=dtype)
    if out.numel() == 0:
        return out
    pos = x if pos_embed is None else pos_embed.expand(B, L, D)  # batch stride 0 when shared
    block_r, block_d, warps = row_blocks(K, D)
    grid = (triton.cdiv(K, block_r), triton.cdiv(D, block_d), B)
    _gather_add_kernel[grid](
        x, pos, ids_keep, out, K, D,
        *x.stride(), *pos.stride(), *ids_keep.stride(), out.stride(0), out.stride(1),
        HAS_POS=pos_embed is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _gather_add_bwd(
    grad: torch.Tensor, ids_restore: torch.Tensor, sum_pos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, D = grad.shape
    L = ids_restore.shape[1]
    dx = torch.empty(B, L, D, device=grad.device, dtype=grad.dtype)
    if dx.numel() == 0:
        return dx, pos_sums(grad, sum_pos, 1, L, D).zero_()
    block_r, block_d, warps = row_blocks(L, D)
    tiles = triton.cdiv(L, block_r) * triton.cdiv(D, block_d)
    b_chunk = batch_chunk(B, tiles) if sum_pos else 1
    n_chunks = triton.cdiv(B, b_chunk)
    partial = pos_sums(grad, sum_pos, n_chunks, L, D)
    grid = (triton.cdiv(L, block_r), triton.cdiv(D, block_d), n_chunks)
    _gather_add_bwd_kernel[grid](
        grad, ids_restore, dx, partial, B, K, L, D, b_chunk, *grad.stride(), *ids_restore.stride(),
        SUM_POS=sum_pos, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, reduce_pos_sums(partial, sum_pos)


@torch.library.custom_op("crossmae::masking_gather", mutates_args=())
def masking_gather(
    x: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    """`(x + pos_embed)` rows `ids_keep` [B, K], fused (Triton). `ids_restore` is kept for the backward."""
    return _gather_add(x, ids_keep, pos_embed)


@masking_gather.register_fake
def _(x, ids_keep, ids_restore, pos_embed):
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2], dtype=dtype)


@torch.library.custom_op("crossmae::masking_gather_backward", mutates_args=())
def masking_gather_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, sum_pos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [B, L, D] in grad's dtype, dpos: fp32 [1, L, D] batch sum when `sum_pos`, else [0, L, D])."""
    return _gather_add_bwd(grad, ids_restore, sum_pos)


@masking_gather_backward.register_fake
def _(grad, ids_restore, sum_pos):
    B, L, D = grad.shape[0], ids_restore.shape[1], grad.shape[2]
    return grad.new_empty(B, L, D), pos_sums(grad, sum_pos, 1, L, D)


class MaskingGather(torch.autograd.Function):
    """Autograd of `masking_gather`; also registered on the custom op (so torch.compile sees it)."""

    @staticmethod
    def forward(x, ids_keep, ids_restore, pos_embed):
        return _gather_add(x, ids_keep, pos_embed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.x_dtype = x.dtype
        ctx.pos_meta = pos_meta(pos_embed)

    @staticmethod
    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        need_pos, sum_pos = pos_grad_plan(ctx, grad, 3)
        dx, dpos = torch.ops.crossmae.masking_gather_backward(grad, ids_restore, sum_pos)
        return dx.to(ctx.x_dtype), None, None, pos_grad(ctx, need_pos, sum_pos, dpos, dx)


masking_gather.register_autograd(MaskingGather.backward, setup_context=MaskingGather.setup_context)


def _check(x: torch.Tensor, mask_ratio: float, pos: torch.Tensor | None, noise: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [B, L, D], got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1], got {mask_ratio}")
    if pos is not None and (pos.dim() != 3 or pos.shape[0] not in (1, B) or pos.shape[1:] != x.shape[1:]):
        raise ValueError(f"random_masking: pos_embed must be [1 or {B}, {L}, {D}], got {tuple(pos.shape)}")
    if noise is not None and noise.shape != (B, L):
        raise ValueError(f"random_masking: noise must be [{B}, {L}], got {tuple(noise.shape)}")


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    pos_embed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking of `x + pos_embed`, keeping `int(L * (1 - mask_ratio))` tokens per sample.

    x [B, L, D]; pos_embed [1 or B, L, D] (optional); noise [B, L] (default `torch.rand`): the
    tokens with the smallest noise are kept. Returns x_visible [B, K, D], mask [B, L] fp32
    (1 = removed), ids_restore [B, L] and ids_keep [B, K] (int64), equal to MAE's for the same noise.
    """
    _check(x, mask_ratio, pos_embed, noise)
    if not use_triton(x):
        return random_masking_reference(x, mask_ratio, pos_embed, noise)
    B, L, _ = x.shape
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_restore, ids_keep, mask = masking_indices(noise, int(L * (1 - mask_ratio)))
    return torch.ops.crossmae.masking_gather(x, ids_keep, ids_restore, pos_embed), mask, ids_restore, ids_keep
