"""Shared test helpers: run a graph and its original the same way, and compare."""
import copy

import torch

import bmc
from bmc.ir.trace import normalize_example_inputs


def first_tensor(out):
    """The main output of a model: a tensor, the first of a tuple, or HF's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def run(model, example_inputs):
    args, kwargs = normalize_example_inputs(example_inputs)
    return first_tensor(model(*args, **kwargs))


def assert_same_outputs_and_grads(model, transformed, example_inputs, atol=1e-5):
    """Forward and backward of `transformed` (a graph/program with its own parameters) equal
    the original model's: outputs within atol, and each parameter's gradient too."""
    ref_out = run(model, example_inputs)
    out = run(transformed, example_inputs)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=atol)
    ref_out.float().square().mean().backward()
    out.float().square().mean().backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got = dict(transformed.named_parameters())
    assert ref_grads, "the reference produced no gradients"
    for name, grad in ref_grads.items():
        assert name in got, f"parameter {name} missing from the transformed program"
        torch.testing.assert_close(got[name].grad, grad, atol=atol, rtol=atol, msg=name)


def traced_copy(model, example_inputs, dynamic=None):
    """Trace a deep copy, so the graph's parameters (and gradients) are its own."""
    return bmc.trace(copy.deepcopy(model), example_inputs, dynamic=dynamic)


def saved_activation_bytes(model, example_inputs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward."""
    from bmc.analysis.measure import SavedBytes
    with SavedBytes(model.parameters()) as saved:
        run(model, example_inputs)
    return saved.total


def model_and_inputs(name: str):
    """A seeded test model and its example inputs: a zoo name, "hf-<name>" (tests/hf_models.py)
    or "matmul-attn-lm" (tests/projection_models.py)."""
    import hf_models
    from bmc.models import zoo
    torch.manual_seed(0)
    if name.startswith("hf-"):
        return hf_models.build(name[3:]), hf_models.example_inputs()
    if name == "matmul-attn-lm":  # every projection a matmul by a weight, attention included
        import projection_models
        return projection_models.build_with_attention(), projection_models.example_inputs()
    model = zoo.build(name)
    return model, model.example_inputs()
