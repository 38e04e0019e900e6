"""`bmc run DIR --prompt TEXT`: serve an ort-paged build from the command line.

    bmc run served/ --prompt "def main(" --max-tokens 64 --budget 40M
    python -m bmc run served/ --prompt-ids 1,2,3 --temperature 0.8 --top-k 40

A build from a Hugging Face directory carries its tokenizer (tokenizer.json): the prompt is
tokenized and what is generated detokenized with the `tokenizers` library. Byte-level models
(a 256-token vocabulary, as the zoo's) read the prompt as UTF-8 bytes. Text is printed as it
comes, token by token; with --prompt-ids every model takes and prints ids.
A status line on stderr shows the residency plan and the tokens per second. Errors are one
line with exit status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Sequence

from bmc.errors import BmcError
from bmc.extras import require
from bmc.serve.text import Stream, Text, default_eos, load_tokenizer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


class ServeUsageError(BmcError):
    """A bad `bmc run` command line."""


def parse_bytes(text: str) -> int:
    """'40M', '1.5G', '123456' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ServeUsageError(f"--budget {text!r}: give bytes, optionally with K, M or G (e.g. 40M)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ServeUsageError(f"{message} (see bmc run --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bmc run", description="Generate with an ort-paged build (bmc-opt --backend=ort-paged -o DIR).")
    p.add_argument("directory", help="the build directory")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--info", action="store_true",
                      help="say what the build is and where it came from (its lineage, from the training run "
                           "where the weights record one), its files verified; generate nothing")
    text.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    text.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", help="bytes of weights, KV cache and activations to hold (e.g. 40M; default: all)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos", type=int, default=None, help="stop a prompt at this token id")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read streamed blocks without overlapping compute (default: overlap where --threads "
                        "leaves a core free)")
    p.add_argument("--streaming", choices=["auto", "prepacked", "mmap", "read"], default="auto",
                   help="how streamed blocks get their weights (default: prepacked where the build's fit this machine)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the run's paging timeline: each part's compute, the waits for streamed blocks' "
                        "weights and their page-ins on the prefetch thread (needs matplotlib: the plot extra)")
    return p


def _prompts(args, vocab: int, text: Text) -> list[list[int]]:
    if args.prompt_ids:
        try:
            prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids]
        except ValueError:
            raise ServeUsageError("--prompt-ids takes comma-separated integers, e.g. 1,2,3") from None
    elif text.tokenizer is None and vocab != 256:
        raise ServeUsageError(f"this model's vocabulary has {vocab} tokens, not bytes, and the build carries no "
                              f"tokenizer: give --prompt-ids (or build it from hf:DIR with a tokenizer.json)")
    else:
        prompts = [text.encode(p) for p in args.prompt]
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ServeUsageError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    if not all(prompts):
        raise ServeUsageError("a prompt gives no tokens: give some text (or ids)")
    return prompts


def run(argv: Sequence[str] | None, out, err) -> int:
    import bmc
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ServeUsageError("--max-tokens must be >= 1")
    budget = parse_bytes(args.budget) if args.budget else None
    started = time.perf_counter()
    for package in ("numpy", "onnxruntime"):
        require(package, "bmc run")
    from bmc.backends.ort_paged import read_manifest
    manifest = read_manifest(args.directory)
    if args.info:
        return _info(args.directory, manifest, out)
    if manifest.get("task") == "encoder":
        raise ServeUsageError(f"{args.directory} is an encoder build: bmc run generates tokens; load it with "
                              f"bmc.load(DIR) and call it on token ids for hidden states")
    as_text = args.prompt is not None
    tokenizer = load_tokenizer(args.directory, manifest) if as_text else None
    text = Text(tokenizer)
    prompts = _prompts(args, manifest["layout"]["vocab"], text)
    eos = args.eos if args.eos is not None else default_eos(args.directory, tokenizer)
    prompts_len = max(len(p) for p in prompts)
    # the budget's reserve is sized for this batch and these lengths (too long is refused by generate)
    max_len = min(manifest["max_len"], prompts_len + args.max_tokens)
    prog = bmc.load(args.directory, budget=budget, prefetch=False if args.no_prefetch else None, threads=args.threads,
                    batch=len(prompts), max_len=max_len, streaming=args.streaming)
    plan = prog.plan
    err.write(f"bmc run: {prog.manifest['model']} ({prog.manifest['pipeline'] or 'no passes'}), "
              f"{len(plan.resident)} blocks resident, {len(plan.streamed)} streamed, "
              f"{plan.weight_bytes:,} bytes of weights held; loaded in {time.perf_counter() - started:.1f}s\n")
    streams = [Stream(text, prompt) for prompt in prompts]
    if args.plot:
        require("matplotlib", "bmc run --plot")  # before the run, not after it
    events = prog.runtime.record_timeline() if args.plot else None
    start, count = time.perf_counter(), 0
    for tokens in prog.generate(prompts, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                seed=args.seed, eos=eos, stream=True):
        count += sum(t is not None for t in tokens)
        for row, token in enumerate(tokens):
            if token is None:
                continue
            if as_text:
                shown = streams[row].add(token)
            else:
                streams[row].ids.append(token)
                shown = f"{token} "
            if len(prompts) == 1 and shown:  # one prompt: show it as it comes
                out.write(shown)
                out.flush()
    seconds = time.perf_counter() - start
    if len(prompts) > 1:
        for row, stream in enumerate(streams):
            shown = stream.continuation() if as_text else " ".join(map(str, stream.ids))
            out.write(f"[{row}] {shown}\n")
    else:
        out.write((streams[0].finish() if as_text else "") + "\n")
    err.write(f"bmc run: {count} tokens in {seconds:.2f}s ({count / max(seconds, 1e-9):.1f} tokens/s, "
              f"prompt of {prompts_len})\n")
    if events is not None:
        from bmc.cli.plots import paging_figure
        title = (f"{prog.manifest['model']}: {len(plan.resident)} blocks resident, {len(plan.streamed)} streamed "
                 f"under {args.budget or 'no'} budget, {count} tokens")
        err.write(f"bmc run: wrote {paging_figure(events, title, args.plot)}\n")
    return 0


def _info(directory: str, manifest: dict, out) -> int:
    """--info: the build and its lineage; 1 where a link of the chain does not hold."""
    from bmc.backends.ort_paged import verify_files
    from bmc.lineage import check_chain, describe
    verify_files(directory, manifest)  # a damaged file is refused in one line, as loading does
    weights = sum(p["weight_bytes"] for p in manifest["parts"])
    out.write(f"{directory}: {manifest['model']}, pipeline {manifest['pipeline'] or '(none)'}, "
              f"{manifest.get('task', 'causal-lm')}, {len(manifest['parts'])} parts ({len(manifest['blocks'])} "
              f"blocks), {weights:,} bytes of weights; {len(manifest['files'])} files verified\n")
    lineage = manifest.get("lineage", [])
    if not lineage:
        out.write("lineage: none recorded (built before bmc recorded lineage)\n")
        return 0
    out.write(f"lineage, {len(lineage)} step{'s' if len(lineage) > 1 else ''} (oldest first):\n")
    out.write(describe(lineage) + "\n")
    return 1 if check_chain(lineage) else 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv, sys.stdout, sys.stderr)
    except BmcError as exc:
        sys.stderr.write(f"bmc run: error: {' '.join(str(exc).split())}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bmc run: interrupted\n")
        return 130
