"""prune-ffn: the pruned model equals the original with the removed neurons' down-projection
columns zeroed (within 1e-5, outputs on the example and on other inputs, and gradients: a sliced
weight's against the kept slice of the original's), and loses exactly their parameters; on
every projection form (nn.Linear, HF Conv1D, matmul by a weight)."""
import copy

import pytest
import torch

import bmc
from bmc import ir
from bmc.analysis.structure import structure_of
import projection_models
from equivalence import assert_grads_match_slices, other_inputs, probe_loss, zero_inputs
from helpers import model_and_inputs, run


def _model(name):
    if name == "matmul-lm":  # projections written as x @ W.t() and x @ W, not nn.Linear
        return projection_models.build(), projection_models.example_inputs()
    if name == "sliced-gate-up":  # a fused gate|up taken apart by slices
        return projection_models.build_sliced_gate_up(), projection_models.example_inputs()
    return model_and_inputs(name)


def _mlps(model, inputs):
    return [block.mlp for block in structure_of(bmc.trace(copy.deepcopy(model), inputs)).blocks]


def _masked(model, inputs, kept: dict):
    """The original with every removed neuron's contribution zeroed (its down column)."""
    masked = copy.deepcopy(model)
    for mlp in _mlps(model, inputs):
        zero_inputs(masked, mlp.down, sorted(set(range(mlp.down.in_features)) - set(kept[mlp.module])))
    return masked


def _kept_slices(model, inputs, kept: dict) -> dict:
    """Parameter -> (dim, kept indices) for every weight and bias pruning slices: rows of
    up/gate (columns when stored (in, out); the kept neurons' rows in each part of a fused
    gate|up) and their biases, columns of down (rows when stored (in, out))."""
    slices = {}
    for mlp in _mlps(model, inputs):
        keep, width = kept[mlp.module], mlp.down.in_features
        for lin in (p for p in (mlp.up, mlp.gate) if p is not None):
            parts = len(mlp.up_parts) if lin is mlp.up and mlp.up_parts else 1  # a fused gate|up: each part
            rows = [part * width + j for part in range(parts) for j in keep]
            slices[lin.weight] = (1 if lin.transposed else 0, rows)
            if lin.bias is not None:
                slices[lin.bias] = (0, rows)
        slices[mlp.down.weight] = (0 if mlp.down.transposed else 1, keep)
    return slices


CASES = [(name, dynamic) for name in ("gpt-tiny", "llama-tiny", "bert-tiny", "hf-gpt2", "hf-llama", "matmul-lm")
         for dynamic in (False, True)]
CASES += [("hf-phi3", False), ("sliced-gate-up", True)]  # a fused gate|up: chunked (Phi-3), sliced


@pytest.mark.parametrize("name, dynamic", CASES)
def test_pruned_equals_original_with_neurons_zeroed(name, dynamic):
    """Outputs on the example and on other ids (another batch and length when the trace is
    dynamic); every gradient, a sliced weight's against the kept slice of the masked original's."""
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-ffn{ratio=0.5},verify", example_inputs=inputs,
                       dynamic=dynamic)
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_neurons()
    masked = _masked(model, inputs, kept)
    other = other_inputs(model, inputs, batch=3 if dynamic else None, seq=11 if dynamic else None)
    out, want = run(prog, other), run(masked, other)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, run(model, other), atol=1e-4)  # the neurons mattered: the test can fail
    out, want = run(prog, inputs), run(masked, inputs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    probe_loss(out).backward()
    probe_loss(want).backward()
    assert_grads_match_slices(dict(prog.graph_module.named_parameters()), dict(masked.named_parameters()),
                              _kept_slices(model, inputs, kept))
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in prog.graph_module.parameters())
    assert removed == prog.records[0].statistics["params-removed"] > 0


def test_magnitude_keeps_the_largest_neurons_and_random_follows_the_seed():
    model, inputs = _model("gpt-tiny")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[7] *= 100  # one loud neuron
    prog = bmc.compile(copy.deepcopy(model), passes="prune-ffn{ratio=0.9}", example_inputs=inputs)
    assert 7 in ir.get_plan(prog.graph_module, ir.PrunePlan).kept_neurons()["transformer.h.0.mlp"]
    a, b = (ir.get_plan(bmc.compile(copy.deepcopy(model), passes=f"prune-ffn{{ratio=0.5,score=random,seed={s}}}",
                                    example_inputs=inputs).graph_module, ir.PrunePlan).kept_neurons() for s in (1, 2))
    assert a != b


def test_bad_ratio_is_one_clear_error():
    model, inputs = _model("gpt-tiny")
    with pytest.raises(bmc.BmcError, match="ratio must be in \\[0, 1\\)"):
        bmc.compile(model, passes="prune-ffn{ratio=1.5}", example_inputs=inputs)


def test_a_fused_gate_up_not_cut_into_whole_parts_is_refused_in_one_line():
    model = projection_models.build_interleaved_gate_up()  # gate and up features alternate: h[..., 0::2]
    with pytest.raises(bmc.BmcError, match="up/gate give 192 features for the 96 inputs of layers.0.mlp.down.weight, "
                                           "in parts the graph does not show") as info:
        bmc.compile(model, passes="prune-ffn{ratio=0.5}", example_inputs=projection_models.example_inputs())
    assert "\n" not in str(info.value)
