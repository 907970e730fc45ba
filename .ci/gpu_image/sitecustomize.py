"""Emulates the bare GPU image in CI: with this folder on PYTHONPATH, Python imports this module at
start-up (in every process, so subprocesses such as torchrun's too), and the optional media and
attention packages that image lacks fail to import as if they were not installed.

    PYTHONPATH=.ci/gpu_image pytest ...

`CROSSMAE_BLOCK_IMPORTS` (comma-separated top-level or dotted names) overrides the list.
"""

import importlib.abc
import os
import sys

BLOCKED = tuple(filter(None, os.environ.get("CROSSMAE_BLOCK_IMPORTS", "av,soundfile,nvidia.dali,xformers,webdataset")
                       .split(",")))


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: emulating the GPU image)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
