"""The cost model: model-state bytes per rank follow the ZeRO paper, from the model itself."""
import pytest
import sympy
import torch

import bmc
from bmc import ir
from bmc.analysis import cost
from bmc.cli import report
from bmc.models import zoo

PAPER_GB = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.875}  # Rajbhandari et al. 2020, Psi=7.5e9, N_d=64, K=12


@pytest.fixture(scope="module")
def llama_7_5b_fp16():
    """A 7.5e9-parameter LLaMA in fp16 on the meta device: nothing is allocated."""
    model = zoo.build("llama-7.5b", device="meta", dtype=torch.float16)
    return bmc.trace(model, dynamic=True)


def test_zero_paper_table_is_reproduced(llama_7_5b_fp16):
    table = report.memory_table(llama_7_5b_fp16, cost.Setting(batch=1, seq=2048, dp=64))
    assert sum(p.numel for p in table.params if not p.is_buffer) == 7_500_000_000
    assert table.subs[cost.K] == 12  # fp16 weights + Adam: fp32 master, momentum, variance
    got = {stage: table.bytes(stage) / 1e9 for stage in PAPER_GB}
    assert got[0] == pytest.approx(120.0, abs=1e-9)
    assert round(got[1], 1) == 31.4 and round(got[2], 1) == 16.6
    assert got[3] == pytest.approx(1.875, abs=1e-9)
    # and the report prints them
    text = report.format_report(llama_7_5b_fp16, cost.Setting(batch=1, seq=2048, dp=64), 64)
    for figure in ("120 GB", "31.41 GB", "16.64 GB", "1.875 GB"):
        assert figure in text


def test_k_and_bytes_follow_the_model_dtype():
    """The same formulas give fp32 Adam's 16 bytes per parameter for an fp32 model: nothing
    is keyed to the paper's numbers."""
    gm = bmc.trace(zoo.build("gpt-tiny", device="meta"), dynamic=True)
    psi = zoo.param_count("gpt-tiny")
    table = report.memory_table(gm, cost.Setting(dp=8))
    assert table.subs[cost.K] == 8
    assert table.bytes(0) == 16 * psi
    assert table.bytes(3) == pytest.approx(16 * psi / 8)
    assert table.bytes(1) == pytest.approx(8 * psi + 8 * psi / 8)
    sgd = report.memory_table(gm, cost.Setting(dp=8, setup=cost.TrainingSetup(optimizer="sgd")))
    assert sgd.bytes(0) == 8 * psi


def test_parameter_bytes_equal_the_real_tensors():
    model = zoo.build("llama-tiny", dtype=torch.bfloat16)
    gm = bmc.trace(model)
    states = cost.model_states(cost.parameters(gm))
    subs = cost.Setting().substitutions(cost.parameters(gm))
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cost.evaluate(states.params, subs) == real


def test_model_states_are_symbolic_in_degrees_and_dtypes():
    gm = bmc.trace(zoo.build("gpt-tiny", device="meta"))
    states = cost.model_states(cost.parameters(gm), zero_stage=3)
    assert {str(s) for s in states.total.free_symbols} == {"N_d", "K", "b_f32"}
    weights = ir.parameter_nodes(gm)
    ir.annotate(weights["transformer.h.0.mlp.c_fc.weight"], ir.Shard((ir.Placement("tp", "shard", 0),)))
    sharded = cost.model_states(cost.parameters(gm))
    assert cost.N_t in sharded.params.free_symbols
    subs = cost.Setting(tp=2).substitutions(cost.parameters(gm))
    full = cost.model_states(cost.parameters(bmc.trace(zoo.build("gpt-tiny", device="meta"))))
    assert cost.evaluate(full.params, subs) - cost.evaluate(sharded.params, subs) == 256 * 64 * 4 / 2


def test_pipeline_stages_split_the_parameters():
    gm = bmc.trace(zoo.build("gpt-tiny", device="meta"))
    params = cost.parameters(gm)
    for node in ir.parameter_nodes(gm).values():
        if ".h.1." in str(node.target):
            ir.annotate(node, ir.Stage(1))
    staged = cost.parameters(gm)
    total = cost.model_states(params).params
    per_stage = [cost.model_states(staged, stage=s).params for s in (0, 1)]
    assert sympy.simplify(per_stage[0] + per_stage[1] - total) == 0
    assert all(sympy.simplify(s - total) != 0 for s in per_stage)


def test_evaluate_names_missing_values():
    with pytest.raises(ValueError, match="no value for \\['S'\\]"):
        cost.evaluate(cost.B * cost.S, {cost.B: 1})
