#!/usr/bin/env python3
"""Distillation benchmark: how much of the perplexity that pruning costs the trained zoo gpt-mini
does bmc.distill win back, and in how many steps.

    OMP_NUM_THREADS=1 python tools/bench/distill.py           # the defaults below: the measured claim
    python tools/bench/distill.py --steps 300 --signals logits --score magnitude

The teacher is the trained gpt-mini (bmc/assets, tools/train_reference.py). The student is a
copy pruned by `prune-heads{ratio=0.5,score=taylor},prune-layers{ratio=0.25}` (half the heads,
ranked by Taylor scores on 8 calibration batches of training text; then 2 of the 8 blocks). It
is distilled on batches of the training split of the standard library's sources; perplexity is
bmc.evaluate's, on 32 held-out windows of the last 5% of that text, which training never sees.

    recovered = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_teacher)

1.0 means the student is back at the teacher's perplexity; the claim is >= 0.5.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc.compress import calibration
from bmc.models import data
from bmc.compress import evaluate
from bmc.models import trained  # noqa: E402

PRUNE = "prune-heads{{ratio=0.5,score={score}}},prune-layers{{ratio=0.25}}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--signals", default="both", choices=("logits", "hidden", "both"))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of distillation against the LM loss")
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--score", default="taylor", choices=("taylor", "magnitude"))
    p.add_argument("--seed", type=int, default=0, help="seed of the training batches")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return p.parse_args(argv)


def pruned_student(teacher: torch.nn.Module, score: str) -> bmc.Program:
    """A pruned copy of the teacher, traced with dynamic batch and sequence (the calibration,
    training and evaluation batches differ in size)."""
    example = teacher.example_inputs(batch=2, seq=128)
    batches = calibration.text_batches(None, count=8, batch=8, seq=128)
    return bmc.compile(copy.deepcopy(teacher), passes=PRUNE.format(score=score), example_inputs=example,
                       dynamic=True, calibration=batches)


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    held_out = evaluate.EvalData.held_out()
    teacher = trained.load("gpt-mini")
    student = pruned_student(teacher, args.score)
    ppl_teacher = evaluate.perplexity(teacher, held_out)
    ppl_pruned = evaluate.perplexity(student, held_out)
    train = data.Batches(data.split(data.text_tokens()).train, args.batch, args.seq, seed=args.seed)
    start = time.perf_counter()
    student, history = bmc.distill(student, teacher, train, signals=args.signals, steps=args.steps, lr=args.lr,
                                   temperature=args.temperature, alpha=args.alpha,
                                   hidden_weight=args.hidden_weight, log_every=0)
    seconds = time.perf_counter() - start
    ppl_distilled = evaluate.perplexity(student, held_out)
    return {"teacher": ppl_teacher, "pruned": ppl_pruned, "distilled": ppl_distilled,
            "recovered": (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_teacher),
            "steps": args.steps, "seconds": seconds, "final_loss": history[-1]["loss"],
            "pipeline": PRUNE.format(score=args.score), "signals": args.signals, "batch": args.batch,
            "seq": args.seq, "lr": args.lr, "threads": torch.get_num_threads()}


def report(result: dict) -> str:
    return "\n".join([
        f"student: {result['pipeline']}; distilled with signals={result['signals']}, batch {result['batch']} x seq "
        f"{result['seq']}, lr {result['lr']:g}, {result['threads']} thread(s)",
        f"held-out perplexity  teacher {result['teacher']:.4f}   pruned {result['pruned']:.4f}   "
        f"distilled {result['distilled']:.4f}",
        f"recovered fraction   {result['recovered']:.3f}  (claim: >= 0.5)",
        f"steps {result['steps']}   distillation time {result['seconds']:.1f} s "
        f"({result['seconds'] / result['steps'] * 1000:.0f} ms/step)",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = measure(args)
    print(report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
