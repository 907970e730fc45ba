"""The command-line tools agree on option names and types; evaluate's output folder and its one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from crossmae_fast import evaluate
from crossmae_fast.components.checkpoint import TrainState, checkpoint_state
from crossmae_fast.config import EvalConfig, RunConfig, model_config, run_config
from crossmae_fast.model.crossmae import CrossMAE

CLIS = ("pretrain", "evaluate", "learning_check", "prepare", "synth", "annotations", "localize", "finetune",
        "shard")
SHARED = ("--data", "--out", "--batch-size", "--device", "--seed", "--loader", "--workers")
"""Options that mean the same thing wherever they appear; pretrain's spelling and types are the reference."""
EXPECTED = {  # shared options each tool must have
    "evaluate": SHARED,
    "learning_check": ("--out", "--batch-size", "--loader", "--workers"),  # --seeds: several training seeds
    "prepare": ("--out",),  # --processes: extraction processes, not loader workers
    "synth": ("--out", "--seed"),  # --threads: writer threads
    "annotations": ("--out",),
    "localize": ("--out", "--batch-size", "--device", "--workers"),
    "finetune": SHARED,
    "shard": ("--out", "--seed"),  # --processes: writer processes
}
OTHER_SPELLINGS = ("--backend", "--num-workers", "--num_workers", "--batch_size", "--output", "--manifest",
                   "--bs", "--nworkers")


class _Parser(Exception):
    pass


def parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a CLI's `main` builds, caught at `parse_args` (no CLI needs to expose it)."""

    def grab(self, *args, **kwargs):
        raise _Parser(self)

    main = importlib.import_module(f"crossmae_fast.{name}").main
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parser) as caught:
            main([])
    return caught.value.args[0]


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def signature(action: argparse.Action) -> tuple:
    """What a user sees of an option: its value type and allowed values (None type = str)."""
    return action.type or str, frozenset(action.choices) if action.choices else None


def test_shared_options_agree_with_pretrain(monkeypatch):
    parsers = {name: options(parser_of(name, monkeypatch)) for name in CLIS}
    reference = parsers["pretrain"]
    assert set(SHARED) <= set(reference)
    for name, opts in parsers.items():
        assert set(EXPECTED.get(name, ())) <= set(opts), (name, sorted(set(EXPECTED.get(name, ())) - set(opts)))
        assert not set(OTHER_SPELLINGS) & set(opts), (name, sorted(set(OTHER_SPELLINGS) & set(opts)))
        for flag in set(SHARED) & set(opts):
            assert signature(opts[flag]) == signature(reference[flag]), (name, flag)
            assert opts[flag].dest == reference[flag].dest, (name, flag)


CONFIG_NAME = {("synth", "seconds"): "synth_seconds"}
"""Options whose config field has another name."""
PER_TOOL = {"out", "data", "checkpoint", "steps"}
"""What each tool chooses for itself: its paths, and the learning check's run length."""


def config_defaults() -> dict:
    """Flat field name -> default, over the run config and the evaluation config (the dataclass defaults:
    the paper's sizes; pre-training's tiny preset is a recipe on top of them)."""
    flat = {}
    for section in RunConfig().to_dict().values():
        flat.update(section)
    for name, value in dataclasses.asdict(EvalConfig()).items():
        assert flat.setdefault(name, value) == value or name in PER_TOOL, name  # evaluate agrees with pretrain
    return flat


def test_shared_option_defaults_agree_with_the_config(monkeypatch):
    """Every option of every tool that sets a config field (by name) defaults to the config's value."""
    flat, compared = config_defaults(), set()
    for name in CLIS:
        for action in parser_of(name, monkeypatch)._actions:
            field = CONFIG_NAME.get((name, action.dest), action.dest)
            if field not in flat or field in PER_TOOL or action.default is argparse.SUPPRESS or action.required:
                continue  # SUPPRESS: generated from the config, it takes the config's default
            default = tuple(action.default) if isinstance(action.default, list) else action.default
            assert default == flat[field], (name, action.dest, default, flat[field])
            compared.add((name, field))
    assert {("synth", "synth_seconds"), ("learning_check", "workers"), ("learning_check", "loader")} <= compared


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory, tiny_set):
    """A run folder with one checkpoint of an untrained tiny model, and the shared set's eval manifest."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    cfg = model_config("tiny", ops="reference")
    run = root / "runs" / "pretrain"
    run.mkdir(parents=True)
    run_cfg = run_config({"model": cfg.to_dict()})
    state = checkpoint_state(CrossMAE(cfg), torch.optim.SGD(CrossMAE(cfg).parameters()), run_cfg, 1, TrainState(1))
    torch.save(state, run / "checkpoint-00000001.pt")
    return run, tiny_set["eval"]


def cli(*args: str) -> list[str]:
    return [*args, "--loader", "torch", "--workers", "0", "--device", "cpu"]


def test_out_defaults_to_the_run_and_metrics_written_once(run_and_data, monkeypatch, capsys):
    run, data = run_and_data
    assert evaluate.default_out(run) == run / "eval"
    assert evaluate.default_out(run / "checkpoint-00000001.pt") == run / "eval"
    from crossmae_fast.eval import evaluator

    writes = []
    real = evaluator.atomic_write
    monkeypatch.setattr(evaluator, "atomic_write", lambda p, *a: (writes.append(Path(p).name), real(p, *a))[1])
    assert evaluate.main(cli("--checkpoint", str(run), "--data", str(data), "--pictures", "1")) == 0
    assert writes == ["metrics.json"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(run) and metrics["clips"] == 6 and metrics["pictures"]
    assert all(Path(p).parent == run / "eval" / "pictures" for p in metrics["pictures"])
    assert not (run.parent / "eval").exists()
    assert "R@1" in capsys.readouterr().out


def one_error_line(capsys, *args: str) -> str:
    assert evaluate.main(cli(*args)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_bad_inputs_get_one_line(run_and_data, tmp_path, capsys):
    run, data = run_and_data
    not_ckpt = tmp_path / "some.json"
    not_ckpt.write_text('{"data": []}\n')
    assert str(not_ckpt) in one_error_line(capsys, "--checkpoint", str(not_ckpt), "--data", str(data))
    garbage = tmp_path / "checkpoint-00000002.pt"
    garbage.write_bytes(b"not a pickle")
    assert str(garbage) in one_error_line(capsys, "--checkpoint", str(garbage), "--data", str(data))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {}}, wrong)
    line = one_error_line(capsys, "--checkpoint", str(wrong), "--data", str(data))
    assert str(wrong) in line and "missing" in line
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert str(empty) in one_error_line(capsys, "--checkpoint", str(empty), "--data", str(data))
    assert "nope.pt" in one_error_line(capsys, "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data))
    bad_manifest = tmp_path / "rows.json"
    bad_manifest.write_text('{"rows": []}\n')
    assert str(bad_manifest) in one_error_line(capsys, "--checkpoint", str(run), "--data", str(bad_manifest))
    assert "missing.json" in one_error_line(capsys, "--checkpoint", str(run), "--data", str(tmp_path / "missing.json"))
