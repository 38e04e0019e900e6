"""bmc:: collectives: values and gradients on real gloo ranks, fake kernels for planning."""
import torch
import torch.distributed as dist

from bmc.ir import ops
from bmc.cli.local_ranks import run_ranks


def _collectives(rank, world_size):
    ops.register_group("g", world_size, dist.group.WORLD)
    x = torch.arange(6.0).reshape(2, 3) + 10 * rank
    x.requires_grad_(True)
    gathered = torch.ops.bmc.all_gather(x, 0, "g")
    (gathered * (torch.arange(gathered.numel()).reshape(gathered.shape) + 1)).sum().backward()
    y = torch.ones(4, 2) * (rank + 1)
    scattered = torch.ops.bmc.reduce_scatter(y, 0, "g")
    z = torch.full((3,), float(rank + 1), requires_grad=True)
    reduced = torch.ops.bmc.reduce_from_group(z, "g")
    reduced.sum().backward()
    w = torch.full((3,), float(rank + 1), requires_grad=True)
    copied = torch.ops.bmc.copy_to_group(w, "g")
    (copied * (rank + 1)).sum().backward()
    return gathered.detach(), x.grad, scattered, reduced.detach(), z.grad, copied.detach(), w.grad


def test_collectives_and_their_gradients_on_two_ranks():
    results = run_ranks(2, _collectives)
    total = sum(range(1, 3))
    for rank, (gathered, x_grad, scattered, reduced, z_grad, copied, w_grad) in enumerate(results):
        assert torch.equal(gathered, torch.cat([torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(2)]))
        # backward of all_gather: reduce-scatter (sum over both ranks' identical upstream grads)
        expected = 2 * (torch.arange(12.0).reshape(4, 3) + 1)[2 * rank:2 * rank + 2]
        assert torch.equal(x_grad, expected)
        assert torch.equal(scattered, torch.full((2, 2), float(total)))
        assert torch.equal(reduced, torch.full((3,), float(total)))
        assert torch.equal(z_grad, torch.ones(3))  # g: identity backward
        assert torch.equal(copied, torch.full((3,), float(rank + 1)))  # f: identity forward
        assert torch.equal(w_grad, torch.full((3,), float(total)))  # f: all-reduce backward


def test_fake_kernels_use_the_planned_group_size():
    ops.register_group("plan-dp", 64)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 8)
        assert torch.ops.bmc.all_gather(x, 0, "plan-dp").shape == (128, 8)
        assert torch.ops.bmc.reduce_scatter(torch.empty(128, 8), 0, "plan-dp").shape == (2, 8)
