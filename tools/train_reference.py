#!/usr/bin/env python3
"""Train the reference checkpoint the compression tests and benchmarks measure on: zoo
gpt-mini on the standard library's sources (byte tokens), seeded, on one process.

    python tools/train_reference.py            # writes bmc/assets/gpt-mini-stdlib.safetensors

Random weights hide what compression does to a real model (no outlier features, no heads
that matter more than others), so accuracy claims are measured on this one. The file is
small (fp32, ~6.5 MB) and kept in the repository; this script is how it was made.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import bmc.passes  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
    import bmc
    bmc.__path__.append(str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bmc.models import data
from bmc.compress import evaluate
from bmc.models import zoo  # noqa: E402
from bmc.models.trained import save_weights  # noqa: E402

log = logging.getLogger("train_reference")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-mini")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "bmc" / "assets" / "gpt-mini-stdlib.safetensors"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = zoo.build(args.model)
    batches = data.Batches(data.split(data.text_tokens()).train, args.batch, args.seq, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        x, y = batches.local(step)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    ppl = evaluate.perplexity(model, evaluate.EvalData.held_out())
    log.info("trained %d steps in %.0f s; held-out perplexity %.4f", args.steps, time.perf_counter() - start, ppl)
    save_weights(model, args.out, metadata={"model": args.model, "steps": str(args.steps),
                                            "held_out_perplexity": f"{ppl:.4f}"})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
