"""tools/train.py: trains, logs, checkpoints, survives a killed rank under torchrun, and
refuses bad input in one line."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]
SMALL = ["--model", "gpt-tiny", "--batch", "4", "--seq", "32", "--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args, out, restarts=0):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={restarts}", str(ROOT / "tools" / "train.py"), *SMALL, "--out", str(out), *args]
    # torch issue #135712: restarted workers may read the dead attempt's addresses otherwise
    return subprocess.run(command, env=_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), capture_output=True,
                          text=True, timeout=300)


def _losses(out):
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the restarted gloo ranks aborted once in five CI runs on this 2-core machine (exit -6
# during torchrun's restart); it passes alone every time; kept out of CI until that is understood
def test_a_killed_rank_resumes_from_the_last_checkpoint_and_ends_at_the_same_loss(tmp_path):
    common = ["--pass", "zero2", "--steps", "9", "--ckpt-every", "3"]
    plain = _torchrun(common, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    faulty = _torchrun([*common, "--simulate-failure", "5", "--failure-rank", "1"], tmp_path / "faulty", restarts=1)
    assert faulty.returncode == 0, faulty.stderr[-2000:]
    assert "rank 1 kills itself at step 5" in faulty.stderr
    assert "resumed from" in faulty.stderr and "step-00000003" in faulty.stderr
    want, got = _losses(tmp_path / "plain"), _losses(tmp_path / "faulty")
    assert [r["step"] for r in got] == list(range(9)), "every step logged exactly once"
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    summary = json.loads((tmp_path / "faulty" / "summary.json").read_text())
    assert summary["final_loss"] == json.loads((tmp_path / "plain" / "summary.json").read_text())["final_loss"]


def test_one_process_trains_and_resumes(tmp_path):
    args = [*TRAIN, *SMALL, "--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path)]
    first = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "measured" in first.stderr and "predicted" in first.stderr
    more = subprocess.run([*args[:-4], "--steps", "6", "--trace-step", "5", "--out", str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed at step 4" in more.stderr
    assert [r["step"] for r in _losses(tmp_path)] == list(range(6))
    # the profiled step as a Chrome trace: forward, backward and the optimizer's ops in it
    trace = json.loads((tmp_path / "trace-step-5-rank-0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {"aten::linear", "aten::addmm"} & names and any("Optimizer.step" in n or "adam" in n.lower() for n in names)


def test_hugging_face_model_from_a_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=64, intermediate_size=128, vocab_size=256,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config.save_pretrained(tmp_path / "cfg")
    run = subprocess.run([*TRAIN, "--hf-config", str(tmp_path / "cfg"), "--batch", "2", "--seq", "16",
                          "--steps", "3", "--pass", "amp{dtype=bf16},ckpt", "--no-progress", "--out", str(tmp_path)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(_losses(tmp_path)) == 3
    # the trained weights as a Hugging Face directory (config carried along) that transformers reads
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "weights")
    record = json.loads((tmp_path / "weights" / "lineage.json").read_text())["steps"][0]
    assert model.config.num_hidden_layers == 2 and record["weights"] == "fp32 masters"  # not their bf16 rounding
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -m slow: CI's 20 minutes are full; test_the_lineage_runs_from_the_training_run_to_the_build keeps lineage in CI
@pytest.mark.slow
def test_training_on_from_an_exported_run_continues_its_lineage(tmp_path):
    """--hf DIR of a run's exported weights: the new run's lineage starts with the first run."""
    transformers = pytest.importorskip("transformers")
    from bmc.lineage import check_chain
    config = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=32, intermediate_size=64, vocab_size=256,
                                      max_position_embeddings=32)
    config.save_pretrained(tmp_path / "cfg")
    common = ["--batch", "2", "--seq", "16", "--steps", "2", "--no-progress"]
    first = subprocess.run([*TRAIN, "--hf-config", str(tmp_path / "cfg"), *common, "--out", str(tmp_path / "a")],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*TRAIN, "--hf", str(tmp_path / "a" / "weights"), *common, "--out", str(tmp_path / "b")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = json.loads((tmp_path / "b" / "weights" / "lineage.json").read_text())["steps"]
    assert [s["kind"] for s in steps] == ["train", "train"] and not check_chain(steps)


def test_hugging_face_checkpoint_directory_trains_from_its_weights(tmp_path):
    """--hf DIR reads the weights: the first step's loss is the saved model's on that batch."""
    pytest.importorskip("transformers")
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_models
    from bmc.models import data
    model = hf_models.build("llama", seed=3)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    run = subprocess.run([*TRAIN, "--hf", str(tmp_path / "ckpt"), "--batch", "2", "--seq", "16", "--steps", "2",
                          "--no-progress", "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    x, _ = data.Batches(data.split(data.text_tokens()).train, 2, 16, seed=0).local(0)
    with torch.no_grad():
        expected = model(input_ids=x, labels=x).loss.item()
    assert abs(_losses(tmp_path)[0]["loss"] - expected) < 1e-5
    refused = subprocess.run([*TRAIN, "--hf", str(tmp_path), "--no-progress", "--out", str(tmp_path / "x")],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "has no config.json" in refused.stderr, refused.stderr[-2000:]


def _bpe(vocab: int):
    import sysconfig
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    stdlib = sysconfig.get_paths()["stdlib"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train([os.path.join(stdlib, n) for n in ("textwrap.py", "string.py")],
                    trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"]))
    return tokenizer


@pytest.mark.slow  # 21 s, to -m slow: CI's 20 minutes are full
def test_a_checkpoint_with_a_tokenizer_trains_on_its_tokens(tmp_path):
    """--hf DIR with a tokenizer.json: the batches are its ids (the first step's loss is the
    saved model's on the tokenized text), and a tokenizer with ids past the model's vocabulary
    is refused in one line."""
    pytest.importorskip("transformers")
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_models
    from bmc.models import data
    model = hf_models.build("llama", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer = _bpe(200)
    tokenizer.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    run = subprocess.run([*TRAIN, "--hf", str(tmp_path / "ckpt"), "--batch", "2", "--seq", "16", "--steps", "1",
                          "--no-progress", "--out", str(tmp_path / "run")], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens = data.tokenized(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert len(tokens) < 0.8 * len(data.text_tokens())  # BPE ids (merged pairs), not bytes
    x, _ = data.Batches(data.split(tokens).train, 2, 16, seed=0).local(0)
    with torch.no_grad():
        expected = model(input_ids=x, labels=x).loss.item()
    assert abs(_losses(tmp_path / "run")[0]["loss"] - expected) < 1e-5
    _bpe(400).save(str(tmp_path / "ckpt" / "tokenizer.json"))  # ids past the model's 256 rows
    refused = subprocess.run([*TRAIN, "--hf", str(tmp_path / "ckpt"), "--no-progress", "--out", str(tmp_path / "x")],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "past the model's vocab_size 256" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("args, env, message", [
    (["--batch", "3"], {"WORLD_SIZE": "2"}, "--batch 3 does not divide over 2 ranks"),
    (["--pass", "zero{stage=4}"], {}, "'stage' of pass 'zero' expects one of 1|2|3"),
    (["--steps", "0"], {}, "--steps must be >= 1"),
    (["--text", "/no/such/file"], {}, "cannot read the text file /no/such/file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, message):
    run = subprocess.run([*TRAIN, *SMALL, "--out", str(tmp_path), *args], env={**_env(), **env},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    base = [*TRAIN, "--batch", "2", "--seq", "16", "--no-progress", "--out", str(tmp_path), "--steps", "2"]
    assert subprocess.run([*base, "--model", "gpt-tiny"], env=_env(), capture_output=True, timeout=300).returncode == 0
    run = subprocess.run([*base, "--model", "llama-tiny"], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "written for another model" in run.stderr and "Traceback" not in run.stderr


COMMON = ["--steps", "3", "--ckpt-every", "0"]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    one = subprocess.run([*TRAIN, *SMALL, *COMMON, "--out", str(out)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    return _losses(out)


def _check_exported_weights(out: Path, pipeline: str, last_loss: float) -> None:
    """The run's weights directory holds its final checkpoint's weights, with its lineage."""
    from bmc.models import weights, zoo
    import torch
    from_weights, from_checkpoint = zoo.build("gpt-tiny", seed=5), zoo.build("gpt-tiny", seed=6)
    weights.load_weights(from_weights, out / "weights")
    weights.load_weights(from_checkpoint, out / "checkpoints")
    for name, tensor in from_weights.state_dict().items():
        assert torch.equal(tensor, from_checkpoint.state_dict()[name]), name
    record = json.loads((out / "weights" / "lineage.json").read_text())["steps"][0]
    assert record["kind"] == "train" and record["steps"] == 3 and record["world_size"] == 2
    assert record["pipeline"] == pipeline and abs(record["final_loss"] - last_loss) < 1e-5
    assert record["held_out_loss"] > 0 and record["model"] == "zoo:gpt-tiny"


def test_the_lineage_runs_from_the_training_run_to_the_build(tmp_path, capsys):
    """Trained on 2 ranks, built int8 for serving from the run's directory: `bmc run --info`
    shows both steps, the build tied to the weights the run wrote."""
    from bmc.cli.opt import main as opt_main
    from bmc.cli.run import main as run_main
    run = _torchrun([*COMMON, "--pass", "zero3"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert opt_main(["zoo:gpt-tiny", "--weights", str(tmp_path / "run"), "--pass=quant-int8", "--eval",
                     "--backend=ort-paged", "-o", str(tmp_path / "served")]) == 0
    capsys.readouterr()
    assert run_main([str(tmp_path / "served"), "--info"]) == 0
    shown = capsys.readouterr().out
    assert "1. train: " in shown and "pipeline=zero3" in shown and "world_size=2" in shown
    assert "2. build: " in shown and "quant-int8: quantized=" in shown and "eval on " in shown
    assert "made from step 1: yes" in shown


@pytest.mark.parametrize("pipeline", ["tp2", "pp{stages=2,microbatches=2}"])
def test_tensor_or_pipeline_parallel_under_torchrun_matches_one_process(tmp_path, pipeline, one_process_losses):
    """tp2 or pp2 on 2 ranks: both ranks read the same rows (one replica), and the losses
    equal a one-process run's."""
    run = _torchrun([*COMMON, "--pass", pipeline], tmp_path / "par")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "par" / "checkpoints" / "latest").is_file(), "tp and pp runs checkpoint too"
    if pipeline == "tp2":  # a rank's half of the split weights, predicted as measured (was 2x off)
        assert re.search(r"params\s+([\d,]+)\s+\1\s+1\.000", run.stderr), run.stderr[-3000:]
    got_losses = _losses(tmp_path / "par")
    _check_exported_weights(tmp_path / "par", pipeline, got_losses[-1]["loss"])
    assert len(got_losses) == len(one_process_losses) > 0, "every step logged"
    for got, want in zip(got_losses, one_process_losses):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got, want)


# zero3,ckpt with -m slow: zero3 under torchrun is trained in tests of its own (data_parallel, roundtrip)
@pytest.mark.parametrize("pipeline", [pytest.param("zero3,ckpt", marks=pytest.mark.slow), "tp2"])
def test_a_program_saved_by_bmc_opt_trains_under_torchrun_as_compiling_in_the_script(pipeline, tmp_path):
    program = tmp_path / "program.pt2"
    # traced with its targets (the zoo model then returns the loss), batch and sequence dynamic
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "bmc-opt"), "zoo:gpt-tiny", "--example-inputs",
                           "i64[2,32],i64[2,32]", f"--pass={pipeline}", "--world-size", "2", "-o", str(program)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    steps = ["--steps", "5", "--ckpt-every", "0"]
    compiled = _torchrun(["--pass", pipeline, *steps], tmp_path / "compiled")
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    loaded = _torchrun(["--program", str(program), *steps], tmp_path / "loaded")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    want, got = _losses(tmp_path / "compiled"), _losses(tmp_path / "loaded")
    assert len(got) == 5
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(want, got)) <= 1e-6, (want, got)


def test_a_finished_run_started_again_says_so_and_writes_valid_json(tmp_path):
    base = [*TRAIN, "--model", "gpt-tiny", "--batch", "2", "--seq", "16", "--no-progress", "--out", str(tmp_path),
            "--steps", "2"]
    first = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    loss = json.loads((tmp_path / "summary.json").read_text())["final_loss"]
    again = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing left to train" in again.stderr
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["final_loss"] == loss  # the checkpoint's last loss, not NaN


def test_resuming_another_pipeline_is_refused_unless_resharding_is_asked(tmp_path):
    base = [*TRAIN, "--model", "gpt-tiny", "--batch", "2", "--seq", "16", "--no-progress", "--out", str(tmp_path)]
    assert subprocess.run([*base, "--steps", "2"], env=_env(), capture_output=True, timeout=300).returncode == 0
    refused = subprocess.run([*base, "--steps", "3", "--pass", "ckpt"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "holds a run of pipeline 'dce' on 1 ranks, this one is 'insert-remat{policy=block}' on 1: pass --reshard to "
        "resume it resharded, --no-resume or another --out to start over"), refused.stderr
    resumed = subprocess.run([*base, "--steps", "3", "--pass", "ckpt", "--reshard"], env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in _losses(tmp_path)] == [0, 1, 2]


def test_a_missing_hf_config_is_named(tmp_path):
    run = subprocess.run([*TRAIN, "--hf-config", str(tmp_path / "config.json"), "--no-progress", "--out",
                          str(tmp_path / "x")], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"--hf-config {tmp_path / 'config.json'}: no such file" in run.stderr


def test_the_default_run_directory_is_per_kind_and_ignored_by_git():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = train.parse_args(["--model", "gpt-mini"])
    one, other = train.default_out(args, "zero3,ckpt", 2), train.default_out(args, "dp", 2)
    assert one == ROOT / "runs" / "gpt-mini-zero3-ckpt-2ranks" and one != other
    ignored = subprocess.run(["git", "check-ignore", "-q", str(one / "loss.jsonl")], cwd=ROOT)
    assert ignored.returncode == 0
