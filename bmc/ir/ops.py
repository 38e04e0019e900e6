"""bmc:: torch.library ops: collectives with the autograd a parallel program needs.

They are real custom ops with fake kernels, so graphs that contain them stay printable,
exportable and safe from dead-code elimination. A collective names its process group by a
string (`"dp"`, `"tp"`): ops cannot take ProcessGroup objects, and a plan made without
processes (bmc-opt --world-size 64) still needs the group's size for shapes.

Autograd follows the meaning, not torch's functional collectives' global-math semantics:
- `copy_to_group` (Megatron's f): identity forward, all-reduce backward;
- `reduce_from_group` (Megatron's g): all-reduce forward, identity backward;
- `all_gather`: gather forward, reduce-scatter (sum) backward; `reduce_scatter` the reverse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bmc.errors import BackendError


@dataclass(frozen=True)
class Group:
    size: int
    process_group: object = None  # None: a planned group, no processes behind it


GROUPS: dict[str, Group] = {}


def register_group(name: str, size: int, process_group=None) -> None:
    """Make a group known to the ops: its size (for shapes) and, when running, its processes."""
    GROUPS[name] = Group(size, process_group)


def group_size(name: str) -> int:
    return GROUPS[name].size if name in GROUPS else 1


def _process_group(name: str):
    group = GROUPS.get(name)
    if group is None or group.size == 1:
        return None
    if group.process_group is None or not dist.is_initialized():
        raise BackendError(f"collective on group '{name}' (size {group.size}) needs torch.distributed: "
                           f"launch with torchrun so the backend can create the group")
    return group.process_group


# ------------------------------------------------------------------ all_gather / reduce_scatter

@torch.library.custom_op("bmc::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    pg = _process_group(group)
    if pg is None:
        return x.clone()
    size = dist.get_world_size(pg)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] * size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, moved, group=pg)
    return out.movedim(0, dim).contiguous()


def _gathered_fake(x, dim, group):
    shape = list(x.shape)
    shape[dim] = shape[dim] * group_size(group)
    return x.new_empty(shape)


def _scattered_fake(x, dim, group):
    shape = list(x.shape)
    shape[dim] = shape[dim] // group_size(group)
    return x.new_empty(shape)


all_gather.register_fake(_gathered_fake)


@torch.library.custom_op("bmc::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Sum `x` over the ranks and keep this rank's slice of `dim`."""
    pg = _process_group(group)
    if pg is None:
        return x.clone()
    size = dist.get_world_size(pg)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, moved, op=dist.ReduceOp.SUM, group=pg)
    return out.movedim(0, dim).contiguous()


reduce_scatter.register_fake(_scattered_fake)


@torch.library.custom_op("bmc::scatter", mutates_args=())
def scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Keep this rank's slice of `dim` (every rank holds all of `x`); backward all-gathers:
    where a replicated activation enters a sequence-parallel region."""
    pg = _process_group(group)
    if pg is None:
        return x.clone()
    return x.chunk(dist.get_world_size(pg), dim)[dist.get_rank(pg)].clone(memory_format=torch.contiguous_format)


scatter.register_fake(_scattered_fake)


@torch.library.custom_op("bmc::unscatter", mutates_args=())
def unscatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """The inverse of scatter: gather the slices along `dim`; backward keeps this rank's slice
    of the gradient (whole on every rank: what reads the gathered value is replicated), where
    all_gather's backward would sum partial gradients."""
    return torch.ops.bmc.all_gather(x, dim, group)


unscatter.register_fake(_gathered_fake)


def _setup(ctx, inputs, output):
    _, ctx.dim, ctx.group = inputs


def _all_gather_backward(ctx, grad):
    return torch.ops.bmc.reduce_scatter(grad, ctx.dim, ctx.group), None, None


def _reduce_scatter_backward(ctx, grad):
    return torch.ops.bmc.all_gather(grad, ctx.dim, ctx.group), None, None


torch.library.register_autograd("bmc::all_gather", _all_gather_backward, setup_context=_setup)
torch.library.register_autograd("bmc::reduce_scatter", _reduce_scatter_backward, setup_context=_setup)
torch.library.register_autograd("bmc::scatter", _reduce_scatter_backward, setup_context=_setup)  # gather back
torch.library.register_autograd("bmc::unscatter", lambda ctx, grad: (torch.ops.bmc.scatter(grad, ctx.dim, ctx.group),
                                                                     None, None), setup_context=_setup)


# ------------------------------------------------------------------ Megatron's f and g

def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    out = x.clone()
    pg = _process_group(group)
    if pg is not None:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=pg)
    return out


@torch.library.custom_op("bmc::reduce_from_group", mutates_args=())
def reduce_from_group(x: torch.Tensor, group: str) -> torch.Tensor:
    """g: all-reduce (sum) forward, identity backward (after a row-parallel region)."""
    return _all_reduce(x, group)


@torch.library.custom_op("bmc::copy_to_group", mutates_args=())
def copy_to_group(x: torch.Tensor, group: str) -> torch.Tensor:
    """f: identity forward, all-reduce (sum) backward (before a column-parallel region)."""
    return x.clone()


for _op in (reduce_from_group, copy_to_group):
    _op.register_fake(lambda x, group: torch.empty_like(x))


def _group_setup(ctx, inputs, output):
    ctx.group = inputs[1]


torch.library.register_autograd("bmc::reduce_from_group", lambda ctx, grad: (grad, None),
                                setup_context=_group_setup)
torch.library.register_autograd("bmc::copy_to_group",
                                lambda ctx, grad: (torch.ops.bmc.reduce_from_group(grad, ctx.group), None),
                                setup_context=_group_setup)

# ------------------------------------------------------------------ ZeRO-3 parameters

# Callbacks told of every gathered parameter (the runtime uses them to gather again in
# backward instead of keeping the full weight, and to measure what is alive).
GATHER_WATCHERS: list = []
# Callbacks told of every tensor saved for backward by hooks that replace the caller's
# (saved-tensor hooks do not nest: only the innermost pair runs), for measurement.
SAVED_OBSERVERS: list = []
# The runtime's prefetcher (backends/data_parallel.py), if any: it starts the all-gathers of
# the weights that come next while the current one is in use.
PREFETCHER = None
# The runtime's gradient reducer, if any: `reduce(shard_key, grad) -> bool` takes a gathered
# weight's full gradient for a bucketed, asynchronous reduce-scatter (True), or declines it
# (False) and gather_param's backward reduce-scatters it at once.
GRAD_REDUCER = None


def shard_numel(numel: int, size: int) -> int:
    """Elements of one rank's flat shard: the parameter flattened and padded to divide evenly."""
    return -(-numel // size)


@torch.library.custom_op("bmc::gather_param", mutates_args=())
def gather_param(shard: torch.Tensor, shape: list[int], group: str) -> torch.Tensor:
    """Rebuild a ZeRO-3 parameter from every rank's flat shard (all-gather, drop the padding,
    view as `shape`). Backward reduce-scatters (sums) the gradient into this rank's shard."""
    numel = math.prod(shape)
    pg = _process_group(group)
    if pg is None:  # one rank: the "shard" is the whole parameter
        return shard.reshape(-1)[:numel].reshape(shape).clone()
    out = PREFETCHER.take(shard) if PREFETCHER is not None else None
    if out is None:
        out = torch.empty(shard.numel() * dist.get_world_size(pg), dtype=shard.dtype, device=shard.device)
        dist.all_gather_single(out, shard.contiguous().reshape(-1), group=pg)
    if PREFETCHER is not None:
        PREFETCHER.gathered(shard)
    full = out[:numel].view(shape)
    for watch in GATHER_WATCHERS:
        watch(full, shard, shape, group)
    return full


@gather_param.register_fake
def _(shard, shape, group):
    return shard.new_empty(shape)


def _gather_param_setup(ctx, inputs, output):
    shard, _, ctx.group = inputs
    ctx.shard_shape = shard.shape
    ctx.shard_key = id(shard)


def _gather_param_backward(ctx, grad):
    pg = _process_group(ctx.group)
    flat = grad.reshape(-1)
    if pg is None:
        return flat.reshape(ctx.shard_shape), None, None
    if GRAD_REDUCER is not None and GRAD_REDUCER(ctx.shard_key, grad):
        return None, None, None  # the runtime sets the shard's gradient when the bucket is reduced
    size = dist.get_world_size(pg)
    local = math.prod(ctx.shard_shape)
    padded = torch.zeros(local * size, dtype=grad.dtype, device=grad.device)
    padded[:flat.numel()] = flat
    out = torch.empty(local, dtype=grad.dtype, device=grad.device)
    dist.reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=pg)
    return out.reshape(ctx.shard_shape), None, None


torch.library.register_autograd("bmc::gather_param", _gather_param_backward, setup_context=_gather_param_setup)

# ------------------------------------------------------------------ fp16 loss scaling


@torch.library.custom_op("bmc::scale_grad", mutates_args=())
def scale_grad(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by `scale` (the loss scale).

    The amp pass puts it on the program's outputs, so fp16 gradients are scaled without the
    training script scaling its loss; `scale` is a buffer the optimizer updates."""
    return x.clone()


@scale_grad.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _scale_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scale_grad_backward(ctx, grad):
    scale, = ctx.saved_tensors
    return grad * scale.to(grad.dtype), None


torch.library.register_autograd("bmc::scale_grad", _scale_grad_backward, setup_context=_scale_grad_setup)


# ------------------------------------------------------------------ vocabulary-parallel embedding and loss


def _vocab_range(rows: int, group: str) -> tuple[int, int]:
    """[start, end) of the vocabulary this rank's `rows` embedding rows hold."""
    pg = _process_group(group)
    rank = dist.get_rank(pg) if pg is not None else 0
    return rank * rows, (rank + 1) * rows


@torch.library.custom_op("bmc::vocab_parallel_embedding", mutates_args=())
def vocab_parallel_embedding(weight: torch.Tensor, indices: torch.Tensor, padding_idx: int, group: str) -> torch.Tensor:
    """This rank's part of an embedding lookup whose rows are split over the group by
    vocabulary: rows it holds are looked up, the others are zero (a partial sum: g adds the
    ranks' parts)."""
    start, end = _vocab_range(weight.shape[0], group)
    mine = (indices >= start) & (indices < end)
    out = torch.nn.functional.embedding((indices - start) * mine, weight)
    return out * mine.unsqueeze(-1).to(out.dtype)


@vocab_parallel_embedding.register_fake
def _(weight, indices, padding_idx, group):
    return weight.new_empty((*indices.shape, weight.shape[1]))


def _vocab_embedding_setup(ctx, inputs, output):
    weight, indices, ctx.padding_idx, ctx.group = inputs
    ctx.rows = weight.shape[0]
    ctx.save_for_backward(indices)


def _vocab_embedding_backward(ctx, grad):
    indices, = ctx.saved_tensors
    start, end = _vocab_range(ctx.rows, ctx.group)
    mine = (indices >= start) & (indices < end)
    if ctx.padding_idx >= 0:
        mine &= indices != ctx.padding_idx  # the padding row gets no gradient, as in nn.Embedding
    flat = grad.reshape(-1, grad.shape[-1]) * mine.reshape(-1, 1).to(grad.dtype)
    grad_weight = grad.new_zeros((ctx.rows, grad.shape[-1]))
    grad_weight.index_add_(0, ((indices - start) * mine).reshape(-1), flat)
    return grad_weight, None, None, None


torch.library.register_autograd("bmc::vocab_parallel_embedding", _vocab_embedding_backward,
                                setup_context=_vocab_embedding_setup)


def _all_reduce_(x: torch.Tensor, group: str, op=None) -> torch.Tensor:
    pg = _process_group(group)
    if pg is not None:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=pg)
    return x


@torch.library.custom_op("bmc::vocab_parallel_cross_entropy", mutates_args=())
def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                                 group: str) -> torch.Tensor:
    """Mean cross-entropy of logits split over the group by vocabulary (Megatron's
    vocab-parallel loss): the max, the sum of exponentials and the target's logit are
    reduced over the ranks, so no rank holds the whole [tokens, vocab] logits."""
    loss, _ = _vocab_ce_forward(logits, target, ignore_index, group)
    return loss


def _vocab_ce_forward(logits, target, ignore_index, group):
    start, end = _vocab_range(logits.shape[-1], group)
    x = logits.float()
    peak = _all_reduce_(x.max(dim=-1).values, group, dist.ReduceOp.MAX if dist.is_initialized() else None)
    shifted = x - peak.unsqueeze(-1)
    exp = shifted.exp()
    total = _all_reduce_(exp.sum(-1), group)
    mine = (target >= start) & (target < end)
    local = ((target - start) * mine).unsqueeze(-1)
    picked = _all_reduce_(shifted.gather(-1, local).squeeze(-1) * mine, group)
    valid = target != ignore_index
    per_token = (total.log() - picked) * valid
    loss = per_token.sum() / valid.sum().clamp(min=1)
    return loss.to(logits.dtype), (exp / total.unsqueeze(-1), mine, local, valid)


@vocab_parallel_cross_entropy.register_fake
def _(logits, target, ignore_index, group):
    return logits.new_empty(())


def _vocab_ce_setup(ctx, inputs, output):
    logits, target, ctx.ignore_index, ctx.group = inputs
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(logits, target)


def _vocab_ce_backward(ctx, grad):
    # the softmax is recomputed (two small all-reduces) rather than kept: it is [tokens, vocab/tp]
    logits, target = ctx.saved_tensors
    _, (softmax, mine, local, valid) = _vocab_ce_forward(logits.detach(), target, ctx.ignore_index, ctx.group)
    softmax.scatter_add_(-1, local, -mine.unsqueeze(-1).to(softmax.dtype))
    scale = grad / valid.sum().clamp(min=1)
    return (softmax * valid.unsqueeze(-1) * scale).to(ctx.logits_dtype), None, None, None


torch.library.register_autograd("bmc::vocab_parallel_cross_entropy", _vocab_ce_backward, setup_context=_vocab_ce_setup)

# ------------------------------------------------------------------ int8 linear


def _dequantized(weight_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight_q.to(dtype) * scale.to(dtype).reshape(-1, 1)  # one scale per row, or one for all


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row (token) of `x`, as integers held in x's dtype."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return (x * scale.reciprocal()).round_().clamp_(-127, 127), scale


@torch.library.custom_op("bmc::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                act: str) -> torch.Tensor:
    """y = x W^T + b with W held as int8 and one fp32 scale per output row (or one in all).
    act="none": weight-only, W dequantized on the fly; act="dynamic": W8A8, x quantized per
    token with its own absmax scale, the product accumulated exactly on integers."""
    if act == "dynamic":
        xq, x_scale = _quantize_rows(x.float())
        y = _integer_matmul(xq, weight_q).mul_(x_scale).mul_(scale.float().reshape(1, -1))  # in place: the
        y = y.to(x.dtype)  # epilogue passes over the output are what cost most at small widths
        return y.add_(bias) if bias is not None else y
    # the bias goes into the same addmm (a separate add costs a pass over the output)
    return torch.nn.functional.linear(x, _dequantized(weight_q, scale, x.dtype), bias)


def _integer_matmul(xq: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """xq @ weight_q^T summed exactly in int32 (torch._int_mm, 2-3x faster than an fp32 matmul
    on CPU), or in fp32 where no int8 kernel runs (exact while 127 * 127 * in_features < 2^24)."""
    rows = xq.reshape(-1, xq.shape[-1])
    if rows.device.type == "cpu" or (rows.is_cuda and rows.shape[0] > 16 and rows.shape[1] % 8 == 0
                                     and weight_q.shape[0] % 8 == 0):
        y = torch._int_mm(rows.to(torch.int8), weight_q.t()).float()
    else:
        y = rows @ weight_q.float().t()
    return y.reshape(*xq.shape[:-1], weight_q.shape[0])


@int8_linear.register_fake
def _(x, weight_q, scale, bias, act):
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def _int8_linear_setup(ctx, inputs, output):
    _, weight_q, scale, bias, _ = inputs
    ctx.save_for_backward(weight_q, scale)
    ctx.has_bias = bias is not None


def _int8_linear_backward(ctx, grad):
    # the weights are frozen; the input's gradient goes through the dequantized weight, so a
    # quantized model can still be distilled into (its other parameters train)
    weight_q, scale = ctx.saved_tensors
    bias_grad = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ _dequantized(weight_q, scale, grad.dtype), None, None, bias_grad, None


torch.library.register_autograd("bmc::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup)

# ------------------------------------------------------------------ attention over a KV cache


@torch.library.custom_op("bmc::cached_attention", mutates_args=())
def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, mask: torch.Tensor, kv_repeat: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's attention (bmc/serve/kv_cache.py): the new keys and values appended to
    the cache along the sequence ([B, kv_heads, P, D] + [B, kv_heads, T, D]), each kv head read
    by `kv_repeat` query heads (HF's repeat_kv: head h reads kv head h // kv_repeat), and
    sdpa(query [B, heads, T, D], ..., mask [B, 1, T, P + T] additive). Returns the attention
    output and the present cache. One op rather than cat/expand/sdpa so the ONNX lowering can
    give it to ONNX Runtime's GroupQueryAttention, which reads the cache without copying it per
    head (ort_lower)."""
    keys, values = torch.cat([past_key, key], 2), torch.cat([past_value, value], 2)
    read_keys, read_values = keys, values
    if kv_repeat > 1:
        read_keys = keys.repeat_interleave(kv_repeat, dim=1)
        read_values = values.repeat_interleave(kv_repeat, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, read_keys, read_values, attn_mask=mask, scale=scale)
    # laid out [B, T, heads, D] as CPU sdpa gives it: models view its transpose(1, 2) without a copy
    return out.transpose(1, 2).contiguous().transpose(1, 2), keys, values


@cached_attention.register_fake
def _(query, key, value, past_key, past_value, mask, kv_repeat, scale):
    def grown(past, new):
        return past.new_empty((*past.shape[:2], past.shape[2] + new.shape[2], past.shape[3]))
    batch, heads, tokens = query.shape[:3]
    out = query.new_empty((batch, tokens, heads, value.shape[-1])).transpose(1, 2)
    return out, grown(past_key, key), grown(past_value, value)


@torch.library.custom_op("bmc::slot_rotary_attention", mutates_args=())
def slot_rotary_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, mask: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                          kv_repeat: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cached_attention of query and key rotated (RoPE, rotate-half) at their cache slots: the
    T new tokens sit at slots P..P+T-1, P = mask.shape[-1] - T, and rotate by rows P..P+T-1 of
    the half tables cos_cache, sin_cache [max positions, D/2]. Where a row is left-padded by n
    slots, its tokens' positions are their slots less n; RoPE's scores depend on position
    differences alone, so the result is the one positions give (bmc/rewrite/slot_rotary.py
    proves the tables rotate by an angle linear in the position). ONNX Runtime's
    GroupQueryAttention with do_rotary: one kernel for both rotations and the attention."""
    tokens = query.shape[2]
    slots = torch.arange(mask.shape[-1] - tokens, mask.shape[-1], device=query.device)
    cos, sin = cos_cache[slots], sin_cache[slots]
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # [T, D], over batch and heads

    def rotated(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    return cached_attention(rotated(query), rotated(key), value, past_key, past_value, mask, kv_repeat, scale)


@slot_rotary_attention.register_fake
def _(query, key, value, past_key, past_value, mask, cos_cache, sin_cache, kv_repeat, scale):
    return cached_attention(query, key, value, past_key, past_value, mask, kv_repeat, scale)


# ------------------------------------------------------------------ serving kernels: RMSNorm, RoPE


@torch.library.custom_op("bmc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2 over the last dim) + eps), in HF's order of operations (so a
    rewritten graph computes what the original did, bit for bit). bmc/rewrite/rms_norm.py puts
    it where a serving build's graph spells the norm out; the ONNX lowering gives it to ONNX
    Runtime's SimplifiedLayerNormalization (one kernel for seven elementwise ops)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


rms_norm.register_fake(lambda x, weight, eps: torch.empty_like(x))


@torch.library.custom_op("bmc::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a residual connection and the norm that reads it,
    ONNX Runtime's SkipSimplifiedLayerNormalization."""
    total = x + residual
    return rms_norm(total, weight, eps), total


add_rms_norm.register_fake(lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)))


@torch.library.custom_op("bmc::rotary", mutates_args=())
def rotary(x: torch.Tensor, positions: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half form (GPT-NeoX's, HF's `rotate_half`):
    x [B, heads, T, D]; positions [B, T] index rows of the half tables cos_rows, sin_rows
    [rows, D/2]: out = x * cos + cat(-x2, x1) * sin with cos = cat(cos_rows[positions] twice).
    ONNX Runtime's com.microsoft RotaryEmbedding, the same signature; bmc/rewrite/rotary.py
    puts it where it proves the pattern."""
    cos = cos_rows[positions]
    sin = sin_rows[positions]
    cos, sin = torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([sin, sin], -1).unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


rotary.register_fake(lambda x, positions, cos_rows, sin_rows: torch.empty_like(x))


# ------------------------------------------------------------------ pipeline stage markers


@torch.library.custom_op("bmc::pipe", mutates_args=())
def pipe(x: torch.Tensor, stage: int) -> torch.Tensor:
    """Marks `x` entering pipeline stage `stage` (the pp pass puts one on every value that
    crosses a boundary). Identity in a single process; the torch backend cuts the graph at
    these markers, and each becomes a stage input received from the previous stage."""
    return x.clone()


@pipe.register_fake
def _(x, stage):
    return torch.empty_like(x)


torch.library.register_autograd("bmc::pipe", lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


COLLECTIVES = {torch.ops.bmc.gather_param.default, torch.ops.bmc.all_gather.default, torch.ops.bmc.reduce_scatter.default,
               torch.ops.bmc.scatter.default, torch.ops.bmc.unscatter.default,
               torch.ops.bmc.reduce_from_group.default, torch.ops.bmc.copy_to_group.default}
