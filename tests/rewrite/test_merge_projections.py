"""rewrite/merge_projections.py: projections that read the same input inside one module become
one product over stacked rows, split back; the outputs do not change, fp32 and int8 alike, and
what cannot be stacked (another input, another module, one scale for a whole matrix) is left."""
import copy

import torch

import bmc
from bmc.rewrite.merge_projections import INT8_LINEAR, merge_shared_input_projections

aten = torch.ops.aten


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        self.o = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.o(self.q(x) * torch.cat([self.k(x), self.v(x)], -1))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.gate, self.up = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
        self.down = torch.nn.Linear(16, 8, bias=False)
        self.side = torch.nn.Linear(8, 8, bias=False)  # reads x as q|k|v do, from another module: left alone

    def forward(self, x):
        h = x + self.attn(x)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)) + self.side(x)


def _products(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.linear.default, INT8_LINEAR)]


def _check(passes: str, products_after: int, tol: float):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 5, 8)
    gm = bmc.compile(model, passes=passes, example_inputs=(x,), dynamic=True).graph_module
    merged = copy.deepcopy(gm)
    before = len(_products(merged))
    groups = merge_shared_input_projections(merged)
    assert groups == 2 and len(_products(merged)) == products_after, (before, len(_products(merged)))
    for shape in ((2, 5, 8), (3, 1, 8)):
        y = torch.randn(*shape)
        torch.testing.assert_close(merged(y), gm(y), atol=tol, rtol=tol)


def test_qkv_and_gate_up_become_one_product_each():
    # q|k|v (3 -> 1) and gate|up (2 -> 1); o, down and side (another owner) stay: 8 -> 5
    _check("", 5, 1e-6)


def test_int8_projections_with_per_row_scales_merge_exactly():
    _check("quant-int8{skip=[]}", 5, 1e-6)


def test_one_scale_for_a_whole_matrix_is_not_stacked():
    torch.manual_seed(0)
    model = Model().eval()
    gm = bmc.compile(model, passes="quant-int8{skip=[],granularity=tensor}", example_inputs=(torch.randn(2, 5, 8),),
                     dynamic=True).graph_module
    assert merge_shared_input_projections(gm) == 0
