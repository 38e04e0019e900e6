"""Typed graph plans: what a pass decides for the whole graph.

A plan is a frozen dataclass stored in `gm.meta` under its `key`, read and written only through
`get_plan` / `set_plan` / `replace_plan`, checked by the verifier (ir/verify.py) and saved in
every artifact (ir/serialize.py), so that a program saved in one process runs the same in
another. Plans describe; they never hold tensors: a backend slices a rank's shard from the
module's state when it loads.

Every field is a plain value (int, float, str, bool, None), a tuple of them, or a nested frozen
dataclass: the JSON codec (`plan_to_json` / `plan_from_json`) follows the type hints, so adding
a field needs no serialization code.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, TypeVar

import torch
import torch.fx as fx

from bmc.errors import ModelLoadError, VerificationError


# ---------------------------------------------------------------------------- the plans


@dataclass(frozen=True)
class Layout:
    """How one weight is split over tensor-parallel ranks: along `dim`, each of its `segments`
    (sizes along dim; one for a plain projection, q/k/v for a fused one) cut into `degree`
    equal pieces; rank r keeps piece r of every segment."""

    param: str
    dim: int
    segments: tuple[int, ...]

    def local(self, full: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
        pieces = [seg.chunk(degree, self.dim)[rank] for seg in full.split(list(self.segments), self.dim)]
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0]

    def full(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        """Reassemble the full weight from every rank's slice (rank order)."""
        degree = len(locals_)
        per_rank = [list(t.split([s // degree for s in self.segments], self.dim)) for t in locals_]
        return torch.cat([torch.cat([per_rank[r][i] for r in range(degree)], self.dim)
                          for i in range(len(self.segments))], self.dim)

    def local_shape(self, full_shape: tuple[int, ...], degree: int) -> tuple[int, ...]:
        shape = list(full_shape)
        shape[self.dim] //= degree
        return tuple(shape)


@dataclass(frozen=True)
class TensorParallelPlan:
    """`tp`: the degree and every split weight's layout. Until a backend loads the program,
    the module holds each split weight whole (the graph's shapes are a rank's); the backend
    keeps only its rank's slice. `collectives` is set by insert-collectives (None: not yet)."""

    key: ClassVar[str] = "bmc.tp"
    degree: int
    layouts: tuple[Layout, ...]
    vocab: bool = False
    collectives: Optional[int] = None
    sequence_parallel: bool = False

    def layout(self, param: str) -> Layout | None:
        return next((lay for lay in self.layouts if lay.param == param), None)

    @property
    def split_params(self) -> tuple[str, ...]:
        return tuple(lay.param for lay in self.layouts)


@dataclass(frozen=True)
class PipelinePlan:
    """`pp`: stages cut at block boundaries (`bounds`: the first block of each stage, and the
    end), the schedule and its microbatches; `time` / `memory` are the cost model's per stage."""

    key: ClassVar[str] = "bmc.pp"
    stages: int
    total_stages: int
    schedule: str
    microbatches: int
    bounds: tuple[int, ...]
    time: tuple[float, ...]
    memory: tuple[float, ...]


@dataclass(frozen=True)
class AmpPlan:
    """`amp`: parameters stored in `dtype`; fp16 keeps a dynamic loss scale in two buffers."""

    key: ClassVar[str] = "bmc.amp"
    dtype: str
    growth_interval: int = 2000
    scale_buffer: Optional[str] = None
    growth_buffer: Optional[str] = None


@dataclass(frozen=True)
class DataParallelPlan:
    """`dp` / `zero`: the ZeRO stage (0: plain data parallel), gradient buckets, and how many
    weights ZeRO-3 gathers ahead."""

    key: ClassVar[str] = "bmc.dp"
    stage: int
    bucket_mb: float = 25.0
    prefetch: int = 0


@dataclass(frozen=True)
class OffloadPlan:
    """`insert-offload`: the blocks whose saved activations live in host memory, and whether
    the optimizer (fp32 masters, states, the step) runs on the CPU."""

    key: ClassVar[str] = "bmc.offload"
    activations: tuple[str, ...] = ()
    optimizer: bool = False


@dataclass(frozen=True)
class TapPlan:
    """`tap`: the module paths whose outputs the graph also returns, in output order."""

    key: ClassVar[str] = "bmc.tap"
    points: tuple[str, ...]


@dataclass(frozen=True)
class Kept:
    """What pruning kept of one module: the original indices of its heads or neurons."""

    module: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class PrunePlan:
    """What the pruning passes removed: query heads kept per attention, neurons kept per MLP
    (original indices), and the residual blocks dropped."""

    key: ClassVar[str] = "bmc.prune"
    heads: tuple[Kept, ...] = ()
    neurons: tuple[Kept, ...] = ()
    layers_dropped: tuple[str, ...] = ()

    def kept_heads(self) -> dict[str, tuple[int, ...]]:
        return {k.module: k.indices for k in self.heads}

    def kept_neurons(self) -> dict[str, tuple[int, ...]]:
        return {k.module: k.indices for k in self.neurons}


@dataclass(frozen=True)
class KvCachePlan:
    """The decode step's cache: one entry per attention ([B, heads, S, head_dim])."""

    key: ClassVar[str] = "bmc.kv_cache"
    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    vocab: int
    max_positions: int  # rows of the smallest position table: the longest sequence the model takes

    @property
    def layers(self) -> int:
        return len(self.heads)


@dataclass(frozen=True)
class TokenizerFile:
    name: str  # e.g. tokenizer.json, in the directory the model was read from
    sha256: str


@dataclass(frozen=True)
class TokenizerPlan:
    """The tokenizer of a model read from a Hugging Face directory (`hf:DIR`): where its files
    are and their checksums when the model was read, so a build carries the very tokenizer the
    weights were trained with (a file changed since is refused, never copied)."""

    key: ClassVar[str] = "bmc.tokenizer"
    directory: str
    files: tuple[TokenizerFile, ...]


PLANS: dict[str, type] = {cls.key: cls for cls in (TensorParallelPlan, PipelinePlan, AmpPlan, DataParallelPlan,
                                                   OffloadPlan, TapPlan, PrunePlan, KvCachePlan, TokenizerPlan)}
# Graph meta that is not a plan: how the graph was traced (its example inputs are tensors;
# serialize.py restores them from the archive) and caches derived from the graph.
NOT_PLANS = ("bmc.trace", "bmc.structure")

P = TypeVar("P")


def get_plan(gm: fx.GraphModule, kind: type[P]) -> P | None:
    """The graph's plan of this kind, or None."""
    return gm.meta.get(kind.key)


def set_plan(gm: fx.GraphModule, plan: Any) -> None:
    """Set (or replace) one plan of the graph."""
    if type(plan) not in PLANS.values():
        raise TypeError(f"{type(plan).__name__} is not a bmc plan; known: {sorted(PLANS)}")
    gm.meta[plan.key] = plan


def replace_plan(gm: fx.GraphModule, kind: type[P], **changes) -> P:
    """The graph's plan of this kind with some fields changed (plans are frozen)."""
    plan = dataclasses.replace(get_plan(gm, kind), **changes)
    set_plan(gm, plan)
    return plan


def clear_plan(gm: fx.GraphModule, kind: type) -> None:
    gm.meta.pop(kind.key, None)


def all_plans(gm: fx.GraphModule) -> Iterator[Any]:
    """Every plan of the graph, in schema order."""
    for key in PLANS:
        if key in gm.meta:
            yield gm.meta[key]


def copy_plans(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give `dst` (a stage, a decode step) the plans of the graph it was made from."""
    for plan in all_plans(src):
        dst.meta[plan.key] = plan


def check_plans(gm: fx.GraphModule) -> None:
    """Every bmc.* graph meta key is a known plan holding its dataclass (or a known non-plan)."""
    for key, value in gm.meta.items():
        if not key.startswith("bmc.") or key in NOT_PLANS:
            continue
        cls = PLANS.get(key)
        if cls is None:
            raise VerificationError(f"unknown graph plan {key!r}; known: {sorted(PLANS)} (set plans with ir.set_plan)")
        if not isinstance(value, cls):
            raise VerificationError(f"graph plan {key} holds {type(value).__name__}, expected {cls.__name__}")


# ---------------------------------------------------------------------------- JSON codec


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    return value


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(tp)


def from_jsonable(tp: Any, raw: Any) -> Any:
    """Rebuild a value of type `tp` (a plan field's type hint) from its JSON form."""
    if _is_optional(tp):
        return None if raw is None else from_jsonable(next(a for a in typing.get_args(tp) if a is not type(None)), raw)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: from_jsonable(hints[f.name], raw[f.name])
                     for f in dataclasses.fields(tp) if f.name in raw})
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v) for v in raw)
        return tuple(from_jsonable(a, v) for a, v in zip(args, raw))
    if tp is float and isinstance(raw, int):
        return float(raw)
    return raw


def plans_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    return {plan.key: to_jsonable(plan) for plan in all_plans(gm)}


def plans_from_json(gm: fx.GraphModule, data: dict[str, Any], source: str = "the archive") -> None:
    for key, raw in data.items():
        cls = PLANS.get(key)
        if cls is None:
            raise ModelLoadError(f"{source} holds a plan {key!r} this version of bmc does not know; "
                                 f"upgrade bmc or re-run the pipeline")
        set_plan(gm, from_jsonable(cls, raw))


def plan_text(plan: Any) -> str:
    """One line for printing: `bmc.tp = {"degree": 2, ...}`."""
    return f"{plan.key} = {json.dumps(to_jsonable(plan), sort_keys=False)}"
