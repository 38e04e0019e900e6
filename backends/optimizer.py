"""The optimizer a program hands out (`prog.optimizer(torch.optim.AdamW, lr=...)`).

It wraps a torch optimizer and steps exactly what this rank owns, as the passes planned it:
- data parallel (backends/data_parallel.py): full parameters at stage 0, this rank's flat slice
  from stage 1 on (a view into the full weight at stages 1-2, the ZeRO-3 shard at stage 3);
  after the step, stages 1-2 all-gather the updated slices;
- amp: the parameters are bf16/fp16, the optimizer steps fp32 master copies of what this rank
  owns, and writes the result back in the low dtype;
- fp16: the gradients arrive multiplied by the loss scale; they are unscaled into the masters,
  a step whose gradients overflowed on any rank is skipped, and the scale is updated with
  torch's own amp kernels (GradScaler's state machine: backoff on overflow, growth after
  `growth_interval` clean steps). torch.amp.GradScaler itself is not used because it scales
  the loss in the script and reads the optimizer's parameters' gradients, which here are
  the masters, fed from sharded and reduced low-precision gradients.
- insert-offload{what=optimizer}: masters and optimizer states live in CPU memory and the
  step runs there (ZeRO-Offload); only the updated weights go back to the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from bmc import ir
from bmc.backends.data_parallel import _padded

log = logging.getLogger(__name__)


@dataclass
class Target:
    """One tensor the optimizer updates, in the model's dtype, and how to find its gradient."""

    tensor: torch.Tensor  # a parameter, or a view of this rank's slice of one
    entry: object = None  # its data-parallel Entry, if planned
    master: torch.nn.Parameter | None = None  # fp32 (amp) and/or CPU (offload) copy that is stepped

    @property
    def stepped(self) -> torch.Tensor:
        return self.master if self.master is not None else self.tensor


class LossScaler:
    """Dynamic loss scale kept in the program's buffers (so checkpoints carry it)."""

    def __init__(self, gm: fx.GraphModule, amp: ir.AmpPlan, group=None):
        self.scale = getattr(gm, amp.scale_buffer)
        self.growth = getattr(gm, amp.growth_buffer)
        self.growth_interval = amp.growth_interval
        self.group = group
        self.skipped = 0

    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide `grads` by the scale in place; True if any rank saw inf or nan."""
        found = torch.zeros(1, device=self.scale.device)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, group in by_device.items():
            found_here = torch.zeros(1, device=device)
            inv = self.scale.double().reciprocal().float().to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv)
            found += found_here.to(found.device)
        if self.group is not None:
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
        return bool(found.item())

    def update(self, overflowed: bool) -> None:
        found = torch.full((1,), float(overflowed), device=self.scale.device)
        torch._amp_update_scale_(self.scale, self.growth, found, 2.0, 0.5, self.growth_interval)
        if overflowed:
            self.skipped += 1
            log.warning("fp16 gradients overflowed: step skipped, loss scale now %g", self.scale.item())


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class ProgramOptimizer:
    """A torch optimizer over what this rank owns, with masters, loss scaling and offload
    as the program's passes asked for. `runtime` is None for a single-process program."""

    def __init__(self, gm: fx.GraphModule, optimizer_cls, runtime=None, **kwargs):
        self.gm, self.runtime = gm, runtime
        self.group = runtime.pg if runtime is not None else None
        self._tp_replicated_skip = self._tp_replicas(gm)
        amp = ir.get_plan(gm, ir.AmpPlan)
        offload = bool((ir.get_plan(gm, ir.OffloadPlan) or ir.OffloadPlan()).optimizer)
        self.master_dtype = torch.float32 if amp else None
        self.master_device = torch.device("cpu") if offload else None
        self.targets = self._targets()
        if amp or offload:
            for target in self.targets:
                target.master = self._master_of(target.tensor)
        self.scaler = LossScaler(gm, amp, self.group) if amp is not None and amp.dtype == "fp16" else None
        self.optimizer = optimizer_cls([t.stepped for t in self.targets], **kwargs)
        self._prepared = False  # gradients already moved into place (and unscaled) this step
        self._overflowed = False

    @staticmethod
    def _tp_replicas(gm: fx.GraphModule) -> set[int]:
        """Parameters every tp rank holds whole (norms, embeddings): in a global norm only tp
        rank 0 counts them. Empty without tensor parallelism, and on tp rank 0."""
        from bmc.ir import ops
        plan = ir.get_plan(gm, ir.TensorParallelPlan)
        group = ops.GROUPS.get("tp")
        if plan is None or group is None or group.process_group is None or dist.get_rank(group.process_group) == 0:
            return set()
        split = {id(gm.get_parameter(name)) for name in plan.split_params}
        return {id(p) for p in gm.parameters() if id(p) not in split}

    # ---------------------------------------------------------------- what is stepped

    def _targets(self) -> list[Target]:
        runtime = self.runtime
        targets, planned = [], set()
        if runtime is not None:
            for e in runtime.entries:
                planned.add(id(e.param))
                if e.stage in (1, 2):
                    # a view into the full weight: the step updates it in place, no copy is held
                    start, end = runtime.owned_range(e)
                    e.shard = torch.nn.Parameter(e.param.detach().view(-1)[start:end])
                    targets.append(Target(e.shard, e))
                else:
                    targets.append(Target(e.param, e))
        seen = set(planned)
        for p in self.gm.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                targets.append(Target(p))
        return targets

    def _master_of(self, tensor: torch.Tensor) -> torch.nn.Parameter:
        dtype = self.master_dtype or tensor.dtype
        device = self.master_device or tensor.device
        return torch.nn.Parameter(tensor.detach().to(device=device, dtype=dtype, copy=True))

    def _gradient_of(self, target: Target) -> torch.Tensor | None:
        e = target.entry
        if e is None or e.stage in (0, 3):
            return target.tensor.grad
        if e.stage == 1:
            if e.param.grad is None:
                return None
            start, end = self.runtime.owned_range(e)
            return e.param.grad.view(-1)[start:end]
        return None if e.shard_grad is None else e.shard_grad[:target.tensor.numel()]

    def _prepare_gradients(self) -> None:
        """Reduced gradients onto what is stepped; unscaled and checked for overflow (fp16)."""
        if self._prepared:
            return
        if self.runtime is not None:
            if self.runtime.prefetcher is not None:
                self.runtime.prefetcher.drop()  # gathers of the weights this step replaces
            self.runtime.finish_gradient_sync()
        for target in self.targets:
            grad = self._gradient_of(target)
            stepped = target.stepped
            if grad is None:
                stepped.grad = None
            elif target.master is not None:
                stepped.grad = grad.detach().to(device=stepped.device, dtype=stepped.dtype)
            elif stepped.grad is not grad:
                stepped.grad = grad
        if self.scaler is not None:
            grads = [t.stepped.grad for t in self.targets if t.stepped.grad is not None]
            self._overflowed = self.scaler.unscale_(grads)
        self._prepared = True

    # ---------------------------------------------------------------- the torch optimizer API

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.runtime is not None:
            self.runtime.clear_gradients()
        for target in self.targets:
            target.tensor.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._prepared = False

    def step(self, closure=None):
        self._prepare_gradients()
        self._prepared = False
        if self._overflowed:
            self.scaler.update(True)
            self._overflowed = False
            for target in self.targets:
                if target.master is not None:
                    target.master.grad = None
            return None
        result = self.optimizer.step(closure)
        self._write_back()
        if self.scaler is not None:
            self.scaler.update(False)
        return result

    def _write_back(self) -> None:
        with torch.no_grad():
            for target in self.targets:
                if target.master is not None:
                    target.tensor.copy_(target.master)
                    target.master.grad = None  # a transient copy: the model's gradient stays
        if self.runtime is not None:
            self._gather_updated_slices()

    def _gather_updated_slices(self) -> None:
        """Every rank's updated slice into every rank's full weight (padded for the collective)."""
        runtime = self.runtime
        for e in runtime.entries:
            if e.stage not in (1, 2):
                continue
            send = _padded(e.shard.detach(), e.local)
            full = torch.empty(e.local * runtime.size, dtype=send.dtype, device=send.device)
            dist.all_gather_single(full, send, group=runtime.pg)
            with torch.no_grad():
                e.param.view(-1).copy_(full[:e.numel])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global norm (over every rank's shards) is at most
        `max_norm`, as torch.nn.utils.clip_grad_norm_ does for one process; returns the norm
        (inf when fp16 gradients overflowed; the step is then skipped)."""
        self._prepare_gradients()
        owned = [g for g in (self._owned_part(t) for t in self.targets) if g is not None]
        squares = torch.stack([g.float().square().sum().cpu() for g in owned]).sum() if owned else torch.zeros(())
        if self.group is not None or ir.get_plan(self.gm, ir.TensorParallelPlan) or ir.get_plan(self.gm, ir.PipelinePlan):
            dist.all_reduce(squares)  # every rank's owned part: the dp shards and the tp slices
        norm = squares.sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for target in self.targets:
            if target.stepped.grad is not None:
                target.stepped.grad.mul_(scale.to(target.stepped.grad.device))
        return norm

    def _owned_part(self, target: Target) -> torch.Tensor | None:
        """The gradient elements this rank accounts for; together the ranks cover each once."""
        grad = target.stepped.grad
        param = target.entry.param if target.entry is not None else target.tensor
        if grad is None or id(param) in self._tp_replicated_skip or id(param) in getattr(self.gm, "norm_skip_ids", ()):
            return None
        if self.runtime is None:
            return grad
        e = target.entry
        if e is None:  # replicated and unplanned: rank 0 counts it
            return grad if self.runtime.rank == 0 else None
        if e.stage == 0:
            start, end = self.runtime.owned_range(e)
            return grad.view(-1)[start:end]
        return grad

    # ---------------------------------------------------------------- measurement and state

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now: weights, gradients and optimizer states (masters
        included), each storage once."""
        params = list(self.gm.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if self.runtime is not None:
            grads += [e.shard_grad for e in self.runtime.entries if e.shard_grad is not None]
        masters = [t.master for t in self.targets if t.master is not None]
        grads += [m.grad for m in masters if m.grad is not None]
        states = [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return {"params": storage_bytes(params), "grads": storage_bytes(grads),
                "optimizer": storage_bytes(states + masters)}

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else self.scaler.scale.item()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)

