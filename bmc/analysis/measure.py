"""Measure what a training step really holds, beside what the cost model predicts.

Measured: the bytes of the distinct storages behind this rank's parameters, gradients and
optimizer states (fp32 masters included) after an optimizer step, and the bytes autograd
saves for backward in one forward (counted with saved-tensor hooks). Predicted: the cost
model's per-rank expressions evaluated at the same batch, sequence and world size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from bmc.analysis import cost
from bmc.analysis.memory import memory_table
from bmc.compress.calibration import main_output

PARTS = ("params", "grads", "optimizer", "activations")


class SavedBytes:
    """Counts the distinct non-parameter storages autograd saves while the context is open."""

    def __init__(self, parameters):
        self.params = {p.untyped_storage().data_ptr() for p in parameters}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        address = tensor.untyped_storage().data_ptr()
        if address not in self.params and tensor.device.type != "meta":
            self.seen[address] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        from bmc.ir import ops
        ops.SAVED_OBSERVERS.append(self._pack)  # runtimes with their own hooks report here
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from bmc.ir import ops
        self._hooks.__exit__(*exc)
        ops.SAVED_OBSERVERS.remove(self._pack)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def example_batch(gm: fx.GraphModule, batch: int, seq: int | None) -> tuple[tuple, dict]:
    """Inputs shaped like the traced example with dim 0 = batch and dim 1 = seq (token ids
    are zeros: valid for any vocabulary, and the bytes do not depend on the values)."""
    from bmc.ir.trace import trace_info
    info = trace_info(gm)

    def resize(value: Any):
        if not isinstance(value, torch.Tensor):
            return value
        shape = list(value.shape)
        if shape:
            shape[0] = batch
        if len(shape) >= 2 and seq is not None:
            shape[1] = seq
        if value.dtype.is_floating_point:
            return torch.randn(shape, dtype=value.dtype)
        return torch.zeros(shape, dtype=value.dtype)

    return tuple(resize(a) for a in info.args), {k: resize(v) for k, v in info.kwargs.items()}


def measure_step(prog, inputs: tuple[tuple, dict], optimizer_cls=torch.optim.AdamW) -> dict[str, int]:
    """One forward, backward and optimizer step of `prog`; the bytes this rank held."""
    args, kwargs = inputs
    opt = prog.optimizer(optimizer_cls, lr=1e-4)
    with SavedBytes(prog.parameters()) as saved:
        out = prog(*args, **kwargs)
    main_output(out).float().mean().backward()
    opt.step()  # states exist and gradients are still held: the peak of model states
    return {**opt.memory(), "activations": saved.total}


def predicted(gm: fx.GraphModule, setting: cost.Setting) -> dict[str, float]:
    table = memory_table(gm, setting)
    states = table.states_for_plan()
    values = {part: cost.evaluate(getattr(states, part), table.subs) for part in PARTS[:3]}
    values["activations"] = cost.evaluate(cost.activation_bytes(gm), table.subs)
    return values


def format_comparison(measured: dict[str, int], prediction: dict[str, float], title: str = "per-rank bytes") -> str:
    lines = [f"{title:<16}{'measured':>14}{'predicted':>14}{'ratio':>8}"]
    for part in PARTS:
        got, want = measured[part], prediction[part]
        ratio = f"{got / want:8.3f}" if want else f"{'-':>8}"
        lines.append(f"{part:<16}{got:>14,}{int(want):>14,}{ratio}")
    return "\n".join(lines) + "\n"


def resident_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters (a tied weight, or views
    of one storage, count once): what this rank really holds."""
    storages = {}
    for p in module.parameters():
        storage = p.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def tensor_parallel_bound(model: torch.nn.Module, split: set[str], degree: int) -> int:
    """What a tp rank should hold at most: 1/degree of the weights the plan splits, and every
    other parameter whole (by the source model, whose parameters are all whole)."""
    split_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name in split)
    return split_bytes // degree + resident_parameter_bytes(model) - split_bytes
