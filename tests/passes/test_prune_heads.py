"""prune-heads: the physically pruned model equals the original with those heads masked to zero
(o's columns of the head zeroed) within 1e-5, outputs (on the example and on other inputs) and
gradients (a sliced weight's against the kept slice of the original's), on fused qkv (zoo GPT,
HF GPT-2's Conv1D), GQA (zoo LLaMA, HF Llama) and HF BERT; parameter counts drop by exactly the heads' weights."""
import copy

import pytest
import torch

import bmc
from bmc import ir
from bmc.compress import calibration
from bmc.models import zoo
from bmc.errors import PipelineError
from bmc.analysis.structure import structure_of
from equivalence import assert_equal_and_backward, assert_grads_match_slices, heads_masked
from helpers import model_and_inputs, run


def _model(name):
    return model_and_inputs(name)


def _head_params(model, inputs, kept: dict) -> int:
    """Weights that belong to the removed heads alone: q rows, o columns, and k/v rows of
    kv groups with no query head left (biases included)."""
    total = 0
    for block in structure_of(bmc.trace(model, inputs)).blocks:
        att = block.attention
        keep = set(kept.get(att.module, range(att.num_heads)))
        group = att.num_heads // att.num_kv_heads
        q_gone = att.num_heads - len(keep)
        kv_gone = att.num_kv_heads - len({h // group for h in keep})
        projection = att.qkv or att.q
        rows = (q_gone + 2 * kv_gone) * att.head_dim
        total += rows * (projection.in_features + (projection.bias is not None)) \
            + q_gone * att.head_dim * att.o.out_features
    return total


def _kept_slices(model, inputs, kept: dict) -> dict:
    """Parameter -> (dim, kept indices) for every weight and bias pruning slices: the kept query
    heads' rows of q and columns of o, the rows of the kv heads still read (a group with a query
    head left) in k and v, at their offsets in a fused qkv (contiguous q | k | v here). Layers
    that lost every head lose their parameters and have no slice."""
    slices = {}
    for block in structure_of(bmc.trace(copy.deepcopy(model), inputs)).blocks:
        att = block.attention
        keep = sorted(kept.get(att.module, range(att.num_heads)))
        if not keep:
            continue
        hd, group = att.head_dim, att.num_heads // att.num_kv_heads
        q_rows = [h * hd + i for h in keep for i in range(hd)]
        kv_rows = [g * hd + i for g in sorted({h // group for h in keep}) for i in range(hd)]
        if att.fused:  # the models here store q | k | v contiguously (interleaved ones: test_fused_qkv.py)
            assert att.qkv_layout is not None and not att.qkv_layout.interleaved, att.qkv_layout
            q_width, kv_width = att.num_heads * hd, att.num_kv_heads * hd
            parts = [(att.qkv, q_rows + [q_width + r for r in kv_rows] + [q_width + kv_width + r for r in kv_rows])]
        else:
            parts = [(att.q, q_rows), (att.k, kv_rows), (att.v, kv_rows)]
        for lin, rows in parts:
            slices[lin.weight] = (1 if lin.transposed else 0, rows)
            if lin.bias is not None:
                slices[lin.bias] = (0, rows)
        slices[att.o.weight] = (0 if att.o.transposed else 1, q_rows)
    return slices


def _check_equivalent(model, inputs, prog, dynamic=False):
    """Outputs on the example and on other ids (another batch and length when the trace is
    dynamic); every gradient, a sliced weight's against the kept slice of the masked original's."""
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads()
    masked = heads_masked(model, inputs, kept)
    assert_equal_and_backward(prog, masked, model, inputs, dynamic, changed_atol=1e-4)  # the heads mattered: the test can fail
    assert_grads_match_slices(dict(prog.graph_module.named_parameters()), dict(masked.named_parameters()),
                              _kept_slices(model, inputs, kept))
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in prog.graph_module.parameters())
    assert removed == prog.records[0].statistics["params-removed"] == _head_params(model, inputs, kept) > 0
    return prog.records[0].statistics


@pytest.mark.parametrize("name,spec,dynamic", [
    ("gpt-tiny", "ratio=0.5", False),                 # fused qkv split per q/k/v part; layers keep different counts
    ("gpt-tiny", "ratio=0.5", True),
    ("llama-tiny", "heads=[0:0,1:0,1:1]", False),     # GQA: a whole kv group (layer 1) and one query head (layer 0)
    ("hf-gpt2", "heads=[0:1,1:0,1:3]", False),        # Conv1D, fused qkv
    ("hf-gpt2", "heads=[0:1,1:0,1:3]", True),
    ("hf-llama", "heads=[0:1,1:2,1:3]", False),
    ("hf-llama", "heads=[0:1,1:2,1:3]", True),
    ("hf-bert", "ratio=0.4", False),
    ("matmul-attn-lm", "heads=[0:1,1:2,1:3]", False),  # q/k/v/o matmuls by W.t() and W, biases added after
    ("matmul-attn-lm", "heads=[0:1,1:2,1:3]", True),
])
def test_pruned_equals_original_with_heads_masked(name, spec, dynamic):
    model, inputs = _model(name)
    prog = bmc.compile(copy.deepcopy(model), passes=f"prune-heads{{{spec}}},verify", example_inputs=inputs,
                       dynamic=dynamic)
    _check_equivalent(model, inputs, prog, dynamic)


def test_gqa_says_whether_whole_groups_or_query_heads_went():
    model, inputs = _model("llama-tiny")  # 4 query heads in 2 kv groups per layer
    stats = _check_equivalent(model, inputs, bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[0:0,1:0,1:1]}"))
    assert (stats["query-heads-removed"], stats["kv-groups-removed"], stats["kv-gathers"]) == (1, 1, 2)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=0.5,gqa=groups}")
    stats = _check_equivalent(model, inputs, prog)
    assert (stats["query-heads-removed"], stats["kv-groups-removed"], stats["kv-gathers"]) == (0, 2, 0)
    heads = [(b.attention.num_heads, b.attention.num_kv_heads) for b in structure_of(prog.graph_module).blocks]
    assert sum(h for h, _ in heads) == 4 and all(h == 2 * kv for h, kv in heads)
    # multi-head attention: each head is its own group, and the statistics do not pretend otherwise
    gpt, gpt_inputs = _model("gpt-tiny")
    mha = bmc.compile(copy.deepcopy(gpt), passes="prune-heads{ratio=0.5}", example_inputs=gpt_inputs).records[0]
    assert mha.statistics["heads-removed"] > 0 and "kv-groups-removed" not in mha.statistics


def test_layers_keep_different_head_counts_and_dynamic_shapes_still_run():
    model, inputs = _model("llama-tiny")
    with torch.no_grad():  # two quiet heads in layer 0 (scores are normalized per layer): both go
        model.model.layers[0].self_attn.q_proj.weight[:32].mul_(0.01)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=0.25}", example_inputs=inputs, dynamic=True)
    counts = [b.attention.num_heads for b in structure_of(prog.graph_module).blocks]
    assert counts == [2, 4], counts
    bigger = model.example_inputs(batch=3, seq=24)
    masked = heads_masked(model, inputs, ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads())
    torch.testing.assert_close(run(prog, bigger), run(masked, bigger), atol=1e-5, rtol=1e-5)


def test_all_heads_of_a_layer_refused_or_skipped():
    model, inputs = _model("gpt-tiny")
    with pytest.raises(PipelineError, match="would remove all 4 heads of transformer.h.0.attn; pass empty=skip"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[0:0,0:1,0:2,0:3]}")
    prog = bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[0:0,0:1,0:2,0:3],empty=skip},verify")
    assert prog.records[0].statistics["layers-skipped"] == 1
    _check_equivalent(model, inputs, prog)


def test_taylor_scores_read_calibration_batches():
    model, inputs = _model("gpt-tiny")
    batches = calibration.text_batches(None, count=2, batch=2, seq=16)
    prog = bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=0.25,score=taylor}", calibration=batches)
    _check_equivalent(model, inputs, prog)
    with pytest.raises(bmc.errors.RequirementError, match="prune-heads{score=taylor} needs calibration data"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{score=taylor}")
    with pytest.raises(calibration.CalibrationError, match="float32\\[2, 16\\], the model was traced with int64"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{score=taylor}", calibration=[(torch.randn(2, 16),)])
    with pytest.raises(calibration.CalibrationError, match="2 positional"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{score=taylor}",
                    calibration=[(inputs[0], inputs[0])])


def test_bad_input_is_one_clear_error():
    model, _ = _model("gpt-tiny")
    with pytest.raises(bmc.BmcError, match="ratio must be in \\[0, 1\\)"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=1.0}")
    with pytest.raises(PipelineError, match="names head 9, but layer 1 .* has 4 heads \\(0..3\\)"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[1:9]}")
    with pytest.raises(PipelineError, match="names layer 5, but the model's blocks with attention are \\[0, 1\\]"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[5:0]}")
    with pytest.raises(bmc.BmcError, match="LAYER:HEAD"):
        bmc.compile(copy.deepcopy(model), passes="prune-heads{heads=[first]}")
    with pytest.raises(PipelineError, match="prune-heads after quant-int8"):
        bmc.compile(copy.deepcopy(model), passes="quant-int8,prune-heads")


def test_compression_passes_compose_in_any_order_and_stay_valid():
    """Pruning choices by spec (heads, layers) and by magnitude (FFN neurons) do not depend on
    one another, so every order gives the same program; each result verifies, re-traces, trains
    on the torch backend, and takes quant-int8 last."""
    import dataclasses
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("llama-tiny"), n_layer=4))
    x = model.example_inputs()
    heads, layers, ffn = "prune-heads{heads=[0:0,3:1,3:0]}", "prune-layers{drop=[2]}", "prune-ffn{ratio=0.5}"
    outs = []
    for order in ((heads, layers, ffn), (layers, ffn, heads), (ffn, heads, layers)):
        prog = bmc.compile(copy.deepcopy(model), passes=",".join(order) + ",quant-int8,verify")
        out = prog(*x)
        assert torch.equal(bmc.trace(prog.graph_module, x)(*x), out)  # still a graph torch.export takes
        opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)
        out.square().mean().backward()
        opt.step()
        outs.append(out.detach())
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_ratio_ranking_keeps_a_head_per_layer_unless_skipping_is_allowed():
    model, inputs = _model("gpt-tiny")  # 2 layers x 4 heads; 0.75 removes 6
    kept, skipped = [], []
    for seed in range(4):
        for empty in ("refuse", "skip"):
            prog = bmc.compile(copy.deepcopy(model), passes=f"prune-heads{{ratio=0.75,score=random,seed={seed},"
                                                            f"empty={empty}}}")
            assert prog.records[0].statistics["heads-removed"] == 6
            counts = [len(k) for k in ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads().values()]
            (kept if empty == "refuse" else skipped).append((counts, prog))
    assert all(0 not in counts for counts, _ in kept)
    counts, prog = next((c, p) for c, p in skipped if 0 in c)  # some seed empties a layer
    _check_equivalent(model, inputs, prog)
