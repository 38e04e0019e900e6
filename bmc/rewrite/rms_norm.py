"""RMSNorm as one op: the seven elementwise nodes a traced LlamaRMSNorm (and Qwen2's,
Mistral's, ...) becomes, and the residual add that feeds it, matched and replaced by
`bmc::rms_norm` / `bmc::add_rms_norm`.

A serving step at batch 1 is a chain of small kernels between the matmuls; at 12 layers of
width 768 the norms' pow, mean, add, rsqrt and two muls cost more per token than ONNX Runtime's
one SimplifiedLayerNormalization kernel (ort_ops). The pattern matched, in HF's order:

    xf = x.to(float32)                      (absent, or a cast to the dtype x has)
    y  = xf * rsqrt(mean(xf ** 2, -1, keepdim=True) + eps)
    out = weight * y.to(float32)            (either operand order; weight 1-D over the last dim)

Only float32 is matched: a norm computed in another dtype than its input is left as traced.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::rms_norm
from bmc import ir

aten = torch.ops.aten
RMS_NORM = torch.ops.bmc.rms_norm.default
ADD_RMS_NORM = torch.ops.bmc.add_rms_norm.default
_CASTS = (aten.to.dtype, aten._to_copy.default)


def _float32(node) -> bool:
    val = ir.tensor_val(node) if isinstance(node, fx.Node) else None
    return val is not None and val.dtype == torch.float32


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _through_cast(node):
    """The value under a float32 -> float32 cast (which changes nothing), or node itself."""
    if _call(node, *_CASTS) and _float32(node) and _float32(node.args[0]) and len(node.users) == 1:
        return node.args[0]
    return node


def _last_dim(dims, rank: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, rank - 1)


def _split_mul(node) -> list[tuple]:
    """Both (a, b) readings of a two-tensor mul."""
    if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def _normalized(y) -> tuple | None:
    """(xf, eps) when y = xf * rsqrt(mean(xf^2, [-1], keepdim) + eps), every node used once."""
    for xf, r in _split_mul(y):
        if not (_call(r, aten.rsqrt.default) and len(r.users) == 1):
            continue
        added = r.args[0]
        if not (_call(added, aten.add.Tensor, aten.add.Scalar) and isinstance(added.args[1], float)
                and len(added.users) == 1):
            continue
        mean = added.args[0]
        if not (_call(mean, aten.mean.dim) and len(mean.users) == 1):
            continue
        rank = ir.tensor_val(xf).dim() if _float32(xf) else 0
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if not (_last_dim(mean.args[1], rank) and keepdim):
            continue
        square = mean.args[0]
        if _call(square, aten.pow.Tensor_Scalar) and square.args == (xf, 2) and len(square.users) == 1:
            return xf, float(added.args[1])
    return None


def _match(node: fx.Node) -> tuple | None:
    """(x, weight, eps) of an RMSNorm ending at `node`."""
    if not _float32(node):
        return None
    for weight, y in _split_mul(node):
        weight_val = ir.tensor_val(weight) if isinstance(weight, fx.Node) else None
        if weight_val is None or weight_val.dim() != 1 or weight_val.dtype != torch.float32:
            continue
        y = _through_cast(y)
        if not isinstance(y, fx.Node) or len(y.users) != 1:
            continue
        found = _normalized(y)
        if found is None:
            continue
        xf, eps = found
        if str(ir.tensor_val(xf).shape[-1]) == str(weight_val.shape[0]):
            return xf, weight, eps
    return None


def fuse_rms_norms(gm: fx.GraphModule) -> int:
    """Replace every float32 RMSNorm by bmc::rms_norm, and one whose input is a residual add
    of two same-shaped values by bmc::add_rms_norm; how many norms were replaced."""
    graph, fused = gm.graph, 0
    for node in list(graph.nodes):
        found = _match(node)
        if found is None:
            continue
        x, weight, eps = found
        normed = _with_residual(graph, x, weight, eps)  # in the add's module: one part holds the pair
        if normed is None:
            with graph.inserting_before(node):
                ir.replace_node(node, graph.call_function(RMS_NORM, (x, weight, eps)), "rms-norm")
        else:
            normed.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(normed)
        fused += 1
    if fused:
        graph.eliminate_dead_code()
        gm.recompile()
    return fused


def _copy_meta(source: fx.Node, made: fx.Node) -> None:
    made.meta.update({k: v for k, v in source.meta.items() if k in ("nn_module_stack", "stack_trace")})


def _with_residual(graph: fx.Graph, x: fx.Node, weight, eps: float) -> fx.Node | None:
    """The norm of x = a + b (or of a float32 cast of it) as bmc::add_rms_norm, placed right
    after the add; every other reader of the sum reads the op's second output."""
    total = x.args[0] if _call(x, *_CASTS) and _float32(x.args[0]) else x
    if not (_call(total, aten.add.Tensor) and len(total.args) == 2 and all(_float32(a) for a in total.args)):
        return None
    shapes = {tuple(str(d) for d in ir.tensor_val(v).shape) for v in (*total.args, total)}  # SymInts hash not
    order = {n: i for i, n in enumerate(graph.nodes)}
    if len(shapes) != 1 or not (isinstance(weight, fx.Node) and order[weight] < order[total]):
        return None  # a broadcast add, or a weight computed after the sum
    with graph.inserting_after(total):
        pair = graph.call_function(ADD_RMS_NORM, (*total.args, weight, eps))
    with graph.inserting_after(pair):
        normed = graph.call_function(operator.getitem, (pair, 0))
    with graph.inserting_after(normed):
        summed = graph.call_function(operator.getitem, (pair, 1))
    for made in (pair, normed, summed):
        _copy_meta(total, made)
    summed.meta["val"] = total.meta.get("val")
    for value in {x, total}:
        value.replace_all_uses_with(summed, delete_user_cb=lambda user: user not in (pair, summed))
    return normed
