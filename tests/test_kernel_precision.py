"""fp32 `tl.dot`s follow torch's TF32 setting (exact "ieee" unless torch allows TF32); 16-bit dots are exact."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from kernel_marks import DEVICE, needs_cuda

from benchmarks.kernel_resources import recording
from kernels import cross_attention
from kernels.reference import cross_attention_reference
from kernels.utils import dot_precision, tf32_allowed

ca = importlib.import_module("kernels.cross_attention")
pytestmark = pytest.mark.core


@pytest.fixture
def matmul_precision():
    """`torch.set_float32_matmul_precision`, restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("setting, fp32", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_kernel_dot_precision_follows_torch(matmul_precision, setting, fp32):
    matmul_precision(setting)
    assert tf32_allowed() == (fp32 == "tf32")
    assert dot_precision(torch.float32) == fp32
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("allow", [False, True])
def test_kernel_dot_precision_legacy_flag(monkeypatch, allow):
    """A torch without `fp32_precision`: `allow_tf32` decides."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=allow))
    assert dot_precision(torch.float32) == ("tf32" if allow else "ieee")


@pytest.mark.parametrize("setting, dtype, prec", [("highest", torch.float32, "ieee"), ("high", torch.float32, "tf32"),
                                                  ("highest", torch.float16, "tf32")])
@pytest.mark.parametrize("Lk", [20, 300])  # one fused backward kernel; the three-kernel backward
def test_kernel_cross_attention_launches_with_precision(matmul_precision, setting, dtype, prec, Lk):
    """Every dot-bearing launch (forward, backward) gets the precision torch's setting implies (recorded, not run)."""
    matmul_precision(setting)
    q, k, v = (torch.zeros(1, 2, n, 16, dtype=dtype) for n in (24, Lk, Lk))
    with recording() as launches:
        out, lse = ca._forward_triton(q, k, v, None, 0.25)
        ca._backward_triton(out, q, k, v, None, out, lse, None, 0.25)
    names = [launch.kernel.__name__ for launch in launches]
    assert "_fwd_kernel" in names and "_bwd_kv_kernel" in names and ("_bwd_q_kernel" in names) == (Lk > 128)
    assert {launch.kwargs["PREC"] for launch in launches if "PREC" in launch.kwargs} == {prec}


@needs_cuda
def test_kernel_cross_attention_tf32_cuda(matmul_precision):
    """fp32 with TF32 allowed: within TF32's error (10-bit mantissa) of fp64 math, forward and gradients
    (one indexed shape: each new shape costs GPU-time compiles)."""
    matmul_precision("high")
    S = 24
    q = torch.randn(2, 4, 200, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 4, 150, 64, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 4, 150, 64, device=DEVICE, requires_grad=True)
    idx = None if S is None else torch.rand(2, 150, device=DEVICE).argsort(1)[:, :S]
    out = cross_attention(q, k, v, idx)
    ref = cross_attention_reference(q.double(), k.double(), v.double(), idx)
    assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad.double())):
        assert (a.double() - b).abs().max() <= 3e-2 * b.abs().max()
