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
        cols = [h * att.head_dim + i for h in drop for i in range(att.head_dim)]
        with torch.no_grad():
            weight = masked.get_parameter(att.o.weight)
            if att.o.transposed:
                weight[cols] = 0
            else:
                weight[:, cols] = 0
    return masked
