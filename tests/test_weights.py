"""Whole weights out of programs and training checkpoints (bmc/models/weights.py): written a
shard at a time from any plan, read back by bmc and by transformers, damage caught."""
import json
import os

import pytest
import torch

import bmc
from bmc.cli.local_ranks import run_ranks
from bmc.errors import ModelLoadError
from bmc.models import data, weights, zoo
from bmc.backends import checkpoint

GLOBAL_BATCH, SEQ = 4, 16
TEXT = data.Batches(data.text_tokens(max_bytes=2**20), GLOBAL_BATCH, SEQ, seed=3)


def _trained_program(pipeline: str, world_size: int = 1, rank: int = 0):
    """gpt-tiny under `pipeline`, one AdamW step in: weights that are not the initial ones."""
    torch.manual_seed(0)
    split = "tp" in pipeline or "pp" in pipeline  # the two ranks share one replica
    replicas = 1 if world_size == 1 or split else world_size
    micro = 2 if "pp" in pipeline else 1
    x = torch.zeros(GLOBAL_BATCH // replicas // micro, SEQ, dtype=torch.long)
    prog = bmc.compile(zoo.build("gpt-tiny"), passes=pipeline, example_inputs=(x, x), world_size=world_size)
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-2)
    batch = TEXT.local(0, rank if replicas > 1 else 0, replicas)
    if hasattr(prog, "step"):
        prog.step(*batch)
    else:
        prog(*batch).backward()
    opt.step()
    return prog


def _read(directory) -> dict:
    from safetensors.torch import load_file
    kind, files = weights.resolve_weights(directory)
    assert kind == "files"
    out = {}
    for path in files:
        out.update(load_file(path))
    return out


def _same_as_full_state(exported: dict, full: dict) -> None:
    """Every weight of the program is in the directory, under its name or (a tied weight
    stored once) under an alias holding the same values; nothing else is."""
    assert set(exported) <= set(full), set(exported) - set(full)
    for name, tensor in full.items():
        stored = exported.get(name)
        if stored is None:
            stored = next((t for n, t in exported.items() if t.shape == tensor.shape and torch.equal(t, tensor)), None)
            assert stored is not None, f"{name} is not in the weights directory"
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), name


def test_a_programs_weights_round_trip_shard_by_shard(tmp_path):
    prog = _trained_program("dce")
    out = prog.save_weights(str(tmp_path / "w"), shard_bytes=64 << 10, provenance={"note": "test"})
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 3 and weights.INDEX in names and weights.LINEAGE in names
    limit = 64 << 10
    for shard in shards:  # a shard holds at most the limit, or one tensor larger than it
        from safetensors import safe_open
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            metadata = f.metadata()
        total = sum(4 * torch.Size(s).numel() for s in sizes)
        assert total <= limit or len(sizes) == 1, (shard, total)
        assert metadata["bmc.pipeline"] == "dce" and metadata["bmc.note"] == "test"
    _same_as_full_state(_read(out), prog.full_state_dict())
    torch.manual_seed(5)
    fresh = zoo.build("gpt-tiny")
    weights.load_weights(fresh, out)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, prog.full_state_dict()[name]), name
    lineage = json.loads((tmp_path / "w" / weights.LINEAGE).read_text())
    assert set(lineage["steps"][0]["files"]) == set(names) - {weights.LINEAGE}


def test_a_flipped_byte_in_any_file_is_caught(tmp_path):
    out = _trained_program("dce").save_weights(str(tmp_path / "w"), shard_bytes=64 << 10)
    for name in sorted(os.listdir(out)):
        if name == weights.LINEAGE:
            continue
        path = os.path.join(out, name)
        original = open(path, "rb").read()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        open(path, "wb").write(bytes(damaged))
        with pytest.raises(ModelLoadError, match=f"{name} does not match the checksum"):
            weights.load_weights(zoo.build("gpt-tiny"), out)
        open(path, "wb").write(original)
    weights.load_weights(zoo.build("gpt-tiny"), out)


def _export(rank, world_size, pipeline, directory):
    prog = _trained_program(pipeline, world_size, rank)
    prog.save_weights(directory, shard_bytes=64 << 10)
    full = prog.full_state_dict()  # collective: every rank takes part
    return full if rank == 0 else None


@pytest.mark.parametrize("pipeline", ["dp", "zero3", "tp2", "pp{stages=2,microbatches=2}"])
def test_weights_gathered_from_any_plan_equal_its_full_state(tmp_path, pipeline):
    directory = str(tmp_path / "w")
    full, _ = run_ranks(2, _export, pipeline, directory)
    _same_as_full_state(_read(directory), full)
    assert not [p for p in os.listdir(tmp_path) if p != "w"], "the gathering checkpoint was left behind"
    lineage = json.loads((tmp_path / "w" / weights.LINEAGE).read_text())["steps"][0]
    assert lineage["world_size"] == 2 and lineage["step"] == 0


def test_a_training_checkpoint_loads_as_weights_and_exports(tmp_path):
    prog = _trained_program("dce")
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-2)
    checkpoint.save(tmp_path / "ckpt", prog, opt, step=7, extra={"loss": 1.5})
    fresh = zoo.build("gpt-tiny")
    weights.load_weights(fresh, tmp_path / "ckpt")  # the root: its latest step
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, prog.full_state_dict()[name]), name
    reads = []
    real = weights.checkpoint_reader
    weights.checkpoint_reader = lambda step: (lambda group: reads.append(sum(e.nbytes for e in group)) or
                                              real(step)(group))
    try:  # shards of 256 KiB, each filled 8 KiB at a time (or one larger tensor)
        out = weights.export_checkpoint(checkpoint.latest(tmp_path / "ckpt"), tmp_path / "w", shard_bytes=256 << 10,
                                        group_bytes=8 << 10)
    finally:
        weights.checkpoint_reader = real
    largest = max(p.numel() * 4 for p in prog.parameters())
    assert len(reads) > 10 and max(reads) <= max(8 << 10, largest)
    _same_as_full_state(_read(out), prog.full_state_dict())
    record = json.loads((out / weights.LINEAGE).read_text())["steps"][0]
    assert record["step"] == 7 and record["loss"] == 1.5
    with pytest.raises(ModelLoadError, match="another model's"):
        weights.load_weights(zoo.build("llama-tiny"), tmp_path / "w")


def test_a_hugging_face_models_weights_are_a_directory_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    prog = bmc.compile(f"hf:{tmp_path / 'src'}", passes="dce")
    with torch.no_grad():
        for p in prog.parameters():
            p.add_(0.01)  # not the checkpoint it came from
    out = prog.save_weights(str(tmp_path / "out"), source=str(tmp_path / "src"), shard_bytes=16 << 10)
    assert os.path.isfile(os.path.join(out, "config.json"))
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    full = prog.full_state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    ids = torch.randint(0, 96, (2, 8))
    again = bmc.compile(f"hf:{out}", passes="dce")  # bmc reads it as it reads any checkpoint
    assert torch.equal(again(input_ids=ids).logits, prog(input_ids=ids).logits)


def _torch_greedy(prog, prompt, steps):
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, prog(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(prompt):].tolist()


def test_a_build_from_exported_weights_generates_what_the_torch_program_does(tmp_path):
    """The path a trained model takes to serving: zero3 on 2 ranks, its weights exported, an
    fp32 ort-paged build made from them (bmc.compile(..., weights=)); greedy tokens equal
    the trained torch program's."""
    run_ranks(2, _export, "zero3", str(tmp_path / "w"))
    trained = bmc.compile("zoo:gpt-tiny", weights=str(tmp_path / "w"), dynamic=True)
    _same_as_full_state(_read(tmp_path / "w"), trained.full_state_dict())
    served = bmc.compile("zoo:gpt-tiny", weights=str(tmp_path / "w"), dynamic=True, backend="ort-paged",
                         directory=str(tmp_path / "served"))
    prompt = [5, 3, 9, 1]
    assert served.generate([prompt], 12) == [_torch_greedy(trained, prompt, 12)]
    # its lineage: the weights' step (written by 2 ranks under zero3), then the build made from them
    from bmc.lineage import check_chain
    from bmc.cli.run import main as run_main
    lineage = bmc.load(str(tmp_path / "served")).lineage
    assert [s["kind"] for s in lineage] == ["weights", "build"] and not check_chain(lineage)
    assert lineage[0]["pipeline"] == "zero{stage=3}" and lineage[0]["world_size"] == 2
    assert run_main([str(tmp_path / "served"), "--info"]) == 0
    manifest_path = tmp_path / "served" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["lineage"][0]["files"]["model.safetensors"] = "0" * 64  # a record that is not what the build read
    manifest_path.write_text(json.dumps(manifest))
    assert check_chain(bmc.load(str(tmp_path / "served")).lineage)
    assert run_main([str(tmp_path / "served"), "--info"]) == 1


def test_bmc_opt_reads_weights_directories_and_training_checkpoints(tmp_path, capsys):
    from bmc.cli.opt import main
    prog = _trained_program("dce")
    prog.save_weights(str(tmp_path / "w"))
    checkpoint.save(tmp_path / "ckpt", prog, prog.optimizer(torch.optim.AdamW), step=1)
    for source in (tmp_path / "w", tmp_path / "ckpt", tmp_path / "ckpt" / "step-00000001"):
        out = tmp_path / f"{source.name}.pt2"
        assert main(["zoo:gpt-tiny", "--weights", str(source), "--pass=dce", "-o", str(out)]) == 0
        loaded = bmc.load(str(out))
        for name, tensor in prog.full_state_dict().items():
            assert torch.equal(loaded.full_state_dict()[name], tensor), (source, name)
    assert main(["zoo:gpt-tiny", "--weights", str(tmp_path), "--pass=dce"]) == 2
    assert "neither a weights directory" in capsys.readouterr().err


def test_a_config_alone_and_trained_weights_make_the_model(tmp_path):
    """An hf: directory with config.json only (what --hf-config trains from) takes weights=."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "src")
    prog = bmc.compile(f"hf:{tmp_path / 'cfg'}", passes="dce", weights=str(tmp_path / "src"))
    ids = torch.randint(0, 96, (1, 6))
    torch.testing.assert_close(prog(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(bmc.BmcError, match="loads into an nn.Module, zoo:NAME or hf:DIR"):
        bmc.compile(str(tmp_path / "x.pt2"), weights=str(tmp_path / "src"))


# -m slow: CI's 20 minutes are full; test_train's lineage test keeps lineage in CI
@pytest.mark.slow
def test_a_pt2_program_carries_the_lineage_of_its_weights(tmp_path, capsys):
    """bmc-opt --weights ... -o prog.pt2 records the compile as a step; a build made from the
    archive goes on from it."""
    from bmc.cli.opt import main
    from bmc.lineage import check_chain
    _trained_program("dce").save_weights(str(tmp_path / "w"))
    assert main(["zoo:gpt-tiny", "--weights", str(tmp_path / "w"), "--pass=quant-int8", "-o",
                 str(tmp_path / "p.pt2")]) == 0
    program = bmc.load(str(tmp_path / "p.pt2"))
    assert [s["kind"] for s in program.lineage] == ["weights", "compile"]
    assert program.lineage[1]["statistics"]["quant-int8"]["quantized"] > 0
    assert main([str(tmp_path / "p.pt2"), "--backend=ort-paged", "-o", str(tmp_path / "served")]) == 0
    lineage = bmc.load(str(tmp_path / "served")).lineage
    assert [s["kind"] for s in lineage] == ["weights", "compile", "build"] and not check_chain(lineage)
