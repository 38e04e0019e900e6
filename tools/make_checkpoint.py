#!/usr/bin/env python3
"""Write a Hugging Face checkpoint directory for a named model shape, with seeded random
weights, tensor by tensor: the model is never held (its tensors' names and shapes come from
transformers on the meta device; each tensor is drawn, written and freed in turn).

    python tools/make_checkpoint.py llama-2-7b /data/llama-2-7b      # 6.7e9 parameters, 13.5 GB of bf16
    python tools/make_checkpoint.py llama-tiny /tmp/tiny --layers 8 --shard-size 200KB

The directory is what `save_pretrained` writes (config.json, safetensors shards with
model.safetensors.index.json, a tokenizer: tokenizer.json and tokenizer_config.json, trained
with the `tokenizers` library on the standard library's sources), plus bmc's lineage.json: a
real checkpoint of the same shape loads the same way (`hf:DIR`, transformers'
from_pretrained). The same name, seed and options give the same bytes. Published by rename:
an interrupted run leaves no directory behind; a disk without room for it is refused before
anything is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bmc.errors import BmcError  # noqa: E402

log = logging.getLogger("make_checkpoint")

# Llama-2's published configs (Touvron et al., 2023; the config.json of meta-llama/Llama-2-*-hf);
# TinyLlama-1.1B's for a mid-size one; llama-tiny for tests
SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    # blocks of 12 MB in fp32 behind a small vocabulary: a build's memory is mostly its blocks' (tests)
    "llama-small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5),
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHUNK_ELEMENTS = 16 << 20  # a tensor is drawn this many values at a time (64 MB of fp32)


class CheckpointError(BmcError):
    """Bad options, or no room for the checkpoint."""


def parse_size(text: str) -> int:
    """"5GB", "200KB", "1048576" -> bytes (K, M, G, T: powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not found:
        raise CheckpointError(f"shard size {text!r} is not a size; write e.g. 5GB or 200KB")
    return int(float(found[1]) * 1024 ** " KMGT".index(found[2] or " "))


def config_of(shape: str, layers: int | None, dtype: str):
    from transformers import LlamaConfig
    if shape not in SHAPES:
        raise CheckpointError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if layers is not None:
        if layers < 1:
            raise CheckpointError(f"--layers must be >= 1, got {layers}")
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields)
    config.dtype = DTYPES[dtype]
    return config


def tensor_plan(config, dtype: torch.dtype):
    """The checkpoint's Entries, as transformers names and shapes them (on the meta device):
    the parameters (a tied one once) and the persistent buffers."""
    from transformers import AutoModelForCausalLM
    from bmc.models.weights import Entry
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    saved = set(model.state_dict())
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in saved)]
    return [Entry(name, tuple(t.shape), dtype) for name, t in tensors]


def draw(entry, seed: int, std: float) -> torch.Tensor:
    """The tensor `entry` names: norms' weights are ones, biases zeros, the rest normal(0, std)
    (transformers' own init), drawn from a generator seeded by (seed, name) alone, so a tensor
    is the same whatever else the checkpoint holds."""
    leaf = entry.name.rpartition(".")[2]
    if "norm" in entry.name and leaf == "weight":
        return torch.ones(entry.shape, dtype=entry.dtype)
    if leaf == "bias":
        return torch.zeros(entry.shape, dtype=entry.dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(entry.name.encode()))
    out = torch.empty(entry.shape, dtype=entry.dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, flat.numel())
        flat[start:end] = torch.randn(end - start, generator=generator).mul_(std)
    return out


def check_room(directory: Path, need: int) -> None:
    """Refuse, with the numbers, where the disk has no room for `need` bytes (and 1% to spare)."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need * 1.01:
        raise CheckpointError(f"{directory} needs {need:,} bytes ({need / 2**30:.2f} GiB) and {parent} has "
                              f"{free:,} free; free space or write elsewhere")


def write_tokenizer(config, directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from bmc.models.data import train_tokenizer
    tokenizer = train_tokenizer(config.vocab_size)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {config.vocab_size}")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(directory))


def make_checkpoint(shape: str, directory: str | Path, *, seed: int = 0, layers: int | None = None,
                    dtype: str = "bf16", shard_bytes: int = 5 << 30, progress: bool = True) -> Path:
    """Write the checkpoint; its directory."""
    from tqdm import tqdm
    from bmc.models.weights import write_weights
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    directory = Path(directory)
    config = config_of(shape, layers, dtype)
    entries = tensor_plan(config, DTYPES[dtype])
    total = sum(e.nbytes for e in entries)
    check_room(directory, total)
    log.info("%s: %d tensors, %.3g parameters, %.2f GiB of %s", shape, len(entries),
             sum(e.nbytes // e.dtype.itemsize for e in entries), total / 2**30, dtype)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {directory.name}", disable=not progress)

    def read(group):
        tensors = {e.name: draw(e, seed, config.initializer_range) for e in group}
        bar.update(sum(e.nbytes for e in group))
        return tensors
    with tempfile.TemporaryDirectory(prefix="make_checkpoint_") as carried:
        config.save_pretrained(carried)
        write_tokenizer(config, Path(carried))
        try:
            write_weights(directory, entries, read, source=carried, shard_bytes=shard_bytes,
                          group_bytes=min(256 << 20, shard_bytes),
                          provenance={"kind": "random-init", "shape": shape, "seed": seed, "dtype": dtype,
                                      "layers": config.num_hidden_layers})
        finally:
            bar.close()
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", help=f"one of {', '.join(SHAPES)}")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="blocks, instead of the shape's own number")
    p.add_argument("--dtype", default="bf16", help=f"one of {', '.join(DTYPES)} (default bf16)")
    p.add_argument("--shard-size", default="5GB", help="what one safetensors shard holds at most (default 5GB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = make_checkpoint(args.shape, args.directory, seed=args.seed, layers=args.layers, dtype=args.dtype,
                              shard_bytes=parse_size(args.shard_size), progress=not args.quiet)
    except BmcError as exc:
        print(f"make_checkpoint: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
