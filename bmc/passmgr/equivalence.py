"""What a pass promises about the function it rewrites, which `bmc.check` holds it to.

Each pass declares one contract (`@register_pass(..., equivalence=...)`, or an `equivalence()`
method where its options decide): "exact" (the same function up to float reassociation: tp,
zero, pp, remat, collectives), "bounded" (a stated relative bound: amp, int8) or "changes"
(pruning: the checker reports the change instead of a verdict). A pipeline is as loose as its
loosest pass. Bounds are relative to the largest magnitude of the reference value, so one
number holds for logits and for hidden states alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

# fp32 reassociation (a sum split over ranks, a recomputed block, a reordered reduction)
# moves a value by a few ulps per op; across a 12-layer model we measured <= 3e-6 relative.
EXACT_BOUND = 1e-4


@dataclass(frozen=True)
class Equivalence:
    kind: Literal["exact", "bounded", "changes"] = "exact"
    bound: float = EXACT_BOUND  # max abs error / max abs reference value
    reason: str = "the same function up to float reassociation"

    def __post_init__(self):
        if self.kind not in ("exact", "bounded", "changes"):
            raise ValueError(f"equivalence kind must be exact, bounded or changes, got {self.kind!r}")

    def __str__(self):
        if self.kind == "changes":
            return f"changes the function ({self.reason})"
        return f"{self.reason}: relative error <= {self.bound:.0e}"


EXACT = Equivalence()


def bounded(bound: float, reason: str) -> Equivalence:
    return Equivalence("bounded", bound, reason)


def changes(reason: str) -> Equivalence:
    return Equivalence("changes", float("inf"), reason)


def combine(contracts: Iterable[tuple[str, Equivalence]]) -> Equivalence:
    """A pipeline's contract: "changes" if any pass changes the function, else the loosest
    bound, named after the passes that set it."""
    contracts = list(contracts)
    changing = [f"{name}: {c.reason}" for name, c in contracts if c.kind == "changes"]
    if changing:
        return changes("; ".join(changing))
    loose = [(name, c) for name, c in contracts if c.kind == "bounded"]
    if not loose:
        return EXACT
    bound = max(c.bound for _, c in loose)
    return bounded(bound, "; ".join(f"{name}: {c.reason}" for name, c in loose))
