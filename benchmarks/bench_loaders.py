"""Loader throughput: DALI (CPU) against the torch reference loader at the same thread count, each
reading the clips' files or the same clips in webdataset shards (`crossmae_fast.shard`).

    pytest benchmarks/bench_loaders.py --benchmark-only

One training epoch over a synthetic set (docs/design.md section 6: 10 s 16 kHz WAV, 224 px JPEG frames) with
the base preset's inputs (1024 x 128 log-mel, 224 x 224 image), batch 8, two workers: two DataLoader
worker processes for torch, two DALI threads (plus the main thread reading file bytes) for DALI.
An epoch includes starting the torch workers, as a training run without persistent workers pays it.
`extra_info` records the device, the storage, clips/s, for DALI the ratio to the torch loader on
the same storage, and for shards the ratio to the files on the same loader. The shards (4 of 8 clips)
are read through the page cache like the files: this measures the loaders' own cost of the layout,
not a cold parallel file system. The GPU pipeline runs only where CUDA and DALI are both available.
"""

from __future__ import annotations

import pytest
import torch

from crossmae_fast.config import data_config, model_config
from crossmae_fast.data import make_loader
from crossmae_fast.data.synthetic import make_synthetic_set

CLIPS, THREADS, BATCH = 32, 2, 8
WORST_CASE_S = {None: 90}  # writing the set (and its shards) once, then 4 epochs of 32 clips
SHARD_CLIPS = 8
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    for module in ("av", "soundfile"):  # absent from the bare GPU image
        pytest.importorskip(module, reason="the synthetic set is written, and read back, with PyAV and soundfile")
    out = tmp_path_factory.mktemp("synth")
    paths = make_synthetic_set(out, clips=CLIPS, seed=0, seconds=10.0, image_size=224, eval_fraction=0.0)
    return paths["train"]


@pytest.fixture(scope="module")
def sources(manifest, tmp_path_factory):
    """{"files": the manifest, "shards": shards.json of the same clips} (shards written on first use)."""
    def shards():
        pytest.importorskip("webdataset")
        from crossmae_fast.data.shard_writer import write_shards

        out = tmp_path_factory.mktemp("shards")
        return write_shards(manifest, out, clips_per_shard=SHARD_CLIPS, processes=THREADS, progress=False).manifest

    cache = {"files": manifest}
    return lambda storage: cache[storage] if storage in cache else cache.setdefault(storage, shards())


@pytest.mark.parametrize("storage", ["files", "shards"])
@pytest.mark.parametrize("backend, device", [("torch", "cpu"), ("dali", "cpu"), ("dali", "cuda")])
def test_loader_throughput(benchmark, sources, backend, device, storage):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the GPU pipeline needs CUDA")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    loader = make_loader(sources(storage), backend=backend, batch_size=BATCH, train=True,
                         data_config=data_config(model_config("base"), workers=THREADS), device=device)

    def epoch() -> int:
        loader.set_epoch(loader.epoch + 1)
        n = sum(len(b["index"]) for b in loader)
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    clips = benchmark.pedantic(epoch, rounds=3, warmup_rounds=1, iterations=1)
    assert clips == CLIPS // BATCH * BATCH and loader.stats.replaced == 0
    rate = clips / benchmark.stats.stats.mean
    RESULTS[f"{backend}-{device}-{storage}"] = rate
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.extra_info.update(device=name, storage=storage, threads=THREADS, clips_per_s=round(rate, 1))
    if f"torch-cpu-{storage}" in RESULTS and backend == "dali":
        benchmark.extra_info["ratio_to_torch_loader"] = round(rate / RESULTS[f"torch-cpu-{storage}"], 2)
    if storage == "shards" and f"{backend}-{device}-files" in RESULTS:
        benchmark.extra_info["ratio_to_files"] = round(rate / RESULTS[f"{backend}-{device}-files"], 2)
    print(f"\n{backend} on {name}, {storage}: {rate:.1f} clips/s {benchmark.extra_info}")
