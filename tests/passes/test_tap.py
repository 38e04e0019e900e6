"""tap: the extra outputs equal the hidden states forward hooks see on the original model (within
1e-6), the original output is unchanged, the graph verifies and re-traces, and tapping composes
after prune-layers and prune-heads (against the original with those blocks made the identity
and those heads masked)."""
import copy
import dataclasses

import pytest
import torch

import bmc
from bmc import ir
from bmc.models import zoo
from bmc.errors import PipelineError
from bmc.analysis.structure import structure_of
from bmc.ir.trace import normalize_example_inputs
from helpers import first_tensor, model_and_inputs, run

TOL = dict(atol=1e-6, rtol=1e-6)


def _model(name):
    return model_and_inputs(name)


def _hooked(model, inputs, paths):
    """The model's output and what each module in `paths` returns, seen by forward hooks."""
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda _m, _a, out, p=p: seen.__setitem__(p, first_tensor(out) if not isinstance(out, torch.Tensor) else out))
        for p in paths]
    try:
        with torch.no_grad():
            out = run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _tapped(prog, inputs):
    args, kwargs = normalize_example_inputs(inputs)
    with torch.no_grad():
        out, taps = prog(*args, **kwargs)
    return first_tensor(out), taps


def _check(prog, reference, inputs, paths):
    want_out, want = _hooked(reference, inputs, paths)
    out, taps = _tapped(prog, inputs)
    assert list(taps) == list(paths) == list(ir.get_plan(prog.graph_module, ir.TapPlan).points)
    torch.testing.assert_close(out, want_out, **TOL)
    for path in paths:
        torch.testing.assert_close(taps[path], want[path], **TOL, msg=path)


# CI runs the zoo GPT and HF GPT-2; the other families (rope inputs entering each block, post-norm
# blocks, HF's decoder layers) are slow checks
@pytest.mark.parametrize("name", ["gpt-tiny", "hf-gpt2"] + [pytest.param(n, marks=pytest.mark.slow)
                                                           for n in ("llama-tiny", "bert-tiny", "hf-llama")])
def test_every_block_is_tapped_and_equals_the_hooked_original(name):
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes="tap,verify", example_inputs=inputs)
    blocks = [b.name for b in structure_of(prog.graph_module).blocks]  # tapping adds no node
    assert len(blocks) == 2
    _check(prog, model, inputs, blocks)


def test_named_points_dynamic_shapes_and_retrace():
    model, inputs = _model("gpt-tiny")
    points = ["transformer.h.1.mlp", "transformer.h.0.attn", "lm_head"]
    prog = bmc.compile(copy.deepcopy(model), passes=f"tap{{points=[{','.join(points)}]}}", example_inputs=inputs,
                       dynamic=True)
    bigger = model.example_inputs(batch=3, seq=24)
    _check(prog, model, bigger, points)
    # export captures the tapped graph again, outputs and their structure included
    again = bmc.compile(bmc.trace(prog.graph_module, bigger), passes="verify")
    out, taps = _tapped(again, bigger)
    want_out, want = _tapped(prog, bigger)
    torch.testing.assert_close(out, want_out, **TOL)
    assert list(taps) == points and all(torch.equal(taps[p], want[p]) for p in points)


def test_taps_carry_gradients():
    model, inputs = _model("gpt-tiny")
    prog = bmc.compile(copy.deepcopy(model), passes="tap{points=[transformer.h.0]}", example_inputs=inputs)
    _, taps = prog(*inputs)
    taps["transformer.h.0"].square().mean().backward()
    assert prog.graph_module.get_parameter("transformer.h.0.mlp.c_fc.weight").grad.abs().sum() > 0
    assert prog.graph_module.get_parameter("transformer.h.1.mlp.c_fc.weight").grad is None


def test_composes_after_prune_heads_and_prune_layers():
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("gpt-tiny"), n_layer=4))
    inputs = model.example_inputs()
    prog = bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=0.5},prune-layers{drop=[1,2]},tap,verify",
                       example_inputs=inputs)
    kept_heads = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads()
    assert ir.get_plan(prog.graph_module, ir.TapPlan).points == ("transformer.h.0", "transformer.h.3")  # original names
    reference = copy.deepcopy(model)
    with torch.no_grad():  # removed heads masked: their columns of c_proj zeroed
        for index, block in enumerate(reference.transformer.h):
            module = f"transformer.h.{index}.attn"
            drop = sorted(set(range(4)) - set(kept_heads.get(module, range(4))))
            cols = [h * 16 + i for h in drop for i in range(16)]
            block.attn.c_proj.weight[:, cols] = 0
    for index in (1, 2):
        reference.transformer.h[index] = torch.nn.Identity()
    _check(prog, reference, inputs, ["transformer.h.0", "transformer.h.3"])
    assert any(len(v) < 4 for v in kept_heads.values())  # heads went, so the masking mattered


def test_bad_points_are_one_clear_error():
    model, inputs = _model("gpt-tiny")
    with pytest.raises(PipelineError, match="no node of the graph lies in module 'transformer.h.7'"):
        bmc.compile(copy.deepcopy(model), passes="tap{points=[transformer.h.7]}", example_inputs=inputs)
    with pytest.raises(PipelineError, match="tap appears twice in the pipeline: keep one tap"):
        bmc.compile(copy.deepcopy(model), passes="tap,tap", example_inputs=inputs)
    with pytest.raises(PipelineError, match="names a module twice"):
        bmc.compile(copy.deepcopy(model), passes="tap{points=[lm_head,lm_head]}", example_inputs=inputs)
    with pytest.raises(PipelineError, match="put tap before pp"):
        bmc.compile(copy.deepcopy(model), passes="pp{stages=2},tap", example_inputs=inputs, world_size=2)
