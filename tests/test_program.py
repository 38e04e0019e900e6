"""bmc.compile's contract: no silent surprises. The world size comes from the process group
(a contradicting one is refused in one line), and a compiled program owns its weights:
training it, or distilling into it, never writes to the model it came from."""
import pytest
import torch

import bmc
from bmc.cli.local_ranks import run_ranks
from bmc.models import zoo


def _batch(rows: int = 4, step: int = 0):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (rows, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def _default_and_contradicting(rank, world):
    model = zoo.build("gpt-tiny")
    prog = bmc.compile(model, passes="zero3", example_inputs=_batch(2))
    try:
        bmc.compile(model, passes="zero3", example_inputs=_batch(2), world_size=4)
        refused = ""
    except bmc.BmcError as exc:
        refused = str(exc)
    return prog.context.world_size, getattr(prog, "runtime", None) is not None, refused


def test_world_size_defaults_to_the_process_group_and_a_contradiction_is_refused():
    for size, distributed, refused in run_ranks(2, _default_and_contradicting):
        assert size == 2 and distributed
        assert "world_size=4 but torch.distributed runs 2 processes" in refused and "\n" not in refused


def test_without_a_process_group_the_world_size_is_one():
    model = zoo.build("gpt-tiny")
    assert bmc.compile(model, example_inputs=_batch()).context.world_size == 1
    with pytest.raises(bmc.BmcError, match="world_size must be >= 1"):
        bmc.compile(model, example_inputs=_batch(), world_size=0)


def test_training_a_program_leaves_its_source_model_alone():
    model = zoo.build("gpt-tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prog = bmc.compile(model, passes="ckpt", example_inputs=_batch())
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-2)
    prog(*_batch()).backward()
    opt.step()
    changed = [n for n, p in prog.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "the step changed nothing: the test would prove nothing"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_distill_never_writes_to_its_teacher():
    teacher = zoo.build("gpt-tiny")
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = bmc.compile(teacher, passes="prune-heads{ratio=0.5}", example_inputs=_batch(), dynamic=True)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    distilled, history = bmc.distill(student, teacher, lambda step: _batch(4, step), steps=3, progress=False)
    assert len(history) == 3
    assert any(not torch.equal(p.detach(), start[n]) for n, p in distilled.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_an_empty_pipeline_string_means_no_passes():
    model = zoo.build("gpt-tiny")
    prog = bmc.compile(model, passes="")
    (x,) = model.example_inputs()
    torch.testing.assert_close(prog(x), model(x))
    assert prog.pipeline == ""
