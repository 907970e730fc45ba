"""Every Triton kernel, autotune config and dtype compiles for sm_90 and sm_80 without a GPU, within the
target's shared-memory and register limits (benchmarks/kernel_resources.py does the work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.core


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    # the interpreter would turn the kernels into Python functions: compile in a process without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CI's check: on a GPU host the kernel tests compile for the "
                    "device itself, and device time is scarce")
def test_kernel_compile_every_kernel_for_sm90_and_sm80():
    proc = _run("--check", "--arch", "90", "--arch", "80", timeout=1500)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert "0 problem(s)" in report and "sm_90:" in report and "sm_80:" in report, report[-3000:]


def test_kernel_compile_reports_problems():
    """The checks can fail: a shared-memory limit of one byte, a kernel without a case, an unused config."""
    from triton.runtime.autotuner import Autotuner

    from benchmarks import kernel_resources as kr

    assert kr.Resources(90, shared=kr.SHARED_LIMIT[90] + 1).problems()
    assert not kr.Resources(90, shared=kr.SHARED_LIMIT[90], registers=255, num_warps=8).problems()
    assert kr.Resources(80, registers=255, num_warps=16).problems()
    assert kr.Resources(90, error="CompilationError: x").problems() == ["CompilationError: x"]
    log = ("ptxas info : Used 96 registers, used 1 barriers\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads")
    res = kr.Resources(90)
    kr.read_ptxas_log(log, res)
    assert (res.registers, res.stack, res.spill_stores, res.spill_loads) == (96, 16, 8, 4)
    assert kr.tensor_core_ops("\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {...};\n") == "wgmma"
    assert kr.tensor_core_ops("\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};\n") == "mma.sync"
    assert kr.tensor_core_ops("\tfma.rn.f32 %f1, %f2, %f3, %f4;\n") == ""
    # (in this process the kernels are interpreted: only the autotuned ones are found, enough for the check)
    assert any(isinstance(k, Autotuner) for k in kr.kernels_defined().values())
    assert any("no compile case" in p for p in kr.coverage_problems([], []))


@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_compile_limits(arch):
    from benchmarks import kernel_resources as kr

    assert kr.SHARED_LIMIT[arch] == {90: 227 * 1024, 80: 163 * 1024}[arch]
