"""Real text that ships with Python, tokenized at byte level (or by a checkpoint's own tokenizer),
and deterministic batches of it.

The standard library's own source files are the corpus: nothing is downloaded, every
machine with the same Python has the same bytes. Batches depend only on (seed, step), and
each rank takes its slice of the global batch, so a run resumed on another number of ranks
sees the same data at the same step."""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from bmc.errors import BmcError

VOCAB = 256  # bytes


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # the top-level modules only: a stable set across installs (no site-packages, no tests)
    return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_text(max_bytes: int = 8 * 2**20) -> bytes:
    """The standard library's top-level .py files concatenated in name order, up to max_bytes."""
    chunks, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise BmcError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}: pass a text file instead")
    return b"".join(chunks)[:max_bytes]


def text_bytes(path: str | None = None, max_bytes: int = 8 * 2**20) -> bytes:
    """A text file's bytes, or the built-in corpus's when `path` is None."""
    if path is None:
        return stdlib_text(max_bytes)
    try:
        return Path(path).read_bytes()[:max_bytes]
    except OSError as exc:
        raise BmcError(f"cannot read the text file {path}: {exc.strerror}; pass an existing file") from None


def text_tokens(path: str | None = None, max_bytes: int = 8 * 2**20) -> torch.Tensor:
    """Byte tokens of a text file, or of the built-in corpus when `path` is None."""
    return torch.frombuffer(bytearray(text_bytes(path, max_bytes)), dtype=torch.uint8).long()


def tokenized(tokenizer_path: str, path: str | None = None, max_bytes: int = 8 * 2**20) -> torch.Tensor:
    """The text (a file, or the built-in corpus) as a tokenizer's ids: what a model read from a
    Hugging Face directory with its tokenizer.json learns from, rather than bytes."""
    from bmc.extras import require
    tokenizers = require("tokenizers", "training on a checkpoint's tokenizer")
    text = text_bytes(path, max_bytes)
    try:
        tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for bad files
        raise BmcError(f"cannot read {tokenizer_path} as a tokenizer: {' '.join(str(exc).split())[:160]}") from None
    return torch.tensor(tokenizer.encode(text.decode("utf-8", "replace")).ids, dtype=torch.long)


@dataclass(frozen=True)
class Split:
    train: torch.Tensor
    held_out: torch.Tensor


def split(tokens: torch.Tensor, held_out: float = 0.05) -> Split:
    """The last `held_out` fraction of the text is kept for evaluation."""
    cut = int(len(tokens) * (1 - held_out))
    return Split(tokens[:cut], tokens[cut:])


class Batches:
    """Global batch `step` of `global_batch` windows of `seq + 1` bytes; rank r takes rows
    [r * local, (r + 1) * local) and gets (inputs, targets) shifted by one."""

    def __init__(self, tokens: torch.Tensor, global_batch: int, seq: int, seed: int = 0):
        if len(tokens) <= seq + 1:
            raise BmcError(f"the text has {len(tokens)} tokens, too few for windows of {seq + 1}: "
                           f"use a longer text or a shorter --seq")
        self.tokens, self.global_batch, self.seq, self.seed = tokens, global_batch, seq, seed

    def global_rows(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.global_batch,), generator=gen)
        return torch.stack([self.tokens[s:s + self.seq + 1] for s in starts.tolist()])

    def local(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_batch % world_size:
            raise BmcError(f"the global batch {self.global_batch} does not divide over {world_size} ranks: "
                           f"use a batch that is a multiple of {world_size}")
        local = self.global_batch // world_size
        rows = self.global_rows(step)[rank * local:(rank + 1) * local]
        return rows[:, :-1], rows[:, 1:]


def train_tokenizer(vocab: int, max_bytes: int = 4 * 2**20):
    """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab` tokens, "<s>" and "</s>"
    among them, trained on the built-in corpus: the tokenizer of checkpoints made on this
    machine (tools/make_checkpoint.py, tools/bench/serve_hf.py), nothing downloaded."""
    from bmc.extras import require
    tokenizers = require("tokenizers", "training a tokenizer")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    lines = stdlib_text(max_bytes).decode("utf-8", errors="replace").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer
