"""Startup cost of a shard folder: parsing `shards.json` and loading every shard's DALI index.

    pytest benchmarks/bench_shard_index.py --benchmark-only

A 20,000-clip set in 20 shards of 1,000 (AudioSet-2M is 100 times that, in 2,000 shards). Writing
20,000 real synthetic clips would cost more than the measurement, so the set reuses the files of 200
tiny synthetic clips (0.1 s, 16 px frames) for 20,000 rows shaped like AudioSet's (id, paths, three
labels, no boxes); the shards are written by `write_shards` as any set (every member decoded). What a
loader pays at start, `open_rows`, depends on the rows and members (12 per clip), not on the members'
sizes. The same rows as a plain manifest are timed too (what the file layout pays). `extra_info` holds
seconds, microseconds per clip and the linear extrapolation to 2 million clips.
"""

from __future__ import annotations

import json

import pytest

from crossmae_fast.config import NUM_FRAMES
from crossmae_fast.data.shards import open_rows

CLIPS, DISTINCT, PER_SHARD, AUDIOSET = 20_000, 200, 1_000, 2_000_000
WORST_CASE_S = {None: 240}  # writing the set (decoding 20k clips on 2 cores) dominates
LABELS = "/m/09x0r,/m/05zppz,/m/0ytgt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    for module in ("av", "soundfile", "webdataset"):
        pytest.importorskip(module)
    from crossmae_fast.data.manifest import write_manifest
    from crossmae_fast.data.shard_writer import write_shards
    from crossmae_fast.data.synthetic import make_synthetic_set

    root = tmp_path_factory.mktemp("index")
    small = make_synthetic_set(root, DISTINCT, seed=0, seconds=0.1, image_size=16, eval_fraction=0.0)["train"]
    base = json.loads(small.read_text())["data"]
    # each file pair serves 100 rows (the shard keys are made unique with the row number)
    # AudioSet rows: no boxes or objects
    rows = [{k: base[j % DISTINCT][k] for k in ("video_id", "wav", "video_path")} | {"labels": LABELS}
            for j in range(CLIPS)]
    manifest = write_manifest(root / "big.json", rows)
    shards = write_shards(manifest, root / "shards", clips_per_shard=PER_SHARD, processes=2, progress=False)
    assert shards.clips == CLIPS and shards.shards == CLIPS // PER_SHARD
    return {"files": manifest, "shards": shards.manifest}


@pytest.mark.parametrize("storage", ["files", "shards"])
def test_startup(benchmark, folders, storage):
    rows, store = benchmark.pedantic(open_rows, args=(folders[storage], NUM_FRAMES), rounds=3, iterations=1)
    assert len(rows) == CLIPS and (store is None) == (storage == "files")
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(storage=storage, clips=CLIPS, seconds=round(mean, 3),
                                us_per_clip=round(mean / CLIPS * 1e6, 1),
                                audioset_2m_s_extrapolated=round(mean * AUDIOSET / CLIPS, 1))
    print(f"\n{storage}: {CLIPS} clips opened in {mean:.3f} s ({mean / CLIPS * 1e6:.1f} us/clip; "
          f"2M clips: ~{mean * AUDIOSET / CLIPS:.0f} s)")
