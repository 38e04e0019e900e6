"""Fused q/k/v projections: the structure analysis proves how q, k and v lie in the fused
weight (contiguous parts, interleaved per head as in GPT-NeoX, taken by slices as in Phi-3,
GQA sizes), tp and prune-heads both follow that answer and equal the original (outputs and
gradients, on inputs other than the tracing example), and a layout that cannot be proven is
refused in one line."""
import copy

import pytest
import torch

import bmc
import hf_models
from bmc import ir
from bmc.analysis.structure import QkvLayout, structure_of
from bmc.cli.local_ranks import run_ranks
from bmc.errors import PipelineError
from equivalence import heads_masked
from helpers import run

MODELS = ("gpt_neox", "phi3", "phi3-gqa")


def _other_inputs():
    """Not the tracing example: other token ids, same shape (the program is traced static)."""
    return hf_models.example_inputs(seed=7)


def test_the_analysis_proves_each_fused_layout():
    expected = {
        "gpt_neox": QkvLayout(groups=4, q=16, k=16, v=16, taken_by="chunk"),   # [heads, (q, k, v), head_dim]
        "phi3": QkvLayout(groups=1, q=64, k=64, v=64, taken_by="slice"),
        "phi3-gqa": QkvLayout(groups=1, q=64, k=32, v=32, taken_by="slice"),   # 4 query heads, 2 kv heads
        "gpt2": QkvLayout(groups=1, q=64, k=64, v=64, taken_by="split"),       # Conv1D c_attn split in thirds
    }
    for name, layout in expected.items():
        gm = bmc.trace(hf_models.build(name), hf_models.example_inputs())
        for block in structure_of(gm).blocks:
            assert block.attention.qkv_layout == layout, name
    neox = structure_of(bmc.trace(hf_models.build("gpt_neox"), hf_models.example_inputs())).blocks[0].attention
    assert list(neox.qkv_layout.features("k", 2, 16)) == list(range(2 * 48 + 16, 2 * 48 + 32))
    phi3 = structure_of(bmc.trace(hf_models.build("phi3"), hf_models.example_inputs())).blocks[0].mlp
    assert phi3.up_parts == (128, 128)  # gate_up_proj chunked in two: tp splits each half


def _check_tp(rank, world_size, names, root):
    """Each model under tp: outputs on another input than the tracing example, every
    gradient (a split weight's against the same slice of the reference's), the weights
    gathered back from the ranks' slices, and a sharded checkpoint written with these layouts
    loaded into a program of another seed's model."""
    from bmc.backends import checkpoint
    results = {}
    for name in names:
        model = hf_models.build(name)
        prog = bmc.compile(copy.deepcopy(model), passes=f"tp{{degree={world_size}}},insert-collectives,verify",
                           example_inputs=hf_models.example_inputs(), world_size=world_size)
        inputs = _other_inputs()
        ref, out = run(model, inputs), run(prog, inputs)
        forward = (out - ref).abs().max().item()
        ref.float().square().mean().backward()
        out.float().square().mean().backward()
        plan = ir.get_plan(prog.graph_module, ir.TensorParallelPlan)
        mine = dict(prog.named_parameters())
        worst, split = 0.0, 0
        for pname, p in model.named_parameters():
            want = p.grad
            if plan.layout(pname) is not None:
                want = plan.layout(pname).local(want, rank, world_size)
                split += 1
            worst = max(worst, (mine[pname].grad - want).abs().max().item())
        # the backend's slices reassemble to the original weights (the layouts a checkpoint uses)
        full = prog.full_state_dict()
        whole = max((full[n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
        checkpoint.save(f"{root}/{name}", prog, step=1)
        other = bmc.compile(hf_models.build(name, seed=1), passes=f"tp{{degree={world_size}}},insert-collectives",
                            example_inputs=hf_models.example_inputs(), world_size=world_size)
        checkpoint.load(f"{root}/{name}", other)
        resumed = (run(other, inputs) - ref.detach()).abs().max().item()
        results[name] = (forward, max(worst, whole, resumed), split, ref.abs().max().item())
    return results


def test_tp2_on_interleaved_and_sliced_fused_qkv_equals_one_process(tmp_path):
    """GPT-NeoX (interleaved per head), Phi-3 (slices, and a chunked gate_up) with and
    without GQA, on 2 gloo ranks in one launch."""
    for results in run_ranks(2, _check_tp, MODELS, str(tmp_path)):
        for name, (forward, grads, split, scale) in results.items():
            assert forward <= 1e-5 and grads <= 1e-5, (name, forward, grads)
            assert split >= 8 and scale > 0.1, (name, split, scale)  # weights were split; outputs are not ~0


@pytest.mark.parametrize("name, spec", [
    ("gpt_neox", "heads=[0:1,1:0,1:3]"),
    ("phi3", "heads=[0:2,1:0,1:1]"),
    ("phi3-gqa", "heads=[0:0,0:1,1:3]"),  # layer 0 loses a whole kv group, layer 1 one query head of one
])
def test_prune_heads_on_fused_layouts_equals_the_original_with_heads_masked(name, spec):
    model, example = hf_models.build(name), hf_models.example_inputs()
    prog = bmc.compile(copy.deepcopy(model), passes=f"prune-heads{{{spec}}},verify", example_inputs=example)
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads()
    masked = heads_masked(model, example, kept)
    inputs = _other_inputs()
    out, want = run(prog, inputs), run(masked, inputs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, run(model, inputs), atol=1e-4)  # the heads mattered
    out.square().mean().backward()
    want.square().mean().backward()
    _check_sliced_gradients(prog.graph_module, masked, example, kept)


def _check_sliced_gradients(gm, masked, example, kept):
    """Every gradient, a pruned weight's against the kept rows/columns of the reference's."""
    reference = dict(masked.named_parameters())
    attention = {b.attention.module: b.attention for b in structure_of(bmc.trace(masked, example)).blocks}
    for pname, p in gm.named_parameters():
        want = reference[pname].grad
        att = next((a for m, a in attention.items() if pname.startswith(m + ".")), None)
        if att is not None and p.shape != want.shape:
            want = _kept_slice(att, pname, want, kept[att.module])
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-5, msg=pname)


def _kept_slice(att, pname, full, keep_q):
    hd, layout = att.head_dim, att.qkv_layout
    group = att.num_heads // att.num_kv_heads
    keep_kv = sorted({h // group for h in keep_q})
    if pname.startswith(att.o.module + "."):
        return full[:, [h * hd + i for h in keep_q for i in range(hd)]]
    rows = sorted([r for h in keep_q for r in layout.features("q", h, hd)]
                  + [r for part in "kv" for g in keep_kv for r in layout.features(part, g, hd)])
    return full[rows]


class _PermutedQkv(torch.nn.Module):
    """A fused qkv whose output is permuted (index_select) before it is cut in thirds: where
    q, k and v lie cannot be read from the cut alone."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads, self.width = heads, width
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.o = torch.nn.Linear(width, width)
        self.register_buffer("order", torch.randperm(3 * width, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).index_select(-1, self.order).split(self.width, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, s, self.width))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_PermutedQkv(), _PermutedQkv()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("passes, pattern", [
    ("tp2", r"tp: cannot prove how q, k and v lie in the fused projection layers\.0\.qkv\.weight"),
    ("prune-heads{heads=[0:1]}", r"prune-heads: cannot prove how q, k and v lie in the fused projection "
                                 r"layers\.0\.qkv\.weight"),
])
def test_a_fused_layout_the_analysis_cannot_prove_is_refused_in_one_line(passes, pattern):
    model, x = _Model().eval(), torch.randn(2, 8, 32)
    att = structure_of(bmc.trace(model, (x,))).blocks[0].attention
    assert att.fused and att.qkv_layout is None
    with pytest.raises(PipelineError, match=pattern) as info:
        bmc.compile(model, passes=passes, example_inputs=(x,), world_size=2 if passes.startswith("tp") else 1)
    assert "\n" not in str(info.value)
