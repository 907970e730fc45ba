"""TrainStep's warm-up / capture / replay logic on the CPU: the CUDA-graph capture is injected, so the
same code runs as on a GPU, the device the only difference (tests/test_train_cuda.py runs it on CUDA).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crossmae_fast import CrossMAE, model_config
from crossmae_fast.config import TrainConfig
from crossmae_fast.train.step import TrainStep, make_optimizer

pytestmark = pytest.mark.core
CPU = torch.device("cpu")


def setup(capture=None, warmup: int = 2):
    torch.manual_seed(0)
    model = CrossMAE(model_config("tiny", ops="reference", depth=1, decoder_depth=1, emb_decoder_depth=1))
    opt = make_optimizer(model, TrainConfig(), 1e-3, CPU)
    return model, TrainStep(model, opt, model.cfg.terms, CPU, cuda_graph=True, warmup=warmup, capture=capture)


def batches(cfg, n: int, b: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, cfg.audio_frames, cfg.audio_bins, generator=g),
             torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)) for _ in range(n)]


def run(step, data, seed: int = 5) -> list[dict]:
    """Steps over `data`; masking noise is drawn inside the step from torch's RNG, seeded here."""
    torch.manual_seed(seed)
    out = []
    for a, v in data:
        step(a, v)
        out.append(step.read())
    return out


def assert_same_state(model, opt, ref_model, ref_opt):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k


def test_failed_capture_falls_back_as_if_never_attempted():
    """The capture runs part of a real step (the CPU executes it) and then fails: parameters, gradients,
    optimizer state, loss sums and RNG must be put back, so the run equals a plain eager run exactly."""
    attempts = []

    def failing_capture(fn):
        attempts.append(1)
        fn()
        raise RuntimeError("operation not permitted when stream is capturing")

    model, step = setup(failing_capture)
    ref_model, ref = setup()
    ref.want_graph = False  # the eager baseline: same model, optimizer and seeds
    data = batches(model.cfg, 5)
    got, rng = run(step, data), torch.get_rng_state()
    want, ref_rng = run(ref, data), torch.get_rng_state()
    assert attempts == [1] and step.mode == "eager" and step.graph is None and not step.want_graph
    assert got == want and torch.equal(rng, ref_rng)
    assert_same_state(model, step.opt, ref_model, ref.opt)


def test_failed_capture_without_warmup_drops_new_optimizer_state():
    """With no warm-up the optimizer state is first created inside the failed attempt: it is removed."""

    def failing_capture(fn):
        fn()
        raise RuntimeError("capture failed")

    model, step = setup(failing_capture, warmup=0)
    ref_model, ref = setup(warmup=0)
    ref.want_graph = False
    data = batches(model.cfg, 2)
    assert run(step, data) == run(ref, data)
    assert_same_state(model, step.opt, ref_model, ref.opt)


def test_replayed_capture_uses_static_inputs():
    """An injected capture that replays the recorded step: later calls copy their inputs into the static
    buffers and replay, and give the eager run's results; other shapes are refused."""
    captured = []

    def capture(fn):
        captured.append(fn)
        return SimpleNamespace(replay=fn)

    model, step = setup(capture)
    ref_model, ref = setup()
    ref.want_graph = False
    data = batches(model.cfg, 5)
    assert run(step, data) == run(ref, data)
    assert len(captured) == 1 and step.mode == "cuda-graph" and step.calls == 5
    assert_same_state(model, step.opt, ref_model, ref.opt)
    a, v = batches(model.cfg, 1, b=3)[0]
    with pytest.raises(ValueError, match="captured shapes"):
        step(a, v)


def test_no_capture_on_cpu_without_injection():
    model, _ = setup()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), model.cfg.terms, CPU, cuda_graph=True)
    assert not step.want_graph and step.side_stream is None
