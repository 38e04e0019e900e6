"""Tests of bmc.structure: blocks, attention, MLPs, norms, embeddings, head and tied weights,
read from the traced graph of zoo models and of Hugging Face models."""
import functools
import io
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmc.models import zoo
from bmc.errors import StructureError
from bmc.analysis.structure import CACHE_KEY, Linear, ModelStructure, analyze, format_structure, structure_of
from bmc.ir.trace import trace


@dataclass(frozen=True)
class Spec:
    """What a model's structure must be, from its config."""

    family: str  # "gpt", "llama" or "bert"
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    positions: int = 0  # learned position embeddings (gpt, bert)
    activation: str = ""
    transposed: bool = False  # HF GPT-2's Conv1D stores weights (in, out)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


SPECS = {
    "gpt-tiny": Spec("gpt", 2, 4, 4, 16, 256, 256, positions=64, activation="gelu"),
    "gpt-mini": Spec("gpt", 8, 4, 4, 32, 512, 256, positions=128, activation="gelu"),
    "llama-tiny": Spec("llama", 2, 4, 2, 16, 172, 256, activation="silu"),
    "llama-7b": Spec("llama", 32, 32, 32, 128, 11008, 32000, activation="silu"),
    "bert-tiny": Spec("bert", 2, 4, 4, 16, 256, 256, positions=64, activation="gelu"),
    # tests/hf_models.py; GPT-2's default activation is gelu_new, the tanh approximation
    # written out with pow and tanh (no aten.gelu in the graph).
    "hf-gpt2": Spec("gpt", 2, 4, 4, 16, 256, 256, positions=64, activation="gelu_tanh", transposed=True),
    "hf-llama": Spec("llama", 2, 4, 2, 16, 128, 256, activation="silu"),
    "hf-bert": Spec("bert", 2, 4, 4, 16, 128, 256, positions=64, activation="gelu"),
}


def _hf():
    pytest.importorskip("transformers")
    import hf_models
    return hf_models


@functools.lru_cache(maxsize=None)
def traced(name: str, dynamic: bool = False, attn: str = "") -> torch.fx.GraphModule:
    """Trace once per session: tracing dominates the cost of these tests."""
    if name.startswith("hf-"):
        hf_models = _hf()
        model = hf_models.build(name[3:])
        if attn:
            model.set_attn_implementation(attn)
        return trace(model, hf_models.example_inputs(), dynamic=dynamic or None)
    # llama-7b is built on the meta device: nothing is allocated, tracing takes a few seconds.
    model = zoo.build(name, device="meta" if name == "llama-7b" else None)
    return trace(model, dynamic=dynamic or None)


def lin(module: str, d_in: int, d_out: int, bias: bool, transposed: bool = False) -> Linear:
    return Linear(module, f"{module}.weight", f"{module}.bias" if bias else None, d_in, d_out, transposed)


# ---------------------------------------------------------------------------- per family

def check_gpt(s: ModelStructure, spec: Spec) -> None:
    d, t = spec.dim, spec.transposed
    assert s.blocks_path == "transformer.h"
    for i, b in enumerate(s.blocks):
        p = f"transformer.h.{i}"
        a = b.attention
        assert a.module == f"{p}.attn"
        assert a.fused and (a.q, a.k, a.v) == (None, None, None)
        assert a.qkv == lin(f"{p}.attn.c_attn", d, 3 * d, True, t)
        assert a.o == lin(f"{p}.attn.c_proj", d, d, True, t)
        assert b.mlp.module == f"{p}.mlp"
        assert b.mlp.up == lin(f"{p}.mlp.c_fc", d, spec.ffn, True, t)
        assert b.mlp.gate is None
        assert b.mlp.down == lin(f"{p}.mlp.c_proj", spec.ffn, d, True, t)
        assert b.norms == (f"{p}.ln_1", f"{p}.ln_2")
    assert [(e.module, e.weight, e.num_embeddings, e.embedding_dim) for e in s.embeddings] == [
        ("transformer.wte", "transformer.wte.weight", spec.vocab, d),
        ("transformer.wpe", "transformer.wpe.weight", spec.positions, d)]
    assert s.head == lin("lm_head", d, spec.vocab, False)
    assert s.final_norm == "transformer.ln_f"
    # export reads the tied tensor through one get_attr ("lm_head.weight", in the embedding
    # too); the analysis still names each use by its own module's parameter.
    assert s.tied == (("lm_head.weight", "transformer.wte.weight"),)


def check_llama(s: ModelStructure, spec: Spec) -> None:
    d, kv = spec.dim, spec.kv_heads * spec.head_dim
    assert s.blocks_path == "model.layers"
    for i, b in enumerate(s.blocks):
        p = f"model.layers.{i}"
        a = b.attention
        assert a.module == f"{p}.self_attn" and not a.fused and a.qkv is None
        assert (a.q, a.k, a.v, a.o) == (lin(f"{p}.self_attn.q_proj", d, d, False),
                                        lin(f"{p}.self_attn.k_proj", d, kv, False),
                                        lin(f"{p}.self_attn.v_proj", d, kv, False),
                                        lin(f"{p}.self_attn.o_proj", d, d, False))
        assert b.mlp.module == f"{p}.mlp"
        assert b.mlp.gate == lin(f"{p}.mlp.gate_proj", d, spec.ffn, False)
        assert b.mlp.up == lin(f"{p}.mlp.up_proj", d, spec.ffn, False)
        assert b.mlp.down == lin(f"{p}.mlp.down_proj", spec.ffn, d, False)
        assert b.norms == (f"{p}.input_layernorm", f"{p}.post_attention_layernorm")
    assert [(e.module, e.weight, e.num_embeddings) for e in s.embeddings] == [
        ("model.embed_tokens", "model.embed_tokens.weight", spec.vocab)]
    assert s.head == lin("lm_head", d, spec.vocab, False)
    assert s.final_norm == "model.norm"
    assert s.tied == ()


def check_bert(s: ModelStructure, spec: Spec) -> None:
    d = spec.dim
    assert s.blocks_path == "encoder.layer"
    for i, b in enumerate(s.blocks):
        p = f"encoder.layer.{i}"
        a = b.attention
        assert a.module == f"{p}.attention" and not a.fused
        assert (a.q, a.k, a.v, a.o) == (lin(f"{p}.attention.self.query", d, d, True),
                                        lin(f"{p}.attention.self.key", d, d, True),
                                        lin(f"{p}.attention.self.value", d, d, True),
                                        lin(f"{p}.attention.output.dense", d, d, True))
        assert b.mlp.up == lin(f"{p}.intermediate.dense", d, spec.ffn, True)
        assert b.mlp.gate is None
        assert b.mlp.down == lin(f"{p}.output.dense", spec.ffn, d, True)
        assert b.norms == (f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm")
    assert {(e.module, e.weight, e.num_embeddings) for e in s.embeddings} == {
        ("embeddings.word_embeddings", "embeddings.word_embeddings.weight", spec.vocab),
        ("embeddings.position_embeddings", "embeddings.position_embeddings.weight", spec.positions),
        ("embeddings.token_type_embeddings", "embeddings.token_type_embeddings.weight", 2)}
    # BertModel has no LM head (its pooler is d -> d, not onto the vocabulary), and its only
    # norm outside the layers is the embeddings' LayerNorm, before them.
    assert s.head is None and s.final_norm is None and s.tied == ()


CHECKS = {"gpt": check_gpt, "llama": check_llama, "bert": check_bert}
CAUSAL = {"gpt": True, "llama": True, "bert": False}


@pytest.mark.parametrize("name", list(SPECS))
def test_structure(name):
    spec = SPECS[name]
    gm = traced(name)
    s = analyze(gm)
    assert len(s.blocks) == spec.blocks
    for i, b in enumerate(s.blocks):
        assert b.index == i and b.name == f"{s.blocks_path}.{i}"
        a = b.attention
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (spec.heads, spec.kv_heads, spec.head_dim)
        assert a.causal is CAUSAL[spec.family]
        assert b.mlp.activation == spec.activation
        assert set(b.params) == {n for n, _ in gm.named_parameters(remove_duplicate=False)
                                 if n.startswith(b.name + ".")}
    CHECKS[spec.family](s, spec)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny", "hf-llama"])
def test_dynamic_shapes_give_the_same_structure(name):
    gm = traced(name, dynamic=True)
    dims = [d for n in gm.graph.find_nodes(op="placeholder") for d in n.meta["val"].shape]
    assert any(isinstance(d, torch.SymInt) for d in dims)  # the trace really is symbolic
    assert analyze(gm) == analyze(traced(name))


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama", "hf-bert"])
def test_eager_attention_gives_the_same_structure(name):
    """matmul -> scale -> mask add -> softmax -> matmul instead of sdpa."""
    gm = traced(name, attn="eager")
    assert not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    assert analyze(gm) == analyze(traced(name))


def test_pt2_round_trip_keeps_the_structure():
    """A saved and loaded program loses the identity of tied parameters (two tensors come
    back); the tie is still found from the graph."""
    model = zoo.build("gpt-tiny")
    ep = torch.export.export(model, model.example_inputs(), strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    assert analyze(loaded) == analyze(traced("gpt-tiny"))


def test_block_of():
    s = analyze(traced("gpt-tiny"))
    assert s.block_of("transformer.h.1.attn.c_attn.weight").index == 1
    assert s.block_of("transformer.h.0.mlp").name == "transformer.h.0"
    assert s.block_of("transformer.h.1").index == 1
    assert s.block_of("transformer.h.10.ln_1.weight") is None
    assert s.block_of("lm_head.weight") is None and s.block_of("transformer.ln_f") is None
    assert s.tied_group("lm_head.weight") == ("lm_head.weight", "transformer.wte.weight")


@pytest.mark.parametrize("name", ["gpt-mini", "hf-llama", "bert-tiny"])
def test_format_structure(name):
    s = analyze(traced(name))
    text = format_structure(s)
    rows = [line for line in text.splitlines() if line.startswith(f"{s.blocks_path}.")]
    assert [r.split()[0] for r in rows] == [b.name for b in s.blocks]
    spec = SPECS[name]
    for row in rows:
        cells = row.split()
        assert str(spec.heads) in cells and str(spec.kv_heads) in cells and str(spec.head_dim) in cells
        assert spec.activation in cells
        assert ("gated" if spec.family == "llama" else "plain") in cells
        assert ("fused" if spec.family == "gpt" else "q,k,v") in cells
    assert f"final norm: {s.final_norm or '-'}" in text
    if spec.family == "gpt":
        assert "tied: lm_head.weight = transformer.wte.weight" in text


def test_structure_of_caches_until_the_graph_changes():
    gm = trace(zoo.build("gpt-tiny"))
    first = structure_of(gm)
    assert structure_of(gm) is first and gm.meta[CACHE_KEY][1] is first
    # export leaves the folded tied name as a get_attr nobody reads; dropping it changes the graph
    (unused,) = [n for n in gm.graph.find_nodes(op="get_attr") if not n.users]
    gm.graph.erase_node(unused)
    second = structure_of(gm)
    assert second is not first and second == first


# ---------------------------------------------------------------------------- edge cases

def test_model_without_repeated_blocks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    s = analyze(trace(model, (torch.randn(2, 8),)))
    assert s.blocks_path is None and s.blocks == ()
    assert s.embeddings == () and s.head is None and s.tied == ()
    assert "blocks: - (0)" in format_structure(s)


class _OddAttention(nn.Module):
    """k is projected to 72 features and then cut to 64: its projection is not a whole
    number of 16-wide heads."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(64, 64), nn.Linear(64, 72)
        self.v_proj, self.o_proj = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, 4, 16).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)[..., :64]),
                                           heads(self.v_proj(x)))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, 64))


class _OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_OddAttention() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_inconsistent_head_width_is_an_error():
    gm = trace(_OddModel(), (torch.randn(2, 8, 64),))
    with pytest.raises(StructureError, match="k projection width 72 is not a multiple of head_dim 16"):
        analyze(gm)
