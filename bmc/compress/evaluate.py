"""Evaluation: perplexity of a causal LM on held-out real text, and cosine similarity of two
models' outputs, before and after a pipeline (the table `bmc-opt --eval` prints).

The held-out text is the last 5% of the standard library's sources (bmc/data.py), cut into
fixed, seeded windows, so every model is scored on the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from bmc.models import data
from bmc.compress.calibration import main_output


@dataclass(frozen=True)
class EvalData:
    """Fixed windows [count, seq + 1] of held-out tokens."""

    windows: torch.Tensor

    @classmethod
    def held_out(cls, path: str | None = None, *, seq: int = 128, count: int = 32, seed: int = 1234) -> "EvalData":
        tokens = data.split(data.text_tokens(path)).held_out
        rows = data.Batches(tokens, count, seq, seed=seed).global_rows(0)
        return cls(rows)

    def batches(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(w[:, :-1], w[:, 1:]) for w in self.windows.split(batch)]


def _logits(model: Callable, inputs: torch.Tensor) -> torch.Tensor:
    return main_output(model(inputs)).float()


@torch.no_grad()
def perplexity(model: Callable, held_out: EvalData, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over every held-out window."""
    total, count = 0.0, 0
    for inputs, targets in held_out.batches(batch):
        logits = _logits(model, inputs)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


@torch.no_grad()
def cosine(model: Callable, reference: Callable, held_out: EvalData, batch: int = 8) -> float:
    """Mean cosine similarity of the two models' per-token outputs (logits)."""
    values = []
    for inputs, _ in held_out.batches(batch):
        values.append(F.cosine_similarity(_logits(model, inputs), _logits(reference, inputs), dim=-1).flatten())
    return torch.cat(values).mean().item()


@dataclass(frozen=True)
class Row:
    name: str
    perplexity: float
    relative: float  # perplexity / reference perplexity - 1
    cosine: float
    weights: int  # parameters plus int8 weights (quantizing keeps the count, pruning lowers it)
    weight_bytes: int


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors the model holds (parameters and buffers, int8 included)."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _module(model: Any) -> torch.nn.Module:
    return getattr(model, "graph_module", model)


def compare(reference: Any, candidates: dict[str, Any], held_out: EvalData, batch: int = 8) -> list[Row]:
    """The reference's row, then one per candidate, scored on the same held-out windows."""
    base = perplexity(reference, held_out, batch)
    rows = [Row("original", base, 0.0, 1.0, weight_count(reference), weight_bytes(_module(reference)))]
    for name, model in candidates.items():
        ppl = perplexity(model, held_out, batch)
        rows.append(Row(name, ppl, ppl / base - 1, cosine(model, reference, held_out, batch), weight_count(model),
                        weight_bytes(_module(model))))
    return rows


def weight_count(model: Any) -> int:
    """Parameters (tied ones once) plus int8 weight buffers: what the model computes with."""
    module = _module(model)
    int8 = [b for b in module.buffers() if b.dtype == torch.int8]
    return sum(t.numel() for t in {id(t): t for t in (*module.parameters(), *int8)}.values())


def format_table(rows: Sequence[Row], title: str = "") -> str:
    header = f"{'model':<36} {'perplexity':>10} {'change':>8} {'cosine':>8} {'weights':>11} {'weight bytes':>13}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<36} {r.perplexity:>10.4f} {r.relative * 100:>+7.2f}% {r.cosine:>8.5f} "
                     f"{r.weights:>11,} {r.weight_bytes:>13,}")
    return "\n".join(lines) + "\n"
