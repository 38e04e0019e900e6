"""amp: bf16/fp16 parameters with fp32 masters; fp16 loss scaling survives overflows.

Low precision is not exact, so the tolerances here are stated against fp32, each a small
multiple of what we measured on gpt-tiny and llama-tiny: one step's loss (bf16 2.9e-5
relative, fp16 2.0e-6), its gradients' cosine (1 - cos: bf16 3.9e-5, fp16 1.0e-6), 20
training steps on real text (bf16 within 9e-4 of fp32's losses at every step, fp16 1.2e-4),
HF LLaMA's logits in bf16 (3.5e-3 absolute on values up to 0.65)."""
import copy

import pytest
import torch

import bmc
import hf_models
from bmc.models import data
from bmc.models import zoo
from bmc.errors import PipelineError
from helpers import run

STEPS, BATCH, SEQ = 20, 4, 32
# relative bounds, 3-5x the errors measured (the module's docstring)
ONE_STEP = {"bf16": 1.5e-4, "fp16": 1e-5}
GRAD_COSINE = {"bf16": 2e-4, "fp16": 1e-5}
TRAJECTORY = {"bf16": 3e-3, "fp16": 5e-4}
TEXT = data.Batches(data.text_tokens(max_bytes=2**20), BATCH, SEQ, seed=3)


def _compile(model, pipeline):
    x = torch.zeros(BATCH, SEQ, dtype=torch.long)
    return bmc.compile(model, passes=pipeline, example_inputs=(x, x))


def _train(pipeline, name="gpt-tiny", inject=(), growth_interval=None):
    torch.manual_seed(0)
    prog = _compile(zoo.build(name), pipeline)
    opt = prog.optimizer(torch.optim.AdamW, lr=3e-3)
    losses, scales, skipped = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = prog(*TEXT.local(step))
        before = [p.detach().clone() for p in prog.parameters()]
        # an overflow injected the way a real one arrives: a gradient too large for fp16
        (loss * 1e30 if step in inject else loss).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        if step in inject:
            skipped.append(all(torch.equal(a, b) for a, b in zip(before, prog.parameters())))
        losses.append(loss.item())
        scales.append(opt.loss_scale)
    return losses, scales, skipped, prog


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_one_step_is_close_to_fp32(name, dtype):
    model = zoo.build(name)
    inputs = TEXT.local(0)
    prog = _compile(copy.deepcopy(model), f"amp{{dtype={dtype}}},verify")
    assert {p.dtype for p in prog.parameters()} == {bmc.passes.amp.LOW_DTYPES[dtype]}
    ref, out = model(*inputs), prog(*inputs)
    assert out.dtype == torch.float32, "outputs come back in the traced dtype"
    torch.testing.assert_close(out, ref, rtol=ONE_STEP[dtype], atol=0)
    ref.backward()
    out.backward()
    got = dict(prog.named_parameters())
    scale = prog.graph_module.bmc_loss_scale.item() if dtype == "fp16" else 1.0
    for pname, p in model.named_parameters():
        cosine = torch.nn.functional.cosine_similarity(got[pname].grad.float().flatten() / scale,
                                                       p.grad.flatten(), dim=0)
        assert 1 - cosine <= GRAD_COSINE[dtype], (pname, cosine.item())


def test_precision_sensitive_ops_compute_in_fp32():
    prog = _compile(zoo.build("gpt-tiny"), "amp{dtype=bf16}")
    gm = prog.graph_module
    norms = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.layer_norm.default)
    loss = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.cross_entropy_loss.default)
    linears = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert norms and loss and linears
    assert all(n.meta["val"].dtype == torch.float32 for n in norms + loss)
    assert all(n.meta["val"].dtype == torch.bfloat16 for n in linears)
    assert prog.records[0].statistics["casts"] > 0


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_bf16_training_tracks_fp32(name):
    fp32 = _train("dce", name)[0]
    bf16 = _train("amp{dtype=bf16}", name)[0]
    assert fp32[-1] < fp32[0] - 0.5, "the run must learn for the comparison to mean anything"
    for step, (got, want) in enumerate(zip(bf16, fp32)):
        assert abs(got - want) <= TRAJECTORY["bf16"] * want, f"step {step}: bf16 {got} vs fp32 {want}"


def test_fp16_tracks_fp32_and_keeps_masters():
    fp32 = _train("dce")[0]
    fp16, scales, _, prog = _train("amp{dtype=fp16}")
    for got, want in zip(fp16, fp32):
        assert abs(got - want) <= TRAJECTORY["fp16"] * want
    assert scales == [65536.0] * STEPS


def test_fp16_skips_overflowing_steps_and_the_scale_recovers():
    losses, scales, skipped, _ = _train("amp{dtype=fp16,growth_interval=3}", inject=(4, 5))
    assert skipped == [True, True], "an overflowing step must leave the weights as they were"
    # clean steps 0-2 double the scale; each overflow halves it; 3 clean steps double it again
    assert scales[:7] == [65536.0, 65536.0, 131072.0, 131072.0, 65536.0, 32768.0, 32768.0]
    assert scales[-1] >= 65536.0, "the scale recovers after the overflows"
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, "training goes on after the skipped steps"


def test_hugging_face_llama_in_bf16():
    model = hf_models.build("llama")
    inputs = hf_models.example_inputs()
    prog = bmc.compile(copy.deepcopy(model), passes="amp{dtype=bf16}", example_inputs=inputs)
    torch.testing.assert_close(run(prog, inputs), run(model, inputs), rtol=0, atol=1e-2)


def test_amp_options_and_order_are_checked():
    with pytest.raises(PipelineError, match="init_scale must be > 0"):
        bmc.parse_pipeline("amp{dtype=fp16,init_scale=0}")
    with pytest.raises(PipelineError, match="expects one of bf16"):
        bmc.parse_pipeline("amp{dtype=fp8}")
    with pytest.raises(PipelineError, match="amp appears twice"):
        _compile(zoo.build("gpt-tiny"), "amp,amp")
    with pytest.raises(PipelineError, match="amp must run before"):
        _compile(zoo.build("gpt-tiny"), "ckpt,amp")
    assert str(bmc.parse_pipeline("amp{dtype=fp16,growth_interval=7}")) == "amp{dtype=fp16,growth_interval=7}"
