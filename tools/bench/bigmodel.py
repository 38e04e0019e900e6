#!/usr/bin/env python3
"""A model larger than memory on this machine: a LLaMA-2-7B-shaped checkpoint (13.5 GB of
bf16, 27 GB as fp32) built into an int8 ort-paged directory block by block, and served under a
memory budget, against the memory-bandwidth bound and against transformers + accelerate's
offloading, in one run.

    OMP_NUM_THREADS=1 python tools/bench/bigmodel.py --work /data/big          # the 7B run (~40 GB of disk)
    OMP_NUM_THREADS=1 python tools/bench/bigmodel.py --shape llama-small --layers 8 --budget 40MB   # a smoke run

Every figure is measured in a process of its own, its peak RSS read from outside (the kernel's
count for the process: wait4's ru_maxrss for the build, VmHWM for a server):
- the checkpoint (tools/make_checkpoint.py, random weights, seeded) and the build
  (`bmc-opt hf:DIR --pass=PIPELINE --backend=ort-paged`): time, peak RSS, disk used;
- the machine's sequential read bandwidth of the build's weight files, from the page cache
  (a second read) and from disk (after posix_fadvise DONTNEED), and the bound each implies:
  weight bytes a decode step reads / bandwidth;
- serving (bmc.load: prefill of a --prompt-token prompt, then --new tokens greedily) at batch 1
  and 8, fully resident and under --budget (or the least budget that fits, in steps of 10%,
  said): time to first token, decode tokens/s, its fraction of the bounds, peak RSS against
  budget + the fixed overhead (the same process with the build's sessions made and no weight
  page held), and per block where the time goes (paged in by the prefetch thread, waited
  for, computed);
- the anchor: transformers' from_pretrained with accelerate's device_map="auto",
  max_memory={"cpu": budget} and an offload folder (the checkpoint's dtype), batch 1;
- the build's first-step logits (the prompt's last position) against an fp32 torch forward of
  the same checkpoint that reads each weight when a node needs it (bmc/ir/deferred.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
GB = 1e9
STEPS = ("build", "bandwidth", "serving", "logits", "anchor")


def parse_bytes(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, size in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-2]) * size)
    return int(text)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of `cmd` in a process of its own: the peak as the
    kernel counted it for that process, read by its parent (wait4), not reported by itself."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code:
            killed = " (killed: out of memory?)" if code == -9 else ""
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {code}{killed}: {err.read()[-1500:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- bandwidth

def read_bandwidth(paths: list[str], cold: bool) -> float:
    """Bytes/s of reading `paths` start to end in 16 MB reads; `cold`: out of the page cache first."""
    total, chunk = 0, 16 << 20
    if cold:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                data = f.read(chunk)
                if not data:
                    break
                total += len(data)
    return total / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- serving

SERVE = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
import bmc
prog = bmc.load(args["dir"], budget=args["budget"], batch=args["batch"], max_len=args["max_len"],
                threads=args["threads"])
if args.get("sessions_only"):
    from bmc.backends.ort_streamer import drop_mapped
    for part in prog.manifest["parts"]:
        drop_mapped(os.path.join(args["dir"], part["stem"] + ".packed.bin"))
    print(json.dumps({"rss": rss()}), flush=True); sys.stdin.readline(); sys.exit(0)
prompts = [[(31 * r + 7 * i) % 500 + 2 for i in range(args["prompt"])] for r in range(args["batch"])]
events = prog.runtime.record_timeline() if prog.plan.streamed else None
started = time.perf_counter()
stream = prog.generate(prompts, args["new"], stream=True)
first = next(stream)
ttft = time.perf_counter() - started
if events is not None:
    events.clear()
started = time.perf_counter()
out = [first] + list(stream)
decode = time.perf_counter() - started
lanes = {}
for lane, name, start, end in (events or []):
    lanes.setdefault(lane, []).append(end - start)
print(json.dumps({"ttft": ttft, "tok_s": (args["new"] - 1) * args["batch"] / decode, "out": out,
                  "resident": len(prog.plan.resident), "streamed": len(prog.plan.streamed),
                  "held": prog.plan.weight_bytes, "reserved": prog.runtime.reserved,
                  "lanes": {k: [sum(v), len(v)] for k, v in lanes.items()}}), flush=True)
sys.stdin.readline()
"""


def serve(config: dict) -> dict:
    """One serving configuration in a fresh process; its result and its VmHWM (read before it exits)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE, json.dumps(config)], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    peak = 0
    if line:
        with open(f"/proc/{proc.pid}/status") as f:
            peak = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    _, err = proc.communicate("\n", timeout=600)
    if proc.returncode or not line:
        return {"error": err.strip().splitlines()[-1] if err.strip() else "no output"}
    return {**json.loads(line), "peak_rss": peak}


def serve_fitting(config: dict, budget: int | None, most: int) -> tuple[dict, int | None]:
    """Under `budget`, or the least budget above it in steps of 10% that serving fits."""
    while True:
        result = serve({**config, "budget": budget})
        if "error" not in result or budget is None or "below what serving needs" not in result["error"]:
            return result, budget
        budget = int(budget * 1.1)
        if budget > most:
            return result, budget


# ----------------------------------------------------------------------------- the anchor

ACCELERATE = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from transformers import AutoModelForCausalLM
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args["ckpt"], device_map="auto", dtype="auto",
                                             max_memory={"cpu": args["budget"]}, offload_folder=args["offload"])
load = time.perf_counter() - started
prompt = torch.tensor([[(7 * i) % 500 + 2 for i in range(args["prompt"])]])
with torch.no_grad():
    started = time.perf_counter()
    out = model(prompt, use_cache=True)
    ttft = time.perf_counter() - started
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(args["new"] - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - started
print(json.dumps({"load": load, "ttft": ttft, "tok_s": (args["new"] - 1) / decode, "dtype": str(model.dtype)}))
"""


def accelerate_anchor(ckpt: str, budget: int, work: str, prompt: int, new: int, threads: int) -> dict:
    offload = os.path.join(work, "offload")
    shutil.rmtree(offload, ignore_errors=True)
    job = json.dumps({"ckpt": ckpt, "budget": budget, "offload": offload, "prompt": prompt, "new": new,
                      "threads": threads})
    try:
        seconds, peak, out = _run_script(ACCELERATE, job)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    return {**json.loads(out.strip().splitlines()[-1]), "seconds": seconds, "peak_rss": peak}


def _run_script(script: str, job: str) -> tuple[float, int, str]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".bigmodel-child.py")
    with open(path, "w") as f:
        f.write(script)
    try:
        return run_measured([sys.executable, path, job])
    finally:
        os.remove(path)


# ----------------------------------------------------------------------------- logits

REFERENCE = r"""
import json, sys, numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from bmc.ir import deferred
from bmc.models import hf
import bmc
ids = torch.tensor([[(7 * i) % 500 + 2 for i in range(args["prompt"])]])
graph = hf.load_graph("hf:" + args["ckpt"], device="deferred", dtype=torch.float32)
reference = deferred.run_reading_weights(graph, ids)[0][0, -1].float().numpy()
# the same pipeline run by torch, block by block: the error the scheme itself makes on these
# weights, apart from what the ONNX Runtime lowering adds
from bmc.passmgr.manager import PassContext, PassManager
graph = hf.load_graph("hf:" + args["ckpt"], device="deferred", dtype=torch.float32)
graph = PassManager(args["pipeline"], context=PassContext(world_size=1)).run(graph).graph_module
program = deferred.run_reading_weights(graph, ids)[0][0, -1].float().numpy()
del graph
prog = bmc.load(args["build"], threads=args["threads"], budget=args["budget"], max_len=args["prompt"] + 2)
caches = prog.empty_cache(1, args["prompt"] + 2)
positions = np.arange(args["prompt"])[None]
built, _ = prog.step(ids.numpy(), positions, np.ones_like(ids.numpy()), caches)
built = np.asarray(built).reshape(-1)
def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
print(json.dumps({"relative_error": relative(built, reference), "same_top1": bool(built.argmax() == reference.argmax()),
                  "max_abs": float(np.abs(built - reference).max()),
                  "torch_program_error": relative(program, reference), "lowering_error": relative(built, program)}))
"""


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", help="a tools/make_checkpoint.py shape")
    p.add_argument("--layers", type=int, help="fewer blocks than the shape's (smoke runs)")
    p.add_argument("--work", default="/tmp/bmc-bigmodel", help="where the checkpoint and the build go")
    p.add_argument("--pipeline", default="quant-int8{skip=[]}", help="the build's passes (default: every "
                   "projection int8, the head too)")
    p.add_argument("--budget", default="1.5GB", help="the serving budget (and the anchor's max_memory)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=16, help="tokens generated per serving run")
    p.add_argument("--anchor-new", type=int, default=3, help="tokens the accelerate anchor generates")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--skip-anchor", action="store_true")
    p.add_argument("--reuse", action="store_true", help="serve the build --work already holds (with --keep)")
    p.add_argument("--steps", default=",".join(STEPS), help="which steps to run (a rerun of some, with --keep "
                   "and --json, adds to the last run's figures)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the build (else deleted at the end)")
    p.add_argument("--json", help="write every figure here too")
    args = p.parse_args()
    budget = parse_bytes(args.budget)
    os.makedirs(args.work, exist_ok=True)
    ckpt, build = os.path.join(args.work, "checkpoint"), os.path.join(args.work, "build")
    figures: dict = {"shape": args.shape, "layers": args.layers, "pipeline": args.pipeline, "budget": budget,
                     "threads": args.threads, "cpus": os.cpu_count()}
    steps = set(args.steps.split(","))
    if args.json and os.path.isfile(args.json) and steps != set(STEPS):  # a partial rerun adds to the last run
        with open(args.json) as f:
            figures = {**json.load(f), **{k: v for k, v in figures.items() if k != "layers"}}
    try:
        if "build" in steps:
            _checkpoint_and_build(args, ckpt, build, figures)
        if "bandwidth" in steps:
            _bandwidth(build, figures)
        if "serving" in steps:
            _serving(args, build, budget, figures)
        if "logits" in steps:
            figures["logits"] = json.loads(_run_script(REFERENCE, json.dumps(
                {"ckpt": ckpt, "build": build, "prompt": args.prompt, "threads": args.threads,
                 "budget": budget, "pipeline": args.pipeline}))[2].strip().splitlines()[-1])
            print(f"logits of the first step against fp32 torch: {figures['logits']}", flush=True)
        if "anchor" in steps and not args.skip_anchor:
            figures["accelerate"] = accelerate_anchor(ckpt, budget, args.work, args.prompt, args.anchor_new,
                                                      args.threads)
            print(f"accelerate: {figures['accelerate']}", flush=True)
        print("\n" + "\n".join(table(figures)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


def _checkpoint_and_build(args, ckpt: str, build: str, figures: dict) -> None:
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_checkpoint.py"), args.shape, ckpt,
               "--quiet"] + (["--layers", str(args.layers)] if args.layers else [])
        seconds, peak, _ = run_measured(cmd)
        figures["checkpoint"] = {"seconds": seconds, "peak_rss": peak, "bytes": du(ckpt)}
        print(f"checkpoint: {figures['checkpoint']}", flush=True)
    if args.reuse and os.path.isfile(os.path.join(build, "manifest.json")):
        return
    shutil.rmtree(build, ignore_errors=True)
    cmd = [sys.executable, "-m", "bmc.cli.opt", f"hf:{ckpt}", f"--pass={args.pipeline}",
           "--backend=ort-paged", "-o", build]
    seconds, peak, out = run_measured(cmd)
    figures["build"] = {"seconds": seconds, "peak_rss": peak, "bytes": du(build),
                        "blocks": len(json.load(open(os.path.join(build, "manifest.json")))["blocks"])}
    print(f"build: {figures['build']}", flush=True)


def _bandwidth(build: str, figures: dict) -> None:
    manifest = json.load(open(os.path.join(build, "manifest.json")))
    from bmc.backends.ort_paged import packed_bytes
    files = [os.path.join(build, part["stem"] + ".packed.bin") for part in manifest["parts"]]
    # what a step's sessions read: each part's prepacked buffers (its file holds the plain copy
    # too, unread); the embedding only looks rows up
    step_bytes = sum(packed_bytes(build, part) for part in manifest["parts"] if part["kind"] != "embed")
    read_bandwidth(files, cold=False)  # into the page cache
    cached = statistics.median(read_bandwidth(files, cold=False) for _ in range(3))
    disk = read_bandwidth(files, cold=True)
    figures["bandwidth"] = {"page_cache": cached, "disk": disk, "step_bytes": step_bytes}
    print(f"bandwidth: {figures['bandwidth']}", flush=True)


def _serving(args, build: str, budget: int, figures: dict) -> None:
    common = {"dir": build, "prompt": args.prompt, "new": args.new, "threads": args.threads,
              "max_len": args.prompt + args.new + 2}
    resident_bytes = du(build)
    figures["overhead"] = serve({**common, "batch": 1, "budget": budget, "sessions_only": True}).get("rss")
    runs = {}
    for batch in (1, 8):
        runs[f"resident, batch {batch}"] = {**serve({**common, "batch": batch, "budget": None}), "budget": None}
        result, used = serve_fitting({**common, "batch": batch}, budget, resident_bytes)
        runs[f"budget, batch {batch}"] = {**result, "budget": used}
        for name in (f"resident, batch {batch}", f"budget, batch {batch}"):
            print(f"{name}: { {k: v for k, v in runs[name].items() if k != 'out'} }", flush=True)
    figures["serving"] = runs


def table(f: dict) -> list[str]:
    """The run's figures as markdown; a run of some --steps shows what it has."""
    lines = [f"{f['shape']}{' x ' + str(f['layers']) if f['layers'] else ''}, {f['pipeline']}, "
             f"{f['threads']} thread(s), {f['cpus']} cores",
             "", "| step | time | peak RSS | disk |", "|---|---|---|---|"]
    if "checkpoint" in f:
        c = f["checkpoint"]
        lines.append(f"| checkpoint (make_checkpoint.py) | {c['seconds']:.0f} s | {c['peak_rss'] / GB:.2f} GB | "
                     f"{c['bytes'] / GB:.2f} GB |")
    if "build" in f:
        b = f["build"]
        lines.append(f"| ort-paged build, {b['blocks']} blocks | {b['seconds']:.0f} s | {b['peak_rss'] / GB:.2f} GB | "
                     f"{b['bytes'] / GB:.2f} GB |")
    if "bandwidth" in f and "serving" in f:
        lines += _serving_rows(f, f["bandwidth"])
    if "logits" in f:
        lines.append(f"\nfirst-step logits against fp32 torch (weights read as needed): relative error "
                     f"{f['logits']['relative_error']:.4f}, same top-1: {f['logits']['same_top1']}")
        if "torch_program_error" in f["logits"]:
            lines.append(f"the same pipeline run by torch against fp32: {f['logits']['torch_program_error']:.4f}; "
                         f"the build against it (the lowering's share): {f['logits']['lowering_error']:.4f}")
    if "accelerate" in f:
        a, ours = f["accelerate"], f.get("serving", {}).get("budget, batch 1", {})
        ratio = f"; bmc {ours['tok_s'] / a['tok_s']:.1f}x its tokens/s" if ours.get("tok_s") else ""
        lines.append(f"transformers + accelerate offload ({a['dtype']}, max_memory {f['budget'] / GB:.2f} GB): "
                     f"load {a['load']:.0f} s, TTFT {a['ttft']:.1f} s, {a['tok_s']:.3f} tok/s, peak RSS "
                     f"{a['peak_rss'] / GB:.2f} GB{ratio}")
    return lines


def _serving_rows(f: dict, bw: dict) -> list[str]:
    lines = ["", f"read bandwidth of the weight files: {bw['page_cache'] / GB:.2f} GB/s from the page cache, "
                 f"{bw['disk'] / GB:.2f} GB/s from disk; a decode step reads {bw['step_bytes'] / GB:.2f} GB of "
                 f"weights; fixed overhead of a server {(f.get('overhead') or 0) / GB:.2f} GB", "",
             "| serving | budget | resident / streamed | TTFT | decode tok/s | x page-cache bound | x disk bound | "
             "peak RSS | per block: page-in / wait / compute (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in f["serving"].items():
        if "error" in r:
            lines.append(f"| {name} | {r.get('budget')} | {r['error'][:80]} | | | | | | |")
            continue
        batch = int(name.rsplit(" ", 1)[1])
        bounds = [r["tok_s"] / (batch * bw[k] / bw["step_bytes"]) for k in ("page_cache", "disk")]
        lanes = r.get("lanes") or {}
        per = " / ".join(f"{lanes[k][0] / max(lanes[k][1], 1) * 1e3:.0f}" if k in lanes else "-"
                         for k in ("page-in", "wait", "compute-streamed"))
        lines.append(f"| {name} | {(r['budget'] or 0) / GB:.2f} GB | {r['resident']} / {r['streamed']} | "
                     f"{r['ttft']:.2f} s | {r['tok_s']:.2f} | {bounds[0]:.2f} | {bounds[1]:.2f} | "
                     f"{r['peak_rss'] / GB:.2f} GB | {per} |")
    return lines


if __name__ == "__main__":
    main()
