"""insert-offload: saved activations of each block kept in CPU memory (outputs and gradients
unchanged); what=optimizer marks the program for the runtime.

CI has no accelerator, so no device-to-host copy happens here: on the CPU the hooks leave
host tensors as they are. The tests show that every tensor the blocks save goes through the
offload hooks (a probe around the program sees none of them) and comes out as a CPU tensor,
that the program computes the same outputs and gradients, and, with host memory taken for a
device's, that the copy path copies each saved tensor once, skips parameters, holds no
device tensor after the region returns and restores the values in backward. That device
memory actually drops needs a GPU run."""
import copy

import pytest
import torch
from bmc.passes import insert_offload
from bmc.passes.insert_offload import offload_saved
from helpers import assert_same_outputs_and_grads, saved_activation_bytes

import bmc
from bmc import ir
from bmc.models import zoo
from bmc.errors import PipelineError


def _offload_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is offload_saved]


@pytest.mark.parametrize("name", ["gpt-mini", "llama-tiny"])
def test_offload_keeps_outputs_and_gradients(name):
    model = zoo.build(name)
    inputs = model.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes="insert-offload{what=activations},verify", example_inputs=inputs)
    stats = program.records[0].statistics
    assert stats["blocks-offloaded"] == model.config.n_layer
    assert stats["saved-bytes-on-device-after"] < stats["saved-bytes-before"]
    calls = _offload_calls(program.graph_module)
    blocks = [ir.get(n, ir.Origin).source for n in calls]
    assert len(calls) == model.config.n_layer and all(ir.get(n, ir.Origin).pass_name == "insert-offload" for n in calls)
    assert ir.get_plan(program.graph_module, ir.OffloadPlan).activations == tuple(blocks)
    assert "offload_saved(%offload_block_" in ir.format_graph(program.graph_module)
    assert_same_outputs_and_grads(model, program, inputs)


def test_blocks_saved_tensors_are_held_in_host_memory(monkeypatch):
    model = zoo.build("gpt-tiny")
    inputs = model.example_inputs(batch=4, seq=32)
    plain = bmc.compile(copy.deepcopy(model), passes="dce", example_inputs=inputs)
    program = bmc.compile(copy.deepcopy(model), passes="dce,insert-offload", example_inputs=inputs)
    packed = []
    pack = insert_offload.HostSavedTensors.pack

    def spy(self, tensor):
        out = pack(self, tensor)
        packed.append(out if isinstance(out, torch.Tensor) else out[1])
        return out

    monkeypatch.setattr(insert_offload.HostSavedTensors, "pack", spy)
    # the offload hooks are the innermost: a probe around the program sees only what the
    # code outside the blocks saves (the final norm, the head, the embeddings' indices)
    outside = saved_activation_bytes(program, inputs)
    assert packed and all(t.device.type == "cpu" for t in packed)
    assert outside == program.records[1].statistics["saved-bytes-on-device-after"]
    assert outside < saved_activation_bytes(plain, inputs) / 5


def test_hooks_keep_parameters_and_host_tensors_as_they_are():
    hooks = insert_offload.HostSavedTensors(pin_memory=False)
    weight = torch.nn.Parameter(torch.randn(3, 3))
    activation = torch.randn(3, 3) * 2
    assert hooks.pack(weight) is weight and hooks.pack(activation) is activation
    assert hooks.unpack(weight) is weight and not hooks.copies


class _CopyEverything(insert_offload.HostSavedTensors):
    """The hooks with host memory taken for a device's: on a CPU-only machine this runs the
    copy path (one copy per tensor, parameters skipped, copies back in backward)."""

    def keeps(self, tensor):
        return tensor.requires_grad and tensor.grad_fn is None


def test_copy_path_copies_each_saved_tensor_once_and_restores_it():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4, requires_grad=True)
    hooks = _CopyEverything(pin_memory=False)
    with hooks:
        h = x @ weight                   # saves x and weight: both leaves, kept as they are
        y = (h * h).sum()                # saves h twice: one host copy
        assert [t.data_ptr() for t, _ in hooks.copies.values()] == [h.data_ptr()]
        host = next(iter(hooks.copies.values()))[1]
        assert host.data_ptr() != h.data_ptr() and torch.equal(host, h)
    assert not hooks.copies              # the region returned: no reference to `h` is held
    y.backward()
    expected_x, expected_w = torch.autograd.grad(((x @ weight) ** 2).sum(), (x, weight))
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(weight.grad, expected_w)


def test_options_parse_and_round_trip():
    for text in ("insert-offload", "insert-offload{what=activations}", "insert-offload{what=optimizer}"):
        pipeline = bmc.parse_pipeline(text)
        assert str(pipeline) == text and bmc.parse_pipeline(str(pipeline)) == pipeline
    with pytest.raises(PipelineError, match="expects one of activations|optimizer"):
        bmc.parse_pipeline("insert-offload{what=weights}")


def test_optimizer_sets_the_flag_and_leaves_the_graph():
    model = zoo.build("gpt-tiny")
    inputs = model.example_inputs()
    program = bmc.compile(copy.deepcopy(model), passes="ckpt,insert-offload{what=optimizer}", example_inputs=inputs)
    assert ir.get_plan(program.graph_module, ir.OffloadPlan).optimizer is True
    assert program.records[1].statistics == {"optimizer-offloaded": 1}
    assert not _offload_calls(program.graph_module)
    assert_same_outputs_and_grads(model, program, inputs)


@pytest.mark.parametrize("passes, first", [("ckpt,insert-offload", "insert-remat"),
                                           ("insert-offload,insert-remat{policy=selective}", "insert-offload")])
def test_offload_and_remat_of_the_same_blocks_is_a_clear_error(passes, first):
    model = zoo.build("gpt-tiny")
    with pytest.raises(PipelineError, match=f"after {first}.*: keep one of insert-remat / insert-offload"):
        bmc.compile(model, passes=passes)


def test_offload_without_blocks_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PipelineError, match=r"insert-offload\{what=activations\} found no repeated blocks"):
        bmc.compile(model, passes="insert-offload", example_inputs=(torch.randn(2, 4),))


def _train_steps(pipeline, steps=5):
    torch.manual_seed(0)
    model = zoo.build("gpt-tiny")
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(steps)]
    x = torch.zeros(2, 16, dtype=torch.long)
    prog = bmc.compile(model, passes=pipeline, example_inputs=(x, x))
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-2)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = prog(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, prog, opt


@pytest.mark.parametrize("precision", ["", "amp{dtype=bf16},"])
def test_optimizer_offload_steps_host_masters_and_trains_the_same(precision):
    """ZeRO-Offload's optimizer side: the optimizer steps fp32 copies held in host memory and
    writes the weights back; the run is the same as stepping on the device. (On this CPU-only
    machine host and device are one memory; the copies and the write-back still run.)"""
    plain_losses, plain, _ = _train_steps(f"{precision}dce")
    losses, prog, opt = _train_steps(f"{precision}insert-offload{{what=optimizer}}")
    assert losses == plain_losses
    for (name, p), q in zip(prog.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    masters = [t.master for t in opt.targets]
    assert all(m is not None and m.device.type == "cpu" and m.dtype == torch.float32 for m in masters)
    params = {p.untyped_storage().data_ptr() for p in prog.parameters()}
    assert not params & {m.untyped_storage().data_ptr() for m in masters}, "masters are copies, not the weights"
    states = [s for state in opt.state.values() for s in state.values() if torch.is_tensor(s) and s.dim() > 0]
    assert states and all(s.device.type == "cpu" for s in states)
