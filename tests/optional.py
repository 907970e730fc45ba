"""Skips for tests that need packages the bare GPU image lacks (PyAV, soundfile, DALI, xformers).

The package imports them only where it uses them; a test that exercises such code says so with
`needs(...)` (a mark) or `skip_unless(...)` (inside a fixture), and is skipped with the reason.
"""

from __future__ import annotations

import functools
import importlib

import pytest

MEDIA = ("av", "soundfile")  # reading and writing audio/video files


@functools.cache
def _error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} ({e})"
    return None


def missing(*modules: str) -> str | None:
    """Why `modules` cannot be used here (the ones that fail to import), or None."""
    errors = [e for e in map(_error, modules) if e]
    return "needs " + "; ".join(errors) if errors else None


def needs(*modules: str) -> pytest.MarkDecorator:
    reason = missing(*modules)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def skip_unless(*modules: str) -> None:
    if reason := missing(*modules):
        pytest.skip(reason)


needs_media = needs(*MEDIA)
