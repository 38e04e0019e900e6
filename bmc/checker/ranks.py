"""The ranks a distributed check runs on: `world_size` local processes over gloo, each loading
the program from a .pt2 archive as a separate process would, running the batches and writing
what it recorded next to the archive.

Started as `python -m bmc.checker.ranks DIR RANK WORLD` rather than by multiprocessing:
spawn re-runs the caller's main script in every child, so a script calling bmc.check without
an `if __name__ == "__main__"` guard (a README snippet, a notebook) would recurse.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from bmc.errors import BmcError

TIMEOUT_S = 600


def run_on_ranks(directory: str, world_size: int) -> list[dict]:
    """Run every rank on `directory` (program.pt2, batches.pt, options.pt) and return what each
    recorded, in rank order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bmc.checker.ranks", directory, str(r), str(world_size)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world_size)]
    deadline = time.monotonic() + TIMEOUT_S
    errors = {}
    for rank, proc in enumerate(procs):
        try:
            _, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise BmcError(f"the check's rank {rank} gave no result in {TIMEOUT_S}s")
        if proc.returncode != 0:
            errors[rank] = _last_line(stderr)
    if errors:
        rank, line = min(errors.items())
        raise BmcError(f"the check's rank {rank} failed: {line}")
    return [torch.load(os.path.join(directory, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and "Warning" not in ln]
    return lines[-1] if lines else "no message"


def main(directory: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'init')}", rank=rank,
                            world_size=world_size)
    try:
        from bmc.checker import rank_record
        batches = torch.load(os.path.join(directory, "batches.pt"), weights_only=True)
        options = torch.load(os.path.join(directory, "options.pt"), weights_only=True)
        record = rank_record(os.path.join(directory, "program.pt2"), batches, **options)
        tmp = os.path.join(directory, f".rank{rank}.pt")
        torch.save(record, tmp)
        os.replace(tmp, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
