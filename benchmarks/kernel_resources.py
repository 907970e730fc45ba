"""Ahead-of-time compile of every Triton kernel in `kernels/` for sm_90 and sm_80, without a GPU.

    python -m benchmarks.kernel_resources            # compile, write benchmarks/results/kernel_resources.md
    python -m benchmarks.kernel_resources --check    # compile only; exit 1 on any failure

Nothing is launched. Each op's launcher runs on CPU tensors of the model's shapes (and the extremes its
checks allow) while Triton's launch entry points only record their arguments. Every recorded launch is then
specialised the way Triton's JIT specialises it (its own argument binder), once per autotune config that
survives the kernel's pruning, and compiled by `triton.compile` for a `GPUTarget`. A failure is a compile
error, shared memory over the target's per-block limit, registers x threads over the register file, a
kernel no case launches, or an autotune config no case compiles. The resource figures come from the cubin
compiler itself: registers, stack frame and spill bytes from ptxas's report, shared memory from Triton's
metadata, tensor-core instructions (wgmma on Hopper, mma.sync) from the PTX.

The interpreter (`TRITON_INTERPRET=1`) turns kernels into Python functions, so this runs in a process
without it: `main` re-executes itself with the variable removed when it is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHARED_LIMIT = {90: 232448, 80: 166912}
"""Opt-in shared memory per block (bytes): H100/H200 227 KB, A100 163 KB."""
REGISTER_FILE = 65536
"""32-bit registers per SM (and per block) on sm_80 and sm_90."""
ARCH_NAME = {90: "sm_90 (H100/H200)", 80: "sm_80 (A100)"}
KERNEL_MODULES = ("kernels.masking", "kernels.restore", "kernels.cls_topk", "kernels.cross_attention")
DTYPES = ("float32", "float16", "bfloat16")
RESULT = Path(__file__).resolve().parent / "results" / "kernel_resources.md"


# --- launch recording ----------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments and the configs the autotuner would try."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    configs: list  # triton.Config per autotune candidate, [None] for a kernel without autotuning
    case: str = ""
    dtype: str = ""


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace Triton's launch entry points (also the interpreter's) by recorders for the duration: nothing runs."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def autotuned(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        self.nargs = None
        launches.append(Launch(self.fn, args, _launch_kwargs(kwargs), configs))

    def jitted(self, *args, **kwargs):
        launches.append(Launch(self, args, _launch_kwargs(kwargs), [None]))

    from triton.runtime.interpreter import InterpretedFunction  # what @triton.jit makes under TRITON_INTERPRET

    classes = (Autotuner, JITFunction, InterpretedFunction)
    saved = [cls.run for cls in classes]
    Autotuner.run, JITFunction.run, InterpretedFunction.run = autotuned, jitted, jitted
    try:
        yield launches
    finally:
        for cls, run in zip(classes, saved):
            cls.run = run


def _launch_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}


# --- cases: each op's launchers at the shapes the model and the op's limits produce ------------------------


def _empty(shape, dtype, perm=None):
    import torch

    t = torch.empty(shape, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return t if perm is None else t.permute(*perm)


def _masking_cases(dtype: str) -> Iterator[str]:
    import torch

    m = importlib.import_module("kernels.masking")
    # (name, L, K, D): base image / audio encoder, large, tiny, odd, wider than one column tile
    for name, L, K, D in [("base image", 196, 49, 768), ("base audio", 512, 128, 768), ("large", 196, 49, 1024),
                          ("tiny", 64, 16, 128), ("odd", 37, 9, 33), ("wide", 20, 5, 2100)]:
        B = 4
        x = _empty((B, L, D), dtype)
        ids_keep = torch.zeros(B, K, dtype=torch.int64)
        ids_restore = torch.zeros(B, L, dtype=torch.int64)
        yield name
        m._gather_add(x, ids_keep, _empty((1, L, D), dtype))
        m._gather_add(x, ids_keep, None)
        m._gather_add_bwd(_empty((B, K, D), dtype), ids_restore, True)
        m._gather_add_bwd(_empty((B, K, D), dtype), ids_restore, False)
    if dtype == "float16":
        yield "fp16 x + fp32 pos"
        ids_keep = torch.zeros(4, 49, dtype=torch.int64)
        m._gather_add(_empty((4, 196, 768), "float16"), ids_keep, _empty((1, 196, 768), "float32"))


def _restore_cases(dtype: str) -> Iterator[str]:
    import torch

    r = importlib.import_module("kernels.restore")
    # (name, L, K, D): base audio / image decoder, tiny, odd, wide
    for name, L, K, D in [("base audio", 512, 128, 512), ("base image", 196, 49, 512), ("tiny", 64, 16, 64),
                          ("odd", 37, 9, 33), ("wide", 20, 5, 2100)]:
        B = 4
        x = _empty((B, K, D), dtype)
        ids = torch.zeros(B, L, dtype=torch.int64)
        yield name
        r._restore(x, _empty((1, 1, D), dtype), ids, _empty((1, L, D), dtype))
        r._restore(x, _empty((1, 1, D), dtype), ids, None)
        r._restore_bwd(_empty((B, L, D), dtype), ids, K, True)
        r._restore_bwd(_empty((B, L, D), dtype), ids, K, False)


def _cls_topk_cases(dtype: str) -> Iterator[str]:
    import torch

    c = importlib.import_module("kernels.cls_topk")
    # (name, H, N, head dim, strided like the model's qkv): base image / audio, large, tiny, max head dim, odd
    for name, H, N, hd, strided in [("base image", 12, 49, 64, True), ("base audio", 12, 128, 64, True),
                                    ("large", 16, 128, 64, True), ("tiny", 4, 16, 32, True),
                                    ("head dim 256", 16, 1100, 256, False), ("odd", 3, 7, 24, False)]:
        B = 4
        if strided:
            q, k, _ = _empty((B, 1 + N, 3, H, hd), dtype, (2, 0, 3, 1, 4))
            q = q[:, :, 0]
        else:
            q, k = _empty((B, H, hd), dtype), _empty((B, H, 1 + N, hd), dtype)
        yield name
        c._probs(q, k)
        c._probs_bwd(torch.empty(B, N), q, k)


def _attention_inputs(B, H, Lq, Lk, hd, dtype):
    """q, k, v laid out as the model's CrossAttention makes them (q transposed, k/v a permuted kv projection)."""
    q = _empty((B, Lq, H, hd), dtype, (0, 2, 1, 3))
    k, v = _empty((B, Lk, 2, H, hd), dtype, (2, 0, 3, 1, 4))
    return q, k, v


def _cross_attention_cases(dtype: str) -> Iterator[str]:
    import torch

    a = importlib.import_module("kernels.cross_attention")
    # (name, H, Lq, Lk, S or None, head dim, with an LSE gradient)
    cases = [("base dense (image -> audio)", 16, 512, 50, None, 32, False),
             ("base indexed (attentive tokens)", 16, 129, 49, 12, 32, False),
             ("tiny", 2, 64, 17, 4, 32, False),
             ("head dim 64, long keys", 12, 196, 1000, None, 64, True),
             ("head dim 128, long keys", 8, 300, 400, 300, 128, True),
             ("head dim 128, short keys", 8, 300, 40, None, 128, False),
             ("odd", 3, 33, 37, 21, 40, False)]
    # fp32 compiles twice: exact dots, and TF32 dots when torch allows TF32
    precisions = ("highest", "high") if dtype == "float32" else ("highest",)
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in precisions:
            torch.set_float32_matmul_precision(precision)
            tf32 = " (TF32 allowed)" if precision == "high" else ""
            for name, H, Lq, Lk, S, hd, dlse in cases:
                B = 2
                q, k, v = _attention_inputs(B, H, Lq, Lk, hd, dtype)
                idx = None if S is None else torch.zeros(B, S, dtype=torch.int64)
                scale = hd**-0.5
                yield name + tf32
                out, lse = a._forward_triton(q, k, v, idx, scale)
                a._backward_triton(out, q, k, v, idx, out, lse, None, scale)
                if dlse:
                    a._backward_triton(out, q, k, v, idx, out, lse, torch.empty_like(lse), scale)
    finally:
        torch.set_float32_matmul_precision(previous)


CASES: dict[str, Callable[[str], Iterator[str]]] = {
    "masking": _masking_cases, "restore": _restore_cases, "cls_topk": _cls_topk_cases,
    "cross_attention": _cross_attention_cases,
}


def record_all(ops: list[str] | None = None) -> list[Launch]:
    """Every launch of every case (of `ops`, default all), each op in each dtype, tagged with case and dtype."""
    out: list[Launch] = []
    for op, cases in CASES.items():
        if ops and op not in ops:
            continue
        for dtype in DTYPES:
            with recording() as launches:
                case = ""
                for name in cases(dtype):  # a case yields its name, then launches
                    _tag(launches, case, dtype)
                    case = f"{op}: {name}"
                _tag(launches, case, dtype)
            out += launches
    return out


def _tag(launches: list[Launch], case: str, dtype: str) -> None:
    for launch in launches:
        if not launch.case:
            launch.case, launch.dtype = case, dtype


# --- compile variants ----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One distinct compile: a kernel with one specialisation and one config, and the cases that need it."""

    kernel: object
    args: tuple
    kwargs: dict
    config: object
    dtype: str
    cases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def config_str(self) -> str:
        if self.config is None:
            return f"num_warps={self.kwargs.get('num_warps', 4)}"
        c = self.config
        meta = ", ".join(f"{k}={v}" for k, v in c.kwargs.items())
        return f"{meta}, w{c.num_warps}, s{c.num_stages}"

    def constexpr_str(self) -> str:
        params = self.kernel.params
        names = [p.name for p in params if p.is_constexpr]
        meta = set() if self.config is None else set(self.config.kwargs)
        bound = dict(zip([p.name for p in params], self.args)) | self.kwargs
        return ", ".join(f"{n}={bound[n]}" for n in names if n in bound and n not in meta)


def _compile_inputs(kernel, args: tuple, kwargs: dict, config, target):
    """(ASTSource, options dict) exactly as Triton's JITFunction.run builds them for `target`."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def variants(launches: list[Launch]) -> list[Variant]:
    """Distinct compiles (kernel, specialisation, config), in first-seen order, each with its cases."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    seen: dict[str, Variant] = {}
    for launch in launches:
        for config in launch.configs:
            src, options = _compile_inputs(launch.kernel, launch.args, launch.kwargs, config, target)
            key = f"{src.hash()}-{sorted(options.items())}"
            if key not in seen:
                seen[key] = Variant(launch.kernel, launch.args, launch.kwargs, config, launch.dtype)
            if launch.case not in seen[key].cases:
                seen[key].cases.append(launch.case)
    return list(seen.values())


def kernels_defined() -> dict[str, object]:
    """Every launchable kernel of the `kernels` package: autotuned ones and JIT functions named *_kernel."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for attr, obj in vars(mod).items():
            if isinstance(obj, Autotuner) or (isinstance(obj, JITFunction) and attr.endswith("_kernel")):
                found[f"{mod_name}.{attr}"] = obj
    return found


def coverage_problems(launches: list[Launch], chosen: list[Variant]) -> list[str]:
    """Kernels no case launches, and autotune configs that no case compiles."""
    from triton.runtime.autotuner import Autotuner

    launched = {id(launch.kernel) for launch in launches}
    compiled = {(id(v.kernel), id(v.config)) for v in chosen}
    problems = []
    for name, obj in kernels_defined().items():
        fn = obj.fn if isinstance(obj, Autotuner) else obj
        if id(fn) not in launched:
            problems.append(f"{name}: no compile case launches it (add one to benchmarks/kernel_resources.py)")
        elif isinstance(obj, Autotuner):
            for config in obj.configs:
                if (id(fn), id(config)) not in compiled:
                    problems.append(f"{name}: autotune config {config} is never compiled (pruned for every case)")
    return problems


# --- compile and read the binary --------------------------------------------------------------------------


@dataclass
class Resources:
    """What one variant costs on one target (bytes; registers, stack and spills per thread, shared per block)."""

    arch: int
    shared: int = 0
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    tensor_cores: str = ""
    num_warps: int = 0
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > {SHARED_LIMIT[self.arch]} B per block on sm_{self.arch}")
        if self.registers * 32 * self.num_warps > REGISTER_FILE:
            out.append(f"{self.registers} registers x {32 * self.num_warps} threads > {REGISTER_FILE}")
        return out


def read_ptxas_log(log: str, res: Resources) -> None:
    """Registers, stack frame and spill bytes from ptxas's `-v` report (Triton passes -v)."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if frame is None or regs is None:
        raise RuntimeError(f"no ptxas resource report in: {log[-300:]!r}")
    res.stack, res.spill_stores, res.spill_loads = map(int, frame.groups())
    res.registers = int(regs.group(1))


def tensor_core_ops(ptx: str) -> str:
    """Tensor-core instructions in the PTX: wgmma (Hopper warpgroup MMA) and/or mma.sync (Ampere-style)."""
    return "+".join(op for op in ("wgmma", "mma.sync") if re.search(rf"^\s*{re.escape(op)}\.", ptx, re.M))


def compile_variant(v: Variant, arch: int) -> Resources:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    res = Resources(arch)
    start = time.perf_counter()
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    knobs.nvidia.dump_ptxas_log = True  # ptxas's -v report goes to stdout
    try:
        target = GPUTarget("cuda", arch, 32)
        src, options = _compile_inputs(v.kernel, v.args, v.kwargs, v.config, target)
        with contextlib.redirect_stdout(io.StringIO()) as log:
            kernel = triton.compile(src, target=target, options=options)
        res.shared, res.num_warps = kernel.metadata.shared, kernel.metadata.num_warps
        read_ptxas_log(log.getvalue(), res)
        res.tensor_cores = tensor_core_ops(kernel.asm["ptx"])
    except Exception as err:  # noqa: BLE001 - every failure is reported, with its kind
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    res.seconds = time.perf_counter() - start
    return res


_JOBS: list[tuple[Variant, int]] = []


def _work(i: int) -> Resources:
    return compile_variant(*_JOBS[i])


def compile_all(chosen: list[Variant], archs: list[int], jobs: int) -> list[Resources]:
    """Compile every (variant, arch), `jobs` processes at a time (forked: they inherit the variants)."""
    global _JOBS
    _JOBS = [(v, arch) for arch in archs for v in chosen]
    results = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for res in pool.imap(_work, range(len(_JOBS))):
            results.append(res)
            if len(results) % 50 == 0:
                print(f"  {len(results)}/{len(_JOBS)} compiled", flush=True)
    return results


# --- report ------------------------------------------------------------------------------------------


def _kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def table(chosen: list[Variant], results: list[Resources], archs: list[int], elapsed: float) -> str:
    import triton

    n = len(chosen)
    limits = ", ".join(f"{SHARED_LIMIT[a]} B on sm_{a}" for a in archs)
    lines = [
        "# Triton kernel resources",
        "",
        f"Written by `python -m benchmarks.kernel_resources` (triton {triton.__version__}; compiled ahead of time "
        f"without a GPU in {elapsed:.0f} s). One row per distinct compile: a kernel, the specialisation its "
        "launcher produces for the listed cases, one autotune config. Registers, stack frame and spill "
        "stores/loads (bytes) per thread as ptxas reports them; shared memory per block as Triton allocates it "
        f"(limit {limits}); TC: tensor-core instructions in the PTX (wgmma, mma.sync).",
        "",
        "## Summary",
        "",
        "| kernel | target | variants | max registers | max spill st/ld (B) | max shared (KB) | tensor cores |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for arch_i, arch in enumerate(archs):
        rows = list(zip(chosen, results[arch_i * n:(arch_i + 1) * n]))
        for name in dict.fromkeys(v.name for v in chosen):
            rs = [r for v, r in rows if v.name == name and not r.error]
            if not rs:
                continue
            tc = sorted({f"{v.dtype}:{r.tensor_cores or '-'}" for v, r in rows if v.name == name and not r.error})
            by_dtype = {}
            for item in tc:
                d, t = item.split(":")
                by_dtype.setdefault(t, []).append(d)
            tc_str = "; ".join(f"{t} ({', '.join(ds)})" for t, ds in by_dtype.items())
            lines.append(
                f"| `{name}` | sm_{arch} | {len(rs)} | {max(r.registers for r in rs)} | "
                f"{max(r.spill_stores for r in rs)}/{max(r.spill_loads for r in rs)} | "
                f"{_kb(max(r.shared for r in rs))} | {tc_str} |")
    for arch_i, arch in enumerate(archs):
        rows = list(zip(chosen, results[arch_i * n:(arch_i + 1) * n]))
        lines += ["", f"## {ARCH_NAME[arch]}", "",
                  "| kernel | config | constexprs | dtype | regs | spill st/ld | stack | shared (B) | TC | cases |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|"]
        for v, r in rows:
            if r.error:
                lines.append(f"| `{v.name}` | {v.config_str()} | {v.constexpr_str()} | {v.dtype} | "
                             f"FAILED: {r.error} | | | | | {'; '.join(v.cases)} |")
                continue
            lines.append(
                f"| `{v.name}` | {v.config_str()} | {v.constexpr_str()} | {v.dtype} | {r.registers} | "
                f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared} | {r.tensor_cores or '-'} | "
                f"{'; '.join(v.cases)} |")
    return "\n".join(lines) + "\n"


def run(archs: list[int], jobs: int, write: Path | None, ops: list[str] | None = None) -> int:
    start = time.perf_counter()
    launches = record_all(ops)
    chosen = variants(launches)
    problems = [] if ops else coverage_problems(launches, chosen)
    print(f"{len(launches)} launches recorded, {len(chosen)} distinct compiles x {len(archs)} targets "
          f"(triton {importlib.import_module('triton').__version__})", flush=True)
    results = compile_all(chosen, archs, jobs)
    n = len(chosen)
    for i, r in enumerate(results):
        v = chosen[i % n]
        for p in r.problems():
            problems.append(f"sm_{r.arch} {v.name} [{v.config_str()}; {v.constexpr_str()}; {v.dtype}] "
                            f"({'; '.join(v.cases)}): {p}")
    elapsed = time.perf_counter() - start
    for arch in archs:
        rs = [r for r in results if r.arch == arch and not r.error]
        if rs:
            print(f"sm_{arch}: {len(rs)}/{n} compiled; max shared {max(r.shared for r in rs)} B "
                  f"(limit {SHARED_LIMIT[arch]}), max registers {max(r.registers for r in rs)}, "
                  f"max spill stores {max(r.spill_stores for r in rs)} B")
    print(f"{elapsed:.0f} s, {len(problems)} problem(s)")
    for p in problems:
        print("FAIL", p)
    if write is not None:
        write.write_text(table(chosen, results, archs, elapsed))
        print(f"wrote {write}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compile and check only; write no table")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="target compute capability (repeatable; default 90 and 80)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--out", type=Path, default=RESULT, help="where the table goes")
    parser.add_argument("--op", action="append", choices=sorted(CASES), help="only these ops (repeatable)")
    args = parser.parse_args(argv)
    if "TRITON_INTERPRET" in os.environ:  # kernels must be real JIT functions: start over without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "benchmarks.kernel_resources", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    return run(args.arch or [90, 80], args.jobs, None if args.check else args.out, args.op)


if __name__ == "__main__":
    sys.exit(main())
