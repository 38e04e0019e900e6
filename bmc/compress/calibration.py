"""Calibration data: example batches that data-driven passes (Taylor head scores, distillation,
evaluation) run the graph on, checked against the traced example before anything runs.

A batch is what `example_inputs` is: a tuple of positional arguments or an `(args, kwargs)`
pair. From Python, pass any iterable of them (`bmc.compile(..., calibration=batches)`); from
the shell, `bmc-opt --calibration FILE` (or `builtin`, the standard library's sources) cuts
byte-level token windows out of a text.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from bmc.errors import BmcError
from bmc.ir.trace import normalize_example_inputs, trace_info


class CalibrationError(BmcError):
    """Calibration data that does not fit the model."""


def _static_dims(val: Any) -> list[int | None]:
    """The example's dims, None where the trace made them symbolic (any size runs)."""
    return [s if isinstance(s, int) else None for s in val.shape]


def _check_tensor(where: str, got: Any, want: torch.Tensor, dims: list[int | None]) -> None:
    if not isinstance(got, torch.Tensor):
        raise CalibrationError(f"calibration {where} is a {type(got).__name__}, the model takes a tensor there; "
                               f"give batches shaped like the traced example")
    if got.dtype != want.dtype or got.dim() != want.dim():
        raise CalibrationError(f"calibration {where} is {str(got.dtype).removeprefix('torch.')}{list(got.shape)}, "
                               f"the model was traced with {str(want.dtype).removeprefix('torch.')}"
                               f"{list(want.shape)}; give batches of that dtype and rank")
    for axis, (size, fixed) in enumerate(zip(got.shape, dims)):
        if fixed is not None and size != fixed:
            raise CalibrationError(f"calibration {where} has size {size} on dim {axis} where the graph was traced "
                                   f"with a fixed {fixed}; trace with dynamic=True or give batches of that size")


def batches(gm: fx.GraphModule, data: Iterable[Any] | None, what: str) -> list[tuple[tuple, dict]]:
    """The calibration batches as (args, kwargs) pairs, each checked against the traced
    example (dtypes, ranks, and sizes the trace fixed); a clear error naming `what` needs
    them when there are none."""
    if data is None:
        raise CalibrationError(f"{what} needs calibration data: pass calibration=[batch, ...] to bmc.compile "
                               f"(or --calibration FILE|builtin to bmc-opt)")
    found = [normalize_example_inputs(batch) for batch in data]
    if not found:
        raise CalibrationError(f"{what} got an empty calibration set; give at least one batch")
    info = trace_info(gm)
    placeholders = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    if info is None:
        return found
    for index, (args, kwargs) in enumerate(found):
        if len(args) != len(info.args) or set(kwargs) != set(info.kwargs):
            raise CalibrationError(f"calibration batch {index} has {len(args)} positional and {sorted(kwargs)} keyword "
                                   f"inputs, the model takes {len(info.args)} and {sorted(info.kwargs)}")
        examples = list(info.args) + [info.kwargs[k] for k in info.kwargs]
        given = list(args) + [kwargs[k] for k in info.kwargs]
        for position, (got, want) in enumerate(zip(given, examples)):
            if isinstance(want, torch.Tensor):
                val = placeholders[position] if position < len(placeholders) else want
                dims = _static_dims(val) if isinstance(val, torch.Tensor) else list(want.shape)
                _check_tensor(f"batch {index} input {position}", got, want, dims)
    return found


def interpret(gm: fx.GraphModule, interpreter: fx.Interpreter, args: tuple, kwargs: dict):
    """Run the interpreter on the graph's flat inputs and give the output the structure the
    module's forward gives it (export's graphs flatten both through pytree specs)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return interpreter.run(*args, *kwargs.values())
    flat = torch.fx._pytree.tree_flatten_spec((args, kwargs), info.in_spec)
    out = interpreter.run(*flat)
    if info.out_spec is None:
        return out
    leaves = list(out) if isinstance(out, (list, tuple)) else [out]
    return torch.utils._pytree.tree_unflatten(leaves, info.out_spec)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output leads with (a tensor, a tuple's first, HF's logits or loss)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return main_output(out[0])


def lm_loss(out: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """The loss a calibration batch gives: the model's own when it returns a scalar, else
    next-token cross-entropy of its logits on its token ids (a causal LM's loss)."""
    result = main_output(out)
    if result.dim() == 0:
        return result
    ids = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)
                and not t.is_floating_point() and t.dim() == 2), None)
    if result.dim() != 3 or ids is None or tuple(ids.shape) != tuple(result.shape[:2]):
        raise CalibrationError("this model returns neither a scalar loss nor [batch, seq, vocab] logits over its "
                               "token ids, so calibration has no loss to differentiate: trace it with targets")
    return F.cross_entropy(result[:, :-1].reshape(-1, result.size(-1)).float(), ids[:, 1:].reshape(-1))


def text_batches(path: str | None, *, count: int, batch: int, seq: int, seed: int = 0,
                 vocab: int = 256) -> list[tuple[torch.Tensor]]:
    """`count` batches of byte-token windows [batch, seq] from a text file (None: the
    standard library's sources), drawn from the training part of the text."""
    from bmc.models import data
    if vocab < data.VOCAB:
        raise CalibrationError(f"text calibration is byte-level (256 token ids), the model's vocabulary has {vocab}; "
                               f"pass batches from Python instead")
    stream = data.Batches(data.split(data.text_tokens(path)).train, batch, seq - 1, seed=seed)
    out = []
    for step in range(count):
        inputs, targets = stream.local(step)
        out.append((torch.cat([inputs, targets[:, -1:]], dim=1),))
    return out
