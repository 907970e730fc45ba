"""`python -m crossmae_fast.localize`: where the sound comes from in your own videos.

    python -m crossmae_fast.localize VIDEO [VIDEO ...] --checkpoint RUN [--probe FILE] [--out DIR]
        [--start S] [--seconds S] [--embed] [--batch-size N] [--device auto] [--workers N]

Decodes each video (any file PyAV reads: H.264/AAC mp4, VP9/Opus webm, ...), takes a window of
`--seconds` (default 10) from `--start`, prepares it as the run prepared its training clips (its fbank
statistics and image size, from the checkpoint) and writes, per video, into `--out/<name>/`: a heatmap
over each of the 10 sampled frames (`frame_{i}.png`, and `heatmaps.png` with all 10), `overlay.mp4`
(the window with the heatmaps over it and its audio), `localization.json` (each frame's time and the
map's peak) and, with `--embed`, `embeddings.npz` (the audio and visual global features). The map is
the zero-shot map, or that of the probe heads `evaluate --probe-data ... --save-probe FILE` saved
(`--probe FILE`). `--out` defaults to `localize/` in the checkpoint's run folder.

A video that cannot be used (no audio track, not a video, cut short) gets one line naming it on
stderr and the others are still processed; the exit status is then 2. So it is for a checkpoint or
probe file that is not one. The work is `crossmae_fast.eval.localizer`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crossmae_fast.localize",
                                description="Heatmaps of the sounding region over your own videos.")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (anything PyAV reads)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--probe", metavar="FILE", help="probe heads saved by evaluate --save-probe (default: the "
                   "zero-shot map)")
    p.add_argument("--out", help="output folder (default: localize/ in the checkpoint's run folder)")
    p.add_argument("--start", type=float, default=0.0, help="window start in seconds (default 0)")
    p.add_argument("--seconds", type=float, default=10.0, help="window length in seconds (default 10)")
    p.add_argument("--embed", action="store_true", help="also write embeddings.npz (audio and visual features)")
    p.add_argument("--batch-size", type=int, default=32, help="videos per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda[:N]'")
    p.add_argument("--workers", type=int, default=2, help="videos decoded at a time (default 2)")
    return p


def default_out(checkpoint: str | Path) -> Path:
    """`localize/` inside the run: a run folder's own, or the folder holding a checkpoint file."""
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "localize"


def error(message: str) -> None:
    print(f"localize: error: {message.splitlines()[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from crossmae_fast.components.checkpoint import checkpoint_data_config, model_from_checkpoint
    from crossmae_fast.components.distributed import pick_device
    from crossmae_fast.eval.localizer import localize
    from crossmae_fast.eval.probe import load_probes
    from crossmae_fast.eval.video import Window

    try:  # bad inputs: one line naming the file, not a traceback
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"--batch-size {args.batch_size} must be at least 1 and --workers {args.workers} "
                             "not negative")
        window = Window(args.start, args.seconds)
        model = model_from_checkpoint(args.checkpoint, device=pick_device(0, args.device))
        data = checkpoint_data_config(args.checkpoint)
        heads = []
        if args.probe:
            heads, meta = load_probes(args.probe)
            if meta["width"] != model.cfg.embed_dim:
                raise ValueError(f"{args.probe}: probe heads for {meta['width']}-wide features, but "
                                 f"{args.checkpoint} has {model.cfg.embed_dim}-wide encoders")
    except (ValueError, OSError) as e:
        error(str(e))
        return 2
    out = Path(args.out) if args.out else default_out(args.checkpoint)
    done, failed = localize(model, args.videos, out, data, window, heads, embed=args.embed,
                            batch_size=args.batch_size, workers=args.workers)
    for line in failed.values():
        error(line)
    print(f"wrote {len(done)} of {len(args.videos)} videos' heatmaps under {out}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
