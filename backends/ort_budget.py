"""What an ort-paged build holds under a memory budget: which blocks stay resident
(`plan_residency`, BMInf's policy: the embedding and head always, blocks spread evenly over the
depth, the rest streamed through swap slots) and the bytes a step needs beside the weights
(`reserved_bytes`: the KV cache and the activations). Pure arithmetic over the manifest; the
runtime (ort_paged.py) acts on it."""
from __future__ import annotations

from dataclasses import dataclass

from bmc.backends.ort_streamer import SLOTS
from bmc.errors import BackendError


@dataclass(frozen=True)
class Plan:
    resident: tuple[int, ...]  # block positions (0-based among the blocks) kept in memory
    streamed: tuple[int, ...]
    slot_bytes: int
    weight_bytes: int  # what the plan holds: fixed parts, resident blocks, slots


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` positions spread evenly (BMInf keeps resident blocks apart so each
    streamed block has compute around it to hide its load)."""
    if count >= total:
        return list(range(total))
    if count <= 0:
        return []
    return sorted({round(i * (total - 1) / max(count - 1, 1)) if count > 1 else total // 2 for i in range(count)})


def plan_residency(block_bytes: list[int], fixed_bytes: int, budget: int | None, reserved: int = 0,
                   fixed_streaming: int | None = None) -> Plan:
    """Which blocks stay resident under `budget` (None: all), given the always-resident parts
    (`fixed_bytes`; `fixed_streaming` when blocks are streamed, where lookup tables are paged
    by rows: `row_paged`) and the bytes `reserved` for the KV cache and activations."""
    total = len(block_bytes)
    if budget is None:
        return Plan(tuple(range(total)), (), 0, fixed_bytes + sum(block_bytes))
    largest = max(block_bytes)
    everything = fixed_bytes + sum(block_bytes) + reserved
    if everything <= budget:
        return Plan(tuple(range(total)), (), 0, fixed_bytes + sum(block_bytes))
    fixed_bytes = fixed_bytes if fixed_streaming is None else fixed_streaming
    need = fixed_bytes + SLOTS * largest + reserved
    if budget < need:
        raise BackendError(f"budget {budget:,} bytes is below what serving needs: {need:,} (embedding and head "
                           f"{fixed_bytes:,}, {SLOTS} swap slots of the largest block {largest:,}, KV cache and "
                           f"activations {reserved:,}); give --budget {need} or more")
    room = budget - need
    count = 0  # how many could fit at best (the smallest ones)
    while count < total and sum(sorted(block_bytes)[:count + 1]) <= room:
        count += 1
    # evenly spread; with blocks of different sizes (per-layer pruning) the spread may not fit
    # where the smallest would, and one fewer is kept
    resident = spread(count, total)
    while sum(block_bytes[i] for i in resident) > room and resident:
        resident = spread(len(resident) - 1, total)
    streamed = tuple(i for i in range(total) if i not in resident)
    slot = max((block_bytes[i] for i in streamed), default=0)
    held = fixed_bytes + sum(block_bytes[i] for i in resident) + SLOTS * slot
    return Plan(tuple(resident), streamed, slot, held)


def reserved_bytes(manifest: dict, batch: int, max_len: int) -> int:
    """What a step holds beside the weights, for `batch` sequences of up to `max_len` tokens
    (fp32): the KV cache, one block's new cache besides it (each block's old cache is freed as
    soon as that block ran: PagedRuntime.step), and a block's working set for a whole prompt:
    four live values of the widest per-token value, the widest of the MLP's hidden width, the
    fused qkv, the vocabulary (the largest dimension of any weight) and the attention scores
    (heads x positions); four more where int8 projections multiply two digits per activation
    (their int32 and fp32 products have two rows per token)."""
    layout = manifest["layout"]
    # an encoder has no cache: no per-block entries
    per_block = [2 * batch * h * max_len * d * 4 for h, d in zip(layout["heads"], layout["head_dims"])]
    heads = manifest.get("attention_heads") or max(layout["heads"], default=0)
    logits = 0
    if selects_logits(manifest):  # generating: the logits of the last position only
        # a block's widest value per token: its widest weight dim (the MLP's hidden, the fused
        # qkv); the vocabulary of the embedding and head tables is not per token any more
        parts = [part for part in manifest["parts"] if part["kind"] == "block"]
        logits = 2 * batch * layout["vocab"] * 4
    else:
        parts = manifest["parts"]
    widest_weight = max((max(t["shape"]) for part in parts for t in part["weights"] if t["shape"]), default=0)
    widest = max(manifest["widest_per_token"], widest_weight, heads * max_len)
    live = 8 if manifest.get("int8_digits") == 2 else 4
    return sum(per_block) + max(per_block, default=0) + live * widest * batch * max_len * 4 + logits


def selects_logits(manifest: dict) -> bool:
    """Whether the build's step takes `logits_positions` (bmc/serve/kv_cache.py): older builds
    give every position's logits."""
    return "logits_positions" in manifest["inputs"]
