"""bmc: a compiler for big-model systems work on unmodified PyTorch models.

    prog = bmc.compile(model, passes=["cleanup", "analyze"], example_inputs=(x,))
    gm = bmc.trace(model, (x,))                   # the IR: a torch.fx GraphModule
"""
from bmc.errors import (BackendError, BmcError, ModelLoadError, ModelSaveError, PassFailure, PipelineError,
                        RequirementError, StructureError, TraceError, VerificationError, ZooError)
from bmc.passmgr import Pass, PassContext, PassManager, PassResult, parse_pipeline, register_pass, register_preset
from bmc.program import Program, compile, load
from bmc.distill import DistillError, distill
from bmc.trace import trace

__all__ = [
    "BackendError", "BmcError", "ModelLoadError", "ModelSaveError", "PassFailure", "PipelineError",
    "RequirementError", "StructureError", "TraceError", "VerificationError", "ZooError",
    "Pass", "PassContext", "PassManager", "PassResult", "parse_pipeline", "register_pass", "register_preset",
    "Program", "compile", "load", "trace", "DistillError", "distill",
]
