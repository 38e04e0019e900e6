"""Run a function on N local processes over gloo (torch.multiprocessing): the multi-process
harness of the tests and benchmarks. Production runs use torchrun; this is for one machine."""
import io
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Tensors cross the process boundary as bytes: a tensor shared through the queue
        # would die with this process before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _check_alive(procs, got, deadline: float, timeout: float) -> None:
    """A rank that died without reporting (killed, or failed while starting) fails the run
    now rather than at the timeout."""
    for rank, p in enumerate(procs):
        if rank not in got and p.exitcode not in (None, 0):
            raise AssertionError(f"rank {rank} died with exit code {p.exitcode} before reporting a result")
    if time.monotonic() > deadline:
        raise AssertionError(f"ranks {sorted(set(range(len(procs))) - set(got))} gave no result in {timeout:.0f}s")


def run_ranks(world_size: int, fn, *args, timeout: float = 300):
    """fn(rank, world_size, *args) on every rank; returns the results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got = {}
        try:
            deadline = time.monotonic() + timeout
            while len(got) < world_size:
                try:
                    rank, value, error = results.get(timeout=1)
                except queue.Empty:
                    _check_alive(procs, got, deadline, timeout)
                    continue
                if error:
                    raise AssertionError(f"rank {rank} failed:\n{error}")
                got[rank] = torch.load(io.BytesIO(value), weights_only=True)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [got[r] for r in range(world_size)]
