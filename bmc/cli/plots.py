"""Pictures people would rather look at than read, drawn with matplotlib (the `plot` extra):

- memory.png: where the memory goes per rank, by ZeRO column and, for a pipeline, by stage
  (bmc-opt --plot DIR; the numbers of --report);
- pipeline.png: the pipeline schedule as a timeline per stage, forward, backward and bubbles,
  from the schedule and the cost model's stage times (bmc-opt --plot DIR with pp);
- loss.png: loss curves of training runs, overlaid (bmc plot RUN_DIR ...);
- paging.png: an ort-paged run's decode steps part by part, compute beside the page-ins of
  streamed blocks (bmc run DIR --plot FILE).

Every file is written atomically (a temporary file, then a rename).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

from bmc.errors import BmcError
from bmc.extras import require

COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer states": "#55a868", "buffers": "#8c8c8c",
          "activations": "#c44e52"}
PARTS = (("parameters", "params"), ("gradients", "grads"), ("optimizer states", "optimizer"), ("buffers", "buffers"))
GB = 1e9


def _pyplot():
    matplotlib = require("matplotlib", "pictures (--plot)")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _stacked(ax, labels: Sequence[str], rows: dict[str, list[float]], highlight: int | None = None) -> None:
    bottom = [0.0] * len(labels)
    for part, values in rows.items():
        ax.bar(labels, [v / GB for v in values], bottom=[b / GB for b in bottom], label=part, color=COLORS[part],
               edgecolor="black" if highlight is not None else None, linewidth=0)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.text(i, total / GB, f"{total / GB:.3g}", ha="center", va="bottom", fontsize=8)
    if highlight is not None:
        ax.get_xticklabels()[highlight].set_fontweight("bold")
    ax.set_ylabel("GB per rank")


# ------------------------------------------------------------------ memory


def plan_figures(directory: str, gm, setting, world_size: int) -> list[str]:
    """What bmc-opt --plot DIR writes: memory.png, and pipeline.png for a pp plan."""
    from bmc import ir
    written = [memory_figure(gm, setting, world_size, os.path.join(directory, "memory.png"))]
    if ir.get_plan(gm, ir.PipelinePlan):
        written.append(pipeline_figure(gm, os.path.join(directory, "pipeline.png")))
    return written


def memory_figure(gm, setting, world_size: int, path: str) -> str:
    """Per-rank bytes by ZeRO column (the plan's column in bold) and, for a pipeline, by stage
    under the plan (activations times the microbatches the schedule keeps in flight)."""
    from bmc import ir
    from bmc.analysis import cost
    from bmc.analysis.memory import ZERO_COLUMNS, memory_table
    from bmc.ir.trace import trace_info
    plt = _pyplot()
    table = memory_table(gm, setting)
    plan_stage = cost.plan_zero_stage(table.params) or 0
    activations = table.activation_bytes() or 0.0
    pipeline = ir.get_plan(gm, ir.PipelinePlan)
    fig, axes = plt.subplots(1, 2 if pipeline else 1, figsize=(11 if pipeline else 6, 4.2), squeeze=False)
    rows = {label: [table.bytes(z, part) for _, z in ZERO_COLUMNS] for label, part in PARTS}
    rows["activations"] = [activations] * len(ZERO_COLUMNS)
    ax = axes[0][0]
    _stacked(ax, [name for name, _ in ZERO_COLUMNS], rows, highlight=[z for _, z in ZERO_COLUMNS].index(plan_stage))
    whole = " (the whole model's states per dp x tp rank)" if pipeline else ""
    ax.set_title(f"by ZeRO column{whole}", fontsize=10)
    if pipeline:
        _stage_panel(axes[0][1], gm, setting, pipeline)
    axes[0][-1].legend(fontsize=8, loc="upper right")
    info = trace_info(gm)
    fig.suptitle(f"memory per rank: {info.model_name if info else 'model'}, world size {world_size} "
                 f"(dp={setting.dp} tp={setting.tp} pp={setting.pp}), batch {setting.batch} x seq {setting.seq}",
                 fontsize=11)
    return _save(fig, path)


def _stage_panel(ax, gm, setting, pipeline) -> None:
    from bmc.analysis import cost
    from bmc.analysis.memory import memory_table
    from bmc.backends.pipeline import stage_graph
    from bmc.passes.pp import in_flight
    labels, rows = [], {label: [] for label, _ in PARTS}
    rows["activations"] = []
    for s in range(pipeline.total_stages):
        table = memory_table(stage_graph(gm, s, pipeline.total_stages), setting)
        states = table.states_for_plan()
        for label, part in PARTS:
            rows[label].append(cost.evaluate(getattr(states, part), table.subs))
        flight = in_flight(pipeline.schedule, s, pipeline.total_stages, pipeline.microbatches)
        rows["activations"].append((table.activation_bytes() or 0.0) * flight)
        labels.append(f"stage {s}\n({flight} in flight)")
    _stacked(ax, labels, rows)
    ax.set_title(f"by pipeline stage, under the plan ({pipeline.schedule}, {pipeline.microbatches} microbatches)",
                 fontsize=10)


# ------------------------------------------------------------------ pipeline schedule


@dataclass(frozen=True)
class Slot:
    stage: int
    kind: str  # "F" or "B"
    microbatch: int
    start: float
    end: float


def schedule_order(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order one stage runs its forwards and backwards: GPipe (all forwards, then all
    backwards) or 1F1B (warm up with the forwards the stages after it need, then one forward
    and one backward in turn, then the remaining backwards)."""
    if schedule == "gpipe":
        return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
    if schedule != "1f1b":
        raise BmcError(f"the pipeline picture draws gpipe and 1f1b schedules; this plan uses {schedule}")
    warm = min(stages - stage - 1, microbatches)
    order = [("F", m) for m in range(warm)]
    for i in range(microbatches - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", m) for m in range(microbatches - warm, microbatches)]


def simulate(schedule: str, times: Sequence[float], microbatches: int, backward_share: float = 2 / 3) -> list[Slot]:
    """When each forward and backward runs, each stage in its schedule's order as soon as its
    input is there: F(s, m) after F(s-1, m), B(s, m) after B(s+1, m) (the last stage's after
    its own forward). Times are a stage's forward+backward per microbatch; backward takes
    `backward_share` of it (two matmuls per forward one). Communication is not drawn.
    (torch.distributed.pipelining runs schedules but does not expose a timeline to draw.)"""
    stages = len(times)
    orders = [schedule_order(schedule, s, stages, microbatches) for s in range(stages)]
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * stages
    slots: list[Slot] = []
    position = [0] * stages
    while any(position[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(orders[s]):
                continue
            kind, m = orders[s][position[s]]
            need = (s - 1, "F", m) if kind == "F" and s > 0 else (s + 1, "B", m) if kind == "B" and s < stages - 1 \
                else (s, "F", m) if kind == "B" else None
            if need is not None and need not in done:
                continue
            start = max(free[s], done.get(need, 0.0) if need else 0.0)
            length = times[s] * (backward_share if kind == "B" else 1 - backward_share)
            slots.append(Slot(s, kind, m, start, start + length))
            done[(s, kind, m)] = free[s] = start + length
            position[s] += 1
            progressed = True
        if not progressed:
            raise BmcError(f"the {schedule} order deadlocks: a bug in bmc's schedule picture")
    return slots


def pipeline_figure(gm, path: str) -> str:
    from bmc import ir
    plan = ir.get_plan(gm, ir.PipelinePlan)
    if plan is None:
        raise BmcError("the pipeline picture needs a pp plan: add pp{stages=N} to the pipeline")
    plt = _pyplot()
    slowest = max(plan.time)
    times = [t / slowest for t in plan.time]  # in units of the slowest stage's forward+backward
    slots = simulate(plan.schedule, times, plan.microbatches)
    makespan = max(slot.end for slot in slots)
    busy = sum(slot.end - slot.start for slot in slots)
    bubble = 1 - busy / (plan.total_stages * makespan)
    fig, ax = plt.subplots(figsize=(11, 0.7 * plan.total_stages + 1.6))
    for slot in slots:
        color = "#4c72b0" if slot.kind == "F" else "#55a868"
        ax.barh(slot.stage, slot.end - slot.start, left=slot.start, color=color, edgecolor="white", height=0.8)
        ax.text((slot.start + slot.end) / 2, slot.stage, f"{slot.kind}{slot.microbatch}", ha="center", va="center",
                color="white", fontsize=8)
    ax.barh(range(plan.total_stages), [makespan] * plan.total_stages, color="#eeeeee", height=0.8, zorder=0)
    ax.set_yticks(range(plan.total_stages), [f"stage {s}" for s in range(plan.total_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time, in units of the slowest stage's forward+backward of one microbatch (cost model)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#4c72b0", "#55a868", "#eeeeee")]
    ax.legend(handles, ["forward", "backward", "bubble (idle)"], fontsize=8, loc="lower right")
    ax.set_title(f"pipeline schedule {plan.schedule}: {plan.total_stages} stages, {plan.microbatches} microbatches; "
                 f"bubble {bubble:.0%} of stage time", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ training runs


def read_losses(run_dir: str) -> list[tuple[int, float]]:
    path = os.path.join(run_dir, "loss.jsonl")
    if not os.path.isfile(path):
        raise BmcError(f"{run_dir} has no loss.jsonl: give the --out directory of a tools/train.py run")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), float(row["loss"])))
            except (ValueError, KeyError, TypeError):
                raise BmcError(f"{path}:{number} is not a loss record ({{\"step\": N, \"loss\": X}})") from None
    if not rows:
        raise BmcError(f"{path} holds no steps yet")
    return rows


def _run_label(run_dir: str) -> str:
    summary = os.path.join(run_dir, "summary.json")
    name = os.path.basename(os.path.normpath(run_dir))
    if os.path.isfile(summary):
        try:
            with open(summary) as f:
                found = json.load(f)
            ranks = found.get("world_size", 1)
            details = [found.get("pipeline") or "", f"{ranks} ranks" if ranks > 1 else ""]
            details = ", ".join(d for d in details if d)
            return f"{name} ({details})" if details else name
        except (OSError, ValueError):
            pass
    return name


def loss_figure(run_dirs: Sequence[str], path: str) -> str:
    plt = _pyplot()
    curves = [(d, read_losses(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run_dir, rows in curves:
        ax.plot([s for s, _ in rows], [loss for _, loss in rows], label=_run_label(run_dir), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"loss curves of {len(curves)} run{'s' if len(curves) > 1 else ''}", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ paging


def paging_figure(events: Sequence[tuple], title: str, path: str) -> str:
    """`events`: (lane, part name, start, end) in seconds, lanes "compute", "compute-streamed",
    "wait" (compute waiting for a page-in) and "page-in" (on the prefetch thread, or on the
    compute thread inside its waits where the runtime pages in between parts)."""
    if not events:
        raise BmcError("the paging picture needs a recorded run: nothing was recorded")
    plt = _pyplot()
    origin = min(e[2] for e in events)
    lanes = {"compute": 0, "compute-streamed": 0, "wait": 0, "page-in": 1}
    colors = {"compute": "#4c72b0", "compute-streamed": "#8172b2", "wait": "#c44e52", "page-in": "#55a868"}
    fig, ax = plt.subplots(figsize=(11, 2.6))
    for lane, _, start, end in events:
        ax.barh(lanes[lane], (end - start) * 1e3, left=(start - origin) * 1e3, color=colors[lane], height=0.7,
                edgecolor="white", linewidth=0.3)
    ax.set_yticks([0, 1], ["compute", "page-in"])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in colors]
    ax.legend(handles, ["resident block / other part", "streamed block", "waiting for its weights", "page-in"],
              fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)
    waited = sum(e[3] - e[2] for e in events if e[0] == "wait")
    total = max(e[3] for e in events) - origin
    ax.set_title(f"{title}; compute waited {waited / total:.0%} of {total * 1e3:.0f} ms", fontsize=10)
    return _save(fig, path)
