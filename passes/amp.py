"""amp: mixed-precision training as a graph rewrite (Micikevicius et al. 2018).

Parameters are stored in bf16 or fp16 (the optimizer keeps fp32 master copies, see
backends/optimizer.py), matmul-like ops compute in that dtype, numerically fragile ops
(norms, softmax, losses, pow/rsqrt/exp/log) compute in fp32, and the program's floating
outputs come back in their original dtype so a training script does not change. The casts
are explicit nodes, so the dumped graph shows where precision changes.

fp16 also gets dynamic loss scaling: a `bmc::scale_grad` on each output multiplies the
gradient entering the program by the loss scale, a buffer the optimizer lowers when a step
overflows (the step is skipped) and raises after `growth_interval` clean steps.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::scale_grad
from bmc import ir
from bmc.errors import PipelineError
from bmc.ir.shapes import propagate_shapes
from bmc.passmgr.equivalence import Equivalence, bounded
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.passmgr.properties import Properties

log = logging.getLogger(__name__)
aten = torch.ops.aten

LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The buffers that hold the dynamic loss scale and its count of clean steps (fp16 only).
SCALE_BUFFER, GROWTH_BUFFER = "bmc_loss_scale", "bmc_loss_scale_growth"

# autocast's policy, as rewrite rules: ops whose float inputs are cast to the low dtype...
LOW_PRECISION_OPS = {
    aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
    aten.baddbmm.default, aten.scaled_dot_product_attention.default,
    aten.conv1d.default, aten.conv2d.default,
}
# ...and ops computed in fp32 whatever their inputs are (their outputs stay fp32, as under
# autocast; the next low-precision op casts back down).
FP32_OPS = {
    aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default, aten.rms_norm.default,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default, aten.mse_loss.default,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.exp.default, aten.log.default,
}


@dataclass(frozen=True)
class AmpOptions:
    dtype: Literal["bf16", "fp16"] = "bf16"
    # fp16 loss scaling: the first scale, and how many clean steps before it doubles
    init_scale: float = 65536.0
    growth_interval: int = 2000

    def __post_init__(self):
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}")


def _is_float(node) -> bool:
    val = ir.tensor_val(node) if isinstance(node, fx.Node) else None
    return val is not None and val.dtype.is_floating_point


def _drop_dtype_asserts(gm: fx.GraphModule) -> int:
    """export's `_assert_tensor_metadata` nodes pin the traced dtypes, which amp changes."""
    asserts = list(gm.graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default))
    for node in asserts:
        gm.graph.erase_node(node)
    return len(asserts)


def _cast_parameters(gm: fx.GraphModule, low: torch.dtype) -> int:
    """Store every floating parameter in `low` (a tied weight stays one parameter)."""
    cast: dict[int, torch.nn.Parameter] = {}
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        if not param.dtype.is_floating_point or param.dtype == low:
            continue
        if id(param) not in cast:
            cast[id(param)] = torch.nn.Parameter(param.detach().to(low), requires_grad=param.requires_grad)
        owner_name, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner_name) if owner_name else gm, leaf, cast[id(param)])
    return len(cast)


def _insert_casts(gm: fx.GraphModule, low: torch.dtype) -> int:
    """A cast before each float input of the policy's ops; no-op casts are folded later."""
    inserted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LOW_PRECISION_OPS | FP32_OPS:
            continue
        target = low if node.target in LOW_PRECISION_OPS else torch.float32
        casts: dict[fx.Node, fx.Node] = {}

        def cast(arg):
            nonlocal inserted
            if not _is_float(arg):
                return arg
            if arg not in casts:
                with gm.graph.inserting_before(node):
                    casts[arg] = gm.graph.call_function(aten.to.dtype, (arg, target))
                ir.copy_meta(node, casts[arg], "amp")
                inserted += 1
            return casts[arg]

        node.args = fx.map_arg(node.args, cast)
        node.kwargs = fx.map_arg(node.kwargs, cast)
    return inserted


def _fold_noop_casts(gm: fx.GraphModule) -> int:
    folded = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.to.dtype)):
        source = node.args[0]
        origin = ir.get(node, ir.Origin)
        if origin is not None and origin.pass_name == "amp" and ir.tensor_val(source).dtype == node.args[1]:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            folded += 1
    return folded


def _add_scale_buffers(gm: fx.GraphModule, options: AmpOptions, device) -> fx.Node:
    gm.register_buffer(SCALE_BUFFER, torch.tensor(options.init_scale, dtype=torch.float32, device=device))
    gm.register_buffer(GROWTH_BUFFER, torch.zeros((), dtype=torch.int32, device=device))
    first = next(iter(gm.graph.find_nodes(op="get_attr")), None) or gm.graph.find_nodes(op="placeholder")[-1]
    with gm.graph.inserting_after(first):
        node = gm.graph.get_attr(SCALE_BUFFER)
    node.meta["val"] = getattr(gm, SCALE_BUFFER)
    return node


def _restore_outputs(gm: fx.GraphModule, scale: fx.Node | None) -> int:
    """Floating outputs in their traced dtype; under fp16 the loss scale enters backward here."""
    output = gm.graph.output_node()
    restored = 0

    def restore(arg):
        nonlocal restored
        if not _is_float(arg):
            return arg
        with gm.graph.inserting_before(output):
            new = gm.graph.call_function(aten.to.dtype, (arg, ir.tensor_val(arg).dtype))
            ir.copy_meta(arg, new, "amp")
            if scale is not None:
                new = gm.graph.call_function(torch.ops.bmc.scale_grad.default, (new, scale))
                ir.copy_meta(arg, new, "amp")
        restored += 1
        return new

    output.args = fx.map_arg(output.args, restore)
    return restored


@register_pass("amp", options=AmpOptions, invalidates=("cost",), forbids=("staged", "fused-regions", "mixed-precision"))
class Amp(Pass):
    """Mixed precision: bf16/fp16 parameters and matmuls, fp32 where precision matters, fp16 loss scaling."""

    def equivalence(self) -> Equivalence:
        # bmc.check on zoo llama-tiny, gpt-tiny and HF LLaMA/GPT-2 measured (outputs; gradients,
        # relative to their largest magnitude) bf16 <= 5.4e-3; 1.03e-2, fp16 <= 6.9e-4; 1.6e-3:
        # the bounds are three times the worst
        if self.options.dtype == "bf16":
            return bounded(3e-2, "bf16 compute (8-bit mantissa)")
        return bounded(5e-3, "fp16 compute (11-bit mantissa)")

    def properties(self) -> Properties:
        scaling = ("loss-scaling",) if self.options.dtype == "fp16" else ()
        return dataclasses.replace(super().properties(), provides=("mixed-precision", *scaling))

    def run(self, gm: fx.GraphModule) -> PassResult:
        options = self.options
        low = LOW_DTYPES[options.dtype]
        params = list(gm.parameters())
        if not any(p.dtype.is_floating_point for p in params):
            raise PipelineError("amp found no floating-point parameters to store in low precision")
        asserts = _drop_dtype_asserts(gm)
        cast_params = _cast_parameters(gm, low)
        inserted = _insert_casts(gm, low)
        scale = _add_scale_buffers(gm, options, params[0].device) if options.dtype == "fp16" else None
        outputs = _restore_outputs(gm, scale)
        propagate_shapes(gm)
        folded = _fold_noop_casts(gm)
        fp16 = options.dtype == "fp16"
        ir.set_plan(gm, ir.AmpPlan(options.dtype, options.growth_interval, scale_buffer=SCALE_BUFFER if fp16 else None,
                                   growth_buffer=GROWTH_BUFFER if fp16 else None))
        gm.graph.lint()
        gm.recompile()
        log.info("amp: %d parameters in %s, %d casts", cast_params, options.dtype, inserted - folded)
        return PassResult(gm, True, {"params-cast": cast_params, "casts": inserted - folded,
                                     "outputs-restored": outputs, "dtype-asserts-dropped": asserts})
