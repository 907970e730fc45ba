"""Token restore: MAE's decoder un-shuffle (visible tokens, then mask tokens, reordered by
`ids_restore`) plus position embeddings, in one Triton pass.

The backward needs no atomics and no inverse permutation: a program per output row block stores
each row's gradient at its visible slot `ids_restore[b, l] < K` (each slot is hit exactly once),
and sums the masked rows (mask-token gradient) and, for a batch-shared `pos_embed`, all rows over
the batch into fp32 partials per batch chunk, which a torch sum over the few chunks finishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pos_grad import pos_grad, pos_grad_plan, pos_meta, pos_sums, reduce_pos_sums
from kernels.reference import restore_tokens_reference
from kernels.utils import batch_chunk, row_blocks, use_triton


@triton.jit(do_not_specialize=["K", "L"])
def _restore_kernel(
    x_ptr, tok_ptr, pos_ptr, ids_ptr, out_ptr, K, L, D,
    sxb, sxk, sxd, spb, spl, spd, sib, sil,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, l] = (x[b, r] if r < K else mask_token) + pos[b or 0, l], r = ids_restore[b, l]."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = rows < L
    cmask = cols < D
    m = lmask[:, None] & cmask[None, :]
    r = tl.load(ids_ptr + b * sib + rows * sil, mask=lmask, other=0)
    kept = (r < K)[:, None]
    val = tl.load(x_ptr + b * sxb + r[:, None] * sxk + cols[None, :] * sxd, mask=m & kept).to(tl.float32)
    tok = tl.load(tok_ptr + cols, mask=cmask).to(tl.float32)
    val = tl.where(kept, val, tok[None, :])
    if HAS_POS:
        val += tl.load(pos_ptr + b * spb + rows[:, None] * spl + cols[None, :] * spd, mask=m).to(tl.float32)
    out = out_ptr + b * L * D + rows[:, None] * D + cols[None, :]
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["B", "K", "L", "b_chunk"])
def _restore_bwd_kernel(
    g_ptr, ids_ptr, dx_ptr, dtok_ptr, dpos_ptr, B, K, L, D, b_chunk,
    sgb, sgl, sgd, sib, sil,
    SUM_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[b, r] = g[b, l] for visible rows (r = ids_restore[b, l] < K) of this program's batch chunk;
    fp32 partial sums of the masked rows into dtok[chunk, row block] and, with SUM_POS, of all rows
    into dpos[chunk, l]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2).to(tl.int64)
    lmask = rows < L
    cmask = cols < D
    m = lmask[:, None] & cmask[None, :]
    acc_pos = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_tok = tl.zeros([BLOCK_D], dtype=tl.float32)
    b0 = chunk * b_chunk
    for b in range(b0, tl.minimum(b0 + b_chunk, B)):
        r = tl.load(ids_ptr + b * sib + rows * sil, mask=lmask, other=0)
        kept = (r < K)[:, None]
        g = tl.load(g_ptr + b * sgb + rows[:, None] * sgl + cols[None, :] * sgd, mask=m, other=0.0)
        tl.store(dx_ptr + b * K * D + r[:, None] * D + cols[None, :], g, mask=m & kept)
        g = g.to(tl.float32)
        acc_tok += tl.sum(tl.where(kept, 0.0, g), axis=0)
        if SUM_POS:
            acc_pos += g
    tl.store(dtok_ptr + (chunk * tl.num_programs(0) + tl.program_id(0)) * D + cols, acc_tok, mask=cmask)
    if SUM_POS:
        tl.store(dpos_ptr + chunk * L * D + rows[:, None] * D + cols[None, :], acc_pos, mask=m)


def _restore(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    B, K, D = x.shape
    L = ids_restore.shape[1]
    out = torch.empty(B, L, D, device=x.device, dtype=_out_dtype(x, mask_token, pos_embed))
    if out.numel() == 0:
        return out
    tok = mask_token.reshape(D).contiguous()
    pos = x if pos_embed is None else pos_embed.expand(B, L, D)  # batch stride 0 when shared
    block_r, block_d, warps = row_blocks(L, D)
    grid = (triton.cdiv(L, block_r), triton.cdiv(D, block_d), B)
    _restore_kernel[grid](
        x, tok, pos, ids_restore, out, K, L, D, *x.stride(), *pos.stride(), *ids_restore.stride(),
        HAS_POS=pos_embed is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _restore_bwd(
    grad: torch.Tensor, ids_restore: torch.Tensor, K: int, sum_pos: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, D = grad.shape
    dx = torch.empty(B, K, D, device=grad.device, dtype=grad.dtype)
    if grad.numel() == 0:
        return dx, grad.new_zeros(D, dtype=torch.float32), pos_sums(grad, sum_pos, 1, L, D).zero_()
    block_r, block_d, warps = row_blocks(L, D)
    n_row_blocks = triton.cdiv(L, block_r)
    tiles = n_row_blocks * triton.cdiv(D, block_d)
    b_chunk = batch_chunk(B, tiles)
    n_chunks = triton.cdiv(B, b_chunk)
    dtok = torch.empty(n_chunks * n_row_blocks, D, device=grad.device, dtype=torch.float32)
    dpos = pos_sums(grad, sum_pos, n_chunks, L, D)
    grid = (n_row_blocks, triton.cdiv(D, block_d), n_chunks)
    _restore_bwd_kernel[grid](
        grad, ids_restore, dx, dtok, dpos, B, K, L, D, b_chunk, *grad.stride(), *ids_restore.stride(),
        SUM_POS=sum_pos, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, dtok.sum(dim=0), reduce_pos_sums(dpos, sum_pos)


def _out_dtype(x: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


@torch.library.custom_op("crossmae::restore_tokens", mutates_args=())
def restore_tokens_op(
    x_visible: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """Un-shuffled tokens plus position embeddings, fused (Triton)."""
    return _restore(x_visible, mask_token, ids_restore, pos_embed)


@restore_tokens_op.register_fake
def _(x_visible, mask_token, ids_restore, pos_embed):
    B, _, D = x_visible.shape
    return x_visible.new_empty(B, ids_restore.shape[1], D, dtype=_out_dtype(x_visible, mask_token, pos_embed))


@torch.library.custom_op("crossmae::restore_tokens_backward", mutates_args=())
def restore_tokens_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, K: int, sum_pos: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_visible [B, K, D] in grad's dtype, dmask_token [D] fp32, dpos: fp32 [1, L, D] batch sum
    when `sum_pos`, else [0, L, D])."""
    return _restore_bwd(grad, ids_restore, K, sum_pos)


@restore_tokens_backward.register_fake
def _(grad, ids_restore, K, sum_pos):
    B, L, D = grad.shape
    return grad.new_empty(B, K, D), grad.new_empty(D, dtype=torch.float32), pos_sums(grad, sum_pos, 1, L, D)


class RestoreTokens(torch.autograd.Function):
    """Autograd of `restore_tokens_op`; also registered on the custom op (so torch.compile sees it)."""

    @staticmethod
    def forward(x_visible, mask_token, ids_restore, pos_embed):
        return _restore(x_visible, mask_token, ids_restore, pos_embed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.x_meta = (x.shape[1], x.dtype)
        ctx.tok_meta = (mask_token.shape, mask_token.dtype)
        ctx.pos_meta = pos_meta(pos_embed)

    @staticmethod
    def backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        need_pos, sum_pos = pos_grad_plan(ctx, grad, 3)
        dx, dtok, dpos = torch.ops.crossmae.restore_tokens_backward(grad, ids_restore, ctx.x_meta[0], sum_pos)
        dtok = dtok.reshape(ctx.tok_meta[0]).to(ctx.tok_meta[1])
        return dx.to(ctx.x_meta[1]), dtok, None, pos_grad(ctx, need_pos, sum_pos, dpos, grad)


restore_tokens_op.register_autograd(RestoreTokens.backward, setup_context=RestoreTokens.setup_context)


def _check(x: torch.Tensor, mask_token: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"restore_tokens: x_visible must be [B, K, D], got shape {tuple(x.shape)}")
    B, K, D = x.shape
    if mask_token.numel() != D:
        raise ValueError(f"restore_tokens: mask_token must be [1, 1, {D}], got {tuple(mask_token.shape)}")
    if ids.dim() != 2 or ids.shape[0] != B or ids.shape[1] < K or ids.dtype != torch.int64:
        got = f"{ids.dtype} {list(ids.shape)}"
        raise ValueError(f"restore_tokens: ids_restore must be int64 [{B}, L >= {K}], got {got}")
    L = ids.shape[1]
    if pos is not None and (pos.dim() != 3 or pos.shape[0] not in (1, B) or pos.shape[1:] != (L, D)):
        raise ValueError(f"restore_tokens: pos_embed must be [1 or {B}, {L}, {D}], got {tuple(pos.shape)}")


def restore_tokens(
    x_visible: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's decoder un-shuffle plus position embeddings: [B, L, D] with row l equal to
    `x_visible[b, ids_restore[b, l]]` if `ids_restore[b, l] < K`, else `mask_token`, plus `pos_embed[., l]`.

    x_visible [B, K, D]; mask_token [1, 1, D]; ids_restore [B, L] int64 (a permutation of 0..L-1 per
    row, as `random_masking` returns); pos_embed [1 or B, L, D] (optional).
    """
    _check(x_visible, mask_token, ids_restore, pos_embed)
    if not use_triton(x_visible):
        return restore_tokens_reference(x_visible, mask_token, ids_restore, pos_embed)
    return torch.ops.crossmae.restore_tokens(x_visible, mask_token, ids_restore, pos_embed)
