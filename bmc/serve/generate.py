"""Token generation over a decode step with a KV cache (bmc/kv_cache.py's step run by any
backend): a batch of prompts, left-padded, greedy or sampled, stopping at EOS or max tokens,
with the new tokens yielded step by step when streaming.

`step(ids, positions, mask, caches) -> (logits, caches)`: ids/positions [B, T] int64, mask
[B, S] int64 and logits are numpy arrays; caches a list of [B, heads, P, head_dim], numpy or
the backend's own values (ONNX Runtime's OrtValues), passed back as the step returned them
(ort-paged's resident step writes into buffers of every position the generation needs, and
the mask's width says how many hold tokens: backends/ort_cache.py).
The step may consume the list it is given (ort-paged frees each block's old cache as soon as
the block ran), so nothing here keeps a reference to it past the call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from bmc.errors import BmcError


class GenerationError(BmcError):
    """Bad generation arguments."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0:
            raise GenerationError("temperature and top_k must be >= 0 (temperature 0 is greedy)")


def _pad_left(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        cut = np.sort(scaled, axis=-1)[:, -min(sampling.top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled < cut, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def stream(step: Callable, empty_cache: Callable[[int], list], prompts: Sequence[Sequence[int]], *,
           max_new_tokens: int = 32, sampling: Sampling = Sampling(), eos: int | None = None, pad: int = 0,
           max_len: int | None = None) -> Iterator[list[int | None]]:
    """Yields, per step, each prompt's new token (None once that prompt has stopped)."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask = _pad_left(prompts, pad)
    if max_len is not None and ids.shape[1] + max_new_tokens > max_len:
        raise GenerationError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's {max_len} positions; shorten the prompt or ask for fewer tokens")
    rng = np.random.default_rng(sampling.seed)
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    logits, caches = step(ids, positions, mask, empty_cache(len(prompts)))
    done = np.zeros(len(prompts), dtype=bool)
    for count in range(1, max_new_tokens + 1):
        token = _choose(logits[:, -1], sampling, rng)
        yield [None if d else int(t) for t, d in zip(token, done)]
        if eos is not None:
            done |= token == eos
        if done.all() or count == max_new_tokens:  # no step for logits nobody reads
            return
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        logits, caches = step(token[:, None].astype(np.int64), positions, mask, caches)


def generate(step: Callable, empty_cache: Callable[[int], list], prompts: Sequence[Sequence[int]], **kw) -> list[list[int]]:
    """Each prompt's new tokens (up to and including EOS)."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream(step, empty_cache, prompts, **kw):
        for row, token in enumerate(tokens):
            if token is not None:
                out[row].append(token)
    return out
