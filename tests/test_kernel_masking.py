"""random_masking: the Triton op (interpreter on CPU, or CUDA) against the pure-torch MAE reference."""

from __future__ import annotations

import pytest
import torch
from kernel_marks import DEVICE, needs_cuda, needs_triton

import kernels.masking as masking
import kernels.utils
from kernels import random_masking
from kernels.reference import random_masking_reference

pytestmark = [needs_triton, pytest.mark.core]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CASES = [  # B, L, D, mask_ratio, pos_embed batch (0: none)
    (1, 1, 24, 0.0, 1),
    (2, 1, 48, 0.75, 1),  # nothing kept
    (3, 7, 24, 0.5, 0),
    (2, 49, 48, 0.75, 1),
    (3, 50, 96, 0.75, 3),
    (1, 129, 24, 0.9, 1),
    (2, 197, 48, 0.75, 1),
    (3, 513, 96, 0.75, 1),
]


def _inputs(B, L, D, pos_batch, dtype, pos_dtype=None):
    x = torch.randn(B, L, D, device=DEVICE, dtype=dtype, requires_grad=True)
    pos = None
    if pos_batch:
        pos = torch.randn(pos_batch, L, D, device=DEVICE, dtype=pos_dtype or dtype, requires_grad=True)
    return x, pos, torch.rand(B, L, device=DEVICE)


def _grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


def _assert_close(actual, expected, tol):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.float().abs().max().clamp_min(1e-6) if expected.numel() else 1.0
    err = (actual.float() - expected.float()).abs().max() / scale if expected.numel() else 0.0
    assert err <= tol, f"relative error {float(err):.3g} > {tol}"


def _check_against_reference(x, pos, noise, ratio, tol):
    out = random_masking(x, ratio, pos, noise)
    ref = random_masking_reference(x, ratio, pos, noise)
    for name, a, b in zip(("x_visible", "mask", "ids_restore", "ids_keep"), out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # same gather, same add: bit-equal
    grad = torch.randn_like(ref[0])
    got, want = _grads(out[0], (x, pos), grad), _grads(ref[0], (x, pos), grad)
    assert torch.equal(got[0], want[0])  # dx: every element is one gradient value or zero
    if pos is not None:
        _assert_close(got[1], want[1], tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,L,D,ratio,pos_batch", CASES)
def test_kernel_masking_matches_reference(B, L, D, ratio, pos_batch, dtype):
    x, pos, noise = _inputs(B, L, D, pos_batch, dtype)
    _check_against_reference(x, pos, noise, ratio, TOL[dtype])


def test_kernel_masking_mixed_dtypes_and_strided_inputs():
    """fp16 tokens + fp32 pos (promoted like torch's add), non-contiguous x and an MAE-style pos slice."""
    B, L, D = 3, 50, 48
    x = torch.randn(B, D, L, device=DEVICE, dtype=torch.float16).transpose(1, 2).requires_grad_()
    full_pos = torch.randn(1, L + 1, D, device=DEVICE, requires_grad=True)
    noise = torch.rand(B, L, device=DEVICE)
    _check_against_reference(x, full_pos[:, 1:], noise, 0.75, TOL[torch.float32])


def test_kernel_masking_batch_chunks(monkeypatch):
    """Force several batch rows per backward program (the loop that sums a shared pos_embed)."""
    monkeypatch.setattr(kernels.utils, "PROGRAMS_TARGET", 1)
    x, pos, noise = _inputs(3, 49, 24, 1, torch.float32)
    _check_against_reference(x, pos, noise, 0.75, TOL[torch.float32])


def test_kernel_masking_frozen_pos_and_default_noise():
    B, L, D = 2, 49, 24
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, L, D, device=DEVICE)  # MAE's fixed sin-cos table: no gradient
    x_vis, mask, ids_restore, ids_keep = random_masking(x, 0.75, pos)
    K = int(L * 0.25)
    assert x_vis.shape == (B, K, D) and mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - K), device=DEVICE))
    assert torch.equal(x_vis, torch.gather(x + pos, 1, ids_keep[:, :, None].expand(-1, -1, D)))
    assert torch.equal(ids_keep.sort(1).values, torch.nonzero(mask == 0)[:, 1].view(B, K))
    (dx,) = torch.autograd.grad(x_vis.sum(), x)
    assert torch.equal(dx, (1 - mask)[:, :, None].expand(B, L, D))


def test_kernel_masking_rejects_bad_shapes():
    x = torch.randn(2, 7, 24, device=DEVICE)
    with pytest.raises(ValueError, match="pos_embed"):
        random_masking(x, 0.5, torch.randn(2, 6, 24, device=DEVICE))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.5)
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.5, noise=torch.rand(2, 8, device=DEVICE))


@pytest.mark.parametrize("pos_batch", [0, 1, 2])
def test_kernel_masking_opcheck(pos_batch):
    x, pos, noise = _inputs(2, 50, 24, pos_batch, torch.float32)
    ids_restore = noise.argsort(1).argsort(1)
    ids_keep = noise.argsort(1)[:, :12]
    torch.library.opcheck(torch.ops.crossmae.masking_gather.default, (x, ids_keep, ids_restore, pos))
    grad = torch.randn(2, 12, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.crossmae.masking_gather_backward.default, (grad, ids_restore, pos_batch == 1))


def test_kernel_masking_compiles_fullgraph():
    x, pos, noise = _inputs(2, 49, 24, 1, torch.float32)

    def step(x, pos, noise):
        x_vis, mask, ids_restore, _ = random_masking(x, 0.75, pos, noise)
        return (x_vis.square().sum() + mask.sum()) * ids_restore.float().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, pos, noise)
    want = step(x, pos, noise)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, pos)), torch.autograd.grad(want, (x, pos)))


@needs_cuda
@pytest.mark.parametrize("pos_batch", [1, 3])
def test_kernel_masking_bf16_cuda(pos_batch):
    """bf16: the gather and add equal torch's bit for bit; the pos gradient (a batch sum) is within
    twice torch's own bf16 error against an fp32 computation on the same inputs."""
    x, pos, noise = _inputs(3, 197, 768, pos_batch, torch.bfloat16)
    out = random_masking(x, 0.75, pos, noise)
    ref = random_masking_reference(x, 0.75, pos, noise)
    assert torch.equal(out[0], ref[0])
    grad = torch.randn_like(ref[0])
    got, torch_bf16 = _grads(out[0], (x, pos), grad), _grads(ref[0], (x, pos), grad)
    x32, pos32 = x.detach().float().requires_grad_(), pos.detach().float().requires_grad_()
    exact = _grads(random_masking_reference(x32, 0.75, pos32, noise)[0], (x32, pos32), grad.float())
    assert torch.equal(got[0], torch_bf16[0])
    bound = 2 * (torch_bf16[1].float() - exact[1]).abs().max() + 2**-8 * exact[1].abs().max()
    assert (got[1].float() - exact[1]).abs().max() <= bound


@needs_cuda
def test_kernel_masking_cuda_graph_replay(graph_capture):
    x, pos, noise = _inputs(4, 196, 96, 1, torch.float32)
    grad = torch.randn(4, 49, 96, device=DEVICE)

    def step():
        out = random_masking(x, 0.75, pos, noise)
        return (*out, *torch.autograd.grad(out[0], (x, pos), grad))

    captured, graph = graph_capture(step)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        pos.copy_(torch.randn_like(pos))
        noise.copy_(torch.rand_like(noise))
    graph.replay()
    for a, b in zip(captured, step()):
        assert torch.equal(a, b)


def test_kernel_masking_autograd_function():
    """The autograd.Function that backs the custom op also works on its own."""
    x, pos, noise = _inputs(2, 50, 24, 1, torch.float32)
    ids_restore, ids_keep, _ = masking.masking_indices(noise, 12)
    out = masking.MaskingGather.apply(x, ids_keep, ids_restore, pos)
    ref = random_masking_reference(x, 0.76, pos, noise)[0]  # int(50 * 0.24) = 12 kept
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x, pos), grad), _grads(ref, (x, pos), grad)):
        _assert_close(a, b, TOL[torch.float32])
