"""bmc.backends: lower a transformed graph to something that runs. One registry, by name."""
from __future__ import annotations

import difflib
from typing import Callable

from bmc.errors import BackendError

BACKENDS: dict[str, Callable] = {}


def register_backend(name: str):
    """Decorator for a function `lower(gm, context, **options) -> bmc.Program`."""
    def wrap(fn):
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        BACKENDS[name] = fn
        return fn
    return wrap


def get_backend(name: str) -> Callable:
    _load_builtin()
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, BACKENDS, n=2, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise BackendError(f"unknown backend '{name}'; {hint}known backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def _load_builtin() -> None:
    from bmc.backends import ort_paged, torch_backend  # noqa: F401
