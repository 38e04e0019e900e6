"""bmc-opt: run a pass pipeline on a model and show what happened, like mlir-opt.

    bmc-opt zoo:gpt2-small --pass=cleanup,analyze --world-size 8 --report
    bmc-opt hf:path/to/checkpoint --world-size 8 --report        # config.json alone, on the meta device
    bmc-opt model.pt2 --pass=dce --dump-dir dumps/ -o out.pt2
    bmc-opt zoo:gpt-mini --weights trained --pass='prune-heads{score=taylor}' --calibration builtin --eval

User errors print one line, `bmc-opt: error: ...`, and exit with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time
from typing import Sequence

import torch

from bmc import ir, plugins
from bmc.errors import BmcError
from bmc.extras import require

log = logging.getLogger("bmc")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MODEL = "zoo:gpt2-small"
DEFAULT_PIPELINE = "dce,analyze,verify"


class UsageError(BmcError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        raise UsageError(f"{message} (see bmc-opt --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bmc-opt", description="Run a bmc pass pipeline on a model and show what it did.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"zoo:NAME; hf:DIR, a Hugging Face checkpoint directory (config.json and safetensors, "
                        f"sharded or not; planning reads config.json alone); a .pt2 archive; or a pickled .pt "
                        f"module (default {DEFAULT_MODEL})")
    p.add_argument("--pass", dest="pipeline", default=DEFAULT_PIPELINE,
                   help=f"pipeline string, e.g. 'dce,shape-prop' or 'dce{{drop_unused_params=true}}' "
                        f"(default {DEFAULT_PIPELINE})")
    p.add_argument("--world-size", type=int, default=1, help="ranks the plan is for (no processes are launched)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the mesh")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree of the mesh")
    p.add_argument("--batch", type=int, default=None,
                   help="micro-batch per rank for --report and --measure (default 1); batch of --calibration "
                        "(default: the traced example's) and of --eval (default 8)")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence length for --report, --measure and --calibration (default: the traced example's) "
                        "and --eval (default: the model's longest up to 128)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd-momentum", "sgd"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model's weights before tracing")
    p.add_argument("--device", choices=["meta", "cpu"],
                   help="where zoo and hf: models are built (default: meta, no memory, unless -o, --measure, "
                        "--weights, --calibration or --eval need real weights)")
    p.add_argument("--weights", metavar="PATH|trained",
                   help="load these weights into the zoo or hf: model before tracing: a .safetensors file, a weights "
                        "directory (tools/train.py's <out>/weights, prog.save_weights, save_pretrained), a training "
                        "checkpoint (its latest step) or a training run's directory; never pickle. 'trained': "
                        "bmc's trained checkpoint of a zoo model")
    p.add_argument("--calibration", metavar="FILE|builtin",
                   help="cut calibration batches (byte tokens) for data-driven passes such as "
                        "prune-heads{score=taylor} out of a text file, or 'builtin': the standard library's sources")
    p.add_argument("--calibration-batches", type=int, default=8, metavar="N", help="how many (default 8)")
    p.add_argument("--eval", action="store_true",
                   help="after the pipeline, compare the original causal LM with the transformed one on held-out "
                        "text: perplexity, cosine of the logits, parameters, weight bytes")
    p.add_argument("--check", action="store_true",
                   help="after the pipeline, run the original and the transformed program on seeded batches "
                        "(--world-size N: N local gloo ranks) and compare outputs, gradients and every node "
                        "against what the passes promise; on a mismatch, name the first wrong node and the pass "
                        "that made it (exit status 1)")
    p.add_argument("--eval-text", metavar="FILE",
                   help="the text --eval holds out the last 5%% of (default: the standard library's sources)")
    p.add_argument("--static", action="store_true", help="trace with static shapes (default: batch, seq symbolic)")
    p.add_argument("--example-inputs", metavar="SPEC",
                   help="inputs for models without example_inputs(), e.g. 'i64[2,16]' or 'i64[2,16],f32[2,16,64]'; "
                        "for hf: models input_ids, then labels (the program then returns the loss)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled .pt module (unpickling runs code from the file)")
    p.add_argument("--report", action="store_true", help="print where the memory goes per rank")
    p.add_argument("--measure", action="store_true",
                   help="run one AdamW training step on real weights (N local gloo processes for --world-size N) "
                        "and print the bytes each part really held beside the prediction")
    p.add_argument("--analyze", action="store_true", help="print the model's structure (blocks, attention, MLP)")
    p.add_argument("--list-passes", action="store_true", help="list passes and presets and exit")
    p.add_argument("--plot", metavar="DIR",
                   help="draw where the memory goes per rank (DIR/memory.png: by ZeRO column and pipeline stage) "
                        "and, with pp, the schedule's timeline (DIR/pipeline.png); needs matplotlib (the plot extra)")
    p.add_argument("--dump-dir", metavar="DIR", help="write the graph after each pass to DIR (txt, dot, svg)")
    p.add_argument("--print-ir-after-all", action="store_true")
    p.add_argument("--print-ir-after", metavar="PASS", default="", help="comma-separated pass names")
    p.add_argument("--print-ir-after-change", action="store_true")
    p.add_argument("--timing", action="store_true", help="print the time each pass took")
    p.add_argument("--pass-statistics", action="store_true", help="print each pass's counters")
    p.add_argument("--no-verify", action="store_true", help="skip verification after each pass")
    p.add_argument("--reproducer", metavar="DIR", help="on a pass failure, write input graph + pipeline to DIR")
    p.add_argument("--run-reproducer", metavar="DIR", help="rerun a reproducer written by --reproducer")
    p.add_argument("-o", "--output", metavar="OUT.pt2|DIR",
                   help="write the transformed graph as a .pt2 archive (torch backend) or, with --backend=ort-paged, "
                        "a directory that `bmc run DIR` serves")
    p.add_argument("--backend", choices=["torch", "ort-paged"], default="torch",
                   help="what -o writes: a .pt2 archive (torch) or an ONNX Runtime build with paged blocks")
    p.add_argument("--max-len", type=int, metavar="N",
                   help="ort-paged: the positions served (caps the model's own; needed where the graph and its "
                        "config give none, e.g. a .pt2 of a RoPE model)")
    p.add_argument("--task", choices=["causal-lm", "encoder"],
                   help="ort-paged: what the build serves, where the attention masks cannot tell")
    p.add_argument("--no-prepacked", action="store_true",
                   help="ort-paged: leave out the prepacked weights (two thirds of the disk; paged blocks are then fed "
                        "as inputs, slower)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    return p


_INPUT_SPEC = re.compile(r"\s*(\w+)\[([\d,\s]*)\]\s*")
_SHORT_DTYPES = {"i64": torch.int64, "i32": torch.int32, "f32": torch.float32, "f16": torch.float16,
                 "bf16": torch.bfloat16, "bool": torch.bool}


def parse_example_inputs(spec: str) -> tuple:
    """'i64[2,16],f32[2,16,64]' -> (zeros int64 (2,16), zeros float32 (2,16,64))."""
    tensors, pos = [], 0
    while pos < len(spec):
        match = _INPUT_SPEC.match(spec, pos)
        if not match or match.group(1) not in _SHORT_DTYPES:
            raise UsageError(f"bad --example-inputs {spec!r} at column {pos + 1}: expected DTYPE[d0,d1,...] "
                             f"with DTYPE one of {', '.join(_SHORT_DTYPES)}")
        shape = [int(d) for d in match.group(2).split(",") if d.strip()]
        tensors.append(torch.zeros(shape, dtype=_SHORT_DTYPES[match.group(1)]))
        pos = match.end()
        if pos < len(spec):
            if spec[pos] != ",":
                raise UsageError(f"bad --example-inputs {spec!r} at column {pos + 1}: expected ','")
            pos += 1
    return tuple(tensors)


def _check_args(args) -> None:
    if args.world_size < 1 or args.tp < 1 or args.pp < 1:
        raise UsageError("--world-size, --tp and --pp must be >= 1")
    if args.world_size % (args.tp * args.pp):
        raise UsageError(f"world size {args.world_size} is not divisible by tp*pp = {args.tp * args.pp}; "
                         f"pick degrees whose product divides it")
    if args.backend == "ort-paged" and not args.output:
        raise UsageError("--backend=ort-paged builds a directory: give it with -o DIR")
    if (args.max_len is not None or args.task or args.no_prepacked) and args.backend != "ort-paged":
        raise UsageError("--max-len, --task and --no-prepacked are for serving builds: add --backend=ort-paged -o DIR")
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max-len must be >= 1, got {args.max_len}")
    if args.backend == "ort-paged":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            require(package, "--backend=ort-paged")
    if args.plot:
        require("matplotlib", "--plot")
    if args.output and args.backend == "torch" and not args.output.endswith(".pt2"):
        raise UsageError(f"-o {args.output}: the output is a torch.export archive and must end in .pt2 "
                         f"(or add --backend=ort-paged to build a served directory)")
    if args.output and args.backend == "ort-paged" and os.path.isfile(args.output):
        raise UsageError(f"-o {args.output} is a file; --backend=ort-paged writes a directory")
    if args.output and args.device == "meta":
        raise UsageError("-o needs real weights: drop --device meta (or use --device cpu)")
    if args.measure and args.device == "meta":
        raise UsageError("--measure runs the model and needs real weights: drop --device meta (or use --device cpu)")
    if args.measure and (args.tp > 1 or args.pp > 1):
        raise UsageError("--measure runs data-parallel plans only for now: drop --tp/--pp")
    _check_compression_args(args)


def _require_file(flag: str, path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


def _check_compression_args(args) -> None:
    """--weights, --calibration and --eval: what can be told from the command line alone,
    so a typo fails before a model is loaded."""
    for flag, given in (("--weights", args.weights), ("--calibration", args.calibration), ("--eval", args.eval),
                        ("--check", args.check)):
        if given and args.device == "meta":
            raise UsageError(f"{flag} needs real weights: drop --device meta (or use --device cpu)")
    if (args.batch is not None and args.batch < 1) or (args.seq is not None and args.seq < 1):
        raise UsageError("--batch and --seq must be >= 1")
    if args.calibration_batches < 1:
        raise UsageError("--calibration-batches must be >= 1")
    if args.weights:
        if not (args.model.startswith(("zoo:", "hf:")) or os.path.isfile(os.path.join(args.model, "config.json"))):
            raise UsageError(f"--weights loads into zoo: and hf: models; {args.model} carries its own weights")
        if args.weights == "trained" and not args.model.startswith("zoo:"):
            raise UsageError("--weights trained is bmc's trained checkpoint of a zoo model; give a path for hf: models")
        if args.weights != "trained":
            if os.path.isfile(args.weights) and not args.weights.endswith(".safetensors"):
                raise UsageError(f"--weights {args.weights}: give a .safetensors file, a weights or checkpoint "
                                 f"directory, or 'trained' (pickled weights are refused: unpickling runs code from "
                                 f"the file)")
            if not os.path.exists(args.weights):
                raise UsageError(f"--weights {args.weights}: no such file or directory")
    if args.calibration and args.calibration != "builtin":
        _require_file("--calibration", args.calibration)
    if args.eval_text and not args.eval:
        raise UsageError("--eval-text is the text --eval scores on: add --eval")
    if args.eval_text:
        _require_file("--eval-text", args.eval_text)
    if args.eval and args.world_size > 1:
        raise UsageError("--eval runs both models in this one process: drop --world-size (plan with it separately)")


def _instruments(args, out):
    from bmc.passmgr import instruments as ins
    chosen = []
    after = tuple(p for p in args.print_ir_after.split(",") if p)
    if args.print_ir_after_all or after or args.print_ir_after_change:
        chosen.append(ins.PrintIR(out, after_all=args.print_ir_after_all, after=after,
                                  after_change=args.print_ir_after_change))
    if args.dump_dir:
        chosen.append(ins.DumpDir(args.dump_dir))
    timing = ins.Timing() if args.timing else None
    stats = ins.Statistics() if args.pass_statistics else None
    chosen += [i for i in (timing, stats) if i]
    if args.reproducer:
        chosen.append(ins.Reproducer(args.reproducer))
    chosen.append(ins.Progress(sys.stderr))
    return chosen, timing, stats


def _needs_weights(args) -> bool:
    return bool(args.output or args.measure or args.weights or args.calibration or args.eval or args.check)


def _streams_weights(args) -> bool:
    """An ort-paged build of a Hugging Face checkpoint reads its weights block by block as it
    lowers them (never the whole model), unless something must run the whole model first."""
    from bmc.models import hf
    return (args.backend == "ort-paged" and bool(args.output) and hf.directory_of(args.model) is not None
            and args.device is None and not (args.measure or args.weights or args.calibration or args.eval
                                             or args.check))


def _load(args):
    from bmc.ir.serialize import load_graph
    device = args.device or ("deferred" if _streams_weights(args) else "cpu" if _needs_weights(args) else "meta")
    example = parse_example_inputs(args.example_inputs) if args.example_inputs else None
    if args.weights and args.model.startswith("zoo:"):
        from bmc.ir.trace import trace
        return trace(_zoo_with_weights(args), example, dynamic=not args.static), {}
    if args.weights:
        from bmc.models import hf
        return hf.load_graph(args.model, example=example, dynamic=not args.static, device="cpu",
                             dtype=_load_dtype(args), weights=args.weights), {}
    return load_graph(args.model, trust_pickle=args.trust_pickle, example_inputs=example,
                      dynamic=not args.static, device=device, dtype=_load_dtype(args))


def _load_dtype(args) -> torch.dtype | None:
    """--dtype; for an ort-paged build of a checkpoint saved in 16 bits, float32: what ONNX
    Runtime's CPU kernels run (their bf16 kernels are missing: the build would fail)."""
    if args.dtype or args.backend != "ort-paged" or not args.output:
        return DTYPES.get(args.dtype)
    return torch.float32


def _zoo_with_weights(args) -> torch.nn.Module:
    """The zoo model of `args.model` on the cpu with --weights loaded, then cast to --dtype."""
    from bmc.models import zoo
    name = args.model.removeprefix("zoo:")
    zoo.config(name)  # an unknown name gets zoo's "did you mean" before any file is read
    if args.weights == "trained":
        from bmc.models import trained
        model = trained.load(name)
    else:
        model = zoo.build(name, device="cpu")
        _load_weights(model, args.weights, name)
    return model.to(DTYPES[args.dtype]) if args.dtype else model


def _load_weights(model: torch.nn.Module, path: str, name: str) -> None:
    """Every weight of the zoo model from `path` (a safetensors file, a weights directory, a
    training checkpoint or run: bmc/models/weights.py), or a one-line refusal."""
    from bmc.errors import ModelLoadError
    from bmc.models import weights
    try:
        log.info("--weights: %s", weights.load_weights(model, path))
    except ModelLoadError as exc:
        raise UsageError(f"{exc} (zoo {name})") from None


def _with_status(what: str, work):
    """Say what is happening on a terminal while slow work runs (tracing a 7B model takes
    ~20 s); say nothing when stderr is a file or a pipe."""
    show = sys.stderr.isatty()
    if show:
        sys.stderr.write(f"bmc-opt: {what} ...")
        sys.stderr.flush()
    start = time.perf_counter()
    try:
        return work()
    finally:
        if show:
            sys.stderr.write(f" {time.perf_counter() - start:.1f}s\n")


def _traced_shape(gm) -> tuple[int, int] | None:
    """(batch, seq) of the example the graph was traced with (dims 0 and 1 of its first 2-D input)."""
    from bmc.ir.trace import trace_info
    info = trace_info(gm)
    tensors = [t for t in (*info.args, *info.kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    return (int(tensors[0].shape[0]), int(tensors[0].shape[1])) if tensors else None


def _traced_seq(gm) -> int | None:
    shape = _traced_shape(gm)
    return shape[1] if shape else None


def _step_batch(args) -> int:
    return args.batch or 1


def _option_of(pipeline, pass_name: str, option: str) -> int | None:
    values = {getattr(spec.make_options(), option) for spec in pipeline.passes if spec.name == pass_name}
    return values.pop() if values else None


def _adopt_degree(args, flag: str, degree: int, source: str) -> None:
    """--tp / --pp follow what the pipeline or the loaded plan says; a different value given is a
    contradiction."""
    if getattr(args, flag) not in (1, degree):
        raise UsageError(f"--{flag} {getattr(args, flag)} contradicts {source}: drop --{flag} or make them equal")
    setattr(args, flag, degree)


def _mesh_from_pipeline(args, pipeline) -> None:
    """--tp and --pp follow the pipeline's tp and pp passes."""
    for flag, pass_name, option in (("tp", "tp", "degree"), ("pp", "pp", "stages")):
        degree = _option_of(pipeline, pass_name, option)
        if degree is not None:
            _adopt_degree(args, flag, degree, f"the pipeline's {pass_name}{{{option}={degree}}}")
    if args.world_size % (args.tp * args.pp):
        raise UsageError(f"world size {args.world_size} is not divisible by tp*pp = {args.tp * args.pp}; "
                         f"pick degrees whose product divides it")


def _mesh_from_plans(args, gm) -> None:
    """A loaded program brings its tp degree and pipeline stages in its plans: --tp and --pp
    follow them."""
    tp, pp = ir.get_plan(gm, ir.TensorParallelPlan), ir.get_plan(gm, ir.PipelinePlan)
    for flag, degree in (("tp", tp and tp.degree), ("pp", pp and pp.stages)):
        if degree:
            _adopt_degree(args, flag, degree, f"{args.model}, whose plan has {flag}={degree}")
    if args.world_size % (args.tp * args.pp):
        raise UsageError(f"{args.model} is planned for tp={args.tp} x pp={args.pp}, which does not divide "
                         f"--world-size {args.world_size}; give a multiple of {args.tp * args.pp}")


def _dump_stages(gm, directory: str) -> None:
    """Each pipeline stage's graph (what its ranks run) beside the per-pass dumps."""
    from bmc.backends.pipeline import stage_graph
    from bmc.ir.schema import format_graph
    from bmc.ir.serialize import atomic_write_text
    total = ir.get_plan(gm, ir.PipelinePlan).total_stages
    for s in range(total):
        text = format_graph(stage_graph(gm, s, total), title=f"pipeline stage {s} of {total}")
        atomic_write_text(os.path.join(directory, f"stage-{s}.txt"), text)


def _measure_rank(rank: int, world_size: int, args, pipeline: str) -> dict:
    """One rank of --measure: load, compile for the world size, one training step."""
    import bmc
    from bmc.analysis import measure
    try:
        gm = _load(args)[0]
        prog = bmc.compile(gm, passes=pipeline, world_size=world_size)
        return measure.measure_step(prog, measure.example_batch(gm, _step_batch(args), args.seq or _traced_seq(gm)))
    except BmcError as exc:
        return {"error": str(exc)}


def _measure(args, gm, pipeline: str, dp: int) -> str:
    import bmc
    from bmc.analysis import cost
    from bmc.analysis import measure
    seq = args.seq or _traced_seq(gm)
    if args.world_size == 1:
        prog = bmc.compile(gm, world_size=1)
        measured = measure.measure_step(prog, measure.example_batch(gm, _step_batch(args), seq))
    else:
        from bmc.cli.local_ranks import run_ranks
        measured = _with_status(f"measuring on {args.world_size} local ranks",
                                lambda: run_ranks(args.world_size, _measure_rank, args, pipeline))[0]
        if "error" in measured:
            raise BmcError(measured["error"])
    setting = cost.Setting(batch=_step_batch(args), seq=seq, dp=dp, setup=cost.TrainingSetup(optimizer="adamw"))
    return measure.format_comparison(measured, measure.predicted(gm, setting),
                                     title=f"rank 0 of {args.world_size}")


# ------------------------------------------------------------------ calibration and evaluation

BYTE_VOCAB = 256  # --calibration and --eval texts are byte tokens
EVAL_WINDOWS, EVAL_BATCH, EVAL_SEQ = 32, 8, 128


def _token_vocab(gm) -> int | None:
    """Rows of the first embedding table the graph looks up: the token ids it takes are below."""
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default):
        table = node.args[0].meta.get("val")
        return int(table.shape[0]) if isinstance(table, torch.Tensor) else None
    return None


def _calibration(args, gm) -> list | None:
    """--calibration: byte-token windows shaped like the traced example (or --batch/--seq),
    checked against the trace here, so data that does not fit fails before any pass runs
    (and even when no pass of the pipeline reads it)."""
    if not args.calibration:
        return None
    from bmc.compress import calibration
    shape = _traced_shape(gm) or (None, None)
    batch, seq = args.batch or shape[0], args.seq or shape[1]
    if not batch or not seq:
        raise UsageError("--calibration cuts [batch, seq] token windows and this model takes no such input: "
                         "pass calibration batches from Python (bmc.compile(..., calibration=...))")
    _check_seq(args, "--calibration", seq)
    path = None if args.calibration == "builtin" else args.calibration
    data = _text_windows("--calibration", path, lambda: calibration.text_batches(
        path, count=args.calibration_batches, batch=batch, seq=seq, vocab=_token_vocab(gm) or BYTE_VOCAB))
    calibration.batches(gm, data, "--calibration")
    return data


def _fixed_dims(gm) -> tuple[int | None, int | None]:
    """Batch and sequence sizes the trace fixed (None where they stayed symbolic)."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    first = next((v for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    if first is None:
        return None, None
    return tuple(s if isinstance(s, int) else None for s in first.shape[:2])


def _zoo_longest_seq(args) -> int | None:
    """The longest sequence a zoo model takes (None for other models: their graph says)."""
    if not args.model.startswith("zoo:"):
        return None
    from bmc.models import zoo
    cfg = zoo.config(args.model.removeprefix("zoo:"))
    return next((getattr(cfg, f) for f in ("block_size", "max_seq", "max_position") if hasattr(cfg, f)), None)


def _check_seq(args, flag: str, seq: int) -> None:
    longest = _zoo_longest_seq(args)
    if longest is not None and seq > longest:
        raise UsageError(f"{flag} needs windows of {seq} tokens and {args.model} takes at most {longest}: "
                         f"pass a --seq up to {longest}")


def _text_windows(flag: str, path: str | None, make):
    """Cut token windows out of a text; a text too short for them is the flag's fault, so say which."""
    try:
        return make()
    except UsageError:
        raise
    except BmcError as exc:
        raise UsageError(f"{flag} {path or 'builtin'}: {exc}") from None


def _run_probe(gm, ids: torch.Tensor) -> torch.Tensor:
    from bmc.compress.calibration import main_output
    try:
        with torch.no_grad():
            return main_output(gm(ids))
    except Exception as exc:  # noqa: BLE001 - a guard on the input's size, most likely: say which size
        raise UsageError(f"--eval cannot run the model on token windows {list(ids.shape)}: {type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0][:160]}; pick a --batch/--seq it takes") from None


def _check_causal_lm(gm, ids: torch.Tensor) -> None:
    """--eval's perplexity is next-token loss on token ids: refuse models it means nothing for.
    Causality is tested, not guessed: changing the last token must leave earlier logits alone."""
    from bmc.ir.trace import trace_info
    info = trace_info(gm)
    takes = [*info.args, *info.kwargs.values()] if info else []
    if len(takes) != 1 or not isinstance(takes[0], torch.Tensor) or takes[0].is_floating_point() or takes[0].dim() != 2:
        described = ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor)
                              else type(t).__name__ for t in takes) or "nothing bmc knows of"
        raise UsageError(f"--eval scores causal language models that take token ids [batch, seq] alone; "
                         f"this model takes {described}")
    vocab = _token_vocab(gm)
    if vocab is not None and vocab < BYTE_VOCAB:
        raise UsageError(f"--eval's text is byte tokens ({BYTE_VOCAB} ids) and this model's vocabulary has {vocab}")
    logits = _run_probe(gm, ids)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape) or logits.shape[-1] < BYTE_VOCAB:
        raise UsageError(f"--eval scores causal language models: this model returns {list(logits.shape)} for "
                         f"ids {list(ids.shape)}, not [batch, seq, vocab >= {BYTE_VOCAB}] logits")
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % BYTE_VOCAB
    # a tolerance for kernels that block the sequence differently; an encoder moves far more
    if not torch.allclose(_run_probe(gm, later)[:, :-1], logits[:, :-1], rtol=1e-4, atol=1e-4):
        raise UsageError("--eval scores causal language models and this one is not causal: changing the last "
                         "token changes the outputs at earlier positions (a bidirectional encoder?)")


def _prepare_eval(args, gm):
    """--eval's held-out windows and a copy of the graph as it is before the pipeline (passes
    rewrite the graph in place), made before any pass runs, so a model --eval cannot score is
    refused at once. Returns (reference, windows, batch)."""
    from bmc.compress.evaluate import EvalData
    fixed_batch, fixed_seq = _fixed_dims(gm)
    batch = args.batch or fixed_batch or EVAL_BATCH
    seq = args.seq or fixed_seq or min(_zoo_longest_seq(args) or _traced_seq(gm) or EVAL_SEQ, EVAL_SEQ)
    _check_seq(args, "--eval", seq)
    count = -(-EVAL_WINDOWS // batch) * batch  # whole batches: a fixed batch size must divide them
    windows = _text_windows("--eval-text", args.eval_text,
                            lambda: EvalData.held_out(args.eval_text, seq=seq, count=count))
    _check_causal_lm(gm, windows.windows[:batch, :-1])
    return _copy_graph(gm), windows, batch


def _copy_graph(gm):
    """The graph as it is before the pipeline (passes rewrite it in place)."""
    import copy
    import warnings
    with warnings.catch_warnings():
        # copying export's input spec trips a deprecation warning inside torch itself
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def _evaluate(args, gm, pipeline: str, prepared) -> tuple[str, dict]:
    """The --eval table, and its figures as a build's lineage records them."""
    import dataclasses as dc
    from bmc.compress.evaluate import compare, format_table
    reference, windows, batch = prepared
    rows = _with_status("evaluating", lambda: compare(reference, {pipeline: gm}, windows, batch))
    count, seq = windows.windows.shape[0], windows.windows.shape[1] - 1
    source = args.eval_text or "the standard library's sources"
    title = f"held-out evaluation: {count} windows of {seq} tokens from the last 5% of {source}"
    figures = {"text": source, "windows": count, "seq": seq,
               "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in dc.asdict(r).items()}
                        for r in rows]}
    return format_table(rows, title=title), figures


def _apply_reproducer(args) -> None:
    directory = args.run_reproducer
    pipeline_file, graph_file = os.path.join(directory, "pipeline.txt"), os.path.join(directory, "input.pt2")
    for path in (pipeline_file, graph_file):
        if not os.path.exists(path):
            raise UsageError(f"{directory} is not a reproducer: {os.path.basename(path)} is missing")
    with open(pipeline_file) as f:
        args.pipeline = f.read().strip()
    args.model = graph_file


def run(argv: Sequence[str] | None, out) -> int:
    from bmc.program import compile_record
    from bmc import passmgr
    from bmc.analysis import cost
    from bmc.cli import report
    from bmc.passmgr.manager import PassContext, PassManager
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    if args.list_passes:
        out.write(passmgr.describe_passes())
        return 0
    if args.run_reproducer:
        _apply_reproducer(args)
    _check_args(args)
    passmgr.load_builtin_passes()
    pipeline = passmgr.parse_pipeline(args.pipeline)  # bad pipelines fail before any loading
    _mesh_from_pipeline(args, pipeline)
    dp = args.world_size // (args.tp * args.pp)
    context = PassContext(world_size=args.world_size, mesh={"dp": dp, "tp": args.tp, "pp": args.pp})
    instruments, timing, stats = _instruments(args, out)
    manager = PassManager(pipeline, context=context, verify=not args.no_verify, instruments=instruments)
    # what the pipeline and the backend need, before any loading; again from the graph's own
    # properties (a loaded program's plans) once it is loaded
    target = plugins.get_backend(args.backend) if args.output else None
    manager.check({"shapes": "tracing", **({"calibration": "--calibration"} if args.calibration else {})}, target)
    gm = _with_status(f"loading {args.model}", lambda: _load(args)[0])
    _mesh_from_plans(args, gm)
    dp = args.world_size // (args.tp * args.pp)
    context.mesh = {"dp": dp, "tp": args.tp, "pp": args.pp}
    calibration = _calibration(args, gm)
    if calibration is not None:  # the passes take their context when built: build them again with it
        context = dataclasses.replace(context, calibration=calibration)
        manager = PassManager(pipeline, context=context, verify=not args.no_verify, instruments=instruments)
    prepared_eval = _prepare_eval(args, gm) if args.eval else None
    _note_random_weights(args)  # once what --eval refuses has been refused
    check_reference = _copy_graph(gm) if args.check else None
    out.write(f"pipeline: {pipeline}\n")
    gm = manager.run(gm, backend=target).graph_module
    for index, record in enumerate(manager.records, start=1):
        stats_text = ", ".join(f"{k}={v}" for k, v in record.statistics.items())
        out.write(f"  #{index} {str(record.spec):<28} {'changed' if record.modified else 'no change':<9} "
                  f"{record.seconds:7.3f}s  {stats_text}\n")
    if args.analyze:
        from bmc.analysis.structure import analyze, format_structure
        out.write("\n" + format_structure(analyze(gm)))
    setting = cost.Setting(batch=_step_batch(args), seq=args.seq or _traced_seq(gm), dp=dp, tp=args.tp, pp=args.pp,
                           setup=cost.TrainingSetup(optimizer=args.optimizer))
    if args.plot:
        from bmc.cli.plots import plan_figures
        out.write("\n" + "".join(f"wrote {path}\n" for path in plan_figures(args.plot, gm, setting, args.world_size)))
    if args.report:
        out.write("\n" + report.format_report(gm, setting, args.world_size))
        if ir.get_plan(gm, ir.PipelinePlan):
            out.write("\n" + report.format_stage_report(gm, setting))
    if args.dump_dir and ir.get_plan(gm, ir.PipelinePlan):
        _dump_stages(gm, args.dump_dir)
    if args.measure:
        out.write("\n" + _measure(args, gm, str(pipeline), dp))
    record = compile_record(manager.records, context.calibration)
    if args.calibration:
        record["calibration"] = {**record.get("calibration", {}), "source": args.calibration}
    if prepared_eval is not None:
        table, record["eval"] = _evaluate(args, gm, str(pipeline), prepared_eval)
        out.write("\n" + table)
    for instrument in (timing, stats):
        if instrument:
            out.write("\n" + instrument.format())
    if check_reference is not None:
        from bmc.checker import compare
        report_ = _with_status(f"checking on {args.world_size} rank(s)",
                               lambda: compare(check_reference, gm, manager.equivalence(), str(pipeline),
                                               world_size=args.world_size))
        out.write("\n" + str(report_) + "\n")
        if not report_.passed:
            return 1
    if args.output and args.backend == "ort-paged":
        from bmc.program import config_limits
        limits = [n for n in (args.max_len, config_limits(args.model).get("max_positions")) if n]
        _build_paged(gm, args.output, str(pipeline), out, min(limits) if limits else None, args.task,
                     lineage=_weights_lineage(args), record=record, prepacked=not args.no_prepacked)
        if check_reference is not None:
            from bmc.checker import compare_build
            built = _with_status("checking the build in ONNX Runtime",
                                 lambda: compare_build(check_reference, args.output, manager.equivalence(),
                                                       str(pipeline)))
            out.write("\n" + str(built) + "\n")
            if not built.passed:
                return 1
    elif args.output:
        from bmc.ir.serialize import save_pt2
        from bmc.models.weights import compiled_step
        save_pt2(gm, args.output, pipeline=str(pipeline),
                 lineage=compiled_step(_weights_lineage(args), str(pipeline), record, gm))
        out.write(f"\nwrote {args.output}\n")
    return 0


def _note_random_weights(args) -> None:
    """A zoo model without --weights is freshly initialized: say so where it matters (a build
    that will be served, an evaluation), on stderr. (A .pt2 to train starts from random
    weights as training does.)"""
    served = args.output and args.backend == "ort-paged"
    if not args.model.startswith("zoo:") or args.weights or not (served or args.eval):
        return
    from bmc.models import trained
    name = args.model.removeprefix("zoo:")
    hint = "--weights trained (bmc's trained checkpoint)" if name in trained.CHECKPOINTS else \
        "--weights FILE.safetensors"
    what = "the build serves them" if served else "--eval scores them"
    sys.stderr.write(f"bmc-opt: note: {args.model} has random weights (no --weights): {what}; give {hint} "
                     f"for real ones\n")


def _weights_lineage(args) -> list[dict]:
    """The recorded steps behind the weights bmc-opt compiles (bmc/lineage.py)."""
    from bmc.program import lineage_of_source
    if args.weights == "trained":
        from bmc.models import trained
        return lineage_of_source(args.model, trained.path_of(args.model.removeprefix("zoo:")))
    return lineage_of_source(args.model, args.weights)


def build_progress(started: float, show: bool):
    """A progress line per part on a terminal: parts done, what runs now, the time so far and
    the time left at the pace of the parts done (counted from the first part: the step's
    preparation before it is not the parts' pace)."""
    first_part: list[float] = []  # when the first part began

    def progress(done: int, total: int, what: str) -> None:
        if not show:
            return
        now = time.perf_counter()
        if total and not first_part:
            first_part.append(now)
        left = ""
        if total and 0 < done < total:
            left = f", about {(now - first_part[0]) / done * (total - done):.0f}s left"
        counted = f"{done}/{total} parts done: " if total else ""
        sys.stderr.write(f"\rbmc-opt: ort-paged build, {counted}{what} ({now - started:.0f}s{left})\x1b[K")
        sys.stderr.flush()
    return progress


def _build_paged(gm, directory: str, pipeline: str, out, max_len: int | None = None, task: str | None = None,
                 lineage: list | None = None, record: dict | None = None, prepacked: bool = True) -> None:
    """Lower to ONNX Runtime parts in a staging directory, published by rename when complete."""
    from bmc.backends import ort_paged
    from bmc.ir.serialize import staged_directory
    show = sys.stderr.isatty()
    started = time.perf_counter()
    progress = build_progress(started, show)
    progress(0, 0, "preparing the decode step")
    try:
        with staged_directory(directory) as staging:
            manifest = ort_paged.build(gm, staging, pipeline=pipeline, progress=progress, max_len=max_len, task=task,
                                       lineage=lineage, record=record, prepacked=prepacked)
    finally:
        if show:
            sys.stderr.write("\n")
    weights = sum(p["weight_bytes"] for p in manifest["parts"])
    out.write(f"\nwrote {directory}: {len(manifest['parts'])} parts ({len(manifest['blocks'])} blocks), "
              f"{weights:,} bytes of weights; " + (f"hidden states from python: bmc.load({directory!r})(ids)\n"
                                                     if manifest.get("task") == "encoder" else
                                                     f"serve it with: bmc run {directory} --prompt TEXT\n"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv, sys.stdout)
    except BmcError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        sys.stderr.write(f"bmc-opt: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bmc-opt: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug in bmc, reported without a bare traceback
        if os.environ.get("BMC_TRACEBACK"):
            raise
        sys.stderr.write(f"bmc-opt: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                         f"(set BMC_TRACEBACK=1 for the traceback; please report it)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
