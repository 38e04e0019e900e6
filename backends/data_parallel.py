"""Runtime of the dp and zero passes on torch.distributed: gradient reduction overlapped with
backward, the sharded optimizer, and ZeRO-3's parameter shards.

Every trainable parameter carries a `bmc.zero` annotation (stage 0 = plain data parallel).
Parameters are flattened and padded so each of the N ranks owns one contiguous 1/N slice;
optimizer states exist only for that slice from stage 1 on, gradients only for it from stage 2
on (reduce-scattered), weights only for it at stage 3 (gathered by bmc::gather_param before use
and gathered again in backward instead of being kept).

Why not torch's DDP / ZeroRedundancyOptimizer / FSDP: the plan is per parameter and comes
from the graph's annotations, and ZeRO-3 here is graph collectives rather than module hooks;
the collectives themselves are torch.distributed's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx

from bmc import ir, ops

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One trainable parameter's data-parallel state on this rank."""

    name: str
    stage: int
    numel: int
    shape: tuple[int, ...]
    local: int  # elements in this rank's flat shard
    param: torch.nn.Parameter  # the module's parameter: full (stages 0-2) or the shard (3)
    shard: torch.nn.Parameter | None = None  # what the optimizer steps (stages 1-2)
    shard_grad: torch.Tensor | None = None  # stage 2: this rank's slice of the reduced gradient


@dataclass
class Bucket:
    entries: list[Entry] = field(default_factory=list)
    nbytes: int = 0


def _owner(gm: fx.GraphModule, dotted: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, leaf = dotted.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), leaf


class DataParallelRuntime:
    """Holds this rank's view of the data-parallel plan and does its communication (the
    optimizer's side is backends/optimizer.py)."""

    def __init__(self, gm: fx.GraphModule, process_group, bucket_mb: float = 25.0, prefetch: int = 0):
        self.gm = gm
        self.pg = process_group
        self.rank, self.size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.entries = self._collect()
        self._bucket = Bucket()
        self._pending: list[tuple[object, torch.Tensor, list[Entry], int]] = []
        self.synced = True  # no gradients waiting to be reduced
        self.synced_stage3 = False
        self._broadcast_initial_weights()
        for entry in self.entries:
            if entry.stage == 3:
                self._shard_in_place(entry)
            else:
                entry.param.register_post_accumulate_grad_hook(self._make_hook(entry))
        self.prefetcher = self._prefetcher(prefetch)

    def _prefetcher(self, depth: int) -> "Prefetcher | None":
        """Weights in the order the graph gathers them, for ZeRO-3's prefetch."""
        if depth <= 0 or not any(e.stage == 3 for e in self.entries):
            return None
        gathers = self.gm.graph.find_nodes(op="call_function", target=torch.ops.bmc.gather_param.default)
        shards = [self.gm.get_parameter(str(n.args[0].target)) for n in gathers]
        return Prefetcher(shards, self.pg, depth)

    # ---------------------------------------------------------------- setup

    def _collect(self) -> list[Entry]:
        entries = []
        for name, node in ir.parameter_nodes(self.gm).items():
            plan = ir.get(node, ir.Zero)
            if plan is None:
                continue
            param = self.gm.get_parameter(name)
            entries.append(Entry(name, plan.stage, param.numel(), tuple(param.shape),
                                 ops.shard_numel(param.numel(), self.size), param))
        return entries

    def _broadcast_initial_weights(self) -> None:
        """Every rank starts from rank 0's weights, whatever seed each process used."""
        source = dist.get_global_rank(self.pg, 0)
        for entry in self.entries:
            dist.broadcast(entry.param.data, src=source, group=self.pg)

    def owned_range(self, entry: Entry) -> tuple[int, int]:
        """[start, end) of the flat parameter this rank owns (shorter at the end, maybe empty)."""
        start = min(self.rank * entry.local, entry.numel)
        return start, min(start + entry.local, entry.numel)

    def my_slice(self, entry: Entry, flat: torch.Tensor) -> torch.Tensor:
        """This rank's part of a flat full-size tensor (zero-padded at the end)."""
        start = self.rank * entry.local
        piece = flat[start:start + entry.local]
        if piece.numel() < entry.local:
            piece = torch.cat([piece, flat.new_zeros(entry.local - piece.numel())])
        return piece

    def _shard_in_place(self, entry: Entry) -> None:
        shard = torch.nn.Parameter(self.my_slice(entry, entry.param.detach().reshape(-1)).clone())
        # a tied weight is one Parameter under several names: every name gets the shard
        aliases = [name for name, p in self.gm.named_parameters(remove_duplicate=False) if p is entry.param]
        for name in aliases:
            owner, leaf = _owner(self.gm, name)
            setattr(owner, leaf, shard)
        entry.param = shard

    # ---------------------------------------------------------------- gradients

    def _make_hook(self, entry: Entry):
        def hook(param: torch.Tensor) -> None:
            self.synced = False
            self._bucket.entries.append(entry)
            self._bucket.nbytes += param.grad.numel() * param.grad.element_size()
            if self._bucket.nbytes >= self.bucket_bytes:
                self._flush()
        return hook

    def _flush(self) -> None:
        """Launch the reduction of the filled bucket; backward goes on meanwhile."""
        bucket, self._bucket = self._bucket, Bucket()
        if not bucket.entries:
            return
        for stage_group in (0, 2):
            members = [e for e in bucket.entries if (e.stage == 2) == (stage_group == 2)]
            if members:
                self._launch(members, scatter=stage_group == 2)

    def _launch(self, members: list[Entry], scatter: bool) -> None:
        grads = [e.param.grad.reshape(-1) for e in members]
        if scatter:
            # lay the bucket out rank-major so rank r receives its slice of every parameter
            pieces = [torch.cat([_padded(g, e.local * self.size)[r * e.local:(r + 1) * e.local]
                                 for g, e in zip(grads, members)]) for r in range(self.size)]
            send = torch.cat(pieces)
            out = torch.empty(send.numel() // self.size, dtype=send.dtype)
            work = dist.reduce_scatter_single(out, send, group=self.pg, async_op=True)
            for e in members:
                e.param.grad = None  # ZeRO-2: the full gradient is not kept
            self._pending.append((work, out, members, 2))
        else:
            flat = torch.cat(grads)
            work = dist.all_reduce(flat, group=self.pg, async_op=True)
            self._pending.append((work, flat, members, 0))

    def finish_gradient_sync(self) -> None:
        """Wait for every reduction; leave averaged gradients where the optimizer reads them.
        Idempotent until the next backward."""
        if self.synced and not any(e.stage == 3 and e.param.grad is not None for e in self.entries):
            return
        self._flush()
        for work, flat, members, kind in self._pending:
            work.wait()
            flat.div_(self.size)
            offset = 0
            for e in members:
                n = e.local if kind == 2 else e.numel
                piece = flat[offset:offset + n]
                offset += n
                if kind == 2:
                    e.shard_grad = piece
                else:
                    e.param.grad.copy_(piece.view(e.shape))
        self._pending.clear()
        for e in self.entries:
            if e.stage == 3 and e.param.grad is not None and not self.synced_stage3:
                e.param.grad.div_(self.size)  # gather_param's backward summed over ranks
        self.synced = True
        self.synced_stage3 = True

    def new_backward(self) -> None:
        """Gradients were cleared: the next ones need reducing (and ZeRO-3's averaging)."""
        self.synced = True
        self.synced_stage3 = False

    def owned_gradients(self) -> list[torch.Tensor]:
        """The gradients this rank owns after sync; together the ranks own each element once."""
        owned = []
        for e in self.entries:
            if e.stage == 3 and e.param.grad is not None:
                owned.append(e.param.grad)
            elif e.stage == 2 and e.shard_grad is not None:
                owned.append(e.shard_grad)
            elif e.stage in (0, 1) and e.param.grad is not None:
                start, end = self.owned_range(e)
                owned.append(e.param.grad.view(-1)[start:end])
        return owned


def _padded(flat: torch.Tensor, size: int) -> torch.Tensor:
    if flat.numel() == size:
        return flat
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


class Prefetcher:
    """Starts the all-gathers of the next `depth` ZeRO-3 weights (in forward order, or in
    reverse during backward's re-gathers) as soon as one is gathered, so communication
    overlaps the compute that uses the current one. At most `depth` gathers are in flight;
    what is still in flight when the weights change (an optimizer step) is dropped."""

    def __init__(self, shards: list[torch.Tensor], process_group, depth: int):
        self.order = {id(s): i for i, s in enumerate(shards)}
        self.shards = shards
        self.pg, self.depth = process_group, depth
        self.size = dist.get_world_size(process_group)
        self.in_flight: dict[int, tuple[object, torch.Tensor]] = {}
        self.last = -1
        self.hits = 0  # gathers served by a prefetch

    def take(self, shard: torch.Tensor) -> torch.Tensor | None:
        entry = self.in_flight.pop(id(shard), None)
        if entry is None:
            return None
        work, out = entry
        work.wait()
        self.hits += 1
        return out

    def gathered(self, shard: torch.Tensor) -> None:
        index = self.order.get(id(shard))
        if index is None:
            return
        step = 1 if index >= self.last else -1
        self.last = index
        for ahead in range(1, self.depth + 1):
            j = index + step * ahead
            if 0 <= j < len(self.shards) and id(self.shards[j]) not in self.in_flight:
                self._start(self.shards[j])

    def _start(self, shard: torch.Tensor) -> None:
        out = torch.empty(shard.numel() * self.size, dtype=shard.dtype, device=shard.device)
        work = dist.all_gather_single(out, shard.detach().contiguous().reshape(-1), group=self.pg, async_op=True)
        self.in_flight[id(shard)] = (work, out)

    def in_flight_bytes(self) -> int:
        return sum(out.numel() * out.element_size() for _, out in self.in_flight.values())

    def drop(self) -> None:
        for work, _ in self.in_flight.values():
            work.wait()
        self.in_flight.clear()
        self.last = -1
