"""quant-int8: int8 weights with per-row scales, run by bmc::int8_linear. Equivalence is
exact against the model with each quantized weight replaced by its dequantized value (the
stated bound against the fp32 model itself: 1% relative error on these models)."""
import copy
import dataclasses

import pytest
import torch

import bmc
from bmc.models import zoo
from bmc.errors import PipelineError
from bmc.passes.quant_int8 import quantize


def _model(name="gpt-tiny"):
    torch.manual_seed(0)
    return zoo.build(name)


def _dequantized_copy(model, prog):
    """The fp32 model with every weight the pass quantized replaced by int8 * scale."""
    ref = copy.deepcopy(model)
    for name, buffer in prog.graph_module.named_buffers():
        if name.endswith("_int8"):
            weight = name.removesuffix("_int8")
            scale = prog.graph_module.get_buffer(weight + "_scale")
            with torch.no_grad():
                ref.get_parameter(weight).copy_(buffer.float() * scale.reshape(-1, 1))
    return ref


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_weight_only_equals_the_dequantized_model_outputs_and_gradients(name, granularity):
    model = _model(name)
    x = model.example_inputs()
    prog = bmc.compile(copy.deepcopy(model), passes=f"quant-int8{{granularity={granularity}}},verify")
    ref = _dequantized_copy(model, prog)
    out, want = prog(*x), ref(*x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    mine = dict(prog.graph_module.named_parameters())
    for pname, p in mine.items():  # what stays fp32 still trains, with the same gradients
        torch.testing.assert_close(p.grad, ref.get_parameter(pname).grad, atol=1e-5, rtol=1e-5)


def test_per_row_is_closer_to_fp32_than_per_tensor_and_within_one_percent():
    model = _model()
    x = model.example_inputs()
    want = model(*x)
    errors = {}
    for granularity in ("row", "tensor"):
        out = bmc.compile(copy.deepcopy(model), passes=f"quant-int8{{granularity={granularity}}}")(*x)
        errors[granularity] = ((out - want).norm() / want.norm()).item()
    assert errors["row"] < errors["tensor"] and errors["row"] < 0.01, errors


def test_dynamic_activations_equal_integer_arithmetic():
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 5, 64), torch.randn(32, 64), torch.randn(32)
    q, scale = quantize(w, "row")
    out = torch.ops.bmc.int8_linear(x, q, scale, b, "dynamic")
    x_scale = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / x_scale).round().clamp(-127, 127).to(torch.int64)
    exact = (xq @ q.to(torch.int64).t()).double() * x_scale.double() * scale.double() + b.double()
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)


def test_fp32_weights_leave_the_model_and_the_head_is_skipped_by_default():
    model = _model()
    prog = bmc.compile(copy.deepcopy(model), passes="quant-int8")
    stats = prog.records[0].statistics
    quantized = [n.removesuffix("_int8") for n, _ in prog.graph_module.named_buffers() if n.endswith("_int8")]
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in prog.graph_module.parameters())
    assert before - after == sum(model.get_parameter(n).numel() for n in quantized)
    assert stats["int8-bytes"] <= 0.32 * stats["fp32-bytes"]  # 1 byte + a 4-byte scale per row of 32-64
    assert not any(n.startswith("lm_head") for n in quantized)  # the head (tied to the embedding here)
    assert all(b.dtype == torch.int8 for n, b in prog.graph_module.named_buffers() if n.endswith("_int8"))


def test_skip_patterns_and_bad_input():
    model = _model("llama-tiny")
    prog = bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[lm_head,*.mlp.*]}")
    assert prog.records[0].statistics["quantized"] == 8  # q, k, v, o of 2 layers
    with pytest.raises(PipelineError, match="every linear layer is skipped"):
        bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[*]}")
    with pytest.raises(PipelineError, match="no linear layers"):
        bmc.compile(torch.nn.Sequential(torch.nn.ReLU()), passes="quant-int8", example_inputs=(torch.randn(2, 3),))
    with pytest.raises(bmc.BmcError, match="granularity"):
        bmc.compile(copy.deepcopy(model), passes="quant-int8{granularity=channel}")


def test_compression_passes_compose_in_either_order_and_stay_traceable():
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("llama-tiny"), n_layer=4))
    x = model.example_inputs()
    outs = []
    for pipeline in ("prune-layers{drop=[2]},prune-ffn{ratio=0.5},quant-int8,verify",
                     "prune-ffn{ratio=0.5},prune-layers{drop=[2]},quant-int8,verify"):
        prog = bmc.compile(copy.deepcopy(model), passes=pipeline)
        out = prog(*x)
        out.square().mean().backward()  # the torch backend trains what stays fp32
        assert torch.equal(bmc.trace(prog.graph_module, x)(*x), out)  # still a graph torch.export takes
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(PipelineError, match="prune-ffn after quant-int8: .*prune before quantizing.*put prune-ffn before quant-int8"):
        bmc.compile(copy.deepcopy(model), passes="quant-int8,prune-ffn")


def test_tied_copy_quantizes_the_head_and_keeps_the_lookup_fp32():
    model = _model()  # gpt-tiny: lm_head.weight is the token embedding
    x = model.example_inputs()
    prog = bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[],tied=copy},verify")
    buffers = dict(prog.graph_module.named_buffers())
    assert "lm_head.weight_int8" in buffers and prog.records[0].statistics["skipped"] == 0
    assert dict(prog.graph_module.named_parameters(remove_duplicate=False))["lm_head.weight"].dtype == torch.float32
    ref = copy.deepcopy(model)
    head = buffers["lm_head.weight_int8"].float() * buffers["lm_head.weight_scale"].reshape(-1, 1)
    for name, buffer in buffers.items():
        if name.endswith("_int8") and not name.startswith("lm_head"):
            with torch.no_grad():
                ref.get_parameter(name.removesuffix("_int8")).copy_(
                    buffer.float() * buffers[name.removesuffix("_int8") + "_scale"].reshape(-1, 1))
    ref.lm_head = torch.nn.Linear(64, 256, bias=False)
    with torch.no_grad():
        ref.lm_head.weight.copy_(head)  # untied in the reference: the head reads the dequantized copy
    torch.testing.assert_close(prog(*x), ref(*x), atol=1e-5, rtol=1e-5)
