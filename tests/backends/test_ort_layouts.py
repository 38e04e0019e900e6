"""backends/ort_layouts.py: the layout round trips around ONNX Runtime's tokens-first kernels
go where the annotated shapes prove them the identity, and the graph computes the same; a
reshape that changes the shape, or a rotary over part of the head, stays."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from bmc.backends.ort_layouts import tokens_first  # noqa: E402

HEADS, SIZE = 3, 8
WIDTH = HEADS * SIZE


def _value(name, dims, kind=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, kind, dims)


def _model(nodes, inputs, outputs, values, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers, value_info=values)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _const(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _rotary_in_heads(flat_shape=(0, 0, -1), out_dims=("B", "T", WIDTH), rotary_dim=0):
    """x [B, T, H*D] into heads, RotaryEmbedding, back: what export leaves around the kernel."""
    half = (rotary_dim or SIZE) // 2
    attrs = {"rotary_embedding_dim": rotary_dim, "num_heads": HEADS} if rotary_dim else {}
    nodes = [helper.make_node("Reshape", ["x", "heads_shape"], ["heads"]),
             helper.make_node("Transpose", ["heads"], ["heads_first"], perm=[0, 2, 1, 3]),
             helper.make_node("RotaryEmbedding", ["heads_first", "positions", "cos", "sin"], ["rotated"],
                              domain="com.microsoft", interleaved=0, **attrs),
             helper.make_node("Transpose", ["rotated"], ["tokens_first"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["tokens_first", "flat_shape"], ["y"])]
    inputs = [_value("x", ["B", "T", WIDTH]), _value("positions", ["B", "T"], TensorProto.INT64),
              _value("cos", ["R", half]), _value("sin", ["R", half])]
    values = [_value("heads", ["B", "T", HEADS, SIZE]), _value("heads_first", ["B", HEADS, "T", SIZE]),
              _value("rotated", ["B", HEADS, "T", SIZE]), _value("tokens_first", ["B", "T", HEADS, SIZE])]
    return _model(nodes, inputs, [_value("y", list(out_dims))], values,
                  [_const("heads_shape", [0, 0, HEADS, SIZE]), _const("flat_shape", list(flat_shape))])


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _rotary_feeds(half=SIZE // 2, batch=2, tokens=5, rows=16):
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 3, (rows, half)).astype(np.float32)
    return {"x": rng.standard_normal((batch, tokens, WIDTH)).astype(np.float32),
            "positions": rng.permutation(rows)[:batch * tokens].reshape(batch, tokens).astype(np.int64),  # out of order
            "cos": np.cos(angles), "sin": np.sin(angles)}


def test_rotary_in_heads_becomes_one_tokens_first_rotary_with_the_same_output():
    model = _rotary_in_heads()
    rewritten = tokens_first(model)
    assert [n.op_type for n in rewritten.graph.node] == ["RotaryEmbedding"]
    assert {a.name: a.i for a in rewritten.graph.node[0].attribute}["num_heads"] == HEADS
    feeds = _rotary_feeds()
    want = _run(model, feeds)
    assert np.array_equal(_run(rewritten, feeds), want)
    assert not np.allclose(want, feeds["x"])  # the rotary did rotate: the comparison can fail


def test_what_is_not_proven_a_round_trip_stays():
    # the last reshape flattens the tokens: [B * T, H * D] is not x's shape
    flattened = _rotary_in_heads(flat_shape=(-1, WIDTH), out_dims=("N", WIDTH))
    assert len(tokens_first(flattened).graph.node) == 5
    # a rotary over part of each head (rotary_embedding_dim) is not the whole-head rotary
    partial = _rotary_in_heads(rotary_dim=4)
    assert len(tokens_first(partial).graph.node) == 5


def test_a_reshape_round_trip_goes_and_a_reshape_that_changes_the_shape_stays():
    nodes = [helper.make_node("Reshape", ["x", "heads_shape"], ["heads"]),
             helper.make_node("Reshape", ["heads", "flat_shape"], ["back"]),
             helper.make_node("Reshape", ["back", "heads_shape"], ["heads_again"]),
             helper.make_node("Reshape", ["heads_again", "rows_shape"], ["y"]),
             helper.make_node("Relu", ["y"], ["out"])]
    values = [_value("heads", ["B", "T", HEADS, SIZE]), _value("back", ["B", "T", WIDTH]),
              _value("heads_again", ["B", "T", HEADS, SIZE]), _value("y", ["B", "T_H", SIZE])]
    model = _model(nodes, [_value("x", ["B", "T", WIDTH])], [_value("out", ["B", "T_H", SIZE])], values,
                   [_const("heads_shape", [0, 0, HEADS, SIZE]), _const("flat_shape", [0, 0, -1]),
                    _const("rows_shape", [0, -1, SIZE])])
    rewritten = tokens_first(model)
    # x -> heads -> back is x again; back -> heads_again -> [B, T*H, D] is a real change
    assert [n.op_type for n in rewritten.graph.node] == ["Reshape", "Reshape", "Relu"]
    x = np.random.default_rng(1).standard_normal((2, 4, WIDTH)).astype(np.float32)
    assert np.array_equal(_run(rewritten, {"x": x}), _run(model, {"x": x}))


def _attention_on_split(sizes, rotary: bool, heads=2, kv_heads=1, size=16):
    """GroupQueryAttention on q, k, v split off one [B, T, width] value, with an empty cache."""
    width = (heads + 2 * kv_heads) * size
    rotary_inputs = ["cos", "sin"] if rotary else ["", ""]
    nodes = [helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=2),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens", "total",
                                                      *rotary_inputs, "", "bias"], ["out", "present_k", "present_v"],
                              domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                              **({"do_rotary": 1, "rotary_interleaved": 0} if rotary else {}))]
    inputs = [_value("qkv", ["B", "T", width]), _value("past_k", ["B", kv_heads, "P", size]),
              _value("past_v", ["B", kv_heads, "P", size]), _value("seqlens", ["B"], TensorProto.INT32),
              _value("total", [], TensorProto.INT32), _value("bias", ["B", 1, "T", "S"])]
    tables = [helper.make_tensor(name, TensorProto.FLOAT, [32, size // 2],
                                 fn(np.arange(32)[:, None] * 0.1 * np.arange(1, size // 2 + 1)).ravel().tolist())
              for name, fn in (("cos", np.cos), ("sin", np.sin))] if rotary else []
    outputs = [_value("out", ["B", "T", heads * size]), _value("present_k", None), _value("present_v", None)]
    return _model(nodes, inputs, outputs, [_value(n, ["B", "T", w * size]) for n, w in
                                           zip("qkv", (heads, kv_heads, kv_heads))],
                  [_const("sizes", list(sizes)), *tables])


@pytest.mark.parametrize("rotary", [False, True])
def test_attention_on_the_three_parts_of_one_value_reads_it_packed(rotary):
    model = _attention_on_split([32, 16, 16], rotary)
    rewritten = tokens_first(model)
    assert [n.op_type for n in rewritten.graph.node] == ["GroupQueryAttention"]
    assert list(rewritten.graph.node[0].input[:3]) == ["qkv", "", ""]
    rng = np.random.default_rng(2)
    feeds = {"qkv": rng.standard_normal((2, 5, 64)).astype(np.float32),
             "past_k": np.zeros((2, 1, 0, 16), np.float32), "past_v": np.zeros((2, 1, 0, 16), np.float32),
             "seqlens": np.full(2, 4, np.int32), "total": np.array(5, np.int32),
             "bias": np.zeros((2, 1, 5, 5), np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds), _run(model, feeds), atol=1e-6)


def test_parts_that_are_not_q_k_and_v_of_the_heads_stay_split():
    assert len(tokens_first(_attention_on_split([16, 32, 16], rotary=False)).graph.node) == 2
