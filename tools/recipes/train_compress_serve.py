#!/usr/bin/env python3
"""Train, compress, serve: one path from a distributed training run to a served int8 model,
with the lineage of every step.

For each model (a zoo GPT, and a LLaMA-architecture Hugging Face model built from a config):

1. train it on 2 gloo ranks under `zero3,ckpt` (tools/train.py under torchrun), which writes
   the trained weights as a weights directory with their lineage;
2. load them (`bmc.compile(..., weights=...)`) and prune a copy: half the heads by Taylor
   scores, a quarter of the blocks by Block Influence, on calibration text;
3. distill the pruned student against the trained teacher (`bmc.distill`);
4. quantize it to int8 and build it for ONNX Runtime under a memory budget (ort-paged);
5. serve the build, and print one table: per stage the held-out perplexity, the weight bytes,
   and decode tokens/s of the served build against the trained fp32 torch model (greedy,
   with a KV cache, batch 1, same thread count).

    OMP_NUM_THREADS=1 python tools/recipes/train_compress_serve.py                 # full scale
    OMP_NUM_THREADS=1 python tools/recipes/train_compress_serve.py --small --out /tmp/r   # minutes

Everything lands under --out (default runs/recipe): each model's training run, its served
build, and `results.json`; `bmc run <out>/<model>/served --info` shows the lineage.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import bmc.passes  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without installing
    sys.path.insert(0, str(ROOT))
    import bmc
    bmc.__path__.append(str(ROOT))

import torch  # noqa: E402

import bmc  # noqa: E402
from bmc.compress import calibration, evaluate  # noqa: E402
from bmc.models import data  # noqa: E402
from bmc.serve import kv_cache  # noqa: E402
from bmc.serve.generate import generate  # noqa: E402

PRUNE = "prune-heads{ratio=0.5,score=taylor},prune-layers{ratio=0.25,policy=score}"
SCALES = {  # training steps, batch, seq; distillation steps; prompt and new tokens served
    "full": {"steps": 800, "batch": 32, "seq": 128, "distill": 100, "prompt": 32, "new": 64},
    "small": {"steps": 6, "batch": 4, "seq": 32, "distill": 2, "prompt": 8, "new": 8},
}
LLAMA = {  # a LLaMA-architecture config of gpt-mini's size (byte tokens)
    "full": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256},
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny models and a few steps (what CI runs)")
    p.add_argument("--models", default="gpt,llama", help="gpt, llama or both (default)")
    p.add_argument("--out", default=str(ROOT / "runs" / "recipe"))
    p.add_argument("--budget", type=float, default=0.5,
                   help="the served build's memory budget, a fraction of its weight bytes plus its reserve")
    p.add_argument("--repeat", type=int, default=3, help="timed generations per build (the best is kept)")
    return p.parse_args(argv)


def train(model: str, scale: dict, out: Path, small: bool) -> Path:
    """tools/train.py on 2 ranks under zero3,ckpt; the run's directory (its weights/ inside)."""
    if model == "gpt":
        source = ["--model", "gpt-tiny" if small else "gpt-mini"]
    else:
        import transformers
        config = transformers.LlamaConfig(**LLAMA["small" if small else "full"], bos_token_id=0, eos_token_id=0,
                                          pad_token_id=0, tie_word_embeddings=False)
        config.save_pretrained(out / "config")
        source = ["--hf-config", str(out / "config")]
    run = out / "train"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "tools" / "train.py"), *source, "--pass", "zero3,ckpt", "--steps", str(scale["steps"]),
               "--batch", str(scale["batch"]), "--seq", str(scale["seq"]), "--ckpt-every", "0", "--no-progress",
               "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    print(f"[{model}] training: {' '.join(command[3:])}", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training {model} failed:\n{done.stderr[-3000:]}")
    return run


class Logits:
    """A model as evaluate scores it: token ids in, logits out (HF programs take input_ids=)."""

    def __init__(self, model, hf: bool):
        self.model, self.hf = model, hf

    def __call__(self, ids):
        return self.model(input_ids=ids) if self.hf else self.model(ids)


def served_logits(served):
    return lambda ids: torch.from_numpy(served(ids.numpy()))


def torch_tokens_per_s(program, prompt: list[int], new: int, repeat: int) -> tuple[float, list[int]]:
    """The fp32 torch model decoding greedily with a KV cache (its traced graph's decode step)."""
    step_gm, layout = kv_cache.decode_step(copy.deepcopy(program.graph_module))

    @torch.no_grad()
    def step(ids, positions, mask, caches, logits_positions=None):
        last = torch.tensor([ids.shape[1] - 1])
        out = step_gm(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(mask),
                      *[torch.as_tensor(c) for c in caches], last)
        return out[0].numpy(), list(out[1:])

    def empty(batch):
        return kv_cache.empty_cache(layout, batch)
    return _timed(lambda: generate(step, empty, [prompt], max_new_tokens=new)[0], new, repeat)


def _timed(run, new: int, repeat: int) -> tuple[float, list[int]]:
    run()  # warm-up
    best, tokens = 0.0, None
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run()
        best = max(best, new / (time.perf_counter() - start))
    return best, tokens


def recipe(model: str, args, scale: dict, out: Path) -> dict:
    hf = model == "llama"
    run = train(model, scale, out, args.small)
    weights = run / "weights"
    spec = f"hf:{weights}" if hf else ("zoo:gpt-tiny" if args.small else "zoo:gpt-mini")
    trained = bmc.compile(spec, weights=None if hf else str(weights), dynamic=True)
    held_out = evaluate.EvalData.held_out(seq=scale["seq"], count=16 if args.small else 32)
    rows = {"trained (fp32)": trained}
    batches = calibration.text_batches(None, count=4 if args.small else 8, batch=4 if args.small else 8,
                                       seq=scale["seq"])
    if hf:
        batches = [((), {"input_ids": b[0]}) for b in batches]
    pruned = bmc.compile(copy.deepcopy(trained), passes=PRUNE, calibration=batches, dynamic=True)
    print(f"[{model}] pruned: {PRUNE}", flush=True)
    scores = {"trained (fp32)": evaluate.perplexity(Logits(trained, hf), held_out),
              "pruned": evaluate.perplexity(Logits(pruned, hf), held_out)}
    sizes = {"trained (fp32)": evaluate.weight_bytes(trained.graph_module),
             "pruned": evaluate.weight_bytes(pruned.graph_module)}
    text = data.Batches(data.split(data.text_tokens()).train, scale["batch"], scale["seq"], seed=11)
    distilled, history = bmc.distill(pruned, trained, text, signals="both", steps=scale["distill"], lr=1e-3,
                                     log_every=0, progress=False)
    print(f"[{model}] distilled {scale['distill']} steps, loss {history[-1]['loss']:.4f}", flush=True)
    scores["pruned + distilled"] = evaluate.perplexity(Logits(distilled, hf), held_out)
    sizes["pruned + distilled"] = evaluate.weight_bytes(distilled.graph_module)
    int8 = bmc.compile(copy.deepcopy(distilled), passes="quant-int8", dynamic=True)
    scores["+ int8 (torch)"] = evaluate.perplexity(Logits(int8, hf), held_out)
    sizes["+ int8 (torch)"] = evaluate.weight_bytes(int8.graph_module)
    served_dir = out / "served"
    # a RoPE model's positions are its config's (the distilled program no longer carries one)
    max_len = LLAMA["small" if args.small else "full"]["max_position_embeddings"] if hf else None
    build = bmc.compile(copy.deepcopy(distilled), passes="quant-int8", backend="ort-paged",
                        directory=str(served_dir), max_len=max_len)
    weight_bytes = sum(p["weight_bytes"] for p in build.manifest["parts"])
    del build
    budget = int(weight_bytes * args.budget) + _reserve(served_dir, scale)
    served = bmc.load(str(served_dir), budget=budget, threads=1, max_len=scale["prompt"] + scale["new"])
    scores["served int8 build"] = evaluate.perplexity(served_logits(served), held_out)
    sizes["served int8 build"] = weight_bytes
    prompt = held_out.windows[0, :scale["prompt"]].tolist()
    torch.set_num_threads(1)
    anchor, _ = torch_tokens_per_s(trained, prompt, scale["new"], args.repeat)
    speed, _ = _timed(lambda: served.generate([prompt], scale["new"])[0], scale["new"], args.repeat)
    plan = served.plan
    return {"model": model, "spec": spec, "weights": str(weights), "served": str(served_dir),
            "perplexity": scores, "weight_bytes": sizes, "budget": budget,
            "resident": f"{len(plan.resident)} of {len(plan.resident) + len(plan.streamed)} blocks",
            "tokens_per_s": {"trained fp32 torch": anchor, "served int8 build": speed},
            "lineage": [s["kind"] for s in served.lineage], "scale": scale}


def _reserve(directory: Path, scale: dict) -> int:
    from bmc.backends.ort_budget import reserved_bytes
    manifest = json.loads((directory / "manifest.json").read_text())
    fixed = sum(p["weight_bytes"] for p in manifest["parts"] if p["kind"] != "block")
    return reserved_bytes(manifest, 1, scale["prompt"] + scale["new"]) + fixed


def table(result: dict) -> str:
    scores, sizes, speed = result["perplexity"], result["weight_bytes"], result["tokens_per_s"]
    base = scores["trained (fp32)"]
    lines = [f"{result['model']} ({result['spec']}): trained {result['scale']['steps']} steps on 2 ranks (zero3,ckpt); "
             f"served under {result['budget']:,} B ({result['resident']} resident); lineage "
             f"{' -> '.join(result['lineage'])}",
             "| stage | held-out perplexity | weight bytes | decode tokens/s |", "|---|---|---|---|"]
    for stage, ppl in scores.items():
        tokens = {"trained (fp32)": speed["trained fp32 torch"], "served int8 build": speed["served int8 build"]}
        shown = f"{tokens[stage]:.1f}" if stage in tokens else ""
        if stage == "served int8 build":
            shown += f" ({speed['served int8 build'] / speed['trained fp32 torch']:.2f}x the fp32 torch model)"
        lines.append(f"| {stage} | {ppl:.4f} ({ppl / base - 1:+.1%}) | {sizes[stage]:,} | {shown} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SCALES["small" if args.small else "full"]
    out = Path(args.out)
    results = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model not in ("gpt", "llama"):
            raise SystemExit(f"--models takes gpt and llama, got {model!r}")
        (out / model).mkdir(parents=True, exist_ok=True)
        results.append(recipe(model, args, scale, out / model))
        print("\n" + table(results[-1]) + "\n", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
