"""Fused cross-attention: flash-attention forward and backward with Lq != Lk and an optional K/V row index.

`cross_attention(q, k, v, kv_index=None, scale=None)` is non-causal softmax(q k^T * scale) v per head, with
q [B, H, Lq, D] and k/v [B, H, Lk, D] (SDPA's layout). With `kv_index` [B, S] the keys are the rows
kv_index[b, :] of k/v, read through the index inside the kernels (no gathered copy), and the backward writes
dK/dV only at those rows (zeros elsewhere). Indices must lie in [0, Lk) and be unique per row: the backward
stores rather than accumulates (no atomics), so a repeated row would keep only one of its gradients.

Kernels: the forward runs an online softmax and saves the log-sum-exp (fp32). The backward is
FlashAttention-2 style; when all keys fit one tile (S or Lk <= 128 for 16-bit D <= 64, <= 64 for D = 128;
the CrossMAE case of a few dozen keys and hundreds of queries) one program per (batch, head) loops over the
query blocks and writes dQ, dK and dV itself, computing rowsum(dO * O) on the fly. Longer key sets take a
delta pass, a dK/dV kernel over query blocks and a dQ kernel over key blocks.
Inputs need a unit stride in the last dim (else they are made contiguous); other strides are passed.
On CUDA every new (Lq, S or Lk, D) is autotuned on first use: run it once before CUDA-graph capture.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from kernels.reference import cross_attention_reference
from kernels.utils import dot_precision, interpret_mode, next_pow2, use_triton

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
KEY = ["Lq", "NK", "D"]  # autotune key: query count, key count (S or Lk), head dim
LENGTHS = ["H", "Lq", "NK"]  # masked by the kernels: a new length reuses the compiled binary
TILE_BUDGET = {(2, "tf32"): 128, (4, "tf32"): 96, (4, "ieee"): 32}
"""Tile values per thread a config may keep live, by (operand bytes, dot precision): set from ptxas's spill
reports in benchmarks/results/kernel_resources.md (exact fp32 dots run on FMAs, which replicate operands)."""


def _configs(options: list[tuple[int, int, int]]) -> list[triton.Config]:
    """Autotune configs (BLOCK_M, num_warps, num_stages); the interpreter gets exactly one."""
    if interpret_mode():
        options = [(32, 4, 1)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in options]


def _tile_floats(config: triton.Config, kwargs: dict, kind: str, esize: int) -> float:
    """Tile values per thread (in fp32 registers) a config keeps live, roughly: "fwd" the BLOCK_M x BLOCK_D
    accumulator, Q tile and two BLOCK_M x BLOCK_N score tiles; "dq" its accumulator and one score tile (no
    dQ config spilled with 16-bit operands); "dkdv" the two BLOCK_N x BLOCK_D accumulators, four score-sized
    tiles, the Q and dO tiles, and when FUSED also O and dQ."""
    m, n, d = config.kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"]
    if kind == "fwd":
        floats = m * (d + 2 * n) + m * d * esize / 4
    elif kind == "dq":
        floats = m * (d + n)
    else:
        floats = n * (2 * d + 3 * m) + m * d * (4 if kwargs["FUSED"] else 2)
    return floats / (32 * config.num_warps)


def _pruner(kind: str):
    """`early_config_prune` for one kernel: BLOCK_M no longer than the queries need, and tiles within a
    register budget (smaller for fp32 operands, smallest for exact fp32 dots, which run on FMAs); the config
    with the smallest tiles always survives."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        smallest_m = min(c.kwargs["BLOCK_M"] for c in configs)
        max_m = max(smallest_m, next_pow2(named_args["Lq"]))
        esize = named_args["Q"].element_size()
        budget = TILE_BUDGET[(esize, kwargs["PREC"])] if esize == 4 else TILE_BUDGET[(2, "tf32")]
        cost = lambda c: _tile_floats(c, kwargs, kind, esize)  # noqa: E731
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m and cost(c) <= budget]
        return kept or [min(configs, key=cost)]

    return {"early_config_prune": prune}


@triton.jit
def _key_rows(IDX, offs_n, n_ok, HAS_INDEX: tl.constexpr):
    """Rows of K/V holding keys `offs_n`: through the index, or the identity."""
    rows = offs_n.to(tl.int64)
    if HAS_INDEX:
        rows = tl.load(IDX + offs_n, mask=n_ok, other=0).to(tl.int64)
    return rows


@triton.jit
def _query_tile(Q, sqb, sqh, sqm, H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch `b`, head `h` and query block (program id = (b * H + h) * blocks + block):
    the block's query and feature offsets, their masks, and its Q tile."""
    n_m = tl.cdiv(Lq, BLOCK_M)
    bh = tl.program_id(0) // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = (tl.program_id(0) % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    return b, h, offs_m, offs_d, m_ok, d_ok, q_mask, q


@triton.jit
def _kv_tile(K, V, IDX, start, skn, svn, NK, offs_d, d_ok, HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key block from key `start` (K, V, IDX already offset to this batch and head): which keys
    exist, and their K and V tiles (zero where they do not)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NK
    rows = _key_rows(IDX, offs_n, n_ok, HAS_INDEX)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + rows[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    return n_ok, k, v


@triton.autotune(configs=_configs([(64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 3)]), key=KEY,
                 prune_configs_by=_pruner("fwd"))
@triton.jit(do_not_specialize=LENGTHS)
def _fwd_kernel(Q, K, V, IDX, OUT, LSE, qk_scale,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sib,
                H, Lq, NK, D,
                HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr):
    b, h, offs_m, offs_d, m_ok, d_ok, q_mask, q = _query_tile(Q, sqb, sqh, sqm, H, Lq, D, BLOCK_M, BLOCK_D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        n_ok, k, v = _kv_tile(K, V, IDX + b * sib, start, skn, svn, NK, offs_d, d_ok, HAS_INDEX, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=q_mask)
    # natural-log LSE; the scores above are in log2 units (scaled by log2(e))
    tl.store(LSE + (b * H + h) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit(do_not_specialize=["H", "Lq"])
def _bwd_delta_kernel(OUT, DO, DLSE, DELTA, sob, soh, som, sdb, sdh, sdm, H, Lq, D,
                      HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE: the softmax-backward row term."""
    n_m = tl.cdiv(Lq, BLOCK_M)
    bh = tl.program_id(0) // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = (tl.program_id(0) % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = (b * H + h) * Lq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=m_ok, other=0.0)
    tl.store(DELTA + row, delta, mask=m_ok)


@triton.autotune(configs=_configs([(16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2), (64, 8, 3)]), key=KEY,
                 prune_configs_by=_pruner("dkdv"))
@triton.jit(do_not_specialize=LENGTHS)
def _bwd_kv_kernel(Q, K, V, IDX, OUT, DO, LSE, DLSE, DELTA, DQ, DK, DV, qk_scale, scale,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sdob, sdoh, sdom, sib,
                   sdqb, sdqh, sdqm, sdkb, sdkh, sdkn,
                   H, Lq, NK, D,
                   HAS_INDEX: tl.constexpr, HAS_DLSE: tl.constexpr, FUSED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK/dV of one key block, looping over all query blocks. FUSED (one key block holds every key):
    also computes delta on the fly and writes dQ, each query block being visited exactly once."""
    n_n = tl.cdiv(NK, BLOCK_N)
    bh = tl.program_id(0) // n_n
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_n = (tl.program_id(0) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NK
    d_ok = offs_d < D
    rows = _key_rows(IDX + b * sib, offs_n, n_ok, HAS_INDEX)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    Q += b * sqb + h * sqh
    OUT += b * sob + h * soh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    row0 = (b * H + h) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, Lq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        if FUSED:
            o = tl.load(OUT + offs_m[:, None] * som + offs_d[None, :], mask=q_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_DLSE:
                delta -= tl.load(DLSE + row0 + offs_m, mask=m_ok, other=0.0)
        else:
            delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        # padded keys must get p = 0: their zero K rows would otherwise give exp2(-lse), possibly inf
        p_t = tl.where(n_ok[:, None], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=PREC)
        if FUSED:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PREC) * scale
            tl.store(DQ + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
    off = b * sdkb + h * sdkh + rows[:, None] * sdkn + offs_d[None, :]  # dK and dV share one layout
    tl.store(DK + off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs([(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2)]), key=KEY,
                 prune_configs_by=_pruner("dq"))
@triton.jit(do_not_specialize=LENGTHS)
def _bwd_q_kernel(Q, K, V, IDX, DO, LSE, DELTA, DQ, qk_scale, scale,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sib, sdqb, sdqh, sdqm,
                  H, Lq, NK, D,
                  HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """dQ of one query block, looping over all key blocks (the unfused path)."""
    b, h, offs_m, offs_d, m_ok, d_ok, q_mask, q = _query_tile(Q, sqb, sqh, sqm, H, Lq, D, BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
    row = (b * H + h) * Lq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    K += b * skb + h * skh
    V += b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        n_ok, k, v = _kv_tile(K, V, IDX + b * sib, start, skn, svn, NK, offs_d, d_ok, HAS_INDEX, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.where(n_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PREC)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --- launchers -----------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None) -> None:
    """Shape, dtype and device checks with messages that name the problem."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be [B, H, Lk, D] matching q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}]; got {q.shape[3]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if kv_index is None:
        if k.shape[2] == 0:
            raise ValueError("k and v have no rows (Lk = 0): softmax over no keys")
        return
    if kv_index.dim() != 2 or kv_index.shape[0] != q.shape[0] or kv_index.shape[1] == 0:
        raise ValueError(f"kv_index must be [B={q.shape[0]}, S>=1]; got {tuple(kv_index.shape)}")
    if kv_index.dtype not in (torch.int64, torch.int32) or kv_index.device != q.device:
        raise ValueError(f"kv_index must be int64/int32 on {q.device}; got {kv_index.dtype} on "
                         f"{kv_index.device}")


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_n(n_keys: int, d: int, dtype: torch.dtype) -> int:
    """Key tile: all keys when they fit (one pass), else what registers allow (128 for 16-bit D <= 64)."""
    esize = torch.finfo(dtype).bits // 8
    cap = min(128, max(16, (16384 if esize == 2 else 8192) // (next_pow2(d) * esize)))
    return min(max(16, next_pow2(n_keys)), cap)


def _launch_args(q: torch.Tensor, kv_index: torch.Tensor | None) -> dict:
    return dict(HAS_INDEX=kv_index is not None, BLOCK_D=max(16, next_pow2(q.shape[3])), PREC=dot_precision(q.dtype))


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward_triton(q, k, v, kv_index, scale):
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    idx = q if kv_index is None else kv_index.contiguous()  # q is an unused placeholder pointer
    (B, H, Lq, D), nk = q.shape, (k.shape[2] if kv_index is None else kv_index.shape[1])
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (B * H * triton.cdiv(Lq, meta["BLOCK_M"]),)
    with _device(q):
        _fwd_kernel[grid](q, k, v, idx, out, lse, scale * LOG2E,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                          0 if kv_index is None else idx.stride(0),
                          H, Lq, nk, D, BLOCK_N=_block_n(nk, D, q.dtype), **_launch_args(q, kv_index))
    return out, lse


def _backward_triton(do, q, k, v, kv_index, out, lse, dlse, scale):
    q, k, v, out = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _last_dim_unit(out)
    do = _last_dim_unit(do.to(q.dtype))
    idx = q if kv_index is None else kv_index.contiguous()
    (B, H, Lq, D), nk = q.shape, (k.shape[2] if kv_index is None else kv_index.shape[1])
    dq = q.new_empty(q.shape)
    # index rows that are never written must read zero; without an index the kernels cover every row
    dk, dv = (k.new_zeros(k.shape), k.new_zeros(k.shape)) if kv_index is not None or Lq == 0 else \
        (k.new_empty(k.shape), k.new_empty(k.shape))
    if dq.numel() == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    block_n = _block_n(nk, D, q.dtype)
    fused = nk <= block_n
    args = _launch_args(q, kv_index)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    sib = 0 if kv_index is None else idx.stride(0)
    with _device(q):
        delta = lse  # placeholder pointer when fused
        if not fused:
            delta = torch.empty_like(lse)
            grid = (B * H * triton.cdiv(Lq, 64),)
            _bwd_delta_kernel[grid](out, do, lse if dlse is None else dlse, delta, *out.stride()[:3],
                                    *do.stride()[:3], H, Lq, D, HAS_DLSE=dlse is not None, BLOCK_M=64,
                                    BLOCK_D=args["BLOCK_D"])
        _bwd_kv_kernel[(B * H * triton.cdiv(nk, block_n),)](
            q, k, v, idx, out, do, lse, lse if dlse is None else dlse, delta, dq, dk, dv, scale * LOG2E,
            scale,
            *strides, *out.stride()[:3], *do.stride()[:3], sib, *dq.stride()[:3], *dk.stride()[:3],
            H, Lq, nk, D, HAS_DLSE=dlse is not None, FUSED=fused, BLOCK_N=block_n, **args)
        if not fused:
            grid = lambda meta: (B * H * triton.cdiv(Lq, meta["BLOCK_M"]),)
            _bwd_q_kernel[grid](q, k, v, idx, do, lse, delta, dq, scale * LOG2E, scale,
                                *strides, *do.stride()[:3], sib, *dq.stride()[:3],
                                H, Lq, nk, D, BLOCK_N=block_n, **args)
    return dq, dk, dv


# --- the op's CPU implementation (without the interpreter): the reference's semantics plus the LSE -------


def _gathered(k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None):
    if kv_index is None:
        return k.float(), v.float(), None
    idx = kv_index.long()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, idx).float(), v.gather(2, idx).float(), idx


def _forward_math(q, k, v, kv_index, scale):
    kk, vv, _ = _gathered(k, v, kv_index)
    s = q.float() @ kk.mT * scale
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse[..., None]) @ vv).to(q.dtype), lse


def _backward_math(do, q, k, v, kv_index, out, lse, dlse, scale):
    kk, vv, idx = _gathered(k, v, kv_index)
    qf, dof = q.float(), do.float()
    p = torch.exp(qf @ kk.mT * scale - lse[..., None])
    delta = (dof * out.float()).sum(-1) - (0.0 if dlse is None else dlse)
    ds = p * (dof @ vv.mT - delta[..., None]) * scale
    dq, dk, dv = ds @ kk, ds.mT @ qf, p.mT @ dof
    if idx is not None:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device).scatter_add_(2, idx, dk)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device).scatter_add_(2, idx, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward(q, k, v, kv_index, scale):
    _check(q, k, v, kv_index)
    return (_forward_triton if use_triton(q, k, v) else _forward_math)(q, k, v, kv_index, scale)


def _backward(do, q, k, v, kv_index, out, lse, dlse, scale):
    fn = _backward_triton if use_triton(q, k, v) else _backward_math
    return fn(do, q, k, v, kv_index, out, lse, dlse, scale)


# --- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("crossmae::cross_attention", mutates_args=())
def cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Lq, D], lse [B, H, Lq] fp32): the output and its natural-log softmax normaliser."""
    return _forward(q, k, v, kv_index, scale)


@cross_attention_op.register_fake
def _(q, k, v, kv_index, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("crossmae::cross_attention_backward", mutates_args=())
def cross_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                kv_index: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                                dlse: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(dq, dk, dv) of `cross_attention_op`, given the gradients of out and (optionally) lse."""
    return _backward(dout, q, k, v, kv_index, out, lse, dlse, scale)


@cross_attention_backward_op.register_fake
def _(dout, q, k, v, kv_index, out, lse, dlse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class CrossAttentionFunction(torch.autograd.Function):
    """Autograd of `cross_attention_op`, registered on the custom op (so torch.compile sees it); `apply`
    runs the same launchers as `(out, lse)` outside torch.library."""

    @staticmethod
    def forward(q, k, v, kv_index, scale):
        return _forward(q, k, v, kv_index, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kv_index, scale = inputs
        ctx.set_materialize_grads(False)  # lse is rarely used: skip a zero-filled dlse
        ctx.save_for_backward(q, k, v, kv_index, *output)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kv_index, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = torch.ops.crossmae.cross_attention_backward(dout, q, k, v, kv_index, out, lse, dlse, ctx.scale)
        return *grads, None, None


cross_attention_op.register_autograd(CrossAttentionFunction.backward,
                                     setup_context=CrossAttentionFunction.setup_context)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, non-causal; q [B, H, Lq, D], k/v [B, H, Lk, D], scale default 1/sqrt(D).

    kv_index [B, S] (int64/int32, values in [0, Lk), unique per row) restricts the keys of batch b to rows
    kv_index[b, :], read in place; dK/dV are zero at rows not indexed. Same result as SDPA on gathered K/V.
    """
    _check(q, k, v, kv_index)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not use_triton(q, k, v):  # the CPU path of every op: its reference
        return cross_attention_reference(q, k, v, kv_index, scale)
    return torch.ops.crossmae.cross_attention(q, k, v, kv_index, scale)[0]
