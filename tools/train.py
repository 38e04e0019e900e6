#!/usr/bin/env python3
"""Train a model with any pipeline of bmc's training passes, on real text that ships with
Python (the standard library's sources, one token per byte).

    python tools/train.py --model gpt-mini --steps 200                      # one process
    python tools/train.py --hf path/to/checkpoint --pass ckpt               # a Hugging Face directory
    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 tools/train.py \\
        --pass amp{dtype=bf16},zero3,ckpt --steps 200 --ckpt-dir runs/a     # 2 ranks
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=1 ...      # survive a dead rank

It shows a progress bar, prints measured per-rank memory beside the cost model's prediction
after the first step, writes the loss of every step to <out>/loss.jsonl, checkpoints every
--ckpt-every steps (sharded, torch.distributed.checkpoint) and resumes from the latest
checkpoint in --ckpt-dir when started again (one of another pipeline or world size only with
--reshard); under `torchrun --max-restarts=N` a run whose
rank died carries on from there. Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import bmc.passes  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without installing: map the package as pyproject.toml does
    sys.path.insert(0, str(ROOT))
    import bmc
    bmc.__path__.append(str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bmc  # noqa: E402
from bmc.models import data  # noqa: E402
from bmc.analysis import measure  # noqa: E402
from bmc import ir  # noqa: E402
from bmc.ir.trace import trace_info  # noqa: E402
from bmc.models import zoo  # noqa: E402
from bmc.backends import checkpoint  # noqa: E402
from bmc.errors import BmcError  # noqa: E402

log = logging.getLogger("train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-mini", help=f"a zoo model ({', '.join(zoo.names())}); default gpt-mini")
    p.add_argument("--hf", metavar="DIR", help="train the Hugging Face causal LM of this checkpoint directory "
                   "(config.json and safetensors weights) instead")
    p.add_argument("--hf-config", help="train a Hugging Face causal LM built from this config.json, freshly initialized")
    p.add_argument("--pass", dest="pipeline", default=None,
                   help="pipeline string, e.g. 'amp{dtype=bf16},zero3,ckpt' (default: dce on one process, dp on several)")
    p.add_argument("--program", metavar="PROG.pt2",
                   help="train a program saved by bmc-opt -o or prog.save (traced with its targets, e.g. "
                        "bmc-opt zoo:gpt-mini --example-inputs 'i64[4,64],i64[4,64]' --pass=zero3,ckpt -o p.pt2); "
                        "its pipeline and weights come from the file")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step over all ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then cosine decay")
    p.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="train on this text file (default: the standard library's sources)")
    p.add_argument("--out", default=None,
                   help="where loss.jsonl, summary.json and checkpoints go (default: runs/<model>-<pipeline>-<N>ranks, "
                        "one directory per run kind, so a run resumes only its own kind)")
    p.add_argument("--ckpt-dir", help="checkpoint directory (default <out>/checkpoints)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    p.add_argument("--reshard", action="store_true",
                   help="resume a checkpoint written under another pipeline or world size (it is resharded)")
    p.add_argument("--export", metavar="DIR",
                   help="write the trained model's whole weights here as safetensors shards with lineage.json "
                        "(a Hugging Face directory for --hf/--hf-config models; default <out>/weights)")
    p.add_argument("--no-export", action="store_true", help="write no weights directory (the checkpoints remain)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: at the end only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trace-step", type=int, metavar="STEP",
                   help="profile this step with torch.profiler and write <out>/trace-step-N-rank-R.json, a "
                        "Chrome/Perfetto trace (open it in ui.perfetto.dev or chrome://tracing)")
    p.add_argument("--simulate-failure", type=int, metavar="STEP",
                   help="for testing fault tolerance: --failure-rank kills itself at STEP on the first attempt")
    p.add_argument("--failure-rank", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


# ------------------------------------------------------------------ setup


def init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's environment, or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and os.environ.get("RANK") == "0":
        # torchrun shares its rendezvous store with the workers, and restarted workers can read
        # the dead attempt's addresses from it (pytorch/pytorch#135712)
        log.warning("torchrun --max-restarts=%d: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                    "environment, or a restarted run may fail to connect", restarts)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


class Task:
    """How one kind of model is called: zoo models take (inputs, targets) and return the
    loss; Hugging Face causal LMs take input_ids and labels (they shift the labels)."""

    def __init__(self, args):
        self.hf = args.hf_config is not None or args.hf is not None
        self.args = args

    def build(self) -> torch.nn.Module:
        torch.manual_seed(self.args.seed)
        if not self.hf:
            return zoo.build(self.args.model)
        if self.args.hf:
            return self._from_directory()
        from bmc.extras import require
        require("transformers", "--hf-config")
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(self.args.hf_config)
        except (OSError, ValueError) as exc:
            raise BmcError(f"cannot read the Hugging Face config {self.args.hf_config}: {exc}") from None
        if getattr(config, "vocab_size", data.VOCAB) < data.VOCAB:
            raise BmcError(f"the config's vocab_size {config.vocab_size} is smaller than the {data.VOCAB} byte tokens")
        config.use_cache = False
        return AutoModelForCausalLM.from_config(config)

    def _from_directory(self) -> torch.nn.Module:
        """--hf DIR: the checkpoint's causal LM with its weights, refused before any weight is
        read if it cannot learn from byte tokens."""
        from bmc.models import hf
        config = hf.read_config(self.args.hf)
        if hf.model_class(config).__name__ != "AutoModelForCausalLM":
            kind = (config.architectures or [config.model_type])[0]
            raise BmcError(f"--hf {self.args.hf} is not a causal LM ({kind}): train.py trains next-token prediction")
        if self.tokenizer_path() is None and getattr(config, "vocab_size", data.VOCAB) < data.VOCAB:
            raise BmcError(f"the model's vocab_size {config.vocab_size} is smaller than the {data.VOCAB} "
                           f"byte tokens it is trained on (the directory has no tokenizer.json)")
        return hf.build(self.args.hf, device="cpu").train()

    def tokenizer_path(self) -> str | None:
        """--hf DIR with a tokenizer.json: the text is its ids, not bytes."""
        path = os.path.join(self.args.hf, "tokenizer.json") if self.args.hf else None
        return path if path and os.path.isfile(path) else None

    def tokens(self) -> torch.Tensor:
        """The training text as this model's tokens, refused in one line when the tokenizer
        gives ids the model has no rows for."""
        path = self.tokenizer_path()
        if path is None:
            return data.text_tokens(self.args.text)
        from bmc.models import hf
        tokens = data.tokenized(path, self.args.text)
        vocab = getattr(hf.read_config(self.args.hf), "vocab_size", None)
        if vocab is not None and len(tokens) and int(tokens.max()) >= vocab:
            raise BmcError(f"{path} gives token id {int(tokens.max())}, past the model's vocab_size {vocab}: "
                           f"the tokenizer is not this checkpoint's")
        log.info("training on %s tokens of %s", f"{len(tokens):,}", path)
        return tokens

    def example(self, local_batch: int):
        x = torch.zeros(local_batch, self.args.seq, dtype=torch.long)
        return ((), {"input_ids": x, "labels": x.clone()}) if self.hf else (x, x.clone())

    def loss(self, prog, x, y) -> torch.Tensor:
        if self.hf:
            out = prog(input_ids=x, labels=x)
            return out if isinstance(out, torch.Tensor) else out.loss  # a pipelined program returns the loss
        return prog(x, y)

    def step(self, prog, x, y) -> torch.Tensor:
        """Forward and backward; the loss."""
        if is_pipelined(prog):  # the schedule runs backward itself, microbatch by microbatch
            return prog.step(input_ids=x, labels=x) if self.hf else prog.step(x, y)
        loss = self.loss(prog, x, y)
        loss.backward()
        return loss


def is_pipelined(prog) -> bool:
    return ir.get_plan(prog.graph_module, ir.PipelinePlan) is not None


def plan_degrees(gm) -> tuple[int, int, int]:
    """tp degree, pp stages and microbatches of a saved program's plans (1, 1, 1 without them)."""
    tp, pp = ir.get_plan(gm, ir.TensorParallelPlan), ir.get_plan(gm, ir.PipelinePlan)
    return (tp.degree if tp else 1, pp.stages if pp else 1, pp.microbatches if pp else 1)


def load_program(args):
    """--program: the saved program, lowered for this process group, and how it is called."""
    prog = bmc.load(args.program)
    info = trace_info(prog.graph_module)
    args.hf_config = "saved" if info.kwargs else None  # Hugging Face programs take input_ids= and labels=
    if len(info.args) + len(info.kwargs) < 2:
        raise BmcError(f"{args.program} was traced without targets, so it computes no loss: trace it with "
                       f"inputs and targets (bmc-opt ... --example-inputs 'i64[B,S],i64[B,S]')")
    return prog


def mesh_degrees(pipeline: str) -> tuple[int, int, int]:
    """tp degree, pp stages and microbatches the pipeline asks for (1, 1, 1 without them)."""
    tp, pp, micro = 1, 1, 1
    for spec in bmc.parse_pipeline(pipeline).passes:
        options = spec.make_options()
        if spec.name == "tp":
            tp = options.degree
        elif spec.name == "pp":
            pp, micro = options.stages, options.num_microbatches
    return tp, pp, micro


def learning_rate(args, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------ measurement


def memory_report(prog, world: int, local_batch: int, seq: int, measured: dict) -> str:
    """Measured bytes on this rank beside the cost model's prediction."""
    from bmc import ir
    from bmc.analysis import cost
    from bmc.analysis import measure
    tp = ir.get_plan(prog.graph_module, ir.TensorParallelPlan)
    setting = cost.Setting(dp=world, tp=tp.degree if tp else 1, batch=local_batch, seq=seq)
    try:
        prediction = measure.predicted(prog.graph_module, setting)
    except ValueError as exc:  # a loaded program's other inputs may carry sizes of their own
        return f"measured per-rank bytes {measured} (no prediction: {exc})"
    return measure.format_comparison(measured, prediction)


# ------------------------------------------------------------------ the loop


class LossLog:
    """One JSON line per step, written by rank 0; a resumed run drops the lines of steps it
    will redo, so the log ends with exactly one line per step."""

    def __init__(self, path: Path, start: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < start]
        from bmc.ir.serialize import atomic_write_text
        atomic_write_text(str(path), "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


def held_out_loss(task, prog, text, replica: int, replicas: int, world: int, batches: int = 4) -> float:
    with torch.no_grad():
        losses = [mean_over_ranks(task.loss(prog, *text.local(i, replica, replicas)), world) for i in range(batches)]
    return sum(losses) / len(losses)


def maybe_fail(args, step: int, rank: int) -> None:
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if args.simulate_failure == step and rank == args.failure_rank and first_attempt:
        log.warning("simulated failure: rank %d kills itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def check(args) -> None:
    """What can be refused before any process group or model exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch % world:
        raise BmcError(f"--batch {args.batch} does not divide over {world} ranks: use a multiple of {world}")
    if args.pipeline:
        bmc.parse_pipeline(args.pipeline)
    if args.program and (args.pipeline or args.hf_config or args.hf):
        raise BmcError("--program brings its own pipeline and model: drop --pass, --hf and --hf-config")
    if args.hf and args.hf_config:
        raise BmcError("--hf DIR brings its config.json: drop --hf-config")
    if args.hf_config and not (os.path.isfile(args.hf_config)
                               or os.path.isfile(os.path.join(args.hf_config, "config.json"))):
        raise BmcError(f"--hf-config {args.hf_config}: no such file (give a config.json, or a directory holding one)")


def default_out(args, pipeline: str, world: int) -> Path:
    """runs/<model>-<pipeline>-<N>ranks: a second run of the same kind resumes the first, a run
    of another kind starts its own (runs/ is ignored by git)."""
    model = Path(args.hf).name if args.hf else "hf-config" if args.hf_config else \
        Path(args.program).stem if args.program else args.model
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in pipeline).strip("-")
    return ROOT / "runs" / f"{model}-{slug}-{world}ranks"


def check_resumable(manifest: dict, pipeline: str, world: int, reshard: bool, where) -> None:
    """A checkpoint of another pipeline or world size loads (it is resharded), but resuming it
    by accident trains a different run: said in one line unless --reshard asks for it."""
    theirs = (manifest.get("pipeline", pipeline), manifest.get("world_size", world))
    if not reshard and theirs != (pipeline, world):
        raise BmcError(f"{where} holds a run of pipeline {theirs[0]!r} on {theirs[1]} ranks, this one is {pipeline!r} "
                       f"on {world}: pass --reshard to resume it resharded, --no-resume or another --out to start over")


@contextlib.contextmanager
def _profiled(args, step: int, out: Path, rank: int):
    """torch.profiler around the step --trace-step names (forward, backward, collectives and
    the optimizer), exported as a Chrome trace; nothing around the others."""
    if args.trace_step != step:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield
    path = out / f"trace-step-{step}-rank-{rank}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, path)
    log.info("wrote %s (open it in ui.perfetto.dev)", path)


def train(args) -> dict:
    check(args)
    rank, world = init_distributed()
    prog = load_program(args) if args.program else None
    pipeline = prog.pipeline if prog is not None else args.pipeline or ("dce" if world == 1 else "dp")
    tp, pp, micro = plan_degrees(prog.graph_module) if prog is not None else mesh_degrees(pipeline)
    local_batch = args.batch // max(1, world // (tp * pp))  # a replica's rows; its tp and pp ranks share them
    if local_batch % micro:
        raise BmcError(f"a replica's batch of {local_batch} rows does not split into {micro} microbatches: "
                       f"use a --batch that is a multiple of {micro * max(1, world // (tp * pp))}")
    task = Task(args)
    tokens = data.split(task.tokens())
    train_text = data.Batches(tokens.train, args.batch, args.seq, seed=args.seed)
    eval_text = data.Batches(tokens.held_out, args.batch, args.seq, seed=args.seed + 1)
    # a pipelined program is traced at one microbatch's size
    if prog is None:
        prog = bmc.compile(task.build(), passes=pipeline, example_inputs=task.example(local_batch // micro),
                           world_size=world)
    # ranks that split one replica's tensors or layers (tp, pp) read the same rows: the data is split by replica
    mesh = getattr(prog, "mesh", None)
    replica, replicas = (mesh.get_local_rank("dp"), mesh.size(mesh.mesh_dim_names.index("dp"))) \
        if mesh is not None else (rank, world)
    opt = prog.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    out = Path(args.out) if args.out else default_out(args, pipeline, world)
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else out / "checkpoints"
    start, last_loss = 0, None
    if not args.no_resume and checkpoint.latest(ckpt_dir) is not None:
        check_resumable(checkpoint.read_manifest(checkpoint.resolve(ckpt_dir)), prog.pipeline, world, args.reshard,
                        ckpt_dir)
        manifest = checkpoint.load(ckpt_dir, prog, opt)
        start, last_loss = manifest["step"], manifest.get("extra", {}).get("loss")
        if rank == 0:
            log.info("resumed at step %d from %s", start, checkpoint.latest(ckpt_dir))
            if start >= args.steps:
                log.warning("%s already holds step %d of %d: nothing left to train (--steps N to go on, "
                            "--no-resume or another --out to start over)", ckpt_dir, start, args.steps)
    losses = LossLog(out / "loss.jsonl", start, enabled=rank == 0)
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    loss_value = last_loss  # a run with no steps left reports the checkpoint's last loss
    for step in range(start, args.steps):
        maybe_fail(args, step, rank)
        began = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step)
        opt.zero_grad()
        x, y = train_text.local(step, replica, replicas)
        first = step == start
        with _profiled(args, step, out, rank):
            with measure.SavedBytes(prog.parameters()) if first else contextlib.nullcontext() as saved:
                loss = task.step(prog, x, y)
            norm = opt.clip_grad_norm_(args.clip) if args.clip > 0 else None
            opt.step()
        loss_value = mean_over_ranks(loss, world)
        record = {"step": step, "loss": round(loss_value, 6), "lr": learning_rate(args, step),
                  "seconds": round(time.perf_counter() - began, 4)}
        if norm is not None:
            record["grad_norm"] = round(float(norm), 6)
        if opt.loss_scale is not None:
            record["loss_scale"] = opt.loss_scale
        losses.write(record)
        if first and rank == 0 and pp == 1:  # per stage, the prediction is bmc-opt --report's table of stages
            measured = {**opt.memory(), "activations": saved.total}
            log.info("%s", memory_report(prog, replicas, args.batch // replicas, args.seq, measured).rstrip())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if args.eval_every and done % args.eval_every == 0:  # every rank takes part
            evaluation = held_out_loss(task, prog, eval_text, replica, replicas, world)
            if rank == 0:
                log.info("step %d: held-out loss %.4f", done, evaluation)
        if ((args.ckpt_every and done % args.ckpt_every == 0) or done == args.steps):
            checkpoint.save(ckpt_dir, prog, opt, step=done, extra={"loss": loss_value})
    if progress is not None:
        progress.close()
    evaluation = held_out_loss(task, prog, eval_text, replica, replicas, world)
    summary = {"steps": args.steps, "final_loss": loss_value, "held_out_loss": evaluation,
               "world_size": world, "pipeline": pipeline}
    if rank == 0:
        log.info("done: %s", json.dumps(summary))
        from bmc.ir.serialize import atomic_write_text
        atomic_write_text(str(out / "summary.json"), json.dumps(summary, indent=1, allow_nan=False))
        if not args.no_export:
            export_weights(args, task, checkpoint.latest(ckpt_dir), Path(args.export) if args.export else
                           out / "weights", summary)
    if world > 1:
        dist.destroy_process_group()
    return summary


def export_weights(args, task, step_dir: Path, directory: Path, summary: dict) -> None:
    """The final checkpoint's weights as a weights directory (bmc/models/weights.py), read
    256 MiB at a time by this one rank: no rank ever holds the model gathered. A run that
    started from a weights directory with a lineage (--hf DIR of an earlier export) goes on
    from it."""
    from importlib.metadata import version
    from bmc.models import weights
    source = args.hf or args.hf_config  # a directory, or --hf-config's file: the config comes along
    model = args.hf or args.hf_config or (f"program:{args.program}" if args.program else f"zoo:{args.model}")
    provenance = {"kind": "train", "model": model,
                  "steps": summary["steps"], "final_loss": summary["final_loss"],
                  "held_out_loss": summary["held_out_loss"], "world_size": summary["world_size"],
                  "pipeline": summary["pipeline"],
                  "data": task.tokenizer_path() and f"{args.text or 'stdlib sources'} via {task.tokenizer_path()}"
                  or (args.text or "stdlib sources (bytes)"),
                  "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed, "bmc_version": version("bmc")}
    before = weights.lineage_of(args.hf) if args.hf and os.path.isfile(os.path.join(args.hf, weights.LINEAGE)) else []
    weights.export_checkpoint(step_dir, directory, source=source, provenance=provenance, lineage=before)
    log.info("weights written to %s (bmc-opt ... --weights %s)", directory, directory)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar, not through it
            train(args)
    except BmcError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
