#!/usr/bin/env python3
"""How far int8 schemes move the logits of a randomly initialized LLaMA-2-7B-wide model, by
depth: the floor under tools/bench/bigmodel.py's logits figure.

    OMP_NUM_THREADS=1 python tools/bench/int8_schemes.py --layers 1,2,4

Each linear (the head too) is fake-quantized in torch (weights rounded to int8 and back, and
activations where the scheme quantizes them), and the first forward's logits of a 32-token
prompt are compared with fp32's (relative error of the whole logits tensor). The model has
transformers' own initialization (normal(0, 0.02)), its weights rounded to bf16 as the
checkpoint of tools/make_checkpoint.py holds them. Schemes:

- weight-only, one scale per row (bmc's quant-int8, act=none; its ONNX Runtime CPU form is
  within 4e-4 of it);
- weight-only, one scale per block of 128 or 32 inputs (finer scales, not a bmc option);
- W8A8, activations per token (quant-int8{act=dynamic});
- W8A8, activations per tensor (ONNX Runtime's DynamicQuantizeLinear; bmc's CPU form before
  2026-12-06).
"""
from __future__ import annotations

import argparse

import torch


def quantize_weight(w: torch.Tensor, block: int | None) -> torch.Tensor:
    grouped = w.reshape(w.shape[0], -1, block) if block else w.reshape(w.shape[0], 1, -1)
    scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return ((grouped / scale).round().clamp(-127, 127) * scale).reshape(w.shape)


def per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)], then back."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(high - low, 1e-8) / 255
    zero = round(-low / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero) * scale


SCHEMES = {"weight-only, per row": (None, None), "weight-only, per 128": (128, None),
           "weight-only, per 32": (32, None), "W8A8 per token": (None, per_token),
           "W8A8 per tensor": (None, per_tensor)}


def errors(layers: int, tokens: int) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        original = {m: m.weight.detach().clone() for m in linears}
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        reference = model(ids).logits.double()
        out = {}
        for name, (block, activations) in SCHEMES.items():
            hooks = []
            for m in linears:
                m.weight.copy_(quantize_weight(original[m], block))
                if activations is not None:
                    hooks.append(m.register_forward_pre_hook(lambda _, args, f=activations: (f(args[0]),)))
            logits = model(ids).logits.double()
            for hook in hooks:
                hook.remove()
            out[name] = float((logits - reference).norm() / reference.norm())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="1,2,4", help="depths to measure, comma-separated")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    print("| blocks | " + " | ".join(SCHEMES) + " |")
    print("|---|" + "---|" * len(SCHEMES))
    for layers in (int(n) for n in args.layers.split(",")):
        row = errors(layers, args.tokens)
        print(f"| {layers} | " + " | ".join(f"{row[name]:.4f}" for name in SCHEMES) + " |", flush=True)


if __name__ == "__main__":
    main()
