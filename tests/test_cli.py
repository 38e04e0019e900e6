"""bmc-opt end to end: outputs, round trips, and every user-facing error (one line, exit 2,
no traceback, nothing written)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bmc
from bmc.models import zoo
from bmc.cli.opt import main
from untraceable_model import Untraceable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BMC_OPT = os.path.join(ROOT, "tools", "bmc-opt")


def bmc_opt(*args, cwd=None):
    # tests/ on the path so pickles of test modules load in the subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, BMC_OPT, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.pt2").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    (d / "text.pt2").write_text("hello")
    torch.save(zoo.build("gpt-tiny"), d / "model.pt")
    torch.save(Untraceable(), d / "untraceable.pt")
    (d / "no-config").mkdir()
    (d / "pickled").mkdir()
    (d / "pickled" / "config.json").write_text('{"model_type": "llama"}')
    (d / "pickled" / "pytorch_model.bin").write_bytes(b"never unpickled")
    return d


BAD_INPUTS = {
    "unknown pass": (["zoo:gpt-tiny", "--pass=dcee"], r"unknown pass 'dcee'; did you mean dce\?"),
    "malformed pipeline": (["zoo:gpt-tiny", "--pass=dce{drop_unused_params=true"], r"at column 28"),
    "wrong option type": (["zoo:gpt-tiny", "--pass=dce{drop_unused_params=2}"], r"expects true\|false, got '2'"),
    "unknown model": (["zoo:gpt-tyni"], r"unknown model 'gpt-tyni'; did you mean gpt-tiny"),
    "missing file": (["{d}/nope.pt2"], r"model file '.*nope.pt2' not found"),
    "corrupt file": (["{d}/corrupt.pt2"], r"not a torch.export archive"),
    "text file": (["{d}/text.pt2"], r"not a torch.export archive"),
    "pickle without trust": (["{d}/model.pt"], r"refusing to unpickle .*--trust-pickle"),
    "untraceable model": (["{d}/untraceable.pt", "--trust-pickle", "--example-inputs", "f32[2,4]"],
                          r"cannot trace Untraceable: .*untraceable_model.py:\d+ .*hint: .*torch.cond"),
    "bad world size": (["zoo:gpt-tiny", "--world-size", "6", "--tp", "4"], r"not divisible by tp\*pp = 4"),
    "bad flag": (["zoo:gpt-tiny", "--frobnicate"], r"unrecognized arguments: --frobnicate"),
    "bad output suffix": (["zoo:gpt-tiny", "-o", "{d}/out.onnx"], r"must end in .pt2"),
    "hf dir without config": (["hf:{d}/no-config"], r"hf:.*no-config has no config.json: .*save_pretrained"),
    "hf dir of pickles": (["hf:{d}/pickled"], r"only as pickles \(pytorch_model.bin\), which bmc never loads.*"
                                              r"convert them to safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_files, tmp_path):
    args, pattern = BAD_INPUTS[case]
    args = [a.replace("{d}", str(bad_files)) for a in args]
    out, dumps = tmp_path / "out.pt2", tmp_path / "dumps"
    if "-o" not in args:
        args += ["-o", str(out)]
    result = bmc_opt(*args, "--dump-dir", str(dumps), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bmc-opt: error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists() and not dumps.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_trusted_pickle_loads(bad_files):
    result = bmc_opt(str(bad_files / "model.pt"), "--trust-pickle", "--pass=verify")
    assert result.returncode == 0, result.stderr
    assert "#1 verify" in result.stdout


def test_main_job_prints_pipeline_passes_and_memory_table():
    out = bmc_opt("zoo:gpt-tiny", "--world-size", "8", "--report", "--analyze", "--timing", "--pass-statistics")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("pipeline: dce,shape-prop,annotate-cost,verify\n")
    assert re.search(r"#1 dce\s+(changed|no change)", text)
    assert "where the memory goes, per rank" in text and "ZeRO-3" in text
    assert "blocks: transformer.h (2)" in text
    assert "pass timing:" in text and "pass statistics:" in text


def test_output_round_trips_through_bmc_opt_and_bmc_load(tmp_path):
    out = tmp_path / "gpt.pt2"
    first = bmc_opt("zoo:gpt-tiny", "--pass=dce,annotate-cost", "-o", str(out))
    assert first.returncode == 0 and out.exists(), first.stderr
    again = bmc_opt(str(out), "--pass=verify", "-o", str(tmp_path / "again.pt2"))
    assert again.returncode == 0, again.stderr
    program = bmc.load(str(tmp_path / "again.pt2"))
    model = zoo.build("gpt-tiny")  # same seed: same weights as the one bmc-opt built
    (x,) = model.example_inputs()
    torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)
    assert bmc.load(str(out)).pipeline == "dce,annotate-cost"


def test_dump_dir_writes_one_readable_file_per_pass(tmp_path):
    dumps = tmp_path / "dumps"
    result = bmc_opt("zoo:llama-tiny", "--pass=dce,shape-prop,annotate-cost", "--dump-dir", str(dumps))
    assert result.returncode == 0, result.stderr
    txt = sorted(f for f in os.listdir(dumps) if f.endswith(".txt"))
    assert txt == ["00-input.txt", "01-dce.txt", "02-shape-prop.txt", "03-annotate-cost.txt"]
    body = (dumps / "03-annotate-cost.txt").read_text()
    assert "aten.scaled_dot_product_attention" in body and "f32[B, 4, S, 16]" in body
    assert "@model.layers.0.self_attn" in body


def test_dump_dir_says_when_it_cannot_draw_svg(tmp_path, monkeypatch, caplog):
    from bmc.passmgr import instruments
    monkeypatch.setattr(instruments.shutil, "which", lambda name: None)  # no Graphviz
    with caplog.at_level("WARNING"):
        assert main(["zoo:gpt-tiny", "--pass=dce", "--dump-dir", str(tmp_path / "dumps")]) == 0
    notices = [r for r in caplog.records if "no .svg" in r.getMessage()]
    assert len(notices) == 1 and "install graphviz" in notices[0].getMessage()
    assert sorted(os.listdir(tmp_path / "dumps")) == ["00-input.dot", "00-input.txt", "01-dce.dot", "01-dce.txt"]


def test_a_missing_model_file_says_how_to_make_one(tmp_path):
    result = bmc_opt("model.pt2", "--pass=dce", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bmc-opt: error: model file 'model.pt2' not found; write one with `bmc-opt zoo:NAME -o model.pt2` "
        "(or hf:DIR), prog.save('model.pt2') or torch.export.save"]


def test_bmc_help_lists_the_commands_and_an_unknown_one_is_named(monkeypatch, capsys):
    from bmc.__main__ import entry
    monkeypatch.setattr(sys, "argv", ["bmc", "--help"])
    assert entry() == 0
    out = capsys.readouterr().out
    assert "bmc run DIR --prompt TEXT" in out and "bmc-opt MODEL" in out and "--backend=ort-paged" in out
    monkeypatch.setattr(sys, "argv", ["bmc", "serve"])
    assert entry() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'serve'" in err


def test_print_ir_and_list_passes(capsys):
    assert main(["zoo:gpt-tiny", "--pass=dce,verify", "--print-ir-after=verify"]) == 0
    text = capsys.readouterr().out
    assert text.count("IR Dump After") == 1 and "After verify (#2)" in text
    # the costs annotate-cost puts on each node are in the printed IR, in B and S
    assert main(["zoo:gpt-tiny", "--pass=annotate-cost", "--print-ir-after=annotate-cost"]) == 0
    linear = next(ln for ln in capsys.readouterr().out.splitlines() if "= aten.linear(" in ln)
    assert re.search(r"\{bmc.cost=flops=\d+\*B\*S, saved=\d+\*B\*S bytes\}", linear), linear
    assert main(["--list-passes"]) == 0
    listing = capsys.readouterr().out
    assert "annotate-cost" in listing and "cleanup" in listing


@pytest.mark.slow  # planning llama3-8b from its config alone covers it in CI
def test_planning_llama_7b_on_meta_stays_small():
    """The issue's check: a 7B plan on the meta device, peak RSS under 3 GB; and the 7.5e9
    model's table shows the ZeRO paper's figures."""
    result, peak_gib = _bmc_opt_peak("zoo:llama-7b", "--world-size", "64", "--pass=dce,annotate-cost,verify",
                                     "--report", "--dtype", "fp16", "--seq", "2048")
    assert "parameters 6,738,415,616" in result.stdout
    assert peak_gib < 3, f"peak RSS {peak_gib:.2f} GiB"


def _bmc_opt_peak(*args):
    """bmc-opt in a process of its own, and that process's peak RSS in GiB, as it reports it
    on exit (RUSAGE_CHILDREN would be the largest of every test's children so far)."""
    code = ("import resource, sys; from bmc.cli.opt import main; rc = main(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return result, int(result.stdout.split("maxrss")[-1]) / 2**20


@pytest.mark.slow  # 20-26 s, to -m slow: CI's 20 minutes are full
def test_planning_llama3_8b_from_its_config_alone_stays_small(tmp_path):
    """hf:DIR with a config.json alone (Llama-3-8B's shape): planned on the meta device, no
    weight allocated; peak RSS measured (0.44 GiB here) and bounded."""
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    result, peak_gib = _bmc_opt_peak(f"hf:{tmp_path}", "--world-size", "8", "--report", "--seq", "2048")
    assert "LlamaForCausalLM" in result.stdout and "parameters 8,030,261,248 (bf16" in result.stdout
    assert peak_gib < 1.5, f"peak RSS {peak_gib:.2f} GiB"


@pytest.mark.parametrize("pipeline, world", [("amp{dtype=bf16},ckpt", "1"),
                                             pytest.param("zero3", "2", marks=pytest.mark.slow)])
def test_measure_prints_measured_bytes_beside_the_prediction(pipeline, world):
    run = bmc_opt("zoo:gpt-tiny", f"--pass={pipeline}", "--world-size", world, "--batch", "2", "--seq", "32",
                  "--measure")
    assert run.returncode == 0, run.stderr
    table = run.stdout[run.stdout.index(f"rank 0 of {world}"):].splitlines()[1:5]
    for line in table:
        part, measured, predicted, ratio = line.split()
        assert abs(float(ratio) - 1) <= 0.02, line  # model states exact up to a few scalars


def test_measure_needs_real_weights():
    run = bmc_opt("zoo:gpt-tiny", "--measure", "--device", "meta")
    assert run.returncode == 2 and "needs real weights" in run.stderr


def test_tp_plan_shows_per_rank_parameters_without_processes():
    from bmc.models import zoo
    model = zoo.build("gpt-tiny")
    split_names = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_fc.bias", "mlp.c_proj.weight")
    split = sum(p.numel() for n, p in model.named_parameters() if n.endswith(split_names))
    whole = sum(p.numel() for p in model.parameters())
    local = whole - split // 2
    run = bmc_opt("zoo:gpt-tiny", "--pass=tp2", "--world-size", "2", "--report", "--print-ir-after=insert-collectives")
    assert run.returncode == 0, run.stderr
    assert f"parameters {whole:,} (f32), {local:,} on each rank" in run.stdout and "(dp=1 tp=2 pp=1)" in run.stdout
    # the bytes a rank holds: its half of the split weights and all of the rest, 4 bytes each
    # (the graph's shapes are a rank's: dividing them by the degree again once halved them)
    from bmc.cli.report import _gb
    row = next(ln for ln in run.stdout.splitlines() if ln.strip().startswith("parameters ") and "(f32)" not in ln)
    assert row.split()[1:3] == _gb(local * 4).split(), row
    assert f"Ψ_rank = {local:,} parameters ({split:,}/N_t + {whole - split:,}; N_t = 2" in run.stdout
    assert "bmc.copy_to_group(%layer_norm, 'tp')" in run.stdout and "bmc.reduce_from_group(" in run.stdout
    assert "{bmc.shard=[tp:partial]}" in run.stdout  # what tp recorded and insert-collectives read
    clash = bmc_opt("zoo:gpt-tiny", "--pass=tp2", "--world-size", "4", "--tp", "4")
    assert clash.returncode == 2 and "contradicts the pipeline's tp{degree=2}" in clash.stderr


def test_3d_plan_shows_each_stage_its_ranks_memory_and_graph(tmp_path):
    run = bmc_opt("zoo:gpt-tiny", "--pass=tp2,zero1,pp{stages=2}", "--world-size", "8", "--report",
                  "--dump-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "(dp=2 tp=2 pp=2)" in run.stdout and "pipeline stages: pp=2" in run.stdout
    stage_rows = re.findall(r"^  ([01]) +(\d-\d) +(\d-\d) +([\d,]+)", run.stdout, re.M)
    assert [(s, blocks, ranks) for s, blocks, ranks, _ in stage_rows] == [("0", "0-0", "0-3"), ("1", "1-1", "4-7")]
    stage1 = (tmp_path / "stage-1.txt").read_text()
    assert stage1.startswith("graph pipeline stage 1 of 2")
    assert "param transformer.h.1." in stage1 and "transformer.h.0." not in stage1
    clash = bmc_opt("zoo:gpt-tiny", "--pass=pp{stages=2}", "--world-size", "4", "--pp", "4")
    assert clash.returncode == 2 and "contradicts the pipeline's pp{stages=2}" in clash.stderr


# ------------------------------------------------------------------ --weights, --calibration, --eval
# In-process (main) rather than subprocesses: each bmc-opt process costs ~5 s of imports.


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    from bmc.models.trained import save_weights
    d = tmp_path_factory.mktemp("weights")
    save_weights(zoo.build("gpt-tiny", seed=1), d / "seed1.safetensors")  # not the seed bmc-opt builds with
    save_weights(zoo.build("llama-tiny"), d / "llama.safetensors")
    torch.save(zoo.build("gpt-tiny").state_dict(), d / "pickled.pt")
    return d


def _eval_rows(text):
    rows = {}
    for line in text[text.index("held-out evaluation"):].splitlines()[3:]:
        *name, ppl, change, cosine, weights, nbytes = line.split()
        rows[" ".join(name)] = (float(ppl), float(cosine), int(weights.replace(",", "")), int(nbytes.replace(",", "")))
    return rows


def test_eval_scores_loaded_weights_before_and_after_the_pipeline(weight_files, capsys):
    from bmc.compress import evaluate
    assert main(["zoo:gpt-tiny", "--weights", str(weight_files / "seed1.safetensors"), "--pass=quant-int8",
                 "--eval"]) == 0
    rows = _eval_rows(capsys.readouterr().out)
    assert list(rows) == ["original", "quant-int8"]
    expected = evaluate.perplexity(zoo.build("gpt-tiny", seed=1).eval(), evaluate.EvalData.held_out(seq=64))
    assert rows["original"][0] == pytest.approx(expected, abs=1e-4)  # the file's weights, scored on 64-token windows
    ppl, cosine, weights, nbytes = rows["quant-int8"]
    assert cosine > 0.999 and abs(ppl / expected - 1) < 0.01
    assert weights == rows["original"][2] and nbytes < 0.5 * rows["original"][3]  # int8 weights still count


def test_calibration_batches_reach_taylor_head_scores(capsys):
    assert main(["zoo:gpt-tiny", "--static", "--calibration", "builtin", "--calibration-batches", "2",
                 "--pass=prune-heads{score=taylor,ratio=0.5}"]) == 0
    assert "heads-removed=4" in capsys.readouterr().out


COMPRESSION_BAD_INPUTS = {
    "taylor without calibration": (["zoo:gpt-tiny", "--static", "--pass=prune-heads{score=taylor}"],
                                   r"needs calibration data: .*--calibration FILE\|builtin"),
    "calibration of the wrong shape": (["zoo:gpt-tiny", "--static", "--seq", "32", "--calibration", "builtin"],
                                       r"size 32 on dim 1 where the graph was traced with a fixed 16"),
    "missing calibration text": (["zoo:gpt-tiny", "--calibration", "{d}/nope.txt"],
                                 r"--calibration .*nope.txt: no such"),
    "missing eval text": (["zoo:gpt-tiny", "--eval", "--eval-text", "{d}/nope.txt"], r"--eval-text .*: no such file"),
    "eval on meta": (["zoo:gpt-tiny", "--eval", "--device", "meta"], r"--eval needs real weights"),
    "check on meta": (["zoo:gpt-tiny", "--check", "--device", "meta"], r"--check needs real weights"),
    "eval of an encoder": (["zoo:bert-tiny", "--static", "--eval"],
                           r"--eval scores causal language models: this model returns \[2, 16, 64\]"),
    "weights that do not fit": (["zoo:gpt-tiny", "--weights", "{d}/llama.safetensors"],
                                r"llama.safetensors: .* is not a weight of this model; the weights are another "
                                r"model's \(zoo gpt-tiny\)"),
    "pickled weights": (["zoo:gpt-tiny", "--weights", "{d}/pickled.pt"], r"give a .safetensors file, .*refused"),
    "weights for an archive": (["{d}/model.pt2", "--weights", "trained"], r"--weights loads into zoo: and hf: models"),
}


@pytest.mark.parametrize("case", sorted(COMPRESSION_BAD_INPUTS))
def test_compression_flags_refuse_bad_input_in_one_line(case, weight_files, capsys):
    args, pattern = COMPRESSION_BAD_INPUTS[case]
    assert main([a.replace("{d}", str(weight_files)) for a in args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmc-opt: error: ") and re.search(pattern, lines[0]), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_check_reports_the_contract_and_exits_1_on_a_mismatch(capsys):
    """--check in one process: amp within its stated bound (exit 0); a pass that breaks the
    function (exit 1) with the first wrong node named."""
    assert main(["zoo:llama-tiny", "--pass=amp", "--check"]) == 0
    out = capsys.readouterr().out
    assert "contract: amp: bf16 compute (8-bit mantissa): relative error <= 3e-02" in out
    assert re.search(r"output 0 \[2, 16, 256\]: max abs \S+, rel \S+  ok", out) and "verdict: same function" in out

    from bmc.passmgr import PassResult, register_pass, unregister
    from bmc.passmgr.manager import Pass

    @register_pass("negate-one")
    class NegateOne(Pass):
        """Negate the first residual add's output (a broken rewrite)."""

        def run(self, gm):
            add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor and n.args[0].op != "get_attr"
                       and len(n.users) > 1)
            with gm.graph.inserting_after(add):
                neg = gm.graph.call_function(torch.ops.aten.neg.default, (add,))
            add.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
            neg.meta["val"] = add.meta["val"]
            return PassResult(gm, True)

    try:
        assert main(["zoo:llama-tiny", "--pass=negate-one", "--check"]) == 1
    finally:
        unregister("negate-one")
    out = capsys.readouterr().out
    assert "verdict: MISMATCH" in out and "made by: negate-one" in out, out

    # a pipelined program runs on its ranks; the stages' values are compared too
    assert main(["zoo:gpt-tiny", "--pass=pp{stages=2}", "--world-size", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "on 2 gloo ranks (pp=2, 2 microbatches)" in out and "every node's value within the bound" in out, out


def test_ort_paged_build_is_served_by_bmc_run(tmp_path, capsys):
    from bmc.cli import run as serve
    out_dir = tmp_path / "served"
    assert main(["zoo:gpt-tiny", "--device", "cpu", "--pass=quant-int8", "--backend=ort-paged", "-o", str(out_dir),
                 "--check"]) == 0
    captured = capsys.readouterr()
    assert "serve it with: bmc run" in captured.out
    # --check holds the graph (torch) and then the build (ONNX Runtime) to quant-int8's bound
    assert captured.out.count("verdict: same function within the contract") == 2
    assert re.search(r"check quant-int8 on ONNX Runtime .*\n.*relative error <= 4e-02\n  output 0 \[2, 16, 256\]: "
                     r"max abs \S+, rel \S+  ok", captured.out), captured.out
    assert "bmc-opt: note: zoo:gpt-tiny has random weights (no --weights): the build serves them" in captured.err
    assert (out_dir / "manifest.json").exists() and not list(tmp_path.glob(".bmc-staging-*"))
    assert serve.main([str(out_dir), "--prompt", "def ", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "2 blocks resident" in captured.err and "5 tokens in" in captured.err
    assert serve.main([str(out_dir), "--prompt", "x", "--budget", "10K"]) == 2
    picture = tmp_path / "paging.png"  # streamed blocks' page-ins: tests/backends/test_ort_paged.py
    assert serve.main([str(out_dir), "--prompt", "x", "--max-tokens", "3", "--plot", str(picture)]) == 0
    assert f"wrote {picture}" in capsys.readouterr().err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert serve.main([str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["zoo:gpt-tiny", "--backend=ort-paged"]) == 2
    assert "give it with -o DIR" in capsys.readouterr().err
    encoder_dir = tmp_path / "encoder"
    assert main(["zoo:bert-tiny", "--device", "cpu", "--backend=ort-paged", "-o", str(encoder_dir)]) == 0
    assert "hidden states from python" in capsys.readouterr().out
    assert serve.main([str(encoder_dir), "--prompt", "x"]) == 2
    assert "is an encoder build" in capsys.readouterr().err


# -m slow: CI's 20 minutes are full (four bmc-opt processes)
@pytest.mark.slow
def test_a_saved_plan_reports_what_planning_it_reports(tmp_path):
    """A loaded program brings its tp degree in its plan: the report is the one planning gives."""
    saved = tmp_path / "tp2.pt2"
    assert bmc_opt("zoo:gpt-tiny", "--pass=tp2", "--world-size", "2", "-o", str(saved)).returncode == 0
    planned = bmc_opt("zoo:gpt-tiny", "--pass=tp2", "--world-size", "2", "--report")
    loaded = bmc_opt(str(saved), "--world-size", "2", "--report")
    assert loaded.returncode == 0, loaded.stderr
    table = lambda text: text[text.index("where the memory goes"):]  # noqa: E731
    assert "(dp=1 tp=2 pp=1)" in loaded.stdout and table(loaded.stdout) == table(planned.stdout)
    odd = bmc_opt(str(saved), "--world-size", "3")
    assert odd.returncode == 2 and "planned for tp=2 x pp=1, which does not divide --world-size 3" in odd.stderr


def test_the_installed_commands_resolve():
    """pyproject's console scripts name functions that exist (the README's first command)."""
    from importlib.metadata import entry_points
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in ("bmc-opt", "bmc")}
    assert set(scripts) == {"bmc-opt", "bmc"}
    assert all(callable(ep.load()) for ep in scripts.values())


def test_a_saved_rope_program_is_served_with_max_len(tmp_path, capsys):
    """A .pt2 of an HF LLaMA carries no config and computes RoPE in its graph: the build needs
    the positions from --max-len, and says so in one line without it."""
    import hf_models
    model = hf_models.build("llama")
    program = tmp_path / "llama.pt2"
    bmc.compile(model, example_inputs=hf_models.example_inputs(), dynamic=True).save(str(program))
    assert main([str(program), "--backend=ort-paged", "-o", str(tmp_path / "no-len")]) == 2
    assert "--max-len N" in capsys.readouterr().err
    assert main([str(program), "--max-len", "0", "--backend=ort-paged", "-o", str(tmp_path / "zero")]) == 2
    assert main([str(program), "--max-len", "48"]) == 2  # not a serving build
    assert "add --backend=ort-paged" in capsys.readouterr().err
    served = tmp_path / "served"
    assert main([str(program), "--max-len", "48", "--backend=ort-paged", "-o", str(served)]) == 0
    assert bmc.load(str(served)).manifest["max_len"] == 48
