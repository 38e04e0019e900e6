"""annotate-cost: FLOPs agree with torch's FlopCounterMode, saved-activation bytes with
saved-tensor hooks; the program is unchanged."""
import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

import hf_models
from bmc import ir
from bmc.analysis import cost
from bmc.models import zoo
from bmc.passmgr.manager import PassManager
from helpers import assert_same_outputs_and_grads, run, saved_activation_bytes, traced_copy

CASES = [("gpt-tiny", None), ("llama-tiny", None), ("bert-tiny", None)] + [(n, "hf") for n in hf_models.NAMES]


def _model(name, kind):
    if kind == "hf":
        return hf_models.build(name), hf_models.example_inputs()
    model = zoo.build(name)
    return model, model.example_inputs()


@pytest.mark.parametrize("name, kind", CASES)
def test_cost_annotations_match_torch_counters(name, kind):
    model, inputs = _model(name, kind)
    gm = traced_copy(model, inputs, dynamic=True)
    PassManager("annotate-cost").run(gm)
    annotated = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all(ir.get(n, ir.Cost) is not None for n in annotated)
    batch, seq = 2, 16
    subs = {cost.B: batch, cost.S: seq}
    # FlopCounterMode on CPU counts the matmul family; compare without the sdpa term
    sdpa = sum((ir.get(n, ir.Cost).flops for n in annotated
                if ir.target_str(n) == "aten.scaled_dot_product_attention"), sympy.Integer(0))
    with FlopCounterMode(display=False) as counter:
        run(model, inputs)
    counted = counter.get_total_flops()
    if counted and not counter.get_flop_counts().get("Global", {}).get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu):
        assert int((cost.forward_flops(gm) - sdpa).subs(subs)) == counted
    predicted = int(cost.activation_bytes(gm).subs(subs))
    measured = saved_activation_bytes(model, inputs)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_cost_is_symbolic_in_batch_and_sequence():
    model = zoo.build("gpt-tiny")
    gm = traced_copy(model, model.example_inputs(), dynamic=True)
    flops = cost.forward_flops(gm)
    assert flops.free_symbols == {cost.B, cost.S}
    assert sympy.degree(flops, cost.S) == 2  # attention is quadratic in the sequence
    assert flops.subs({cost.B: 4, cost.S: 16}) == 2 * flops.subs({cost.B: 2, cost.S: 16})


def test_annotate_cost_keeps_equivalence():
    model = zoo.build("llama-tiny")
    inputs = model.example_inputs()
    gm = traced_copy(model, inputs)
    PassManager("annotate-cost").run(gm)
    assert_same_outputs_and_grads(model, gm, inputs)
