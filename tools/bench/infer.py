#!/usr/bin/env python3
"""Inference benchmark: the ort-paged backend under a memory budget, and its int8 build against
ONNX Runtime's own quantize_dynamic, in one run.

    OMP_NUM_THREADS=1 python tools/bench/infer.py

1. Paging (a GPT of 16 blocks x width 512, ~200 MB of fp32 block weights, random init): each
   configuration serves in a fresh subprocess (batch of prompts, greedy generation), whose peak
   RSS is read from outside (/proc/PID/status VmHWM, before it exits). The fixed overhead is the
   RSS of a serving process that has made the build's sessions and dropped every weight page
   (python, numpy, onnxruntime's code, the sessions' graphs and kernels; serving never imports
   torch); the bound is budget + that overhead, the budget already holding the KV cache and
   activations. Budget 30% of the weight bytes: streamed blocks over prepacked mapped weights
   with prefetch on and off, and fed their plain weights as inputs, against the fully resident
   build.
2. int8, on the paging model (the linears are most of a forward) and on the trained gpt-mini
   (its error means something): latency of a forward of batch x seq token ids, and the output
   error against the fp32 torch model, for bmc's int8 build (the tied head fp32, quant-int8's
   default; and the head quantized too, `quant-int8{skip=[],tied=copy}`, as quantize_dynamic
   does), ONNX Runtime's quantize_dynamic(per_channel=True) of the fp32 ONNX export, bmc's
   fp32 build and ONNX Runtime's session over the fp32 export.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import bmc.passes  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
    import bmc
    bmc.__path__.append(str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bmc  # noqa: E402
from bmc.models import trained
from bmc.models import zoo  # noqa: E402

PAGING_MODEL = zoo.GPTConfig(n_layer=16, n_head=8, n_embd=512, vocab_size=256, block_size=256)

CHILD = r"""
import json, sys, time
import bmc
args = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
if args.get("baseline"):
    import onnxruntime, numpy, bmc.backends.ort_paged  # the runtime's own footprint, nothing loaded
    print(json.dumps({"rss": rss()}), flush=True)
    sys.stdin.readline()  # the parent reads our peak RSS now
    sys.exit(0)
prog = bmc.load(args["dir"], budget=args["budget"], prefetch=args["prefetch"], batch=args["batch"],
                max_len=args["max_len"], threads=args["threads"], streaming=args["streaming"])
if args.get("sessions_only"):  # the build's sessions made (graphs, kernels, ORT's code), no weight in memory
    import os
    from bmc.backends.ort_streamer import drop_mapped
    for part in prog.manifest["parts"]:
        drop_mapped(os.path.join(args["dir"], part["stem"] + ".packed.bin"))
    print(json.dumps({"rss": rss()}), flush=True)
    sys.stdin.readline()
    sys.exit(0)
if args.get("cold"):  # each streamed block's file leaves the page cache after it ran: read from disk when next due
    import os
    streamer, drop = prog.runtime.streamer, prog.runtime.streamer._drop
    def drop_and_evict(block):
        drop(block)
        fd = os.open(os.path.join(args["dir"], prog.manifest["parts"][block]["stem"] + ".packed.bin"), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    streamer._drop = drop_and_evict
prompts = [[(7 * r + i) % 256 for i in range(args["prompt"])] for r in range(args["batch"])]
prog.generate(prompts, 2)  # warm up
start = time.perf_counter()
out = prog.generate(prompts, args["tokens"])
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": args["batch"] * args["tokens"] / seconds, "resident": len(prog.plan.resident),
                  "streamed": len(prog.plan.streamed), "held": prog.plan.weight_bytes,
                  "reserved": prog.runtime.reserved, "read": prog.runtime.streamer.bytes_read, "out": out}), flush=True)
sys.stdin.readline()  # the parent reads our peak RSS now
"""


def _peak_rss(pid: int) -> int:
    """VmHWM of a live process, read from outside (bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc: this benchmark reads peak RSS the Linux way")


def serve_in_child(config: dict) -> dict:
    """Run one configuration in a fresh process; its output and its peak RSS, read from
    /proc/PID/status before it exits (ru_maxrss would carry this big parent's RSS over fork)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    peak = _peak_rss(proc.pid) if line else 0
    _, err = proc.communicate("\n", timeout=60)
    if proc.returncode or not line:
        raise RuntimeError(f"child failed: {err[-1500:]}")
    result = json.loads(line)
    result["peak_rss"] = peak
    return result


def paging(args) -> list[str]:
    torch.manual_seed(0)
    model = zoo.build(PAGING_MODEL).eval()
    directory, build_s = args.paging_dir, 0.0
    if not directory:
        directory = tempfile.mkdtemp(prefix="bmc-infer-")
        start = time.perf_counter()
        bmc.compile(model, example_inputs=model.example_inputs(), dynamic=True, backend="ort-paged",
                    directory=directory)
        build_s = time.perf_counter() - start
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    files = sum(os.path.getsize(os.path.join(directory, p["stem"] + ".bin")) for p in manifest["parts"])
    budget = int(0.3 * files)
    common = dict(dir=directory, batch=args.batch, prompt=args.prompt, tokens=args.tokens, threads=args.threads,
                  max_len=args.prompt + args.tokens + 2)
    imports = serve_in_child({"baseline": True})["rss"]
    # the stated fixed overhead: the serving process with the build's sessions made and every
    # weight page dropped (python, numpy, onnxruntime's code, the sessions' graphs and kernels)
    baseline = serve_in_child({**common, "budget": budget, "prefetch": True, "streaming": "prepacked",
                               "sessions_only": True})["rss"]
    runs = {}
    for _ in range(args.repeat):  # interleaved, so drift on the VM hits every configuration alike
        for name, budget_, prefetch, streaming in (
                ("resident", None, True, "auto"), ("budget 30%, prepacked mapped, prefetch", budget, True, "prepacked"),
                ("budget 30%, prepacked mapped, no prefetch", budget, False, "prepacked"),
                ("budget 30%, prepacked mapped, from disk, prefetch", budget, True, "prepacked cold"),
                ("budget 30%, prepacked mapped, from disk, no prefetch", budget, False, "prepacked cold"),
                ("budget 30%, plain weights as inputs (mmap), prefetch", budget, True, "mmap"),
                ("budget 30%, plain weights read into slots, prefetch", budget, True, "read")):
            runs.setdefault(name, []).append(serve_in_child({**common, "budget": budget_, "prefetch": prefetch,
                                                             "streaming": streaming.split()[0],
                                                             "cold": streaming.endswith("cold")}))
    lines = [f"paging: GPT 16 x 512 (random init), weight files {files:,} bytes, budget {budget:,} (30%), "
             f"batch {args.batch}, prompt {args.prompt}, {args.tokens} new tokens, {args.threads} ORT thread(s), "
             f"build {build_s:.0f} s; fixed overhead {baseline / 2**20:.1f} MiB (the process with the build's "
             f"sessions made and no weight page in memory; of it {imports / 2**20:.1f} MiB is python, numpy, "
             f"onnxruntime and bmc imported; serving imports no torch)",
             "| build | resident / streamed | tokens/s (median) | x resident | peak RSS | RSS - overhead | "
             "bound: budget + overhead | same tokens |", "|---|---|---|---|---|---|---|---|"]
    base_tps = statistics.median(r["tokens_per_s"] for r in runs["resident"])
    reference = runs["resident"][0]["out"]
    for name, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        peak = max(r["peak_rss"] for r in results)
        first = results[0]
        bound = (first["held"] + first["reserved"] + baseline) if name != "resident" else None
        lines.append(f"| {name} | {first['resident']} / {first['streamed']} | {tps:.1f} | {tps / base_tps:.2f}x | "
                     f"{peak / 2**20:.1f} MiB | {(peak - baseline) / 2**20:.1f} MiB | "
                     f"{(budget + baseline) / 2**20:.1f} MiB{' (met)' if bound and peak <= budget + baseline else ''} | "
                     f"{all(r['out'] == reference for r in results)} |")
    return lines


def _ort_session(path: str, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _latency(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def int8_models(args) -> list[tuple[str, torch.nn.Module, int]]:
    """(label, model, sequence length): the paging model (the issue's "same model"), where the
    linears are most of a forward, and the trained gpt-mini, whose error means something (at
    width 128 and 128 positions its attention, fp32 in every build, is a third of a forward)."""
    chosen = []
    if args.int8_model in ("both", "paging"):
        torch.manual_seed(0)
        chosen.append(("GPT 16 x 512 (the paging model, random init)", zoo.build(PAGING_MODEL).eval(), args.int8_seq))
    if args.int8_model in ("both", "gpt-mini"):
        chosen.append(("trained gpt-mini (8 x 128)", trained.load("gpt-mini"), args.int8_seq))
    return chosen


def int8_against_quantize_dynamic(args, label: str, model, seq: int) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    ids = torch.randint(0, 256, (args.int8_batch, seq), generator=torch.Generator().manual_seed(0))
    want = model(ids).detach()
    work = tempfile.mkdtemp(prefix="bmc-int8-")
    fp32_onnx, quantized_onnx = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
    torch.onnx.export(model, (ids,), fp32_onnx, dynamo=True, dynamic_shapes=({0: torch.export.Dim.AUTO,
                                                                              1: torch.export.Dim.AUTO},))
    quantize_dynamic(fp32_onnx, quantized_onnx, per_channel=True, weight_type=QuantType.QInt8)
    ort_int8, ort_fp32 = _ort_session(quantized_onnx, args.threads), _ort_session(fp32_onnx, args.threads)
    feed = {ort_int8.get_inputs()[0].name: ids.numpy()}
    builds = {}
    for name, passes in (("bmc fp32 build", ""), ("bmc int8 build", "quant-int8"),
                         ("bmc int8 build, head too", "quant-int8{skip=[],tied=copy}")):
        builds[name] = bmc.compile(model, passes=passes or [],
                                   example_inputs=model.example_inputs(), dynamic=True, backend="ort-paged",
                                   directory=os.path.join(work, name.replace(" ", "-")), threads=args.threads)
    runners = {"bmc int8 build": lambda: builds["bmc int8 build"](ids.numpy()),
               "bmc int8 build, head too": lambda: builds["bmc int8 build, head too"](ids.numpy()),
               "ORT quantize_dynamic(per_channel)": lambda: ort_int8.run(None, feed)[0],
               "bmc fp32 build": lambda: builds["bmc fp32 build"](ids.numpy()),
               "ORT fp32 export": lambda: ort_fp32.run(None, feed)[0]}
    times = {name: [] for name in runners}
    for _ in range(args.runs):  # interleaved rounds
        for name, fn in runners.items():
            times[name].append(_latency(fn, 1))
    errors = {name: float(np.linalg.norm(fn() - want.numpy()) / np.linalg.norm(want.numpy()))
              for name, fn in runners.items()}
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    anchor, fp32, ort_fp32_ms = ms["ORT quantize_dynamic(per_channel)"], ms["bmc fp32 build"], ms["ORT fp32 export"]
    lines = [f"int8: {label}, forward of {args.int8_batch} x {seq} ids, median of {args.runs} "
             f"interleaved rounds, {args.threads} ORT thread(s)",
             "| build | latency | x quantize_dynamic | x bmc fp32 build | x ORT fp32 export | "
             "relative error vs torch fp32 |", "|---|---|---|---|---|---|"]
    for name in runners:
        lines.append(f"| {name} | {ms[name]:.2f} ms | {ms[name] / anchor:.2f}x | {ms[name] / fp32:.2f}x | "
                     f"{ms[name] / ort_fp32_ms:.2f}x | {errors[name]:.2e} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--int8-batch", type=int, default=8)
    p.add_argument("--int8-seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--only", choices=["paging", "int8"])
    p.add_argument("--int8-model", choices=["both", "paging", "gpt-mini"], default="both")
    p.add_argument("--paging-dir", help="serve this earlier build of the paging model instead of building one")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus")
    if args.only in (None, "int8"):
        for label, model, seq in int8_models(args):
            print("\n".join(int8_against_quantize_dynamic(args, label, model, seq)), flush=True)
    if args.only in (None, "paging"):
        print("\n".join(paging(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
