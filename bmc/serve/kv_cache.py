"""The decode step of a causal LM with a KV cache, derived from its traced graph.

The traced graph computes a whole sequence; generation wants one step: the new tokens, their
positions, and each layer's cached keys and values in; the logits and the grown caches out.
The rewrite:

- positions come from a `position_ids` [B, T] input: every value the graph computes from the
  sequence length alone and then reads as positions (proved by evaluating it at two shapes:
  it is `arange(S) + c`, e.g. GPT-2's and OPT's (c = 2) embedding index, or the positions HF
  RoPE turns into cos/sin in the graph) becomes `position_ids + c`, shaped as it was; and
  `table[:S]` slices of a buffer (the zoo LLaMA's RoPE cos/sin) become lookups
  `table[position_ids]` shaped [B, 1, T, d] to broadcast over the heads;
- each causal attention (sdpa with is_causal, or with a mask the graph builds from the length
  alone and that is proved, by evaluating it, to be the causal triangle: HF's explicit masks)
  becomes one `bmc::cached_attention`, which reads `cat(past_k, k)` and `cat(past_v, v)` along
  the sequence, returns them as the layer's present cache, and takes an explicit mask: query i (slot P + i of S = P + T) sees slot j
  when j <= P + i and `attention_mask[b, j]` (left-padded prompts), and always its own slot,
  so a padding row is never fully masked;
- the cache holds k and v as attention reads them, [B, heads, S, head_dim], except that a GQA
  repeat of the kv heads (HF's repeat_kv: unsqueeze, expand, reshape) is taken into the op
  (each kv head read by its group of query heads), so the cache holds the kv heads only.

The result is a GraphModule with inputs (input_ids, position_ids, attention_mask, past_k_0,
past_v_0, ..., logits_positions) and outputs (logits, present_k_0, present_v_0, ...): the logits
of the token positions `logits_positions` [K] names (generation wants the last one only; a
whole-sequence forward all of them). The ort-paged backend cuts it into parts and lowers each.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::cached_attention
from bmc import ir
from bmc.errors import BmcError
from bmc.ir.trace import trace_info
from bmc.rewrite.linear import projection

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CACHED_ATTENTION = torch.ops.bmc.cached_attention.default


class CacheError(BmcError):
    """A graph the KV-cache rewrite cannot derive a decode step from."""


# the cache's layout is a typed plan of the decode-step graph
CacheLayout = ir.KvCachePlan


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


def _rewrite_table_slices(gm: fx.GraphModule, positions: fx.Node) -> tuple[int, list[int]]:
    """`table[:S]` slices of a buffer (RoPE cos/sin tables) become `table[position_ids]`; how
    many, and the tables' rows."""
    changed, rows = 0, []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.slice.Tensor and node.args[0].op == "get_attr" \
                and len(node.args) >= 4 and node.args[1] == 0 and node.args[2] in (None, 0) and _seq_size(node.args[3]):
            with graph.inserting_before(node):
                looked_up = graph.call_function(aten.embedding.default, (node.args[0], positions))
                shaped = graph.call_function(aten.unsqueeze.default, (looked_up, 1))
            rows.append(_rows(gm, node.args[0]))
            node.replace_all_uses_with(shaped)
            graph.erase_node(node)
            changed += 1
    return changed, rows


def _rewrite_position_sources(gm: fx.GraphModule, ids: fx.Node, positions: fx.Node) -> tuple[int, list[int]]:
    """Every proved position source (position_sources) becomes `position_ids + c`, with the
    source's dtype and its dims (batch first, the sequence where it was, 1 elsewhere); how
    many, and the rows - c of the tables they index."""
    sources = position_sources(gm, ids)
    graph, rows = gm.graph, []
    for node, offset in sources.items():
        shape = list(evaluate_size_only(gm, ids, [node], *PROOF_SHAPES[0])[0].shape)
        seq_axis = shape.index(PROOF_SHAPES[0][1])
        lookups = [u for u in node.users if u.target is aten.embedding.default and u.args[1] is node]
        one_dim = shape == [PROOF_SHAPES[0][1]]
        if one_dim and len(lookups) != len(node.users):
            raise CacheError(f"positions {node.name} are a 1-D arange read by {sorted(u.name for u in node.users)}; "
                             f"the decode step can give per-row positions only to an embedding lookup or to "
                             f"[batch, seq, ...] positions")
        if not one_dim and (seq_axis == 0 or any(d != 1 for i, d in enumerate(shape) if i not in (0, seq_axis))):
            raise CacheError(f"positions {node.name} have shape {shape} at batch 2, length 5; the decode step "
                             f"gives positions of shape [batch, seq] broadcast over other dims of size 1")
        with graph.inserting_before(node):
            value = graph.call_function(aten.add.Tensor, (positions, offset)) if offset else positions
            dtype = ir.tensor_val(node).dtype if ir.tensor_val(node) is not None else torch.long
            if dtype != torch.long:
                value = graph.call_function(aten.to.dtype, (value, dtype))
            for axis in range(len(shape)):
                if not one_dim and axis not in (0, seq_axis):
                    value = graph.call_function(aten.unsqueeze.default, (value, axis))
        rows += [_rows(gm, u.args[0]) - offset for u in lookups if u.args[0].op == "get_attr"]
        node.replace_all_uses_with(value)
    return len(sources), rows


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


def _full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    return (node.op == "call_function" and node.target is aten.slice.Tensor and args[2] in (None, 0)
            and (args[3] is None or (isinstance(args[3], int) and args[3] >= 1 << 62)) and args[4] in (None, 1))


def _through_full_slices(node: fx.Node) -> fx.Node:
    while _full_slice(node):
        node = node.args[0]
    return node


def kv_heads_source(key: fx.Node) -> tuple[fx.Node, int]:
    """(x, r) when `key` is HF's repeat_kv of x [B, kv_heads, S, D]: reshape(expand(unsqueeze(x,
    2), [B, kv, r, S, D]), [B, kv * r, S, D]) (full slices between), so head h reads kv head
    h // r; else (key, 1)."""
    if key.op != "call_function" or key.target not in (aten.reshape.default, aten.view.default):
        return key, 1
    expanded = _through_full_slices(key.args[0])
    if expanded.target is not aten.expand.default:
        return key, 1
    unsqueezed = _through_full_slices(expanded.args[0])
    if unsqueezed.target is not aten.unsqueeze.default or unsqueezed.args[1] != 2:
        return key, 1
    source = _through_full_slices(unsqueezed.args[0])
    kv, out = ir.tensor_val(source), ir.tensor_val(key)
    grown = ir.tensor_val(expanded)
    if kv is None or out is None or grown is None or kv.dim() != 4 or grown.dim() != 5 or out.dim() != 4:
        return key, 1
    repeat = grown.shape[2]
    if not isinstance(repeat, int) or int(out.shape[1]) != int(kv.shape[1]) * repeat or \
            int(grown.shape[1]) != int(kv.shape[1]) or out.shape[3] != kv.shape[3]:
        return key, 1
    return source, repeat


def check_causal_masks(gm: fx.GraphModule, ids: fx.Node, length: int) -> list[fx.Node]:
    """The sdpa sites, each proved causal (is_causal, or a mask proved to be the triangle up to
    `length`), or a CacheError naming the one that is not."""
    sites = list(gm.graph.find_nodes(op="call_function", target=SDPA))
    if not sites:
        raise CacheError("the graph has no scaled_dot_product_attention to give a KV cache")
    for node in sites:
        args = sdpa_arguments(node)
        name = ir.module_path(node) or node.name
        if args.get("enable_gqa"):
            raise CacheError(f"attention {name} uses sdpa's enable_gqa, which the KV-cache step does not "
                             f"support; repeat the kv heads in the model (HF's repeat_kv)")
        mask = args.get("attn_mask")
        if mask is None and args.get("is_causal"):
            continue
        if mask is None or args.get("is_causal") or proved_causal(gm, ids, mask, length) != "causal":
            raise CacheError(f"attention {name}'s mask is not proved causal (not built from the length alone, "
                             f"or not the triangle up to {length} positions: padding, a sliding window, an "
                             f"input); serve it as an encoder (task='encoder') or give a smaller max_len")
    return sites


def _rewrite_attention(gm: fx.GraphModule, sites: list[fx.Node], ids: fx.Node,
                       attention_mask: fx.Node) -> tuple[list[fx.Node], CacheLayout]:
    graph = gm.graph
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
        key, key_repeat = kv_heads_source(args["key"])
        value, value_repeat = kv_heads_source(args["value"])
        if key_repeat != value_repeat:
            key, key_repeat, value, value_repeat = args["key"], 1, args["value"], 1
        k_val = ir.tensor_val(key)
        heads.append(int(k_val.shape[1]))
        dims.append(int(k_val.shape[3]))
        past_k, past_v = caches[index]
        query = args["query"]
        scale = args.get("scale")
        if scale is None:  # sdpa's own default, made explicit for the ONNX lowering
            scale = 1.0 / math.sqrt(int(ir.tensor_val(query).shape[-1]))
        with graph.inserting_before(node):
            attended = graph.call_function(CACHED_ATTENTION, (query, key, value, past_k, past_v, mask, key_repeat,
                                                              float(scale)))
            out, keys, values = (graph.call_function(operator.getitem, (attended, i)) for i in range(3))
        for made in (attended, out, keys, values):  # the block the attention was in: where the parts are cut
            made.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        presents += [keys, values]
    return presents, CacheLayout(tuple(heads), tuple(dims), 0, 0)


def _drop_asserts(graph: fx.Graph) -> None:
    """export's dtype/device checks of intermediate values: they would keep the replaced masks alive."""
    for node in list(graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default)):
        graph.erase_node(node)


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


def decode_step(gm: fx.GraphModule, max_len: int | None = None) -> tuple[fx.GraphModule, CacheLayout]:
    """The decode step of a traced causal LM (see the module doc) and its cache layout; its
    max_positions are the rows of the position tables the positions index (0 when they index
    none: RoPE computed in the graph), capped by `max_len`. Masks are proved causal up to
    max_len (or the tables' rows; 512 when neither says, and at most 512). New nodes carry no
    `val` meta: the step runs as it is, and the ort-paged lowering traces each part again."""
    step = copy_graph(gm)
    graph = step.graph
    ids = _token_input(step)
    bound = table_bound(step, ids)
    limit = min(x for x in (max_len, bound or None) if x) if (max_len or bound) else 512
    sites = check_causal_masks(step, ids, min(limit, 512))
    with graph.inserting_after(ids):
        attention_mask = graph.placeholder("attention_mask")
    with graph.inserting_after(ids):
        positions = graph.placeholder("position_ids")
    sliced, slice_rows = _rewrite_table_slices(step, positions)
    sourced, source_rows = _rewrite_position_sources(step, ids, positions)  # before the new mask's aranges exist
    if not sliced + sourced:
        raise CacheError("found no position source (a value computed from the length alone that is arange(seq) + c, "
                         "or a slice of a position table) to feed position_ids into; this model's positions "
                         "cannot follow a cache")
    presents, layout = _rewrite_attention(step, sites, ids, attention_mask)
    _drop_asserts(graph)
    output = graph.output_node()
    logits = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    logits = _select_logit_positions(graph, logits)
    output.args = ((logits, *presents),)  # first: the present caches are read only here
    graph.eliminate_dead_code()  # the model's own masks, now unread
    flatten_signature(step)
    rows = [r for r in (*slice_rows, *source_rows, max_len) if r]
    layout = CacheLayout(layout.heads, layout.head_dims, int(ir.tensor_val(logits).shape[-1]), min(rows, default=0))
    ir.set_plan(step, layout)
    return step, layout


def _select_logit_positions(graph: fx.Graph, logits: fx.Node) -> fx.Node:
    """A `logits_positions` [K] input (after the caches) and the logits of those positions. The
    rows are taken from the output projection's input where the logits are one projection of a
    [B, T, width] value (its rows are independent: the other rows' product, a prefill's whole
    [T, vocab] head, is never computed); else from the logits themselves."""
    last = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_after(last):
        keep = graph.placeholder("logits_positions")
    x = _head_input(logits)
    if x is not None:
        with graph.inserting_before(logits):
            rows = graph.call_function(torch.ops.aten.index_select.default, (x, 1, keep))
        logits.replace_input_with(x, rows)
        return logits
    with graph.inserting_after(logits):
        return graph.call_function(torch.ops.aten.index_select.default, (logits, 1, keep))


def _head_input(logits: fx.Node) -> fx.Node | None:
    """x when `logits` is a projection of x by a weight (any form rewrite/linear.py knows, or
    quant-int8's int8_linear) with x and logits [B, T, ...] of the same T."""
    found = projection(logits)
    x = found.x if found is not None else \
        logits.args[0] if logits.target is torch.ops.bmc.int8_linear.default else None
    x_val, out = ir.tensor_val(x) if isinstance(x, fx.Node) else None, ir.tensor_val(logits)
    if x_val is None or out is None or x_val.dim() != 3 or out.dim() != 3 or x_val.shape[:2] != out.shape[:2]:
        return None
    return x


# ------------------------------------------------------------------ what the graph computes from sizes alone


def _is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten._assert_tensor_metadata.default


def size_only_nodes(gm: fx.GraphModule, ids: fx.Node, weights: bool = False) -> set[fx.Node]:
    """The nodes whose value depends on the token ids' shape alone (aranges, masks, positions
    built from sym_size(ids, d)), never on the ids' values, nor on a weight or buffer unless
    `weights` (BERT's position_ids buffer sliced to the length)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if weights and node.op == "get_attr":
            found.add(node)
        if node.op != "call_function" or _is_assert(node):
            continue
        if node.target is aten.sym_size.int:
            if node.args[0] is ids:
                found.add(node)
        elif all(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def evaluate_size_only(gm: fx.GraphModule, ids: fx.Node, wanted: list[fx.Node], batch: int, seq: int) -> list:
    """The values of size-only nodes for token ids of shape [batch, seq], computed by a copy
    of just their ancestors (the model itself is not run)."""
    keep: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        node = stack.pop()
        if node in keep or node is ids:
            continue
        keep.add(node)
        stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env = {ids: graph.placeholder("ids")}
    for node in gm.graph.nodes:
        if node in keep:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(tuple(env[n] for n in wanted))
    with torch.no_grad():
        return list(fx.GraphModule(gm, graph)(torch.zeros(batch, seq, dtype=torch.long)))


# two shapes the proofs are evaluated at: a batch and a length the tracing example is unlikely to have
PROOF_SHAPES = ((2, 5), (3, 11))


def _position_offset(values: list[torch.Tensor], shapes=PROOF_SHAPES) -> int | None:
    """c when each value is arange(seq) + c broadcast over its other dims (the same c at every
    shape), else None."""
    offsets = set()
    for value, (_, seq) in zip(values, shapes):
        if not isinstance(value, torch.Tensor) or value.dtype == torch.bool or seq not in value.shape:
            return None
        axis = list(value.shape).index(seq)
        if sum(1 for d in value.shape if d == seq) != 1:
            return None
        line = value.movedim(axis, -1).reshape(-1, seq).double()
        offset = line[0, 0].item()
        expected = torch.arange(seq, dtype=torch.float64) + offset
        if offset != int(offset) or not torch.equal(line, expected.expand_as(line)):
            return None
        offsets.add(int(offset))
    return offsets.pop() if len(offsets) == 1 else None


def position_sources(gm: fx.GraphModule, ids: fx.Node) -> dict[fx.Node, int]:
    """The size-only values the model reads as token positions: the last size-only node before
    a computation with data or weights, whose value is proved (evaluated at two shapes) to be
    arange(seq) + c; with that offset c (OPT's 2)."""
    size_only = size_only_nodes(gm, ids)
    frontier = [n for n in gm.graph.nodes if n in size_only and n.target is not aten.sym_size.int and
                any(u not in size_only and not _is_assert(u) for u in n.users)]
    if not frontier:
        return {}
    found = {}
    runs = [evaluate_size_only(gm, ids, frontier, b, s) for b, s in PROOF_SHAPES]
    for index, node in enumerate(frontier):
        offset = _position_offset([run[index] for run in runs])
        if offset is not None:
            found[node] = offset
    return found


def table_bound(gm: fx.GraphModule, ids: fx.Node) -> int:
    """How many positions the model's position tables hold: for each embedding whose index is
    proved to be arange(seq) + c (computed from sizes and buffers), its rows - c; 0 when none."""
    static = size_only_nodes(gm, ids, weights=True)
    lookups = [n for n in gm.graph.find_nodes(op="call_function", target=aten.embedding.default)
               if n.args[0].op == "get_attr" and n.args[1] in static]
    if not lookups:
        return 0
    runs = [evaluate_size_only(gm, ids, [n.args[1] for n in lookups], b, s) for b, s in PROOF_SHAPES]
    bounds = []
    for index, node in enumerate(lookups):
        offset = _position_offset([run[index] for run in runs])
        if offset is not None:
            bounds.append(_rows(gm, node.args[0]) - offset)
    return min(bounds, default=0)


def _rows(gm: fx.GraphModule, table: fx.Node) -> int:
    return int(operator.attrgetter(str(table.target))(gm).shape[0])


def proved_causal(gm: fx.GraphModule, ids: fx.Node, mask: fx.Node, length: int) -> str:
    """"causal" when the mask sdpa is given lets query i see key j exactly when j <= i, at every
    length up to `length` checked (evaluated at two small shapes and at `length`); "full" when
    it lets every query see every key; else "" (padding, windows, masks from inputs)."""
    if mask not in size_only_nodes(gm, ids):
        return ""
    kinds = set()
    for batch, seq in (*PROOF_SHAPES, (1, length)):
        value = evaluate_size_only(gm, ids, [mask], batch, seq)[0]
        visible = value if value.dtype == torch.bool else value == 0
        if value.dtype != torch.bool and not bool((value[~visible] <= torch.finfo(value.dtype).min / 2).all()):
            return ""  # an additive bias that is neither 0 nor a blocking value
        triangle = torch.ones(seq, seq, dtype=torch.bool).tril()
        if bool((visible == triangle).all()):
            kinds.add("causal")
        elif bool(visible.all()):
            kinds.add("full")
        else:
            return ""
    return kinds.pop() if len(kinds) == 1 else ""


def example_step_inputs(layout: CacheLayout, batch: int, new: int, past: int, dtype=torch.float32) -> tuple:
    """The step's inputs for `new` tokens after `past` cached ones; the logits of every new token."""
    ids = torch.zeros(batch, new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    mask = torch.ones(batch, past + new, dtype=torch.long)
    caches = []
    for heads, dim in zip(layout.heads, layout.head_dims):
        caches += [torch.zeros(batch, heads, past, dim, dtype=dtype), torch.zeros(batch, heads, past, dim, dtype=dtype)]
    return (ids, positions, mask, *caches, torch.arange(new))


def empty_cache(layout: CacheLayout, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(batch, h, 0, d, dtype=dtype) for h, d in zip(layout.heads, layout.head_dims) for _ in (0, 1)]
