"""The four fused ops against their baselines, at the model's own shapes.

    pytest benchmarks/bench_ops.py --benchmark-only

CUDA: the `base` preset (ViT-B), batch 256, bf16; every op forward + backward except CLS top-k
(its indices carry no gradient). Each group runs its baseline first: the eager reference (for CLS
top-k, EViT's materialized attention + `torch.topk`), then the SDPA backends and xformers on
explicitly gathered K/V (cross-attention), and ours (the Triton op); `torch.compile` of the reference
runs after all other benchmarks (conftest.py), its cold compiles being the longest.
CPU: the `tiny` preset, batch 8, fp32, the eager references only (Triton runs in the interpreter
there, and compiling each op would dominate a short CPU run).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import kernels
from benchmarks import common, flops
from crossmae_fast.config import ModelConfig, model_config
from kernels import reference

WORST_CASE_S = {None: 20, "ours": 60, "compile": 45}
"""Seconds each may take on a GPU, cold (Triton autotuning for `ours`, Inductor for `compile`); the
session's budget guard (conftest.py) starts one only when this much is left."""


def _setup(device: torch.device) -> tuple[ModelConfig, int, torch.dtype]:
    cuda = device.type == "cuda"
    batch = int(os.environ.get("CROSSMAE_BENCH_BATCH", 256 if cuda else 8))
    return model_config("base" if cuda else "tiny"), batch, torch.bfloat16 if cuda else torch.float32


def _pick(impl: str, device: torch.device, ref: Callable, ours: Callable) -> Callable:
    """The callable for `impl` in {reference, compile, ours}; skips what this device cannot time."""
    if impl == "reference":
        return ref
    if impl == "compile":
        common.skip_unless_cuda(device, "torch.compile of the ops (CPU compile time would dominate)")
        return torch.compile(ref, dynamic=False)
    common.skip_triton_on_cpu(device)
    return ours


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> Callable:
    def call() -> None:
        torch.autograd.grad(fn(), inputs, grad)

    return call


def _time(benchmark, results, device, group: str, impl: str, call: Callable, baseline: str, **kw) -> dict:
    benchmark.group = group
    if impl == "ours" and device.type != "cuda":
        kw["note"] = "Triton interpreter: call path checked, timing means nothing"
    timing = common.measure(benchmark, call, device)
    return common.record(benchmark, results, timing, device=device, group=group, impl=impl, baseline=baseline,
                         per_call=1, unit="calls", **kw)


@pytest.mark.parametrize("impl", ["reference", "compile", "ours"])
def test_masking(benchmark, results, device, copy_gbps, impl):
    """Random masking of the audio patches (+ position embeddings), forward + backward."""
    cfg, B, dtype = _setup(device)
    L, D = cfg.num_audio_patches, cfg.embed_dim
    keep = cfg.num_visible(L)
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    noise = torch.rand(B, L, device=device)
    grad = torch.randn(B, keep, D, device=device, dtype=dtype)
    op = _pick(impl, device, reference.random_masking_reference, kernels.random_masking)
    call = _fwd_bwd(lambda: op(x, cfg.mask_ratio, pos, noise)[0], (x,), grad)
    _time(benchmark, results, device, "masking", impl, call, "reference", copy_gbps=copy_gbps,
          nbytes=flops.masking_bytes(B, L, keep, D, x.element_size(), backward=True),
          shape=f"B={B} L={L} keep={keep} D={D} {dtype}")


@pytest.mark.parametrize("impl", ["reference", "compile", "ours"])
def test_restore(benchmark, results, device, copy_gbps, impl):
    """Audio decoder token restore (+ position embeddings), forward + backward."""
    cfg, B, dtype = _setup(device)
    L, D = cfg.num_audio_patches, cfg.decoder_dim
    keep = cfg.num_visible(L)
    x = torch.randn(B, keep, D, device=device, dtype=dtype, requires_grad=True)
    mask_token = torch.randn(1, 1, D, device=device, dtype=dtype, requires_grad=True)
    ids_restore = torch.rand(B, L, device=device).argsort(dim=1).argsort(dim=1)
    pos = torch.randn(1, L, D, device=device, dtype=dtype)
    grad = torch.randn(B, L, D, device=device, dtype=dtype)
    op = _pick(impl, device, reference.restore_tokens_reference, kernels.restore_tokens)
    call = _fwd_bwd(lambda: op(x, mask_token, ids_restore, pos), (x, mask_token), grad)
    _time(benchmark, results, device, "restore", impl, call, "reference", copy_gbps=copy_gbps,
          nbytes=flops.restore_bytes(B, L, keep, D, x.element_size(), backward=True),
          shape=f"B={B} L={L} keep={keep} D={D} {dtype}")


def _materialized_topk(q: torch.Tensor, k: torch.Tensor, topk: int) -> torch.Tensor:
    """EViT: the full attention matrix (softmax in fp32, as autocast does), its CLS row, mean over heads."""
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1, dtype=torch.float32)
    return attn[:, :, 0, 1:].mean(dim=1).topk(topk, dim=-1).indices


@pytest.mark.parametrize("impl", ["materialized", "reference", "compile", "ours"])
def test_cls_topk(benchmark, results, device, copy_gbps, impl):
    """Attentive Tokens of the audio encoder's last block (CLS + visible keys), forward."""
    cfg, B, dtype = _setup(device)
    H, hd = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    N = cfg.num_visible(cfg.num_audio_patches)
    topk = cfg.num_attentive(cfg.num_audio_patches)
    q, k, _ = torch.randn(B, 1 + N, 3, H, hd, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    if impl == "materialized":
        fn = lambda: _materialized_topk(q, k, topk)  # noqa: E731
    else:
        op = _pick(impl, device, reference.cls_attention_topk_reference, kernels.cls_attention_topk)
        fn = lambda: op(q[:, :, 0], k, topk)  # noqa: E731

    def call() -> None:
        with torch.no_grad():
            fn()

    _time(benchmark, results, device, "cls_topk", impl, call, "materialized", copy_gbps=copy_gbps,
          flops=flops.cls_topk_flops(B, H, 1 + N, hd), nbytes=flops.cls_topk_bytes(B, H, N, hd, q.element_size()),
          shape=f"B={B} H={H} N={N} D={hd} topk={topk} {dtype}")


ATTENTION_IMPLS = ["reference", "compile", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers", "ours"]


def _attention(impl: str, device: torch.device, kv_index: torch.Tensor | None) -> Callable:
    """(q, k, v) -> out for `impl`; the baselines gather K/V explicitly first."""
    backends = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION"}
    if impl in backends:
        common.skip_unless_cuda(device, "the SDPA flash / efficient / cuDNN backends")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backends[impl], None)
        if backend is None:
            pytest.skip(f"this torch has no {backends[impl]} backend")

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return reference.cross_attention_reference(q, k, v, kv_index)

        return sdpa
    if impl == "xformers":
        common.skip_unless_cuda(device, "xformers")
        xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")

        def xformers(q, k, v):
            if kv_index is not None:
                idx = kv_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
                k, v = k.gather(2, idx), v.gather(2, idx)
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        return xformers
    ref = lambda q, k, v: reference.cross_attention_reference(q, k, v, kv_index)  # noqa: E731
    ours = lambda q, k, v: kernels.cross_attention(q, k, v, kv_index)  # noqa: E731
    return _pick(impl, device, ref, ours)


def _cross_attention(benchmark, results, device, impl: str, indexed: bool) -> None:
    cfg, B, dtype = _setup(device)
    H, hd = cfg.decoder_heads, cfg.decoder_dim // cfg.decoder_heads
    la, lv = cfg.num_audio_patches, cfg.num_image_patches
    if indexed:  # Cross-Conditioned audio decoder: audio CLS + visible -> image Attentive Tokens
        lq, lk, s = 1 + cfg.num_visible(la), cfg.num_visible(lv), cfg.num_attentive(lv)
        kv_index = torch.rand(B, lk, device=device).argsort(dim=1)[:, :s]
    else:  # Cross-Embedding image -> audio: one query per audio patch -> image CLS + visible
        lq, lk, s, kv_index = la, 1 + cfg.num_visible(lv), None, None
    q = torch.randn(B, lq, H, hd, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, lk, 2, H, hd, device=device, dtype=dtype, requires_grad=True)
    k, v = kv.permute(2, 0, 3, 1, 4)
    grad = torch.randn(B, H, lq, hd, device=device, dtype=dtype)
    fn = _attention(impl, device, kv_index)
    call = _fwd_bwd(lambda: fn(q, k, v), (q, kv), grad)
    # a baseline backend may reject these shapes or this dtype: that is a skip, not a failure
    try:
        call()
    except RuntimeError as err:
        if not impl.startswith(("sdpa-", "xformers")):
            raise
        pytest.skip(f"{impl} cannot run B={B} H={H} Lq={lq} Lk={s or lk} D={hd} {dtype}: {str(err)[:200]}")
    group = "cross_attention_index" if indexed else "cross_attention_dense"
    _time(benchmark, results, device, group, impl, call, "reference",
          flops=flops.cross_attention_flops(B, H, lq, s or lk, hd, backward=True),
          shape=f"B={B} H={H} Lq={lq} Lk={lk}" + (f" S={s}" if s else "") + f" D={hd} {dtype}")


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_cross_attention_index(benchmark, results, device, impl):
    """Cross-attention through `kv_index` (the Cross-Conditioned layer), forward + backward."""
    _cross_attention(benchmark, results, device, impl, indexed=True)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_cross_attention_dense(benchmark, results, device, impl):
    """Cross-attention without an index (the Cross-Embedding decoder), forward + backward."""
    _cross_attention(benchmark, results, device, impl, indexed=False)

