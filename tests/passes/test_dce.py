"""dce: removes dead nodes, keeps outputs and gradients equal to the original."""
import torch

from bmc import ir
from bmc.passmgr.manager import PassManager
from bmc.models import zoo
from helpers import assert_same_outputs_and_grads, traced_copy


class WithDeadCode(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        _ = torch.relu(y) * 3  # dead: never used
        return y.sin()


def test_dce_removes_dead_nodes_and_keeps_equivalence():
    model, inputs = WithDeadCode(), (torch.randn(2, 4),)
    gm = traced_copy(model, inputs)
    targets = [ir.target_str(n) for n in gm.graph.nodes]
    assert "aten.relu" in targets, "export kept the dead code for this test to be meaningful"
    result = PassManager("dce").run(gm)
    assert result.modified and result.statistics["dce.nodes-removed"] >= 2
    assert "aten.relu" not in [ir.target_str(n) for n in gm.graph.nodes]
    assert "unused.weight" in dict(gm.named_parameters())  # parameters are kept by default
    torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_dce_on_a_zoo_model_is_equivalent():
    model = zoo.build("gpt-tiny")
    inputs = model.example_inputs()
    gm = traced_copy(model, inputs)
    PassManager("dce").run(gm)
    assert_same_outputs_and_grads(model, gm, inputs)


def test_dce_can_drop_unused_parameters():
    model, inputs = WithDeadCode(), (torch.randn(2, 4),)
    gm = traced_copy(model, inputs)
    names = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    result = PassManager("dce{drop_unused_params=true}").run(gm)
    assert "unused.weight" not in {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    assert result.statistics["dce.params-removed"] == len(names & {"unused.weight", "unused.bias"})
    torch.testing.assert_close(gm(*inputs), model(*inputs))
