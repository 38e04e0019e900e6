"""RoPE inside the cached attention: a decode step's `cached_attention(rotary(q), rotary(k), v,
...)` becomes `bmc::slot_rotary_attention(q, k, v, ..., cos_cache, sin_cache)`, which ONNX
Runtime runs as GroupQueryAttention with do_rotary (one kernel in place of two RotaryEmbedding
nodes, and the cos/sin tables become constants instead of a per-step prologue). It is what
onnxruntime-genai's builds run; at 12 layers of width 768 it is 36 of a step's ~210 nodes.

The fused op rotates each token by its cache slot, not by the positions the step is given. The
two agree up to a constant per row (a left-padded row's tokens sit n slots after their
positions), and RoPE's attention scores depend only on the difference of two positions when
the tables rotate by an angle linear in the position. What is proven before a replacement,
from the graph alone:
- q and k are rotated with the same cos/sin tables (bmc/rewrite/rotary.py's proven RoPE),
  and nothing else reads the rotated values;
- the tables are computed from `position_ids` and constants alone, token by token: evaluated
  at positions 0..max-1 and at a random [2, 5] batch of positions, each position gives the
  same row;
- the rows rotate by an angle linear in the position: cos[p] = A cos(p t), sin[p] = A sin(p t)
  for one amplitude A per frequency (HF's attention_scaling) within float32's error in p t.
Anything not proven stays as rotary + cached_attention: exact for any positions, only slower.
The serving side checks the precondition the slots need (left-padded masks, positions that
count the tokens: backends/ort_paged.py).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers the ops
from bmc import ir
from bmc.rewrite.rotary import ROTARY, TABLES

CACHED_ATTENTION = torch.ops.bmc.cached_attention.default
SLOT_ROTARY_ATTENTION = torch.ops.bmc.slot_rotary_attention.default
# ONNX Runtime's CPU GroupQueryAttention rotates heads whose size is a multiple of 16 only
# ("head_size shall be a multiple of 16", measured on 1.32)
HEAD_MULTIPLE = 16


def fuse_slot_rotaries(gm: fx.GraphModule, positions: fx.Node, max_positions: int) -> int:
    """Replace every proven rotary pair + cached attention; how many were replaced."""
    graph, caches, fused = gm.graph, {}, 0
    for node in list(graph.find_nodes(op="call_function", target=CACHED_ATTENTION)):
        query, key, value, past_key, past_value, mask, kv_repeat, scale = node.args
        tables = _shared_tables(query, key)
        if tables is None:
            continue
        if tables not in caches:
            caches[tables] = _slot_tables(gm, tables, positions, max_positions, len(caches))
        if caches[tables] is None:
            continue
        cos_cache, sin_cache = caches[tables]
        with graph.inserting_before(node):
            replacement = graph.call_function(SLOT_ROTARY_ATTENTION, (
                query.args[0], key.args[0], value, past_key, past_value, mask, cos_cache, sin_cache, kv_repeat, scale))
        ir.replace_node(node, replacement, "slot-rotary")
        for rotated in (query, key):
            graph.erase_node(rotated)
        fused += 1
    for node in graph.find_nodes(op="call_function", target=ROTARY):
        node.meta.pop(TABLES, None)  # the node references are this rewrite's alone
    if fused:
        graph.eliminate_dead_code()
        gm.recompile()
    return fused


def _shared_tables(query, key) -> tuple | None:
    """The (cos, sin) tables both q and k are rotated with, when each rotation feeds the
    attention alone and the head size suits the kernel."""
    for rotated in (query, key):
        if not (isinstance(rotated, fx.Node) and rotated.target is ROTARY and len(rotated.users) == 1):
            return None
    tables = query.meta.get(TABLES)
    val = ir.tensor_val(query)
    if tables is None or tables != key.meta.get(TABLES) or val is None or val.shape[-1] % HEAD_MULTIPLE:
        return None
    return tables


def _slot_tables(gm: fx.GraphModule, tables: tuple, positions: fx.Node, max_positions: int, index: int):
    """(cos_cache, sin_cache) get_attr nodes of the half tables [max_positions, D/2], or None
    where the proof fails."""
    table_of = _as_function_of(gm, tables, positions)
    if table_of is None or max_positions < 2:
        return None
    with torch.no_grad():
        every = table_of(torch.arange(max_positions).unsqueeze(0))
        probe = torch.randint(0, max_positions, (2, 5), generator=torch.Generator().manual_seed(0))
        probed = table_of(probe)
    half = every[0].shape[-1] // 2
    caches = [t[0, :, :half].float().contiguous() for t in every]
    for table, cache in zip(probed, caches):
        if tuple(table.shape[:2]) != tuple(probe.shape) or \
                not torch.allclose(table[..., :half].float(), cache[probe], rtol=0, atol=1e-6):
            return None
    if not _linear_angles(*caches):
        return None
    graph = gm.graph
    made = []
    for name, cache in zip(("cos", "sin"), caches):
        target = f"_bmc_slot_{name}_{index}"
        gm.register_buffer(target, cache)
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            node = graph.get_attr(target)
        node.meta["val"] = cache
        made.append(node)
    return tuple(made)


def _as_function_of(gm: fx.GraphModule, outputs: tuple, positions: fx.Node) -> fx.GraphModule | None:
    """`outputs` as a module of `positions` alone, or None where they read another input (or
    not positions at all)."""
    needed, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    if positions not in needed or any(n.op == "placeholder" and n is not positions for n in needed):
        return None
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph)


def _linear_angles(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """cos[p] = A cos(p t) and sin[p] = A sin(p t), per column, for every position p; the
    tolerance is float32's error in p * t (HF computes the angles in float32)."""
    cos, sin = cos.double(), sin.double()
    amplitude = torch.sqrt(cos[0] ** 2 + sin[0] ** 2)
    step = torch.atan2(sin[1], cos[1])
    angles = torch.arange(cos.shape[0], dtype=torch.float64).unsqueeze(1) * step
    tolerance = amplitude * (cos.shape[0] * 4 * 2.0 ** -24 * math.pi + 1e-5)
    return bool(amplitude.min() > 0) and bool(((cos - amplitude * torch.cos(angles)).abs() <= tolerance).all()) \
        and bool(((sin - amplitude * torch.sin(angles)).abs() <= tolerance).all())
