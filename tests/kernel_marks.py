"""Device and skip markers shared by the tests that run the Triton kernels."""

import pytest
import torch

from kernels.utils import interpret_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not interpret_mode(), reason="needs TRITON_INTERPRET=1 or a GPU"
)
needs_cuda = pytest.mark.gpu  # skipped without CUDA by conftest.py
