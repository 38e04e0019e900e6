"""bmc: a compiler for big-model systems work on unmodified PyTorch models.

    prog = bmc.compile(model, passes=["cleanup", "analyze"], example_inputs=(x,))
    gm = bmc.trace(model, (x,))                   # the IR: a torch.fx GraphModule

Names that need torch are imported on first use (PEP 562), so a process that only serves an
ort-paged build (`bmc.load(DIR)`, `bmc run DIR`) never imports torch: ~200 MiB less memory.
"""
from __future__ import annotations

import importlib

from bmc.errors import (BackendError, BmcError, ModelLoadError, ModelSaveError, PassFailure, PipelineError,
                        RequirementError, StructureError, TraceError, VerificationError, ZooError)

_LAZY = {
    "Pass": "bmc.passmgr", "PassContext": "bmc.passmgr", "PassManager": "bmc.passmgr", "PassResult": "bmc.passmgr",
    "parse_pipeline": "bmc.passmgr", "register_pass": "bmc.passmgr", "register_preset": "bmc.passmgr",
    "Program": "bmc.program", "compile": "bmc.program", "trace": "bmc.ir.trace",
    "DistillError": "bmc.compress.distill", "distill": "bmc.compress.distill",
    "check": "bmc.checker", "CheckReport": "bmc.checker",
}
# The modules users import by their short names (`from bmc import zoo, calibration`).
_MODULES = {
    "zoo": "bmc.models.zoo", "trained": "bmc.models.trained", "data": "bmc.models.data",
    "calibration": "bmc.compress.calibration", "evaluate": "bmc.compress.evaluate",
    "kv_cache": "bmc.serve.kv_cache", "generate": "bmc.serve.generate",
    "structure": "bmc.analysis.structure", "cost": "bmc.analysis.cost", "ops": "bmc.ir.ops",
    "serialize": "bmc.ir.serialize", "verify": "bmc.ir.verify",
}

__all__ = [
    "BackendError", "BmcError", "ModelLoadError", "ModelSaveError", "PassFailure", "PipelineError",
    "RequirementError", "StructureError", "TraceError", "VerificationError", "ZooError", *_LAZY, "load",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'bmc' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))


def load(path: str, **options):
    """Read a program written by `Program.save` or `bmc-opt -o`: a .pt2 archive (lowered for
    this process group) or a directory a backend wrote (an ort-paged build is served without
    importing torch; options: budget, prefetch, threads, ...)."""
    import os
    if os.path.isdir(path):
        from bmc.plugins import load_directory
        return load_directory(path, **options)
    from bmc.program import load as load_program
    return load_program(path, **options)
