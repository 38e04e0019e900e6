"""The bmc IR: the `node.meta` schema, its typed accessors, and graph helpers.

bmc's annotations live only in `node.meta` under namespaced "bmc.*" keys, each holding a
frozen dataclass. Passes read and write them through `get` / `annotate` so that the verifier
can check every key and every value type in one place.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, TypeVar

import sympy
import torch
import torch.fx as fx

from bmc.errors import VerificationError

# ---------------------------------------------------------------------------- schema

PLACEMENT_KINDS = ("shard", "replicate", "partial")


@dataclass(frozen=True)
class Placement:
    """How a tensor lies along one mesh axis ("dp", "tp", "pp", "sp"), as in DTensor."""

    axis: str
    kind: str = "replicate"
    dim: int | None = None  # the tensor dim split across the axis, for kind == "shard"

    def __post_init__(self):
        if self.kind not in PLACEMENT_KINDS:
            raise ValueError(f"placement kind must be one of {PLACEMENT_KINDS}, got {self.kind!r}")
        if (self.kind == "shard") != (self.dim is not None):
            raise ValueError("a shard placement needs a dim; replicate and partial take none")


@dataclass(frozen=True)
class Shard:
    """`bmc.shard`: the tensor's placement on each mesh axis it is distributed over."""

    key: ClassVar[str] = "bmc.shard"
    placements: tuple[Placement, ...] = ()

    def sharded_axes(self) -> dict[int, tuple[str, ...]]:
        """tensor dim -> the mesh axes splitting it."""
        dims: dict[int, tuple[str, ...]] = {}
        for p in self.placements:
            if p.kind == "shard":
                dims[p.dim] = dims.get(p.dim, ()) + (p.axis,)
        return dims

    def __str__(self):
        return "[" + ", ".join(f"{p.axis}:{p.kind}" + (f"({p.dim})" if p.dim is not None else "")
                               for p in self.placements) + "]"


@dataclass(frozen=True)
class Stage:
    """`bmc.stage`: the pipeline stage that computes this node."""

    key: ClassVar[str] = "bmc.stage"
    index: int

    def __str__(self):
        return str(self.index)


@dataclass(frozen=True)
class Remat:
    """`bmc.remat`: recompute this node in backward instead of saving its output."""

    key: ClassVar[str] = "bmc.remat"
    policy: str
    region: str = ""

    def __str__(self):
        return f"{self.policy}" + (f"@{self.region}" if self.region else "")


@dataclass(frozen=True)
class Quant:
    """`bmc.quant`: how the weights of this node are quantized."""

    key: ClassVar[str] = "bmc.quant"
    dtype: str = "int8"
    granularity: str = "row"
    act: str = "none"

    def __str__(self):
        return f"{self.dtype}/{self.granularity}/act={self.act}"


@dataclass(frozen=True)
class Zero:
    """`bmc.zero`: how data parallelism keeps this parameter's states. Stage 0 replicates
    weights, gradients and optimizer states (plain data parallel); ZeRO-1 shards optimizer
    states over `axis`, ZeRO-2 also gradients, ZeRO-3 also the weights. Gradients and
    optimizer states are not graph values, so their sharding is recorded here, on the
    parameter, where the cost model and the backend read it."""

    key: ClassVar[str] = "bmc.zero"
    stage: int
    axis: str = "dp"

    def __str__(self):
        return f"stage{self.stage}@{self.axis}"


@dataclass(frozen=True)
class Origin:
    """`bmc.origin`: the pass that created this node and the node it came from."""

    key: ClassVar[str] = "bmc.origin"
    pass_name: str
    source: str

    def __str__(self):
        return f"{self.pass_name}({self.source})"


@dataclass(frozen=True)
class Cost:
    """`bmc.cost`: per-node forward FLOPs, output bytes and bytes saved for backward, as sympy
    expressions in the batch (B) and sequence (S) symbols."""

    key: ClassVar[str] = "bmc.cost"
    flops: sympy.Expr
    out_bytes: sympy.Expr
    saved_bytes: sympy.Expr

    def __str__(self):
        return f"flops={self.flops}, saved={self.saved_bytes} bytes"


@dataclass(frozen=True)
class Region:
    """`bmc.region`: this node runs inside a fused region `name` that `wrapper` ("checkpoint":
    recomputed in backward; "offload": saved tensors in host memory) runs, as `pass_name`'s
    `policy` chose. It travels with the node through a .pt2 archive, so a loaded program gets
    its regions back."""

    key: ClassVar[str] = "bmc.region"
    wrapper: str
    pass_name: str
    policy: str
    name: str

    def __str__(self):
        return f"{self.wrapper}:{self.name}"


SCHEMA: dict[str, type] = {cls.key: cls for cls in (Shard, Stage, Remat, Quant, Zero, Origin, Cost, Region)}

T = TypeVar("T")


def get(node: fx.Node, kind: type[T]) -> T | None:
    """The node's annotation of this kind, or None."""
    return node.meta.get(kind.key)


def annotate(node: fx.Node, value: Any) -> None:
    """Set (or replace) one bmc annotation on a node."""
    if type(value) not in SCHEMA.values():
        raise TypeError(f"{type(value).__name__} is not a bmc annotation; known: {sorted(SCHEMA)}")
    node.meta[value.key] = value


def clear(node: fx.Node, kind: type) -> None:
    node.meta.pop(kind.key, None)


MESH_AXES = ("pp", "dp", "tp", "sp")  # the order placements are listed in, whichever pass adds them


def place(node: fx.Node, placement: Placement) -> None:
    """Set this node's placement on one mesh axis, keeping its placements on the others (tp
    and zero annotate the same weights, in either order)."""
    current = get(node, Shard)
    others = [p for p in (current.placements if current else ()) if p.axis != placement.axis]
    ordered = sorted([*others, placement], key=lambda p: MESH_AXES.index(p.axis) if p.axis in MESH_AXES else 99)
    annotate(node, Shard(tuple(ordered)))


def annotations(node: fx.Node) -> Iterator[tuple[str, Any]]:
    """Every bmc.* annotation of the node, in schema order."""
    for key in SCHEMA:
        if key in node.meta:
            yield key, node.meta[key]


def check_annotations(node: fx.Node) -> None:
    """Every bmc.* meta key is in the schema and holds its dataclass."""
    for key, value in node.meta.items():
        if not key.startswith("bmc."):
            continue
        cls = SCHEMA.get(key)
        if cls is None:
            raise VerificationError(f"node {node.name}: unknown annotation {key!r}; known: {sorted(SCHEMA)}")
        if not isinstance(value, cls):
            raise VerificationError(f"node {node.name}: {key} holds {type(value).__name__}, expected {cls.__name__}")


# ------------------------------------------------------- serialization (for .pt2 files)
# torch.export.save keeps node.meta["custom"] (JSON-able values only), so bmc annotations
# travel there as JSON and are restored on load.

CUSTOM_KEY = "bmc"


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, sympy.Basic):
        return {"__sympy__": sympy.srepr(value)}
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    return value


def _from_jsonable(cls: type, data: dict) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        raw = data[f.name]
        if isinstance(raw, dict) and "__sympy__" in raw:
            raw = sympy.sympify(raw["__sympy__"])
        elif cls is Shard and f.name == "placements":
            raw = tuple(Placement(**p) for p in raw)
        kwargs[f.name] = raw
    return cls(**kwargs)


def annotations_to_json(node: fx.Node) -> str | None:
    found = {key: _to_jsonable(value) for key, value in annotations(node)}
    return json.dumps(found, sort_keys=True) if found else None


def annotations_from_json(node: fx.Node, text: str) -> None:
    for key, data in json.loads(text).items():
        annotate(node, _from_jsonable(SCHEMA[key], data))


# ------------------------------------------------------------------ graph helpers

CARRIED_META = ("val", "stack_trace", "nn_module_stack", "tensor_meta")


def copy_meta(src: fx.Node, dst: fx.Node, pass_name: str, *, keep_val: bool = False) -> None:
    """Carry the meta a rewritten node inherits and record where it came from."""
    for key in CARRIED_META:
        if key in src.meta and not (keep_val and key in ("val", "tensor_meta") and key in dst.meta):
            dst.meta[key] = src.meta[key]
    annotate(dst, Origin(pass_name, src.name))


def replace_node(old: fx.Node, new: fx.Node, pass_name: str, *, keep_val: bool = False) -> fx.Node:
    """Replace every use of `old` by `new`, carry meta and provenance over, erase `old`.

    `keep_val=True` keeps `new`'s own `val` (when the rewrite changes the shape, e.g. a
    sharded linear)."""
    copy_meta(old, new, pass_name, keep_val=keep_val)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
    return new


def replace_tensor(gm: fx.GraphModule, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` wherever the module tree holds `old` as a parameter or buffer (a tied weight
    under each of its names, fused regions' submodules included)."""
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is old:
                    table[name] = new


def parameter_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Dotted parameter/buffer name -> its get_attr node."""
    return {str(n.target): n for n in gm.graph.find_nodes(op="get_attr")}


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced this node ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_path(path)


def normalize_module_path(path: str) -> str:
    # export writes ModuleList entries as "h.0" but sometimes as "h[0]" / "getattr(L['self'].h, '0')"
    return path.replace("[", ".").replace("]", "").replace("L['self'].", "")


def tensor_val(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


# -------------------------------------------------------------------- printing

DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


def rename_symbols(expr: sympy.Expr, names: dict, **assumptions) -> sympy.Expr:
    """Replace export's shape symbols (s72) by bmc's names (B); matched by name because
    sympy symbols with different assumptions are different symbols."""
    expr = sympy.sympify(expr)
    return expr.xreplace({sym: sympy.Symbol(names[sym.name], **assumptions)
                          for sym in expr.free_symbols if sym.name in names})


def _dim_str(size: Any, symbols: dict) -> str:
    if isinstance(size, torch.SymInt):
        return str(rename_symbols(size.node.expr, symbols))
    return str(size)


def type_str(val: Any, symbols: dict | None = None) -> str:
    """f32[B, S, 64] for a tensor, the Python type for anything else."""
    symbols = symbols or {}
    if isinstance(val, torch.Tensor):
        dtype = DTYPE_SHORT.get(val.dtype, str(val.dtype).replace("torch.", ""))
        return f"{dtype}[{', '.join(_dim_str(s, symbols) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_str(v, symbols) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"sym({_dim_str(val, symbols)})"
    return type(val).__name__ if val is not None else "?"


def _arg_str(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (tuple, list)):
        inner = ", ".join(_arg_str(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, torch.dtype):
        return DTYPE_SHORT.get(arg, str(arg))
    return repr(arg)


def target_str(node: fx.Node) -> str:
    """aten.linear for an OpOverload (".default" dropped), getitem for a builtin."""
    if node.op != "call_function":
        return str(node.target)
    text = str(node.target)
    if text.startswith("<"):
        return getattr(node.target, "__name__", text)
    return text.removesuffix(".default")


def format_node(node: fx.Node, symbols: dict | None = None) -> str:
    symbols = symbols or {}
    ty = type_str(node.meta.get("val"), symbols)
    if node.op == "placeholder":
        body = "input"
    elif node.op == "get_attr":
        body = f"param {node.target}" if node.meta.get("val") is not None else f"module {node.target}"
    elif node.op == "output":
        return "return " + _arg_str(node.args[0])
    else:
        args = [_arg_str(a) for a in node.args] + [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
        body = f"{target_str(node)}({', '.join(args)})"
    # bmc.origin is provenance for bmc.check, not part of what the node computes: left out, as
    # MLIR leaves out locations unless asked
    notes = [f"{key}={value}" for key, value in annotations(node)
             if key != Origin.key and not (key == Cost.key and value.flops == 0 and value.saved_bytes == 0)]
    where = module_path(node)
    line = f"%{node.name} : {ty} = {body}" if node.meta.get("val") is not None else f"%{node.name} = {body}"
    if notes:
        line += "  {" + "; ".join(notes) + "}"
    if where and node.op == "call_function":
        line += f"  @{where}"
    return line


def format_graph(gm: fx.GraphModule, title: str = "") -> str:
    """A readable listing: one line per node with its type, op, bmc annotations and module."""
    info = gm.meta.get("bmc.trace")
    symbols = info.symbols if info is not None else {}
    lines = [f"graph {title or (info.model_name if info else type(gm).__name__)} "
             f"({len(gm.graph.nodes)} nodes)"]
    lines += ["  " + format_node(node, symbols) for node in gm.graph.nodes]
    return "\n".join(lines) + "\n"


def to_dot(gm: fx.GraphModule, title: str = "graph") -> str:
    """Graphviz source of the graph; parameters are drawn as boxes, collectives and bmc ops
    highlighted, each node labelled with its op and type."""
    info = gm.meta.get("bmc.trace")
    symbols = info.symbols if info is not None else {}
    out = [f"digraph {json.dumps(title)} {{", "  rankdir=TB; node [fontname=monospace, fontsize=9];"]
    for node in gm.graph.nodes:
        label = f"{node.name}\\n{target_str(node) if node.op == 'call_function' else node.op}" \
                f"\\n{type_str(node.meta.get('val'), symbols)}"
        shape = "box" if node.op in ("get_attr", "placeholder", "output") else "ellipse"
        color = ', style=filled, fillcolor="#ffd59a"' if str(node.target).startswith("bmc.") else ""
        out.append(f"  {json.dumps(node.name)} [label={json.dumps(label).replace(chr(92) * 2, chr(92))}, "
                   f"shape={shape}{color}];")
        for inp in node.all_input_nodes:
            out.append(f"  {json.dumps(inp.name)} -> {json.dumps(node.name)};")
    out.append("}")
    return "\n".join(out) + "\n"
