"""Fine-tune or linearly probe CrossMAE's encoders for classification: `python -m crossmae_fast.finetune
--init RUN [options]` (one process) or `torchrun --nproc_per_node N -m crossmae_fast.finetune ...` (DDP).

With no data options it uses the cached synthetic set (the sounding object's class, 16 classes) and the
model size of the `--init` checkpoint; writes checkpoints, `metrics.jsonl` (train loss and eval scores
per epoch) and `eval/` (metrics.json, per_class.csv, predictions.pt) to `--out`. `--resume auto`
continues a run exactly; `--eval-only` scores a fine-tuned checkpoint.

Every field of the run's config (`crossmae_fast.config.FinetuneConfig`: model, data, train, classify)
is an option; `--config FILE` reads the same names from YAML or JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys

from crossmae_fast import options
from crossmae_fast.config import FinetuneConfig, finetune_config

log = logging.getLogger("crossmae_fast.finetune")
SKIP = ("export_encoders",)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m crossmae_fast.finetune", argument_default=argparse.SUPPRESS,
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Multi-GPU: torchrun --nproc_per_node N -m crossmae_fast.finetune ...; --batch-size is per "
               "process. Defaults shown are CAV-MAE's AudioSet-20K recipe (the tiny preset has its own, README).",
    )
    ap.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flat or nested by section)")
    defaults = FinetuneConfig().to_dict()
    for section in ("classify", "train", "data", "model"):
        options.add_options(ap.add_argument_group(f"{section} options"), FinetuneConfig, sections=(section,),
                            defaults=defaults, skip=SKIP)
    return ap


def pretrained_model_config(init: str | None) -> dict | None:
    """The model section of the pre-training checkpoint `--init` names (None for other sources)."""
    if init in (None, "none"):
        return None
    from crossmae_fast.classify.finetuner import init_files
    from crossmae_fast.components.checkpoint import load_checkpoint

    files = init_files(init)
    try:
        state = load_checkpoint(files[0])
    except ValueError:
        return None  # exported encoders or an ImageNet checkpoint: the sizes come from the options
    model = dict(state["config"]["model"])
    for name in ("audio_frames",):  # input length: the fine-tuning data's, from the options or the preset
        model.pop(name, None)
    return model


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    ap = build_parser()
    ns = vars(ap.parse_args(argv))
    try:
        given = options.from_namespace(ns, FinetuneConfig)
        from_file = options.read_file(ns["config"], FinetuneConfig) if "config" in ns else {}
        values = options.merge(from_file, given)
        init = values.get("train", {}).get("init")
        if init is None and not values.get("classify", {}).get("eval_only"):
            raise ValueError("--init is required: a pre-training run or checkpoint, exported encoders, an ImageNet "
                             "MAE checkpoint, or 'none' (random init)")
        return finetune_config(values, pretrained_model_config(init))
    except (ValueError, TypeError, OSError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    from crossmae_fast.classify.finetuner import Finetuner
    from crossmae_fast.components import distributed
    from crossmae_fast.components.stopping import run_exit_status
    from crossmae_fast.eval import classification_stats

    distributed.log_to_stdout()
    return run_exit_status("finetune", "crossmae_fast.finetune", argv,
                           lambda: Finetuner(cfg, classification_stats).fit())


if __name__ == "__main__":
    sys.exit(main())
