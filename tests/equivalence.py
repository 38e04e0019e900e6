"""Helpers for the equivalence tests of rewriting passes: inputs other than the tracing
example, and gradients of sliced weights against the matching slices of the reference's."""
import torch

from bmc.ir.trace import normalize_example_inputs


def vocab_size(model: torch.nn.Module) -> int:
    """The token ids a model takes: its first embedding table's rows."""
    return next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))


def other_inputs(model, example_inputs, seed: int = 123, batch: int | None = None, seq: int | None = None):
    """The example's structure with every token-id tensor redrawn (other values, and another
    batch/seq when given: for a dynamic trace), so a check does not pass on the example alone."""
    args, kwargs = normalize_example_inputs(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab_size(model)

    def redraw(t):
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 2):
            return t
        shape = (batch or t.shape[0], seq or t.shape[1])
        return torch.randint(0, vocab, shape, generator=gen)

    new_args = tuple(redraw(a) for a in args)
    new_kwargs = {k: redraw(v) for k, v in kwargs.items()}
    return (new_args, new_kwargs) if new_kwargs else new_args


def assert_grads_match_slices(transformed: dict, reference: dict, slices: dict, atol: float = 1e-5):
    """Every parameter of `transformed` has the reference's gradient: in full where its shape
    is the original's, else the slice `slices[name] = (dim, kept indices)` of it. A sliced
    parameter without a stated slice fails: none is skipped. Missing gradients count as zero
    (a branch the pruning cut reads no parameter)."""
    checked = 0
    for name, p in transformed.items():
        ref = reference[name]
        want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        if name in slices:
            dim, kept = slices[name]
            want = want.index_select(dim, torch.as_tensor(kept, dtype=torch.long))
        assert p.shape == want.shape, f"{name}: {tuple(p.shape)} vs the reference's slice {tuple(want.shape)}"
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, want, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
        checked += name in slices
    assert checked == len(slices), f"sliced parameters not found in the program: {set(slices) - set(transformed)}"


def probe_loss(out: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A loss whose gradient reaches every parameter: the outputs against a fixed random
    direction. (out ** 2).mean() is constant after a final LayerNorm with its initial weights,
    so an encoder's gradients would all be ~0 and any slice would match.)"""
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out.float() * direction).sum()


def heads_masked(model, inputs, kept: dict):
    """The original with every head prune-heads removed zeroed: its columns of o (rows of a
    Conv1D o). `kept`: the PrunePlan's kept heads by attention module."""
    import copy

    import bmc
    from bmc.analysis.structure import structure_of
    masked = copy.deepcopy(model)
    for block in structure_of(bmc.trace(model, inputs)).blocks:
        att = block.attention
        drop = sorted(set(range(att.num_heads)) - set(kept.get(att.module, range(att.num_heads))))
        zero_inputs(masked, att.o, [h * att.head_dim + i for h in drop for i in range(att.head_dim)])
    return masked


def zero_inputs(model, projection, inputs: list[int]) -> None:
    """Zero the weight entries of `projection` (a structure-analysis Linear) that read the given
    input features: what removing them from its input leaves of the product."""
    with torch.no_grad():
        weight = model.get_parameter(projection.weight)
        if projection.transposed:
            weight[inputs] = 0
        else:
            weight[:, inputs] = 0


def assert_equal_and_backward(prog, reference, model, inputs, dynamic: bool, changed_atol: float) -> None:
    """`prog` gives `reference`'s outputs on other ids (another batch and length when the trace
    is dynamic) and on the example; `reference` differs from the untouched `model` (so the test
    can fail); a probe loss is backpropagated through both, for the caller to compare gradients."""
    from helpers import run
    other = other_inputs(model, inputs, batch=3 if dynamic else None, seq=11 if dynamic else None)
    torch.testing.assert_close(run(prog, other), run(reference, other), atol=1e-5, rtol=1e-5)
    out, want = run(prog, inputs), run(reference, inputs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, run(model, inputs), atol=changed_atol)
    probe_loss(out).backward()
    probe_loss(want).backward()
