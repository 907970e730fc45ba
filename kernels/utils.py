"""Dispatch helpers shared by the fused ops."""

from __future__ import annotations

import os

import torch


def interpret_mode() -> bool:
    """True when `TRITON_INTERPRET=1`: Triton kernels then run on the CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU tensors under the interpreter; else the reference."""
    if all(t.is_cuda for t in tensors):
        return True
    return interpret_mode()


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32 (`torch.backends.cuda.matmul.fp32_precision`,
    which follows `torch.set_float32_matmul_precision`, `allow_tf32` and `torch.backends.fp32_precision`)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before the fp32_precision API
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 operands use TF32 tensor cores when torch allows TF32 for fp32 matmuls,
    else exact fp32 ("ieee", no tensor cores); 16-bit operands are exact either way ("tf32", one binary)."""
    return "ieee" if dtype == torch.float32 and not tf32_allowed() else "tf32"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (`tl.arange` needs powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def row_blocks(rows: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for a row-copy kernel: tiles of about 4K elements."""
    block_d = min(next_pow2(D), 1024)
    return max(1, min(next_pow2(rows), 4096 // block_d)), block_d, 4


PROGRAMS_TARGET = 1024
"""Backward kernels that loop over the batch split it into chunks until about this many programs run."""


def batch_chunk(batch: int, tiles: int) -> int:
    """Batch rows per program for a backward that loops over the batch (per-chunk partial sums, no atomics)."""
    return -(-batch // min(batch, max(1, PROGRAMS_TARGET // tiles)))
