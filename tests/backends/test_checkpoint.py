"""Sharded checkpoints: resume exactly, across world sizes and plans, crash-safe, and refuse
another model's checkpoint."""
import dataclasses
import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist

import bmc
from bmc.models import data
from bmc.models import zoo
from bmc.backends import checkpoint
from bmc.cli.local_ranks import run_ranks

GLOBAL_BATCH, SEQ, LR = 4, 16, 3e-3
TEXT = data.Batches(data.text_tokens(max_bytes=2**20), GLOBAL_BATCH, SEQ, seed=7)


def _program(pipeline, world_size=1, name="gpt-tiny"):
    torch.manual_seed(0)
    x = torch.zeros(GLOBAL_BATCH // world_size, SEQ, dtype=torch.long)
    prog = bmc.compile(zoo.build(name), passes=pipeline, example_inputs=(x, x), world_size=world_size)
    return prog, prog.optimizer(torch.optim.AdamW, lr=LR)


def _steps(prog, opt, first, count, rank=0, world_size=1):
    losses = []
    for step in range(first, first + count):
        opt.zero_grad()
        loss = prog(*TEXT.local(step, rank, world_size))
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world_size)
    return losses


@pytest.mark.parametrize("pipeline", ["dce", "amp{dtype=fp16,growth_interval=2}"])
def test_resume_in_one_process_is_exact(tmp_path, pipeline):
    prog, opt = _program(pipeline)
    _steps(prog, opt, 0, 3)
    checkpoint.save(tmp_path, prog, opt, step=3)
    expected = _steps(prog, opt, 3, 3)
    scale = opt.loss_scale

    prog2, opt2 = _program(pipeline)
    manifest = checkpoint.load(tmp_path, prog2, opt2)
    assert manifest["step"] == 3
    assert _steps(prog2, opt2, 3, 3) == expected
    assert opt2.loss_scale == scale


def _save_then_continue(rank, world_size, pipeline, root):
    prog, opt = _program(pipeline, world_size)
    _steps(prog, opt, 0, 3, rank, world_size)
    checkpoint.save(root, prog, opt, step=3)
    saved = prog.full_state_dict()
    return saved, _steps(prog, opt, 3, 3, rank, world_size)


def _load_then_continue(rank, world_size, pipeline, root):
    prog, opt = _program(pipeline, world_size)
    checkpoint.load(root, prog, opt)
    loaded = prog.full_state_dict()
    return loaded, _steps(prog, opt, 3, 3, rank, world_size)


@pytest.mark.parametrize("writer, reader", [((2, "zero3"), (4, "zero1")),
                                            pytest.param((4, "zero2"), (2, "zero3"), marks=pytest.mark.slow),
                                            ((2, "dp"), (1, "dce"))])
def test_a_checkpoint_written_by_n_ranks_loads_on_m(tmp_path, writer, reader):
    (saved, expected), *_ = run_ranks(writer[0], _save_then_continue, writer[1], str(tmp_path))
    if reader[0] == 1:
        results = [_load_then_continue(0, 1, reader[1], str(tmp_path))]
    else:
        results = run_ranks(reader[0], _load_then_continue, reader[1], str(tmp_path))
    for loaded, losses in results:
        for name, tensor in saved.items():
            assert torch.equal(loaded[name], tensor), f"{name} changed through the checkpoint"
        # the optimizer states came along: the continued run matches (other world sizes sum
        # the gradients in another order, hence a tolerance)
        for got, want in zip(losses, expected):
            assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def _crash_while_publishing(root):
    prog, opt = _program("dce")
    _steps(prog, opt, 0, 1)
    checkpoint._publish = lambda *args: os._exit(17)  # the process dies after writing its data
    checkpoint.save(root, prog, opt, step=2)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    prog, opt = _program("dce")
    checkpoint.save(tmp_path, prog, opt, step=1)
    before = {k: v.clone() for k, v in prog.full_state_dict().items()}
    child = multiprocessing.get_context("spawn").Process(target=_crash_while_publishing, args=(str(tmp_path),))
    child.start()
    child.join()
    assert child.exitcode == 17
    assert (tmp_path / "step-00000002.partial").is_dir(), "the crashed save got as far as writing data"
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    prog2, opt2 = _program("dce")
    _steps(prog2, opt2, 0, 2)  # different weights, then resume
    checkpoint.load(tmp_path, prog2, opt2)
    for name, tensor in before.items():
        assert torch.equal(prog2.full_state_dict()[name], tensor)
    checkpoint.save(tmp_path, prog2, opt2, step=2)  # the next save replaces the leftovers
    assert checkpoint.latest(tmp_path).name == "step-00000002"
    assert not (tmp_path / "step-00000002.partial").exists()


def test_another_models_checkpoint_is_a_clear_error(tmp_path):
    prog, opt = _program("dce", name="gpt-tiny")
    checkpoint.save(tmp_path, prog, opt, step=1)
    other, other_opt = _program("dce", name="llama-tiny")
    with pytest.raises(checkpoint.CheckpointError, match="written for another model") as info:
        checkpoint.load(tmp_path, other, other_opt)
    assert "\n" not in str(info.value)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.load(tmp_path / "nothing-here", prog, opt)


def test_old_checkpoints_are_pruned(tmp_path):
    prog, opt = _program("dce")
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, prog, opt, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]


# ------------------------------------------------------------------ tp, pp and 3D



@pytest.mark.parametrize("shape, dim, segments", [((12, 5), 0, (4, 4, 4)), ((3, 12), 1, (4, 8)), ((6, 4, 2), 1, (4,))])
def test_the_pieces_of_a_tp_slice_and_of_its_zero_shards_are_where_the_layout_puts_them(shape, dim, segments):
    from bmc import ir
    layout = ir.Layout("w", dim, segments)
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    for rank in range(2):
        local = layout.local(full, rank, 2).reshape(-1)
        runs = checkpoint._runs(layout, layout.local_shape(shape, 2), rank, 2)
        for start, end in [(0, local.numel()), (0, 7), (7, local.numel()), (3, 4)]:  # whole, and ZeRO shards
            pieces = checkpoint._clip(runs, start, end)
            assert sum(n for _, _, n in pieces) == end - start
            for lo, f, n in pieces:  # each piece: this rank's elements [lo, lo + n) of the shard
                assert torch.equal(full.reshape(-1)[f:f + n], local[start + lo:start + lo + n])

def _parallel_program(pipeline, world_size, rows):
    """gpt-tiny cut to 2 blocks (2 pipeline stages), traced with `rows` rows (one microbatch)."""
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("gpt-tiny"), n_layer=2))
    x = torch.zeros(rows, SEQ, dtype=torch.long)
    prog = bmc.compile(model, passes=pipeline, example_inputs=(x, x), world_size=world_size)
    return prog, prog.optimizer(torch.optim.AdamW, lr=LR)


def _parallel_steps(prog, opt, first, count):
    """Steps on a replica's rows (its tp and pp ranks read the same); the global mean loss."""
    mesh = prog.mesh
    replica, replicas = mesh.get_local_rank("dp"), mesh.size(mesh.mesh_dim_names.index("dp"))
    losses = []
    for step in range(first, first + count):
        opt.zero_grad()
        x, y = TEXT.local(step, replica, replicas)
        if hasattr(prog, "step"):
            loss = prog.step(x, y)
        else:
            loss = prog(x, y)
            loss.backward()
        opt.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
    return losses


def _interrupted_and_uninterrupted(rank, world_size, pipeline, rows, root):
    """3 steps, a checkpoint, 3 more (uninterrupted); then a fresh program that has taken a
    step of its own loads the checkpoint and takes the same 3 steps."""
    prog, opt = _parallel_program(pipeline, world_size, rows)
    _parallel_steps(prog, opt, 0, 3)
    checkpoint.save(root, prog, opt, step=3)
    saved = prog.full_state_dict()
    expected = _parallel_steps(prog, opt, 3, 3)
    fresh, fresh_opt = _parallel_program(pipeline, world_size, rows)
    _parallel_steps(fresh, fresh_opt, 0, 1)  # weights and optimizer states the load must replace
    checkpoint.load(root, fresh, fresh_opt)
    loaded = fresh.full_state_dict()
    return saved, loaded, expected, _parallel_steps(fresh, fresh_opt, 3, 3)


def _check_resume_and_one_process_reader(results, root):
    saved = results[0][0]
    for _, loaded, expected, resumed in results:
        for name, tensor in saved.items():
            assert torch.equal(loaded[name], tensor), f"{name} changed through the checkpoint"
        assert max(abs(a - b) for a, b in zip(resumed, expected)) <= 1e-6, (resumed, expected)
    # the full-size layout: one process reads the tp slices (fused qkv included) as whole weights
    prog, opt = _parallel_program("dce", 1, GLOBAL_BATCH)
    checkpoint.load(root, prog, opt)
    for name, tensor in prog.full_state_dict().items():
        assert torch.equal(tensor, saved[name]), f"{name} reassembled wrongly"
    opt.zero_grad()
    loss = prog(*TEXT.local(3))
    loss.backward()
    opt.step()
    assert abs(loss.item() - results[0][2][0]) <= 1e-5 * loss.item()
    return results[0][2]


def test_tp2_resumes_exactly_and_loads_in_one_process(tmp_path):
    results = run_ranks(2, _interrupted_and_uninterrupted, "tp2", GLOBAL_BATCH, str(tmp_path))
    _check_resume_and_one_process_reader(results, tmp_path)


@pytest.mark.slow  # about 2 minutes on 2 cores
def test_tp2_zero1_pp2_on_8_ranks_resumes_exactly(tmp_path):
    pipeline = "tp2,zero{stage=1},pp{stages=2,microbatches=2}"
    # 2 replicas of 2 rows each, in 2 microbatches of one row
    results = run_ranks(8, _interrupted_and_uninterrupted, pipeline, 1, str(tmp_path), timeout=600)
    expected = _check_resume_and_one_process_reader(results, tmp_path)
    print("3D losses after the checkpoint:", expected, "resumed:", results[0][3])
