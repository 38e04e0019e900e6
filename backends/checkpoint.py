"""Sharded checkpoints of a program and its optimizer with torch.distributed.checkpoint.

Every rank writes what it owns. Each parameter (and each optimizer state and fp32 master)
is saved flat, as one 1-D tensor of the whole (unsharded) parameter's numel: a replicated one
as a plain tensor (DCP writes it once), anything less (a ZeRO shard, a tp slice, a ZeRO shard
of a tp slice) as the (offset, size) pieces of that flat tensor this rank holds. Loading asks
for this program's pieces, whatever the writer's plan was, so a checkpoint written by N ranks
under one plan (dp, zero, tp, pp or their composition) loads on M ranks under another; DCP
reads the overlapping pieces. Under pp a rank saves and loads only its stages' state; a tied
weight that stages on several ranks hold is one entry, written once.

A save goes to `<root>/step-<N>.partial/` and is published by renaming it to
`<root>/step-<N>/` and pointing `<root>/latest` at it (a file replaced atomically), after
every rank has finished writing. A crash at any moment leaves the previous checkpoint and
`latest` as they were; a leftover `.partial` is ignored and replaced by the next save.
`manifest.json` beside the data names the model's parameters and shapes, the pipeline and
the world size, so loading another model's checkpoint is a clear error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from bmc import ir
from bmc.errors import BmcError
from bmc.ir.serialize import atomic_write_text
from bmc.models.weights import MANIFEST, latest_checkpoint

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(BmcError):
    """A checkpoint that is missing, unreadable or written for another model."""


# ------------------------------------------------------------------ layout of one rank


def _distributed(prog) -> bool:
    return getattr(prog, "mesh", None) is not None and dist.is_initialized()


def _canonical_names(gm) -> dict[int, str]:
    """Parameter identity -> its first dotted name (a tied weight is saved once)."""
    names: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _rank_modules(prog) -> list:
    """The modules whose state this rank owns: its pipeline stages under pp (the whole graph
    module holds every stage's weights, stale outside this rank's), else the graph module."""
    pipe = getattr(prog, "pipe", None)
    return list(pipe.modules) if pipe is not None else [prog.graph_module]


def _runs(layout: ir.Layout, local_shape: tuple[int, ...], rank: int, degree: int) -> list[tuple[int, int, int]]:
    """(local flat offset, full flat offset, length) of each contiguous run of a tp rank's
    slice inside the full weight, in local order: one per segment for a split along dim 0,
    one per segment and outer row otherwise (a fused qkv slice is never one block)."""
    dim = layout.dim % len(local_shape)
    outer, inner = math.prod(local_shape[:dim]), math.prod(local_shape[dim + 1:])
    pieces = [s // degree for s in layout.segments]
    width, full_width = sum(pieces), sum(layout.segments)
    runs = []
    for row in range(outer):
        local, before = row * width * inner, 0
        for segment, piece in zip(layout.segments, pieces):
            runs.append((local, (row * full_width + before + rank * piece) * inner, piece * inner))
            local, before = local + piece * inner, before + segment
    return runs


def _clip(runs: list[tuple[int, int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    """The runs' parts inside local [start, end) (a ZeRO shard of the tp slice), offsets from
    start, adjacent runs merged."""
    out: list[tuple[int, int, int]] = []
    for local, full, length in runs:
        a, b = max(local, start), min(local + length, end)
        if a >= b:
            continue
        if out and out[-1][0] + out[-1][2] == a - start and out[-1][1] + out[-1][2] == full + a - local:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + b - a)
        else:
            out.append((a - start, full + a - local, b - a))
    return out


def _chunks(flat: torch.Tensor, runs: list[tuple[int, int, int]], numel: int):
    """`flat`'s runs as pieces of a 1-D tensor of `numel` elements, for DCP.

    A ShardedTensor, not a DTensor: a DTensor describes one regular block per rank, and a tp
    slice (every segment of a fused weight, every row of a split along dim 1) and a ZeRO shard
    of one are several irregular pieces; DCP saves and loads a ShardedTensor's local shards
    as explicit (offset, size) chunks, each a view of `flat`, so a load writes in place. DCP
    reads only the local shards and the global size: the metadata's other entries, placed on
    another rank, cover the rest only to satisfy ShardedTensor's coverage check."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    rank = dist.get_rank()
    place, elsewhere = f"rank:{rank}/{flat.device}", f"rank:{(rank + 1) % dist.get_world_size()}/{flat.device}"
    local = [Shard(flat[lo:lo + n], ShardMetadata([full], [n], place)) for lo, full, n in runs]
    covered, gaps = 0, []
    for _, full, n in sorted(runs, key=lambda r: r[1]):
        if full > covered:
            gaps.append(ShardMetadata([covered], [full - covered], elsewhere))
        covered = full + n
    if covered < numel:
        gaps.append(ShardMetadata([covered], [numel - covered], elsewhere))
    shards = [s.metadata for s in local] + gaps
    properties = TensorProperties(dtype=flat.dtype, layout=torch.strided, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    metadata = ShardedTensorMetadata(shards, torch.Size([numel]), properties)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata,
                                                                     sharding_spec=EnumerableShardingSpec(shards))


class _Layout:
    """How this rank's tensors map onto the checkpoint's flat, full-size tensors."""

    def __init__(self, prog):
        self.prog = prog
        gm = prog.graph_module
        distributed = _distributed(prog)
        self.runtime = getattr(prog, "runtime", None) if distributed else None
        self.entries = {id(e.param): e for e in self.runtime.entries} if self.runtime else {}
        self.names = _canonical_names(gm)
        tp = ir.get_plan(gm, ir.TensorParallelPlan) if distributed else None
        self.tp_degree = tp.degree if tp else 1
        self.tp_rank = prog.mesh.get_local_rank("tp") if tp and tp.degree > 1 else 0
        self.tp = {id(gm.get_parameter(lay.param)): lay for lay in tp.layouts} if tp and tp.degree > 1 else {}
        modules = _rank_modules(prog)
        self.params = list({id(p): p for m in modules for p in m.parameters()}.values())
        self.buffers = {name: b for m in modules for name, b in m.named_buffers()}

    def local_shape(self, param) -> tuple[int, ...]:
        """Its shape on a tp rank (before ZeRO-3 flattens it)."""
        e = self.entries.get(id(param))
        return tuple(e.shape) if e is not None else tuple(param.shape)

    def full_shape(self, param) -> tuple[int, ...]:
        shape = list(self.local_shape(param))
        layout = self.tp.get(id(param))
        if layout is not None:
            shape[layout.dim % len(shape)] *= self.tp_degree
        return tuple(shape)

    def flat(self, param, local: torch.Tensor):
        """`local` (this rank's part of `param`, or of a state shaped like what is stepped)
        as its pieces of the parameter's flat global tensor."""
        e = self.entries.get(id(param))
        flat = local.view(-1)  # a view: a load writes into the tensor itself
        local_numel = math.prod(self.local_shape(param))
        start, end = 0, local_numel
        if not (e is None or e.stage == 0 or (e.stage in (1, 2) and local.numel() == e.numel)):
            start, end = self.runtime.owned_range(e)  # a ZeRO shard (stage 3's is padded)
            flat = flat[:end - start]
        layout = self.tp.get(id(param))
        if layout is None and (start, end) == (0, local_numel):
            return flat  # every rank holds all of it: DCP writes it once
        runs = [(0, 0, local_numel)] if layout is None else \
            _runs(layout, self.local_shape(param), self.tp_rank, self.tp_degree)
        return _chunks(flat, _clip(runs, start, end), math.prod(self.full_shape(param)))


def _model_entries(layout: _Layout) -> dict[str, Any]:
    state = {}
    for param in layout.params:
        state[f"model.{layout.names[id(param)]}"] = layout.flat(param, param.detach())
    for name, buffer in layout.buffers.items():
        state[f"model.{name}"] = buffer
    return state


def _optimizer_entries(layout: _Layout, optimizer) -> dict[str, Any]:
    state = {}
    for target in optimizer.targets:
        param = target.entry.param if target.entry is not None else target.tensor
        name = layout.names[id(param)]
        if target.master is not None:
            state[f"master.{name}"] = layout.flat(param, target.master.detach())
        for key, value in optimizer.optimizer.state.get(target.stepped, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                value = layout.flat(param, value)
            state[f"optim.{name}.{key}"] = value
    return state


def _manifest(layout: _Layout, step: int, extra: dict) -> dict:
    gm = layout.prog.graph_module
    params = {layout.names[id(p)]: [list(layout.full_shape(p)), str(p.dtype).removeprefix("torch.")]
              for p in {id(p): p for p in gm.parameters()}.values()}
    world = dist.get_world_size() if _distributed(layout.prog) else 1
    return {"format": FORMAT, "step": step, "world_size": world, "pipeline": layout.prog.pipeline,
            "parameters": params, "extra": extra}


# ------------------------------------------------------------------ save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(prog) -> None:
    if _distributed(prog):
        dist.barrier()


@contextlib.contextmanager
def _quietly(prog):
    """DCP warns that it assumes one process when torch.distributed is not initialized: for a
    world-size-1 program that is exactly the intent. torch warns at every touch of a
    ShardedTensor that it is deprecated for DTensor: _chunks says why DTensor does not fit."""
    with warnings.catch_warnings():
        if not _distributed(prog):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        yield


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(root: str | Path, prog, optimizer=None, *, step: int, extra: dict | None = None, keep: int = 2) -> Path:
    """Write a checkpoint of `prog` (and `optimizer`) for `step` under `root`; every rank
    calls it. Returns the published directory. The last `keep` checkpoints are kept."""
    root = Path(root)
    final, partial = step_dir(root, step), step_dir(root, step).with_suffix(".partial")
    layout = _Layout(prog)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a crashed save's leftovers
    _barrier(prog)
    with _quietly(prog):
        state = _model_entries(layout)
        if optimizer is not None:
            state.update(_optimizer_entries(layout, optimizer))
        dcp.save(state, checkpoint_id=str(partial), no_dist=not _distributed(prog))
    _barrier(prog)  # every rank's shard is on disk before anything is published
    if _rank() == 0:
        manifest = _manifest(layout, step, extra or {})
        # hyperparameters are the same on every rank: the manifest carries them, as JSON
        manifest["param_groups"] = _param_groups(optimizer) if optimizer is not None else []
        _publish(root, partial, final, manifest)
        _prune(root, keep)
        log.info("checkpoint for step %d written to %s", step, final)
    _barrier(prog)
    return final


def _param_groups(optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params" and _json_value(v)} for group in optimizer.param_groups]


def _json_value(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _publish(root: Path, partial: Path, final: Path, manifest: dict) -> None:
    atomic_write_text(str(partial / MANIFEST), json.dumps(manifest, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    atomic_write_text(str(root / "latest"), final.name)


def _prune(root: Path, keep: int) -> None:
    published = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in published[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ load


latest = latest_checkpoint  # the format's reading side is the core's (bmc/models/weights.py)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a bmc checkpoint (no {MANIFEST}): point at a step-N directory "
                              f"written by bmc, or at its parent to take the latest") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / MANIFEST}: {exc}; the checkpoint is damaged") from None


def _check_same_model(manifest: dict, layout: _Layout, path: Path) -> None:
    mine = _manifest(layout, 0, {})["parameters"]
    theirs = manifest.get("parameters", {})
    for name, (shape, _) in mine.items():
        if name not in theirs:
            raise CheckpointError(f"checkpoint {path} was written for another model: it has no parameter "
                                  f"'{name}'; resume from a checkpoint of this model")
        if list(theirs[name][0]) != list(shape):
            raise CheckpointError(f"checkpoint {path} was written for another model: '{name}' is "
                                  f"{'x'.join(map(str, theirs[name][0]))} there and "
                                  f"{'x'.join(map(str, shape))} here; resume from a checkpoint of this model")
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise CheckpointError(f"checkpoint {path} was written for another model: it has parameter '{extra[0]}' "
                              f"that this one lacks; resume from a checkpoint of this model")


def resolve(path: str | Path) -> Path:
    """A step directory, or a root whose latest checkpoint is meant."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint found at {path}: pass a step-N directory or a root that "
                              f"has a 'latest' file")
    return found


def load(path: str | Path, prog, optimizer=None) -> dict:
    """Load the checkpoint at `path` (a step directory or a root) into `prog` and
    `optimizer`, whatever world size and plan wrote it. Returns its manifest."""
    path = resolve(path)
    manifest = read_manifest(path)
    layout = _Layout(prog)
    _check_same_model(manifest, layout, path)
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    with _quietly(prog):
        state = _model_entries(layout)
        if optimizer is not None:
            _allocate_optimizer_state(layout, optimizer, saved)
            state.update(_optimizer_entries(layout, optimizer))
    missing = sorted(k for k in state if k not in saved)
    if missing:
        # a plan that keeps more than the writer did (fp32 masters, the loss scale): those start
        # from the loaded weights and the pass's defaults
        log.info("not in the checkpoint, left as initialized: %s", ", ".join(missing[:5]))
    state = {k: v for k, v in state.items() if k in saved}
    with torch.no_grad(), _quietly(prog):
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed(prog))
    if optimizer is not None:
        _restore_after_load(layout, optimizer, state, manifest.get("param_groups", []))
    if _rank() == 0:
        log.info("resumed from %s (step %d, written by %d ranks)", path, manifest["step"], manifest["world_size"])
    return manifest


def _allocate_optimizer_state(layout: _Layout, optimizer, saved: set[str]) -> None:
    """torch optimizers create their state at the first step: create it now, shaped like
    what each target steps, for every state the checkpoint has for it."""
    for target in optimizer.targets:
        param = target.entry.param if target.entry is not None else target.tensor
        prefix = f"optim.{layout.names[id(param)]}."
        keys = [k[len(prefix):] for k in saved if k.startswith(prefix)]
        if not keys:
            continue
        stepped = target.stepped
        state = optimizer.optimizer.state.setdefault(stepped, {})
        for key in keys:
            if key == "step":
                state.setdefault(key, torch.zeros((), dtype=torch.float32))
            else:
                state.setdefault(key, torch.zeros_like(stepped, memory_format=torch.preserve_format))


def _restore_after_load(layout: _Layout, optimizer, state: dict, param_groups: list[dict]) -> None:
    for group, saved in zip(optimizer.param_groups, param_groups):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    for target in optimizer.targets:
        param = target.entry.param if target.entry is not None else target.tensor
        name = layout.names[id(param)]
        step = state.get(f"optim.{name}.step")
        if step is not None and not isinstance(step, torch.Tensor):
            optimizer.optimizer.state[target.stepped]["step"] = step
        if target.master is None:
            continue
        with torch.no_grad():
            if f"master.{name}" in state:  # the weights follow their loaded masters exactly
                target.tensor.copy_(target.master)
            else:
                target.master.copy_(target.tensor)
    runtime = optimizer.runtime
    if runtime is not None and runtime.prefetcher is not None:
        runtime.prefetcher.drop()
    if runtime is not None:
        optimizer._gather_updated_slices()
