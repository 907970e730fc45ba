"""The whole CrossMAE train step (forward, backward, AdamW) through `crossmae_fast.train.TrainStep`.

    pytest benchmarks/bench_train_step.py --benchmark-only

CUDA: ViT-B (`base`), batch 256 (halved until the eager reference fits), bf16 autocast:
`reference` (pure-torch ops, eager: the baseline), `compile` (`torch.compile` of it), `fused`
(Triton ops, eager) and `ours` (Triton ops, the step captured in one CUDA graph). CPU: a shallow
`tiny` model (encoders 2 deep, decoders 1), batch 4, fp32, `reference` and `compile` only.
samples/s, TFLOP/s and MFU use `flops.train_step_flops` and the matmul peak measured in this run.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import common, flops
from crossmae_fast import CrossMAE, model_config
from crossmae_fast.config import PAPER_BLR, TrainConfig
from crossmae_fast.train.step import TrainStep, make_optimizer

IMPLS = {  # impl -> (ops, torch.compile, CUDA graph); conftest.py runs `compile` after every other benchmark
    "reference": ("reference", False, False),
    "fused": ("auto", False, False),
    "ours": ("auto", False, True),
    "compile": ("reference", True, False),
}
WORST_CASE_S = {"reference": 45, "fused": 90, "ours": 60, "compile": 180}
"""Seconds each may take on a GPU, cold (autotuning, capture, Inductor's compile of fwd + bwd of ViT-B);
the session's budget guard (conftest.py) starts one only when this much is left."""
_BATCH: dict[str, int] = {}  # the batch the baseline fitted, shared by the group


def _config(device: torch.device, ops: str):
    if device.type == "cuda":
        return model_config("base", ops=ops)
    return model_config("tiny", ops=ops, depth=2, decoder_depth=1, emb_decoder_depth=1)


def _step(cfg, batch: int, device: torch.device, compiled: bool, graph: bool):
    """A TrainStep and its call on one fixed random batch."""
    torch.manual_seed(0)
    model = CrossMAE(cfg).to(device)
    opt = make_optimizer(model, TrainConfig(), PAPER_BLR * batch / 256, device)
    net = torch.compile(model) if compiled else model
    step = TrainStep(net, opt, cfg.terms, device, "bf16" if device.type == "cuda" else "fp32",
                     cuda_graph=graph, warmup=3)
    audio = torch.randn(batch, cfg.audio_frames, cfg.audio_bins, device=device)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    return step, lambda: step(audio, image)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, results, device, peak_tflops, impl):
    ops, compiled, graph = IMPLS[impl]
    if impl in ("fused", "ours"):
        common.skip_unless_cuda(device, f"`{impl}` (Triton ops{', CUDA graph' if graph else ''})")
    cfg = _config(device, ops)
    batch = int(os.environ.get("CROSSMAE_BENCH_BATCH", 256 if device.type == "cuda" else 4))
    if impl != "reference":
        batch = _BATCH.get("train_step", batch)
    benchmark.group = "train_step"
    common.release()
    while True:
        step = call = None
        try:
            step, call = _step(cfg, batch, device, compiled, graph)
            # 4 warm-up calls: TrainStep runs 3 eager steps, then captures the graph
            timing = common.measure(benchmark, call, device, warmup=4, round_s=0.0, rounds_s=3.0, max_rounds=10)
            break
        except torch.cuda.OutOfMemoryError:
            pass  # released below, once the exception (and the activations its frames hold) is gone
        step = call = None
        common.release()
        if impl != "reference" or batch == 1:
            pytest.skip(f"{impl} runs out of memory at batch {batch}")
        batch //= 2
    if impl == "reference":
        _BATCH["train_step"] = batch
    common.record(benchmark, results, timing, device=device, group="train_step", impl=impl, baseline="reference",
                  per_call=batch, unit="samples", flops=flops.train_step_flops(cfg) * batch,
                  peak_tflops=peak_tflops, batch=batch, preset=cfg.preset, variant=cfg.variant,
                  precision="bf16" if device.type == "cuda" else "fp32", step_mode=step.mode)
    mode = step.mode
    del step, call
    common.release()
    if graph and mode != "cuda-graph":
        pytest.fail("the CUDA-graph capture failed and the step ran eagerly (recorded as such; see the log)")
