"""Errors bmc raises. Every user-facing failure is a BmcError subclass whose message is one
line that names the problem and, where there is one, the fix; the CLI prints it and exits 2."""


class BmcError(Exception):
    """Base class of every error bmc raises on purpose."""


class TraceError(BmcError):
    """The model could not be captured by torch.export."""


class ZooError(BmcError):
    """An unknown or misconfigured built-in model."""


class PipelineError(BmcError):
    """A pipeline string that does not parse, names an unknown pass, or has a bad option."""


class RequirementError(BmcError):
    """A pass's requirements are not met by the passes that run before it."""


class VerificationError(BmcError):
    """A graph broke an IR invariant (after a pass, or on load)."""


class PassFailure(BmcError):
    """A pass raised while running; the message names the pass and the reproducer, if any."""


class ModelLoadError(BmcError):
    """A model file that is missing, corrupt, of an unknown kind, or refused for safety."""


class BackendError(BmcError):
    """A backend that does not exist or cannot lower the given program."""


class StructureError(BmcError):
    """Structure analysis found something inconsistent (e.g. a head count that does not divide)."""


class ModelSaveError(BmcError):
    """A program that cannot be written (e.g. weights on the meta device)."""


class MissingExtraError(BmcError):
    """An optional package a feature needs is not installed; the message names the extra."""
