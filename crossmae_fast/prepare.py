"""`python -m crossmae_fast.prepare`: real videos to audio files, JPEG frames and a manifest.

    python -m crossmae_fast.prepare SRC --out DIR [--frames 10] [--processes N] [--format wav|flac]
        [--image-size 224] [--sample-rate 16000] [--shards [CLIPS_PER_SHARD]]

With `--shards`, the clips are then also written as webdataset shards, `DIR/shards/shards.json`
(`crossmae_fast.shard`).

What it writes, and how failures are recorded, is described in `crossmae_fast.data.extract`.
"""

from __future__ import annotations

import argparse
import os
import sys

from crossmae_fast.config import NUM_FRAMES, SAMPLE_RATE
from crossmae_fast.data.extract import prepare
from crossmae_fast.data.shard_writer import write_shards
from crossmae_fast.files import error_line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crossmae_fast.prepare",
                                 description="Turn a folder (or CSV) of videos into audio files, JPEG frames "
                                             "and a CAV-MAE manifest.")
    ap.add_argument("src", help="folder of videos (searched recursively) or CSV of paths [, labels]")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--frames", type=int, default=NUM_FRAMES, help=f"frames per clip (default {NUM_FRAMES})")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                    help="extraction processes; 0 or 1 runs in this process (default: CPU count)")
    ap.add_argument("--format", choices=("wav", "flac"), default="wav", help="audio file format")
    ap.add_argument("--image-size", type=int, default=224, help="frame size after resize and crop")
    ap.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help=f"audio sample rate (default {SAMPLE_RATE})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--shards", type=int, nargs="?", const=1000, metavar="CLIPS_PER_SHARD",
                    help="also write the clips as tar shards under DIR/shards/ (default 1000 clips per shard)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        summary = prepare(a.src, a.out, frames=a.frames, processes=a.processes, audio_format=a.format,
                          image_size=a.image_size, sample_rate=a.sample_rate, progress=not a.quiet)
    except (FileNotFoundError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written (permissions, read-only, a full disk)
        print(f"prepare: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(summary)
    if a.shards is not None and summary.done + summary.already:
        try:
            print(write_shards(summary.manifest, os.path.join(a.out, "shards"), clips_per_shard=a.shards,
                               processes=a.processes, name="clips", frames=a.frames,
                               progress=not a.quiet))
        except ValueError as e:
            print(f"prepare: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # DIR/shards cannot be written
            print(f"prepare: error: {error_line(e)}", file=sys.stderr)
            return 2
    return 0 if summary.done + summary.already else 1


if __name__ == "__main__":
    sys.exit(main())
