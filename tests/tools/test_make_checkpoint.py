"""tools/make_checkpoint.py: a named shape written as a Hugging Face directory in several
safetensors shards with an index, a config and a trained tokenizer, that transformers loads
with exactly the tensors the shards hold; the same seed gives the same bytes, another seed
others; bad options and a disk without room are refused in one line, before anything is
written."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "tools" / "make_checkpoint.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    make.make_checkpoint("llama-tiny", out, layers=8, shard_bytes=make.parse_size("120KB"), progress=False)
    return out


def test_a_sharded_checkpoint_that_transformers_loads_with_the_shards_tensors(checkpoint):
    from safetensors import safe_open
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((checkpoint / s).is_file() for s in shards)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint))
    assert model.config.num_hidden_layers == 8 and model.dtype == torch.bfloat16
    state = model.state_dict()
    assert set(state) == set(index["weight_map"])
    for shard in shards:
        with safe_open(str(checkpoint / shard), "pt") as f:
            for name in f.keys():
                assert torch.equal(state[name], f.get_tensor(name)), name
    norm, proj = state["model.norm.weight"], state["model.layers.3.mlp.up_proj.weight"].float()
    assert torch.equal(norm, torch.ones_like(norm)) and 0.015 < proj.std() < 0.025  # transformers' init
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    text = "def main(argv):\n    return 0\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < model.config.vocab_size


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(checkpoint, tmp_path):
    same = make.make_checkpoint("llama-tiny", tmp_path / "same", layers=8, shard_bytes=make.parse_size("120KB"),
                                progress=False)
    files = json.loads((checkpoint / "lineage.json").read_text())["steps"][-1]["files"]
    assert json.loads((same / "lineage.json").read_text())["steps"][-1]["files"] == files
    other = make.make_checkpoint("llama-tiny", tmp_path / "other", seed=1, progress=False)
    with open(other / "model.safetensors", "rb") as f, open(checkpoint / sorted(files)[0], "rb") as g:
        assert f.read() != g.read()


def test_bad_options_and_no_room_are_refused_in_one_line(tmp_path, monkeypatch):
    for argv in (["llama-huge", str(tmp_path / "a")], ["llama-tiny", str(tmp_path / "b"), "--shard-size", "lots"],
                 ["llama-tiny", str(tmp_path / "c"), "--layers", "0"]):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), *argv],
                              capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    monkeypatch.setattr(make.shutil, "disk_usage", lambda path: make.shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with pytest.raises(make.CheckpointError, match=r"needs [\d,]+ bytes .* has 1,024 free"):
        make.make_checkpoint("llama-tiny", tmp_path / "full", progress=False)
    assert not (tmp_path / "full").exists()
