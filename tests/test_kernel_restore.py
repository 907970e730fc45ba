"""restore_tokens: the Triton op (interpreter on CPU, or CUDA) against the pure-torch MAE reference."""

from __future__ import annotations

import pytest
import torch
from kernel_marks import DEVICE, needs_cuda, needs_triton

import kernels.restore as restore
import kernels.utils
from kernels import restore_tokens
from kernels.reference import restore_tokens_reference

pytestmark = [needs_triton, pytest.mark.core]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CASES = [  # B, L, K (visible), D, pos_embed batch (0: none)
    (1, 1, 1, 24, 1),
    (2, 1, 0, 48, 0),  # nothing visible
    (3, 7, 3, 24, 0),
    (2, 49, 12, 48, 1),
    (3, 50, 13, 96, 3),
    (1, 129, 32, 24, 1),
    (2, 197, 49, 48, 1),
    (3, 513, 128, 96, 1),
]


def _inputs(B, L, K, D, pos_batch, dtype, tok_dtype=None):
    x = torch.randn(B, K, D, device=DEVICE, dtype=dtype, requires_grad=True)
    tok = torch.randn(1, 1, D, device=DEVICE, dtype=tok_dtype or dtype, requires_grad=True)
    pos = torch.randn(pos_batch, L, D, device=DEVICE, dtype=dtype, requires_grad=True) if pos_batch else None
    ids_restore = torch.rand(B, L, device=DEVICE).argsort(1).argsort(1)
    return x, tok, ids_restore, pos


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)


def _assert_close(actual, expected, tol):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.numel():
        err = (actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)
        assert err <= tol, f"relative error {float(err):.3g} > {tol}"


def _check_against_reference(x, tok, ids_restore, pos, tol):
    out = restore_tokens(x, tok, ids_restore, pos)
    ref = restore_tokens_reference(x, tok, ids_restore, pos)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    grad = torch.randn_like(ref)
    got, want = _grads(out, (x, tok, pos), grad), _grads(ref, (x, tok, pos), grad)
    assert torch.equal(got[0], want[0])  # dx_visible: a permutation of gradient rows
    for a, b in zip(got[1:], want[1:]):  # sums over masked rows / over the batch
        _assert_close(a, b, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,L,K,D,pos_batch", CASES)
def test_kernel_restore_matches_reference(B, L, K, D, pos_batch, dtype):
    _check_against_reference(*_inputs(B, L, K, D, pos_batch, dtype), TOL[dtype])


def test_kernel_restore_mixed_dtypes_and_strided_inputs():
    """fp16 tokens with an fp32 mask token (promoted like torch.cat), strided x and an MAE-style pos slice."""
    B, L, K, D = 3, 50, 13, 48
    x = torch.randn(B, D, K, device=DEVICE, dtype=torch.float16).transpose(1, 2).requires_grad_()
    tok = torch.randn(1, 1, D, device=DEVICE, requires_grad=True)
    full_pos = torch.randn(1, L + 1, D, device=DEVICE, requires_grad=True)
    ids_restore = torch.rand(B, L, device=DEVICE).argsort(1).argsort(1)
    _check_against_reference(x, tok, ids_restore, full_pos[:, 1:], TOL[torch.float32])


def test_kernel_restore_batch_chunks(monkeypatch):
    """Force several batch rows per backward program (the loops that sum mask-token and pos gradients)."""
    monkeypatch.setattr(kernels.utils, "PROGRAMS_TARGET", 1)
    _check_against_reference(*_inputs(3, 49, 12, 24, 1, torch.float32), TOL[torch.float32])


def test_kernel_restore_rejects_bad_shapes():
    x, tok, ids, pos = _inputs(2, 7, 3, 24, 1, torch.float32)
    with pytest.raises(ValueError, match="mask_token"):
        restore_tokens(x, torch.zeros(1, 1, 23, device=DEVICE), ids, pos)
    with pytest.raises(ValueError, match="ids_restore"):
        restore_tokens(x, tok, ids.int(), pos)
    with pytest.raises(ValueError, match="pos_embed"):
        restore_tokens(x, tok, ids, pos[:, 1:])


@pytest.mark.parametrize("pos_batch", [0, 1, 2])
def test_kernel_restore_opcheck(pos_batch):
    x, tok, ids_restore, pos = _inputs(2, 50, 12, 24, pos_batch, torch.float32)
    torch.library.opcheck(torch.ops.crossmae.restore_tokens.default, (x, tok, ids_restore, pos))
    grad = torch.randn(2, 50, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.crossmae.restore_tokens_backward.default, (grad, ids_restore, 12, pos_batch == 1))


def test_kernel_restore_compiles_fullgraph():
    x, tok, ids_restore, pos = _inputs(2, 49, 12, 24, 1, torch.float32)

    def step(x, tok, pos):
        return restore_tokens(x, tok, ids_restore, pos).square().sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, tok, pos)
    want = step(x, tok, pos)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, tok, pos)), torch.autograd.grad(want, (x, tok, pos)))


@needs_cuda
@pytest.mark.parametrize("pos_batch", [1, 3])
def test_kernel_restore_bf16_cuda(pos_batch):
    """bf16: forward and dx_visible equal torch's bit for bit; the summed gradients (mask token, shared
    pos) are within twice torch's own bf16 error against an fp32 computation on the same inputs."""
    inputs = _inputs(3, 196, 49, 512, pos_batch, torch.bfloat16)
    out, ref = restore_tokens(*inputs), restore_tokens_reference(*inputs)
    assert torch.equal(out, ref)
    x, tok, ids, pos = inputs
    grad = torch.randn_like(ref)
    got, torch_bf16 = _grads(out, (x, tok, pos), grad), _grads(ref, (x, tok, pos), grad)
    x32, tok32, pos32 = (t.detach().float().requires_grad_() for t in (x, tok, pos))
    exact = _grads(restore_tokens_reference(x32, tok32, ids, pos32), (x32, tok32, pos32), grad.float())
    assert torch.equal(got[0], torch_bf16[0])
    for a, b, e in zip(got[1:], torch_bf16[1:], exact[1:]):
        bound = 2 * (b.float() - e).abs().max() + 2**-8 * e.abs().max()
        assert (a.float() - e).abs().max() <= bound


@needs_cuda
def test_kernel_restore_cuda_graph_replay(graph_capture):
    x, tok, ids_restore, pos = _inputs(4, 196, 49, 96, 1, torch.float32)
    grad = torch.randn(4, 196, 96, device=DEVICE)

    def step():
        out = restore_tokens(x, tok, ids_restore, pos)
        return (out, *torch.autograd.grad(out, (x, tok, pos), grad))

    captured, graph = graph_capture(step)
    with torch.no_grad():
        for t in (x, tok, pos):
            t.copy_(torch.randn_like(t))
        ids_restore.copy_(torch.rand(4, 196, device=DEVICE).argsort(1).argsort(1))
    graph.replay()
    for a, b in zip(captured, step()):
        assert torch.equal(a, b)


def test_kernel_restore_autograd_function():
    """The autograd.Function that backs the custom op also works on its own."""
    x, tok, ids_restore, pos = _inputs(2, 50, 12, 24, 1, torch.float32)
    out = restore.RestoreTokens.apply(x, tok, ids_restore, pos)
    ref = restore_tokens_reference(x, tok, ids_restore, pos)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x, tok, pos), grad), _grads(ref, (x, tok, pos), grad)):
        _assert_close(a, b, TOL[torch.float32])
