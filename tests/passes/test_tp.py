"""tp: tensor-parallel programs on real gloo ranks equal the single-device model: outputs on the
example and on other ids, and every gradient (a split weight's against the same slice of the
reference's)."""
import copy
import dataclasses

import pytest
import torch

import bmc
from bmc import ir
import hf_models
from bmc.models import zoo
from bmc.errors import PipelineError
from bmc.cli.local_ranks import run_ranks
from equivalence import other_inputs, probe_loss
from helpers import model_and_inputs, run


# GQA with 4 kv heads (8 query heads, 2 per group), so that 4 ranks can split the kv heads
LLAMA_GQA = dataclasses.replace(zoo.config("llama-tiny"), n_head=8, n_kv_head=4)


def _hf_llama_gqa():
    """HF LlamaForCausalLM with 8 query heads in 4 kv groups (tests/hf_models' has 2 groups)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, hidden_size=64,
                      intermediate_size=128, vocab_size=hf_models.VOCAB, max_position_embeddings=64,
                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _build(name):
    torch.manual_seed(0)
    if name == "hf-llama-gqa":
        return _hf_llama_gqa(), hf_models.example_inputs()
    if name.startswith("hf-"):
        return hf_models.build(name[3:]), hf_models.example_inputs()
    if name == "matmul-attn-lm":
        return model_and_inputs(name)
    model = zoo.build(LLAMA_GQA if name == "llama-gqa" else name)
    return model, model.example_inputs()


def _loss(out, seed=7):
    """The model's own loss when it returns one, else a probe of its outputs (averaged: the
    bounds below are absolute)."""
    return out if out.dim() == 0 else probe_loss(out, seed) / out.numel()


def _check(rank, world_size, name, sequence_parallel=False):
    model, inputs = _build(name)
    collectives = "insert-collectives{sequence_parallel=true}" if sequence_parallel else "insert-collectives"
    prog = bmc.compile(copy.deepcopy(model), passes=f"tp{{degree={world_size}}},{collectives},verify",
                       example_inputs=inputs, world_size=world_size)
    other = other_inputs(model, inputs)  # the same shapes (the trace is static), other ids
    ref, out = run(model, inputs), run(prog, inputs)
    ref2, out2 = run(model, other), run(prog, other)
    forward = max((out - ref).abs().max().item(), (out2 - ref2).abs().max().item())
    (_loss(ref) + _loss(ref2, seed=8)).backward()
    (_loss(out) + _loss(out2, seed=8)).backward()
    plan = ir.get_plan(prog.graph_module, ir.TensorParallelPlan)
    worst = 0.0
    mine = dict(prog.named_parameters())
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        want = p.grad
        if plan.layout(pname) is not None:
            want = plan.layout(pname).local(want, rank, world_size)
        worst = max(worst, (mine[pname].grad - want).abs().max().item())
    return forward, worst


# CI runs one case per kind of attention (fused qkv + tied embeddings, GQA, HF Conv1D, HF LLaMA,
# projections written as matmuls by W.t() and W) at 2 ranks, all in one launch (4 ranks: the tp2,zero1 training test); every model at 2 and 4
# ranks runs with -m slow.
IN_CI = ("gpt-tiny", "llama-gqa", "hf-gpt2", "hf-llama", "matmul-attn-lm")
CASES = [pytest.param(name, degree, marks=[pytest.mark.slow])
         for name in ("gpt-tiny", "llama-gqa", "bert-tiny", "hf-gpt2", "hf-llama", "hf-llama-gqa", "hf-bert")
         for degree in (2, 4)
         if not (name == "hf-llama" and degree == 4)  # hf_models' llama has 2 kv heads: tp4 is refused
         and not (name in IN_CI and degree == 2)]


def _check_each(rank, world_size, names):
    return [(name, *_check(rank, world_size, name)) for name in names]


def test_tensor_parallel_equals_single_device_in_one_launch():
    for results in run_ranks(2, _check_each, IN_CI):
        for name, forward, grads in results:
            assert forward <= 1e-5 and grads <= 1e-5, (name, forward, grads)


@pytest.mark.parametrize("name, degree", CASES)
def test_tensor_parallel_equals_single_device(name, degree):
    for forward, grads in run_ranks(degree, _check, name):
        assert forward <= 1e-5 and grads <= 1e-5, (forward, grads)


def _check_vocab(rank, world_size, name):
    """tp{vocab=true}: the loss (the vocab-parallel cross-entropy) or the gathered outputs,
    and every gradient, against the single-device model."""
    model, inputs = _build(name)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    if name.startswith("hf-"):
        inputs = ((), {"input_ids": x, "labels": x}) if name != "hf-bert" else inputs
    elif name != "bert-tiny":
        inputs = (x, torch.roll(x, -1, 1))
    prog = bmc.compile(copy.deepcopy(model), passes=f"tp{{degree={world_size},vocab=true}},insert-collectives,verify",
                       example_inputs=inputs, world_size=world_size)
    other = other_inputs(model, inputs)
    ref, out = run(model, inputs), run(prog, inputs)
    ref2, out2 = run(model, other), run(prog, other)
    forward = max((out - ref).abs().max().item(), (out2 - ref2).abs().max().item())
    (_loss(ref) + _loss(ref2, seed=8)).backward()
    (_loss(out) + _loss(out2, seed=8)).backward()
    plan = ir.get_plan(prog.graph_module, ir.TensorParallelPlan)
    mine = dict(prog.named_parameters())
    # a tied weight is split under the name the graph reads: find layouts by parameter
    layout_of = {id(prog.graph_module.get_parameter(lay.param)): lay for lay in plan.layouts}
    worst = 0.0
    for pname, p in model.named_parameters():
        want = p.grad
        if id(mine[pname]) in layout_of:
            want = layout_of[id(mine[pname])].local(want, rank, world_size)
        worst = max(worst, (mine[pname].grad - want).abs().max().item())
    return forward, worst


VOCAB_CASES = [("gpt-tiny", 2), pytest.param("llama-gqa", 4, marks=pytest.mark.slow),
               pytest.param("hf-llama", 2, marks=pytest.mark.slow), pytest.param("bert-tiny", 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, degree", VOCAB_CASES)
def test_vocab_parallel_embedding_head_and_loss_equal_single_device(name, degree):
    """The token embedding and the head split over the vocabulary (tied in the zoo GPT), the
    loss computed without any rank holding the whole logits."""
    for forward, grads in run_ranks(degree, _check_vocab, name):
        assert forward <= 1e-5 and grads <= 1e-5, (forward, grads)


SP_CASES = [("gpt-tiny", 2), pytest.param("llama-gqa", 4, marks=pytest.mark.slow),
            pytest.param("hf-llama", 2, marks=pytest.mark.slow),
            pytest.param("bert-tiny", 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, degree", SP_CASES)
def test_sequence_parallel_equals_single_device(name, degree):
    """Norms, residuals and dropouts split along the sequence between the tp regions: same
    outputs and gradients (the norms' gradients summed over the ranks)."""
    for forward, grads in run_ranks(degree, _check, name, True):
        assert forward <= 1e-5 and grads <= 1e-5, (forward, grads)


def test_sequence_parallel_on_flattened_activations_is_refused():
    model, inputs = _build("hf-gpt2")  # Conv1D views x as [batch * seq, hidden]
    with pytest.raises(PipelineError, match="is 2-d .* use sequence_parallel=false"):
        bmc.compile(model, passes="tp{degree=2},insert-collectives{sequence_parallel=true}", example_inputs=inputs,
                    world_size=2)


def test_heads_that_do_not_divide_are_refused_before_anything_runs():
    model = zoo.build("llama-tiny")  # 4 heads, 2 kv heads
    with pytest.raises(PipelineError, match=r"layers\.0\.self_attn has 2 kv heads, not divisible by 4") as info:
        bmc.compile(model, passes="tp4", example_inputs=model.example_inputs(), world_size=4)
    assert "\n" not in str(info.value)
    gpt = zoo.build("gpt-tiny")
    with pytest.raises(PipelineError, match="has 4 attention heads, not divisible by 3"):
        bmc.compile(gpt, passes="tp{degree=3},insert-collectives", example_inputs=gpt.example_inputs(),
                    world_size=3)


def test_a_tp_plan_needs_its_ranks():
    gpt = zoo.build("gpt-tiny")
    with pytest.raises(bmc.BackendError, match="compile with world_size=2"):
        bmc.compile(gpt, passes="tp2", example_inputs=gpt.example_inputs())


STEPS, LOCAL_BATCH, SEQ, LR = 5, 2, 16, 1e-2


def _batches(dp):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (LOCAL_BATCH * dp, SEQ + 1), generator=gen) for _ in range(STEPS)]


def _slice(batch, dp_rank):
    rows = batch[dp_rank * LOCAL_BATCH:(dp_rank + 1) * LOCAL_BATCH]
    return rows[:, :-1], rows[:, 1:]


def _reference(dp, clip):
    torch.manual_seed(0)
    model = zoo.build("gpt-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for batch in _batches(dp):
        opt.zero_grad()
        total = 0.0
        for r in range(dp):
            loss = model(*_slice(batch, r)) / dp
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_tp_dp(rank, world_size, pipeline, clip):
    import torch.distributed as dist
    torch.manual_seed(0)
    model = zoo.build("gpt-tiny")
    x = torch.zeros(LOCAL_BATCH, SEQ, dtype=torch.long)
    prog = bmc.compile(model, passes=pipeline, example_inputs=(x, x), world_size=world_size)
    opt = prog.optimizer(torch.optim.AdamW, lr=LR)
    dp_rank, dp = prog.mesh.get_local_rank("dp"), prog.mesh.size(0)
    losses = []
    for batch in _batches(dp):
        opt.zero_grad()
        loss = prog(*_slice(batch, dp_rank))
        loss.backward()
        opt.clip_grad_norm_(clip)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world_size)
    return losses, prog.full_state_dict()


@pytest.mark.parametrize("pipeline", [pytest.param("tp2", marks=pytest.mark.slow), "tp2,zero1"])
def test_tp_trains_like_one_process_with_global_norm_clipping(pipeline):
    """tp2 alone on 2 ranks, and tp2 x dp2 with ZeRO-1 on 4: 5 AdamW steps with gradient
    clipping (which must sum the norm over tp slices, counting replicated weights once) give
    the single-process losses and weights."""
    world = 2 if pipeline == "tp2" else 4
    ref_losses, ref_params = _reference(world // 2, clip=0.05)
    for losses, params in run_ranks(world, _train_tp_dp, pipeline, 0.05):
        for got, want in zip(losses, ref_losses):
            assert abs(got - want) <= 1e-5 * abs(want), (got, want)
        worst = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
        assert worst <= 1e-4, worst
