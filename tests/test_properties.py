"""Declared ordering: every property a pass or backend needs, breaks or refuses is checked for
the whole pipeline before any pass runs, and the one-line error names the fix. A graph that was
saved and loaded gets its properties back from its plans."""
import copy

import pytest
import torch

import bmc
from bmc import ir, plugins
from bmc.errors import BackendError, BmcError, PipelineError, RequirementError
from bmc.ir import serialize
from bmc.models import zoo
from bmc.passmgr.instruments import Instrument
from bmc.passmgr.manager import PassContext, PassManager
from bmc.passmgr.properties import graph_properties

# (pipeline, backend, world size, what the error must say) -- one row per declared property
REFUSED = [
    ("prune-heads{score=taylor}", None, 1, r"prune-heads\{score=taylor\} needs calibration data: pass calibration="),
    ("prune-layers{policy=score}", None, 1, r"prune-layers\{policy=score\} needs calibration data"),
    ("pp{stages=2},tp2", None, 2, r"tp after pp\{stages=2\}: .*stages.*put tp before pp"),
    ("pp{stages=2},prune-ffn{ratio=0.5}", None, 2, r"prune-ffn after pp.*put prune-ffn before pp"),
    ("ckpt,tp2", None, 2, r"tp after insert-remat.*fuse regions.*put tp before insert-remat"),
    ("ckpt,quant-int8", None, 1, r"quant-int8 after insert-remat.*put quant-int8 before insert-remat"),
    ("ckpt,insert-offload", None, 1, r"insert-offload after insert-remat.*keep one of insert-remat / insert-offload"),
    ("quant-int8,prune-heads{ratio=0.25}", None, 1, r"prune-heads after quant-int8: .*put prune-heads before quant-int8"),
    ("quant-int8,prune-layers{drop=[1]}", None, 1, r"prune-layers after quant-int8: .*prune before quantizing"),
    ("zero3,tp2", None, 2, r"tp after zero\{stage=3\}: ZeRO-3 already routes each weight through a gather"),
    ("tp2,prune-heads{ratio=0.25}", None, 2, r"prune-heads after tp\{degree=2\}: "),
    ("tp2,tp2", None, 2, r"tp appears twice in the pipeline: keep one tp"),
    ("zero3,pp{stages=2}", None, 2, r"pp after zero\{stage=3\}: pp with zero\{stage=3\} is not supported"),
    ("pp{stages=2},zero3", None, 2, r"zero after pp\{stages=2\}: "),
    ("amp{dtype=fp16},pp{stages=2}", None, 2, r"pp after amp\{dtype=fp16\}: "),
    ("amp,amp", None, 1, r"amp appears twice"),
    ("tap,tap", None, 1, r"tap appears twice"),
    ("tp{degree=2}", "torch", 2, r"split by tp but has no collectives: add insert-collectives after tp"),
    ("tp2", "ort-paged", 2, r"the ort-paged backend cannot run a graph that is 'tp-split'"),
    ("pp{stages=2}", "ort-paged", 2, r"the ort-paged backend cannot run a graph that is 'staged'"),
]


class _Ran(Instrument):
    def __init__(self):
        self.passes = []

    def before_pipeline(self, gm, pipeline):
        self.passes.append("<start>")

    def after_pass(self, index, spec, gm, result, seconds):
        self.passes.append(spec.name)


@pytest.fixture(scope="module")
def traced():
    model = zoo.build("gpt-tiny")
    return bmc.trace(model, model.example_inputs())


@pytest.mark.parametrize("pipeline, backend, world_size, message", REFUSED, ids=[r[0] + (f"@{r[1]}" if r[1] else "")
                                                                                   for r in REFUSED])
def test_a_pipeline_missing_a_prerequisite_is_refused_before_any_pass_runs(traced, pipeline, backend, world_size,
                                                                           message):
    gm = copy.deepcopy(traced)
    code = gm.code
    ran = _Ran()
    manager = PassManager(pipeline, context=PassContext(world_size=world_size), instruments=[ran])
    with pytest.raises(BmcError, match=message) as info:
        manager.run(gm, backend=plugins.get_backend(backend) if backend else None)
    assert isinstance(info.value, (PipelineError, RequirementError, BackendError))
    assert "\n" not in str(info.value)
    assert ran.passes == [] and gm.code == code  # refused before anything ran


def test_the_fixed_pipelines_pass_the_same_checks(traced):
    """The fixes the messages name are accepted (checked only: nothing runs)."""
    for pipeline, world_size in [("tp2,pp{stages=2}", 2), ("tp2,ckpt", 2), ("quant-int8", 1), ("prune-ffn{ratio=0.5},"
                                 "quant-int8", 1), ("tp2,zero3", 2), ("zero3,ckpt", 2), ("amp,pp{stages=2}", 2)]:
        PassManager(pipeline, context=PassContext(world_size=world_size)).check(graph_properties(traced),
                                                                               plugins.get_backend("torch"))
    PassManager("prune-heads{score=taylor}", context=PassContext(calibration=[()])).check(graph_properties(traced))


def test_a_loaded_graph_gets_its_properties_back_from_its_plans(tmp_path, traced):
    """Properties come from plans and annotations, so they survive a save and a load: a
    pipeline run on the loaded graph is checked against what the saved one already did."""
    gm = copy.deepcopy(traced)
    inputs = zoo.build("gpt-tiny").example_inputs()
    done = PassManager("quant-int8,ckpt").run(gm).graph_module
    path = str(tmp_path / "int8.pt2")
    serialize.save_pt2(done, path, "quant-int8,ckpt")
    loaded, _ = serialize.load_pt2(path)
    props = graph_properties(loaded)
    assert {"quantized", "fused-regions"} <= set(props) and "already in the input graph" in props["quantized"]
    with pytest.raises(PipelineError, match=r"prune-ffn on a graph (quant-int8|insert-remat/insert-offload) already transformed: .*run prune-ffn on the original model, before"):
        PassManager("prune-ffn{ratio=0.5}").run(loaded)
    with pytest.raises(PipelineError, match="insert-offload on a graph insert-remat/insert-offload already transformed: keep one of"):
        PassManager("insert-offload").run(loaded)
    torch.testing.assert_close(loaded(*inputs), done(*inputs), rtol=0, atol=0)


def test_a_loaded_distributed_plan_keeps_its_properties(tmp_path, traced):
    gm = copy.deepcopy(traced)
    done = PassManager("tp2,pp{stages=2}", context=PassContext(world_size=4)).run(gm).graph_module
    path = str(tmp_path / "tp_pp.pt2")
    serialize.save_pt2(done, path, "tp2,pp{stages=2}")
    loaded, _ = serialize.load_pt2(path)
    assert ir.get_plan(loaded, ir.TensorParallelPlan) == ir.get_plan(done, ir.TensorParallelPlan)
    assert {"tp-split", "tp-collectives", "staged"} <= set(graph_properties(loaded))
    with pytest.raises(PipelineError, match=r"tp on a graph pp already transformed: .*run tp on the original model, before pp"):
        PassManager("tp2", context=PassContext(world_size=4)).run(loaded)
    with pytest.raises(BackendError, match="ort-paged backend cannot run a graph that is 'tp-split'"):
        PassManager("dce").check(graph_properties(loaded), plugins.get_backend("ort-paged"))
