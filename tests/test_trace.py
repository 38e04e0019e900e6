"""bmc.trace: outputs equal eager for every zoo model and the HF models; meta device; errors."""
import subprocess
import sys

import pytest
import torch

import bmc
import hf_models
from bmc.models import zoo
from helpers import first_tensor, run, traced_copy

SMALL_ZOO = ["gpt-tiny", "gpt-mini", "llama-tiny", "llama-mini", "bert-tiny"]
MEDIUM_ZOO = ["gpt2-small", "bert-base"]  # real weights, still quick on a CPU
LARGE_ZOO = [n for n in zoo.names() if n not in SMALL_ZOO + MEDIUM_ZOO]


@pytest.mark.parametrize("name", SMALL_ZOO + MEDIUM_ZOO)
@pytest.mark.parametrize("dynamic", [None, True])
def test_zoo_traces_equal_to_eager(name, dynamic):
    model = zoo.build(name).eval()
    inputs = model.example_inputs(batch=2, seq=16)
    gm = traced_copy(model, inputs, dynamic=dynamic)
    with torch.no_grad():
        torch.testing.assert_close(run(gm, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)
        if dynamic:  # a dynamic trace must also be right on a batch and length it never saw
            unseen = model.example_inputs(batch=3, seq=11)
            torch.testing.assert_close(run(gm, unseen), run(model, unseen), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LARGE_ZOO)
def test_large_zoo_models_trace_on_meta(name):
    if zoo.param_count(name) > 2e9:
        pytest.skip("7B+ configs are traced by the cost-model and CLI tests (they take ~20 s each)")
    model = zoo.build(name, device="meta")
    gm = bmc.trace(model)
    expected = model(*model.example_inputs())
    out = first_tensor(gm(*model.example_inputs()))
    assert out.shape == expected.shape and out.device.type == "meta"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LARGE_ZOO if zoo.param_count(n) <= 2e9])
def test_large_zoo_models_trace_equal_to_eager_on_cpu(name):
    """Real weights for every config that fits this machine (up to 1.5e9 parameters, fp32)."""
    model = zoo.build(name).eval()
    inputs = model.example_inputs(batch=1, seq=16)
    gm = bmc.trace(model, inputs)  # shares the model's weights: no second copy in memory
    with torch.no_grad():
        torch.testing.assert_close(run(gm, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LARGE_ZOO if zoo.param_count(n) > 2e9])
def test_huge_zoo_models_trace_on_meta(name):
    model = zoo.build(name, device="meta")
    gm = bmc.trace(model, dynamic=True)
    assert all(p.device.type == "meta" for p in gm.parameters())


@pytest.mark.parametrize("name", hf_models.NAMES)
@pytest.mark.parametrize("dynamic", [None, True])
def test_hugging_face_models_trace_equal_to_eager(name, dynamic):
    model = hf_models.build(name)
    inputs = hf_models.example_inputs()
    gm = traced_copy(model, inputs, dynamic=dynamic)
    with torch.no_grad():
        torch.testing.assert_close(run(gm, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)
        if dynamic:  # a dynamic trace must also be right on a batch and length it never saw
            unseen = hf_models.example_inputs(batch=3, seq=hf_models.SEQ - 5, seed=1)
            torch.testing.assert_close(run(gm, unseen), run(model, unseen), atol=1e-5, rtol=1e-5)


def test_parameters_keep_their_dotted_names():
    model = zoo.build("llama-tiny")
    gm = bmc.trace(model)
    names = {n for n, _ in gm.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert {n for n, _ in model.named_parameters()} <= names | {"lm_head.weight"}


def test_meta_device_allocates_no_weights():
    """Measured in a process of its own: the peak RSS of the shared pytest process already
    holds whatever earlier tests used, so growth there could never show."""
    code = """
import resource, bmc
from bmc import zoo
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
model = zoo.build("llama-1b", device="meta")  # 1.2e9 parameters: ~5 GB if materialized
gm = bmc.trace(model, dynamic=True)
assert all(p.device.type == "meta" for p in gm.parameters())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib = float(done.stdout.split()[-1])
    assert grown_mib < 1024, f"tracing on meta grew RSS by {grown_mib:.0f} MiB"


def test_dynamic_trace_names_batch_and_sequence():
    gm = bmc.trace(zoo.build("gpt-tiny"), dynamic=True)
    assert sorted(gm.meta["bmc.trace"].symbols.values()) == ["B", "S"]
    x = torch.randint(0, 256, (3, 40))  # a shape it was not traced with
    assert gm(x).shape == (3, 40, 256)


def test_example_inputs_forms():
    model = zoo.build("gpt-tiny")
    (x,) = model.example_inputs()
    for form in ((x,), ((x,), {}), ((), {"idx": x}), x):
        gm = bmc.trace(model, form)
        assert gm.meta["bmc.trace"].model_name == "GPT"


def test_missing_example_inputs_is_a_clear_error():
    with pytest.raises(bmc.TraceError, match="no example inputs"):
        bmc.trace(torch.nn.Linear(2, 2))


class DataDependentBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # the line the error must name
            return y * 2
        return y


def test_untraceable_model_names_the_line_and_hints(capfd):
    with pytest.raises(bmc.TraceError) as info:
        bmc.trace(DataDependentBranch(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "\n" not in message
    assert "DataDependentBranch" in message
    assert "test_trace.py" in message and "if y.sum() > 0" in message
    assert "torch.cond" in message
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph dump is muted


def test_not_a_module_is_refused():
    with pytest.raises(bmc.TraceError, match="nn.Module"):
        bmc.trace(lambda x: x, (torch.ones(1),))


def test_one_tensor_passed_twice_is_traced_as_two_inputs():
    """torch.export would read the first argument for both; bmc unaliases example inputs."""
    model = zoo.build("gpt-tiny")
    x = torch.zeros(2, 16, dtype=torch.long)
    gm = bmc.trace(model, (x, x))
    batch = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(gm(batch[:, :-1], batch[:, 1:]), model(batch[:, :-1], batch[:, 1:]))


def test_a_hugging_face_model_that_uses_its_cache_traces_as_saved():
    """Checkpoints say use_cache=True: the cache is left out of the graph, the config untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64)).eval()
    assert model.config.use_cache is True
    x = torch.randint(0, 64, (2, 8))
    gm = bmc.trace(model, ((), {"input_ids": x}), dynamic=True)
    assert model.config.use_cache is True
    y = torch.randint(0, 64, (3, 5))
    torch.testing.assert_close(gm(input_ids=y).logits, model(input_ids=y, use_cache=False).logits)
