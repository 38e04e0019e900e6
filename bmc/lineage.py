"""The lineage of a model: the recorded steps that made it (training, export, compression, a
build), oldest first, each with the sha256 of its files and the digest of the step it was made
from, so a chain is checked link by link. Torch-free: a serving process reads it (bmc run --info)."""
from __future__ import annotations

import hashlib
import json


def step_digest(step: dict) -> str:
    """What ties a step to the one after it: the sha256 of its files' checksums."""
    return hashlib.sha256(json.dumps(step.get("files", {}), sort_keys=True).encode()).hexdigest()


def next_step(lineage: list[dict], record: dict, files: dict[str, str]) -> list[dict]:
    """`lineage` with a step appended: `record`, the digest of the step it was made from,
    and the sha256 of its own `files`."""
    return [*lineage, {**record, "input": step_digest(lineage[-1]) if lineage else None, "files": files}]


def check_chain(lineage: list[dict]) -> list[str]:
    """Where a chain does not hold together: a step whose recorded input is not the digest
    of the step before it (empty when every link holds)."""
    broken = []
    for number, (before, step) in enumerate(zip(lineage, lineage[1:]), start=2):
        if step.get("input") != step_digest(before):
            broken.append(f"step {number} ({step.get('kind')}) was not made from step {number - 1} "
                          f"({before.get('kind')}) as recorded")
    return broken


def describe(lineage: list[dict]) -> str:
    """The chain as lines a person reads: each step's kind and what it records, its files'
    checksums shortened, and whether each link holds."""
    lines = []
    skip = {"kind", "files", "input", "statistics", "eval"}
    broken = check_chain(lineage)
    for number, step in enumerate(lineage, start=1):
        facts = ", ".join(f"{k}={_short(v)}" for k, v in step.items() if k not in skip and v not in (None, "", {}))
        lines.append(f"{number}. {step.get('kind', '?')}: {facts}")
        for name, pass_stats in (step.get("statistics") or {}).items():
            lines.append(f"     {name}: " + ", ".join(f"{k}={v}" for k, v in pass_stats.items()))
        if step.get("eval"):
            lines.append("     " + _eval_line(step["eval"]))
        files = step.get("files", {})
        shown = ", ".join(f"{name} {digest[:12]}" for name, digest in list(files.items())[:4])
        more = f" and {len(files) - 4} more" if len(files) > 4 else ""
        lines.append(f"     files: {shown}{more}" if files else "     files: none recorded")
        if number > 1:
            holds = not any(b.startswith(f"step {number} ") for b in broken)
            lines.append(f"     made from step {number - 1}: " + ("yes (its digest matches)" if holds else
                                                                 "NO: its recorded input is another step's"))
    return "\n".join(lines)


def _eval_line(figures: dict) -> str:
    """--eval's figures in a line: the original's held-out perplexity, then the build's."""
    rows = figures.get("rows", [])
    if len(rows) < 2:
        return f"eval: {_short(figures)}"
    base, built = rows[0], rows[-1]
    return (f"eval on {figures.get('windows')} windows of {figures.get('seq')} tokens ({figures.get('text')}): "
            f"perplexity {base['perplexity']:.4f} -> {built['perplexity']:.4f} ({built['relative']:+.2%}), "
            f"cosine {built['cosine']:.5f}, weight bytes {base['weight_bytes']:,} -> {built['weight_bytes']:,}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
