"""quant-int8: int8 weights with per-row scales, run by bmc::int8_linear, for every projection
form (nn.Linear, HF Conv1D addmm, matmul by a weight). Equivalence is exact (1e-5) against the
model with each weight replaced by its int8 value computed in the test from the fp32 weight (the
stated bound against the fp32 model itself: 1% relative error on these models)."""
import copy
import dataclasses

import pytest
import torch

import bmc
from bmc.models import zoo
from bmc.errors import PipelineError
from bmc.passes.quant_int8 import quantize
import projection_models
from equivalence import assert_equal_and_backward, other_inputs
from helpers import model_and_inputs, run


def _model(name="gpt-tiny"):
    if name == "matmul-lm":
        return projection_models.build(), projection_models.example_inputs()
    return model_and_inputs(name)


def _projection_weights(model) -> dict[str, bool]:
    """Every projection weight of the model, read from its modules (not from the pass), and
    whether it is stored (in, out): nn.Linear (out, in); HF Conv1D (in, out); the matmul model
    as its code says."""
    from transformers.pytorch_utils import Conv1D
    found = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, torch.nn.Linear):
            found[prefix + "weight"] = False
        elif isinstance(module, Conv1D):
            found[prefix + "weight"] = True
        elif isinstance(module, projection_models.MatmulMLP):
            found.update({prefix + "up": False, prefix + "gate": False, prefix + "down": True})
        elif isinstance(module, projection_models.MatmulLM):
            found["head"] = True
    return found


def _expected(model) -> dict[str, bool]:
    """What quant-int8 must quantize by default: every projection but the output head."""
    heads = {"lm_head.weight", "head"}
    return {name: in_out for name, in_out in _projection_weights(model).items() if name not in heads}


def independently_quantized(model, weights: dict[str, bool], granularity="row"):
    """The fp32 model with each named weight replaced by its symmetric absmax int8 value,
    computed here from the original fp32 weight: one scale per output row (a row of the (out, in)
    matrix, so a column of a weight stored (in, out)) or one for the whole matrix."""
    ref = copy.deepcopy(model)
    for name, in_out in weights.items():
        weight = ref.get_parameter(name)
        rows = weight.detach().t() if in_out else weight.detach()
        absmax = rows.abs().amax(dim=1, keepdim=True) if granularity == "row" else rows.abs().amax()
        scale = absmax.clamp(min=1e-8) / 127
        value = (rows / scale).round().clamp(-127, 127) * scale
        with torch.no_grad():
            weight.copy_(value.t() if in_out else value)
    return ref


def _quantized_names(prog) -> set[str]:
    return {n.removesuffix("_int8") for n, _ in prog.graph_module.named_buffers() if n.endswith("_int8")}


CASES = [("gpt-tiny", "row", False), ("gpt-tiny", "tensor", False), ("llama-tiny", "row", True),
         ("llama-tiny", "tensor", False), ("hf-gpt2", "row", False), ("hf-gpt2", "row", True),
         ("hf-llama", "row", False), ("hf-llama", "row", True), ("matmul-lm", "row", False),
         ("matmul-lm", "tensor", True)]


@pytest.mark.parametrize("name, granularity, dynamic", CASES)
def test_weight_only_equals_an_independently_quantized_model(name, granularity, dynamic):
    """Every projection (nn.Linear, HF Conv1D, matmul by a weight) but the head is quantized;
    outputs equal the fp32 model with those weights quantized here, on the example and on other
    ids (another batch and length when the trace is dynamic); what stays fp32 gets the same gradients."""
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes=f"quant-int8{{granularity={granularity}}},verify",
                       example_inputs=inputs, backend="torch", dynamic=dynamic)
    expected = _expected(model)
    assert _quantized_names(prog) == set(expected)
    ref = independently_quantized(model, expected, granularity)
    assert_equal_and_backward(prog, ref, model, inputs, dynamic, changed_atol=1e-5)  # quantizing changed something: the test can fail
    reference = dict(ref.named_parameters())
    for pname, p in prog.graph_module.named_parameters():  # what stays fp32 still trains, with the same gradients
        torch.testing.assert_close(p.grad, reference[pname].grad, atol=1e-5, rtol=1e-5, msg=pname)


@pytest.mark.parametrize("name", ["gpt-tiny", "hf-gpt2"])
def test_per_row_is_closer_to_fp32_than_per_tensor_and_within_one_percent(name):
    model, x = _model(name)
    want = run(model, x)
    errors = {}
    for granularity in ("row", "tensor"):
        prog = bmc.compile(copy.deepcopy(model), passes=f"quant-int8{{granularity={granularity}}}", example_inputs=x)
        out = run(prog, x)
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
    model, _ = _model()
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
    model, _ = _model("llama-tiny")
    prog = bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[lm_head,*.mlp.*]}")
    assert prog.records[0].statistics["quantized"] == 8  # q, k, v, o of 2 layers
    with pytest.raises(PipelineError, match=r"nothing to quantize: found 15 aten.linear, all left fp32: 15 by skip "
                                            r"patterns \['\*'\]") as info:
        bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[*]}")
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match="no projections by a weight parameter"):
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
    model, x = _model()  # gpt-tiny: lm_head.weight is the token embedding
    prog = bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[],tied=copy},verify")
    buffers = dict(prog.graph_module.named_buffers())
    assert "lm_head.weight_int8" in buffers and prog.records[0].statistics["skipped"] == 0
    assert dict(prog.graph_module.named_parameters(remove_duplicate=False))["lm_head.weight"].dtype == torch.float32
    untied = copy.deepcopy(model)
    untied.lm_head = torch.nn.Linear(64, 256, bias=False)  # the head reads a copy; the lookup keeps fp32
    with torch.no_grad():
        untied.lm_head.weight.copy_(model.lm_head.weight)
    ref = independently_quantized(untied, _projection_weights(untied))
    other = other_inputs(model, x)
    for inputs in (x, other):
        torch.testing.assert_close(run(prog, inputs), run(ref, inputs), atol=1e-5, rtol=1e-5)


def test_skipped_by_tying_says_so():
    model, inputs = _model("hf-gpt2")  # lm_head.weight is wte's
    with pytest.raises(PipelineError, match=r"found 8 Conv1D addmm, 1 aten.linear, all left fp32: 8 by skip patterns "
                                            r".*; 1 because the weight is also read elsewhere, e.g. tied to an "
                                            r"embedding \(lm_head.weight; tied=copy"):
        bmc.compile(copy.deepcopy(model), passes="quant-int8{skip=[*.attn.*,*.mlp.*]}", example_inputs=inputs)
