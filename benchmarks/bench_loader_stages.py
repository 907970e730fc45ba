"""CPU cost per clip of the loader stages that stay on the CPU when DALI runs on a GPU.

    pytest benchmarks/bench_loader_stages.py --benchmark-only

With a CUDA device the DALI pipeline decodes JPEGs through nvJPEG (`mixed`) and computes the log-mel,
resize and normalisation on the GPU; what the host still does per clip is reading the bytes (Python,
from files or by offset from shards) and decoding the audio (`decoders.audio` has no GPU backend).
These are timed here, one DALI thread, batch 32, on 10 s 16 kHz clips (WAV and FLAC) and 224 px
JPEG frames of the synthetic set; a full CPU JPEG decode is timed as the ceiling of the host's share
of nvJPEG's hybrid decode. `extra_info` holds milliseconds per clip; docs/design.md turns them into
CPU cores per GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from crossmae_fast.config import SAMPLE_RATE

BATCH = 32
WORST_CASE_S = {None: 60}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    for module in ("av", "soundfile", "webdataset"):
        pytest.importorskip(module)
    from crossmae_fast.data.manifest import frame_path, read_manifest
    from crossmae_fast.data.shard_writer import write_shards
    from crossmae_fast.data.synthetic import make_synthetic_set

    root = tmp_path_factory.mktemp("stages")
    manifest = make_synthetic_set(root, 8, seed=0, seconds=10.0, image_size=224, eval_fraction=0.0)["train"]
    rows = read_manifest(manifest)
    sf = pytest.importorskip("soundfile")
    wav = [open(r["wav"], "rb").read() for r in rows]
    flac = []
    for data in wav:
        samples, rate = sf.read(io.BytesIO(data), dtype="int16")
        buf = io.BytesIO()
        sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
        flac.append(buf.getvalue())
    jpeg = [open(frame_path(r, 5), "rb").read() for r in rows]
    shards = write_shards(manifest, root / "shards", clips_per_shard=4, processes=1, progress=False).manifest
    return {"wav": wav, "flac": flac, "jpeg": jpeg, "shards": shards, "manifest": manifest}


def _dali_rate(benchmark, samples: list[bytes], decode) -> float:
    from nvidia.dali import fn, pipeline_def, types

    batch = [np.frombuffer(samples[i % len(samples)], np.uint8) for i in range(BATCH)]

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        return decode(fn.external_source(source=lambda: batch, batch=True, dtype=types.UINT8), fn, types)

    p = pipe()
    p.build()
    p.run()
    benchmark.pedantic(p.run, rounds=5, warmup_rounds=1, iterations=1)
    return benchmark.stats.stats.mean / BATCH * 1e3


def _audio(data, fn, types):
    return fn.decoders.audio(data, downmix=True, sample_rate=SAMPLE_RATE, dtype=types.FLOAT)[0]


def _jpeg(data, fn, types):
    return fn.decoders.image(data, device="cpu", output_type=types.RGB)


@pytest.mark.parametrize("stage", ["audio-wav", "audio-flac", "jpeg-cpu-decode"])
def test_dali_stage(benchmark, clips, stage):
    pytest.importorskip("nvidia.dali")
    samples, decode = {"audio-wav": (clips["wav"], _audio), "audio-flac": (clips["flac"], _audio),
                       "jpeg-cpu-decode": (clips["jpeg"], _jpeg)}[stage]
    ms = _dali_rate(benchmark, samples, decode)
    benchmark.extra_info.update(stage=stage, threads=1, ms_per_clip=round(ms, 3),
                                bytes_per_clip=int(np.mean([len(s) for s in samples])))
    print(f"\n{stage}: {ms:.3f} ms per clip on one thread")


@pytest.mark.parametrize("storage", ["files", "shards"])
def test_read_bytes(benchmark, clips, storage):
    """Python's share: the audio and one frame of a clip, as the DALI loader's feed reads them."""
    from crossmae_fast.config import DataConfig
    from crossmae_fast.data.clips import ClipSet
    from crossmae_fast.data.dali_loader import AUDIO_MAGIC, IMAGE_MAGIC, read_bytes

    pytest.importorskip("nvidia.dali")
    clipset = ClipSet(clips[storage if storage == "shards" else "manifest"], DataConfig())

    def read_all():
        for row in range(len(clipset)):
            read_bytes(clipset.audio_file(row), AUDIO_MAGIC)
            read_bytes(clipset.frame_file(row, 5), IMAGE_MAGIC)

    benchmark.pedantic(read_all, rounds=20, warmup_rounds=2, iterations=1)
    ms = benchmark.stats.stats.mean / len(clipset) * 1e3
    benchmark.extra_info.update(stage=f"read-{storage}", ms_per_clip=round(ms, 3))
    print(f"\nread {storage}: {ms:.3f} ms per clip (page cache)")
