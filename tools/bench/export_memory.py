#!/usr/bin/env python3
"""What exporting a ZeRO-3 program's whole weights costs each rank in memory: `prog.save_weights`
(every rank writes what it holds, rank 0 reads it back a group at a time into safetensors
shards) against gathering them (`prog.full_state_dict()`, every rank then holds the model),
side by side on the same ranks. Peak RSS above the rank's RSS before the call, sampled every
millisecond by a thread of the rank.

    python tools/bench/export_memory.py                        # gpt2-medium, zero3, 2 ranks
    python tools/bench/export_memory.py --model gpt2-large --world-size 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import bmc  # noqa: E402
from bmc.cli.local_ranks import run_ranks  # noqa: E402
from bmc.models import zoo  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """The highest RSS while the block runs, sampled on a thread."""

    def __enter__(self):
        self.before = self.peak = rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.before


def _rank(rank: int, world: int, model: str, directory: str) -> dict:
    torch.manual_seed(0)
    x = torch.zeros(1, 16, dtype=torch.long)
    prog = bmc.compile(zoo.build(model), passes="zero3", example_inputs=(x, x), world_size=world)
    held = sum(p.numel() * p.element_size() for p in prog.parameters())
    whole = sum(e.numel * e.param.element_size() for e in prog.runtime.entries)
    import gc
    gc.collect()
    started = time.perf_counter()
    with PeakRss() as export:
        prog.save_weights(directory, shard_bytes=512 << 20)
    seconds = time.perf_counter() - started
    gc.collect()
    with PeakRss() as gather:
        full = prog.full_state_dict()
        del full
    return {"rank": rank, "held": held, "model": whole, "export": export.extra, "gather": gather.extra,
            "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--keep", metavar="DIR", help="write the weights under DIR and keep them")
    args = p.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="export_memory_")
    try:
        results = run_ranks(args.world_size, _rank, args.model, os.path.join(work, "weights"), timeout=3600)
        mib = 2 ** 20
        print(f"{args.model}, zero3 on {args.world_size} ranks: the model is {results[0]['model'] / mib:,.0f} MiB; "
              f"shards of 512 MiB, read 256 MiB at a time; written in {results[0]['seconds']:.1f} s")
        print("| rank | parameters it holds | peak RSS added by save_weights | by full_state_dict |")
        print("|---|---|---|---|")
        for r in results:
            print(f"| {r['rank']} | {r['held'] / mib:,.0f} MiB | {r['export'] / mib:,.0f} MiB | "
                  f"{r['gather'] / mib:,.0f} MiB |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
