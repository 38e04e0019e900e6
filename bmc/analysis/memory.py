"""Per-rank memory from the cost model: model states by ZeRO stage and saved activations,
evaluated at a setting (what `bmc-opt --report` prints and `--measure` checks)."""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch.fx as fx

from bmc.analysis import cost

ZERO_COLUMNS = (("plain DP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3))


@dataclass(frozen=True)
class MemoryTable:
    """Per-rank bytes by ZeRO stage (0 = plain data parallel) and the saved activations."""

    params: list[cost.ParamInfo]
    states: dict[int, cost.ModelStates]  # symbolic, by ZeRO stage
    activations: sympy.Expr
    forward_flops: sympy.Expr
    subs: dict

    def bytes(self, zero_stage: int, part: str = "total") -> float:
        return cost.evaluate(getattr(self.states[zero_stage], part), self.subs)

    def states_for_plan(self) -> cost.ModelStates:
        """Model states under the ZeRO stage each parameter's bmc.zero gives (0 if none)."""
        return cost.model_states(self.params)

    def activation_bytes(self) -> float | None:
        try:
            return cost.evaluate(self.activations, self.subs)
        except ValueError:
            return None


def memory_table(gm: fx.GraphModule, setting: cost.Setting, stage: int | None = None) -> MemoryTable:
    params = cost.parameters(gm)
    states = {z: cost.model_states(params, zero_stage=z, stage=stage) for _, z in ZERO_COLUMNS}
    return MemoryTable(params, states, cost.activation_bytes(gm, stage=stage), cost.forward_flops(gm),
                       setting.substitutions(params))
