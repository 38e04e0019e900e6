"""A decode step that writes its KV cache in place.

ONNX Runtime's GroupQueryAttention appends the step's keys and values to its past when the
past and the present are one buffer (its CPU kernel compares the pointers); given separate
outputs it zeroes a new present and copies the whole past into it, every layer, every step: a
cost that grows with batch x positions (measured on the 12-layer width-768 GQA model of
tools/bench/serve_hf.py: 4% of a batch-8 generation, one thread). onnxruntime-genai binds one
max-length buffer as past and present for the same reason.

Sharing is used only where the graph proves it safe: every past input is read by
GroupQueryAttention as its past (or by Shape for its batch alone), and the present that
attention writes is a graph output as it is. The buffer then holds `length` positions; the
mask's width says how many are filled, so the result is the one the copying step gives.
"""
from __future__ import annotations

import numpy as np

GQA = ("GroupQueryAttention", "com.microsoft")
PAST_SLOTS = {3: 1, 4: 2}  # GroupQueryAttention's past_key / past_value input -> its present output


def shared_cache_pairs(model, past_inputs: list[str], present_outputs: list[str]) -> dict[str, str]:
    """present output -> the past input it can share a buffer with, for every cache of the
    step; {} unless sharing is proven for all of them. `model` is an onnx.ModelProto (its
    weights need not be loaded)."""
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))
    pairs = {}
    for past in past_inputs:
        written = None
        for node, slot in readers.get(past, []):
            if (node.op_type, node.domain) == GQA and slot in PAST_SLOTS and written is None:
                written = node.output[PAST_SLOTS[slot]] if len(node.output) > PAST_SLOTS[slot] else None
            elif not _reads_batch_only(node):
                return {}
        if written is None:
            return {}
        pairs[written] = past
    return pairs if sorted(pairs) == sorted(present_outputs) else {}


def _reads_batch_only(node) -> bool:
    attrs = {a.name: a.i for a in node.attribute}
    return node.op_type == "Shape" and attrs.get("start", 0) == 0 and attrs.get("end") == 1


def empty_shared_cache(batch: int, heads: list[int], head_dims: list[int], length: int) -> list:
    """Each layer's key and value buffers for `length` positions, as OrtValues."""
    from onnxruntime import OrtValue
    return [OrtValue.ortvalue_from_numpy(np.zeros((batch, h, length, d), dtype=np.float32))
            for h, d in zip(heads, head_dims) for _ in (0, 1)]


def fits(feeds: dict, pairs: dict[str, str], positions: int) -> bool:
    """Every past buffer holds the step's `positions` (a caller's own growing cache does not)."""
    return all(feeds[past].shape()[2] >= positions for past in pairs.values())


def run_sharing(session, feeds: dict, outputs: list[str], pairs: dict[str, str]) -> list:
    """The step with each present bound to its past's buffer: the outputs in order, the
    caches being the very OrtValues fed."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, value)
    fresh = [name for name in outputs if name not in pairs]
    for name in fresh:
        binding.bind_output(name)
    for name in outputs:
        if name in pairs:
            binding.bind_ortvalue_output(name, feeds[pairs[name]])
    session.run_with_iobinding(binding)
    computed = dict(zip(fresh, binding.get_outputs()[:len(fresh)]))
    return [computed[name] if name in computed else feeds[pairs[name]] for name in outputs]
