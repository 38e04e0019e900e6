"""bmc/ir/deferred.py: a deferred weight records what is done to it and replays it, reading
only the checkpoint tensors its recipe names; in-place changes are refused; decisions that
read values get real ones; a graph traced on the meta device runs on the cpu."""
import copy

import pytest
import torch

from bmc.ir import deferred
from bmc.models import hf

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture()
def stored(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(6, 4), "v": torch.randn(6, 4), "ids": torch.arange(6)}
    path = str(tmp_path / "t.safetensors")
    safetensors.save_file(tensors, path)
    return path, tensors


def _read(path, key, tensors):
    return deferred.read(path, key, tensors[key].shape, tensors[key].dtype)


def test_a_recipe_replays_what_was_done_to_the_weights(stored):
    path, tensors = stored
    w, v = _read(path, "w", tensors), _read(path, "v", tensors)
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = (w / scale.reshape(-1, 1)).round().clamp(-127, 127).to(torch.int8)
    merged = torch.cat([w.t(), v[2:5].t()], dim=1)
    assert all(deferred.is_deferred(t) for t in (scale, q, merged))
    assert q.dtype == torch.int8 and q.shape == (6, 4) and merged.shape == (4, 9)
    real_w, real_v = tensors["w"], tensors["v"]
    real_scale = real_w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    real_q, real_merged = deferred.materialize_all([q, merged])
    assert torch.equal(real_q, (real_w / real_scale.reshape(-1, 1)).round().clamp(-127, 127).to(torch.int8))
    assert torch.equal(real_merged, torch.cat([real_w.t(), real_v[2:5].t()], dim=1))
    assert torch.equal(deferred.materialize(scale), real_scale)  # evaluated again on its own: read again, same


def test_a_decision_on_values_gets_real_values(stored):
    path, tensors = stored
    w = _read(path, "w", tensors)
    norms = w.norm(dim=1)
    keep = sorted(torch.topk(deferred.materialize(norms), 3).indices.tolist())
    assert (w.abs().sum() > 0).item() is True  # .item() reads the value
    kept = w[torch.tensor(keep)]
    assert deferred.is_deferred(kept) and torch.equal(deferred.materialize(kept), tensors["w"][keep])


def test_changes_in_place_are_refused_in_one_line(stored):
    path, tensors = stored
    w = _read(path, "w", tensors)
    with pytest.raises(deferred.DeferredError, match="in place"):
        w.mul_(2)
    with pytest.raises(deferred.DeferredError, match="without values"):
        w[[0, 2]]  # torch makes the index a tensor on the weight's device: meta, no values to replay


def test_a_module_is_materialized_in_place_and_a_deep_copy_shares_the_recipe(stored):
    path, tensors = stored
    module = torch.nn.Linear(4, 6, bias=False)
    module.weight = torch.nn.Parameter(_read(path, "w", tensors), requires_grad=False)
    assert deferred.deferred_names(module) == ["weight"]
    twin = copy.deepcopy(module)
    assert twin.weight is module.weight
    assert deferred.materialize_module(module) == 1
    assert torch.equal(module.weight, tensors["w"]) and not deferred.deferred_names(module)
    assert deferred.deferred_names(twin) == ["weight"]  # the copy is untouched


def test_a_deferred_graph_runs_like_the_loaded_one(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path), max_shard_size="20KB")
    loaded = hf.load_graph(f"hf:{tmp_path}", device="cpu")
    graph = hf.load_graph(f"hf:{tmp_path}", device="deferred")
    assert deferred.deferred_names(graph) and all(p.device.type == "meta" for p in graph.parameters())
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = loaded(input_ids=ids)[0]
    assert torch.equal(deferred.run_reading_weights(graph, ids)[0], expected)  # weights read as nodes take them
    assert deferred.deferred_names(graph)
    deferred.materialize_module(graph)
    assert torch.equal(graph(input_ids=ids)[0], expected)


def test_an_intermediate_is_freed_after_its_last_reader(stored, monkeypatch):
    path, tensors = stored
    w = _read(path, "w", tensors)
    steps = [w.abs(), None]
    steps[1] = (steps[0] * 2).round()  # abs -> mul -> round: abs's and mul's values are not kept
    peaks = []
    evaluate = deferred._Evaluation._value

    def counting(self, recipe):
        value = evaluate(self, recipe)
        peaks.append(len(self.memo))
        return value
    monkeypatch.setattr(deferred._Evaluation, "_value", counting)
    (rounded,) = deferred.materialize_all([steps[1]])
    assert torch.equal(rounded, (tensors["w"].abs() * 2).round())
    assert max(peaks) <= 2  # a value and the one it is computed from, never the whole chain


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from bmc.errors import ModelLoadError
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    fewer = transformers.LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    fewer.save_pretrained(str(tmp_path))  # config.json now says one layer; the weights hold two
    with pytest.raises(ModelLoadError, match="does not have: .*layers.1") as refused:
        hf.load_graph(f"hf:{tmp_path}", device="deferred")
    assert "\n" not in str(refused.value)
    config.save_pretrained(str(tmp_path))
    fewer_weights = {k: v for k, v in safetensors.load_file(str(tmp_path / "model.safetensors")).items()
                     if "layers.1." not in k}
    safetensors.save_file(fewer_weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="lacks weights the model needs"):
        hf.load_graph(f"hf:{tmp_path}", device="deferred")
