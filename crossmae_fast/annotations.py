"""`python -m crossmae_fast.annotations`: Flickr-SoundNet / VGG-SS boxes to a manifest.

    python -m crossmae_fast.annotations {flickr,vggss} ANNOTATIONS --audio-dir A --frame-dir F --out M

The readers are `crossmae_fast.data.box_annotations`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from crossmae_fast.data.box_annotations import flickr_soundnet_rows, keep_available, read_ids, vggss_rows
from crossmae_fast.data.manifest import write_manifest
from crossmae_fast.files import error_line

log = logging.getLogger("crossmae_fast.annotations")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crossmae_fast.annotations",
                                description="Convert Flickr-SoundNet / VGG-SS boxes into a manifest.")
    p.add_argument("format", choices=("flickr", "vggss"))
    p.add_argument("annotations", help="Flickr: directory of XML files; VGG-SS: vggss.json")
    p.add_argument("--audio-dir", required=True, help="folder of the clips' audio files")
    p.add_argument("--frame-dir", required=True, help="video_path: frames at frame_{i}/<id>.jpg below it")
    p.add_argument("--ids", help="Flickr: file whose lines start with the clip ids to keep (csv ok)")
    p.add_argument("--audio-ext", default=".wav", help="audio file extension (default .wav)")
    p.add_argument("--check-files", action="store_true", help="leave out clips whose audio or frame is missing")
    p.add_argument("--out", required=True, help="manifest to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.format == "flickr":
            ids = read_ids(args.ids) if args.ids else None
            rows = flickr_soundnet_rows(args.annotations, args.audio_dir, args.frame_dir, ids,
                                        audio_ext=args.audio_ext)
        else:
            rows = vggss_rows(args.annotations, args.audio_dir, args.frame_dir, args.audio_ext)
    except (ValueError, OSError) as e:
        print(f"annotations: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.check_files:
        rows = keep_available(rows)
    try:
        log.info("wrote %d clips to %s", len(rows), write_manifest(args.out, rows))
    except OSError as e:  # --out cannot be written
        print(f"annotations: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
