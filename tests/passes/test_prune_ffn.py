"""prune-ffn: the pruned model equals the original with the removed neurons' down-projection
columns zeroed (within 1e-5, outputs and gradients), and loses exactly their parameters."""
import copy

import pytest
import torch

import bmc
from bmc import ir
from bmc.analysis.structure import structure_of
from helpers import model_and_inputs, run


def _model(name):
    return model_and_inputs(name)


def _masked(model, inputs, kept: dict):
    """The original with every removed neuron's contribution zeroed (its down column)."""
    masked = copy.deepcopy(model)
    structure = structure_of(bmc.trace(model, inputs))
    for block in structure.blocks:
        mlp = block.mlp
        drop = sorted(set(range(mlp.up.out_features)) - set(kept[mlp.module]))
        with torch.no_grad():
            weight = masked.get_parameter(mlp.down.weight)
            if mlp.down.transposed:
                weight[drop] = 0
            else:
                weight[:, drop] = 0
    return masked


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny", "hf-gpt2", "hf-llama"])
def test_pruned_equals_original_with_neurons_zeroed(name):
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-ffn{ratio=0.5},verify", example_inputs=inputs)
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_neurons()
    masked = _masked(model, inputs, kept)
    out, want = run(prog, inputs), run(masked, inputs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    reference = dict(masked.named_parameters())
    for pname, p in prog.graph_module.named_parameters():
        if p.shape == reference[pname].shape:  # untouched parameters: the same gradient
            torch.testing.assert_close(p.grad, reference[pname].grad, atol=1e-5, rtol=1e-5)
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
