"""verify: passes a good graph unchanged and rejects a broken one."""
import pytest

from bmc import ir
from bmc.models import zoo
from bmc.errors import VerificationError
from bmc.passmgr.manager import PassManager
from helpers import assert_same_outputs_and_grads, traced_copy


def test_verify_accepts_a_good_graph_and_changes_nothing():
    model = zoo.build("bert-tiny")
    inputs = model.example_inputs()
    gm = traced_copy(model, inputs)
    code = gm.code
    result = PassManager("verify", verify=False).run(gm)
    assert not result.modified and gm.code == code
    assert_same_outputs_and_grads(model, gm, inputs)


def test_verify_rejects_bad_stage_order_and_missing_attributes():
    gm = traced_copy(zoo.build("gpt-tiny"), zoo.build("gpt-tiny").example_inputs())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    ir.annotate(calls[1], ir.Stage(1))
    ir.annotate(calls[5], ir.Stage(0))
    with pytest.raises(VerificationError, match="stages must not go backwards"):
        PassManager("verify", verify=False).run(gm)
    ir.clear(calls[5], ir.Stage)
    attr = next(iter(gm.graph.find_nodes(op="get_attr")))
    attr.target = "transformer.no_such_weight"
    with pytest.raises(VerificationError, match="no_such_weight"):
        PassManager("verify", verify=False).run(gm)
