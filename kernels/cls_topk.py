"""CLS-attention top-k (EViT-style token ranking) without an attention matrix.

The CLS query's softmax over all 1+N keys, per head, is split in two kernels so that a small batch
still fills the GPU: one program per (batch, head) makes the row's max and sum in one online pass
over the keys (fp32 statistics, [B, H, 2]); then one program per (batch, key block) recomputes the
block's scores for every head, normalises them with those statistics and sums the heads in order,
writing probs [B, N] in fp32 (the head mean happens in registers, deterministically). The top-k is
`torch.topk` on those probs: [B, N] is tiny next to reading K, and torch's sort is exact, sorted and
capturable. The backward (probs w.r.t. q_cls and k) is one program per (batch, head): one online
pass for the softmax statistics and sum(p * dp), one pass that writes dK and accumulates dq.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.reference import cls_attention_topk_reference
from kernels.utils import interpret_mode, next_pow2, use_triton

_LOG2E = math.log2(math.e)
LENGTHS = ["H", "N1"]
"""Integer lengths left unspecialised: the kernels mask by them, so a new length needs no new compile."""


def _configs() -> list[triton.Config]:
    if interpret_mode():
        return [triton.Config({"BLOCK_N": 128}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((16, 2), (32, 4), (64, 4), (128, 8))]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Key blocks no longer than the keys need, and K tiles of at most 64 fp32 values per thread (a
    256-wide head dim keeps BLOCK_N <= 32); the smallest config always survives."""
    n1, block_d = named_args["N1"], kwargs["BLOCK_D"]
    fits = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(16, next_pow2(n1)) and c.kwargs["BLOCK_N"] * block_d <= 64 * 32 * c.num_warps]
    return fits or configs[:1]


@triton.jit
def _key_scores(k_ptr, q, start, N1, D, skn, skd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key block [start, start + BLOCK_N) of one (batch, head): (offsets, in-range mask, K tile fp32,
    scores q . k with -inf outside the range)."""
    offs = start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    nmask = offs < N1
    kmask = nmask[:, None] & (cols < D)[None, :]
    kt = tl.load(k_ptr + offs[:, None] * skn + cols[None, :] * skd, mask=kmask, other=0.0).to(tl.float32)
    s = tl.where(nmask, tl.sum(kt * q[None, :], axis=1), float("-inf"))
    return offs, nmask, kt, s


@triton.jit
def _load_vec(ptr, stride, D, BLOCK_D: tl.constexpr):
    """A [BLOCK_D] fp32 vector (zeros past D)."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + cols * stride, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _load_dp(g_ptr, sgn, offs, N1, H):
    """Probability gradient per key: g[offs - 1] / H, zero for the CLS key (offs 0) and past N1."""
    dp = tl.load(g_ptr + tl.maximum(offs - 1, 0) * sgn, mask=(offs < N1) & (offs > 0), other=0.0)
    return dp.to(tl.float32) / H


@triton.autotune(configs=_configs(), key=["N1", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=LENGTHS)
def _cls_stats_kernel(
    q_ptr, k_ptr, stats_ptr, H, N1, D, qk_scale,
    sqb, sqh, sqd, skb, skh, skn, skd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """stats[b, h] = (max_j s_j, 1 / sum_j exp2(s_j - max)) over the keys j in [0, N1), s in log2 units."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    q = _load_vec(q_ptr + b * sqb + h * sqh, sqd, D, BLOCK_D) * qk_scale
    k_bh = k_ptr + b * skb + h * skh
    m = tl.full([], float("-inf"), dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    for start in range(0, N1, BLOCK_N):
        _, _, _, s = _key_scores(k_bh, q, start, N1, D, skn, skd, BLOCK_N, BLOCK_D)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        den = den * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new), axis=0)
        m = m_new
    tl.store(stats_ptr + (b * H + h) * 2, m)
    tl.store(stats_ptr + (b * H + h) * 2 + 1, 1.0 / den)


@triton.autotune(configs=_configs(), key=["N1", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=LENGTHS)
def _cls_probs_kernel(
    q_ptr, k_ptr, stats_ptr, out_ptr, H, N1, D, qk_scale,
    sqb, sqh, sqd, skb, skh, skn, skd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """probs[b, n] = mean_h exp2(s_hn - max_h) / sum_h for the keys 1 + n of block program_id(1)."""
    b = tl.program_id(0).to(tl.int64)
    start = 1 + tl.program_id(1) * BLOCK_N  # key 0 is the CLS token: no output column
    offs = start + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(H):
        q = _load_vec(q_ptr + b * sqb + h * sqh, sqd, D, BLOCK_D) * qk_scale
        _, _, _, s = _key_scores(k_ptr + b * skb + h * skh, q, start, N1, D, skn, skd, BLOCK_N, BLOCK_D)
        m = tl.load(stats_ptr + (b * H + h) * 2)
        inv_l = tl.load(stats_ptr + (b * H + h) * 2 + 1)
        acc += tl.exp2(s - m) * inv_l
    tl.store(out_ptr + b * (N1 - 1) + offs - 1, acc / H, mask=offs < N1)


@triton.autotune(configs=_configs(), key=["N1", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=LENGTHS)
def _cls_probs_bwd_kernel(
    q_ptr, k_ptr, g_ptr, dq_ptr, dk_ptr, H, N1, D, qk_scale, scale,
    sqb, sqh, sqd, skb, skh, skn, skd, sgb, sgn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For one (b, h), with p = softmax row and dp[j] = g[b, j - 1] / H (0 for the CLS key):
    ds = p * (dp - sum(p * dp)); dk[j] = scale * ds[j] * q; dq = scale * sum_j ds[j] * k[j]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    q = _load_vec(q_ptr + b * sqb + h * sqh, sqd, D, BLOCK_D)
    qs = q * qk_scale
    k_bh = k_ptr + b * skb + h * skh
    m = tl.full([], float("-inf"), dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    t = tl.zeros([], dtype=tl.float32)  # sum(exp2(s - m) * dp), rescaled with den
    for start in range(0, N1, BLOCK_N):
        offs, _, _, s = _key_scores(k_bh, qs, start, N1, D, skn, skd, BLOCK_N, BLOCK_D)
        dp = _load_dp(g_ptr + b * sgb, sgn, offs, N1, H)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        den = den * alpha + tl.sum(p, axis=0)
        t = t * alpha + tl.sum(p * dp, axis=0)
        m = m_new
    inv_l = 1.0 / den
    delta = t * inv_l
    dq = tl.zeros([BLOCK_D], dtype=tl.float32)
    dk_bh = dk_ptr + (b * H + h) * N1 * D
    for start in range(0, N1, BLOCK_N):
        offs, nmask, kt, s = _key_scores(k_bh, qs, start, N1, D, skn, skd, BLOCK_N, BLOCK_D)
        dp = _load_dp(g_ptr + b * sgb, sgn, offs, N1, H)
        ds = tl.exp2(s - m) * inv_l * (dp - delta)
        dq += tl.sum(ds[:, None] * kt, axis=0)
        dk = (ds * scale)[:, None] * q[None, :]
        tl.store(dk_bh + offs[:, None] * D + cols[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=nmask[:, None] & (cols < D)[None, :])
    tl.store(dq_ptr + (b * H + h) * D + cols, (dq * scale).to(dq_ptr.dtype.element_ty), mask=cols < D)


def _probs(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    B, H, N1, D = k.shape
    out = torch.empty(B, N1 - 1, device=k.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    stats = torch.empty(B, H, 2, device=k.device, dtype=torch.float32)
    args = (H, N1, D, D**-0.5 * _LOG2E, *q_cls.stride(), *k.stride())
    _cls_stats_kernel[(B, H)](q_cls, k, stats, *args, BLOCK_D=next_pow2(D))
    grid = lambda meta: (B, triton.cdiv(N1 - 1, meta["BLOCK_N"]))  # noqa: E731
    _cls_probs_kernel[grid](q_cls, k, stats, out, *args, BLOCK_D=next_pow2(D))
    return out


def _probs_bwd(grad: torch.Tensor, q_cls: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N1, D = k.shape
    dq = torch.empty(B, H, D, device=q_cls.device, dtype=q_cls.dtype)
    dk = torch.empty(B, H, N1, D, device=k.device, dtype=k.dtype)
    if dk.numel() == 0:
        return dq.zero_(), dk
    _cls_probs_bwd_kernel[(B, H)](
        q_cls, k, grad, dq, dk, H, N1, D, D**-0.5 * _LOG2E, D**-0.5,
        *q_cls.stride(), *k.stride(), *grad.stride(),
        BLOCK_D=next_pow2(D),
    )
    return dq, dk


@torch.library.custom_op("crossmae::cls_attention_probs", mutates_args=())
def cls_attention_probs(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the CLS query's softmax over all keys, CLS column dropped: [B, N] fp32."""
    return _probs(q_cls, k)


@cls_attention_probs.register_fake
def _(q_cls, k):
    return k.new_empty(k.shape[0], k.shape[2] - 1, dtype=torch.float32)


@torch.library.custom_op("crossmae::cls_attention_probs_backward", mutates_args=())
def cls_attention_probs_backward(
    grad: torch.Tensor, q_cls: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq_cls, dk) of `cls_attention_probs` for the probs gradient `grad` [B, N] (Triton)."""
    return _probs_bwd(grad, q_cls, k)


@cls_attention_probs_backward.register_fake
def _(grad, q_cls, k):
    return q_cls.new_empty(q_cls.shape), k.new_empty(k.shape)


class ClsAttentionProbs(torch.autograd.Function):
    """Autograd of `cls_attention_probs`; also registered on the custom op (so torch.compile sees it)."""

    @staticmethod
    def forward(q_cls, k):
        return _probs(q_cls, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        q_cls, k = ctx.saved_tensors
        return torch.ops.crossmae.cls_attention_probs_backward(grad, q_cls, k)


cls_attention_probs.register_autograd(
    ClsAttentionProbs.backward, setup_context=ClsAttentionProbs.setup_context
)


def cls_attention_topk(q_cls: torch.Tensor, k: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the N non-CLS tokens by the CLS query's attention, averaged over heads (EViT).

    q_cls [B, H, D]; k [B, H, 1+N, D] with the CLS key at index 0; scale 1/sqrt(D). Returns indices
    [B, topk] int64 into the N tokens, by descending probability, and probs [B, N] fp32
    (differentiable w.r.t. q_cls and k; indices carry no gradient).
    """
    if q_cls.dim() != 3 or k.dim() != 4 or k.shape[:2] != q_cls.shape[:2] or k.shape[3] != q_cls.shape[2]:
        raise ValueError(f"cls_attention_topk: need q_cls [B, H, D], k [B, H, 1+N, D]; got "
                         f"{tuple(q_cls.shape)}, {tuple(k.shape)}")
    if k.shape[3] > 256:
        raise ValueError(f"cls_attention_topk: head dim {k.shape[3]} > 256 is not supported")
    if k.shape[2] < 2:
        raise ValueError(f"cls_attention_topk: k needs the CLS key and N >= 1 tokens, got {k.shape[2]} keys")
    if not 0 <= topk <= k.shape[2] - 1:
        raise ValueError(f"cls_attention_topk: topk={topk} must be in [0, N={k.shape[2] - 1}]")
    if not use_triton(q_cls, k):
        return cls_attention_topk_reference(q_cls, k, topk)
    probs = torch.ops.crossmae.cls_attention_probs(q_cls, k)
    return probs.topk(topk, dim=-1).indices, probs
