"""Deferred tensors: weights that are read, or computed, only when a value is asked for.

A model larger than memory is traced with its parameters on the meta device; each parameter
is then replaced by a `Deferred` tensor that knows where its value lies (a tensor of a
safetensors file). Passes run on the graph as they would on real weights: every operation on
a deferred tensor (quant-int8's scales and int8 rows, a merged projection's cat, a pruned
slice) gives another deferred tensor that records the operation, with its shape and dtype
computed on the meta device. `materialize` evaluates what a part of the model needs, reading
only the checkpoint tensors its recipe names (memory-mapped), so a build holds one block's
weights at a time.

Why our own and not torch's deferred_init (torchdistx, unmaintained, not for torch 2.x) or
FakeTensor (it forgets how a value was made): the recipe, replayed later, is the point.

A decision that reads values (a pruning score's topk, `.item()`) materializes its operands
there and then and returns a real tensor; the values are dropped once used. Operations in
place are refused: a recipe replays functions of the checkpoint, never mutations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map

from bmc.errors import BmcError

aten = torch.ops.aten

# operations whose result is a Python value or depends on the operands' values: run on the
# materialized operands, their result real
_BY_VALUE = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default,
             aten.nonzero.default, aten._unique2.default, aten.masked_select.default}


class DeferredError(BmcError):
    """An operation a deferred weight cannot record (in place), or a value that cannot be read."""


@dataclass(frozen=True)
class Read:
    """A tensor of a safetensors file, as `dtype`."""
    path: str
    key: str
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.path, framework="pt") as shard:
            return shard.get_tensor(self.key).to(self.dtype)


@dataclass(frozen=True, eq=False)
class Op:
    """An aten operation on deferred (and real) operands; `index` picks one of several results."""
    func: Any
    args: tuple
    kwargs: dict
    index: int | None


class Deferred(torch.Tensor):
    """A meta tensor with the recipe of its value (a Read, or an Op on other tensors)."""

    @staticmethod
    def __new__(cls, meta: torch.Tensor, recipe):
        tensor = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(),
                                                     storage_offset=meta.storage_offset(), dtype=meta.dtype,
                                                     device="meta", requires_grad=False)
        tensor.meta_value, tensor.recipe = meta, recipe
        return tensor

    def __repr__(self) -> str:
        return f"Deferred({list(self.shape)}, {self.dtype}, {_describe(self.recipe)})"

    # reading values: the value, computed there and then (torch refuses these on a subclass
    # before any dispatch)
    def tolist(self):
        return materialize(self).tolist()

    def numpy(self, *args, **kwargs):
        return materialize(self).numpy(*args, **kwargs)

    def __deepcopy__(self, memo):  # immutable (no in-place operation records): a copy is itself
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BY_VALUE:
            return func(*materialize_all(args), **materialize_all(kwargs))
        if func._schema.is_mutable:
            raise DeferredError(f"{func} changes a deferred weight in place; a streamed build replays functions of "
                                f"the checkpoint only: build without streaming, or write the pass out of place")
        _refuse_valueless(func, (args, kwargs))
        metas = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))
        if isinstance(metas, torch.Tensor):
            return Deferred(metas, Op(func, args, kwargs, None))
        if isinstance(metas, (tuple, list)) and all(isinstance(m, torch.Tensor) for m in metas):
            return type(metas)(Deferred(m, Op(func, args, kwargs, i)) for i, m in enumerate(metas))
        return metas  # a size, a dtype: the meta computation's answer is the answer


def _refuse_valueless(func, operands) -> None:
    """A meta tensor that is not deferred has no value to replay (an index list torch turned
    into a tensor on the weight's device, meta): refused, never replayed as garbage."""
    from torch.utils._pytree import tree_leaves
    for value in tree_leaves(operands):
        if isinstance(value, torch.Tensor) and not isinstance(value, Deferred) and value.device.type == "meta":
            raise DeferredError(f"{func} on a deferred weight takes a tensor without values (on the meta device, "
                                f"e.g. an index moved to the weight's device): give it as a cpu tensor")


def _as_meta(value):
    if isinstance(value, Deferred):
        return value.meta_value
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def _describe(recipe) -> str:
    if isinstance(recipe, Read):
        return f"{recipe.key} of {recipe.path.rsplit('/', 1)[-1]}"
    return f"{recipe.func}"


def is_deferred(value) -> bool:
    return isinstance(value, Deferred)


def read(path: str, key: str, shape, dtype: torch.dtype) -> Deferred:
    """A deferred tensor whose value is tensor `key` of safetensors file `path`, as `dtype`."""
    return Deferred(torch.empty(shape, dtype=dtype, device="meta"), Read(path, key, dtype))


def materialize(value):
    """The real value of `value` (itself when it is not deferred): its recipe evaluated, reading
    the checkpoint tensors it names."""
    return materialize_all([value])[0] if isinstance(value, Deferred) else value


def materialize_all(tree):
    """`tree` with every deferred tensor in it made real, in one evaluation: what several of
    them compute in common (q's int8 rows and its scales both read q) is computed once."""
    from torch.utils._pytree import tree_leaves
    roots = [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Deferred)]
    evaluation = _Evaluation(roots)
    return tree_map(lambda v: evaluation.take(v.recipe) if isinstance(v, Deferred) else v, tree)


def _inputs(recipe) -> list:
    from torch.utils._pytree import tree_leaves
    if isinstance(recipe, Read):
        return []
    return [leaf.recipe for leaf in tree_leaves((recipe.args, recipe.kwargs)) if isinstance(leaf, Deferred)]


class _Evaluation:
    """Recipes evaluated with each intermediate value freed after its last reader: a block's
    quantization would otherwise hold every fp32 step of every weight (abs, the division, the
    rounding: ~6 copies of the block, 4.8 GB at LLaMA-7B's width, measured as the build's peak)
    until the block was done."""

    def __init__(self, roots: list[Deferred]):
        self.uses: dict[int, int] = {}
        self.memo: dict[int, torch.Tensor] = {}
        seen, stack = set(), [root.recipe for root in roots]
        for root in roots:
            self.uses[id(root.recipe)] = self.uses.get(id(root.recipe), 0) + 1
        while stack:
            recipe = stack.pop()
            if id(recipe) in seen:
                continue
            seen.add(id(recipe))
            for child in _inputs(recipe):
                self.uses[id(child)] = self.uses.get(id(child), 0) + 1
                stack.append(child)

    def take(self, recipe) -> torch.Tensor:
        """The value, for a reader counted in `uses`: freed here after its last one."""
        value = self._value(recipe)
        self._release(recipe)
        return value

    def _value(self, recipe) -> torch.Tensor:
        key = id(recipe)
        if key not in self.memo:
            if isinstance(recipe, Read):
                self.memo[key] = recipe.load()
            else:
                def real(v):
                    return self.take(v.recipe) if isinstance(v, Deferred) else v
                with torch.no_grad():
                    outputs = recipe.func(*tree_map(real, recipe.args), **tree_map(real, recipe.kwargs))
                self.memo[key] = outputs if recipe.index is None else outputs[recipe.index]
        return self.memo[key]

    def _release(self, recipe) -> None:
        key = id(recipe)
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            self.memo.pop(key, None)


def materialize_module(module: torch.nn.Module) -> int:
    """Every deferred parameter and buffer of `module` replaced by its value, in place; how many."""
    slots = []  # (table or owner, name, deferred)
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            slots += [(table, name, value) for name, value in table.items() if isinstance(value, Deferred)]
        slots += [(owner, name, value) for name, value in vars(owner).items() if isinstance(value, Deferred)]
    values = materialize_all([value for _, _, value in slots])
    for (where, name, _), real in zip(slots, values):
        if isinstance(where, torch.nn.Module):  # a tensor constant fx keeps as a plain attribute
            setattr(where, name, real)
        else:
            where[name] = real
    for owner in module.modules():  # parameters stay parameters (torch.onnx exports them as weights)
        for name, value in list(owner._parameters.items()):
            if value is not None and not isinstance(value, torch.nn.Parameter):
                owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return len(slots)


def deferred_names(module: torch.nn.Module) -> list[str]:
    return [n for n, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers())
            if isinstance(t, Deferred)]


def map_deferred(module: torch.nn.Module, make: Callable[[str, torch.Tensor], torch.Tensor | None]) -> int:
    """Replace the meta parameters and buffers of `module`, by name, with what `make(name, t)`
    gives (None keeps the tensor); one tensor object registered under several names (tied
    weights) gets one replacement. How many objects were replaced."""
    done: dict[int, torch.Tensor] = {}
    replaced = []  # the old tensors kept alive while ids key `done` (a freed id is reused)
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for name, value in list(table.items()):
                if value is None or value.device.type != "meta" or isinstance(value, Deferred):
                    continue
                if id(value) not in done:
                    made = make(f"{prefix}.{name}" if prefix else name, value)
                    if made is None:
                        continue
                    done[id(value)] = made
                made = done[id(value)]
                replaced.append(value)
                table[name] = torch.nn.Parameter(made, requires_grad=False) if table is owner._parameters else made
    return len(done)


def meta_to_cpu(gm: torch.fx.GraphModule) -> int:
    """A graph traced with its weights on the meta device runs where they will be: every
    device the trace baked in as meta (HF builds masks and ranges on the embeddings' device)
    becomes the cpu. How many arguments changed."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    changed = 0

    def swap(value):
        nonlocal changed
        if isinstance(value, torch.device) and value == meta:
            changed += 1
            return cpu
        return value
    for node in gm.graph.nodes:
        node.args = tree_map(swap, node.args)
        node.kwargs = tree_map(swap, node.kwargs)
    gm.recompile()
    return changed


class _Materializing(torch.fx.Interpreter):
    """Runs a graph reading each deferred weight when an operation takes it, and letting it go
    after: an exported graph fetches every weight at its top (get_attr), so reading them there
    would hold the whole model."""

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *materialize_all((args, kwargs)))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *materialize_all((args, kwargs)))


def run_reading_weights(gm: torch.fx.GraphModule, *args):
    """`gm` run on `args` with its deferred weights read one by one as the nodes need them
    (never the whole model): a reference forward of a model larger than memory."""
    with torch.no_grad():
        return _Materializing(gm).run(*args)
