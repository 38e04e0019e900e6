"""Head importance by Taylor expansion (Michel, Levy and Neubig 2019, "Are Sixteen Heads Really
Better than One?"): I_h = E_x |dL(x)/dm_h|, with a mask m_h = 1 multiplying head h's output,
averaged over calibration sequences; prune-heads normalizes each layer's scores.

The graph is run by an fx.Interpreter that multiplies the input of each attention's output
projection by per-sequence masks [batch, heads]: one backward gives every sequence's gradient
(a sum over sequences of their own losses), and the graph itself is left untouched.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from bmc.compress import calibration as calib
from bmc.rewrite.linear import operands, projections
from bmc.analysis.structure import Attention

log = logging.getLogger(__name__)


class _MaskedHeads(fx.Interpreter):
    """Runs the graph with o's input multiplied by masks[layer] (shape [batch, heads])."""

    def __init__(self, gm: fx.GraphModule, o_nodes: dict[fx.Node, tuple[int, Attention]], masks: list[torch.Tensor]):
        super().__init__(gm)
        self.o_nodes, self.masks = o_nodes, masks

    def run_node(self, node: fx.Node):
        if node not in self.o_nodes:
            return super().run_node(node)
        layer, att = self.o_nodes[node]
        x_node = operands(node)[0]
        x = self.env[x_node]
        mask = self.masks[layer]
        batch = mask.shape[0]
        masked = (x.reshape(batch, -1, att.num_heads, att.head_dim) * mask[:, None, :, None]).reshape(x.shape)
        self.env[x_node] = masked
        try:
            return super().run_node(node)
        finally:
            self.env[x_node] = x


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    return int(first.shape[0])


def taylor_scores(gm: fx.GraphModule, attentions: list[Attention], data) -> list[torch.Tensor]:
    """Per layer, E |dL/dm_h| over every calibration sequence (not yet normalized)."""
    batches = calib.batches(gm, data, "prune-heads{score=taylor}")
    o_nodes = {}
    for layer, att in enumerate(attentions):
        found = projections(gm, att.o.weight)
        if not found or len(found) != 1:
            raise calib.CalibrationError(f"prune-heads{{score=taylor}}: the output projection of {att.module} is "
                                         f"not one linear in this graph")
        o_nodes[found[0]] = (layer, att)
    totals = [torch.zeros(att.num_heads, dtype=torch.float64) for att in attentions]
    sequences = 0
    for args, kwargs in batches:
        batch = _batch_size(args, kwargs)
        masks = [torch.ones(batch, att.num_heads, requires_grad=True) for att in attentions]
        interpreter = _MaskedHeads(gm, o_nodes, masks)
        out = calib.interpret(gm, interpreter, args, kwargs)
        loss = calib.lm_loss(out, args, kwargs)
        grads = torch.autograd.grad(loss * batch, masks, allow_unused=True)
        for layer, grad in enumerate(grads):
            if grad is not None:
                totals[layer] += grad.detach().abs().sum(dim=0).double()
        sequences += batch
    log.info("taylor head scores over %d calibration sequences", sequences)
    return [(t / sequences).float() for t in totals]
