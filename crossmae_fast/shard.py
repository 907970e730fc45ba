"""`python -m crossmae_fast.shard`: a manifest's clips to webdataset tar shards with DALI indexes.

    python -m crossmae_fast.shard MANIFEST --out DIR [--clips-per-shard 1000] [--workers N] [--seed 0]
        [--name NAME] [--labels CSV]

`DIR/shards.json` is then accepted wherever a manifest is (`--data`, `--eval-data`, `make_loader`).
The layout is described in `crossmae_fast.data.shards`, the writing in `crossmae_fast.data.shard_writer`.
"""

from __future__ import annotations

import argparse
import os
import sys

from crossmae_fast.data.manifest import ManifestError
from crossmae_fast.data.shard_writer import LABEL_CSV, write_shards


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.shard",
                                 description="Write a manifest's clips into webdataset tar shards.")
    ap.add_argument("manifest", help="CAV-MAE manifest (as written by prepare or synth)")
    ap.add_argument("--out", required=True, help="output folder (shards, indexes, shards.json)")
    ap.add_argument("--clips-per-shard", type=int, default=1000, help="clips per tar (default 1000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes that read and check clips (default: CPU count)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle (default 0)")
    ap.add_argument("--name", help="shard file prefix (default: the manifest's name)")
    ap.add_argument("--labels", help=f"label CSV to keep beside the shards (default: the manifest's {LABEL_CSV})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap




def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        summary = write_shards(a.manifest, a.out, clips_per_shard=a.clips_per_shard, workers=a.workers,
                               seed=a.seed, name=a.name, labels=a.labels, progress=not a.quiet)
    except (FileNotFoundError, ManifestError, ValueError) as e:
        print(f"shard: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.clips else 1


if __name__ == "__main__":
    sys.exit(main())
