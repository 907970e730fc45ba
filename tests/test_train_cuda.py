"""CUDA-graph train step (skipped without a GPU): replayed steps equal eager steps, memory stays flat."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from optional import needs_media

from crossmae_fast.config import TrainConfig, model_config, run_config
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.train.step import TrainStep, make_optimizer
from crossmae_fast.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.core]


def batches(cfg, n: int, b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, cfg.audio_frames, cfg.audio_bins, generator=g),
             torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
             torch.rand(b, cfg.num_audio_patches, generator=g),
             torch.rand(b, cfg.num_image_patches, generator=g)) for _ in range(n)]


def make(cfg, graph: bool, model=None):
    dev = torch.device("cuda")
    model = model or CrossMAE(cfg).to(dev)
    opt = make_optimizer(model, TrainConfig(), 1e-3, dev)
    return model, TrainStep(model, opt, cfg.terms, dev, precision="bf16", cuda_graph=graph, warmup=2)


@pytest.mark.parametrize("ops", ["reference", "triton"])
def test_graph_steps_equal_eager_steps(ops):
    torch.manual_seed(0)
    cfg = model_config("tiny", ops=ops)
    eager_model, eager = make(cfg, graph=False)
    graph_model, graph = make(cfg, graph=True, model=copy.deepcopy(eager_model))
    losses = {"eager": [], "graph": []}
    for i, batch in enumerate(batches(cfg, 7)):
        lr = 1e-3 * (i + 1) / 7  # a changing lr must reach the captured optimizer
        for name, step in (("eager", eager), ("graph", graph)):
            batch_dev = [x.cuda() for x in batch]
            step.set_lr(lr)
            step(*batch_dev)
            losses[name].append(step.read())
    assert graph.mode == "cuda-graph" and eager.mode == "eager"
    for e, g in zip(losses["eager"], losses["graph"]):
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=2e-2, abs=1e-3), k
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-3, msg=name)


def test_no_allocation_after_capture():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    _, step = make(cfg, graph=True)
    data = [[x.cuda() for x in b] for b in batches(cfg, 10, seed=1)]
    for batch in data[:4]:  # 2 warm-up steps, capture + replay, one replay
        step(*batch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i, batch in enumerate(data[4:]):
        step.set_lr(1e-4 * i)
        step(*batch)
    torch.cuda.synchronize()
    assert step.mode == "cuda-graph"
    assert torch.cuda.memory_allocated() == before
    assert all(torch.isfinite(torch.tensor(v)) for v in step.read().values())


def test_internal_noise_varies_between_replays():
    """Masking noise drawn inside the graph must differ from replay to replay (Philox offsets advance)."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    _, step = make(cfg, graph=True)
    a, v, _, _ = [x.cuda() for x in batches(cfg, 1)[0]]
    step.set_lr(0.0)  # weights barely move (AdamW with lr 0 leaves them unchanged)
    seen = []
    for _ in range(6):
        step(a, v)
        seen.append(step.read()["loss"])
    assert step.mode == "cuda-graph"
    assert len({round(x, 6) for x in seen[3:]}) == 3  # replays: different masks, different losses


def test_one_side_stream_for_the_warmup():
    cfg = model_config("tiny")
    _, step = make(cfg, graph=True)
    a, v, _, _ = [x.cuda() for x in batches(cfg, 1)[0]]
    step(a, v)
    first = step.side_stream
    step(a, v)
    assert first is not None and step.side_stream is first


def test_failed_capture_falls_back_to_eager_steps():
    """A capture that records the whole step and then fails (the graph is discarded): the run continues
    eagerly from the state before the attempt (the capture advanced the CUDA RNG; it is put back)."""
    torch.manual_seed(0)
    cfg = model_config("tiny", ops="triton")
    eager_model, eager = make(cfg, graph=False)
    model, step = make(cfg, graph=True, model=copy.deepcopy(eager_model))

    def failing(fn):
        def record_then_fail():
            fn()
            raise RuntimeError("an op that cannot be captured")
        return step._cuda_graph(record_then_fail)

    step.capture = failing
    losses = {"eager": [], "graph": []}
    for name, s in (("eager", eager), ("graph", step)):
        torch.manual_seed(1)  # masking noise comes from the CUDA RNG inside the step
        for batch in batches(cfg, 5, seed=3):
            s(*[x.cuda() for x in batch[:2]])
            losses[name].append(s.read()["loss"])
    assert step.mode == "eager" and step.graph is None
    assert losses["graph"] == pytest.approx(losses["eager"], rel=1e-3, abs=1e-4)
    for (name, p), q in zip(eager_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


@needs_media
def test_cli_runs_with_cuda_graph(tmp_path):
    from crossmae_fast.data.synthetic import make_synthetic_set

    data = make_synthetic_set(tmp_path / "synth", clips=40, seed=2, seconds=2.7, image_size=64)
    cfg = run_config(data=str(data["train"]), eval_data=str(data["eval"]), out=str(tmp_path / "run"), steps=12,
                     batch_size=8, device="cuda", log_every=4, save_every=6, eval_pictures=0)
    summary = Trainer(cfg).fit()
    assert summary["step_mode"] == "cuda-graph" and summary["steps"] == 12
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    cfg.train.resume = "auto"
    resumed = Trainer(cfg).fit()
    assert resumed["steps"] == 12
