#!/usr/bin/env python3
"""Serving a Hugging Face LLaMA-architecture checkpoint: bmc's ort-paged builds against
onnxruntime-genai (its model builder run on the same directory), side by side in one run.

    OMP_NUM_THREADS=1 python tools/bench/serve_hf.py                 # 12 layers, width 768, GQA
    OMP_NUM_THREADS=1 python tools/bench/serve_hf.py --layers 2 --width 128 --repeat 1 --batches 1   # a smoke run

The checkpoint is written here (random weights, a byte-level BPE tokenizer trained with the
`tokenizers` library on the standard library's sources): nothing is downloaded. Each build
decodes greedily from the same prompts; the figures are time to first token (prefill of the
prompt and the first new token) and decode tokens/s after it (new tokens x batch / time), the
median of --repeat rounds (each build once per round, in turn; with --isolate each run in a
fresh process of its own, as a server holds one model), at batch 1 and 8, with the
same number of ONNX Runtime threads on each side (--threads; OMP_NUM_THREADS by default). Both sides run the same precision at a
time: fp32 against genai's `-p fp32`; bmc's quant-int8 (the head kept fp32, bmc's default) and
quant-int8{skip=[]} (the head quantized too, as genai's int8 does) against genai's `-p int8`.
bmc's paged build (a budget of 30% of the weights, which genai cannot do; when its fixed parts
do not fit that, the smallest budget in steps of 5% that does, said in the output) is compared
against bmc's resident fp32 build.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- the checkpoint

def _stdlib_text(limit: int = 4_000_000) -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        size += len(texts[-1])
        if size > limit:
            break
    return texts


def _tokenizer(vocab: int):
    from transformers import PreTrainedTokenizerFast
    from bmc.models.data import train_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab), bos_token="<s>", eos_token="</s>")


def write_checkpoint(directory: str, layers: int, width: int, heads: int, kv_heads: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = _tokenizer(vocab)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=width * 8 // 3 // 64 * 64,
                         vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ----------------------------------------------------------------------------- the runs

def _prompts(directory: str, batch: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    ids = tok.encode("".join(_stdlib_text(200_000))).ids
    return [ids[i * length:(i + 1) * length] for i in range(batch)]


def _timed_stream(steps) -> tuple[float, float, list]:
    """Time to the first step and the time of the rest, draining a generator of steps."""
    start = time.perf_counter()
    first, out = None, []
    for step in steps:
        out.append(step)
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start - first, out


def genai_stream(model, prompts: list[list[int]], new: int):
    import numpy as np
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + new, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    for _ in range(new):
        generator.generate_next_token()
        yield generator.get_next_tokens().tolist()


def bmc_stream(prog, prompts: list[list[int]], new: int):
    yield from prog.generate(prompts, new, stream=True)


def open_stream(spec: dict, batch: int, max_len: int, threads: int):
    """A build's generator of steps: spec {"kind": "genai" | "bmc", "path": DIR, "budget": bytes}."""
    if spec["kind"] == "genai":
        import onnxruntime_genai as og
        model = og.Model(spec["path"])
        return lambda prompts, new: genai_stream(model, prompts, new)
    prog = load_bmc(spec["path"], batch, max_len, spec.get("budget"), threads)
    return lambda prompts, new: bmc_stream(prog, prompts, new)


def _in_process(spec: dict, prompts, new: int, max_len: int, threads: int):
    stream = open_stream(spec, len(prompts), max_len, threads)
    return lambda: _timed_stream(stream(prompts, new))


def _in_own_process(spec: dict, prompts, new: int, max_len: int, threads: int):
    """Each call a fresh process that opens the build, decodes once to warm up and once timed:
    a server holds one model, and sessions in one process run at different speeds by the
    order they were made in (5-13% apart over the same file on this VM, measured)."""
    job = json.dumps({"spec": spec, "prompts": prompts, "new": new, "max_len": max_len, "threads": threads})

    def run():
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", job], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"the run of {spec['path']} in its own process failed: {done.stderr[-800:]}")
        return tuple(json.loads(done.stdout.strip().splitlines()[-1]))  # (first, rest, tokens)
    return run


def _child(job: str) -> None:
    job = json.loads(job)
    stream = open_stream(job["spec"], len(job["prompts"]), job["max_len"], job["threads"])
    _timed_stream(stream(job["prompts"], job["new"]))  # warm-up
    print(json.dumps(_timed_stream(stream(job["prompts"], job["new"]))))


def measure(runners: dict, new: int, batch: int, repeat: int, warm_round: bool) -> dict:
    """Each build's figures, the builds run in turn in every round (a drift of the machine's
    speed, which is large on a shared VM, then falls on all of them alike); with `warm_round`
    the first round warms up and is dropped."""
    runs: dict[str, list] = {name: [] for name in runners}
    for _ in range(repeat + warm_round):
        for name, run in runners.items():
            runs[name].append(run())
    results = {}
    for name, timed in runs.items():
        timed = timed[warm_round:]
        ttft = statistics.median(r[0] for r in timed)
        decode = statistics.median(r[1] for r in timed)
        results[name] = {"ttft_ms": ttft * 1e3, "tok_s": (new - 1) * batch / decode,
                         "tokens": [list(step) for step in timed[-1][2]]}
    return results


def build_genai(directory: str, out: str, precision: str, threads: int) -> str:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", directory, "-o", out, "-p", precision,
           "-e", "cpu", "-c", os.path.join(out, "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"onnxruntime-genai's builder failed ({precision}): {done.stderr[-800:]}")
    _threads(out, threads)
    return out


def _threads(out: str, threads: int) -> None:
    """genai reads its session options from genai_config.json: `threads` intra-op threads, as bmc's side."""
    path = os.path.join(out, "genai_config.json")
    with open(path) as f:
        config = json.load(f)
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def build_bmc(directory: str, out: str, passes: str) -> str:
    """An ort-paged build directory of the checkpoint; each batch size loads it afresh."""
    import bmc
    bmc.compile(f"hf:{directory}", passes=passes, backend="ort-paged", directory=out, dynamic=True)
    return out


def load_bmc(build: str, batch: int, max_len: int, budget: int | None, threads: int):
    import bmc
    return bmc.load(build, budget=budget, batch=batch, max_len=max_len, threads=threads)


def _paged(ours: dict, batch: int, max_len: int, total: int, fraction: float, threads: int):
    """The fp32 build under `fraction` of the weights, or the smallest fraction in steps of 5%
    its fixed parts fit (said); (program, fraction), or (None, None) past 60%."""
    from bmc.errors import BmcError
    if not ours:
        return None, None
    while fraction <= 0.6:
        try:
            return load_bmc(ours["fp32"], batch, max_len, int(total * fraction), threads), fraction
        except BmcError as exc:
            print(f"paged build at batch {batch}, {fraction:.0%} budget: {exc}")
            fraction = round(fraction + 0.05, 2)
    return None, None


def weight_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))


# ----------------------------------------------------------------------------- the table

def _row(name: str, result: dict, anchor: dict | None) -> str:
    ratio = f"{result['tok_s'] / anchor['tok_s']:.2f}x" if anchor else ""
    return f"| {name} | {result['ttft_ms']:.1f} ms | {result['tok_s']:.1f} | {ratio} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="ONNX Runtime intra-op threads, on both sides (default: OMP_NUM_THREADS, else 1)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--budget", type=float, default=0.3, help="the paged build's budget, a fraction of the weights")
    p.add_argument("--anchor-only", action="store_true", help="only onnxruntime-genai (checks the anchor's side)")
    p.add_argument("--keep", metavar="DIR", help="write everything under DIR and keep it (default: a temporary one)")
    p.add_argument("--isolate", action="store_true",
                   help="run each build in a fresh process of its own every round (as a server holds one model), "
                        "not all in this one")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args.child)
    work = args.keep or tempfile.mkdtemp(prefix="serve_hf_")
    os.makedirs(work, exist_ok=True)
    try:
        ckpt = os.path.join(work, "checkpoint")
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            write_checkpoint(ckpt, args.layers, args.width, args.heads, args.kv_heads, args.vocab)
        total = weight_bytes(ckpt)
        print(f"checkpoint: LLaMA {args.layers} layers, width {args.width}, {args.heads} heads / {args.kv_heads} kv "
              f"heads, {total / 2**20:.1f} MiB of weights; prompt {args.prompt}, {args.new} new tokens, "
              f"median of {args.repeat}, {args.threads} ONNX Runtime thread(s) on each side")
        genai = {precision: build_genai(ckpt, os.path.join(work, f"genai-{precision}"), precision, args.threads)
                 for precision in ("fp32", "int8")}
        ours = {} if args.anchor_only else {
            "fp32": build_bmc(ckpt, os.path.join(work, "bmc-fp32"), ""),
            "int8": build_bmc(ckpt, os.path.join(work, "bmc-int8"), "quant-int8"),
            "int8, head too": build_bmc(ckpt, os.path.join(work, "bmc-int8-head"), "quant-int8{skip=[]}")}
        max_len = args.prompt + args.new
        runner = _in_own_process if args.isolate else _in_process
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = _prompts(ckpt, batch, args.prompt)
            specs = {f"onnxruntime-genai {p}": ({"kind": "genai", "path": d}, p) for p, d in genai.items()}
            for name, build in ours.items():
                specs[f"bmc {name}"] = ({"kind": "bmc", "path": build}, name.split(",")[0])
            paged, fraction = _paged(ours, batch, max_len, total, args.budget, args.threads)
            if paged is not None:
                print(f"paged build at batch {batch}: {len(paged.runtime.plan.resident)} of "
                      f"{len(paged.runtime.plan.resident) + len(paged.runtime.plan.streamed)} blocks resident "
                      f"under {int(total * fraction):,} B ({fraction:.0%} of the weights, KV cache and activations "
                      f"included)")
                del paged
                specs[f"bmc fp32 paged, {fraction:.0%} budget"] = (
                    {"kind": "bmc", "path": ours["fp32"], "budget": int(total * fraction)}, "paged")
            runners = {name: runner(spec, prompts, args.new, max_len, args.threads) for name, (spec, _) in specs.items()}
            results = measure(runners, args.new, batch, args.repeat, warm_round=not args.isolate)
            anchor = {"fp32": "onnxruntime-genai fp32", "int8": "onnxruntime-genai int8", "paged": "bmc fp32"}
            print(f"\nbatch {batch}\n| build | time to first token | decode tokens/s | x anchor |\n|---|---|---|---|")
            for name, (_, precision) in specs.items():
                ref = results.get(anchor[precision]) if anchor[precision] != name else None
                print(_row(name, results[name], ref))
            if "bmc fp32" in results:
                same = results["bmc fp32"]["tokens"] == results["onnxruntime-genai fp32"]["tokens"]
                print(f"greedy tokens of bmc fp32 and onnxruntime-genai fp32 equal: {same}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
