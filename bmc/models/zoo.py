"""Built-in models: small, readable GPT, LLaMA and BERT families in plain torch.nn.

They exist so that every pass and backend has models to test on whose structure is known
exactly: GPT has a fused qkv projection and tied embeddings, LLaMA has separate q/k/v,
grouped-query attention, RoPE and SwiGLU, BERT is a post-norm bidirectional encoder.
Module and parameter names follow nanoGPT and Hugging Face, so plans written by module
name (``transformer.h.3.attn.c_attn``, ``model.layers.0.self_attn.q_proj``) read the same.

    model = zoo.build("llama-70b", device="meta")   # no memory: plan a 70B model on a laptop
    ep = torch.export.export(model, model.example_inputs(), strict=False)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from bmc.errors import ZooError


# ---------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        _check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} % n_head != 0")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_head: int
    n_kv_head: int
    dim: int
    ffn_dim: int
    vocab_size: int
    max_seq: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check(self.dim % self.n_head == 0, f"dim={self.dim} % n_head != 0")
        _check(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} % n_kv_head != 0")
        _check(self.dim // self.n_head % 2 == 0, "RoPE needs an even head_dim")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    n_layer: int
    n_head: int
    hidden: int
    ffn_dim: int
    vocab_size: int
    max_position: int
    type_vocab_size: int = 2

    def __post_init__(self):
        _check(self.hidden % self.n_head == 0, f"hidden={self.hidden} % n_head != 0")


Config = Union[GPTConfig, LlamaConfig, BertConfig]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ZooError(f"bad model config: {message}")


# ---------------------------------------------------------------------------- shared

class _ZooModel(nn.Module):
    """What every zoo model offers besides forward: its config and example inputs."""

    config: Config
    _seq_field: str  # the config field that bounds the sequence length

    def _max_seq(self) -> int:
        return getattr(self.config, self._seq_field)

    def example_inputs(self, batch: int = 2, seq: int | None = None) -> tuple[torch.Tensor]:
        """``(input_ids,)`` of shape [batch, seq], seeded, on the parameters' device."""
        seq = min(16, self._max_seq()) if seq is None else seq
        if not 0 < seq <= self._max_seq():
            raise ZooError(f"seq={seq} is out of range: this model takes 1..{self._max_seq()}")
        device = next(self.parameters()).device
        if device.type == "meta":
            return (torch.empty(batch, seq, device="meta", dtype=torch.long),)
        # Drawn on the CPU so the same ids come out whatever the device.
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.config.vocab_size, (batch, seq), generator=gen)
        return (ids.to(device),)

    def _init_weights(self, std: float = 0.02) -> None:
        """GPT-2/BERT init: N(0, std) for Linear and Embedding weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.LayerNorm, RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; targets are taken as given (the caller shifts them)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, T, n_head * hd] -> [B, n_head, T, hd], the layout sdpa wants."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[B, n_head, T, hd] -> [B, T, n_head * hd]."""
    B, H, T, hd = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * hd)


# ---------------------------------------------------------------------------- GPT

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        # One fused projection for q, k and v, as in GPT-2: tensor parallelism has to split
        # its output dimension in three before sharding heads, which is why it is here.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (_split_heads(t, self.n_head) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(_merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(_ZooModel):
    _seq_field = "block_size"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: one Parameter under two names, which sharding passes must keep whole.
        self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()
        # nanoGPT's scaled init: each block adds two residual branches, so shrink their
        # output projections to keep the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits if targets is None else _loss(logits, targets)


# ---------------------------------------------------------------------------- LLaMA

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 so bf16/fp16 models do not lose the small mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cache(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [max_seq, head_dim], on the default device.

    Under ``torch.device("meta")`` they are meta tensors; after ``to_empty`` on a real
    device call ``Llama.reset_rope()`` to fill them in again.
    """
    head_dim = cfg.dim // cfg.n_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # the rotate_half layout (as in HF)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, hd] by position; cos/sin are [T, hd] and broadcast over B and H."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.dim // cfg.n_head
        kv_dim = cfg.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_kv, T, hd] -> [B, n_head, T, hd], each kv head shared by consecutive q heads.

        Done with expand+reshape (Hugging Face's repeat_kv) rather than sdpa's enable_gqa:
        the repeat is then plain view/expand ops in the graph that every backend, ONNX
        included, understands, and a tensor-parallel pass can see which q heads share a kv head.
        """
        rep = self.n_head // self.n_kv_head
        if rep == 1:
            return x
        B, H, T, hd = x.shape
        return x[:, :, None].expand(B, H, rep, T, hd).reshape(B, H * rep, T, hd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.n_head)
        k = _split_heads(self.k_proj(x), self.n_kv_head)
        v = _split_heads(self.v_proj(x), self.n_kv_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(_merge_heads(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(_ZooModel):
    _seq_field = "max_seq"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Non-persistent: derived from the config, so not part of the state dict or the
        # parameter count, and recomputed rather than sharded or checkpointed.
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def reset_rope(self) -> None:
        """Recompute the RoPE tables in place (after ``to_empty`` from the meta device)."""
        with torch.device(self.rope_cos.device):
            cos, sin = rope_cache(self.config)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.size(1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        return logits if targets is None else _loss(logits, targets)


# ---------------------------------------------------------------------------- BERT

class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=1e-12)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(p(x), self.n_head) for p in (self.query, self.key, self.value))
        # Bidirectional: every token sees every other (no padding mask in the zoo's inputs).
        return _merge_heads(F.scaled_dot_product_attention(q, k, v))


class BertResidual(nn.Module):
    """dense -> add the residual -> LayerNorm: BERT's post-norm sublayer output."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidual(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.ffn_dim)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidual(cfg.ffn_dim, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class Bert(_ZooModel):
    _seq_field = "max_position"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))
        self._init_weights()

    def forward(self, input_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------- registry

def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    # 50304 = GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT does.
    return GPTConfig(n_layer, n_head, n_embd, vocab_size=50304, block_size=1024)


CONFIGS: dict[str, Config] = {
    # Byte-level (vocab 256) models small enough to run in every test.
    "gpt-tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64),
    "gpt-mini": GPTConfig(n_layer=8, n_head=4, n_embd=128, vocab_size=256, block_size=128),
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "llama-tiny": LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, dim=64, ffn_dim=172,
                              vocab_size=256, max_seq=64),
    "llama-mini": LlamaConfig(n_layer=8, n_head=8, n_kv_head=2, dim=128, ffn_dim=344,
                              vocab_size=256, max_seq=128),
    "llama-1b": LlamaConfig(n_layer=16, n_head=32, n_kv_head=8, dim=2048, ffn_dim=8192,
                            vocab_size=128256, max_seq=4096, rope_theta=500000.0),
    # LLaMA-1 7B: 6,738,415,616 parameters.
    "llama-7b": LlamaConfig(n_layer=32, n_head=32, n_kv_head=32, dim=4096, ffn_dim=11008,
                            vocab_size=32000, max_seq=2048, norm_eps=1e-6),
    # Sized to exactly 7,500,000,000 parameters, the Psi = 7.5e9 of the ZeRO paper's memory
    # table, so that table can be checked digit for digit against cost.py.
    "llama-7.5b": LlamaConfig(n_layer=32, n_head=30, n_kv_head=30, dim=3840, ffn_dim=14557,
                              vocab_size=32034, max_seq=2048, norm_eps=1e-6),
    "llama-70b": LlamaConfig(n_layer=80, n_head=64, n_kv_head=8, dim=8192, ffn_dim=28672,
                             vocab_size=32000, max_seq=4096),
    "bert-tiny": BertConfig(n_layer=2, n_head=4, hidden=64, ffn_dim=256, vocab_size=256,
                            max_position=64),
    "bert-base": BertConfig(n_layer=12, n_head=12, hidden=768, ffn_dim=3072,
                            vocab_size=30522, max_position=512),
    "bert-large": BertConfig(n_layer=24, n_head=16, hidden=1024, ffn_dim=4096,
                             vocab_size=30522, max_position=512),
}

_FAMILIES = {GPTConfig: GPT, LlamaConfig: Llama, BertConfig: Bert}


def names() -> list[str]:
    """The built-in model names, smallest first within each family."""
    return list(CONFIGS)


def config(name: str) -> Config:
    """The frozen config of a built-in model."""
    if name in CONFIGS:
        return CONFIGS[name]
    close = difflib.get_close_matches(name, CONFIGS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ZooError(f"unknown model {name!r}; {hint}known models: {', '.join(CONFIGS)}")


def _resolve(name_or_config: str | Config) -> Config:
    if isinstance(name_or_config, str):
        return config(name_or_config)
    if type(name_or_config) in _FAMILIES:
        return name_or_config
    raise ZooError(f"expected a model name or a zoo config, got {type(name_or_config).__name__}")


def build(name: str | Config, *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """Build a built-in model (by name, or from a config) with seeded, deterministic init.

    Parameters are created directly on ``device`` (the default device when None); on
    "meta" nothing is allocated, so even llama-70b builds instantly. The global RNG is left
    as it was. The same seed gives the same weights on the same device type.
    """
    cfg = _resolve(name)
    device = torch.device(device) if device is not None else torch.empty(0).device
    # fork_rng restores the CPU generator, and on an accelerator every one of its devices'
    # (manual_seed reseeds them all), so seeding here leaves the caller's streams alone.
    # Not device_type="meta": fork_rng would then skip even the CPU generator.
    accel = device.type not in ("cpu", "meta")
    n_dev = torch.get_device_module(device.type).device_count() if accel else 0
    with torch.random.fork_rng(devices=range(n_dev), device_type=device.type if accel else None):
        torch.manual_seed(seed)
        with device:
            model = _FAMILIES[type(cfg)](cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model


def param_count(name: str | Config) -> int:
    """The parameter count, from the config alone (tied weights counted once)."""
    cfg = _resolve(name)
    if isinstance(cfg, GPTConfig):
        d, b = cfg.n_embd, int(cfg.bias)
        ln = d + b * d
        block = (2 * ln
                 + 3 * d * d + b * 3 * d + d * d + b * d          # c_attn, attn.c_proj
                 + 4 * d * d + b * 4 * d + 4 * d * d + b * d)     # c_fc, mlp.c_proj
        # lm_head is tied to wte, so it adds nothing.
        return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * block + ln
    if isinstance(cfg, LlamaConfig):
        d, kv = cfg.dim, cfg.n_kv_head * (cfg.dim // cfg.n_head)
        layer = 2 * d + 2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim
        return 2 * cfg.vocab_size * d + cfg.n_layer * layer + d  # embed + untied lm_head
    h, f = cfg.hidden, cfg.ffn_dim
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    embeddings = (cfg.vocab_size + cfg.max_position + cfg.type_vocab_size) * h + 2 * h
    return embeddings + cfg.n_layer * layer
