"""Tests of bmc.zoo: parameter counts, forward/backward, determinism, export."""
import pytest
import torch

from bmc.models import zoo
from bmc.errors import ZooError

TINY = ["gpt-tiny", "llama-tiny", "bert-tiny"]
LM_TINY = ["gpt-tiny", "llama-tiny"]


def _out_shape(model, ids):
    cfg = model.config
    width = cfg.hidden if isinstance(cfg, zoo.BertConfig) else cfg.vocab_size
    return (*ids.shape, width)


@pytest.mark.parametrize("name", zoo.names())
def test_param_count_matches_meta_build(name):
    model = zoo.build(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert zoo.param_count(name) == sum(p.numel() for p in model.parameters())


def test_param_count_anchors():
    assert zoo.param_count("llama-7.5b") == 7_500_000_000
    assert zoo.param_count("llama-7b") == 6_738_415_616
    assert zoo.param_count("gpt2-small") == 124_475_904  # nanoGPT's 124M (vocab 50304)


def test_configs_are_frozen_and_named():
    assert set(zoo.names()) == set(zoo.CONFIGS)
    with pytest.raises(Exception):
        zoo.config("gpt-tiny").n_layer = 3


@pytest.mark.parametrize("name", TINY)
def test_forward_shape_and_determinism(name):
    a, b = zoo.build(name), zoo.build(name)
    (ids,) = a.example_inputs()
    assert ids.dtype == torch.long and ids.shape == (2, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < a.config.vocab_size
    assert torch.equal(ids, b.example_inputs()[0])
    with torch.no_grad():
        out = a(ids)
        assert out.shape == _out_shape(a, ids)
        assert torch.equal(out, b(ids))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    other = zoo.build(name, seed=1)
    assert not torch.equal(next(other.parameters()), next(a.parameters()))


def test_build_leaves_global_rng_alone():
    before = torch.get_rng_state()
    zoo.build("gpt-tiny")
    zoo.build("llama-tiny", device="meta")
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("name", LM_TINY)
def test_loss_backward_reaches_every_parameter(name):
    model = zoo.build(name)
    (ids,) = model.example_inputs()
    loss = model(ids, targets=ids)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_gpt_lm_head_tied_to_wte():
    model = zoo.build("gpt-tiny")
    assert model.lm_head.weight is model.transformer.wte.weight
    meta = zoo.build("gpt2-small", device="meta")
    assert meta.lm_head.weight is meta.transformer.wte.weight


def test_dtype_and_seq_options():
    model = zoo.build("llama-tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    (ids,) = model.example_inputs(batch=1, seq=64)
    assert model(ids).shape == (1, 64, 256)
    with pytest.raises(ZooError):
        model.example_inputs(seq=65)


@pytest.mark.parametrize("name", TINY)
def test_export_matches_eager(name):
    model = zoo.build(name).eval()
    inputs = model.example_inputs()
    ep = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_export_on_meta():
    model = zoo.build("llama-tiny", device="meta")
    inputs = model.example_inputs()
    assert inputs[0].device.type == "meta"
    ep = torch.export.export(model, inputs, strict=False)
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == (2, 16, 256)


def test_meta_build_then_materialize_rope():
    model = zoo.build("llama-tiny", device="meta").to_empty(device="cpu")
    model.reset_rope()
    ref = zoo.build("llama-tiny")
    assert torch.equal(model.rope_cos, ref.rope_cos)
    assert torch.equal(model.rope_sin, ref.rope_sin)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ZooError, match="llama-tiny") as info:
        zoo.build("llama-tinyy")
    assert "\n" not in str(info.value)
    with pytest.raises(ZooError, match="gpt2-small"):
        zoo.param_count("gpt2-smal")


def test_build_from_config_instance():
    cfg = zoo.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=8, bias=False)
    model = zoo.build(cfg, device="meta")
    assert zoo.param_count(cfg) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ZooError, match="n_kv_head"):
        zoo.LlamaConfig(n_layer=1, n_head=4, n_kv_head=3, dim=64, ffn_dim=128, vocab_size=64,
                        max_seq=8)
