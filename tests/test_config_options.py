"""The run config and the options generated from it: every field an option with help, files nested or
flat, the command line over the file over the preset, errors that name the key."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from crossmae_fast import evaluate, options, pretrain
from crossmae_fast.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    SummaryConfig,
    TrainConfig,
    opt,
    run_config,
)


def all_fields():
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("eval", SummaryConfig)):
        for f in dataclasses.fields(cls):
            yield section, f


def test_every_field_has_help_and_an_option():
    index = options.leaves(RunConfig)
    parser = pretrain.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for section, f in all_fields():
        assert len(f.metadata.get("help", "")) > 10, f"{section}.{f.name} has no help text"
        follows = f.metadata.get("follows")
        owner = index[f.name]  # a following field is set through the option of the field it follows
        assert owner.section == (follows or section), (section, f.name)
        assert "--" + f.name.replace("_", "-") in flags


@dataclasses.dataclass
class Extra:
    queue_size: int = opt(7, "queue length of the new feature")
    use_it: bool = opt(False, "switch the new feature on")


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    extra: Extra = dataclasses.field(default_factory=Extra)


@dataclasses.dataclass
class A:
    seed: int = opt(0, "a seed of section a")


@dataclasses.dataclass
class Clash:
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    a: A = dataclasses.field(default_factory=A)


def test_new_fields_become_options_without_cli_changes():
    ap = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    options.add_options(ap, Config)
    ns = vars(ap.parse_args(["--queue-size", "9", "--use-it", "--mask-ratio", "0.5"]))
    assert options.from_namespace(ns, Config) == {"extra": {"queue_size": 9, "use_it": True},
                                                  "model": {"mask_ratio": 0.5}}
    assert "queue length of the new feature" in ap.format_help()


def test_option_types():
    cfg = pretrain.parse_args(["--image-mean", "0.5", "0.4", "0.3", "--no-norm-pix-loss", "--resume", "--video",
                               "--audio-mean", "-4.5", "--recon-loss-on", "visible", "--time-limit", "2.5"])
    assert cfg.data.image_mean == (0.5, 0.4, 0.3) and cfg.data.video
    assert cfg.model.norm_pix_loss is False and cfg.model.recon_loss_on == "visible"
    assert cfg.train.resume == "auto" and cfg.train.time_limit == 2.5 and cfg.data.audio_mean == -4.5
    assert pretrain.parse_args(["--resume", "runs/x/checkpoint-00000010.pt"]).train.resume.endswith("10.pt")


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "model:\n  mask_ratio: 0.6\n  variant: cl-av\ndata:\n  audio-mean: -3.0\ntrain:\n  steps: 11\n"
              "  blr: 1e-3\neval:\n  eval_pictures: 0\n"),
    (".yaml", "mask-ratio: 0.6\nvariant: cl-av\naudio_mean: -3.0\nsteps: 11\nblr: 1e-3\neval_pictures: 0\n"),
    (".json", json.dumps({"model": {"mask_ratio": 0.6, "variant": "cl-av"}, "audio_mean": -3.0,
                          "train": {"steps": 11, "blr": 1e-3}, "eval_pictures": 0})),
])
def test_file_nested_or_flat_and_command_line_wins(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = pretrain.parse_args(["--config", str(path)])
    assert (cfg.model.mask_ratio, cfg.model.variant, cfg.data.audio_mean) == (0.6, "cl-av", -3.0)
    assert (cfg.train.steps, cfg.train.blr, cfg.eval.eval_pictures) == (11, 1e-3, 0)  # "1e-3": YAML's string
    cfg = pretrain.parse_args(["--config", str(path), "--mask-ratio", "0.7", "--steps", "3", "--blr", "2e-4"])
    assert (cfg.model.mask_ratio, cfg.train.steps, cfg.train.blr, cfg.model.variant) == (0.7, 3, 2e-4, "cl-av")


def test_presets_apply_to_every_section_and_give_way():
    tiny, base = run_config(), run_config(preset="base")
    assert tiny.model.preset == "tiny" and tiny.model.embed_dim == 128 and tiny.train.blr == 2.4e-3
    assert (tiny.train.epochs, tiny.train.synth_clips, tiny.model.contrastive_inputs) == (12.5, 1024, "unmasked")
    assert base.model.embed_dim == 768 and base.train.blr == 1.5e-4
    assert (base.train.epochs, base.model.contrastive_inputs) == (24.0, "masked")  # the paper's inputs
    assert (tiny.data.image_size, tiny.data.audio_frames, tiny.data.audio_bins) == (64, 256, 64)  # follow model
    cfg = run_config({"model": {"preset": "base", "depth": 6}}, blr=1e-4, audio_frames=512)
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.train.blr, cfg.data.audio_frames) == (6, 768, 1e-4, 512)


def test_round_trip_and_errors_name_the_key(tmp_path):
    cfg = run_config(mask_ratio=0.6, image_std=(0.2, 0.2, 0.2), steps=4)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown option batch_sise"):
        run_config(batch_sise=3)
    with pytest.raises(ValueError, match="unknown option model.steps"):
        run_config({"model": {"steps": 3}})
    with pytest.raises(ValueError, match="follows model.image_size"):
        run_config({"data": {"image_size": 32}})
    with pytest.raises(ValueError, match="mask_ratio"):
        run_config(mask_ratio=1.5)
    with pytest.raises(ValueError, match="eval_frame"):
        run_config(eval_frame=12)
    with pytest.raises(ValueError, match="not a number"):
        run_config({"train": {"blr": "fast"}})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        options.read_file(tmp_path / "list.yaml", RunConfig)


def test_flat_names_are_unique_across_sections():
    with pytest.raises(TypeError, match="seed"):
        options.leaves(Clash)


def test_evaluate_options_are_the_eval_config(tmp_path):
    """`evaluate`'s options are generated from `EvalConfig` (and the data fields an evaluation may change)."""
    flags = {s for a in evaluate.build_parser()._actions for s in a.option_strings}
    for f in dataclasses.fields(EvalConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    assert {"--loader", "--workers", "--audio-mean"} <= flags and "--sample-rate" not in flags
    cfg, data = evaluate.parse_args(["--checkpoint", "c", "--data", "d", "--probe-seeds", "3", "4", "--workers", "0"])
    assert (cfg.checkpoint, cfg.data, cfg.probe_seeds, cfg.pictures, data) == ("c", "d", (3, 4), 4, {"workers": 0})
    path = tmp_path / "ev.yaml"
    path.write_text("checkpoint: c\ndata: d\neval:\n  map_size: 112\naudio_std: 2\n")
    cfg, data = evaluate.parse_args(["--config", str(path), "--map-size", "56"])
    assert (cfg.map_size, data) == (56, {"audio_std": 2.0})
    for bad in (["--data", "d"], ["--checkpoint", "c", "--data", "d", "--gt-mode", "x"],
                ["--checkpoint", "c", "--data", "d", "--device", "gpu"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(bad)
