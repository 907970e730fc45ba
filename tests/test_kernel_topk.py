"""cls_attention_topk: the Triton op (interpreter on CPU, or CUDA) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_marks import DEVICE, needs_cuda, needs_triton

from kernels import cls_attention_topk
from kernels.cls_topk import ClsAttentionProbs
from kernels.reference import cls_attention_topk_reference

pytestmark = [needs_triton, pytest.mark.core]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5}  # fp16 inputs, fp32 math in both
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # dq/dk are rounded to the input dtype
CASES = [  # B, H, N (non-CLS keys), D
    (1, 1, 1, 24),
    (2, 3, 7, 48),
    (3, 2, 49, 96),
    (2, 4, 50, 64),
    (1, 3, 129, 24),
    (2, 2, 197, 128),
    (1, 2, 513, 48),
    (1, 1, 1100, 32),
]


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The reference's fp32 einsum must not run in TF32 on a GPU."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _rel_err(actual, expected):
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _distinct_scores(B, H, N, D, dtype):
    """Inputs whose probabilities are strictly ordered: head h scores token j as c_h * perm[j] / 64
    (c_h >= 1 after the 1/sqrt(D) scale), from small integer key values q and k hold exactly in any
    float dtype. Every head, hence the mean, orders tokens like perm, neighbours e^(1/64) apart."""
    q = torch.zeros(B, H, D, device=DEVICE)
    q[:, :, 0] = D**0.5 * (1 + torch.arange(H, device=DEVICE) / 4)
    q = q.to(dtype)
    q[:, :, 1] = q[:, :, 0] / 64  # exact: a power-of-two ratio
    k = torch.randn(B, H, N + 1, D, device=DEVICE)
    perm = torch.stack([torch.randperm(N, device=DEVICE) for _ in range(B)])
    k[:, :, 1:, 0] = (perm // 64)[:, None, :]
    k[:, :, 1:, 1] = (perm % 64)[:, None, :]
    return q, k.to(dtype), perm.argsort(1, descending=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,N,D", CASES)
def test_kernel_topk_matches_reference(B, H, N, D, dtype):
    q = torch.randn(B, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, N + 1, D, device=DEVICE, dtype=dtype, requires_grad=True)
    topk = max(1, N // 4)
    idx, probs = cls_attention_topk(q, k, topk)
    ref_idx, ref_probs = cls_attention_topk_reference(q, k, topk)
    assert probs.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (B, topk)
    assert _rel_err(probs, ref_probs) <= TOL[dtype]
    # the indices are a top-k of the reference probabilities, in order (ties up to the tolerance)
    picked = ref_probs.gather(1, idx)
    slack = 4 * TOL[dtype] * ref_probs.max()
    assert (picked >= ref_probs.gather(1, ref_idx)[:, -1:] - slack).all()
    assert (picked[:, :-1] >= picked[:, 1:] - slack).all()
    assert all(len(set(row)) == topk for row in idx.tolist())
    grad = torch.randn_like(ref_probs)
    got = torch.autograd.grad(probs, (q, k), grad)
    want = torch.autograd.grad(ref_probs, (q, k), grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and _rel_err(a, b) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,N,D", [(2, 3, 49, 24), (3, 2, 128, 64), (1, 2, 1100, 48)])
def test_kernel_topk_exact_order_without_ties(B, H, N, D, dtype):
    q, k, order = _distinct_scores(B, H, N, D, dtype)
    for topk in (N // 4, N):
        idx, _ = cls_attention_topk(q, k, topk)
        assert torch.equal(idx, order[:, :topk])
        assert torch.equal(idx, cls_attention_topk_reference(q, k, topk)[0])


@pytest.mark.parametrize("B,H,N,D", [(33, 2, 150, 40), (32, 3, 257, 16)])
def test_kernel_topk_many_programs(B, H, N, D):
    """A batch spread over (batch, head) statistics programs and (batch, key block) probability programs
    (more than one key block per row under the interpreter's BLOCK_N = 128): probs, gradients and order."""
    q = torch.randn(B, H, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, N + 1, D, device=DEVICE, requires_grad=True)
    idx, probs = cls_attention_topk(q, k, N // 3)
    _, ref = cls_attention_topk_reference(q, k, N // 3)
    assert _rel_err(probs, ref) <= 1e-5
    assert torch.allclose(probs.sum(1), 1 - (q[:, :, None] @ k.mT)[:, :, 0].div(D**0.5).softmax(-1)[:, :, 0].mean(1),
                          atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(probs, (q, k), grad), torch.autograd.grad(ref, (q, k), grad)):
        assert _rel_err(a, b) <= 1e-5
    q, k, order = _distinct_scores(B, H, N, D, torch.float32)
    assert torch.equal(cls_attention_topk(q, k, N // 3)[0], order[:, : N // 3])


def test_kernel_topk_strided_keys():
    """k as the attention block makes it: a permuted view of a fused qkv projection."""
    B, N1, H, D = 2, 50, 3, 32
    qkv = torch.randn(B, N1, 3, H, D, device=DEVICE).permute(2, 0, 3, 1, 4)
    q, k = qkv[0, :, :, 0].requires_grad_(), qkv[1].requires_grad_()
    idx, probs = cls_attention_topk(q, k, 12)
    ref_idx, ref_probs = cls_attention_topk_reference(q, k, 12)
    assert _rel_err(probs, ref_probs) <= 1e-5
    grad = torch.randn_like(probs)
    for a, b in zip(torch.autograd.grad(probs, (q, k), grad), torch.autograd.grad(ref_probs, (q, k), grad)):
        assert _rel_err(a, b) <= 1e-5


def test_kernel_topk_autograd_function():
    """The autograd.Function that backs the custom op also works on its own."""
    q = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 50, 24, device=DEVICE, requires_grad=True)
    probs, ref = ClsAttentionProbs.apply(q, k), cls_attention_topk_reference(q, k, 1)[1]
    assert _rel_err(probs, ref) <= 1e-5
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(probs, (q, k), grad), torch.autograd.grad(ref, (q, k), grad)):
        assert _rel_err(a, b) <= 1e-5


def test_kernel_topk_rejects_bad_shapes():
    q, k = torch.randn(2, 3, 24, device=DEVICE), torch.randn(2, 3, 8, 24, device=DEVICE)
    with pytest.raises(ValueError, match="topk"):
        cls_attention_topk(q, k, 8)
    with pytest.raises(ValueError, match="q_cls"):
        cls_attention_topk(q[:, :2], k, 2)
    with pytest.raises(ValueError, match="N >= 1"):
        cls_attention_topk(q, k[:, :, :1], 0)


def test_kernel_topk_opcheck():
    q = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 20, 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.crossmae.cls_attention_probs.default, (q, k))
    grad = torch.randn(2, 19, device=DEVICE)
    torch.library.opcheck(torch.ops.crossmae.cls_attention_probs_backward.default, (grad, q.detach(), k.detach()))


def test_kernel_topk_compiles_fullgraph():
    q = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 50, 24, device=DEVICE, requires_grad=True)
    tokens = torch.randn(2, 49, 8, device=DEVICE)

    def step(q, k):
        idx, probs = cls_attention_topk(q, k, 12)
        return tokens.gather(1, idx[:, :, None].expand(-1, -1, 8)).sum() + probs.square().sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k)
    want = step(q, k)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k)))


@needs_cuda
@pytest.mark.parametrize("N", [48, 128, 1100])
def test_kernel_topk_bf16_cuda(N):
    """bf16 inputs: probs and gradients within torch's own bf16 error (softmax of bf16 scores) against
    fp32 math on the same inputs; top-k order exact on tie-free inputs."""
    B, H, D = 4, 12, 64
    q = torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, N + 1, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    _, probs = cls_attention_topk(q, k, N // 4)
    _, exact = cls_attention_topk_reference(q, k, N // 4)  # fp32 math on the bf16 values
    native = (((q[:, :, None] @ k.transpose(-1, -2)) * D**-0.5).softmax(-1)[:, :, 0, 1:].mean(1)).float()
    assert (probs - exact).abs().max() <= (native - exact).abs().max() + 1e-7
    grad = torch.randn_like(exact)
    got = torch.autograd.grad(probs, (q, k), grad)
    exact_g = torch.autograd.grad(exact, (q, k), grad)
    native_g = torch.autograd.grad(native, (q, k), grad)
    for a, e, n in zip(got, exact_g, native_g):
        bound = 2 * (n.float() - e.float()).abs().max() + 2**-8 * e.float().abs().max()
        assert (a.float() - e.float()).abs().max() <= bound
    q, k, order = _distinct_scores(B, H, N, D, torch.bfloat16)
    assert torch.equal(cls_attention_topk(q, k, N // 4)[0], order[:, : N // 4])


@needs_cuda
def test_kernel_topk_cuda_graph_replay(graph_capture):
    q = torch.randn(8, 12, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(8, 12, 50, 64, device=DEVICE, requires_grad=True)
    grad = torch.randn(8, 49, device=DEVICE)

    def step():
        idx, probs = cls_attention_topk(q, k, 12)
        return (idx, probs, *torch.autograd.grad(probs, (q, k), grad))

    captured, graph = graph_capture(step)
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
    graph.replay()
    for a, b in zip(captured, step()):
        assert torch.equal(a, b)
