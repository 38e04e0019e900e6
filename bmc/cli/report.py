"""`bmc-opt --report`: where the memory goes on one rank, from the cost model."""
from __future__ import annotations

import sympy
import torch.fx as fx

from bmc import ir
from bmc.analysis import cost
from bmc.analysis.memory import ZERO_COLUMNS, MemoryTable, memory_table  # noqa: F401
from bmc.ir.trace import trace_info

GB = 1e9  # decimal gigabytes, the unit of the ZeRO paper's table


def _gb(nbytes: float | None) -> str:
    """Decimal units, GB down to 0.1 GB (the ZeRO paper's unit), then MB and kB."""
    if nbytes is None:
        return "?"
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= size / 10:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes:.0f} B"


def _per_rank(table: MemoryTable, whole: int) -> str:
    """', 81,976,320 on each rank' where the plan splits weights over ranks."""
    held = round(cost.evaluate(psi_rank(table.params), table.subs))
    return f", {held:,} on each rank" if held != whole else ""


def _int(n) -> str:
    return f"{int(n):,}" if sympy.Integer(n) == n else str(n)


def psi_rank(params) -> sympy.Expr:
    """Ψ_rank: the parameters one rank holds a piece of, each divided by the degrees that split
    it (tp, pp; ZeRO's dp sharding is per part, in the formula)."""
    return sum((sympy.Integer(p.numel) / p.divisor for p in params if not p.is_buffer), sympy.Integer(0))


def _psi_text(psi: sympy.Expr) -> str:
    """'39,530,496/N_t + 42,445,824': the split parameters over their degree, then the rest."""
    by_divisor: dict = {}
    for term in sympy.Add.make_args(sympy.expand(psi)):
        coefficient, rest = term.as_coeff_Mul()
        by_divisor[rest] = by_divisor.get(rest, 0) + coefficient
    parts = []
    for rest, coefficient in sorted(by_divisor.items(), key=lambda item: item[0] == 1):
        if rest == 1:
            parts.append(_int(coefficient))
        else:
            numerator, denominator = sympy.fraction(rest)
            parts.append(f"{_int(coefficient * numerator)}/{denominator}" if numerator == 1
                         else f"{_int(coefficient)}·{rest}")
    return " + ".join(parts) or "0"


PART_NAMES = (("weights", "params"), ("gradients", "grads"), ("optimizer", "optimizer"))


def readable_formula(states: cost.ModelStates, params, subs: dict) -> tuple[str, str] | None:
    """The plan's model states as Ψ_rank × (bytes of weights + gradients + optimizer states per
    parameter), and a plain reading of it; None where the parts do not factor over Ψ_rank
    (parameters of several dtypes, or frozen ones)."""
    psi = psi_rank(params)
    if psi == 0:
        return None
    ratios = [(name, sympy.simplify(getattr(states, part) / psi)) for name, part in PART_NAMES]
    if any(r.free_symbols - {cost.N_d, cost.K} - {s for s in r.free_symbols if str(s).startswith("b_")}
           for _, r in ratios):
        return None
    formula = "Ψ_rank × (" + " + ".join(f"{r} {name}" for name, r in ratios if r != 0) + ")"
    reading = []
    for name, r in ratios:
        if r == 0:
            continue
        per = cost.evaluate(r * (cost.N_d if cost.N_d in r.free_symbols else 1), subs)
        share = f"1/{subs[cost.N_d]} of " if cost.N_d in r.free_symbols else ""
        reading.append(f"{share}{name} ({per:g} bytes each)")
    held = cost.evaluate(psi, subs)
    return formula, (f"each rank holds Ψ_rank = {held:,.0f} parameters ({_psi_text(psi)}; N_t = {subs[cost.N_t]}, "
                     f"N_d = {subs[cost.N_d]}): " + ", ".join(reading))


def activation_text(expr: sympy.Expr) -> tuple[str, str]:
    """'338,416·B·S + 8·S bytes' and its reading per token, from the symbolic saved bytes."""
    expanded = sympy.expand(expr)
    terms = sorted(sympy.Add.make_args(expanded), key=lambda t: -len(t.free_symbols))
    text = " + ".join(f"{_int(c)}·{'·'.join(map(str, rest.as_ordered_factors()))}" if rest != 1 else _int(c)
                      for c, rest in (t.as_coeff_Mul() for t in terms))
    per_token = expanded.coeff(cost.B * cost.S) if expanded.has(cost.B) and expanded.has(cost.S) else None
    reading = (f"{_gb(float(per_token))} for each of the B x S tokens of a step, per rank" if per_token
               and not per_token.free_symbols else "")
    return text, reading


def format_report(gm: fx.GraphModule, setting: cost.Setting, world_size: int) -> str:
    table = memory_table(gm, setting)
    planned = cost.plan_zero_stage(table.params)
    plan_zero_stage = planned or 0
    info = trace_info(gm)
    total = sum(p.numel for p in table.params if not p.is_buffer)
    buffers = sum(p.numel for p in table.params if p.is_buffer)
    trainable = sum(p.numel for p in table.params if p.trainable)
    dtypes = sorted({ir.DTYPE_SHORT.get(p.dtype, str(p.dtype)) for p in table.params})
    seq = setting.seq if setting.seq is not None else "traced"
    k = table.subs[cost.K]
    lines = [
        f"where the memory goes, per rank: {info.model_name if info else 'model'}, world size {world_size} "
        f"(dp={setting.dp} tp={setting.tp} pp={setting.pp}), batch {setting.batch} x seq {seq} per rank",
        f"  parameters {total:,} ({'/'.join(dtypes)}){_per_rank(table, total)}, trainable {trainable:,}, "
        f"buffers {buffers:,}; "
        f"optimizer {setting.setup.optimizer}: "
        f"K = {k} bytes of optimizer state per trainable parameter",
        "",
        f"  {'model states':<18}" + "".join(f"{name + ('*' if z == plan_zero_stage else ''):>13}"
                                            for name, z in ZERO_COLUMNS),
    ]
    for label, part in (("parameters", "params"), ("gradients", "grads"), ("optimizer states", "optimizer"),
                        ("total", "total")):
        lines.append(f"  {label:<18}" + "".join(f"{_gb(table.bytes(z, part)):>13}" for _, z in ZERO_COLUMNS))
    readable = readable_formula(table.states[plan_zero_stage], table.params, table.subs)
    if readable is not None:
        lines.append(f"  {'formula (* plan)':<18} {readable[0]}")
        lines.append(f"  {'':<18} {readable[1]}")
    else:
        lines.append(f"  {'formula (* plan)':<18} {sympy.factor(table.states[plan_zero_stage].total)}")
    lines.append(f"  {'buffers (kept)':<18}{_gb(cost.evaluate(table.states[0].buffers, table.subs)):>13}")
    act = table.activation_bytes()
    act_formula, act_reading = activation_text(table.activations)
    lines += ["", f"  activations saved for backward: {_gb(act)}   = {act_formula} bytes"]
    if act_reading:
        lines.append(f"  {'':<33}{act_reading}")
    if act is not None:
        held = table.bytes(plan_zero_stage) + table.bytes(plan_zero_stage, "buffers") + act
        lines.append(f"  peak per rank under the plan (model states + buffers + activations): {_gb(held)}")
    try:
        fwd = cost.evaluate(table.forward_flops, table.subs)
        lines.append(f"  matmul FLOPs per step: forward {fwd:.4g}, forward+backward ~{3 * fwd:.4g}")
    except ValueError:
        lines.append(f"  matmul FLOPs per forward: {table.forward_flops}")
    plan = "no data-parallel pass in the pipeline: plain DP assumed" if planned is None else \
        f"the pipeline's plan is {'plain DP' if planned == 0 else f'ZeRO-{planned}'}"
    lines.append(f"  (GB = 1e9 bytes; '*' marks the plan's column: {plan})")
    if ir.get_plan(gm, ir.PipelinePlan):
        lines.append("  (the whole model's states per dp x tp rank; a pipeline stage's ranks hold only their "
                     "stage's: see the table of stages)")
    return "\n".join(lines) + "\n"


def _stage_ranks(stage: int, pp: int, dp: int, tp: int) -> str:
    """The global ranks running pipeline stage `stage` on a (pp, dp, tp) mesh."""
    first = (stage % pp) * dp * tp
    return f"{first}" if dp * tp == 1 else f"{first}-{first + dp * tp - 1}"


def format_stage_report(gm: fx.GraphModule, setting: cost.Setting) -> str:
    """Per pipeline stage: what its ranks hold (model states under the plan) and the
    activations it keeps for the microbatches in flight under the schedule."""
    from bmc.backends.pipeline import stage_graph
    from bmc.passes.pp import in_flight
    plan = ir.get_plan(gm, ir.PipelinePlan)
    total, schedule, micro = plan.total_stages, plan.schedule, plan.microbatches
    lines = [f"pipeline stages: pp={plan.stages}, {total} stages, schedule {schedule}, {micro} microbatches "
             f"(per rank of the stage; activations for one microbatch of batch {setting.batch})",
             f"  {'stage':<6}{'blocks':<8}{'ranks':<10}{'parameters':>12}{'model states':>14}"
             f"{'activations':>13}{'in flight':>10}{'peak':>12}"]
    for s in range(total):
        table = memory_table(stage_graph(gm, s, total), setting)
        states = cost.evaluate(table.states_for_plan().total, table.subs)
        buffers = cost.evaluate(table.states_for_plan().buffers, table.subs)
        act = table.activation_bytes()
        flight = in_flight(schedule, s, total, micro)
        peak = states + buffers + (act or 0) * flight
        params = round(cost.evaluate(psi_rank(table.params), table.subs))
        blocks = f"{plan.bounds[s]}-{plan.bounds[s + 1] - 1}"
        lines.append(f"  {s:<6}{blocks:<8}{_stage_ranks(s, plan.stages, setting.dp, setting.tp):<10}"
                     f"{params:>12,}{_gb(states):>14}{_gb(act):>13}{flight:>10}{_gb(peak):>12}")
    worst = max(plan.time) / max(min(plan.time), 1e-30)
    lines.append(f"  stage time (forward+backward FLOPs per microbatch): "
                 f"{', '.join(f'{t:.3g}' for t in plan.time)}; slowest/fastest {worst:.3f}")
    return "\n".join(lines) + "\n"
