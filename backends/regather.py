"""ZeRO-3's backward without full weights kept alive: autograd's saved tensors that are
gathered parameters are packed as (shard, shape) and gathered again when backward needs them.

torch.autograd.graph.saved_tensors_hooks is the mechanism; bmc::gather_param tells us which
tensors are gathered parameters. Also counts the gathered bytes alive, for tests and reports.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from bmc.ir import ops


@dataclass
class _Regather:
    shard: torch.Tensor
    shape: list
    group: str
    size: torch.Size
    stride: tuple
    offset: int

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            # the parameter itself, not a detached alias: the prefetcher knows weights by identity
            full = torch.ops.bmc.gather_param(self.shard, self.shape, self.group)
        return full.as_strided(self.size, self.stride, self.offset)


class GatherTracker:
    """Knows the gathered parameters alive now and the most bytes ever alive at once."""

    def __init__(self, in_flight_bytes=lambda: 0):
        # gathers started ahead (prefetch) hold memory before they are used: count them too
        self.in_flight_bytes = in_flight_bytes
        self._live: dict[int, tuple] = {}  # storage address -> (weakref to tensor, shard, shape, group)
        self.alive_bytes = 0
        self.peak_bytes = 0
        self.regathered = 0

    def watch(self, full: torch.Tensor, shard: torch.Tensor, shape, group: str) -> None:
        address = full.untyped_storage().data_ptr()
        nbytes = full.untyped_storage().nbytes()
        self._live[address] = (weakref.ref(full), shard, list(shape), group)
        self._add(nbytes)
        weakref.finalize(full, self._release, address, nbytes)

    def _add(self, nbytes: int) -> None:
        self.alive_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes + self.in_flight_bytes())

    def _release(self, address: int, nbytes: int) -> None:
        self.alive_bytes -= nbytes
        self._live.pop(address, None)

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type == "meta":
            return tensor
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:
            # autograd uses only the innermost saved-tensor hooks: tell outer observers
            # (bmc.measure.SavedBytes) about what stays saved
            for observe in ops.SAVED_OBSERVERS:
                observe(tensor)
            return tensor
        _, shard, shape, group = entry
        return _Regather(shard, shape, group, tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack(self, packed):
        if isinstance(packed, _Regather):
            self.regathered += 1
            full = packed.materialize()
            self.watch(full, packed.shard, packed.shape, packed.group)
            return full
        return packed

    @contextlib.contextmanager
    def active(self):
        ops.GATHER_WATCHERS.append(self.watch)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            ops.GATHER_WATCHERS.remove(self.watch)
