"""bmc: a compiler for big-model systems work on unmodified PyTorch models."""
from bmc.errors import (BackendError, BmcError, ModelLoadError, PassFailure, PipelineError,
                        RequirementError, TraceError, VerificationError, ZooError)
