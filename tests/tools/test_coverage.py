"""The coverage table (tools/coverage.py) is a test: every Hugging Face architecture it builds,
through trace, zero3 training on 2 ranks, tp2, prune-heads, prune-layers, prune-ffn, quant-int8
and ort-paged fp32 and int8, each cell checked numerically against the original model. No cell
may give a wrong number; the architectures the README names pass every cell."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import pytest  # noqa: E402

import coverage  # noqa: E402

MUST_PASS = ("gpt2", "llama", "llama-tied", "mistral", "qwen2", "gpt-neox", "opt", "bert")
# CI runs one architecture of each kind (Conv1D projections, GQA with RoPE, an encoder); the
# fused qkv stored head by head (GPT-NeoX) is split by tp2 and pruned by prune-heads against
# the original in tests/passes/test_fused_qkv.py; the whole table (~4 min) runs with -m slow
IN_CI = ("gpt2", "llama", "bert")


@pytest.mark.parametrize("archs", [pytest.param(IN_CI, id="ci"),
                                   pytest.param(coverage.ARCHS, id="all", marks=pytest.mark.slow)])
def test_every_cell_of_the_coverage_table(archs):
    results = coverage.run_table(list(archs), list(coverage.CELLS))
    table = coverage.format_table(results, list(archs), list(coverage.CELLS))
    assert len(results) == len(archs) * len(coverage.CELLS), table
    assert not [k for k, v in results.items() if v.startswith("FAIL")], table
    assert all(results[(arch, cell)] == "pass" for arch in MUST_PASS if arch in archs
               for cell in coverage.CELLS), table
    refusals = [v for v in results.values() if v.startswith("refused")]
    assert all("\n" not in v for v in refusals)


def test_a_wrong_number_is_a_failed_cell():
    """The table can fail: a check that sees a different model reports FAIL, not pass."""
    outcome = coverage._outcome(lambda: coverage._close(coverage.ids(1, 2, 0).float(), coverage.ids(1, 2, 1).float(),
                                                        1e-5, "probe"))
    assert outcome.startswith("FAIL: AssertionError: probe: max abs difference")
