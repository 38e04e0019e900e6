"""insert-remat (ckpt): outputs and gradients unchanged; saved activations drop."""
import copy

import pytest
import torch

import bmc
import hf_models
from bmc import cost, zoo
from bmc.errors import PipelineError
from helpers import assert_same_outputs_and_grads, saved_activation_bytes


@pytest.mark.parametrize("name", ["gpt-mini", "llama-mini", "bert-tiny"])
def test_ckpt_keeps_outputs_and_gradients(name):
    model = zoo.build(name)
    inputs = model.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes="ckpt,verify", example_inputs=inputs)
    assert program.records[0].statistics["blocks-checkpointed"] == model.config.n_layer
    assert_same_outputs_and_grads(model, program, inputs)


def test_ckpt_on_hugging_face_llama():
    model = hf_models.build("llama")
    inputs = hf_models.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes="ckpt", example_inputs=inputs)
    assert_same_outputs_and_grads(model, program, inputs)


def test_saved_activations_drop_at_least_3x_on_an_8_block_model():
    model = zoo.build("gpt-mini")
    inputs = model.example_inputs(batch=4, seq=64)
    plain = bmc.compile(copy.deepcopy(model), passes="dce", example_inputs=inputs, dynamic=True)
    remat = bmc.compile(copy.deepcopy(model), passes="dce,ckpt", example_inputs=inputs, dynamic=True)
    measured_plain, measured_remat = saved_activation_bytes(plain, inputs), saved_activation_bytes(remat, inputs)
    assert measured_plain >= 3 * measured_remat, (measured_plain, measured_remat)
    subs = {cost.B: 4, cost.S: 64}
    predicted_plain = int(cost.activation_bytes(plain.graph_module).subs(subs))
    predicted_remat = int(cost.activation_bytes(remat.graph_module).subs(subs))
    assert abs(predicted_remat - measured_remat) <= 0.1 * measured_remat
    assert abs(predicted_plain - measured_plain) <= 0.1 * measured_plain
    # FLOPs of the recomputed blocks are still counted
    assert cost.forward_flops(remat.graph_module) == cost.forward_flops(plain.graph_module)


def test_ckpt_without_blocks_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PipelineError, match="found no repeated blocks"):
        bmc.compile(model, passes="ckpt", example_inputs=(torch.randn(2, 4),))


def test_unimplemented_policy_is_refused():
    with pytest.raises(PipelineError, match="expects one of block"):
        bmc.parse_pipeline("insert-remat{policy=budget}")
