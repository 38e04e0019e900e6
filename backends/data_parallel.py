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

from bmc import ir
from bmc.ir import ops

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
    entries: list[tuple[Entry, torch.Tensor]] = field(default_factory=list)  # (entry, flat gradient)
    nbytes: int = 0


def _owner(gm: fx.GraphModule, dotted: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, leaf = dotted.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), leaf


class DataParallelRuntime:
    """Holds this rank's view of the data-parallel plan and does its communication (the
    optimizer's side is backends/optimizer.py)."""

    def __init__(self, gm: fx.GraphModule, process_group, bucket_mb: float = 25.0, prefetch: int = 0,
                 modules: list[fx.GraphModule] | None = None):
        self.gm = gm
        self.modules = modules or [gm]  # the graphs this rank runs (its pipeline stages under pp)
        # under pp a step's microbatches accumulate into .grad before anything is reduced:
        # the hooks wait, and queue_accumulated() reduces the sums
        self.accumulating = False
        self.pg = process_group
        self.rank, self.size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.entries = self._collect()
        self._bucket = Bucket()
        self._pending: list[tuple[object, torch.Tensor, list[Entry]]] = []
        self.synced = True  # no gradients waiting to be reduced
        self.synced_stage3 = False
        self._broadcast_initial_weights()
        for entry in self.entries:
            if entry.stage == 3:
                self._shard_in_place(entry)
            else:
                entry.param.register_post_accumulate_grad_hook(self._make_hook(entry))
        self._by_shard = {id(e.param): e for e in self.entries if e.stage == 3}
        self.prefetcher = self._prefetcher(prefetch)

    def _prefetcher(self, depth: int) -> "Prefetcher | None":
        """ZeRO-3's prefetch (it learns the order the weights are gathered in)."""
        if depth <= 0 or not any(e.stage == 3 for e in self.entries):
            return None
        return Prefetcher(self.pg, depth)

    # ---------------------------------------------------------------- setup

    def _collect(self) -> list[Entry]:
        entries, seen = [], set()
        for module in self.modules:
            for name, node in ir.parameter_nodes(module).items():
                plan = ir.get(node, ir.Zero)
                param = module.get_parameter(name) if plan is not None else None
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
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
            if not self.accumulating:
                self._add_to_bucket(entry, param.grad)
        return hook

    def queue_accumulated(self) -> None:
        """Reduce the gradients accumulated over a pipelined step's microbatches."""
        for entry in self.entries:
            if entry.stage != 3 and entry.param.grad is not None:
                self._add_to_bucket(entry, entry.param.grad)

    def reduce_gathered_gradient(self, shard_key: int, grad: torch.Tensor) -> bool:
        """ZeRO-3: a gathered weight's full gradient, from bmc::gather_param's backward, joins
        the bucket (reduce-scattered asynchronously with the rest of it) instead of being
        reduce-scattered on its own while backward waits."""
        entry = self._by_shard.get(shard_key)
        if entry is None:
            return False
        self._add_to_bucket(entry, grad)
        return True

    def _add_to_bucket(self, entry: Entry, grad: torch.Tensor) -> None:
        self.synced = False
        self._bucket.entries.append((entry, grad.reshape(-1)))
        self._bucket.nbytes += grad.numel() * grad.element_size()
        if self._bucket.nbytes >= self.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        """Launch the reduction of the filled bucket; backward goes on meanwhile."""
        bucket, self._bucket = self._bucket, Bucket()
        reduced = [(e, g) for e, g in bucket.entries if e.stage in (0, 1)]
        scattered = [(e, g) for e, g in bucket.entries if e.stage in (2, 3)]
        if reduced:
            self._all_reduce(reduced)
        if scattered:
            self._reduce_scatter(scattered)

    def _all_reduce(self, members: list[tuple[Entry, torch.Tensor]]) -> None:
        flat = torch.cat([g for _, g in members])
        work = dist.all_reduce(flat, group=self.pg, async_op=True)
        self._pending.append((work, flat, [e for e, _ in members]))

    def _reduce_scatter(self, members: list[tuple[Entry, torch.Tensor]]) -> None:
        # lay the bucket out rank-major so rank r receives its slice of every parameter
        pieces = [torch.cat([_padded(g, e.local * self.size)[r * e.local:(r + 1) * e.local] for e, g in members])
                  for r in range(self.size)]
        send = torch.cat(pieces)
        out = torch.empty(send.numel() // self.size, dtype=send.dtype, device=send.device)
        work = dist.reduce_scatter_single(out, send, group=self.pg, async_op=True)
        for e, _ in members:
            if e.stage == 2:
                e.param.grad = None  # ZeRO-2: the full gradient is not kept
        self._pending.append((work, out, [e for e, _ in members]))

    def finish_gradient_sync(self) -> None:
        """Wait for every reduction; leave averaged gradients where the optimizer reads them.
        Idempotent until the next backward."""
        unreduced = any(e.stage == 3 and e.param.grad is not None for e in self.entries) and not self.synced_stage3
        if self.synced and not unreduced:
            return
        self._flush()
        for e in self.entries:
            if e.stage == 3 and e.param.grad is not None and not self.synced_stage3:
                # reduce-scattered one by one (a gradient the runtime did not bucket): summed
                e.param.grad.div_(self.size)
        for work, flat, members in self._pending:
            work.wait()
            flat.div_(self.size)
            offset = 0
            for e in members:
                n = e.numel if e.stage in (0, 1) else e.local
                self._receive(e, flat[offset:offset + n])
                offset += n
        self._pending.clear()
        self.synced = True
        self.synced_stage3 = True

    @staticmethod
    def _receive(e: Entry, piece: torch.Tensor) -> None:
        """The averaged gradient (stages 0-1: all of it; 2-3: this rank's slice) where the
        optimizer reads it, added to what an earlier backward left (gradient accumulation)."""
        if e.stage in (0, 1):
            e.param.grad.copy_(piece.view(e.shape))
        elif e.stage == 2:
            e.shard_grad = piece if e.shard_grad is None else e.shard_grad + piece
        elif e.param.grad is None:
            e.param.grad = piece.view(e.param.shape)
        else:
            e.param.grad.add_(piece.view(e.param.shape))

    def new_backward(self) -> None:
        """Gradients were cleared: the next ones need reducing (and ZeRO-3's averaging)."""
        self.synced = True
        self.synced_stage3 = False

    def clear_gradients(self) -> None:
        """Every gradient this runtime holds dropped, full and sharded, before a new backward."""
        self.new_backward()
        for e in self.entries:
            e.param.grad = None
            e.shard_grad = None

    @staticmethod
    def sharded_gradient(e: Entry) -> torch.Tensor | None:
        """ZeRO-2/3: this rank's flat slice of the averaged gradient after sync (zero-padded
        at the end); None for the stages that keep it whole."""
        if e.stage == 3 and e.param.grad is not None:
            return e.param.grad.reshape(-1)
        return e.shard_grad if e.stage == 2 else None

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


@dataclass
class _GatherGroup:
    """One all-gather of several weights' shards, concatenated: fewer, larger collectives."""

    work: object
    out: torch.Tensor  # [ranks, sum of the members' shard sizes], filled when work completes
    offsets: dict[int, tuple[int, int]]  # _key(shard) -> (start, numel) within a rank's row
    waited: bool = False

    def full(self, key: int) -> torch.Tensor:
        """One member's all-gathered flat shards, rank-major (what a lone all-gather gives)."""
        if not self.waited:
            self.work.wait()
            self.waited = True
        start, numel = self.offsets.pop(key)
        # a weight of its own (never a view of the group's buffer, which is freed once every
        # member is taken, and whose lifetime the gather tracker could not follow per weight)
        piece = self.out[:, start:start + numel]
        return piece.clone().view(-1) if piece.is_contiguous() else piece.reshape(-1)


def _key(shard: torch.Tensor) -> int:
    """A weight's identity that survives detaching and aliasing (torch.utils.checkpoint hands
    a recomputed region new tensor objects for the same shards): its storage."""
    return shard.untyped_storage().data_ptr()


class Prefetcher:
    """Starts the all-gathers of the next ZeRO-3 weights while the current one is used, so
    communication overlaps compute. The order is recorded in the first step, for forward and
    for backward (re-gathers of saved weights, recomputed regions) apart, and followed from
    then on. At most `depth` weights are in flight; they are started in groups, one
    collective for several weights, whenever half the window has been used (each collective
    costs a synchronization). What is still in flight when the weights change (an optimizer
    step) is dropped."""

    def __init__(self, process_group, depth: int):
        self.orders: dict[str, list[torch.Tensor] | None] = {"forward": None, "backward": None}
        self.pg, self.depth = process_group, depth
        self.size = dist.get_world_size(process_group)
        self.in_flight: dict[int, _GatherGroup] = {}  # _key(shard) -> its group
        self.phase, self.position = "forward", -1
        self.recording: list[torch.Tensor] | None = None
        self.hits = 0  # gathers served by a prefetch

    def begin(self, phase: str) -> None:
        """A forward or a backward starts (the program calls this around its forward)."""
        self._finish_recording()
        self.phase, self.position = phase, -1
        if self.orders[phase] is None:
            self.recording = []

    def _finish_recording(self) -> None:
        if self.recording:
            self.orders[self.phase] = self.recording
        self.recording = None

    def take(self, shard: torch.Tensor) -> torch.Tensor | None:
        key = _key(shard)
        group = self.in_flight.pop(key, None)
        if group is None:
            return None
        self.hits += 1
        return group.full(key)

    def gathered(self, shard: torch.Tensor) -> None:
        if self.recording is not None:
            self.recording.append(shard)
            return
        order = self.orders[self.phase]
        if order is None:
            return
        key = _key(shard)
        at = next((i for i in range(self.position + 1, len(order)) if _key(order[i]) == key), None)
        if at is None:
            return  # not where the recorded order expected it: no guess
        self.position = at
        wanted = order[at + 1:at + 1 + self.depth]
        missing = list({_key(s): s for s in wanted if _key(s) not in self.in_flight and _key(s) != key}.values())
        # refill when half the window is used (or what is left of the order fits in it)
        if missing and (len(missing) >= max(1, self.depth // 2) or at + 1 + self.depth >= len(order)):
            self._start(missing)

    def _start(self, shards: list[torch.Tensor]) -> None:
        flats = [s.detach().reshape(-1) for s in shards]
        send = torch.cat(flats) if len(flats) > 1 else flats[0].contiguous()
        out = torch.empty(self.size, send.numel(), dtype=send.dtype, device=send.device)
        work = dist.all_gather_single(out.view(-1), send, group=self.pg, async_op=True)
        offsets, start = {}, 0
        for s, flat in zip(shards, flats):
            offsets[_key(s)] = (start, flat.numel())
            start += flat.numel()
        group = _GatherGroup(work, out, offsets)
        for s in shards:
            self.in_flight[_key(s)] = group

    def in_flight_bytes(self) -> int:
        groups = {id(g): g for g in self.in_flight.values()}.values()
        return sum(g.out.numel() * g.out.element_size() for g in groups)

    def drop(self) -> None:
        for group in {id(g): g for g in self.in_flight.values()}.values():
            if not group.waited:
                group.work.wait()
        self.in_flight.clear()
        self._finish_recording()
        self.phase, self.position = "forward", -1
