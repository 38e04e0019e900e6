"""rewrite/linear.py: every projection form is found with its operands and weight layout, and
products that are not projections by a weight are not."""
import torch

import bmc
from bmc.rewrite.linear import all_projections, read_elsewhere


class Forms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.conv_w = torch.nn.Parameter(torch.randn(4, 6))  # (in, out), as HF Conv1D
        self.conv_b = torch.nn.Parameter(torch.randn(6))
        self.w = torch.nn.Parameter(torch.randn(6, 4))  # (out, in), read as x @ w.t() and x @ w.T
        self.u = torch.nn.Parameter(torch.randn(4, 6))  # (in, out), read as x @ u
        self.register_buffer("table", torch.randn(4, 6))  # a buffer: not a weight

    def forward(self, x):
        flat = x.reshape(-1, 4)
        conv = torch.addmm(self.conv_b, flat, self.conv_w).reshape(*x.shape[:-1], 6)
        scaled = torch.addmm(self.conv_b, flat, self.conv_w, beta=2.0).reshape(*x.shape[:-1], 6)  # not x W + b
        by_activation = x @ x.transpose(-1, -2)  # no weight
        return (self.lin(x) + conv + scaled + x @ self.w.t() + torch.matmul(x, self.w.T) + x @ self.u
                + x @ self.table + by_activation.sum())


def test_every_form_with_its_layout():
    gm = bmc.trace(Forms(), (torch.randn(2, 3, 4),))
    found = [(p.form, str(p.weight.target), p.in_out, p.bias is not None) for p in all_projections(gm)]
    assert found == [("addmm", "conv_w", True, True), ("linear", "lin.weight", False, True),
                     ("matmul", "w", False, False), ("matmul", "w", False, False), ("matmul", "u", True, False)]
    by_weight = {}
    for p in all_projections(gm):
        by_weight.setdefault(p.weight, []).append(p)
    # conv_w is also read by the addmm with beta=2 (not a projection); w only by its two products
    assert {str(w.target): read_elsewhere(w, ps) for w, ps in by_weight.items()} == {
        "lin.weight": False, "conv_w": True, "w": False, "u": False}
