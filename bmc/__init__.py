"""bmc: a compiler for big-model systems work on unmodified PyTorch models.

    prog = bmc.compile(model, passes=["cleanup", "analyze"], example_inputs=(x,))
    gm = bmc.trace(model, (x,))                   # the IR: a torch.fx GraphModule

Names that need torch are imported on first use (PEP 562), so a process that only serves an
ort-paged build (`bmc.load(DIR)`, `bmc run DIR`) never imports torch: ~200 MiB less memory.
"""
from __future__ import annotations

import importlib
import sys
import types

from bmc.errors import (BackendError, BmcError, ModelLoadError, ModelSaveError, PassFailure, PipelineError,
                        RequirementError, StructureError, TraceError, VerificationError, ZooError)

_LAZY = {
    "Pass": "bmc.passmgr", "PassContext": "bmc.passmgr", "PassManager": "bmc.passmgr", "PassResult": "bmc.passmgr",
    "parse_pipeline": "bmc.passmgr", "register_pass": "bmc.passmgr", "register_preset": "bmc.passmgr",
    "Program": "bmc.program", "compile": "bmc.program", "trace": "bmc.trace",
    "DistillError": "bmc.distill", "distill": "bmc.distill",
}

__all__ = [
    "BackendError", "BmcError", "ModelLoadError", "ModelSaveError", "PassFailure", "PipelineError",
    "RequirementError", "StructureError", "TraceError", "VerificationError", "ZooError",
    *_LAZY, "load",
]


def load(path: str, **options):
    """Read a program written by `Program.save` or `bmc-opt -o`: a directory built by the
    ort-paged backend (served without importing torch; options: budget, prefetch, threads,
    ...) or a .pt2 archive."""
    import os
    if os.path.isdir(path):
        from bmc.backends.ort_paged import load as load_paged
        return load_paged(path, **options)
    from bmc.program import load as load_program
    return load_program(path, **options)


class _Package(types.ModuleType):
    """bmc.trace and bmc.distill are both a submodule and its function: importing the submodule
    sets the package's attribute to the module, so keep the function there instead (what an
    eager `from bmc.trace import trace` in this file did)."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("trace", "distill") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bmc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
