"""Structure analysis: blocks, attention (q/k/v/o, heads, GQA), MLPs, norms, embeddings, tied weights.

Everything is read from the traced graph alone (nodes, `val` and `nn_module_stack` meta,
parameter names and shapes), never from the original nn.Module, so the analysis works as
well on a graph loaded from a `.pt2` file. Passes use it to derive default policies
(which linears to split for tensor parallelism, where the block boundaries are, which
parameters must stay whole because they are tied).

    s = structure_of(gm)          # cached in gm.meta["bmc.structure"]
    text = format_structure(s)    # the table bmc-opt --analyze prints
    s.blocks[0].attention.num_kv_heads
"""
from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from bmc.errors import StructureError
from bmc.ir.schema import module_path, normalize_module_path, tensor_val

__all__ = ["Linear", "QkvLayout", "Attention", "MLP", "Embedding", "Block", "ModelStructure",
           "analyze", "structure_of", "format_structure", "CACHE_KEY"]

CACHE_KEY = "bmc.structure"


# ---------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Linear:
    """One projection y = x W^T + b (or x W + b when `transposed`)."""

    module: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool = False  # weight stored (in, out), as HF GPT-2's Conv1D (addmm)


@dataclass(frozen=True)
class QkvLayout:
    """How q, k and v sit in a fused projection's output features, proven from how the graph
    takes them apart: `groups` equal blocks of [q | k | v], `q`, `k`, `v` features each per
    block. One block: contiguous parts (GPT-2's c_attn split in thirds, Phi-3's slices, GQA
    sizes alike); several: interleaved per head or kv group (GPT-NeoX views its output as
    [heads, 3 * head_dim] and chunks the last dim). `taken_by`: "split", "chunk" or "slice"."""

    groups: int
    q: int
    k: int
    v: int
    taken_by: str

    @property
    def interleaved(self) -> bool:
        return self.groups > 1

    @property
    def block(self) -> int:
        return self.q + self.k + self.v

    def parts(self) -> tuple[int, ...]:
        """The runs of output features that splitting by heads cuts evenly, each into equal
        pieces: q | k | v when contiguous; the whole width when interleaved, since heads
        split by kv groups keep whole [q k v] blocks, which lie one after another."""
        return (self.groups * self.block,) if self.interleaved else (self.q, self.k, self.v)

    def features(self, part: str, index: int, head_dim: int) -> range:
        """The output features of query head (`part` "q") or kv head ("k", "v") `index`."""
        per_block = {"q": self.q, "k": self.k, "v": self.v}[part] // head_dim  # heads of the part per block
        block, within = divmod(index, per_block)
        offset = block * self.block + {"q": 0, "k": self.q, "v": self.q + self.k}[part] + within * head_dim
        return range(offset, offset + head_dim)


@dataclass(frozen=True)
class Attention:
    module: str
    q: Linear | None
    k: Linear | None
    v: Linear | None
    qkv: Linear | None  # the fused projection, when q, k and v come out of one linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool | None  # None: a mask the graph does not show the nature of
    kv_gathered: bool = False  # k/v picked per query head (index_select): heads need not divide evenly
    qkv_layout: QkvLayout | None = None  # how a fused qkv's features are laid out; None: not proven

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    def projections(self) -> tuple[Linear, ...]:
        return tuple(p for p in (self.qkv, self.q, self.k, self.v, self.o) if p is not None)


@dataclass(frozen=True)
class MLP:
    module: str
    up: Linear
    gate: Linear | None
    down: Linear
    activation: str  # "gelu", "gelu_tanh", "silu", "relu", ... or "none"
    # a fused gate|up projection (Phi-3's gate_up_proj): the widths its output is cut into,
    # as the graph cuts it; () when `up` is one part
    up_parts: tuple[int, ...] = ()

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def projections(self) -> tuple[Linear, ...]:
        return tuple(p for p in (self.gate, self.up, self.down) if p is not None)


@dataclass(frozen=True)
class Embedding:
    module: str
    weight: str
    num_embeddings: int
    embedding_dim: int


@dataclass(frozen=True)
class Block:
    name: str
    index: int
    attention: Attention | None
    mlp: MLP | None
    norms: tuple[str, ...]
    params: tuple[str, ...]


@dataclass(frozen=True)
class ModelStructure:
    blocks_path: str | None
    blocks: tuple[Block, ...]
    embeddings: tuple[Embedding, ...]
    head: Linear | None
    final_norm: str | None
    tied: tuple[tuple[str, ...], ...]

    def block_of(self, param_or_module_name: str) -> Block | None:
        """The block holding this parameter or module (or the block itself), else None."""
        for block in self.blocks:
            if _within(param_or_module_name, block.name):
                return block
        return None

    def tied_group(self, param_name: str) -> tuple[str, ...] | None:
        """The names sharing a tensor with `param_name`, itself included, if it is tied."""
        return next((group for group in self.tied if param_name in group), None)


from bmc.analysis.graph_patterns import (  # noqa: E402 - the op tables and walkers the analysis uses
    _ACTIVATIONS, _ATTENTION_OPS, _CAUSAL_MASK_OPS, _EMBEDDING, _MATMUL, _NORM_OPS, _RESHAPE, _SCORES, _SDPA,
    _SOFTMAX, _TO_ATTENTION, _ancestor_ops, _int, _named_args, _op, _path, _tensor_inputs, _walk_back,
    _walk_forward)
from bmc.analysis.graph_patterns import Pieces, taken_apart  # noqa: E402 - how a fused projection is cut


def _within(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def _common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths]
    if not parts:
        return ""
    common = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        common.append(comps[0])
    return ".".join(common)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


# ---------------------------------------------------------------------------- graph context

class _Graph:
    """What every step of the analysis looks up: parameters and their aliases, module
    classes, node order, and the graph's linears."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.param_names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
        self.tensors: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(gm.named_buffers(remove_duplicate=False)))
        self.aliases = _alias_groups(gm)
        self.module_class = _module_classes(self.nodes)
        self.linears: dict[fx.Node, Linear] = {}
        self.linear_input: dict[fx.Node, fx.Node] = {}   # the activation x
        self.linear_weight: dict[fx.Node, fx.Node] = {}  # the weight's get_attr
        for node in self.nodes:
            found = self._as_linear(node)
            if found is not None:
                self.linears[node], self.linear_input[node], self.linear_weight[node] = found

    # --- parameters

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        if node.op != "get_attr":
            return None
        # the graph's shape first: a weight the tp plan splits is held whole by the module
        # until a backend loads the program, while the graph computes a rank's slice
        tensor = tensor_val(node)
        if tensor is None:
            tensor = self.tensors.get(str(node.target))
        return tuple(int(s) for s in tensor.shape) if tensor is not None else None

    def own_name(self, target: str, module: str) -> str:
        """The name of parameter `target` as seen from `module`: export keeps one name for a
        tied tensor in the graph, so an embedding may read "lm_head.weight"; report the
        alias that lies inside the module using it, when there is one."""
        if _within(target, module):
            return target
        for alias in self.aliases.get(target, ()):
            if _within(alias, module):
                return alias
        # After a .pt2 round trip the aliases are separate tensors: the module's own,
        # unused parameter of the same shape is the name export folded into `target`.
        own = f"{module}.weight"
        if own in self.tensors and own != target and self._same_shape(own, target) and self._unused(own):
            return own
        return target

    def _same_shape(self, a: str, b: str) -> bool:
        return tuple(self.tensors[a].shape) == tuple(self.tensors.get(b, self.tensors[a]).shape)

    def _unused(self, name: str) -> bool:
        return all(not n.users for n in self.gm.graph.find_nodes(op="get_attr") if n.target == name)

    # --- linears

    def _as_linear(self, node: fx.Node) -> tuple[Linear, fx.Node, fx.Node] | None:
        """A projection by a parameter: aten.linear, aten.addmm (Conv1D) or mm/matmul."""
        op = _op(node)
        if op == "linear":
            x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            return self._linear(node, x, w, b, transposed=False)
        if op == "addmm":
            b, x, w = node.args[:3]
            return self._linear(node, x, w, b, transposed=True)
        if op in ("mm", "matmul"):
            x, w = node.args[:2]
            return self._linear(node, x, w, self._bias_after(node), transposed=True)
        return None

    def _linear(self, node, x, w, b, transposed: bool) -> tuple[Linear, fx.Node, fx.Node] | None:
        if not isinstance(w, fx.Node) or not isinstance(x, fx.Node):
            return None
        if _op(w) in ("t", "numpy_T", "transpose", "permute") and w.args[0].op == "get_attr":
            w, transposed = w.args[0], not transposed  # x @ W.t(): W is stored (out, in)
        shape = self.shape(w)
        if shape is None or len(shape) != 2:
            return None
        in_f, out_f = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        target = str(w.target)
        where = module_path(node)
        module = where if _within(target, where) or self.own_name(target, where) != target else _parent(target)
        bias = None
        if isinstance(b, fx.Node) and b.op == "get_attr":
            bias = self.own_name(str(b.target), module)
        return Linear(module, self.own_name(target, module), bias, in_f, out_f, transposed), x, w

    def _bias_after(self, node: fx.Node) -> fx.Node | None:
        """mm/matmul + add of a 1-D parameter: the add's parameter is the bias."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if _op(user) != "add":
            return None
        for arg in user.args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and len(self.shape(arg) or ()) == 1:
                return arg
        return None

    # --- module classes and norms

    def class_of(self, path: str) -> str:
        return self.module_class.get(path, "")

    def norm_path(self, node: fx.Node) -> str | None:
        """The norm module this node belongs to, if it is part of a normalization."""
        where = module_path(node)
        if _looks_like_norm(self.class_of(where)):
            return where
        if _op(node) in _NORM_OPS or _is_rms_core(node):
            weight = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
            if weight is None and _op(node) not in _NORM_OPS:  # rsqrt: the weight multiplies later
                weight = _rms_weight(node)
            return _parent(str(weight.target)) if weight is not None else where
        return None


def _alias_groups(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """name -> every name of the same tensor object (identity: data_ptr means nothing on
    meta or fake tensors)."""
    by_id: dict[int, list[str]] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_id.setdefault(id(tensor), []).append(name)
    return {name: tuple(names) for names in by_id.values() if len(names) > 1 for name in names}


def _module_classes(nodes: Iterable[fx.Node]) -> dict[str, str]:
    classes: dict[str, str] = {}
    for node in nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            classes.setdefault(normalize_module_path(path), cls)
    return classes


def _looks_like_norm(class_name: str) -> bool:
    # LayerNorm, LlamaRMSNorm, T5LayerNorm, BatchNorm1d, ...; not NormalizedAttention
    return re.search(r"Norm(\d+d)?$", class_name.rsplit(".", 1)[-1]) is not None


def _is_rms_core(node: fx.Node) -> bool:
    """rsqrt(mean(x ** 2) + eps): a hand-written RMSNorm (HF LlamaRMSNorm, the zoo's)."""
    if _op(node) != "rsqrt":
        return False
    inner = node.args[0]
    if _op(inner) == "add":
        inner = next((a for a in inner.args if isinstance(a, fx.Node)), None)
    return inner is not None and _op(inner) == "mean" and _op(inner.args[0]) in ("pow", "mul", "square")


def _rms_weight(rsqrt: fx.Node, depth: int = 4) -> fx.Node | None:
    """The 1-D parameter that scales the normalized value, a few multiplies downstream."""
    frontier = [rsqrt]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if _op(u) in ("mul", "to", "_to_copy", "type_as")]
        for user in frontier:
            for arg in user.args:
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    return arg
    return None


# ---------------------------------------------------------------------------- walks

def _mask_causal(masks: list[fx.Node]) -> bool | None:
    """True when a mask compares two position tensors (or takes a triangle), False when the
    graph builds it without either, None when it comes from outside the graph."""
    if not masks:
        return False
    unknown = False
    for mask in masks:
        ops, external = _ancestor_ops(mask)
        if ops & _CAUSAL_MASK_OPS:
            return True
        unknown |= external
    return None if unknown else False


# ---------------------------------------------------------------------------- attention

@dataclass
class _Site:
    """One attention computation: its q/k/v inputs, its output, and its mask."""

    anchor: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    causal: bool | None


def _sdpa_sites(g: _Graph) -> list[_Site]:
    sites = []
    for node in g.nodes:
        if _op(node) not in _SDPA:
            continue
        args = _named_args(node)
        out = node if isinstance(node.meta.get("val"), torch.Tensor) else next(
            (u for u in node.users if _op(u) == "getitem" and u.args[1] == 0), node)
        mask = args.get("attn_mask")
        causal = True if args.get("is_causal") else _mask_causal([mask] if isinstance(mask, fx.Node) else [])
        sites.append(_Site(node, args["query"], args["key"], args["value"], out, causal))
    return sites


def _eager_sites(g: _Graph) -> list[_Site]:
    """softmax(q @ k^T [* scale] [+ mask]) @ v written out with matmul/bmm."""
    sites = []
    for node in g.nodes:
        if _op(node) not in _SOFTMAX:
            continue
        is_scores = lambda n: _op(n) in _MATMUL and n not in g.linears  # noqa: E731
        found, toward = _walk_back(node, lambda n: _op(n) in _SCORES, is_scores)
        if not found:
            continue
        qk = found[0]
        on_path = set(_path(toward, qk))
        masks = [inp for n in on_path if _op(n) in ("add", "sub", "where", "masked_fill")
                 for inp in _tensor_inputs(n) if inp not in on_path]
        pv = _walk_forward(node, lambda n: _op(n) in _RESHAPE,
                           lambda user, inp: is_scores(user) and user.args[0] is inp)
        if pv is None:
            continue
        sites.append(_Site(qk, qk.args[0], qk.args[1], pv.args[1], pv, _mask_causal(masks)))
    return sites


def _producer(g: _Graph, node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The linear that `node` (a q, k or v at the attention op) was projected by, and the
    path from it to `node`."""
    found, toward = _walk_back(node, lambda n: _op(n) in _TO_ATTENTION, lambda n: n in g.linears)
    if not found:
        return None
    return found[0], _path(toward, found[0])


def _qkv_layout(pieces: Pieces | None, paths: list[list[fx.Node]], q_heads: int | None,
                head_dim: int) -> QkvLayout | None:
    """The fused layout, when the graph proves it: the projection's features cut into three
    pieces (per block) of which the first reaches q, the second k and the third v; k and v
    equally wide; whole heads in each; and, interleaved, as many query heads as q has at the
    attention op."""
    if pieces is None or len(pieces.bounds) != 3:
        return None
    if any(node is None or node not in path for node, path in zip(pieces.nodes, paths)):
        return None
    q, k, v = pieces.widths
    if k != v or any(w % head_dim for w in (q, k)):
        return None
    layout = QkvLayout(pieces.groups, q, k, v, pieces.how)
    if layout.interleaved and q_heads is not None and q_heads != layout.groups * q // head_dim:
        return None
    return layout


def _fused_widths_from_shapes(qkv: Linear, site: _Site, head_dim: int) -> tuple[int, int]:
    """No provable layout: q is never repeated, so its head count is its heads dim at the
    attention op; k and v share what is left. Counts for the report only: passes that split
    or remove heads refuse a fused projection without a layout."""
    q_val = tensor_val(site.q)
    heads = _int(q_val.shape[-3]) if q_val is not None and q_val.dim() >= 3 else None
    q_width = heads * head_dim if heads else qkv.out_features // 3
    return q_width, (qkv.out_features - q_width) // 2


def _attention(g: _Graph, site: _Site) -> Attention | None:
    produced = [_producer(g, x) for x in (site.q, site.k, site.v)]
    o_node = _walk_forward(site.out, lambda n: _op(n) in _RESHAPE,
                           lambda user, inp: user in g.linears and g.linear_input[user] is inp)
    if any(p is None for p in produced) or o_node is None:
        return None  # not a projected self/cross attention this analysis can describe
    (q_lin, q_path), (k_lin, k_path), (_v_lin, _v_path) = produced
    q_val = tensor_val(site.q)
    head_dim = _int(q_val.shape[-1]) if q_val is not None else None
    if not head_dim:
        raise StructureError(f"attention at {module_path(site.anchor) or site.anchor.name}: "
                             f"cannot read head_dim from q's shape")
    lins = [p[0] for p in produced]
    fused = lins[0] is lins[1] is lins[2]
    layout = None
    if fused:
        q_heads = _int(q_val.shape[-3]) if q_val.dim() >= 3 else None
        pieces = taken_apart(q_lin)
        layout = _qkv_layout(pieces, [q_path, k_path, _v_path], q_heads, head_dim)
        if layout is not None:
            q_width, k_width = layout.groups * layout.q, layout.groups * layout.k
            k_path = k_path[k_path.index(pieces.nodes[1]):]  # k's own way: a gather before the cut is not per head
        else:
            q_width, k_width = _fused_widths_from_shapes(g.linears[q_lin], site, head_dim)
    else:
        q_width, k_width = g.linears[q_lin].out_features, g.linears[k_lin].out_features
    where = module_path(site.anchor) or site.anchor.name
    gathered = any(_op(n) == "index_select" for n in k_path) and not (fused and layout is None)
    num_heads, num_kv_heads = _heads(where, q_width, k_width, head_dim, gathered)
    projections = [g.linears[n] for n in lins] + [g.linears[o_node]]
    q, k, v = (None, None, None) if fused else tuple(g.linears[n] for n in lins)
    return Attention(module=_common_prefix(p.module for p in projections) or where,
                     q=q, k=k, v=v, qkv=g.linears[q_lin] if fused else None, o=g.linears[o_node],
                     num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=site.causal,
                     kv_gathered=gathered, qkv_layout=layout)


def _heads(where: str, q_width: int, k_width: int, head_dim: int, gathered: bool = False) -> tuple[int, int]:
    for name, width in (("q", q_width), ("k", k_width)):
        if width % head_dim:
            raise StructureError(f"attention {where}: {name} projection width {width} is not a multiple "
                                 f"of head_dim {head_dim}")
    num_heads, num_kv_heads = q_width // head_dim, k_width // head_dim
    if not num_kv_heads or (num_heads % num_kv_heads and not gathered):
        raise StructureError(f"attention {where}: {num_heads} query heads cannot share "
                             f"{num_kv_heads} key/value heads evenly")
    return num_heads, num_kv_heads


# ---------------------------------------------------------------------------- MLP

def _mlp(g: _Graph, block: str, candidates: list[fx.Node]) -> MLP | None:
    """down: the linear fed by other linears of the block through an activation (and, for
    SwiGLU/GeGLU, an elementwise product); gate: the feeder that passes the activation."""
    best = None
    for node in candidates:
        feeders, region = _feeders(g, block, node, candidates)
        if feeders and (best is None or len(feeders) >= len(best[1])):
            best = (node, feeders, region)
    if best is None:
        return None
    down, feeders, region = best
    activated = _activated(region, feeders)
    if len(feeders) == 1:
        up, gate = feeders[0], None
    else:
        gates = [f for f in feeders if f in activated] or [
            f for f in feeders if "gate" in g.linears[f].weight] or feeders[:1]
        gate = gates[0]
        up = next(f for f in feeders if f is not gate)
    projections = [g.linears[n] for n in (gate, up, down) if n is not None]
    return MLP(module=_common_prefix(p.module for p in projections) or block,
               up=g.linears[up], gate=g.linears[gate] if gate is not None else None, down=g.linears[down],
               activation=_activation_name(region), up_parts=_fused_parts(up, region) if gate is None else ())


def _fused_parts(up: fx.Node, region: list[fx.Node]) -> tuple[int, ...]:
    """The widths a lone feeder's output is cut into on its way to the down projection
    (every piece read inside the MLP), or () when it is used whole."""
    pieces = taken_apart(up)
    inside = set(region)
    if pieces is None or pieces.groups != 1 or any(n is None or n not in inside for n in pieces.nodes):
        return ()
    return pieces.widths


def _feeders(g: _Graph, block: str, linear: fx.Node, candidates: list[fx.Node],
             ) -> tuple[list[fx.Node], list[fx.Node]]:
    """The candidate linears whose outputs reach `linear`'s input without crossing a norm, an
    attention op or the block's edge; and the nodes walked on the way."""
    def stop(n: fx.Node) -> bool:
        return n in g.linears

    def through(n: fx.Node) -> bool:
        return (n.op == "call_function" and _within(module_path(n), block) and g.norm_path(n) is None
                and _op(n) not in _ATTENTION_OPS)

    found, toward = _walk_back(g.linear_input[linear], through, stop)
    region = [n for n in toward if n not in g.linears and through(n)]
    return [n for n in found if n in candidates], region


def _activated(region: list[fx.Node], feeders: list[fx.Node]) -> set[fx.Node]:
    """The feeders whose way to the down projection passes an activation function."""
    inside = set(region)
    result: set[fx.Node] = set()
    for node in region:
        if _op(node) in _ACTIVATIONS:
            found, _ = _walk_back(node, lambda n: n in inside, lambda n: n in feeders)
            result.update(found)
    return result


def _activation_name(region: list[fx.Node]) -> str:
    ops = {_op(n): n for n in region}
    if "gelu" in ops:
        return "gelu_tanh" if _named_args(ops["gelu"]).get("approximate") == "tanh" else "gelu"
    if "tanh" in ops and "pow" in ops:
        return "gelu_tanh"  # 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), HF's NewGELUActivation
    if "erf" in ops:
        return "gelu"  # 0.5x(1 + erf(x / sqrt 2)) written out
    if "sigmoid" in ops:
        sig = ops["sigmoid"]
        if any(_op(u) == "mul" and sig.args[0] in u.args for u in sig.users):
            return "silu"  # x * sigmoid(x)
        return "gelu_quick" if _op(sig.args[0]) == "mul" else "sigmoid"
    if "relu" in ops:
        return "relu2" if "pow" in ops or "square" in ops else "relu"
    for name in sorted(_ACTIVATIONS):
        if name in ops:
            return name
    return "none"


# ---------------------------------------------------------------------------- blocks

def _find_blocks(g: _Graph) -> tuple[str | None, list[int]]:
    """The repeated ModuleList: a prefix P with children P.0, P.1, ... (of one module class)
    that holds the most parameters; the outermost such list on a tie."""
    counts: dict[str, Counter] = {}
    for name in g.param_names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and i > 0:
                counts.setdefault(".".join(parts[:i]), Counter())[int(part)] += 1
    if not counts:
        return None, []

    def rank(prefix: str):
        classes = {g.class_of(f"{prefix}.{i}") for i in counts[prefix]} - {""}
        return (len(classes) <= 1, sum(counts[prefix].values()), -prefix.count("."))

    prefix = max(counts, key=rank)
    return prefix, sorted(counts[prefix])


class _Blocks:
    """Which block a parameter, module or node lies in: P.<i>.… belongs to block P.<i>."""

    def __init__(self, path: str | None, indices: list[int]):
        self.path = path
        self.names = [f"{path}.{i}" for i in indices]
        self._known = set(self.names)

    def of(self, name: str) -> str | None:
        if self.path is None or not name.startswith(self.path + "."):
            return None
        index = name[len(self.path) + 1:].split(".", 1)[0]
        block = f"{self.path}.{index}"
        return block if block in self._known else None


# ---------------------------------------------------------------------------- embeddings, head

def _embeddings(g: _Graph) -> tuple[list[Embedding], dict[str, str]]:
    """Every embedding lookup by a parameter, and each one's graph-level weight target."""
    found: dict[str, Embedding] = {}
    targets: dict[str, str] = {}
    for node in g.nodes:
        if _op(node) not in _EMBEDDING or not isinstance(node.args[0], fx.Node):
            continue
        shape = g.shape(node.args[0])
        if shape is None or len(shape) != 2:
            continue
        module = module_path(node)
        target = str(node.args[0].target)
        if module not in found:
            found[module] = Embedding(module, g.own_name(target, module), shape[0], shape[1])
            targets[module] = target
    return list(found.values()), targets


def _vocab_sizes(g: _Graph, embeddings: list[Embedding]) -> set[int]:
    """Sizes of the embeddings indexed by a graph input (token ids), not by positions or types."""
    by_module = {e.module: e for e in embeddings}
    sizes = set()
    for node in g.nodes:
        if _op(node) in _EMBEDDING and module_path(node) in by_module:
            found, _ = _walk_back(node.args[1], lambda n: _op(n) in _RESHAPE, lambda n: n.op == "placeholder")
            if found:
                sizes.add(by_module[module_path(node)].num_embeddings)
    return sizes or {max((e.num_embeddings for e in embeddings), default=-1)}


def _reaches_output(g: _Graph) -> set[fx.Node]:
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    seen = {out}
    queue = deque([out])
    while queue:
        for inp in queue.popleft().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                queue.append(inp)
    return seen


def _head(g: _Graph, blocks: _Blocks, vocab: set[int]) -> fx.Node | None:
    """The last linear outside the blocks that projects onto the vocabulary and feeds the output."""
    live = _reaches_output(g)
    heads = [n for n, lin in g.linears.items() if lin.out_features in vocab and n in live
             and blocks.of(lin.weight) is None]
    return heads[-1] if heads else None


def _tied(g: _Graph, uses: list[tuple[str, str]]) -> tuple[tuple[str, ...], ...]:
    """Groups of names of one tensor: object identity among the parameters, plus the names
    export folded together (one get_attr target read under several modules' names)."""
    params = set(g.param_names)
    groups: list[set[str]] = [set(names) for names in {tuple(sorted(v)) for v in g.aliases.values()}
                              if params.intersection(names)]
    by_target: dict[str, set[str]] = {}
    for target, name in uses:
        by_target.setdefault(target, {target}).add(name)
    for names in by_target.values():
        if len(names) > 1:
            groups.append(set(names))
    merged: list[set[str]] = []
    for group in groups:  # union the overlapping groups
        for other in [m for m in merged if m & group]:
            group |= other
            merged.remove(other)
        merged.append(group)
    return tuple(sorted(tuple(sorted(m)) for m in merged))


# ---------------------------------------------------------------------------- analyze

def analyze(gm: fx.GraphModule) -> ModelStructure:
    """The structure of a traced model, read from the graph alone."""
    g = _Graph(gm)
    blocks = _Blocks(*_find_blocks(g))
    node_block = {n: blocks.of(module_path(n)) for n in g.nodes if n.op == "call_function"}
    norm_of = {n: p for n in node_block for p in [g.norm_path(n)] if p is not None}

    attentions: dict[str, Attention] = {}
    sites = sorted(_sdpa_sites(g) + _eager_sites(g), key=lambda s: g.order[s.anchor])
    for site in sites:
        block = node_block.get(site.anchor)
        if block is not None and block not in attentions:
            attention = _attention(g, site)
            if attention is not None:
                attentions[block] = attention

    norms: dict[str, dict[str, None]] = {name: {} for name in blocks.names}
    for node, path in norm_of.items():
        if node_block[node] is not None:
            norms[node_block[node]][path] = None
    built = [_block(g, name, int(name.rsplit(".", 1)[1]), attentions.get(name), tuple(norms[name]))
             for name in blocks.names]
    embeddings, emb_targets = _embeddings(g)
    head_node = _head(g, blocks, _vocab_sizes(g, embeddings))
    head = g.linears[head_node] if head_node is not None else None
    uses = [(emb_targets[e.module], e.weight) for e in embeddings]
    if head_node is not None:
        uses.append((str(g.linear_weight[head_node].target), head.weight))
    return ModelStructure(blocks_path=blocks.path, blocks=tuple(built), embeddings=tuple(embeddings),
                          head=head, final_norm=_final_norm(g, node_block, norm_of), tied=_tied(g, uses))


def _block(g: _Graph, name: str, index: int, attention: Attention | None, norms: tuple[str, ...]) -> Block:
    taken = {p.weight for p in attention.projections()} if attention else set()
    candidates = [n for n, lin in g.linears.items() if _within(lin.weight, name) and lin.weight not in taken]
    return Block(name=name, index=index, attention=attention, mlp=_mlp(g, name, candidates),
                 norms=norms, params=tuple(p for p in g.param_names if _within(p, name)))


def _final_norm(g: _Graph, node_block: dict, norm_of: dict) -> str | None:
    """The last norm outside the blocks that runs after the last block."""
    last_block = max((g.order[n] for n, b in node_block.items() if b is not None), default=-1)
    after = [path for n, path in norm_of.items() if g.order[n] > last_block and node_block[n] is None]
    return after[-1] if after else None


# ---------------------------------------------------------------------------- cache

def _fingerprint(gm: fx.GraphModule) -> tuple:
    # id(graph) alone can be reused after a graph is freed, and a pass may edit a graph in
    # place: node names (unique, never reused within a graph) catch both cheaply.
    names = tuple(n.name for n in gm.graph.nodes)
    return id(gm.graph), len(names), hash(names), tuple(name for name, _ in gm.named_parameters(remove_duplicate=False))


def structure_of(gm: fx.GraphModule) -> ModelStructure:
    """`analyze(gm)`, cached in gm.meta["bmc.structure"] until the graph or parameters change."""
    key = _fingerprint(gm)
    cached = gm.meta.get(CACHE_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    structure = analyze(gm)
    gm.meta[CACHE_KEY] = (key, structure)
    return structure


# ---------------------------------------------------------------------------- printing

def _short(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if _within(path, prefix) and path != prefix else path


def _attention_cells(a: Attention | None, block: str) -> list[str]:
    if a is None:
        return ["-", "-", "-", "-", "-"]
    kind = f"fused {_short(a.qkv.module, block)}" if a.fused else "q,k,v"
    causal = {True: "yes", False: "no", None: "?"}[a.causal]
    return [kind, str(a.num_heads), str(a.num_kv_heads), str(a.head_dim), causal]


def _mlp_cells(m: MLP | None) -> list[str]:
    if m is None:
        return ["-", "-", "-"]
    return ["gated" if m.gated else "plain", m.activation, str(m.up.out_features)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_structure(s: ModelStructure) -> str:
    """A fixed-width table: one row per block, then embeddings, head, final norm and ties."""
    lines = [f"blocks: {s.blocks_path or '-'} ({len(s.blocks)})"]
    header = ["block", "attention", "heads", "kv", "head_dim", "causal", "mlp", "act", "ffn", "norms"]
    rows = [[b.name] + _attention_cells(b.attention, b.name) + _mlp_cells(b.mlp)
            + [", ".join(_short(n, b.name) for n in b.norms) or "-"] for b in s.blocks]
    if rows:
        lines += _table(header, rows)
    lines.append("embeddings: " + (", ".join(f"{e.module} [{e.num_embeddings} x {e.embedding_dim}]"
                                             for e in s.embeddings) or "-"))
    h = s.head
    lines.append("head: " + (f"{h.module} ({h.in_features} -> {h.out_features}, weight {h.weight})" if h else "-"))
    lines.append(f"final norm: {s.final_norm or '-'}")
    lines.append("tied: " + ("; ".join(" = ".join(group) for group in s.tied) or "-"))
    return "\n".join(lines) + "\n"
