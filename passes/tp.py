"""tp: Megatron-style tensor parallelism (Shoeybi et al. 2019) derived from the graph.

From the structure analysis, attention is split by heads (q/k/v column-parallel, a fused qkv
weight split per head group in each of its q, k and v parts, GQA's kv heads split alike) and
the MLP by neurons (up/gate column-parallel, down row-parallel). The graph stays SPMD: shapes
become a rank's local shapes, and the head counts and widths baked into view / reshape /
expand / split nodes are rewritten by propagating which dim of each tensor is split. Each
activation's placement is recorded (`bmc.shard`: `tp:shard(d)`, or `tp:partial` for a
row-parallel product, whose bias is added after it), and the insert-collectives pass puts
Megatron's f and g where those placements need them; the presets `tp2`, `tp4`, `tp8` are
`tp{degree=N},insert-collectives`.

The graph's shapes are a rank's (the verifier and the cost model see local sizes) while the
module keeps every split weight whole until a backend loads the program: the typed plan
(`ir.TensorParallelPlan`) records how each is split, and the torch backend keeps only its
rank's slices, so a saved program holds the whole model and loads on any tp rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers the bmc:: collectives the rewrite inserts
from bmc import ir
from bmc.errors import PipelineError
from bmc.analysis.graph_patterns import hinted_shape
from bmc.rewrite.dims import DimFollower, ViewGroup
from bmc.ir.shapes import propagate_shapes
from bmc.passmgr.manager import Pass, PassResult, register_pass, register_preset
from bmc.analysis.structure import structure_of
from bmc.rewrite.linear import bias_after, operands, projection, projections

log = logging.getLogger(__name__)
aten = torch.ops.aten
GROUP = "tp"


@dataclass(frozen=True)
class TpOptions:
    degree: int = 2
    # also split the token embedding and the output head over the vocabulary, with Megatron's
    # vocab-parallel cross-entropy (no rank holds the whole [tokens, vocab] logits)
    vocab: bool = False

    def __post_init__(self):
        if self.degree < 1:
            raise ValueError(f"degree must be >= 1, got {self.degree}")


# ------------------------------------------------------------------ the plan: which projections


@dataclass
class _Plan:
    column: dict[str, tuple[int, ...]]  # weight name -> output segments (split by rank)
    row: dict[str, None]  # weight names of row-parallel projections, in graph order (every rank
    # must walk them in the same order: a set's order changes with each process's hash seed)
    transposed: set[str]  # weights stored (in, out): HF GPT-2's Conv1D, a matmul by W (not W.t())
    vocab: set[str] = field(default_factory=set)  # token embeddings split by vocabulary rows


def _segments_qkv(attention) -> tuple[int, ...]:
    """The fused qkv's runs that each split by heads, from the layout the structure analysis
    proved (q | k | v contiguous; the whole width when interleaved per head group)."""
    if attention.qkv_layout is None:
        raise PipelineError(f"tp: cannot prove how q, k and v lie in the fused projection {attention.qkv.weight} "
                            f"(its output is not cut into q, k, v by a split, chunk or slices the structure "
                            f"analysis follows); split it into separate q/k/v projections to use tp")
    return attention.qkv_layout.parts()


def _segments_mlp(mlp) -> tuple[int, ...]:
    """A fused gate|up projection (Phi-3's gate_up_proj, chunked in two) splits per part."""
    if mlp.gate is None and mlp.up_parts:
        return mlp.up_parts
    return (mlp.up.out_features,)


def _check_divisible(what: str, count: int, degree: int, layer: str) -> None:
    if count % degree:
        raise PipelineError(f"tp{{degree={degree}}}: {layer} has {count} {what}, not divisible by {degree}; "
                            f"pick a degree that divides {count}")


def _plan_vocab(gm: fx.GraphModule, structure, degree: int, plan: _Plan) -> None:
    """The token embedding(s) by vocabulary rows and the output head by vocabulary columns
    (one layout when they are tied: both split rows of the same [vocab, hidden] weight)."""
    vocab = structure.head.out_features if structure.head is not None else \
        max((e.num_embeddings for e in structure.embeddings), default=None)
    if vocab is None:
        raise PipelineError("tp{vocab=true}: the structure analysis found no token embedding or output head")
    _check_divisible("vocabulary entries", vocab, degree, "the vocabulary")
    read = ir.parameter_nodes(gm)

    def graph_name(name: str) -> str:  # a tied weight is read under one of its names
        return next((n for n in (structure.tied_group(name) or (name,)) if n in read), name)

    for embedding in structure.embeddings:
        if embedding.num_embeddings == vocab:
            plan.vocab.add(graph_name(embedding.weight))
    if structure.head is not None:
        if structure.head.transposed:
            raise PipelineError("tp{vocab=true}: the output head is stored (in, out); split it with vocab=false")
        plan.column[graph_name(structure.head.weight)] = (vocab,)


def _plan(gm: fx.GraphModule, degree: int, vocab: bool = False) -> _Plan:
    structure = structure_of(gm)
    if not structure.blocks:
        raise PipelineError("tp found no repeated blocks with attention or an MLP to split "
                            "(bmc-opt --analyze shows what the structure analysis sees)")
    plan = _Plan({}, {}, set())
    for block in structure.blocks:
        att = block.attention
        if att is not None and att.kv_gathered:
            raise PipelineError(f"tp: {att.module} reads its k/v heads through a gather (prune-heads kept some query "
                                f"heads of a kv group); prune with gqa=groups to split it by heads")
        if att is not None:
            _check_divisible("attention heads", att.num_heads, degree, att.module)
            _check_divisible("kv heads", att.num_kv_heads, degree, att.module)
            if att.qkv is not None:
                plan.column[att.qkv.weight] = _segments_qkv(att)
            for lin in (att.q, att.k, att.v):
                if lin is not None:
                    plan.column[lin.weight] = (lin.out_features,)
            plan.row[att.o.weight] = None
        mlp = block.mlp
        if mlp is not None:
            _check_divisible("MLP neurons", mlp.up.out_features, degree, mlp.module)
            plan.column[mlp.up.weight] = _segments_mlp(mlp)
            if mlp.gate is not None:
                plan.column[mlp.gate.weight] = (mlp.gate.out_features,)
            plan.row[mlp.down.weight] = None
    if vocab:
        _plan_vocab(gm, structure, degree, plan)
    for name in list(plan.column) + list(plan.row):
        users = projections(gm, name, allow_embedding=name in plan.vocab)
        if users is None:
            raise PipelineError(f"tp: the weight {name} is read by something other than projections in this "
                                f"graph (a norm, a lookup, another product), so it cannot be split")
        stored_in_out = {projection(u).in_out for u in users}
        if len(stored_in_out) > 1:
            raise PipelineError(f"tp: {name} is multiplied both as stored and transposed; it cannot be split one way")
        if stored_in_out == {True}:
            plan.transposed.add(name)
    return plan


# ------------------------------------------------------------------ propagating the split dim


@dataclass(frozen=True)
class _Parts:
    """A fused column-parallel output: its split dim holds several runs (q | k | v, gate | up),
    each split over the ranks, so it may be cut only at their boundaries."""

    dim: int
    segments: tuple[int, ...]


def _dim(carried) -> int | tuple | None:
    return carried.dim if isinstance(carried, _Parts) else carried


class _Propagation:
    """Walks the graph in order, knowing for each tensor which dim is split across tp ranks
    (None: every rank holds all of it), and rewrites the nodes whose arguments bake sizes."""

    def __init__(self, gm: fx.GraphModule, plan: _Plan, degree: int):
        self.gm, self.plan, self.degree = gm, plan, degree
        self.split: dict[fx.Node, int | tuple | None] = {}
        self.partial: list[fx.Node] = []
        self.stats = {"column": 0, "row": 0, "shapes-rewritten": 0}
        self.dims = DimFollower(_SplitDim(degree))

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "output":
                self._gather_outputs(node)
            if node.op != "call_function":
                continue
            if node.target is aten._assert_tensor_metadata.default:
                continue  # export's dtype/device check: it holds for a rank's slice too
            if node.target is aten.embedding.default and str(node.args[0].target) in self.plan.vocab:
                self._vocab_embedding(node)
                continue
            if node.target is aten.cross_entropy_loss.default and self.split.get(node.args[0]) is not None:
                self._vocab_cross_entropy(node)
                continue
            found = projection(node)
            weight = str(found.weight.target) if found is not None else None
            if weight in self.plan.column:
                self._column(node)
            elif weight in self.plan.row:
                self._row(node)
            elif any(self.split.get(a) is not None for a in node.all_input_nodes):
                self.split[node] = self._through(node)
        self.stats["shapes-rewritten"] = self.dims.rewritten

    def annotate(self) -> None:
        """Record each activation's placement (`bmc.shard`): what insert-collectives reads."""
        for node, carried in self.split.items():
            dim = _dim(carried)
            if isinstance(dim, int):
                ir.place(node, ir.Placement(GROUP, "shard", dim))
        for node in self.partial:
            ir.place(node, ir.Placement(GROUP, "partial"))

    # -- the projections

    def _column(self, node: fx.Node) -> None:
        x, weight, _ = operands(node)
        if self.split.get(x) is not None:
            raise PipelineError(f"tp: the input of {weight.target} is already split; "
                                f"two column-parallel projections in a row are not supported")
        dim, segments = len(hinted_shape(node)) - 1, self.plan.column[str(weight.target)]
        self.split[node] = _Parts(dim, segments) if len(segments) > 1 else dim
        self.stats["column"] += 1

    def _row(self, node: fx.Node) -> None:
        x, weight, bias = operands(node)
        if self.split.get(x) != len(hinted_shape(x)) - 1:
            raise PipelineError(f"tp: the input of the row-parallel {weight.target} is not split on its "
                                f"features (found {self.split.get(x)}); the split cannot be followed here")
        # the partial products are summed over ranks first; the bias is added once, after (a
        # matmul-form product adds its bias in a node of its own already)
        if node.target is aten.addmm.default:
            node.target, node.args, node.kwargs = aten.mm.default, (x, node.args[2]), {}
        elif node.target is aten.linear.default:
            node.args, node.kwargs = (x, weight), {}
        self.partial.append(node)  # each rank holds a summand: insert-collectives puts g after it
        if bias is not None:  # added once, to the sum (g goes between the product and this add)
            with self.gm.graph.inserting_after(node):
                result = self.gm.graph.call_function(aten.add.Tensor, (node, bias))
            ir.copy_meta(node, result, "tp")
            node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not result)
        self.split[node] = None
        self.stats["row"] += 1

    # -- the vocabulary

    def _vocab_embedding(self, node: fx.Node) -> None:
        """Each rank looks up the rows it holds (zeros elsewhere): a partial sum, like a
        row-parallel product."""
        weight, indices = node.args[:2]
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        node.target, node.args, node.kwargs = torch.ops.bmc.vocab_parallel_embedding.default, \
            (weight, indices, padding_idx, GROUP), {}
        self.partial.append(node)
        self.split[node] = None
        self.stats["vocab"] = self.stats.get("vocab", 0) + 1

    def _vocab_cross_entropy(self, node: fx.Node) -> None:
        logits, target = node.args[:2]
        options = dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), node.args[2:]), **node.kwargs)
        dim = _dim(self.split[logits])
        if dim != len(hinted_shape(logits)) - 1 or options.get("weight") is not None \
                or options.get("reduction", 1) != 1 or options.get("label_smoothing", 0.0):
            _refuse(node, "the vocab-parallel loss takes [tokens, vocab] logits split on the vocabulary, "
                          "mean reduction, no class weights or label smoothing")
        node.target, node.args, node.kwargs = torch.ops.bmc.vocab_parallel_cross_entropy.default, \
            (logits, target, options.get("ignore_index", -100), GROUP), {}
        self.split[node] = None

    def _gather_outputs(self, output: fx.Node) -> None:
        """Outputs are whole on every rank: split ones (logits over the vocabulary) are
        gathered; their gradient, whole on every rank, is sliced back."""
        for arg in [a for a in output.all_input_nodes if isinstance(self.split.get(a), (int, _Parts))]:
            if isinstance(self.split[arg], _Parts):
                _refuse(output, "a fused projection's parts are returned before they are taken apart")
            with self.gm.graph.inserting_before(output):
                gathered = self.gm.graph.call_function(torch.ops.bmc.unscatter.default, (arg, self.split[arg], GROUP))
            ir.copy_meta(arg, gathered, "tp")
            output.replace_input_with(arg, gathered)

    # -- everything between them

    def _input_dim(self, node: fx.Node) -> tuple[fx.Node, int]:
        """The split input (the first, when several are split the same way, counted from
        the right as broadcasting aligns them)."""
        found = [(a, self.split[a]) for a in node.all_input_nodes if self.split.get(a) is not None]
        if any(isinstance(d, (tuple, _Parts)) for _, d in found):
            return found[0]
        if len({len(hinted_shape(a)) - d for a, d in found}) > 1:
            _refuse(node, "its inputs are split on different dims")
        return found[0]

    def _through(self, node: fx.Node):
        return self.dims.through(node, *self._input_dim(node))


class _SplitDim:
    """tp's policy for the dim walk: a tensor carries its split dim (`_Parts` for a fused
    projection's output, a tuple of dims for a split's pieces); sizes baked for it are divided
    by the degree."""

    noun = "split"

    def __init__(self, degree: int):
        self.degree = degree

    def dim(self, carried) -> int:
        return _dim(carried)

    def at(self, carried, dim: int):
        return _Parts(dim, carried.segments) if isinstance(carried, _Parts) else dim

    def rescale(self, size, carried, node: fx.Node):
        return _divided(size, self.degree, node)

    def land(self, node: fx.Node, carried, view: ViewGroup):
        """Ranks split the outermost factor, so the dim lands in the outermost result dim
        that is not 1; a fused output's parts must stay one dim until they are taken apart."""
        dim = _dim(carried)
        targets = [j for j in view.dst_dims if view.after[j] > 1]
        if view.before[dim] == 1 or not targets:
            _refuse(node, "the split dim is not the outermost of the dims it is viewed with")
        if isinstance(carried, _Parts):
            if len(targets) != 1 or view.after[targets[0]] != view.before[dim]:
                _refuse(node, "a fused projection's q/k/v (or gate/up) parts are viewed into other dims before "
                              "they are taken apart")
            return targets[0], _Parts(targets[0], carried.segments)
        return targets[0], targets[0]

    def split_along(self, node: fx.Node, carried, along: int, pieces: int) -> tuple[tuple, bool]:
        """Only a fused output's parts are cut along the split dim, exactly at their
        boundaries: each rank's tensor holds its piece of every part, in order."""
        widths = [int(v.shape[along]) for v in node.meta["val"]]
        if not isinstance(carried, _Parts) or widths != list(carried.segments):
            _refuse(node, f"the pieces {widths} are not the parts of a fused projection "
                          f"(the layout says {list(getattr(carried, 'segments', ()))})")
        if node.target is aten.chunk.default:
            return tuple([along] * pieces), False  # equal parts: equal chunks of the local tensor
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], [_divided(w, self.degree, node) for w in widths], along)
        return tuple([along] * pieces), True

    def slice_along(self, node: fx.Node, carried, start: int, end: int):
        """A slice that takes one whole part of a fused output: the same part of a rank's."""
        bounds = [sum(carried.segments[:i]) for i in range(len(carried.segments) + 1)] \
            if isinstance(carried, _Parts) else []
        if (start, end) not in zip(bounds, bounds[1:]):
            _refuse(node, f"the slice [{start}:{end}] is not one part of a fused projection "
                          f"(parts at {bounds or 'none'})")
        node.args = (node.args[0], node.args[1], start // self.degree, end // self.degree, *node.args[4:])
        return carried.dim, True

    def refuse(self, node: fx.Node, why: str):
        _refuse(node, why)


def _refuse(node: fx.Node, why: str):
    raise PipelineError(f"tp cannot follow the split through {ir.target_str(node)} ({node.name}): {why}")


def _divided(size, degree: int, node: fx.Node):
    if isinstance(size, int) and size % degree:
        raise PipelineError(f"tp{{degree={degree}}}: {node.name} has size {size}, not divisible by {degree}")
    return size // degree


# ------------------------------------------------------------------ the weights


def _layouts(gm: fx.GraphModule, plan: _Plan) -> dict[str, ir.Layout]:
    """How each split weight (and a column-parallel projection's bias) is cut."""
    layouts = {}
    for name in plan.vocab:
        layouts[name] = ir.Layout(name, 0, (gm.get_parameter(name).shape[0],))
    for name, segments in plan.column.items():
        layouts[name] = ir.Layout(name, 1 if name in plan.transposed else 0, segments)
        product = projections(gm, name, allow_embedding=name in plan.vocab)[0]
        bias = operands(product)[2] or bias_after(product)
        if isinstance(bias, fx.Node):
            layouts[str(bias.target)] = ir.Layout(str(bias.target), 0, segments)
    for name in plan.row:
        dim = 0 if name in plan.transposed else 1
        layouts[name] = ir.Layout(name, dim, (gm.get_parameter(name).shape[dim],))
    return layouts


def _localize_parameter_nodes(gm: fx.GraphModule, layouts: dict[str, ir.Layout], degree: int) -> None:
    """The split weights' nodes take a rank's shape and their placement; the module keeps
    the whole weights (the backend slices them when it loads the program)."""
    nodes = ir.parameter_nodes(gm)
    for name, layout in layouts.items():
        node = nodes[name]
        val = node.meta["val"]
        node.meta["val"] = val.new_empty(layout.local_shape(tuple(val.shape), degree))
        ir.place(node, ir.Placement(GROUP, "shard", layout.dim))


@register_pass("tp", options=TpOptions, provides=("tp-split",), invalidates=("cost",),
               forbids=("staged", "quantized", "fused-regions", "zero3", "tp-split"))
class TensorParallel(Pass):
    """Tensor parallelism: attention split by heads, the MLP by neurons, with f/g collectives."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        degree = self.options.degree
        if degree == 1:
            return PassResult(gm, False, {"degree": 1})
        plan = _plan(gm, degree, vocab=self.options.vocab)
        walk = _Propagation(gm, plan, degree)
        walk.run()
        walk.annotate()
        layouts = _layouts(gm, plan)
        _localize_parameter_nodes(gm, layouts, degree)
        ir.set_plan(gm, ir.TensorParallelPlan(degree, tuple(layouts.values()), vocab=bool(plan.vocab)))
        gm.graph.lint()
        gm.recompile()
        propagate_shapes(gm)
        log.info("tp{degree=%d}: %s", degree, walk.stats)
        return PassResult(gm, True, {"degree": degree, **walk.stats})


for _degree in (2, 4, 8):
    register_preset(f"tp{_degree}", f"tp{{degree={_degree}}},insert-collectives",
                    f"tensor parallelism over {_degree} ranks, with its collectives")
