"""rewrite/rms_norm.py and rewrite/rotary.py: HF's RMSNorm (with the residual add before it)
and rotate-half RoPE become bmc::rms_norm / bmc::add_rms_norm / bmc::rotary in a decode
step, and the step's outputs stay bit for bit what they were, at batch sizes and lengths
other than the trace's; what the rewrites cannot prove (halves that differ, a norm over
another dim) is left as traced."""
import collections

import pytest
import torch

import bmc
from bmc.rewrite.rms_norm import fuse_rms_norms
from bmc.rewrite.rotary import fuse_rotaries
from bmc.serve import kv_cache

transformers = pytest.importorskip("transformers")


def _config(name: str):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
                  max_position_embeddings=64)
    if name == "neox":  # partial rotary: a quarter of each head rotated, taken by slices
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.25)
    kind = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[name]
    return kind(**common, num_key_value_heads=2)


def _step(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name)).eval()
    gm = bmc.compile(model, example_inputs=(torch.zeros(2, 8, dtype=torch.long),), dynamic=True).graph_module
    step, layout = kv_cache.decode_step(gm, 64)
    return step, layout


def _random_inputs(layout, batch: int, new: int, past: int):
    inputs = kv_cache.example_step_inputs(layout, batch=batch, new=new, past=past)
    ids, positions, mask, *caches, keep = inputs
    ids = torch.randint(0, 97, ids.shape)
    positions = positions + torch.arange(batch).reshape(-1, 1)  # rows at different positions (left padding)
    return (ids, positions, mask, *[torch.randn_like(c) for c in caches], keep)


def _ops(step) -> collections.Counter:
    return collections.Counter(n.target.__name__ for n in step.graph.nodes
                               if n.op == "call_function" and "bmc" in str(n.target))


@pytest.mark.parametrize("name,norms,rotaries", [("llama", (1, 4), 4), ("qwen2", (1, 4), 4), ("neox", (0, 0), 4)])
def test_norms_and_rotaries_fused_without_changing_a_bit(name, norms, rotaries):
    step, layout = _step(name)
    examples = [_random_inputs(layout, 3, 4, 5), _random_inputs(layout, 1, 1, 9)]
    before = [step(*inputs) for inputs in examples]
    tokens = next(p for p in step.graph.find_nodes(op="placeholder") if p.name == "input_ids")
    assert fuse_rms_norms(step) == sum(norms)
    assert fuse_rotaries(step, tokens) == rotaries
    ops = _ops(step)
    assert (ops["rms_norm.default"], ops["add_rms_norm.default"], ops["rotary.default"]) == (*norms, rotaries), ops
    for inputs, expected in zip(examples, before):
        for got, want in zip(step(*inputs), expected):
            assert torch.equal(got, want)


class Unproven(torch.nn.Module):
    """A rotary whose cos halves differ and a norm over the first dim: neither is rewritten."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(8))

    def forward(self, x, angles, ids):  # x [B, H, T, 8], angles [B, T, 4], ids [B, T]: their sizes
        cos = torch.cat([angles.cos(), angles.sin()], -1).unsqueeze(1)  # halves differ
        sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(1)
        rotated = x * cos + torch.cat([-x[..., 4:], x[..., :4]], -1) * sin
        rotated = rotated + ids.unsqueeze(1).unsqueeze(-1)
        return self.weight * (rotated * torch.rsqrt(rotated.pow(2).mean(0, keepdim=True) + 1e-6))


def test_what_is_not_proven_stays_as_traced():
    x, angles, ids = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    gm = bmc.compile(Unproven(), example_inputs=(x, angles, ids), dynamic=True).graph_module
    tokens = gm.graph.find_nodes(op="placeholder")[-1]
    assert fuse_rms_norms(gm) == 0
    assert fuse_rotaries(gm, tokens) == 0


class ServingKernels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x, residual, heads, positions, cos_rows, sin_rows):
        normed, total = torch.ops.bmc.add_rms_norm(x, residual, self.weight, 1e-6)
        rotated = torch.ops.bmc.rotary(heads, positions, cos_rows, sin_rows)
        return torch.ops.bmc.rms_norm(normed + total, self.weight, 1e-5), total, rotated


def test_onnx_runtime_kernels_compute_what_the_ops_define():
    # the CPU translations (backends/ort_ops.py) against the ops' torch definitions, rows of
    # the rotary tables read at positions that are not 0..n-1
    ort = pytest.importorskip("onnxruntime")
    from backends.ort_ops import translation_table
    torch.manual_seed(0)
    angles = torch.randn(7, 4)
    inputs = (torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 5, 3, 8),
              torch.tensor([[6, 0, 2], [1, 5, 3]]), angles.cos(), angles.sin())
    module = ServingKernels().eval()
    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False,
                                custom_translation_table=translation_table(gpu=False))
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} <= ops, ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for g, want in zip(got, module(*inputs)):
        torch.testing.assert_close(torch.from_numpy(g), want.detach(), atol=1e-5, rtol=1e-5)
