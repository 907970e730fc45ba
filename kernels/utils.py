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


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (`tl.arange` needs powers of two)."""
    return 1 << max(0, (n - 1).bit_length())
