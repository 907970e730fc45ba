"""`python -m crossmae_fast.synth`: writes the synthetic audio-visual set.

    python -m crossmae_fast.synth --out DIR --clips N --seed S [--video] [--seconds 3]
        [--image-size 224] [--eval-fraction 0.25] [--threads N] [--shards [CLIPS_PER_SHARD]]

With `--shards`, each split is also written as webdataset shards: `DIR/shards/train/shards.json` and
`DIR/shards/eval/shards.json` (`crossmae_fast.shard`).

The generator and its rule are `crossmae_fast.data.synthetic`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from crossmae_fast.config import SYNTH_SECONDS
from crossmae_fast.data.shard_writer import write_shards
from crossmae_fast.data.synthetic import make_synthetic_set
from crossmae_fast.files import error_line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.synth",
                                 description="Write the synthetic audio-visual set (see docs/design.md).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--clips", type=int, required=True, help="number of clips")
    ap.add_argument("--seed", type=int, required=True, help="random seed (same seed, same bytes)")
    ap.add_argument("--video", action="store_true", help="also write a VP9 webm per clip")
    ap.add_argument("--seconds", type=float, default=SYNTH_SECONDS,
                    help=f"audio (and video) length (default {SYNTH_SECONDS:g}, as pre-training's synthetic set)")
    ap.add_argument("--image-size", type=int, default=224, help="frame side in pixels (default 224)")
    ap.add_argument("--eval-fraction", type=float, default=0.25, help="share of clips in eval.json")
    ap.add_argument("--threads", type=int, default=0,
                    help="writer threads (0: up to twice the CPU count, at most 8); the bytes do not depend on it")
    ap.add_argument("--shards", type=int, nargs="?", const=1000, metavar="CLIPS_PER_SHARD",
                    help="also write each split as tar shards under DIR/shards/ (default 1000 clips per shard)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = make_synthetic_set(a.out, a.clips, a.seed, a.video, a.seconds, a.image_size, a.eval_fraction,
                                   threads=a.threads)
        counts = {k: len(json.loads(p.read_text())["data"]) for k, p in paths.items()}
        for split in [k for k in paths if counts[k]] if a.shards is not None else ():
            print(write_shards(paths[split], Path(a.out) / "shards" / split, clips_per_shard=a.shards,
                               processes=a.threads, name=split, progress=False))
    except ValueError as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written (permissions, read-only, a full disk)
        print(f"synth: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(f"synth: {a.clips} clips ({counts['train']} train, {counts['eval']} eval) in "
          f"{time.perf_counter() - t0:.1f} s\nmanifests: {paths['train']}, {paths['eval']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
