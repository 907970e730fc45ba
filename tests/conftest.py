"""Suite-wide setup: without a GPU the Triton kernels run in the interpreter on CPU tensors, and
tests marked `gpu` are skipped; every test's global RNGs are seeded from its name; one synthetic set
per session for the tests that train.

Only this file decides interpreter mode: TRITON_INTERPRET is read when kernels are decorated, so it
is set here, before any test module imports triton (a test module that set it would route CPU
tensors to compiled kernels on a GPU host). An explicit TRITON_INTERPRET in the environment wins.
"""

import os
import random
import zlib

import numpy as np
import pytest
import torch
from optional import MEDIA, skip_unless

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from the global RNGs (torch, numpy, random) seeded from its own name, so its
    random inputs are fixed from run to run and differ between tests; returns the seed."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """`synthetic_set(clips, seed, **kw)`: manifests of a synthetic set generated once per test session
    (`cached_synthetic_set` in a session folder), shared by every test that asks for the same one."""
    from crossmae_fast.data.synthetic import cached_synthetic_set

    skip_unless(*MEDIA)  # the set is written with soundfile (and PyAV for videos)
    root = tmp_path_factory.mktemp("synthetic")
    return lambda clips, seed, **kw: cached_synthetic_set(clips, seed, root=root, **kw)


@pytest.fixture(scope="session")
def tiny_set(synthetic_set):
    """The synthetic set the CPU training and evaluation tests share: 18 train / 6 eval clips at the
    tiny preset's sizes."""
    return synthetic_set(24, seed=3, seconds=2.7, image_size=64)


@pytest.fixture
def graph_capture():
    """`capture(step)`: warm `step` up on a side stream (autotuning happens there), then capture it in a
    CUDA graph; returns (the captured call's outputs, the graph). Replay refreshes those outputs."""

    def capture(step):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        return outputs, graph

    return capture
