"""prune-layers: the pruned model equals the original with the dropped blocks replaced by the
identity (within 1e-5, outputs on the example and on other inputs, and gradients), and loses
exactly their parameters."""
import copy
import dataclasses

import pytest
import torch

import bmc
import hf_models
from bmc.models import zoo
from bmc.passes.prune_layers import every_other
from equivalence import assert_equal_and_backward


class Skip(torch.nn.Module):
    """A block that passes its residual stream through (what pruning it means)."""

    def forward(self, hidden, *args, **kwargs):
        return hidden


def _model(name):
    torch.manual_seed(0)
    if name.startswith("hf-"):
        return hf_models.build(name[3:], layers=4), hf_models.example_inputs()
    model = zoo.build(dataclasses.replace(zoo.config(name), n_layer=4))
    return model, model.example_inputs()


def _blocks(model):
    for path in ("transformer.h", "model.layers", "encoder.layer"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError("no block list")


@pytest.mark.parametrize("name, dynamic", [("gpt-tiny", False), ("gpt-tiny", True), ("llama-tiny", False),
                                           ("bert-tiny", False), ("hf-gpt2", True), ("hf-llama", False),
                                           ("hf-llama", True)])
def test_pruned_equals_original_with_blocks_skipped(name, dynamic):
    """Outputs on the example and on other ids (another batch and length when the trace is
    dynamic), and every gradient."""
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-layers{drop=[1,2]},verify", example_inputs=inputs,
                       dynamic=dynamic)
    masked = copy.deepcopy(model)
    blocks = _blocks(masked)
    dropped = sum(p.numel() for i in (1, 2) for p in blocks[i].parameters())
    for i in (1, 2):
        blocks[i] = Skip()
    assert_equal_and_backward(prog, masked, model, inputs, dynamic, changed_atol=1e-4)  # the blocks mattered: the test can fail
    reference = dict(masked.named_parameters())
    for pname, p in prog.graph_module.named_parameters():
        torch.testing.assert_close(p.grad, reference[pname].grad, atol=1e-5, rtol=1e-5)
    kept = sum(p.numel() for p in prog.graph_module.parameters())
    assert sum(p.numel() for p in model.parameters()) - kept == dropped == prog.records[0].statistics["params-removed"]


def test_ratio_takes_every_other_block_from_the_top():
    # every second block from the second-to-last down, then the ones between; first and last last
    assert every_other(8, 2) == [4, 6] and every_other(8, 4) == [2, 4, 5, 6] and every_other(4, 2) == [1, 2]
    model, inputs = _model("gpt-tiny")
    prog = bmc.compile(copy.deepcopy(model), passes="prune-layers{ratio=0.5}", example_inputs=inputs)
    kept = {name.split(".")[2] for name, _ in prog.graph_module.named_parameters() if name.startswith("transformer.h.")}
    assert kept == {"0", "3"}


@pytest.mark.parametrize("options, message", [
    ("ratio=1.0", "ratio must be in \\[0, 1\\)"),
    ("drop=[7]", "no block with index \\[7\\]"),
    ("drop=[0,1,2,3]", "would remove all 4 blocks"),
])
def test_bad_input_is_one_clear_error(options, message):
    model, inputs = _model("gpt-tiny")
    with pytest.raises(bmc.BmcError, match=message):
        bmc.compile(model, passes=f"prune-layers{{{options}}}" if options else "prune-layers", example_inputs=inputs)


def test_score_policy_drops_the_blocks_that_change_the_stream_least():
    import dataclasses
    from bmc.compress import calibration
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("llama-tiny"), n_layer=4))
    with torch.no_grad():  # block 2 adds (almost) nothing to the stream: its influence is ~0
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    batches = calibration.text_batches(None, count=2, batch=2, seq=16)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-layers{ratio=0.25,policy=score},verify", calibration=batches)
    assert [n for n, _ in prog.graph_module.model.layers.named_children()] == ["0", "1", "3"]
    with pytest.raises(bmc.BmcError, match="needs calibration data"):
        bmc.compile(copy.deepcopy(model), passes="prune-layers{policy=score}")
