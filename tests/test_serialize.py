"""Reading and writing models: .pt2 round trips with annotations; pickles only when trusted;
writes are atomic."""
import os

import pytest
import torch

import bmc
import hf_models
from bmc import ir
from bmc.ir import serialize
from bmc.models import zoo
from bmc.errors import ModelLoadError, ModelSaveError


def test_pt2_round_trip_keeps_annotations_shapes_and_outputs(tmp_path):
    model = hf_models.build("llama")
    inputs = hf_models.example_inputs()
    gm = bmc.trace(model, inputs, dynamic=True)
    linear = next(n for n in gm.graph.nodes if ir.target_str(n) == "aten.linear")
    ir.annotate(linear, ir.Stage(0))
    weight = ir.parameter_nodes(gm)["model.layers.0.mlp.up_proj.weight"]
    ir.annotate(weight, ir.Shard((ir.Placement("tp", "shard", 0),)))
    path = str(tmp_path / "llama.pt2")
    serialize.save_pt2(gm, path, pipeline="dce")
    loaded, meta = serialize.load_pt2(path)
    assert meta["pipeline"] == "dce" and meta["model_name"] == "LlamaForCausalLM"
    assert ir.get(ir.parameter_nodes(loaded)["model.layers.0.mlp.up_proj.weight"], ir.Shard) == \
        ir.Shard((ir.Placement("tp", "shard", 0),))
    assert any(ir.get(n, ir.Stage) == ir.Stage(0) for n in loaded.graph.nodes)
    assert sorted(loaded.meta["bmc.trace"].symbols.values()) == ["B", "S"]
    args, kwargs = (), inputs[1]
    torch.testing.assert_close(loaded(*args, **kwargs).logits, model(**kwargs).logits, atol=1e-5, rtol=1e-5)


def test_meta_weights_cannot_be_saved(tmp_path):
    gm = bmc.trace(zoo.build("gpt-tiny", device="meta"))
    with pytest.raises(ModelSaveError, match="meta device"):
        serialize.save_pt2(gm, str(tmp_path / "x.pt2"))
    assert not os.listdir(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("previous")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        serialize.atomic_write(str(target), fail)
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["out.bin"]


def test_pickles_need_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(zoo.build("gpt-tiny"), path)
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        serialize.load_graph(str(path))
    gm, _ = serialize.load_graph(str(path), trust_pickle=True)
    assert gm.meta["bmc.trace"].model_name == "GPT"
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="holds a dict, not an nn.Module"):
        serialize.load_graph(str(tmp_path / "sd.pt"), trust_pickle=True)


def test_unknown_model_kind():
    with pytest.raises(ModelLoadError, match="don't know how to read 'model.onnx'"):
        serialize.load_graph("model.onnx")
