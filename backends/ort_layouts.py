"""Layout round trips taken out of an exported CPU part, as onnxscript rewrite rules.

torch's attention holds q, k and v as [B, heads, T, D]; ONNX Runtime's GroupQueryAttention
and RotaryEmbedding take them tokens first, [B, T, heads * D]. Exported, each attention keeps
the way there and back: a Reshape and a Transpose into heads, RotaryEmbedding, a Transpose and
a Reshape out (ONNX Runtime does not move transposes through contrib ops), and two Reshapes
for v and for the attention's output. Each costs a kernel launch, most a copy: 19 of a
12-layer step's 37 nodes per layer were these. The rules below remove them where the value
shapes export annotates (symbolic dims) prove the round trip is the identity; anything they
cannot prove stays as exported. Written with onnxscript's pattern rewriter (the library the
exporter itself optimizes with) rather than by walking the proto.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_HEADS_FIRST = [0, 2, 1, 3]  # [B, T, heads, D] <-> [B, heads, T, D]


def _dims(value) -> tuple | None:
    shape = getattr(value, "shape", None)
    return tuple(shape.dims) if shape is not None else None


def _same_dims(a: tuple | None, b: tuple | None) -> bool:
    """Equal dims, symbolic ones by name (export gives a dim one symbol everywhere it is the same)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(_dim_key(x) is not None and _dim_key(x) == _dim_key(y) for x, y in zip(a, b))


def _dim_key(dim):
    if isinstance(dim, int):
        return dim
    return getattr(dim, "value", None)  # onnx_ir SymbolicDim: its name; None when unnamed


def _rules():
    from onnxscript.rewriter import pattern

    class RotaryTokensFirst(pattern.RewriteRuleClassBase):
        """Reshape(Transpose(Rotary(Transpose(Reshape(x, [B, T, H, D])))), [B, T, H * D]) is
        RotaryEmbedding on x itself: ONNX Runtime's takes [B, T, H * D] with num_heads."""

        def pattern(self, op, x, heads_shape, positions, cos, sin, flat_shape):
            heads = op.Transpose(op.Reshape(x, heads_shape, _allow_other_attributes=True), perm=_HEADS_FIRST)
            rotated = op.RotaryEmbedding(heads, positions, cos, sin, _domain="com.microsoft",
                                         _outputs=["rotated"], _allow_other_attributes=True)
            return op.Reshape(op.Transpose(rotated, perm=_HEADS_FIRST), flat_shape, _allow_other_attributes=True)

        def check(self, context, x, heads_shape, positions, cos, sin, flat_shape, rotated, **_):
            result = pattern.MatchResult()
            node = rotated.producer()
            attributes = {name: attr.value for name, attr in node.attributes.items()}
            if attributes.get("interleaved", 0) or attributes.get("rotary_embedding_dim", 0) \
                    or attributes.get("is_packed_batching", 0) or attributes.get("scale", 1.0) != 1.0:
                return result.fail("a rotary with options beyond rotate-half over the whole head")
            x_dims, heads_dims = _dims(x), _dims(node.inputs[0])  # [B, T, H*D], [B, H, T, D]
            out_dims = _dims(context.output_values[0])
            if x_dims is None or heads_dims is None or len(x_dims) != 3 or len(heads_dims) != 4:
                return result.fail("shapes not annotated")
            heads, size = heads_dims[1], heads_dims[3]
            if not (isinstance(heads, int) and isinstance(size, int) and x_dims[2] == heads * size):
                return result.fail("heads x head size is not x's width")
            if not (_same_dims(x_dims[:2], (heads_dims[0], heads_dims[2])) and _same_dims(out_dims, x_dims)):
                return result.fail("the round trip does not keep batch and tokens")
            self._heads = heads
            return result

        def rewrite(self, op, x, heads_shape, positions, cos, sin, flat_shape, **_):
            return op.RotaryEmbedding(x, positions, cos, sin, num_heads=self._heads, interleaved=0,
                                      _domain="com.microsoft")

    class ReshapeRoundTrip(pattern.RewriteRuleClassBase):
        """Reshape(Reshape(x, a), b) giving x's own shape is x (v into heads and back; the
        attention's output into heads and back, when its transposes cancelled)."""

        def pattern(self, op, x, first, second):
            return op.Reshape(op.Reshape(x, first, _allow_other_attributes=True), second,
                              _allow_other_attributes=True)

        def check(self, context, x, first, second, **_):
            result = pattern.MatchResult()
            if not _same_dims(_known_dims(x), _dims(context.output_values[0])):
                return result.fail("the round trip changes the shape (or it is not known)")
            return result

        def rewrite(self, op, x, first, second, **_):
            return op.Identity(x)

    class PackedQkv(pattern.RewriteRuleClassBase):
        """GroupQueryAttention(Split(x)) with q, k and v the three parts of x, in that order, is
        GroupQueryAttention on x itself, packed: one input the kernel slices, no Split node."""

        rotates = True  # a pattern variable does not match an absent input: one rule with tables, one without

        def pattern(self, op, x, sizes, past_key, past_value, seqlens, total, bias, cos=None, sin=None):
            query, key, value = op.Split(x, sizes, _outputs=3, _allow_other_attributes=True)
            cos, sin = (cos, sin) if self.rotates else (None, None)
            return op.GroupQueryAttention(query, key, value, past_key, past_value, seqlens, total, cos, sin, None,
                                          bias, _domain="com.microsoft", _outputs=3, _allow_other_attributes=True)

        def check(self, context, x, sizes, **_):
            result = pattern.MatchResult()
            split = context.output_values[0].producer().inputs[0].producer()
            attention = context.output_values[0].producer()
            axis = split.attributes["axis"].value if "axis" in split.attributes else 0
            dims, parts = _dims(x), sizes.const_value
            heads = {name: attr.value for name, attr in attention.attributes.items()}
            if dims is None or len(dims) != 3 or axis not in (2, -1) or parts is None:
                return result.fail("not a split of [B, T, width] along the width")
            widths = [int(w) for w in parts.numpy().tolist()]
            head = widths[0] // heads.get("num_heads", 0) if heads.get("num_heads") else 0
            kv = heads.get("kv_num_heads", 0)
            if len(widths) != 3 or not head or widths != [heads["num_heads"] * head, kv * head, kv * head]:
                return result.fail("the parts are not q, k and v of the attention's heads")
            self._attention = attention
            return result

        def rewrite(self, op, x, sizes, past_key, past_value, seqlens, total, bias, cos=None, sin=None, **_):
            attention = self._attention
            return op.GroupQueryAttention(x, None, None, past_key, past_value, seqlens, total, cos, sin, None, bias,
                                          _domain="com.microsoft", _outputs=3,
                                          **{name: attr.value for name, attr in attention.attributes.items()})

    class PackedQkvUnrotated(PackedQkv):
        rotates = False

    # packing reads q, k and v straight off the Split: after the round trips are gone
    return (pattern.RewriteRuleSet([RotaryTokensFirst.rule(), ReshapeRoundTrip.rule()]),
            pattern.RewriteRuleSet([PackedQkv.rule(), PackedQkvUnrotated.rule()]))


def _known_dims(value) -> tuple | None:
    """A value's dims; for GroupQueryAttention's output, which export leaves unannotated, its
    query's: the op gives [B, T, heads * D] for a query [B, T, heads * D]."""
    dims = _dims(value)
    producer = value.producer() if dims is None else None
    if producer is not None and producer.op_type == "GroupQueryAttention" and producer.domain == "com.microsoft" \
            and value is producer.outputs[0]:
        return _dims(producer.inputs[0])
    return dims


def tokens_first(model):
    """`model` (a ModelProto) without the layout round trips the rules prove away."""
    from onnxscript import ir, rewriter
    from onnx_ir.passes.common import IdentityEliminationPass
    graph = ir.serde.deserialize_model(model)
    before = len(graph.graph)
    # transposes export already cancelled are Identity nodes, which would hide a Reshape's
    # Reshape from the pattern; the round trips the rules remove become Identity nodes too
    IdentityEliminationPass()(graph)
    for rules in _rules():
        graph = rewriter.rewrite(graph, rules)
        IdentityEliminationPass()(graph)
    log.debug("ort-paged: %d layout nodes removed (%d -> %d)", before - len(graph.graph), before, len(graph.graph))
    return ir.serde.serialize_model(graph)
