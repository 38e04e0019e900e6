"""The cost model: bytes and FLOPs per node and per rank as sympy expressions.

Symbols: B (batch per rank), S (sequence length), N_d / N_t / N_p (data, tensor and pipeline
parallel degrees), b_<dtype> (bytes of one element of that dtype) and K (optimizer-state bytes
per trainable parameter). Expressions come from the graph itself: parameter shapes, dtypes and
bmc.shard / bmc.stage annotations; activation shapes from node.meta["val"] (symbolic in B and S
when the graph was traced with dynamic=True). `evaluate` turns them into numbers.

Model states follow the ZeRO paper (Rajbhandari et al. 2020): with mixed-precision Adam a
parameter costs 2 (fp16 weight) + 2 (fp16 grad) + K=12 (fp32 master, momentum, variance) bytes;
ZeRO-1 shards the K part over N_d, ZeRO-2 also the gradients, ZeRO-3 also the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import sympy
import torch
import torch.fx as fx

from bmc import ir
from bmc.ir.trace import BATCH, SEQ, trace_info

B, S = sympy.symbols(f"{BATCH} {SEQ}", positive=True, integer=True)
N_d, N_t, N_p = sympy.symbols("N_d N_t N_p", positive=True, integer=True)
K = sympy.Symbol("K", positive=True)
AXIS_DEGREE = {"dp": N_d, "tp": N_t, "pp": N_p, "sp": N_t}

# Optimizer states per trainable parameter, each kept in fp32.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd-momentum": 1, "sgd": 0}
MASTER_BYTES = 4  # fp32 master weights and optimizer states, as in mixed-precision training


def dtype_symbol(dtype: torch.dtype) -> sympy.Symbol:
    return sympy.Symbol(f"b_{ir.DTYPE_SHORT.get(dtype, str(dtype).replace('torch.', ''))}", positive=True)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ------------------------------------------------------------------ per node

def _sym(size, symbols: Mapping[str, str]) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return ir.rename_symbols(size.node.expr, symbols, positive=True, integer=True)
    return sympy.Integer(int(size))


def numel(val: torch.Tensor, symbols: Mapping[str, str]) -> sympy.Expr:
    out = sympy.Integer(1)
    for size in val.shape:
        out *= _sym(size, symbols)
    return out


def tensor_bytes(val: torch.Tensor, symbols: Mapping[str, str]) -> sympy.Expr:
    return numel(val, symbols) * element_size(val.dtype)


def _matmul_flops(node: fx.Node, symbols) -> sympy.Expr:
    """2*M*N*K for the matmul family, counted as torch.utils.flop_counter counts them."""
    out = ir.tensor_val(node)
    name = ir.target_str(node)
    if name in ("aten.addmm", "aten.baddbmm"):
        reduce_dim = ir.tensor_val(node.args[1]).shape[-1]
    else:
        reduce_dim = ir.tensor_val(node.args[0]).shape[-1]
    return 2 * numel(out, symbols) * _sym(reduce_dim, symbols)


def _sdpa_flops(node: fx.Node, symbols) -> sympy.Expr:
    q, k = ir.tensor_val(node.args[0]), ir.tensor_val(node.args[1])
    batch_heads = numel(q, symbols) / _sym(q.shape[-1], symbols) / _sym(q.shape[-2], symbols)
    # Q @ K^T and P @ V, each 2*Sq*Sk*D per head
    return 4 * batch_heads * _sym(q.shape[-2], symbols) * _sym(k.shape[-2], symbols) * _sym(q.shape[-1], symbols)


FLOP_RULES = {
    "aten.linear": _matmul_flops, "aten.mm": _matmul_flops, "aten.addmm": _matmul_flops,
    "aten.bmm": _matmul_flops, "aten.matmul": _matmul_flops, "aten.baddbmm": _matmul_flops,
    "aten.scaled_dot_product_attention": _sdpa_flops,
    "bmc.int8_linear": _matmul_flops,
}

# What each op keeps alive for its backward: "inputs" (tensor args that are activations),
# "output", or "input0" (first arg only). Ops not listed save nothing (views, add, cat, ...).
SAVED_RULES = {
    "aten.linear": "input0", "bmc.int8_linear": "input0", "aten.mm": "inputs", "aten.addmm": "input1", "aten.bmm": "inputs",
    "aten.matmul": "inputs", "aten.baddbmm": "inputs",
    "aten.scaled_dot_product_attention": "attention",
    "aten.layer_norm": "norm", "aten.rms_norm": "norm", "aten.native_layer_norm": "norm",
    "aten.gelu": "input0", "aten.silu": "input0", "aten.sigmoid": "output", "aten.tanh": "output",
    "aten.relu": "output", "aten.exp": "output", "aten.rsqrt": "output", "aten.sqrt": "output",
    "aten.softmax.int": "output", "aten._softmax": "output", "aten.log_softmax.int": "output",
    "aten._log_softmax": "output", "aten.pow.Tensor_Scalar": "input0",
    "aten.mul.Tensor": "inputs", "aten.div.Tensor": "inputs",
    "aten.dropout": "mask", "aten.embedding": "indices",
    # cross-entropy is log_softmax + nll_loss underneath: it keeps the log-probabilities
    # (the logits' size) and the targets
    "aten.cross_entropy_loss": "log-softmax-loss", "aten.nll_loss_forward": "input0",
    # torch.utils.checkpoint keeps only the region's inputs; the rest is recomputed
    "checkpoint": "region-inputs",
    # insert-offload keeps what its region saves in host memory: nothing stays on the device
    "offload_saved": "nothing",
}

# Ops whose output shares storage with their first input: saving the view keeps the base alive.
VIEW_OPS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose.int", "aten.permute",
            "aten.expand", "aten.unsqueeze", "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int",
            "aten.t", "aten.contiguous", "aten.alias", "aten.split.Tensor", "aten.chunk", "getitem",
            "aten.unflatten.int", "aten.flatten.using_ints", "aten.view.dtype", "aten.detach"}


def storage_root(node: fx.Node) -> fx.Node:
    """The node that owns the storage this node's value lives in. (A reshape of a
    non-contiguous tensor copies; treating it as a view undercounts by a few percent on
    grouped-query attention, which tests bound.)"""
    while ir.target_str(node) in VIEW_OPS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_activation(node: fx.Node) -> bool:
    return node.op != "get_attr" and isinstance(ir.tensor_val(node), torch.Tensor)


def nodes_needing_grad(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a trainable parameter: only they take part in backward,
    so only they save anything."""
    trainable = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    needs: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if str(node.target) in trainable:
                needs.add(node)
        elif node.op == "call_function" and any(a in needs for a in node.all_input_nodes):
            needs.add(node)
    return needs


def _saved_inputs(rule: str, args: list[fx.Node], needs: set[fx.Node]) -> list[fx.Node]:
    """The activation inputs a node saves: the gradient of one operand of a product needs
    the other operand, so each is saved only if its partner needs a gradient."""
    if rule == "inputs":
        if len(args) < 2:
            return []  # a product with a Python scalar saves nothing
        pairs = ((args[0], args[1]), (args[1], args[0]))
        return [x for x, partner in pairs if partner in needs and _is_activation(x)]
    if rule == "input0":  # linear(x, w): x is saved for w's gradient; unary ops save x
        partner = args[1] if len(args) > 1 else args[0]
        return [args[0]] if partner in needs and _is_activation(args[0]) else []
    if rule == "input1":  # addmm(bias, x, w)
        return [args[1]] if len(args) > 2 and args[2] in needs and _is_activation(args[1]) else []
    if rule == "indices":
        return [args[1]] if args[0] in needs else []
    if rule == "region-inputs":
        return [a for a in args if _is_activation(a)]
    return []


def saved_tensors(node: fx.Node, symbols, needs: set[fx.Node]) -> list[tuple[object, sympy.Expr]]:
    """(identity, bytes) of each tensor this node keeps for backward. The identity lets callers
    count a tensor saved by several consumers (or through several views) once."""
    name = ir.target_str(node)
    rule = SAVED_RULES.get(name) or SAVED_RULES.get(name.rsplit(".", 1)[0])
    if rule is None or node not in needs:
        return []
    args = [a for a in node.args if isinstance(a, fx.Node)]
    saved = [(storage_root(a), tensor_bytes(root_val(a), symbols)) for a in _saved_inputs(rule, args, needs)]
    val = node.meta.get("val")
    out = val[0] if isinstance(val, (tuple, list)) else val
    if rule == "output":
        saved.append((node, tensor_bytes(out, symbols)))
    elif rule == "mask" and _dropout_active(node):
        saved.append(((node, "mask"), numel(out, symbols)))  # one byte per element
    elif rule == "norm":
        x = ir.tensor_val(args[0])
        rows = numel(x, symbols) / _sym(x.shape[-1], symbols)
        saved.append((storage_root(args[0]), tensor_bytes(root_val(args[0]), symbols)))
        saved.append(((node, "stats"), 2 * rows * 4))  # fp32 mean and rstd per row
    elif rule == "log-softmax-loss":
        saved.append(((node, "log-probabilities"), tensor_bytes(ir.tensor_val(args[0]), symbols)))
        if len(args) > 1 and _is_activation(args[1]):
            saved.append((storage_root(args[1]), tensor_bytes(root_val(args[1]), symbols)))
    elif rule == "attention":
        q = ir.tensor_val(args[0])
        for arg in args[:3]:
            saved.append((storage_root(arg), tensor_bytes(root_val(arg), symbols)))
        saved.append((node, tensor_bytes(q, symbols)))  # output
        saved.append(((node, "lse"), numel(q, symbols) / _sym(q.shape[-1], symbols) * 4))
    return saved


def _dropout_active(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(train) and p > 0


def root_val(node: fx.Node) -> torch.Tensor:
    root = storage_root(node)
    val = root.meta.get("val")
    if isinstance(val, (tuple, list)):  # split's tuple: fall back to the view itself
        return ir.tensor_val(node)
    return val if isinstance(val, torch.Tensor) else ir.tensor_val(node)


# calls that run a fused region (insert-remat, insert-offload): their cost is their graph's
REGION_CALLS = {"checkpoint", "offload_saved"}


def node_flops(node: fx.Node, symbols: Mapping[str, str]) -> sympy.Expr:
    if ir.target_str(node) in REGION_CALLS:  # a fused region: the FLOPs of its graph
        region = _region(node)
        return sum((node_flops(n, symbols) for n in _calls(region)), sympy.Integer(0))
    rule = FLOP_RULES.get(ir.target_str(node))
    return rule(node, symbols) if rule else sympy.Integer(0)


def _region(node: fx.Node) -> fx.GraphModule:
    """The submodule a region call runs (its first argument, a get_attr)."""
    owner = node.graph.owning_module
    return owner.get_submodule(str(node.args[0].target))


def node_cost(node: fx.Node, symbols: Mapping[str, str], needs: set[fx.Node]) -> ir.Cost:
    flops = node_flops(node, symbols)
    val = ir.tensor_val(node)
    out_bytes = tensor_bytes(val, symbols) if val is not None else sympy.Integer(0)
    saved = sum((b for _, b in saved_tensors(node, symbols, needs)), sympy.Integer(0))
    return ir.Cost(sympy.simplify(flops), out_bytes, saved)


def _calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def graph_symbols(gm: fx.GraphModule) -> dict:
    info = trace_info(gm)
    return dict(info.symbols) if info is not None else {}


def annotate(gm: fx.GraphModule) -> int:
    """Put a bmc.cost annotation on every call_function node; returns how many."""
    symbols, needs = graph_symbols(gm), nodes_needing_grad(gm)
    count = 0
    for node in _calls(gm):
        ir.annotate(node, node_cost(node, symbols, needs))
        count += 1
    return count


# ------------------------------------------------------------------ per rank

@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int  # the whole tensor's (a rank holds numel / divisor of it)
    dtype: torch.dtype
    trainable: bool
    divisor: sympy.Expr  # product of the degrees of the mesh axes that shard it
    stage: int
    is_buffer: bool = False  # buffers (e.g. RoPE tables) are held but are not model states
    zero: int | None = None  # the data-parallel plan's ZeRO stage (bmc.zero), None if none


def _attr(gm: fx.GraphModule, dotted: str):
    owner = gm
    for part in dotted.split("."):
        owner = getattr(owner, part)
    return owner


@dataclass(frozen=True)
class TrainingSetup:
    """How model states are kept: the optimizer and the dtype of the master copy."""

    optimizer: str = "adam"
    master_dtype: torch.dtype = torch.float32

    def optimizer_bytes(self, param_dtype: torch.dtype) -> int:
        """K: bytes of optimizer state per trainable parameter of this dtype."""
        states = OPTIMIZER_STATES[self.optimizer] * MASTER_BYTES
        master = element_size(self.master_dtype) if element_size(param_dtype) < element_size(self.master_dtype) else 0
        return states + master


def parameters(gm: fx.GraphModule) -> list[ParamInfo]:
    """Every distinct parameter and buffer the graph reads, with its sharding and stage."""
    found: dict[str, ParamInfo] = {}
    param_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    degrees = _split_degrees(gm)
    seen_tensors: set[int] = set()
    # Tied weights are one tensor under several names: count the name the graph reads.
    nodes = sorted(ir.parameter_nodes(gm).items(), key=lambda item: not item[1].users)
    for name, node in nodes:
        val = ir.tensor_val(node)
        tensor = _attr(gm, name)
        if val is None or id(tensor) in seen_tensors:
            continue
        seen_tensors.add(id(tensor))
        shard = ir.get(node, ir.Shard)
        divisor = sympy.Integer(1)
        whole = val.numel()
        for placement in (shard.placements if shard else ()):
            # dp sharding is ZeRO's, applied per part (weights/grads/states) by model_states
            if placement.kind == "shard" and placement.axis != "dp":
                divisor *= AXIS_DEGREE.get(placement.axis, sympy.Symbol(f"N_{placement.axis}"))
                # the graph's shapes are a rank's: the whole tensor is the degree times that
                whole *= degrees.get(placement.axis, 1)
        stage = ir.get(node, ir.Stage)
        is_param = name in param_names
        trainable = is_param and gm.get_parameter(name).requires_grad and val.dtype.is_floating_point
        zero = ir.get(node, ir.Zero)
        found[name] = ParamInfo(name, whole, val.dtype, trainable, divisor, stage.index if stage else 0,
                                is_buffer=not is_param, zero=zero.stage if zero else None)
    return list(found.values())


def _split_degrees(gm: fx.GraphModule) -> dict[str, int]:
    """How many ranks each mesh axis splits a weight over, from the plans (tp and its sequence
    parallel share the tp degree)."""
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    return {"tp": plan.degree, "sp": plan.degree} if plan else {}


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of parameters, gradients and optimizer states, symbolic; buffers are
    kept apart (held on every rank, never sharded by ZeRO, not model states)."""

    params: sympy.Expr
    grads: sympy.Expr
    optimizer: sympy.Expr
    buffers: sympy.Expr = sympy.Integer(0)

    @property
    def total(self) -> sympy.Expr:
        return self.params + self.grads + self.optimizer


def model_states(params: Iterable[ParamInfo], zero_stage: int | None = None,
                 stage: int | None = None) -> ModelStates:
    """Model-state bytes held by one rank (of pipeline stage `stage`, or all stages).

    Weights cost b_<dtype> each, gradients the same for trainable ones, optimizer states K
    each; ZeRO-1/2/3 divide the optimizer / gradient / weight parts by N_d. `zero_stage`
    asks "what if every parameter were at this stage"; None reads each one's bmc.zero."""
    p_sum = g_sum = k_sum = buf_sum = sympy.Integer(0)
    for p in params:
        if stage is not None and p.stage != stage:
            continue
        local = sympy.Integer(p.numel) / p.divisor
        if p.is_buffer:
            buf_sum += local * dtype_symbol(p.dtype)
            continue
        zero = zero_stage if zero_stage is not None else (p.zero or 0)
        p_sum += local * dtype_symbol(p.dtype) / (N_d if zero >= 3 else 1)
        if p.trainable:
            g_sum += local * dtype_symbol(p.dtype) / (N_d if zero >= 2 else 1)
            k_sum += local * K / (N_d if zero >= 1 else 1)
    return ModelStates(p_sum, g_sum, k_sum, buf_sum)


def plan_zero_stage(params: Iterable[ParamInfo]) -> int | None:
    """The ZeRO stage the plan gives every trainable parameter (None: no data-parallel plan)."""
    stages = {p.zero for p in params if p.trainable}
    return stages.pop() if len(stages) == 1 else None


def activation_bytes(gm: fx.GraphModule, stage: int | None = None) -> sympy.Expr:
    """Bytes saved for backward by one forward pass, each saved tensor counted once."""
    symbols, needs = graph_symbols(gm), nodes_needing_grad(gm)
    seen: dict[object, sympy.Expr] = {}
    for node in _calls(gm):
        node_stage = ir.get(node, ir.Stage)
        if stage is not None and (node_stage.index if node_stage else 0) != stage:
            continue
        for identity, nbytes in saved_tensors(node, symbols, needs):
            seen.setdefault(identity, nbytes)
    return sympy.expand(sum(seen.values(), sympy.Integer(0)))


def forward_flops(gm: fx.GraphModule) -> sympy.Expr:
    symbols = graph_symbols(gm)
    total = sympy.Integer(0)
    for node in _calls(gm):
        cost = ir.get(node, ir.Cost)
        total += cost.flops if cost is not None else node_flops(node, symbols)
    return sympy.expand(total)


# ------------------------------------------------------------------ evaluation

@dataclass(frozen=True)
class Setting:
    """Numbers to evaluate expressions at."""

    batch: int = 1
    seq: int | None = None
    dp: int = 1
    tp: int = 1
    pp: int = 1
    setup: TrainingSetup = field(default_factory=TrainingSetup)

    def substitutions(self, params: Iterable[ParamInfo]) -> dict:
        subs = {B: self.batch, N_d: self.dp, N_t: self.tp, N_p: self.pp}
        if self.seq is not None:
            subs[S] = self.seq
        dtypes = {p.dtype for p in params}
        for dtype in dtypes | {torch.float32, torch.float16, torch.bfloat16}:
            subs[dtype_symbol(dtype)] = element_size(dtype)
        trainable = [p for p in params if p.trainable]
        main = max({p.dtype for p in trainable} or {torch.float32},
                   key=lambda d: sum(p.numel for p in trainable if p.dtype == d))
        subs[K] = self.setup.optimizer_bytes(main)
        return subs


def evaluate(expr: sympy.Expr, subs: Mapping) -> float:
    value = sympy.sympify(expr).subs(subs)
    if value.free_symbols:
        raise ValueError(f"cannot evaluate {expr}: no value for {sorted(map(str, value.free_symbols))}")
    return float(value)
