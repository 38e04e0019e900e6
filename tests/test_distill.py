"""bmc.distill on tiny random-weight zoo models: a few steps bring the student's logits (KL) and
block outputs (MSE) closer to the teacher's on a batch it did not train on; the LM loss joins
when alpha < 1; dp on 2 gloo ranks trains what one process does; bad input is one line."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bmc
from bmc.models import data
from bmc.models import zoo
from bmc.compress.distill import DistillError, _kl, _private_copy, _shared_copy
from bmc.cli.local_ranks import run_ranks

CONFIG = zoo.config("gpt-tiny")
TOKENS = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))
TAPS = "tap{points=[lm_head,transformer.h.0]}"


def _teacher_module():
    torch.manual_seed(0)
    model = zoo.build(CONFIG)
    with torch.no_grad():  # sharper than the 0.02 init, so there is a distribution to match
        model.transformer.wte.weight.mul_(5)
    return model


def _student_module():
    torch.manual_seed(1)  # another seed's weights: far from the teacher
    return zoo.build(CONFIG)


@pytest.fixture(scope="module")
def teacher():
    model = _teacher_module()
    return bmc.compile(model, example_inputs=model.example_inputs(), dynamic=True)


@pytest.fixture(scope="module")
def pruned():
    """A pruned student graph (blocks keep their names); tests train private copies of it."""
    model = _student_module()
    return bmc.compile(model, passes="prune-heads{ratio=0.5},prune-layers{drop=[1]}",
                       example_inputs=model.example_inputs(), dynamic=True).graph_module


def _fresh(gm):
    return bmc.compile(_private_copy(gm))


def _gaps(student, teacher, batch):
    """KL of the logits and MSE of block 0's output, student vs teacher, on `batch` (read
    through tapped views sharing each model's weights)."""
    views = [bmc.compile(_shared_copy(p.graph_module), passes=TAPS) for p in (student, teacher)]
    with torch.no_grad():
        (_, s), (_, t) = (v(batch) for v in views)
    return _kl(s["lm_head"], t["lm_head"], 2.0).item(), F.mse_loss(s["transformer.h.0"], t["transformer.h.0"]).item()


@pytest.mark.parametrize("signals", ["logits", "hidden", "both"])
def test_distillation_brings_the_student_to_the_teacher(signals, teacher, pruned):
    student = _fresh(pruned)
    held_out = data.Batches(TOKENS, 8, 32, seed=99).local(0)[0]
    kl0, mse0 = _gaps(student, teacher, held_out)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trained, history = bmc.distill(student, teacher, data.Batches(TOKENS, 4, 32), signals=signals, steps=20,
                                   lr=3e-3, progress=False)
    assert trained is student and len(history) == 20
    assert any(not torch.equal(p, before[n]) for n, p in trained.named_parameters())  # trained in place
    kl, mse = _gaps(trained, teacher, held_out)
    if signals != "hidden":  # measured: KL to 0.32 of where it started, MSE to 0.12 (hidden) / 0.33 (both)
        assert kl < 0.6 * kl0, (kl0, kl)
        assert history[-1]["kl"] < history[0]["kl"]
    if signals != "logits":
        assert mse < 0.6 * mse0, (mse0, mse)
        assert history[-1]["mse"] < history[0]["mse"]


def test_module_student_iterable_data_and_the_lm_loss(teacher):
    student = _student_module()  # a module: traced on the first batch, dynamic batch and sequence
    stream = data.Batches(TOKENS, 4, 32)
    batches = [stream.local(step) for step in range(5)]
    trained, history = bmc.distill(student, teacher, batches, steps=5, alpha=0.5, progress=False)
    assert isinstance(trained, bmc.Program) and set(history[0]) == {"step", "kl", "lm", "loss"}
    assert history[0]["loss"] == pytest.approx(0.5 * history[0]["kl"] + 0.5 * history[0]["lm"], rel=1e-5)
    assert trained(batches[0][0]).shape == (4, 32, 256)
    with pytest.raises(DistillError, match="data ran out after 5 batches"):
        bmc.distill(student, teacher, batches, steps=6, progress=False)


class _NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256)

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_bad_input_is_one_clear_error(teacher, pruned):
    student = _fresh(pruned)
    batches = data.Batches(TOKENS, 4, 32)
    cases = [
        (dict(signals="logit"), "unknown signals 'logit'; use one of logits, hidden, both"),
        (dict(steps=0), "steps must be an int >= 1, got 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(world_size=2), "world_size=2 needs torch.distributed initialized"),
        (dict(hidden_map={}, signals="hidden"), "hidden_map is empty"),
        (dict(hidden_map={"transformer.h.0": "transformer.h.0"}), "signals='logits' does not use"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DistillError, match=message):
            bmc.distill(student, teacher, batches, **kwargs)
    with pytest.raises(DistillError, match="hidden signals need residual blocks.*found none in the student"):
        bmc.distill(_NoBlocks(), teacher, batches, signals="both")
    small = zoo.build(dataclasses.replace(CONFIG, vocab_size=128))
    with pytest.raises(DistillError, match="student's vocabulary has 128 tokens and the teacher's 256"):
        bmc.distill(small, teacher, data.Batches(TOKENS % 128, 4, 32), progress=False)
    fixed = bmc.compile(zoo.build(CONFIG))  # traced at a fixed [2, 16]
    with pytest.raises(DistillError, match="the student does not take the data's batches: .* fixed 2"):
        bmc.distill(fixed, teacher, batches)
    with pytest.raises(DistillError, match="not an \\(inputs, targets\\) pair"):
        bmc.distill(student, teacher, lambda step: torch.zeros(4, 32, dtype=torch.long))


def _distill_on_ranks(rank, world_size):
    teacher, student = _teacher_module(), _student_module()
    _, history = bmc.distill(student, teacher, data.Batches(TOKENS, 4, 32), signals="both", steps=5, lr=3e-3,
                             world_size=world_size, progress=False)
    return [h["loss"] for h in history], {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.slow
def test_data_parallel_on_two_ranks_trains_what_one_process_does():
    (losses0, weights0), (losses1, weights1) = run_ranks(2, _distill_on_ranks)
    one_losses, one_weights = _distill_on_ranks(0, 1)
    assert losses0 == losses1
    torch.testing.assert_close(losses0, one_losses, atol=1e-5, rtol=1e-5)
    for name, weight in one_weights.items():
        torch.testing.assert_close(weights0[name], weight, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(weights1[name], weights0[name], atol=0, rtol=0, msg=name)  # replicas agree


@pytest.mark.slow
def test_distillation_recovers_half_of_what_pruning_lost():
    """The must-show claim on the trained gpt-mini (tools/bench/distill.py's defaults: half the
    heads by Taylor score and a quarter of the blocks pruned, 40 steps of batch 16 x seq 128,
    signals=both): recovered = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_teacher) >= 0.5.
    Measured 0.65 at 40 steps (0.54-0.60 at 30, 0.50-0.53 at 25, over three data seeds)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "bench" / "distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(bench.parse_args([]))
    assert result["steps"] == 40 and result["pruned"] > result["teacher"]
    assert result["recovered"] >= 0.5, result


def test_the_kl_term_is_the_definition():
    """T^2 KL(teacher || student) per token, from the definition (sum of p log p/q over the
    vocabulary, averaged over every token): a swapped direction, a mean over the vocabulary or
    a missing T^2 each fail it."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen) * 3, torch.randn(2, 5, 11, generator=gen) * 3
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher.double() / temperature, -1)
        q = torch.softmax(student.double() / temperature, -1)
        want = (p * (p.log() - q.log())).sum(-1).mean() * temperature ** 2
        assert _kl(student, teacher, temperature).item() == pytest.approx(want.item(), rel=1e-5)
        assert _kl(teacher, student, temperature).item() != pytest.approx(want.item(), rel=1e-2)
