"""Hugging Face checkpoint directories (`hf:DIR`): sharded safetensors read back exactly, ties
kept, encoders as AutoModel, a tokenizer carried into an ort-paged build and used by `bmc run`,
and every refusal one line."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

import bmc
import hf_models
from bmc import ir
from bmc.errors import BackendError, ModelLoadError
from bmc.ir.serialize import load_graph
from bmc.models import hf

EOS = "</s>"


def train_tokenizer(vocab: int = hf_models.VOCAB):
    """A BPE tokenizer trained on a few of the standard library's sources (text that ships
    with Python), small enough for the test models' vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, name) for name in ("textwrap.py", "string.py", "bisect.py", "shlex.py")]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", EOS]))
    assert tokenizer.get_vocab_size() <= vocab
    return tokenizer


def save_tokenizer(tokenizer, directory) -> None:
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}, f)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    """A small LLaMA written as several safetensors shards with an index, and a tokenizer."""
    directory = tmp_path_factory.mktemp("llama")
    model = hf_models.build("llama")
    model.save_pretrained(directory, max_shard_size="100KB")
    save_tokenizer(tokenizer, directory)
    return model, str(directory)


def ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, hf_models.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def test_sharded_llama_loads_with_the_original_weights_and_outputs(llama_dir):
    model, directory = llama_dir
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.isfile(os.path.join(directory, hf.INDEX))
    loaded = hf.build(directory)
    assert type(loaded) is type(model)
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    x = ids(3, 11, seed=1)  # not the tracing example's [2, 16]
    gm, _ = load_graph(f"hf:{directory}")
    prog = bmc.compile(f"hf:{directory}", passes="dce")
    with torch.no_grad():
        expected = model(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(logits(gm(input_ids=x)), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits(prog(input_ids=x)), expected, rtol=1e-6, atol=1e-6)
    plan = ir.get_plan(gm, ir.TokenizerPlan)
    assert [f.name for f in plan.files] == ["tokenizer.json", "tokenizer_config.json"]
    meta, _ = load_graph(f"hf:{directory}", device="meta")  # planning: nothing read, nothing allocated
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_tied_causal_lm_and_encoder_load_exactly(name, tmp_path):
    """GPT-2 ties its head to the embedding (stored once); BERT is read as AutoModel."""
    model = hf_models.build(name)
    model.save_pretrained(tmp_path)
    loaded = hf.build(str(tmp_path))
    assert type(loaded) is type(model)
    if name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = ids(3, 9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded(input_ids=x)), logits(model(input_ids=x)), rtol=0, atol=0)


def test_a_bare_model_reads_a_checkpoint_with_a_head(tmp_path):
    """A config naming a bare-model architecture reads the bare model's weights out of a
    checkpoint whose names carry the head's prefix; the head's own weights are left out."""
    model = hf_models.build("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    bare = hf.build(str(tmp_path))
    assert type(bare).__name__ == "LlamaModel"
    x = ids(2, 7, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(bare(input_ids=x).last_hidden_state,
                                   model.model(input_ids=x).last_hidden_state, rtol=0, atol=0)


def refusal(directory: str, device: str | None = None) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_graph(f"hf:{directory}", device=device)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line(llama_dir, tmp_path):
    _, directory = llama_dir
    assert "no config.json" in refusal(str(tmp_path))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert "only as pickles (pytorch_model.bin)" in refusal(str(pickled), "meta")
    assert "save_pretrained" in refusal(str(pickled), "meta")
    os.unlink(pickled / "pytorch_model.bin")
    assert "no weights" in refusal(str(pickled), "cpu")
    wider = tmp_path / "wider"
    wider.mkdir()
    for name in os.listdir(directory):
        os.symlink(os.path.join(directory, name), wider / name)
    os.unlink(wider / "config.json")
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert "the config does not describe this checkpoint" in refusal(str(wider))
    shard = sorted(f for f in os.listdir(wider) if f.endswith(".safetensors"))[1]
    os.unlink(wider / shard)
    assert f"shard {shard} listed in model.safetensors.index.json is missing" in refusal(str(wider))


def test_a_missing_extra_names_what_to_install(llama_dir, monkeypatch, capsys, tmp_path):
    from bmc.cli.opt import main
    _, directory = llama_dir
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main([f"hf:{directory}", "--pass=verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the Python package 'transformers'" in err[0] and "pip install 'bmc[hf]'" in err[0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["zoo:gpt-tiny", "--backend=ort-paged", "-o", str(tmp_path / "served")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'onnxruntime'" in err[0] and "pip install 'bmc[serve]'" in err[0]
    assert not (tmp_path / "served").exists()


@pytest.fixture(scope="module")
def served(tmp_path_factory, llama_dir):
    """`bmc-opt hf:DIR --backend=ort-paged -o OUT`: the LLaMA checkpoint with its tokenizer."""
    from bmc.cli.opt import main
    _, directory = llama_dir
    out = str(tmp_path_factory.mktemp("build") / "served")
    assert main([f"hf:{directory}", "--pass=dce", "--backend=ort-paged", "-o", out]) == 0
    return bmc.load(out), out


def test_the_build_carries_the_tokenizer_with_its_checksum(served, llama_dir):
    _, out = served
    _, directory = llama_dir
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["tokenizer"] == "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(directory, name), "rb").read()
        assert manifest["files"][name] == hf.sha256(os.path.join(out, name))


def test_bmc_run_tokenizes_and_detokenizes_without_torch(served, tokenizer, llama_dir):
    """The text `bmc run DIR --prompt` prints is transformers' greedy continuation of the
    checkpoint, through the tokenizer the directory brought."""
    model, _ = llama_dir
    prog, out = served
    prompt = tokenizer.encode("def main(").ids
    eos = tokenizer.token_to_id(EOS)
    generated = prog.generate([prompt], 12, eos=eos)[0]
    with torch.no_grad():
        eager = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                               pad_token_id=eos)[0, len(prompt):].tolist()
    assert [t for t in generated if t != eos] == [t for t in eager if t != eos][:len(generated)]
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    expected = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert expected.startswith(before)
    expected = expected[len(before):]
    code = ("import sys; from bmc.cli.run import main; rc = main(%r); "
            "sys.exit(rc or (3 if 'torch' in sys.modules else 0))"
            % [out, "--prompt", "def main(", "--max-tokens", "12"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected.strip() and result.stdout == expected + "\n"


def test_bmc_run_keeps_ids_and_refuses_a_changed_tokenizer(served, llama_dir, capsys, monkeypatch, tmp_path):
    from bmc.cli import run as serve
    prog, out = served
    assert serve.main([out, "--prompt-ids", "5,6,7", "--max-tokens", "4"]) == 0
    expected = " ".join(map(str, prog.generate([[5, 6, 7]], 4)[0]))
    assert capsys.readouterr().out.strip() == expected
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert serve.main([out, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'bmc[serve]'" in err[0]
    monkeypatch.delitem(sys.modules, "tokenizers")
    copy = tmp_path / "copy"
    prog.save(str(copy))
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    assert serve.main([str(copy), "--prompt", "x"]) == 2
    assert "tokenizer.json is missing or does not match its checksum" in capsys.readouterr().err
    # the source changed after the model was read: a build would pair it with other ids
    _, directory = llama_dir
    from bmc.models import zoo
    model = zoo.build("gpt-tiny")
    gm = bmc.trace(model, model.example_inputs())
    stale = hf.tokenizer_plan(directory)
    ir.set_plan(gm, ir.TokenizerPlan(stale.directory, (ir.TokenizerFile("tokenizer.json", "0" * 64),)))
    with pytest.raises(BackendError, match="changed since the model was read"):
        bmc.compile(gm, backend="ort-paged", directory=str(tmp_path / "stale"))


def test_a_saved_program_of_a_checkpoint_loads_in_a_fresh_process(llama_dir, tmp_path):
    """The archive's outputs are transformers' ModelOutput classes: a process that has not
    imported transformers reads it too; the tokenizer plan rides along."""
    model, directory = llama_dir
    saved = str(tmp_path / "llama.pt2")
    bmc.compile(f"hf:{directory}", passes="dce").save(saved)
    fresh = subprocess.run([sys.executable, "-m", "bmc.cli.opt", saved, "--pass=verify"], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    from bmc.ir.serialize import load_pt2
    assert ir.get_plan(load_pt2(saved)[0], ir.TokenizerPlan) == hf.tokenizer_plan(directory)
    x = ids(1, 5, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(logits(bmc.load(saved)(input_ids=x)), model(input_ids=x).logits,
                                   rtol=1e-6, atol=1e-6)


def test_text_streams_whole_characters_only():
    """A character split over two byte tokens is printed once both have come."""
    from bmc.serve.text import Stream, Text
    stream = Stream(Text(), list("caf".encode()))
    assert [stream.add(b) for b in "é!".encode()] == ["", "é", "!"]
    assert stream.finish() == "" and stream.continuation() == "é!"


def test_ids_past_the_tokenizers_vocabulary_show_in_the_text(tokenizer):
    from bmc.serve.text import Stream, Text
    text = Text(tokenizer)
    known = tokenizer.encode("def main").ids
    beyond = tokenizer.get_vocab_size(with_added_tokens=True) + 5  # a padded vocabulary's row
    assert text.decode(known) == tokenizer.decode(known)
    assert text.decode([*known, beyond]) == tokenizer.decode(known) + f"<id {beyond}>"
    stream = Stream(text, known[:1])
    shown = "".join(stream.add(t) for t in [*known[1:], beyond]) + stream.finish()
    assert shown.endswith(f"<id {beyond}>")
