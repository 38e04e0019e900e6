"""bmc-opt: run a pass pipeline on a model and show what happened, like mlir-opt.

    bmc-opt zoo:gpt2-small --pass=cleanup,analyze --world-size 8 --report
    bmc-opt model.pt2 --pass=dce --dump-dir dumps/ -o out.pt2

User errors print one line, `bmc-opt: error: ...`, and exit with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import Sequence

import torch

from bmc.errors import BmcError

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
                   help=f"zoo:NAME, a .pt2 archive, or a pickled .pt module (default {DEFAULT_MODEL})")
    p.add_argument("--pass", dest="pipeline", default=DEFAULT_PIPELINE,
                   help=f"pipeline string, e.g. 'dce,shape-prop' or 'dce{{drop_unused_params=true}}' "
                        f"(default {DEFAULT_PIPELINE})")
    p.add_argument("--world-size", type=int, default=1, help="ranks the plan is for (no processes are launched)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the mesh")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree of the mesh")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per rank for --report")
    p.add_argument("--seq", type=int, default=None, help="sequence length for --report (default: the traced example's)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd-momentum", "sgd"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model's weights before tracing")
    p.add_argument("--device", choices=["meta", "cpu"],
                   help="where zoo models are built (default: meta, no memory, unless -o needs weights)")
    p.add_argument("--static", action="store_true", help="trace with static shapes (default: batch, seq symbolic)")
    p.add_argument("--example-inputs", metavar="SPEC",
                   help="inputs for models without example_inputs(), e.g. 'i64[2,16]' or 'i64[2,16],f32[2,16,64]'")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled .pt module (unpickling runs code from the file)")
    p.add_argument("--report", action="store_true", help="print where the memory goes per rank")
    p.add_argument("--measure", action="store_true",
                   help="run one AdamW training step on real weights (N local gloo processes for --world-size N) "
                        "and print the bytes each part really held beside the prediction")
    p.add_argument("--analyze", action="store_true", help="print the model's structure (blocks, attention, MLP)")
    p.add_argument("--list-passes", action="store_true", help="list passes and presets and exit")
    p.add_argument("--dump-dir", metavar="DIR", help="write the graph after each pass to DIR (txt, dot, svg)")
    p.add_argument("--print-ir-after-all", action="store_true")
    p.add_argument("--print-ir-after", metavar="PASS", default="", help="comma-separated pass names")
    p.add_argument("--print-ir-after-change", action="store_true")
    p.add_argument("--timing", action="store_true", help="print the time each pass took")
    p.add_argument("--pass-statistics", action="store_true", help="print each pass's counters")
    p.add_argument("--no-verify", action="store_true", help="skip verification after each pass")
    p.add_argument("--reproducer", metavar="DIR", help="on a pass failure, write input graph + pipeline to DIR")
    p.add_argument("--run-reproducer", metavar="DIR", help="rerun a reproducer written by --reproducer")
    p.add_argument("-o", "--output", metavar="OUT.pt2", help="write the transformed graph as a .pt2 archive")
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
    if args.output and not args.output.endswith(".pt2"):
        raise UsageError(f"-o {args.output}: the output is a torch.export archive and must end in .pt2")
    if args.output and args.device == "meta":
        raise UsageError("-o needs real weights: drop --device meta (or use --device cpu)")
    if args.measure and args.device == "meta":
        raise UsageError("--measure runs the model and needs real weights: drop --device meta (or use --device cpu)")
    if args.measure and (args.tp > 1 or args.pp > 1):
        raise UsageError("--measure runs data-parallel plans only for now: drop --tp/--pp")


def _instruments(args, out):
    from bmc import instruments as ins
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
    return chosen, timing, stats


def _load(args):
    from bmc.serialize import load_graph
    device = args.device or ("cpu" if args.output or args.measure else "meta")
    example = parse_example_inputs(args.example_inputs) if args.example_inputs else None
    return load_graph(args.model, trust_pickle=args.trust_pickle, example_inputs=example,
                      dynamic=not args.static, device=device, dtype=DTYPES.get(args.dtype))


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


def _traced_seq(gm) -> int | None:
    """The sequence length of the example the graph was traced with (dim 1 of the first input)."""
    from bmc.trace import trace_info
    info = trace_info(gm)
    tensors = [t for t in (*info.args, *info.kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    return int(tensors[0].shape[1]) if tensors else None


def _option_of(pipeline, pass_name: str, option: str) -> int | None:
    values = {getattr(spec.make_options(), option) for spec in pipeline.passes if spec.name == pass_name}
    return values.pop() if values else None


def _mesh_from_pipeline(args, pipeline) -> None:
    """--tp and --pp follow the pipeline's tp and pp passes; a different value is a contradiction."""
    for flag, pass_name, option in (("tp", "tp", "degree"), ("pp", "pp", "stages")):
        degree = _option_of(pipeline, pass_name, option)
        if degree is None:
            continue
        if getattr(args, flag) not in (1, degree):
            raise UsageError(f"--{flag} {getattr(args, flag)} contradicts the pipeline's "
                             f"{pass_name}{{{option}={degree}}}: drop --{flag} or make them equal")
        setattr(args, flag, degree)
    if args.world_size % (args.tp * args.pp):
        raise UsageError(f"world size {args.world_size} is not divisible by tp*pp = {args.tp * args.pp}; "
                         f"pick degrees whose product divides it")


def _dump_stages(gm, directory: str) -> None:
    """Each pipeline stage's graph (what its ranks run) beside the per-pass dumps."""
    from bmc.backends.pipeline import stage_graph
    from bmc.ir import format_graph
    from bmc.serialize import atomic_write_text
    total = gm.meta["bmc.pp"]["total_stages"]
    for s in range(total):
        text = format_graph(stage_graph(gm, s, total), title=f"pipeline stage {s} of {total}")
        atomic_write_text(os.path.join(directory, f"stage-{s}.txt"), text)


def _measure_rank(rank: int, world_size: int, args, pipeline: str) -> dict:
    """One rank of --measure: load, compile for the world size, one training step."""
    import bmc
    from bmc import measure
    try:
        gm = _load(args)[0]
        prog = bmc.compile(gm, passes=pipeline, world_size=world_size)
        return measure.measure_step(prog, measure.example_batch(gm, args.batch, args.seq or _traced_seq(gm)))
    except BmcError as exc:
        return {"error": str(exc)}


def _measure(args, gm, pipeline: str, dp: int) -> str:
    import bmc
    from bmc import cost, measure
    seq = args.seq or _traced_seq(gm)
    if args.world_size == 1:
        prog = bmc.compile(gm, world_size=1)
        measured = measure.measure_step(prog, measure.example_batch(gm, args.batch, seq))
    else:
        from bmc.local_ranks import run_ranks
        measured = _with_status(f"measuring on {args.world_size} local ranks",
                                lambda: run_ranks(args.world_size, _measure_rank, args, pipeline))[0]
        if "error" in measured:
            raise BmcError(measured["error"])
    setting = cost.Setting(batch=args.batch, seq=seq, dp=dp, setup=cost.TrainingSetup(optimizer="adamw"))
    return measure.format_comparison(measured, measure.predicted(gm, setting),
                                     title=f"rank 0 of {args.world_size}")


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
    from bmc import cost, passmgr, report
    from bmc.passmgr import PassContext, PassManager
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
    manager.check()
    gm = _with_status(f"loading {args.model}", lambda: _load(args)[0])
    out.write(f"pipeline: {pipeline}\n")
    gm = manager.run(gm).graph_module
    for index, record in enumerate(manager.records, start=1):
        stats_text = ", ".join(f"{k}={v}" for k, v in record.statistics.items())
        out.write(f"  #{index} {str(record.spec):<28} {'changed' if record.modified else 'no change':<9} "
                  f"{record.seconds:7.3f}s  {stats_text}\n")
    if args.analyze:
        from bmc.structure import analyze, format_structure
        out.write("\n" + format_structure(analyze(gm)))
    if args.report:
        setting = cost.Setting(batch=args.batch, seq=args.seq or _traced_seq(gm), dp=dp, tp=args.tp, pp=args.pp,
                               setup=cost.TrainingSetup(optimizer=args.optimizer))
        out.write("\n" + report.format_report(gm, setting, args.world_size))
        if gm.meta.get("bmc.pp"):
            out.write("\n" + report.format_stage_report(gm, setting))
    if args.dump_dir and gm.meta.get("bmc.pp"):
        _dump_stages(gm, args.dump_dir)
    if args.measure:
        out.write("\n" + _measure(args, gm, str(pipeline), dp))
    for instrument in (timing, stats):
        if instrument:
            out.write("\n" + instrument.format())
    if args.output:
        from bmc.serialize import save_pt2
        save_pt2(gm, args.output, pipeline=str(pipeline))
        out.write(f"\nwrote {args.output}\n")
    return 0


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
