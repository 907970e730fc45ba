"""`python -m crossmae_fast.evaluate`: retrieval and localization of a checkpoint.

    python -m crossmae_fast.evaluate --checkpoint PATH --data MANIFEST [--out DIR] [--pictures K]
        [--probe-data TRAIN_MANIFEST [--probe-steps N] [--probe-seeds S ...]]

`--checkpoint` is a checkpoint file or a run folder (its latest checkpoint). Prints the retrieval and
localization tables and writes `metrics.json` and pictures into `--out`, by default the `eval/`
folder of the run the checkpoint belongs to. The fbank normalisation is the run's (its checkpoint
records it). `--probe-data` adds the localization probe (crossmae_fast/eval/probe.py), trained on that
manifest, one per `--probe-seeds`. The evaluation itself is `crossmae_fast.eval.evaluator`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

LOADERS = ("dali", "torch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crossmae_fast.evaluate",
                                description="Retrieval and sound-source localization of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--data", required=True, help="CAV-MAE manifest; its rows with 'bbox' score localization")
    p.add_argument("--out", help="output folder (default: eval/ in the checkpoint's run folder)")
    p.add_argument("--pictures", type=int, default=4, help="clips to draw pictures for (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per batch (default 32)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda[:N]'")
    p.add_argument("--loader", choices=LOADERS, default="dali",
                   help="data loader: DALI (the torch loader where DALI is missing) or the torch DataLoader")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (DALI threads; default 2)")
    p.add_argument("--gt-mode", choices=("vggss", "flickr"), default="vggss",
                   help="box consensus: union (VGG-SS, synthetic) or annotators' sum / 2 (Flickr-SoundNet)")
    p.add_argument("--map-size", type=int, default=224, help="side of the localization map (default 224)")
    p.add_argument("--seed", type=int, default=0, help="masking noise for the pictures (default 0)")
    p.add_argument("--audio-mean", type=float, help="fbank mean to normalise with (default: the run's, as its "
                   "checkpoint records; else the manifest's statistics; else AudioSet's)")
    p.add_argument("--audio-std", type=float, help="fbank standard deviation (default: as --audio-mean)")
    p.add_argument("--probe-data", metavar="MANIFEST", help="train a localization probe on this manifest's clips "
                   "(the run's train split) on top of the frozen encoders, and score its maps too")
    p.add_argument("--probe-steps", type=int, default=300, help="probe training steps (default 300)")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1],
                   help="one probe per seed, scored separately and averaged (default 0 1)")
    return p


def default_out(checkpoint: str | Path) -> Path:
    """`eval/` inside the run: a run folder's own, or the folder holding a checkpoint file."""
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "eval"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    from crossmae_fast.config import data_config
    from crossmae_fast.data.manifest import read_manifest
    from crossmae_fast.eval.evaluator import checkpoint_data_config, evaluate, format_tables, load_model
    from crossmae_fast.eval.probe import ProbeConfig

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # bad inputs: one line naming the file, not a traceback
        model = load_model(args.checkpoint)
        read_manifest(args.data)
        if args.probe_data:
            read_manifest(args.probe_data)
        data = checkpoint_data_config(args.checkpoint) or data_config(model.cfg)
        probe = ProbeConfig(steps=args.probe_steps, seeds=tuple(args.probe_seeds)) if args.probe_data else None
    except (ValueError, OSError) as e:
        print(f"evaluate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    overrides = {k: getattr(args, k) for k in ("audio_mean", "audio_std") if getattr(args, k) is not None}
    data = dataclasses.replace(data, **overrides)
    out = Path(args.out) if args.out else default_out(args.checkpoint)
    result = evaluate(model.to(device), args.data, out, pictures_k=args.pictures, batch_size=args.batch_size,
                      device=device, backend=args.loader, gt_mode=args.gt_mode, map_size=args.map_size,
                      num_workers=args.workers, seed=args.seed, checkpoint=args.checkpoint, data=data,
                      probe=probe, probe_data=args.probe_data)
    print(format_tables(result))
    print(f"\nwrote {out / 'metrics.json'} and {len(result.get('pictures', []))} pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
