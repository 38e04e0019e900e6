"""The torch backend at world size 1: compiled programs train and infer like the original."""
import copy

import pytest
import torch

import bmc
import hf_models
from bmc.models import zoo
from helpers import assert_same_outputs_and_grads


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny"])
def test_compiled_zoo_model_matches_eager_forward_and_backward(name):
    model = zoo.build(name)
    inputs = model.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes=["cleanup", "analyze", "verify"], example_inputs=inputs)
    assert program.pipeline == "dce,shape-prop,shape-prop,annotate-cost,verify"
    assert [r.spec.name for r in program.records] == ["dce", "shape-prop", "shape-prop", "annotate-cost", "verify"]
    assert_same_outputs_and_grads(model, program, inputs)


def test_compiled_hf_llama_matches_eager():
    model = hf_models.build("llama")
    inputs = hf_models.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes="dce,annotate-cost", example_inputs=inputs)
    assert_same_outputs_and_grads(model, program, inputs)


def test_training_steps_equal_eager_training():
    """Five AdamW steps on the loss the graph computes itself (targets traced in)."""
    model = zoo.build("gpt-tiny")
    (x,) = model.example_inputs(batch=2, seq=16)
    targets = torch.roll(x, -1, dims=1)
    program = bmc.compile(copy.deepcopy(model), passes="dce,verify", example_inputs=(x, targets))
    opt_ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = program.optimizer(torch.optim.AdamW, lr=1e-2)
    for _ in range(5):
        for m, o in ((model, opt_ref), (program, opt)):
            o.zero_grad()
            loss = m(x, targets)
            loss.backward()
            o.step()
        torch.testing.assert_close(program(x, targets), model(x, targets), atol=1e-5, rtol=1e-5)
    for name, p in program.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name], atol=1e-5, rtol=1e-5)


def test_compile_accepts_a_traced_graph_and_a_saved_program(tmp_path):
    model = zoo.build("llama-tiny")
    inputs = model.example_inputs()
    program = bmc.compile(bmc.trace(copy.deepcopy(model), inputs), passes=["dce"])
    program.save(str(tmp_path / "p.pt2"))
    again = bmc.compile(str(tmp_path / "p.pt2"), passes=["verify"])
    torch.testing.assert_close(again(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert bmc.load(str(tmp_path / "p.pt2")).pipeline == "dce"


def test_backend_errors_are_clear():
    model = zoo.build("gpt-tiny")
    with pytest.raises(bmc.BackendError, match="unknown backend 'trch'; did you mean torch"):
        bmc.compile(model, backend="trch")
    with pytest.raises(bmc.BackendError, match="meta device"):
        bmc.compile(zoo.build("gpt-tiny", device="meta"))
    with pytest.raises(bmc.BackendError, match="world size 2 needs torch.distributed: launch the script with torchrun"):
        bmc.compile(model, passes="zero3", world_size=2)
    with pytest.raises(bmc.PipelineError, match="unknown pass"):
        bmc.compile(model, passes=["nope"])


@pytest.mark.parametrize("pipeline, message", [
    ("zero{stage=3,bucket_mb=0}", "bucket_mb must be > 0"),
    ("zero{stage=3,prefetch=-1}", "prefetch must be >= 0"),
    ("zero{stage=5}", "expects one of 1|2|3"),
    ("dp{bucket_mb=-2}", "bucket_mb must be > 0"),
    ("amp{growth_interval=0}", "growth_interval must be >= 1"),
    ("insert-remat{budget=-5}", "budget must be > 0"),
])
def test_training_pass_options_out_of_range_are_one_line_errors(pipeline, message):
    with pytest.raises(bmc.PipelineError, match=message) as info:
        bmc.parse_pipeline(pipeline)
    assert "\n" not in str(info.value)
