"""Fused cross-attention vs SDPA on explicitly gathered K/V: forward, every gradient, op registration.

The small-shape tests run on the GPU where there is one, else on the CPU under TRITON_INTERPRET=1
(set by conftest.py; fp32/fp16 only); CUDA-only tests add bf16, large shapes and CUDA-graph capture.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_marks import DEVICE, needs_cuda, needs_triton

from kernels import cross_attention
from kernels.reference import cross_attention_reference

ca = importlib.import_module("kernels.cross_attention")
pytestmark = pytest.mark.core
# max |error| / max |reference|, kernel in `dtype` vs the reference in fp32 on the same (rounded) inputs
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def _inputs(B, H, Lq, Lk, D, S, dtype, device=DEVICE):
    seed = torch.seed()
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype, device=device) for n in (Lq, Lk, Lk))
    idx = None if S is None else torch.stack([torch.randperm(Lk)[:S] for _ in range(B)]).to(device)
    return seed, q, k, v, idx


def _rel(a, b):
    """max |a - b| / max |b|; the floor keeps gradients that are zero in theory (one key) measurable."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(0.5)).item()


def _run(fn, q, k, v, idx, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, idx, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def _compare(B, H, Lq, Lk, D, S, dtype, device=DEVICE, tol=None):
    seed, q, k, v, idx = _inputs(B, H, Lq, Lk, D, S, dtype, device)
    do = torch.randn(B, H, Lq, D, device=device)
    got = _run(cross_attention, q, k, v, idx, do)
    want = _run(cross_attention_reference, q.float(), k.float(), v.float(), idx, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        err = _rel(a, b)
        assert err <= (tol or TOL[dtype]), f"{name}: rel err {err:.2e} (seed {seed})"
    if idx is not None:
        for b in range(B):
            unused = torch.ones(Lk, dtype=torch.bool, device=device)
            unused[idx[b]] = False
            assert (got[2][b][:, unused] == 0).all() and (got[3][b][:, unused] == 0).all(), f"seed {seed}"
    return got, want


@needs_triton
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype", [
    (1, 1, 1, 1, 32, torch.float32),
    (2, 1, 7, 13, 64, torch.float32),
    (2, 2, 50, 197, 64, torch.float32),  # several key tiles: delta + dK/dV + dQ kernels
    (1, 2, 129, 65, 32, torch.float16),
    (2, 1, 129, 197, 32, torch.float16),
    (1, 1, 50, 65, 128, torch.float32),  # D = 128: 64-key tiles, so unfused
    (2, 1, 7, 13, 24, torch.float32),  # head dim padded to 32
    (1, 2, 1, 197, 64, torch.float16),
    (1, 1, 513, 1031, 32, torch.float16),  # long on both sides
])
def test_dense_matches_sdpa(B, H, Lq, Lk, D, dtype):
    _compare(B, H, Lq, Lk, D, None, dtype)


@needs_triton
@pytest.mark.parametrize("B,H,Lq,Lk,S,D,dtype", [
    (1, 1, 1, 1, 1, 32, torch.float32),
    (2, 2, 7, 13, 5, 64, torch.float32),
    (2, 1, 129, 65, 12, 32, torch.float16),
    (2, 2, 50, 197, 33, 64, torch.float32),
    (1, 1, 50, 197, 150, 32, torch.float16),  # S > 128: unfused path through the index
    (1, 1, 129, 197, 12, 128, torch.float16),
    (2, 1, 7, 65, 33, 24, torch.float32),
    (1, 1, 257, 1100, 700, 32, torch.float16),
])
def test_indexed_matches_sdpa_on_gathered(B, H, Lq, Lk, S, D, dtype):
    _compare(B, H, Lq, Lk, D, S, dtype)


@needs_triton
def test_strided_inputs_and_scale():
    """[B, L, H, D] views (SDPA layout by transpose), a non-unit last stride, a custom scale, int32 index."""
    B, H, Lq, Lk, S, D = 2, 3, 19, 40, 9, 32
    q = torch.randn(B, Lq, H, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, Lk, H, 2 * D, device=DEVICE).transpose(1, 2)[..., ::2]
    v = torch.randn(B, Lk, H, D, device=DEVICE).transpose(1, 2)
    idx = torch.stack([torch.randperm(Lk)[:S] for _ in range(B)]).int().to(DEVICE)
    do = torch.randn(B, H, Lq, D, device=DEVICE)
    got = _run(cross_attention, q, k, v, idx, do, scale=0.3)
    want = _run(cross_attention_reference, q, k, v, idx, do, scale=0.3)
    for a, b in zip(got, want):
        assert _rel(a, b) <= TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("S", [None, 6])
def test_lse_and_its_gradient(S):
    """The op's second output is logsumexp(q k^T * scale); its gradient flows too."""
    _, q, k, v, idx = _inputs(1, 2, 9, 21, 32, S, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.crossmae.cross_attention(q, k, v, idx, 0.2)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    got = (lse, *torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v)))
    if idx is None:
        kk, vv = k, v
    else:
        kk, vv = (t.gather(2, idx[:, None, :, None].expand(-1, 2, -1, 32)) for t in (k, v))
    ref_lse = (q @ kk.mT * 0.2).logsumexp(-1)
    ref_out = F.scaled_dot_product_attention(q, kk, vv, scale=0.2)
    want = (ref_lse, *torch.autograd.grad((ref_out * w_out).sum() + (ref_lse * w_lse).sum(), (q, k, v)))
    for a, b in zip(got, want):
        assert _rel(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("S", [None, 7])
def test_math_fallback_matches_reference(monkeypatch, S):
    """CPU without the interpreter: `cross_attention` is the reference itself; the registered op (which
    also returns the lse) takes its math path, with the reference's semantics."""
    monkeypatch.setattr(ca, "use_triton", lambda *t: False)
    _, q, k, v, idx = _inputs(2, 2, 11, 17, 16, S, torch.float32, "cpu")
    do = torch.randn(2, 2, 11, 16)
    want = _run(cross_attention_reference, q, k, v, idx, do)
    for a, b in zip(_run(cross_attention, q, k, v, idx, do), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    op = lambda q, k, v, idx: torch.ops.crossmae.cross_attention(q, k, v, idx, 16**-0.5)[0]  # noqa: E731
    for a, b in zip(_run(op, q, k, v, idx, do), want):
        assert _rel(a, b) <= TOL[torch.float32]


@needs_triton
def test_autograd_function_matches_op():
    _, q, k, v, idx = _inputs(1, 2, 13, 20, 32, 6, torch.float32)
    do = torch.randn(1, 2, 13, 32, device=DEVICE)
    fn = lambda q, k, v, idx: ca.CrossAttentionFunction.apply(q, k, v, idx, 32**-0.5)[0]  # noqa: E731
    for a, b in zip(_run(fn, q, k, v, idx, do), _run(cross_attention, q, k, v, idx, do)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("S", [None, 5])
def test_opcheck(S):
    _, q, k, v, idx = _inputs(1, 2, 7, 13, 32, S, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.crossmae.cross_attention.default, (q, k, v, idx, 0.25))


@needs_triton
def test_torch_compile_fullgraph():
    _, q, k, v, idx = _inputs(2, 2, 9, 15, 32, 6, torch.float32)

    def step(q, k, v, idx):
        return (cross_attention(q, k, v, idx) ** 2).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        loss = fn(qq, kk, vv, idx)
        results.append((loss, *torch.autograd.grad(loss, (qq, kk, vv))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("args, match", [
    (((2, 2, 5, 32), (2, 2, 7, 16), (2, 2, 7, 16)), "k and v"),
    (((2, 2, 5, 256), (2, 2, 7, 256), (2, 2, 7, 256)), "head dim"),
    (((2, 5, 32), (2, 7, 32), (2, 7, 32)), r"\[B, H, L, D\]"),
    (((2, 2, 5, 32), (2, 2, 0, 32), (2, 2, 0, 32)), "no rows"),
])
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        cross_attention(*(torch.randn(s) for s in args))


def test_bad_index_raises():
    q, k = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 5, 16)
    with pytest.raises(ValueError, match="kv_index"):
        cross_attention(q, k, k, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_index"):
        cross_attention(q, k, k, torch.zeros(2, 2))


# --- CUDA only --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,Lq,Lk,S,D", [(4, 12, 512, 196, None, 64), (4, 12, 196, 128, 32, 64),
                                            (3, 8, 1100, 1031, None, 128), (2, 16, 147, 49, 12, 64)])
def test_cuda_large(B, H, Lq, Lk, S, D, dtype):
    _compare(B, H, Lq, Lk, D, S, dtype, device="cuda", tol=TOL[dtype] * 2)


@needs_cuda
@pytest.mark.parametrize("B,H,Lq,Lk,S,D", [(4, 12, 512, 196, None, 64), (4, 12, 196, 128, 32, 64),
                                            (2, 4, 129, 197, 33, 128), (2, 4, 77, 300, None, 32)])
def test_cuda_bf16_within_sdpa_error(B, H, Lq, Lk, S, D):
    """bf16 error vs the fp32 reference stays within twice SDPA's own bf16 error (plus a small floor)."""
    seed, q, k, v, idx = _inputs(B, H, Lq, Lk, D, S, torch.bfloat16, "cuda")
    do = torch.randn(B, H, Lq, D, device="cuda")
    got = _run(cross_attention, q, k, v, idx, do)
    sdpa = _run(cross_attention_reference, q, k, v, idx, do)
    want = _run(cross_attention_reference, q.float(), k.float(), v.float(), idx, do)
    for name, a, s, w in zip(("out", "dq", "dk", "dv"), got, sdpa, want):
        err, bound = _rel(a, w), 2 * _rel(s, w) + 1e-3
        assert err <= bound, f"{name}: rel err {err:.2e} > {bound:.2e} (seed {seed})"


@needs_cuda
@pytest.mark.parametrize("S", [None, 32])
def test_cuda_graph_replay_equals_eager(S):
    B, H, Lq, Lk, D = 2, 4, 196, 128, 64
    _, q, k, v, idx = _inputs(B, H, Lq, Lk, D, S, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)

    def step():
        out = cross_attention(q, k, v, idx)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # autotune and compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        for t in (q, k, v, do):
            t.copy_(torch.randn_like(t))
        if idx is not None:
            idx.copy_(torch.stack([torch.randperm(Lk, device="cuda")[:S] for _ in range(B)]))
    graph.replay()
    for a, b in zip(static, step()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
