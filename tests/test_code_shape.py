"""The package's shape rules: no function in `crossmae_fast/` longer than 80 lines or with more than 10
parameters (a config dataclass carries the rest)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossmae_fast"
MAX_LINES, MAX_PARAMS = 80, 10


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node


def parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
    return len([n for n in names if n not in ("self", "cls")])


def test_functions_are_short_and_take_few_parameters():
    found = list(functions())
    assert len(found) > 100
    long = [f"{name}: {fn.end_lineno - fn.lineno + 1} lines" for name, fn in found
            if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    wide = [f"{name}: {parameters(fn)} parameters" for name, fn in found if parameters(fn) > MAX_PARAMS]
    assert not long + wide, "\n".join(long + wide)
