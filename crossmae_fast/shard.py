"""`python -m crossmae_fast.shard`: a manifest's clips to webdataset tar shards with DALI indexes.

    python -m crossmae_fast.shard MANIFEST --out DIR [--clips-per-shard 1000] [--processes N] [--seed 0]
        [--name NAME] [--labels CSV]
    python -m crossmae_fast.shard --verify DIR/shards.json   # after a copy: sizes, checksums, indexes

`DIR/shards.json` is then accepted wherever a manifest is (`--data`, `--eval-data`, `make_loader`).
The layout is described in `crossmae_fast.data.shards`, the writing in `crossmae_fast.data.shard_writer`.
"""

from __future__ import annotations

import argparse
import os
import sys

from crossmae_fast.data.manifest import ManifestError
from crossmae_fast.data.shard_writer import LABEL_CSV, verify_shards, write_shards
from crossmae_fast.files import error_line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.shard",
                                 description="Write a manifest's clips into webdataset tar shards.")
    ap.add_argument("manifest", nargs="?", help="CAV-MAE manifest (as written by prepare or synth)")
    ap.add_argument("--out", help="output folder (shards, indexes, shards.json)")
    ap.add_argument("--verify", metavar="SHARDS_JSON", help="check a shard folder instead of writing one")
    ap.add_argument("--clips-per-shard", type=int, default=1000, help="clips per tar (default 1000)")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                    help="processes that read and check clips (default: CPU count; --workers always means loader "
                    "workers, as in prepare)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle (default 0)")
    ap.add_argument("--name", help="shard file prefix (default: the manifest's name)")
    ap.add_argument("--labels", help=f"label CSV to keep beside the shards (default: the manifest's {LABEL_CSV})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if (a.verify is None) == (a.manifest is None) or (a.manifest is not None) != (a.out is not None):
        ap.error("give MANIFEST --out DIR, or --verify SHARDS_JSON")
    try:
        if a.verify:
            return _verify(a.verify)
        summary = write_shards(a.manifest, a.out, clips_per_shard=a.clips_per_shard, processes=a.processes,
                               seed=a.seed, name=a.name, labels=a.labels, progress=not a.quiet)
    except (FileNotFoundError, ManifestError, ValueError) as e:
        print(f"shard: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written (permissions, read-only, a full disk)
        print(f"shard: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.clips else 1


def _verify(path: str) -> int:
    problems = verify_shards(path)
    for p in problems:
        print(f"shard: {p}", file=sys.stderr)
    print(f"shard: {path}: {'sound' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
