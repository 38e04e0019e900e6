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
A build run as parts (blocks streamed under a budget) shares per part, where every part's
graph proves it (`part_cache_pairs`, `run_part`).
"""
from __future__ import annotations

import os

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


def part_cache_pairs(directory: str, manifest: dict, session_files: list[str],
                     renames: list) -> tuple[dict[str, str], dict[int, dict[str, str]]]:
    """A build run as parts (streamed blocks): (present -> past over the whole step, part index
    -> its present -> past in its session's names), or ({}, {}) unless every part that reads a
    cache proves sharing in the graph its session runs (`session_files`; `renames`, per part,
    the names of a session shared by blocks of one shape, or None)."""
    import onnx
    presents = manifest["outputs"][1:]  # (ids, positions, mask, caches..., [logits positions])
    pasts = set(manifest["inputs"][3:3 + len(presents)])
    pairs, by_part = {}, {}
    for index, part in enumerate(manifest["parts"]):
        part_pasts = [n for n in part["inputs"] if n in pasts]
        if not part_pasts:
            continue
        model = onnx.load(os.path.join(directory, session_files[index]), load_external_data=False)
        proven = shared_cache_pairs(model, part_pasts, [n for n in part["outputs"] if n in presents])
        if not proven:
            return {}, {}
        names = renames[index] or {}
        by_part[index] = {names.get(k, k): names.get(v, v) for k, v in proven.items()}
        pairs.update(proven)
    return (pairs, by_part) if sorted(pairs) == sorted(presents) else ({}, {})


def run_part(session, inputs: dict, wanted: list[str], pairs: dict[str, str] | None, positions: int) -> list:
    """A part's outputs (OrtValues); its presents written into its pasts' buffers where `pairs`
    proved it and those buffers hold the step's `positions` (empty_shared_cache's), else new
    ones (a caller's growing cache)."""
    if not pairs or any(inputs[past].shape()[2] < positions for past in pairs.values()):
        return session.run_with_ort_values(wanted, inputs)
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name in wanted:
        if name in pairs:
            binding.bind_ortvalue_output(name, inputs[pairs[name]])
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return [inputs[pairs[name]] if name in pairs else value for name, value in zip(wanted, binding.get_outputs())]


def _reads_batch_only(node) -> bool:
    attrs = {a.name: a.i for a in node.attribute}
    return node.op_type == "Shape" and attrs.get("start", 0) == 0 and attrs.get("end") == 1


def empty_shared_cache(batch: int, heads: list[int], head_dims: list[int], length: int) -> list:
    """Each layer's key and value buffers for `length` positions, as OrtValues."""
    from onnxruntime import OrtValue
    return [OrtValue.ortvalue_from_numpy(np.zeros((batch, h, length, d), dtype=np.float32))
            for h, d in zip(heads, head_dims) for _ in (0, 1)]


class SharingStep:
    """The step with each present bound to its past's buffer, on one IOBinding kept across
    steps: a generation's buffers are bound once, each step rebinds only its small inputs
    (binding every cache anew each step cost ~0.3 ms of a 25 ms decode step, measured). The
    logits go to a new buffer of their shape, [batch, rows, vocab], bound each step: asking
    ONNX Runtime for its outputs instead wraps every bound one, caches included (0.15 ms a
    step). The last generation's buffers stay bound until the next one binds its own."""

    def __init__(self, session, inputs: list[str], outputs: list[str], pairs: dict[str, str], vocab: int):
        """`inputs`: the ones the session reads, in the step's order (ids, [positions], mask,
        caches..., [logits positions])."""
        self.session, self.outputs, self.pairs, self.vocab = session, outputs, pairs, vocab
        self.ids, self.mask = inputs[0], next(n for n in inputs if n == "attention_mask")
        self.rows = inputs[-1] if inputs[-1] == "logits_positions" else None
        self.pasts = [pairs[name] for name in outputs[1:]] if pairs else []  # in the outputs' order
        self.small = [name for name in inputs if name not in set(pairs.values())]  # bound anew each step
        self.binding = session.io_binding()
        self.caches: list = []  # the buffers bound now, in pairs' order
        self.capacity = 0  # the positions every bound buffer holds
        self.returned: list = []  # the bound buffers in the outputs' order

    def fits(self, feeds: dict) -> bool:
        """Every past buffer holds the step's positions (a caller's own growing cache does not)."""
        positions = feeds[self.mask].shape()[-1]
        if self._bound(feeds):
            return positions <= self.capacity
        return all(feeds[past].shape()[2] >= positions for past in self.pairs.values())

    def _bound(self, feeds: dict) -> bool:
        return len(self.caches) == len(self.pairs) and all(feeds[past] is cache for past, cache
                                                           in zip(self.pairs.values(), self.caches))

    def __call__(self, feeds: dict) -> list:
        """The outputs in order, the caches being the very OrtValues fed."""
        from onnxruntime import OrtValue
        if not self._bound(feeds):
            self._bind_caches([feeds[past] for past in self.pairs.values()])
        batch, tokens = feeds[self.ids].shape()
        rows = feeds[self.rows].shape()[0] if self.rows else tokens
        # a new buffer each step, ONNX Runtime's own: the caller may keep a step's logits
        logits = OrtValue.ortvalue_from_shape_and_type([batch, rows, self.vocab], np.float32)
        self.binding.bind_ortvalue_output(self.outputs[0], logits)
        for name in self.small:
            self.binding.bind_ortvalue_input(name, feeds[name])
        self.session.run_with_iobinding(self.binding)
        return [logits, *(feeds[past] for past in self.pasts)]

    def decode(self, values: dict):
        """A step on the buffers bound now, `values` its other inputs as numpy arrays; its
        logits: generation's per-token path, a few bindings and the run."""
        from onnxruntime import OrtValue
        for name, array in values.items():
            self.binding.bind_cpu_input(name, array)
        batch, tokens = values[self.ids].shape
        logits = OrtValue.ortvalue_from_shape_and_type(
            [batch, values[self.rows].shape[0] if self.rows else tokens, self.vocab], np.float32)
        self.binding.bind_ortvalue_output(self.outputs[0], logits)
        self.session.run_with_iobinding(self.binding)
        return logits

    def _bind_caches(self, caches: list) -> None:
        for (present, past), cache in zip(self.pairs.items(), caches):
            self.binding.bind_ortvalue_input(past, cache)
            self.binding.bind_ortvalue_output(present, cache)
        self.caches = caches
        self.capacity = min(cache.shape()[2] for cache in caches)
        bound = dict(zip(self.pairs.values(), caches))
        self.returned = [bound[past] for past in self.pasts]  # as __call__ returns them

    def holds(self, caches: list) -> bool:
        """`caches` (as a step returned them) are the buffers bound now."""
        return len(caches) == len(self.returned) and all(a is b for a, b in zip(caches, self.returned))
