"""How bmc's own ops become ONNX in the ort-paged lowering (torch.onnx's
custom_translation_table):

- `bmc::int8_linear`: on the CPU, activations quantized per token to one int8 digit
  (act=dynamic, W8A8 as in torch) or two (act=none, within 4e-4 of weight-only), MatMulInteger
  and the scales; for GPU providers DequantizeLinear(axis=0) + MatMul (ONNX
  Runtime's integer ops fall back to the CPU there);
- `bmc::cached_attention`: on the CPU, ONNX Runtime's GroupQueryAttention; for GPU providers
  the same in standard ops; `bmc::slot_rotary_attention` (CPU builds only:
  bmc/rewrite/slot_rotary.py) the same with do_rotary;
- `bmc::rms_norm`, `bmc::add_rms_norm`, `bmc::rotary` (CPU builds only: bmc/rewrite/rms_norm.py
  and rotary.py put them in): ONNX Runtime's SimplifiedLayerNormalization,
  SkipSimplifiedLayerNormalization and RotaryEmbedding.
"""
from __future__ import annotations

import torch

import bmc.ir.ops  # noqa: F401 - registers the ops the tables name
from bmc.errors import BackendError


def translation_table(gpu: bool, int8_weights: str = "s8") -> dict:
    """Every bmc op the lowering meets, for the CPU or for GPU providers."""
    return {**_int8_translation(gpu, int8_weights), **_attention_translation(gpu),
            **({} if gpu else _norm_and_rotary_translation())}


def _int8_translation(gpu: bool, weights: str = "s8"):
    """`weights` (CPU): "s8" feeds the int8 weights to the u8 x s8 kernels as they are; "u8"
    feeds int8 + 128 with zero point 128, the same integers for the u8 x u8 kernels, on CPUs
    where the u8 x s8 ones saturate (ort_artifacts.int8_weight_format)."""
    from onnxscript import opset18 as op

    def int8_linear_cpu(x, weight_q, scale, bias, act: str):
        # Activations are quantized per token, never per tensor (DynamicQuantizeLinear): one
        # scale for a whole batch made each row's result depend on the other rows, and a
        # prompt's tokens share their largest value (0.14 relative error per 4096-wide
        # projection, measured). act=dynamic is W8A8, one int8 digit a value, as in torch.
        # act=none is weight-only, which ONNX Runtime has no fast CPU kernel for (MatMulNBits
        # at 8 bits in fp32 runs ~100x slower): each value becomes two int8 digits, q1 + q2/254,
        # both multiplied in one MatMulInteger (the weights are read once), within 4e-4 of the
        # weight-only product where one digit is 0.02-0.09 off with an outlier channel.
        # Digits are shifted to uint8 with zero point 128 for the u8 x s8 / u8 x u8 kernels.
        absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        x_scale = op.Div(op.Max(absmax, _like(1e-8, x)), _like(127.0, x))
        scaled = op.Mul(x, op.Reciprocal(x_scale))
        digits = op.Round(scaled)
        if act != "dynamic":
            digits = op.Concat(digits, op.Round(op.Mul(op.Sub(scaled, digits), _like(254.0, x))), axis=0)
        xq = op.Cast(op.Add(op.Clip(digits, _like(-127.0, x), _like(127.0, x)), _like(128.0, x)), to=2)  # 2: uint8
        x_zero = op.Cast(op.Constant(value_int=128), to=2)
        weight = op.Transpose(weight_q, perm=[1, 0])
        if weights == "u8":
            shifted = op.Add(op.Cast(weight, to=5), op.Cast(op.Constant(value_int=128), to=5))  # 5: int16
            y = op.Cast(op.MatMulInteger(xq, op.Cast(shifted, to=2), x_zero, x_zero), to=1)
        else:
            y = op.Cast(op.MatMulInteger(xq, weight, x_zero), to=1)
        if act != "dynamic":
            high, low = op.Split(y, axis=0, num_outputs=2)
            y = op.Add(high, op.Div(low, _like(254.0, x)))
        y = op.Mul(op.Mul(y, x_scale), scale)
        return y if bias is None else op.Add(y, bias)

    def int8_linear_gpu(x, weight_q, scale, bias, act: str):
        weight = op.DequantizeLinear(weight_q, op.CastLike(scale, x), axis=0)
        y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    if weights not in ("s8", "u8"):
        raise ValueError(f"int8 weights are fed as s8 or u8, got {weights!r}")
    return {torch.ops.bmc.int8_linear.default: int8_linear_gpu if gpu else int8_linear_cpu}


def _like(value: float, x):
    """A float constant in x's dtype."""
    from onnxscript import opset18 as op
    return op.CastLike(op.Constant(value_float=value), x)


def _contrib_op(name: str, domain: str, inputs: list[tuple], outputs: list[tuple], attributes: dict,
                type_constraints: list[tuple]):
    """An onnxscript op for an ONNX Runtime contrib op: onnxscript builds a node only from a
    schema, and onnx knows no contrib ops. inputs/outputs: (name, type, optional?)."""
    import onnxscript
    from onnx.defs import OpSchema
    option = {False: OpSchema.FormalParameterOption.Single, True: OpSchema.FormalParameterOption.Optional}

    def parameters(entries):
        return [OpSchema.FormalParameter(n, kind, param_option=option[optional]) for n, kind, optional in entries]
    schema = OpSchema(name, domain, 1, inputs=parameters(inputs), outputs=parameters(outputs),
                      type_constraints=[(t, kinds, "") for t, kinds in type_constraints],
                      attributes=[OpSchema.Attribute(n, kind, "") for n, kind in attributes.items()])
    # domain "": ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain, version 1
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 18 if domain == "" else 1), name, schema)


def _norm_and_rotary_translation():
    """RMSNorm and RoPE as ONNX Runtime's CPU kernels (one node each instead of 7 and 6): at
    12 layers of width 768 these nodes are most of what a decode step spends outside the
    matmuls."""
    from onnx.defs import OpSchema
    real, floats = OpSchema.AttrType.FLOAT, [("T", ["tensor(float)"])]
    norm = _contrib_op("SimplifiedLayerNormalization", "", [("X", "T", False), ("scale", "T", False)],
                       [("Y", "T", False)], {"epsilon": real, "axis": OpSchema.AttrType.INT}, floats)
    skip_norm = _contrib_op(
        "SkipSimplifiedLayerNormalization", "com.microsoft",
        [("input", "T", False), ("skip", "T", False), ("gamma", "T", False), ("bias", "T", True)],
        [("output", "T", False), ("mean", "T", True), ("inv_std_var", "T", True), ("input_skip_bias_sum", "T", True)],
        {"epsilon": real}, floats)
    rotary = _contrib_op(
        "RotaryEmbedding", "com.microsoft",
        [("input", "T", False), ("position_ids", "M", False), ("cos_cache", "T", False), ("sin_cache", "T", False)],
        [("output", "T", False)], {"interleaved": OpSchema.AttrType.INT}, floats + [("M", ["tensor(int64)"])])

    def rms_norm(x, weight, eps: float):
        return norm(x, weight, epsilon=eps, axis=-1)

    def add_rms_norm(x, residual, weight, eps: float):
        normed, _, _, total = skip_norm(x, residual, weight, None, epsilon=eps, _num_outputs=4)
        return normed, total

    def rotate(x, positions, cos_rows, sin_rows):
        return rotary(x, positions, cos_rows, sin_rows, interleaved=0)
    return {torch.ops.bmc.rms_norm.default: rms_norm, torch.ops.bmc.add_rms_norm.default: add_rms_norm,
            torch.ops.bmc.rotary.default: rotate}


def _group_query_attention_schema():
    """ONNX Runtime's com.microsoft GroupQueryAttention, as far as bmc uses it: onnxscript builds
    a node only from a schema, and onnx knows no contrib ops."""
    from onnx.defs import OpSchema
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    inputs = [("query", "T", single), ("key", "T", optional), ("value", "T", optional), ("past_key", "T", optional),
              ("past_value", "T", optional), ("seqlens_k", "M", single), ("total_sequence_length", "M", single),
              ("cos_cache", "T", optional), ("sin_cache", "T", optional), ("position_ids", "P", optional),
              ("attention_bias", "T", optional)]
    attribute = OpSchema.AttrType
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(name, kind, param_option=option) for name, kind, option in inputs],
        outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("num_heads", attribute.INT, ""), OpSchema.Attribute("kv_num_heads", attribute.INT, ""),
                    OpSchema.Attribute("scale", attribute.FLOAT, ""),
                    OpSchema.Attribute("do_rotary", attribute.INT, "", required=False),
                    OpSchema.Attribute("rotary_interleaved", attribute.INT, "", required=False)])


def _attention_translation(gpu: bool):
    """bmc::cached_attention. CPU: ONNX Runtime's GroupQueryAttention, which appends to the
    cache and reads each kv head for its group of query heads in one kernel (the cat, the
    repeat of the cache per head and the transposes as separate ops cost a decode step ~6% at
    12 layers of width 768, 4 kv heads: 41 against 43.5 tokens/s, one thread, measured); it masks causally by position itself (query i of T
    sees slots up to P + i, the same triangle the additive mask holds) and adds the mask for
    the padding. Its CPU kernel takes prompts only with an empty cache when the batch is > 1
    (generate's prefill) and decode steps of one token. GPU: the same in standard ops (its
    GroupQueryAttention wants fp16)."""
    import onnxscript
    from onnxscript import opset18 as op
    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention",
                               _group_query_attention_schema())

    def static_heads(x) -> int:
        heads = x.shape[1] if x.shape is not None else None
        if not isinstance(heads, int):
            raise BackendError("ort-paged: the attention's number of heads is not static in the exported graph")
        return heads

    def cached_attention_cpu(query, key, value, past_key, past_value, mask, kv_repeat: int, scale: float,
                             cos_cache=None, sin_cache=None):
        heads, kv_heads = static_heads(query), static_heads(key)
        rotary = {} if cos_cache is None else {"do_rotary": 1, "rotary_interleaved": 0}
        flat = op.Constant(value_ints=[0, 0, -1])

        def tokens_first(x):  # [B, heads, T, D] -> [B, T, heads * D]
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)
        total = op.Cast(op.Shape(mask, start=3, end=4), to=6)  # 6: int32; [1]
        last = op.Sub(total, op.Cast(op.Constant(value_ints=[1]), to=6))
        # every row holds all P + T slots; the batch read off the mask, which every layer shares
        # (ONNX Runtime then computes this once per step, not per layer), unless it broadcasts
        rows = past_key if mask.shape is None or mask.shape[0] == 1 else mask
        seqlens = op.Expand(last, op.Shape(rows, start=0, end=1))
        out, present_key, present_value = gqa(tokens_first(query), tokens_first(key), tokens_first(value), past_key,
                                              past_value, seqlens, op.Squeeze(total), cos_cache, sin_cache, None,
                                              mask, num_heads=heads, kv_num_heads=kv_heads, scale=scale, **rotary)
        out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1])), perm=[0, 2, 1, 3])
        return out, present_key, present_value

    def cached_attention_gpu(query, key, value, past_key, past_value, mask, kv_repeat: int, scale: float):
        keys, values = op.Concat(past_key, key, axis=2), op.Concat(past_value, value, axis=2)

        def per_query_head(x):
            if kv_repeat == 1:
                return x
            grown = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])),
                              op.Constant(value_ints=[1, 1, kv_repeat, 1, 1]))
            return op.Reshape(grown, op.Concat(op.Shape(x, start=0, end=1), op.Constant(value_ints=[-1]),
                                               op.Shape(x, start=2, end=4), axis=0))
        scores = op.Add(op.Mul(op.MatMul(query, op.Transpose(per_query_head(keys), perm=[0, 1, 3, 2])),
                               op.CastLike(op.Constant(value_float=scale), query)), mask)
        return op.MatMul(op.Softmax(scores, axis=-1), per_query_head(values)), keys, values

    def slot_rotary_attention_cpu(query, key, value, past_key, past_value, mask, cos_cache, sin_cache,
                                  kv_repeat: int, scale: float):
        # GroupQueryAttention with do_rotary rotates q and k at their slots: the op's meaning
        return cached_attention_cpu(query, key, value, past_key, past_value, mask, kv_repeat, scale,
                                    cos_cache, sin_cache)
    if gpu:  # bmc/rewrite/slot_rotary.py puts it in CPU builds only
        return {torch.ops.bmc.cached_attention.default: cached_attention_gpu}
    return {torch.ops.bmc.cached_attention.default: cached_attention_cpu,
            torch.ops.bmc.slot_rotary_attention.default: slot_rotary_attention_cpu}
