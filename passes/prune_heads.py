"""prune-heads: physically remove attention heads — rows of q/k/v (each part of a fused qkv),
columns of o — and rewrite the head counts baked into the attention's views.

A head h contributes o[:, h] . attn_h(x) to the output; removing it equals zeroing o's columns
of that head in the original (tested). Which heads go: `heads=[L:H,...]` names them (layer
index : query head index), or `ratio=R` removes round(R x all heads) ranked across layers by a
score normalized per layer, so layers may keep different head counts:

- `magnitude`: |W_q rows of h| x |W_o columns of h| (the head's own weights; kv may be shared);
- `taylor` (Michel et al. 2019): E_batch |dL/dm_h| for a mask m_h = 1 on the head's output,
  over the calibration batches, each layer's scores divided by their L2 norm;
- `random`: seeded draws.

Grouped-query attention: with `gqa=heads` query heads go one by one; a kv group goes too when
all of its query heads are gone, and a group that keeps only some has its k/v heads gathered
for the heads that remain (an index_select before the attention). With `gqa=groups` whole kv
groups are scored (the sum of their query heads' scores) and removed with their query heads,
so no gather is needed. The statistics say which happened (`kv-groups-removed`,
`query-heads-removed`; on multi-head attention, where each head is its own group, only
`heads-removed`).

Removing every head of a layer is refused (`empty=refuse`: a `heads` spec that names them all
is an error, and the ratio ranking passes over each layer's last head) or turns that attention
into a skip (`empty=skip`: its output becomes o's bias, or zero, as the masked original computes).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Optional

import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import PipelineError
from bmc.analysis.graph_patterns import hinted_shape
from bmc.rewrite.dims import DimFollower, ViewGroup
from bmc.rewrite.params import slice_parameter
from bmc.ir.shapes import propagate_shapes
from bmc.rewrite.linear import operands, projections
from bmc.passmgr.equivalence import changes
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.passmgr.properties import Properties
from bmc.analysis.structure import CACHE_KEY, Attention, Linear, structure_of

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class PruneHeadsOptions:
    ratio: float = 0.2
    heads: Optional[tuple[str, ...]] = None  # "L:H" items (layer index : query head); takes precedence
    score: Literal["magnitude", "taylor", "random"] = "magnitude"
    gqa: Literal["heads", "groups"] = "heads"
    empty: Literal["refuse", "skip"] = "refuse"
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for item in self.heads or ():
            layer, _, head = item.partition(":")
            if not (layer.isdigit() and head.isdigit()):
                raise ValueError(f"heads takes LAYER:HEAD items like 0:3, got {item!r}")


# ------------------------------------------------------------------ which heads go


@dataclass(frozen=True)
class Choice:
    """The query heads one attention keeps, and the kv groups they need (original indices)."""

    attention: Attention
    keep_q: tuple[int, ...]

    @property
    def group_size(self) -> int:
        return self.attention.num_heads // self.attention.num_kv_heads

    @property
    def keep_kv(self) -> tuple[int, ...]:
        return tuple(sorted({h // self.group_size for h in self.keep_q}))

    @property
    def needs_gather(self) -> bool:
        """Some kept group lost some of its query heads: k/v must be gathered per query head."""
        return len(self.keep_q) != len(self.keep_kv) * self.group_size


def _rows(gm: fx.GraphModule, lin: Linear) -> torch.Tensor:
    w = gm.get_parameter(lin.weight).detach().float()
    return w.t() if lin.transposed else w


def magnitude_scores(gm: fx.GraphModule, att: Attention) -> torch.Tensor:
    hd, n = att.head_dim, att.num_heads
    q_rows = _rows(gm, att.qkv)[_fused_rows(att, range(n), ())] if att.fused else _rows(gm, att.q)
    o_cols = _rows(gm, att.o).t()  # [in, out]: the rows of o's input features
    return q_rows.reshape(n, -1).norm(dim=1) * o_cols.reshape(n, -1).norm(dim=1)


def _parse_spec(spec: tuple[str, ...], attentions: list[Attention], blocks: list[int]) -> dict[int, set[int]]:
    """LAYER:HEAD items -> {position in `attentions`: heads}; LAYER is the block's index, which
    stays what it was when prune-layers removed blocks before it."""
    drop: dict[int, set[int]] = {}
    for item in spec:
        layer, head = (int(p) for p in item.split(":"))
        if layer not in blocks:
            raise PipelineError(f"prune-heads: heads=[{item}] names layer {layer}, but the model's blocks with "
                                f"attention are {blocks}")
        att = attentions[blocks.index(layer)]
        if head >= att.num_heads:
            raise PipelineError(f"prune-heads: heads=[{item}] names head {head}, but layer {layer} "
                                f"({att.module}) has {att.num_heads} heads (0..{att.num_heads - 1})")
        drop.setdefault(blocks.index(layer), set()).add(head)
    return drop


def _rank_drops(scores: list[torch.Tensor], attentions: list[Attention], ratio: float, by_group: bool,
                random: bool, may_empty: bool) -> dict[int, set[int]]:
    """The lowest round(ratio x all heads) heads across layers, each layer's scores divided by
    their L2 norm (comparable across layers); whole kv groups when `by_group`. Unless
    `may_empty`, the ranking passes over the last head (group) of a layer."""
    units = []  # (score, layer, heads)
    for layer, (att, s) in enumerate(zip(attentions, scores)):
        s = s if random else s / s.norm().clamp(min=1e-12)
        group = att.num_heads // att.num_kv_heads if by_group else 1
        for first in range(0, att.num_heads, group):
            units.append((float(s[first:first + group].sum()), layer, range(first, first + group)))
    total = sum(a.num_heads for a in attentions)
    target = round(ratio * total)
    drop: dict[int, set[int]] = {}
    removed = 0
    for _, layer, heads in sorted(units, key=lambda u: (u[0], u[1], u[2].start)):
        if removed + len(heads) > target:
            break
        if not may_empty and len(drop.get(layer, ())) + len(heads) >= attentions[layer].num_heads:
            continue
        drop.setdefault(layer, set()).update(heads)
        removed += len(heads)
    return drop


# ------------------------------------------------------------------ following the heads through views


@dataclass(frozen=True)
class Track:
    """Where a tensor's heads live: dim `dim`, made of segments (old size, new size, role) along
    it; one segment for a q/k/v tensor, three for a fused qkv output."""

    dim: int
    segments: tuple[tuple[int, int, str], ...]
    unit: int = 1  # elements of one head along `dim` (head_dim while heads and head_dim are merged)

    @property
    def role(self) -> str:
        return self.segments[0][2] if len(self.segments) == 1 else "qkv"

    @property
    def old(self) -> int:
        return sum(s[0] for s in self.segments)

    @property
    def new(self) -> int:
        return sum(s[1] for s in self.segments)

    def at(self, dim: int) -> "Track":
        return Track(dim, self.segments, self.unit)

    def resized(self, size: int, node: fx.Node) -> int:
        """A size baked for this tensor's head dim (or dims viewed with it), after pruning."""
        if len(self.segments) > 1:
            if size != self.old:
                _refuse(node, "a fused q/k/v output is viewed into other dims before it is split")
            return self.new
        scaled = Fraction(size) * Fraction(self.new, self.old)
        if scaled.denominator != 1:
            _refuse(node, f"size {size} does not scale with the head count")
        return int(scaled)


def _refuse(node: fx.Node, why: str):
    raise PipelineError(f"prune-heads cannot follow the heads through {ir.target_str(node)} ({node.name}): {why}")


class _Heads:
    """prune-heads' policy for the dim walk: a tensor carries its `Track`; sizes baked for the
    heads scale with the heads kept, and a fused qkv output splits into its q/k/v segments."""

    noun = "heads"

    def dim(self, track: Track) -> int:
        return track.dim

    def at(self, track: Track, dim: int) -> Track:
        return track.at(dim)

    def rescale(self, size: int, track: Track, node: fx.Node) -> int:
        return track.resized(size, node)

    def land(self, node: fx.Node, track: Track, view: ViewGroup) -> tuple[int, Track]:
        """The heads sit in the result dim whose inner dims hold whole heads (size-1 dims,
        which shapes alone cannot place, are told apart by the head size)."""
        src, dst, before, after = view.src_dims, view.dst_dims, view.before, view.after
        per_head = track.unit * math.prod(before[i] for i in src[src.index(track.dim) + 1:])
        heads = before[track.dim] // track.unit
        for position, at in enumerate(dst):
            inner = math.prod(after[j] for j in dst[position + 1:])
            if per_head % inner == 0 and after[at] == heads * (per_head // inner):
                return at, Track(at, track.segments, per_head // inner)
            if after[at] != 1:
                _refuse(node, "the heads do not land in one dim")
        _refuse(node, "the heads dim disappears")

    def slice_along(self, node: fx.Node, track: Track, start: int, end: int) -> tuple[Track, bool]:
        """A slice that takes the q, k or v part of a fused output: the same part once pruned."""
        old = [sum(s[0] for s in track.segments[:i]) for i in range(len(track.segments) + 1)]
        new = [sum(s[1] for s in track.segments[:i]) for i in range(len(track.segments) + 1)]
        parts = list(zip(old, old[1:]))
        if len(track.segments) == 1 or (start, end) not in parts:
            _refuse(node, f"the slice [{start}:{end}] is not the q, k or v part of a fused projection")
        i = parts.index((start, end))
        node.args = (node.args[0], node.args[1], new[i], new[i + 1], *node.args[4:])
        return Track(track.dim, (track.segments[i],), track.unit), True

    def split_along(self, node: fx.Node, track: Track, along: int, pieces: int) -> tuple[tuple, bool]:
        if len(track.segments) == 1:
            _refuse(node, "splitting one of q, k, v along its heads")
        if [int(v.shape[along]) for v in node.meta["val"]] != [s[0] for s in track.segments]:
            _refuse(node, "the pieces are not the q, k and v parts of the fused projection")
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], [s[1] for s in track.segments], along)
        return tuple(Track(track.dim, (seg,), track.unit) for seg in track.segments), True

    def refuse(self, node: fx.Node, why: str):
        _refuse(node, why)


class _Walk:
    """Walks one attention from its projections to o in graph order, knowing where each
    tensor's heads live, rewriting baked head counts and gathering k/v where they meet q."""

    def __init__(self, gm: fx.GraphModule, choice: Choice, gather_index: str):
        self.gm, self.choice, self.gather_index = gm, choice, gather_index
        self.tracks: dict[fx.Node, Track | tuple[Track, ...]] = {}
        self.dims = DimFollower(_Heads())
        self.gathers = 0

    def start(self) -> tuple[list[fx.Node], fx.Node]:
        att, c = self.choice.attention, self.choice
        hd = att.head_dim
        q_new, kv_new = len(c.keep_q) * hd, len(c.keep_kv) * hd
        q_seg, k_seg, v_seg = ((att.num_heads * hd, q_new, "q"), (att.num_kv_heads * hd, kv_new, "k"),
                               (att.num_kv_heads * hd, kv_new, "v"))
        starts = []
        if att.fused:
            layout = _proven_layout(att)
            if layout.interleaved:  # one run of [q k v] blocks, one per kv head (checked): whole blocks go
                if layout.k != hd or c.needs_gather:
                    raise PipelineError(f"prune-heads: {att.qkv.weight} interleaves q, k and v per kv group; only "
                                        f"whole groups can be removed from it (prune with gqa=groups)")
                q_seg = k_seg = v_seg = (att.qkv.out_features, len(c.keep_kv) * layout.block, "qkv")
                track = Track(0, (q_seg,), layout.block)
            else:
                track = Track(0, (q_seg, k_seg, v_seg), hd)
            for node in projections(self.gm, att.qkv.weight):
                self.tracks[node] = track.at(len(hinted_shape(node)) - 1)
                starts.append(node)
        else:
            for lin, seg in ((att.q, q_seg), (att.k, k_seg), (att.v, v_seg)):
                for node in projections(self.gm, lin.weight):
                    self.tracks[node] = Track(len(hinted_shape(node)) - 1, (seg,), hd)
                    starts.append(node)
        o_nodes = projections(self.gm, att.o.weight)
        if not starts or not o_nodes or len(o_nodes) != 1:
            raise PipelineError(f"prune-heads: the projections of {att.module} are not each one product by its weight "
                                f"in this graph; its heads cannot be removed")
        return starts, o_nodes[0]

    def run(self) -> None:
        starts, o_node = self.start()
        first = min(starts, key=self._position)
        order = list(self.gm.graph.nodes)
        for node in order[order.index(first):order.index(o_node)]:
            if node.op == "call_function" and node not in self.tracks and \
                    any(isinstance(self.tracks.get(a), (Track, tuple)) for a in node.all_input_nodes):
                self.tracks[node] = self._through(node)
        x = operands(o_node)[0]
        got = self.tracks.get(x)
        if not isinstance(got, Track) or got.role != "q" or got.dim != len(hinted_shape(x)) - 1:
            _refuse(o_node, "the output projection's input is not the heads merged on its last dim")

    def _position(self, node: fx.Node) -> int:
        return list(self.gm.graph.nodes).index(node)

    def _tracked(self, node: fx.Node) -> list[tuple[fx.Node, Track]]:
        return [(a, self.tracks[a]) for a in node.all_input_nodes if isinstance(self.tracks.get(a), Track)]

    def _through(self, node: fx.Node):
        if node.target is operator.getitem:
            return self.dims.through(node, node.args[0], self.tracks.get(node.args[0]))
        if node.target is aten._assert_tensor_metadata.default:
            return None  # export's dtype/device check: it holds for the pruned tensor too
        found = self._tracked(node)
        if not found:
            _refuse(node, "a tuple of tracked tensors used as a whole")
        src, track = self._meet(node, found)[0]
        result = self.dims.through(node, src, track)
        if track.role == "qkv" and len(track.segments) == 1:  # an interleaved [q k v] block taken apart
            return self._block_parts(node, src, result)
        return result

    def _block_parts(self, node: fx.Node, src: fx.Node, carried):
        """The cut of each interleaved block into q, k and v (a split/chunk, or slices, of the
        block's features): the pieces carry the q, k or v role (the analysis proved the order)."""
        layout = self.choice.attention.qkv_layout
        bounds = {(0, layout.q): "q", (layout.q, layout.q + layout.k): "k", (layout.q + layout.k, layout.block): "v"}
        if isinstance(carried, tuple):  # a split or chunk
            widths = [int(v.shape[-1]) for v in node.meta["val"]] if isinstance(node.meta.get("val"), (list, tuple)) \
                else []
            if widths != [layout.q, layout.k, layout.v]:
                _refuse(node, "the pieces are not the q, k and v of the interleaved blocks")
            return tuple(Track(t.dim, ((t.old, t.new, role),), t.unit) for t, role in zip(carried, "qkv"))
        if node.target is aten.slice.Tensor:
            size = hinted_shape(src)[-1]
            start, end = (node.args[2:4] + (None, None))[:2] if len(node.args) > 2 else (0, None)
            span = (start or 0, min(size, end if end is not None else size))
            if (node.args[1] % len(hinted_shape(src))) != len(hinted_shape(src)) - 1 or span not in bounds:
                _refuse(node, "the slice is not the q, k or v of the interleaved blocks")
            return Track(carried.dim, ((carried.old, carried.new, bounds[span]),), carried.unit)
        return carried

    def _meet(self, node: fx.Node, found: list[tuple[fx.Node, Track]]) -> list[tuple[fx.Node, Track]]:
        """Where k or v meets q with fewer positions (query heads pruned inside a kv group),
        gather the k/v head each kept query head reads; q's track leads the result."""
        queries = [(a, t) for a, t in found if t.role == "q"]
        if not queries:
            return found
        q_positions = self._positions(*queries[0])
        for arg, track in found:
            if track.role in ("k", "v") and self._positions(arg, track) != q_positions:
                self._gather(node, arg, track)
        return queries + [(a, t) for a, t in found if t.role != "q"]

    def _positions(self, node: fx.Node, track: Track) -> int:
        """The size along the track's dim once pruned (shapes in meta are still the original's)."""
        return track.resized(hinted_shape(node)[track.dim], node)

    def _gather(self, node: fx.Node, arg: fx.Node, track: Track) -> None:
        """k/v hold `unit` positions per kv head: 1 before the GQA repeat, the group size after."""
        c = self.choice
        groups = {g: i for i, g in enumerate(c.keep_kv)}
        if track.unit == 1:
            index = [groups[h // c.group_size] for h in c.keep_q]
        elif track.unit == c.group_size:
            index = [groups[h // c.group_size] * c.group_size + h % c.group_size for h in c.keep_q]
        else:
            _refuse(node, "k/v meet q with their heads merged into another dim")
        owner, _, leaf = self.gather_index.rpartition(".")
        self.gm.get_submodule(owner).register_buffer(leaf, torch.tensor(index, dtype=torch.long), persistent=True)
        with self.gm.graph.inserting_before(node):
            idx = self.gm.graph.get_attr(self.gather_index)
            picked = self.gm.graph.call_function(aten.index_select.default, (arg, track.dim, idx))
        idx.meta["val"] = torch.empty(len(index), dtype=torch.long, device="meta")
        ir.copy_meta(arg, picked, "prune-heads")
        picked.meta.pop("val", None)
        node.replace_input_with(arg, picked)
        self.tracks[picked] = Track(track.dim, ((len(index), len(index), "q"),))
        self.gathers += 1


# ------------------------------------------------------------------ the rewrite


def _slice_projections(gm: fx.GraphModule, c: Choice) -> int:
    """Keep the chosen heads' rows of q/k/v (each part of a fused qkv) and columns of o."""
    att, hd = c.attention, c.attention.head_dim

    def rows(heads, offset=0):
        return torch.tensor([offset + h * hd + i for h in heads for i in range(hd)], dtype=torch.long)

    removed = 0
    if att.fused:
        keep = torch.tensor(_fused_rows(att, c.keep_q, c.keep_kv), dtype=torch.long)
        removed += _slice_linear(gm, att.qkv, keep, output=True)
    else:
        removed += _slice_linear(gm, att.q, rows(c.keep_q), output=True)
        removed += _slice_linear(gm, att.k, rows(c.keep_kv), output=True)
        removed += _slice_linear(gm, att.v, rows(c.keep_kv), output=True)
    return removed + _slice_linear(gm, att.o, rows(c.keep_q), output=False)


def _proven_layout(att: Attention):
    if att.qkv_layout is None:
        raise PipelineError(f"prune-heads: cannot prove how q, k and v lie in the fused projection {att.qkv.weight} "
                            f"(its output is not cut into q, k, v by a split, chunk or slices the structure analysis "
                            f"follows); its heads cannot be removed")
    return att.qkv_layout


def _fused_rows(att: Attention, keep_q, keep_kv) -> list[int]:
    """The fused projection's output features of these query and kv heads, in weight order."""
    layout, hd = _proven_layout(att), att.head_dim
    rows = [r for h in keep_q for r in layout.features("q", h, hd)]
    rows += [r for part in "kv" for g in keep_kv for r in layout.features(part, g, hd)]
    return sorted(rows)


def _slice_linear(gm: fx.GraphModule, lin: Linear, keep: torch.Tensor, output: bool) -> int:
    """Output features (and the bias) when `output`, else input features."""
    if output:
        removed = slice_parameter(gm, lin.weight, keep, 1 if lin.transposed else 0)
        return removed + (slice_parameter(gm, lin.bias, keep, 0) if lin.bias is not None else 0)
    return slice_parameter(gm, lin.weight, keep, 0 if lin.transposed else 1)


def _erase_unused(gm: fx.GraphModule, module: str) -> None:
    """Erase the module's nodes nothing reads, outright: fx's dead-code elimination keeps
    random ops (attention dropout) as impure."""
    for node in reversed(list(gm.graph.nodes)):
        inside = (ir.module_path(node) + ".").startswith(module + ".") or \
            (node.op == "get_attr" and str(node.target).startswith(module + "."))
        if inside and not node.users and node.op in ("call_function", "get_attr"):
            gm.graph.erase_node(node)


def _skip_attention(gm: fx.GraphModule, att: Attention) -> int:
    """No heads left: the attention's output is o's bias (zero without one), as the masked
    original computes; its projections' parameters leave the module."""
    o_node = projections(gm, att.o.weight)[0]
    x = operands(projections(gm, (att.qkv or att.q).weight)[0])[0]
    bias = operands(o_node)[2]
    with gm.graph.inserting_before(o_node):
        out = gm.graph.call_function(aten.zeros_like.default, (x,))
        if bias is not None:
            out = gm.graph.call_function(aten.add.Tensor, (out, bias))
    ir.copy_meta(o_node, out, "prune-heads")
    o_node.replace_all_uses_with(out)
    _erase_unused(gm, att.module)
    removed = 0
    for lin in att.projections():
        for name in (lin.weight, lin.bias if lin is not att.o else None):
            if name is not None and name not in ir.parameter_nodes(gm):
                owner, _, leaf = name.rpartition(".")
                removed += gm.get_parameter(name).numel()
                delattr(gm.get_submodule(owner) if owner else gm, leaf)
    return removed


def _choices(gm: fx.GraphModule, attentions: list[Attention], blocks: list[int], opts: PruneHeadsOptions,
             calibration) -> dict[int, set[int]]:
    if opts.heads is not None:
        return _parse_spec(opts.heads, attentions, blocks)
    if opts.score == "random":
        generator = torch.Generator().manual_seed(opts.seed)
        scores = [torch.rand(a.num_heads, generator=generator) for a in attentions]
    elif opts.score == "taylor":
        from bmc.compress.head_importance import taylor_scores
        scores = taylor_scores(gm, attentions, calibration)
    else:
        scores = [magnitude_scores(gm, a) for a in attentions]
    return _rank_drops(scores, attentions, opts.ratio, by_group=opts.gqa == "groups", random=opts.score == "random",
                       may_empty=opts.empty == "skip")


AFTER_TP = "prune first, then split what is left (put prune-heads before tp)"


@register_pass("prune-heads", options=PruneHeadsOptions, invalidates=("cost",),
               forbids=("staged", "fused-regions", "quantized", ("tp-split", AFTER_TP)),
               equivalence=changes("attention heads removed"))
class PruneHeads(Pass):
    """Remove attention heads (by spec, or a ratio ranked by magnitude, Taylor or random scores)."""

    def properties(self) -> Properties:
        needs = ("calibration",) if self.options.score == "taylor" and not self.options.heads else ()
        return dataclasses.replace(super().properties(), requires=needs)

    def run(self, gm: fx.GraphModule) -> PassResult:
        with_attention = [b for b in structure_of(gm).blocks if b.attention is not None]
        attentions = [b.attention for b in with_attention]
        if not attentions:
            raise PipelineError("prune-heads: the structure analysis found no attention in this model's blocks")
        drops = _choices(gm, attentions, [b.index for b in with_attention], self.options, self.context.calibration)
        stats = {"heads-removed": 0, "query-heads-removed": 0, "kv-groups-removed": 0, "layers-skipped": 0,
                 "params-removed": 0, "shapes-rewritten": 0, "kv-gathers": 0}
        record = ir.get_plan(gm, ir.PrunePlan) or ir.PrunePlan()
        kept = {m: list(ix) for m, ix in record.kept_heads().items()}  # attention -> query heads kept (original ids)
        for layer, att in enumerate(attentions):
            drop = drops.get(layer, set())
            if not drop:
                continue
            self._prune_one(gm, att, drop, kept, stats)
        if all(att.num_kv_heads == att.num_heads for att in attentions):
            # multi-head attention: a head is its own kv group, so the GQA split says nothing
            for key in ("query-heads-removed", "kv-groups-removed", "kv-gathers"):
                del stats[key]
        ir.set_plan(gm, dataclasses.replace(record, heads=tuple(ir.Kept(m, tuple(ix)) for m, ix in kept.items())))
        gm.meta.pop(CACHE_KEY, None)  # head counts changed
        gm.graph.eliminate_dead_code()
        propagate_shapes(gm)
        gm.graph.lint()
        gm.recompile()
        log.info("prune-heads: %s", stats)
        return PassResult(gm, stats["heads-removed"] > 0, stats)

    def _prune_one(self, gm: fx.GraphModule, att: Attention, drop: set[int], kept: dict, stats: dict) -> None:
        if att.kv_gathered:
            raise PipelineError(f"prune-heads: {att.module} was already pruned inside its kv groups (its k/v are "
                                f"gathered per query head); remove all its heads in one prune-heads")
        keep = tuple(h for h in range(att.num_heads) if h not in drop)
        previous = kept.get(att.module, list(range(att.num_heads)))
        stats["heads-removed"] += len(drop)
        if not keep:
            if self.options.empty == "refuse":
                raise PipelineError(f"prune-heads would remove all {att.num_heads} heads of {att.module}; "
                                    f"pass empty=skip to turn that attention into a skip, or prune fewer heads")
            stats["params-removed"] += _skip_attention(gm, att)
            stats["layers-skipped"] += 1
            stats["kv-groups-removed"] += att.num_kv_heads
            kept[att.module] = []
            return
        choice = Choice(att, keep)
        walk = _Walk(gm, choice, f"{att.module}.kv_head_index")
        walk.run()
        stats["params-removed"] += _slice_projections(gm, choice)
        stats["shapes-rewritten"] += walk.dims.rewritten
        stats["kv-gathers"] += walk.gathers
        groups_gone = att.num_kv_heads - len(choice.keep_kv)
        stats["kv-groups-removed"] += groups_gone
        stats["query-heads-removed"] += len(drop) - groups_gone * choice.group_size
        kept[att.module] = [previous[h] for h in keep]
