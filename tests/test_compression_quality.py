"""What compression costs, measured on the trained reference gpt-mini (bmc/assets, made by
tools/train_reference.py) with held-out perplexity on the standard library's sources:

- per-row int8 weight-only raises perplexity by at most 1% (relative); per-tensor is worse;
  the int8 linear weights take at most 0.26x their fp32 bytes;
- Taylor-scored pruning of 30% of heads loses less perplexity than random pruning of 30%,
  random averaged over seeds.
"""
import copy
import functools

import pytest

import bmc
from bmc.compress import calibration
from bmc.compress import evaluate
from bmc.models import trained


@functools.cache
def _reference():
    return trained.load("gpt-mini"), evaluate.EvalData.held_out(seq=128, count=32)


def _ppl(passes: str, **kw) -> tuple[float, bmc.Program]:
    model, held_out = _reference()
    prog = bmc.compile(copy.deepcopy(model), passes=passes, example_inputs=(held_out.windows[:2, :-1],), dynamic=True, **kw)
    return evaluate.perplexity(prog, held_out), prog


def test_the_reference_model_is_trained():
    model, held_out = _reference()
    assert evaluate.perplexity(model, held_out) < 8  # bytes of Python source; random weights give ~256


def test_int8_per_row_costs_at_most_one_percent_and_per_tensor_is_worse():
    model, held_out = _reference()
    base = evaluate.perplexity(model, held_out)
    row, prog = _ppl("quant-int8")
    tensor, _ = _ppl("quant-int8{granularity=tensor}")
    assert row / base - 1 <= 0.01, (base, row)
    assert tensor > row, (row, tensor)
    stats = prog.records[0].statistics
    assert stats["int8-bytes"] <= 0.26 * stats["fp32-bytes"], stats
    rows = evaluate.compare(model, {"int8 row": prog}, held_out)
    assert rows[1].weight_bytes < rows[0].weight_bytes and rows[1].cosine > 0.99


def test_taylor_head_pruning_loses_less_than_random():
    batches = calibration.text_batches(None, count=4, batch=8, seq=128)
    taylor, _ = _ppl("prune-heads{ratio=0.3,score=taylor}", calibration=batches)
    randoms = [_ppl(f"prune-heads{{ratio=0.3,score=random,seed={s}}}")[0] for s in range(3)]
    assert taylor < sum(randoms) / len(randoms), (taylor, randoms)


@pytest.mark.parametrize("passes", ["prune-heads{ratio=0.5},prune-layers{ratio=0.25},quant-int8",
                                    "prune-ffn{ratio=0.25},quant-int8{act=dynamic}"])
def test_compressed_pipelines_still_run_on_the_torch_backend(passes):
    ppl, prog = _ppl(passes)
    model, held_out = _reference()
    assert evaluate.perplexity(model, held_out) < ppl < 256
    out = prog(held_out.windows[:2, :-1])
    out.float().square().mean().backward()  # what stays fp32 still trains
    assert any(p.grad is not None for p in prog.parameters())
