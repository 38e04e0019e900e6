"""The decode step of a causal LM with a KV cache, derived from its traced graph.

The traced graph computes a whole sequence; generation wants one step: the new tokens, their
positions, and each layer's cached keys and values in; the logits and the grown caches out.
The rewrite:

- positions come from a `position_ids` [B, T] input: `arange(S)` (GPT's position embedding)
  becomes it, and `table[:S]` slices of a buffer (LLaMA's RoPE cos/sin) become lookups
  `table[position_ids]` shaped [B, 1, T, d] to broadcast over the heads;
- each causal attention (sdpa with is_causal) reads `cat(past_k, k)` and `cat(past_v, v)` along
  the sequence, returns them as the layer's present cache, and takes an explicit mask:
  query i (slot P + i of S = P + T) sees slot j when j <= P + i and `attention_mask[b, j]`
  (left-padded prompts), and always its own slot, so a padding row is never fully masked;
- the cache holds k and v as attention reads them (after a GQA repeat), [B, H, S, head_dim].

The result is a GraphModule with inputs (input_ids, position_ids, attention_mask, past_k_0,
past_v_0, ...) and outputs (logits, present_k_0, present_v_0, ...); the ort-paged backend cuts
it into parts and lowers each.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import BmcError
from bmc.ir.trace import trace_info

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class CacheError(BmcError):
    """A graph the KV-cache rewrite cannot derive a decode step from."""


# the cache's layout is a typed plan of the decode-step graph
CacheLayout = ir.KvCachePlan


def layers(self) -> int:
        return len(self.heads)


def _token_input(gm: fx.GraphModule) -> fx.Node:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    info = trace_info(gm)
    if info is not None and (len(info.args) + len(info.kwargs)) != 1:
        raise CacheError("the decode step takes a model whose only input is its token ids; "
                         f"this one takes {len(info.args) + len(info.kwargs)} inputs")
    ids = placeholders[0]
    val = ir.tensor_val(ids)
    if val is None or val.dim() != 2 or val.dtype != torch.int64:
        raise CacheError("the decode step takes token ids [batch, seq] (int64) as the model's input")
    return ids


def _seq_size(node: fx.Node) -> bool:
    """A node that is the sequence length of the token ids (sym_size(ids, 1))."""
    return isinstance(node, fx.Node) and node.target is aten.sym_size.int and node.args[1] == 1


def _rewrite_positions(gm: fx.GraphModule, positions: fx.Node) -> int:
    changed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.arange.default, aten.arange.start) and _seq_size(node.args[-1]) and \
                (node.target is aten.arange.default or node.args[0] == 0):
            node.replace_all_uses_with(positions)
            graph.erase_node(node)
            changed += 1
        elif node.target is aten.slice.Tensor and node.args[0].op == "get_attr" and len(node.args) >= 4 \
                and node.args[1] == 0 and node.args[2] in (None, 0) and _seq_size(node.args[3]):
            with graph.inserting_before(node):
                looked_up = graph.call_function(aten.embedding.default, (node.args[0], positions))
                shaped = graph.call_function(aten.unsqueeze.default, (looked_up, 1))
            node.replace_all_uses_with(shaped)
            graph.erase_node(node)
            changed += 1
    return changed


def _max_positions(gm: fx.GraphModule, positions: fx.Node) -> int:
    """Rows of the tables the positions index (wpe, RoPE cos/sin): how far generation can go."""
    rows = [gm.get_buffer(str(u.args[0].target)).shape[0] if str(u.args[0].target) in dict(gm.named_buffers())
            else gm.get_parameter(str(u.args[0].target)).shape[0]
            for u in positions.users if u.target is aten.embedding.default and u.args[0].op == "get_attr"]
    return int(min(rows)) if rows else 1 << 30


def _causal_mask(graph: fx.Graph, ids: fx.Node, attention_mask: fx.Node, dtype: torch.dtype) -> fx.Node:
    """[B, 1, T, S] additive mask (0 or -inf): slot j visible to query i (slot S - T + i) when
    j <= S - T + i and attention_mask[b, j], or when j is the query's own slot. Built once for
    every layer; additive rather than boolean so the attention needs no guard for a fully
    masked row (there is none), which ONNX exports of boolean masks add."""
    call = graph.call_function
    total = call(aten.sym_size.int, (attention_mask, 1))
    new = call(aten.sym_size.int, (ids, 1))
    slots = call(aten.arange.default, (total,), {"device": torch.device("cpu")})
    offset = call(aten.sub.Tensor, (call(aten.arange.default, (new,), {"device": torch.device("cpu")}), new))
    query_slot = call(aten.unsqueeze.default, (call(aten.add.Tensor, (offset, total)), 1))  # [T, 1]
    earlier = call(aten.le.Tensor, (slots, query_slot))  # [T, S]
    own = call(aten.eq.Tensor, (slots, query_slot))
    valid = call(aten.unsqueeze.default, (call(aten.ne.Scalar, (attention_mask, 0)), 1))  # [B, 1, S]
    visible = call(aten.logical_or.default, (call(aten.logical_and.default, (earlier, valid)), own))
    blocked = call(aten.masked_fill.Scalar, (call(aten.zeros_like.default, (visible,), {"dtype": dtype}),
                                              call(aten.logical_not.default, (visible,)), float("-inf")))
    return call(aten.unsqueeze.default, (blocked, 1))


def sdpa_arguments(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    found = dict(zip(names, node.args))
    found.update(node.kwargs)
    return found


def _rewrite_attention(gm: fx.GraphModule, ids: fx.Node, attention_mask: fx.Node) -> tuple[list[fx.Node], CacheLayout]:
    graph = gm.graph
    sites = list(graph.find_nodes(op="call_function", target=SDPA))
    if not sites:
        raise CacheError("the graph has no scaled_dot_product_attention to give a KV cache")
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    caches = []
    for index in range(len(sites)):
        with graph.inserting_after(last_placeholder):
            past_k = graph.placeholder(f"past_k_{index}")
        with graph.inserting_after(past_k):
            past_v = graph.placeholder(f"past_v_{index}")
        caches.append((past_k, past_v))
        last_placeholder = past_v
    with graph.inserting_before(last_placeholder.next):  # once, before the first layer: every layer reads it
        mask = _causal_mask(graph, ids, attention_mask, ir.tensor_val(sdpa_arguments(sites[0])["query"]).dtype)
    presents, heads, dims = [], [], []
    for index, node in enumerate(sites):
        args = sdpa_arguments(node)
        if not args.get("is_causal") or args.get("attn_mask") is not None or args.get("enable_gqa"):
            raise CacheError(f"attention {ir.module_path(node) or node.name} is not causal sdpa without a mask of "
                             f"its own; the KV-cache decode step supports is_causal attention (zoo GPT, LLaMA)")
        k_val = ir.tensor_val(args["key"])
        heads.append(int(k_val.shape[1]))
        dims.append(int(k_val.shape[3]))
        past_k, past_v = caches[index]
        with graph.inserting_before(node):
            keys = graph.call_function(aten.cat.default, ([past_k, args["key"]], 2))
            values = graph.call_function(aten.cat.default, ([past_v, args["value"]], 2))
        kwargs = {"scale": args["scale"]} if args.get("scale") is not None else {}
        node.args, node.kwargs = (args["query"], keys, values, mask), kwargs
        presents += [keys, values]
    return presents, CacheLayout(tuple(heads), tuple(dims), 0, 0)


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():  # deep-copying export's pytree specs warns from inside torch
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def flatten_signature(step: fx.GraphModule) -> None:
    """After a rewrite of the inputs or outputs: plain positional inputs and a flat tuple out,
    export's input guards (which checked the old signature) gone, dead code removed."""
    graph = step.graph
    graph._codegen = fx.graph.CodeGen()
    for node in graph.find_nodes(op="call_module"):
        if node.target == "_guards_fn":
            graph.erase_node(node)
    graph.eliminate_dead_code()
    step.recompile()


def decode_step(gm: fx.GraphModule) -> tuple[fx.GraphModule, CacheLayout]:
    """The decode-step graph of a traced causal LM (see the module doc) and its cache layout.
    New nodes carry no `val` meta: the step runs as it is, and the ort-paged lowering traces
    each part of it again."""
    step = copy_graph(gm)
    graph = step.graph
    ids = _token_input(step)
    with graph.inserting_after(ids):
        attention_mask = graph.placeholder("attention_mask")
    with graph.inserting_after(ids):
        positions = graph.placeholder("position_ids")
    if not _rewrite_positions(step, positions):
        raise CacheError("found no position source (arange over the sequence, or a slice of a position table) "
                         "to feed position_ids into; this model's positions cannot follow a cache")
    presents, layout = _rewrite_attention(step, ids, attention_mask)
    output = graph.output_node()
    logits = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    output.args = ((logits, *presents),)
    flatten_signature(step)
    layout = CacheLayout(layout.heads, layout.head_dims, int(ir.tensor_val(logits).shape[-1]),
                         _max_positions(step, positions))
    ir.set_plan(step, layout)
    return step, layout


def example_step_inputs(layout: CacheLayout, batch: int, new: int, past: int, dtype=torch.float32) -> tuple:
    ids = torch.zeros(batch, new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    mask = torch.ones(batch, past + new, dtype=torch.long)
    caches = []
    for heads, dim in zip(layout.heads, layout.head_dims):
        caches += [torch.zeros(batch, heads, past, dim, dtype=dtype), torch.zeros(batch, heads, past, dim, dtype=dtype)]
    return (ids, positions, mask, *caches)


def empty_cache(layout: CacheLayout, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(batch, h, 0, d, dtype=dtype) for h, d in zip(layout.heads, layout.head_dims) for _ in (0, 1)]
