"""Front-end: nn.Module (+ example inputs) -> torch.fx.GraphModule via torch.export.

The graph is the ATen-level, non-strict export of the model (`ep.module()`), so parameters
keep their dotted names as attributes and every node carries `val` and `nn_module_stack`.
Tracing runs under fake tensors, so a model built on the meta device is traced without
allocating its weights.
"""
from __future__ import annotations

import contextlib
import logging
import inspect
import io
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim

from bmc.errors import TraceError

log = logging.getLogger(__name__)

# Names the cost model and the printer use for the symbolic input dimensions.
BATCH, SEQ = "B", "S"


@dataclass(frozen=True)
class TraceInfo:
    """What bmc remembers about how a graph was captured (kept in `gm.meta["bmc.trace"]`)."""

    model_name: str
    args: tuple
    kwargs: dict
    # export's shape symbols (e.g. "s72") -> bmc's names ("B", "S")
    symbols: dict


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept what torch.export accepts: a tuple of positional args or an (args, kwargs) pair."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional args or an (args, kwargs) pair, "
                     f"got {type(example_inputs).__name__}")


def _unalias(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give every example input its own contiguous storage. torch.export treats one tensor
    passed twice (`(x, x)` as inputs and targets) as one input, and the graph then reads the
    first argument for both, whatever is passed later; and a strided view as the example (a
    slice of a bigger batch) leaves guards that fail on every later call with dynamic shapes."""
    seen: set[int] = set()

    def own(value):
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.contiguous()
            key = value.untyped_storage().data_ptr()
            if key in seen and value.numel():
                log.info("an example input shares storage with another; tracing it as a separate input")
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
        return value

    return tuple(own(a) for a in args), {k: own(v) for k, v in kwargs.items()}


def _default_example_inputs(model: torch.nn.Module) -> Any:
    make = getattr(model, "example_inputs", None)
    if callable(make):
        return make()
    raise TraceError(f"{type(model).__name__} has no example inputs: pass example_inputs=(...) "
                     f"or give the model an example_inputs() method")


def dynamic_shapes_spec(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any):
    """dynamic=True marks dims 0 and 1 of every tensor input (batch and sequence) as AUTO:
    export keeps them symbolic where the model allows and specializes them quietly where not."""
    if dynamic is None or dynamic is False:
        return None
    if dynamic is not True:
        return dynamic  # a torch.export dynamic_shapes spec, passed through

    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {d: Dim.AUTO for d in range(min(x.dim(), 2))}
        return None

    if not kwargs:
        return tuple(spec(a) for a in args)
    # with keyword inputs torch.export wants the spec keyed by forward()'s parameter names
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: spec(value) for name, value in bound.items()}


def _symbol_names(gm: torch.fx.GraphModule) -> dict:
    """Map export's shape symbols to B (batch) and S (sequence) by where they first appear:
    dim 0 of the first tensor input is the batch, dim 1 the sequence."""
    names: dict[str, str] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape[:2]):
            if isinstance(size, torch.SymInt):
                sym = str(size.node.expr)
                names.setdefault(sym, (BATCH, SEQ)[dim] if sym.isidentifier() else sym)
    taken: set[str] = set()
    for sym, name in list(names.items()):  # two inputs may differ in length: keep names unique
        names[sym] = name if name not in taken else sym
        taken.add(names[sym])
    return names


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the failure that lies in the user's code, not in torch or bmc."""
    torch_dir = os.path.dirname(torch.__file__)
    bmc_dir = os.path.dirname(__file__)
    frames = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames.extend(traceback.extract_tb(exc.__traceback__))
        exc = exc.__cause__ or exc.__context__
    user = [f for f in frames if not f.filename.startswith((torch_dir, bmc_dir)) and "<" not in f.filename
            and "/site-packages/torch" not in f.filename and "/contextlib.py" not in f.filename]
    return user[-1] if user else None


_HINTS = (
    (("data-dependent", "GuardOnDataDependent", "item()", "nonzero", "Could not guard on data-dependent",
      "Could not extract specialized integer"),
     "data-dependent branch or shape: use torch.cond / torch.where instead of a Python `if` on a tensor, "
     "or torch._check() to state the assumption"),
    (("NotImplementedError", "meta", "fake"),
     "an op without a fake/meta kernel: register one with torch.library.register_fake, or trace on CPU"),
    (("Unsupported", "not supported"),
     "an unsupported Python construct: move it out of forward() or wrap it in a torch.library custom op"),
)


def _hint(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return hint
    return "run torch.export.export(model, args, strict=False) on it to see the full error"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    return head if len(head) <= 200 else head[:197] + "..."


def trace_error(model_name: str, exc: BaseException) -> TraceError:
    frame = _user_frame(exc)
    where = f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
    return TraceError(f"cannot trace {model_name}: {type(exc).__name__}: {_first_line(exc)}{where}; "
                      f"hint: {_hint(exc)}")


@contextlib.contextmanager
def _quiet_torch_logs():
    """When export fails, torch logs and prints (to stderr) the partial graph; bmc reports
    one line instead. What torch writes is kept: replayed on success, logged at DEBUG on
    failure. With bmc's logging at DEBUG nothing is muted."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        log.debug("torch.export wrote:\n%s", captured.getvalue())
        raise
    else:
        sys.stderr.write(captured.getvalue())
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _without_kv_cache(model: torch.nn.Module):
    """Hugging Face models return their KV cache (a DynamicCache, which export cannot put in a
    graph's outputs) when their config says use_cache, as saved checkpoints do. A traced
    graph computes the whole sequence; serving derives its own cache step (bmc/serve)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def trace(model: torch.nn.Module, example_inputs: Any = None, dynamic: Any = None) -> torch.fx.GraphModule:
    """Capture `model` as bmc IR: a GraphModule from non-strict torch.export.

    `example_inputs`: a tuple of positional args or an (args, kwargs) pair; by default the
    model's own `example_inputs()`. `dynamic`: None for static shapes, True to keep batch
    and sequence symbolic, or a torch.export `dynamic_shapes` spec.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"bmc.trace takes an nn.Module, got {type(model).__name__}")
    model_name = type(model).__name__
    if example_inputs is None:
        example_inputs = _default_example_inputs(model)
    args, kwargs = _unalias(*normalize_example_inputs(example_inputs))
    try:
        with _quiet_torch_logs(), _without_kv_cache(model):
            ep = torch.export.export(model, args, kwargs,
                                     dynamic_shapes=dynamic_shapes_spec(model, args, kwargs, dynamic), strict=False)
        gm = ep.module()
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - every export failure becomes one clear TraceError
        raise trace_error(model_name, exc) from exc
    set_trace_info(gm, TraceInfo(model_name, args, kwargs, _symbol_names(gm)))
    log.info("traced %s: %d nodes, %d parameters", model_name, len(gm.graph.nodes),
             sum(1 for _ in gm.parameters()))
    return gm


def trace_info(gm: torch.fx.GraphModule) -> TraceInfo | None:
    return gm.meta.get("bmc.trace")


def set_trace_info(gm: torch.fx.GraphModule, info: TraceInfo | None) -> None:
    """Record (or, with None, forget) how the graph was captured; a graph cut out of another
    (a pipeline stage) carries its source's."""
    if info is None:
        gm.meta.pop("bmc.trace", None)
    else:
        gm.meta["bmc.trace"] = info
