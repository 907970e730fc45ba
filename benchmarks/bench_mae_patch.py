"""One MAE training step with facebookresearch/mae's methods against the same model after
`kernels.patch_mae(model)`.

    pytest benchmarks/bench_mae_patch.py --benchmark-only

CUDA: MAE ViT-B/16 (`benchmarks/mae_vit.py`, norm-pix loss, mask ratio 0.75), batch 256, bf16 autocast,
forward + backward + AdamW. `mae` (MAE's methods, eager: the baseline), `patched` (eager),
`mae-compile` (`torch.compile` of the model), `patched-compile`; each patched step is compared with
the unpatched one of its mode, and `step_share_saved` is the share of that step's time the fused ops
saved (1 - patched / unpatched). CPU: the `tiny` MAE, batch 4, fp32, eager only (the patched step runs
the reference ops, or the Triton interpreter under TRITON_INTERPRET=1: a call-path check either way).
"""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from benchmarks import common
from benchmarks.mae_vit import PRESETS, MAEViT
from kernels.utils import interpret_mode

IMPLS = {  # impl -> (patched, torch.compile, the unpatched impl it is compared with)
    "mae": (False, False, "mae"),
    "patched": (True, False, "mae"),
    "mae-compile": (False, True, "mae-compile"),
    "patched-compile": (True, True, "mae-compile"),
}
MASK_RATIO = 0.75
WORST_CASE_S = {"mae": 45, "patched": 60, "mae-compile": 120, "patched-compile": 120}
"""Seconds each may take on a GPU, cold; the session's budget guard (conftest.py) starts one only when
this much is left (the compiled ones run after every other benchmark)."""


def _step(preset: str, batch: int, device: torch.device, patched: bool, compiled: bool):
    """One training step of a fresh MAE on a fixed random image batch, as a callable."""
    torch.manual_seed(0)
    model = MAEViT(PRESETS[preset]).to(device)
    if patched:
        kernels.patch_mae(model)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=cuda)
    net = torch.compile(model) if compiled else model
    imgs = torch.randn(batch, 3, *PRESETS[preset].img_size, device=device)

    def call() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = net(imgs, MASK_RATIO)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return call


@pytest.mark.parametrize("impl", list(IMPLS))
def test_mae_step(benchmark, results, device, impl):
    patched, compiled, baseline = IMPLS[impl]
    cuda = device.type == "cuda"
    if compiled:
        common.skip_unless_cuda(device, "torch.compile of the MAE step (CPU compile time would dominate)")
    preset = "vit_b16" if cuda else "tiny"
    batch = int(os.environ.get("CROSSMAE_BENCH_BATCH", 256 if cuda else 4))
    benchmark.group = "mae_step"
    extra = {}
    if patched and not cuda:
        path = "Triton interpreter" if interpret_mode() else "reference ops"
        extra["note"] = f"{path}: call path checked, timing means nothing"
    common.release()
    call = None
    try:
        call = _step(preset, batch, device, patched, compiled)
        timing = common.measure(benchmark, call, device, warmup=3, round_s=0.0, rounds_s=3.0, max_rounds=10)
    except torch.cuda.OutOfMemoryError:
        call = None
        common.release()
        pytest.skip(f"{impl} runs out of memory at batch {batch}")
    base = results.get("mae_step", {}).get(baseline, {}).get("mean_s")
    if patched and base and timing.mean_s:
        extra["step_share_saved"] = 1 - timing.mean_s / base
    cfg = PRESETS[preset]
    common.record(benchmark, results, timing, device=device, group="mae_step", impl=impl, baseline=baseline,
                  per_call=batch, unit="samples", batch=batch, preset=f"MAE {preset}", mask_ratio=MASK_RATIO,
                  precision="bf16" if cuda else "fp32", compiled=compiled, patched=patched,
                  shape=f"B={batch} img={cfg.img_size[0]}x{cfg.img_size[1]} p={cfg.patch_size} "
                        f"D={cfg.embed_dim}x{cfg.depth} dec={cfg.decoder_embed_dim}x{cfg.decoder_depth}", **extra)
    del call
    common.release()
