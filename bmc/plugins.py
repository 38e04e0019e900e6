"""The registries the upper layers fill, and how the core finds them.

The core never imports a pass or a backend. Passes and backends are plugins declared in the
package metadata (pyproject.toml's `bmc.passes` and `bmc.backends` entry points, like pytest's
plugins): the core loads an entry point by name when it needs one, and loading it registers
what it defines. Another package can add passes or backends the same way.

Kept free of torch: a process that only serves an ort-paged build loads that backend alone.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Optional

from bmc.errors import BackendError, BmcError

log = logging.getLogger(__name__)

PASS_GROUP, BACKEND_GROUP = "bmc.passes", "bmc.backends"


@dataclass(frozen=True)
class Backend:
    """A registered backend: `lower(gm, context, **options) -> Program`, optionally `load(path,
    **options)` for the directories it writes, and the graph properties it needs or refuses
    (the pass manager checks them with the pipeline, before any pass runs)."""

    name: str
    lower: Callable
    load: Optional[Callable] = None
    requires: tuple[str, ...] = ()
    refuses: tuple[tuple[str, str], ...] = ()  # (property, why) pairs it cannot lower
    # (property present, property then needed, the fix) triples, e.g. tp-split needs tp-collectives
    implies: tuple[tuple[str, str, str], ...] = ()


BACKENDS: dict[str, Backend] = {}
_loaded_passes = False


def register_backend(name: str, *, load: Callable | None = None, requires=(), refuses=(), implies=()):
    """Decorator for a backend's `lower(gm, context, **options) -> bmc.Program`."""
    def wrap(fn):
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        BACKENDS[name] = Backend(name, fn, load, tuple(requires), tuple(refuses), tuple(implies))
        return fn
    return wrap


def _entry_points(group: str):
    return {ep.name: ep for ep in entry_points(group=group)}


def backend_names() -> list[str]:
    return sorted(set(BACKENDS) | set(_entry_points(BACKEND_GROUP)))


def get_backend(name: str) -> Backend:
    """The backend registered under `name`, loading its plugin on first use."""
    if name not in BACKENDS:
        found = _entry_points(BACKEND_GROUP).get(name)
        if found is not None:
            found.load()
    if name not in BACKENDS:
        known = backend_names()
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise BackendError(f"unknown backend '{name}'; {hint}known backends: {', '.join(known) or 'none'} "
                           f"(is bmc installed? pip install -e .)")
    return BACKENDS[name]


def load_passes() -> None:
    """Load every pass plugin (each registers its passes and presets with the pass manager)."""
    global _loaded_passes
    if _loaded_passes:
        return
    found = list(_entry_points(PASS_GROUP).values())
    if not found:
        raise BmcError("no bmc passes are installed (the bmc.passes entry point is missing): "
                           "install bmc with pip install -e .")
    for ep in found:
        ep.load()
    _loaded_passes = True


def load_directory(path: str, **options):
    """A program directory a backend wrote: its manifest names the backend (ort-paged builds
    written before manifests named one are ort-paged)."""
    import json
    import os
    manifest = os.path.join(path, "manifest.json")
    name = "ort-paged"
    if os.path.exists(manifest):
        with open(manifest) as f:
            name = json.load(f).get("backend", name)
    backend = get_backend(name)
    if backend.load is None:
        raise BackendError(f"{path} was written by the {name} backend, which cannot load programs")
    return backend.load(path, **options)
