"""Reading and writing models: `.pt2` (torch.export archives) both ways, pickled `.pt` modules
(only with an explicit trust flag), `zoo:NAME` and `hf:DIR` (Hugging Face checkpoint directories).

A `.pt2` that bmc writes is an ordinary torch.export archive: other tools read it. bmc's own
annotations ride along: those of computing nodes in `node.meta["custom"]` (which export keeps),
those of parameters (lifted to inputs by export, where custom meta is dropped) and the pipeline
that produced the graph in an extra file `bmc.json` inside the archive.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import tempfile
import zipfile
from typing import Any

import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import ModelLoadError, ModelSaveError
import bmc.ir.ops  # noqa: F401 - the bmc:: ops a saved graph calls must exist before it is read
from bmc.rewrite.regions import restore_regions
from bmc.ir.trace import TraceInfo, _symbol_names, dynamic_shapes_spec, set_trace_info, trace, trace_info

log = logging.getLogger(__name__)

EXTRA_FILE = "bmc.json"
FORMAT_VERSION = 2  # 2: graph plans in bmc.json, tp-split weights stored whole
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: a crash or an error
    never leaves a half-written file under `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_directory(directory: str):
    """A temporary directory beside `directory`, renamed onto it when the block succeeds and
    removed when it fails: readers see the whole previous directory or the whole new one."""
    import shutil
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".bmc-staging-", dir=parent)
    try:
        yield staging
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


# ------------------------------------------------------------------ saving

def _has_meta_weights(gm: fx.GraphModule) -> bool:
    return any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers()))


def _val_shapes(gm: fx.GraphModule) -> dict[int, tuple[torch.Size, torch.Tensor]]:
    """id(tensor) -> (the shape its graph nodes give it, the tensor), over every graph of the
    module tree (fused regions read their weights inside their own graphs)."""
    found = {}
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.find_nodes(op="get_attr"):
            val = ir.tensor_val(node)
            try:
                tensor = module.get_parameter(str(node.target))
            except AttributeError:
                continue
            if val is not None:
                found[id(tensor)] = (val.shape, tensor)
    return found


@contextlib.contextmanager
def _graph_shaped_weights(gm: fx.GraphModule):
    """Export runs the graph, whose shapes are a rank's: while it does, a weight the module
    holds at another size (whole, before a backend slices a tp split; a flat ZeRO-3 shard
    after) is stood in for by an uninitialized tensor of the graph's shape."""
    swapped = []
    for shape, tensor in _val_shapes(gm).values():
        if tensor.shape != shape:
            stand_in = torch.nn.Parameter(tensor.detach().new_empty(shape), requires_grad=tensor.requires_grad)
            ir.replace_tensor(gm, tensor, stand_in)
            swapped.append((tensor, stand_in))
    try:
        yield
    finally:
        for tensor, stand_in in swapped:
            ir.replace_tensor(gm, stand_in, tensor)


def to_exported_program(gm: fx.GraphModule, state: dict[str, torch.Tensor] | None = None
                        ) -> torch.export.ExportedProgram:
    """Re-export a bmc graph (after passes) so torch.export can save or lower it. The program's
    state holds every weight whole: `state` (whole tensors by dotted name, as a distributed
    program gathers them) or the module's own (before a backend slices the tp plan's splits)."""
    with _graph_shaped_weights(gm):
        ep = _export(gm)
    if state is None:
        state = dict(gm.named_parameters(remove_duplicate=False))
        state.update(gm.named_buffers(remove_duplicate=False))
    for key, current in list(ep.state_dict.items()):
        if key in state:
            value = state[key]
            if isinstance(current, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value.detach(), requires_grad=current.requires_grad)
            ep.state_dict[key] = value
    return ep


@contextlib.contextmanager
def _regions_interpreted(gm: fx.GraphModule):
    """Run fused regions node by node while exporting: export gives each traced op the custom
    meta of the node being interpreted, so a region's nodes keep their own annotations (an
    int8 linear its Quant, a split linear its Shard) instead of the call's."""
    subs = [m for name, m in gm.named_modules() if name and isinstance(m, fx.GraphModule)]
    for sub in subs:
        sub.forward = functools.partial(_interpret, sub)
    try:
        yield
    finally:
        for sub in subs:
            del sub.forward


def _interpret(sub: fx.GraphModule, *args):
    return fx.Interpreter(sub).run(*args)


def _export(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    info = trace_info(gm)
    if info is None:
        raise ModelSaveError("this graph has no example inputs recorded: trace it with bmc.trace first")
    for module in gm.modules():  # fused regions' nodes too: export runs them inline
        for node in module.graph.nodes if isinstance(module, fx.GraphModule) else ():
            text = ir.annotations_to_json(node)
            if text and node.op == "call_function":
                node.meta.setdefault("custom", {})[ir.CUSTOM_KEY] = text
    spec = dynamic_shapes_spec(gm, info.args, info.kwargs, True) if info.symbols else None
    try:
        with _regions_interpreted(gm):
            return torch.export.export(gm, info.args, info.kwargs, dynamic_shapes=spec, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelSaveError(f"cannot re-export the transformed graph: {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}") from exc


def _ties(gm: fx.GraphModule) -> list[list[str]]:
    """The names of each parameter held under several names (a tied embedding and head):
    torch.export saves them as separate tensors, so the archive records the ties."""
    names: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(gm: fx.GraphModule, ties: list[list[str]]) -> None:
    """Every name of a tied group holds the one tensor the graph reads again."""
    read = ir.parameter_nodes(gm)
    for group in ties:
        keep = gm.get_parameter(next((n for n in group if n in read), group[0]))
        for name in group:
            owner, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, leaf, keep)


def _param_annotations(gm: fx.GraphModule) -> dict[str, str]:
    return {name: text for name, node in ir.parameter_nodes(gm).items()
            if (text := ir.annotations_to_json(node))}


def save_pt2(gm: fx.GraphModule, path: str, pipeline: str = "", state: dict[str, torch.Tensor] | None = None,
             lineage: list | None = None) -> None:
    """Write the graph as a torch.export archive that bmc-opt and bmc.load read back; `state`:
    the whole weights by dotted name, when the module holds only a rank's shards; `lineage`:
    the recorded steps its weights came from (bmc/lineage.py), read back with it."""
    if _has_meta_weights(gm):
        raise ModelSaveError(f"cannot write {path}: the model's weights are on the meta device "
                             f"(nothing to save); build it on cpu to write it")
    ep = to_exported_program(gm, state)
    info = trace_info(gm)
    extra = json.dumps({"format": FORMAT_VERSION, "model_name": info.model_name, "pipeline": pipeline,
                        "params": _param_annotations(gm), "ties": _ties(gm), "plans": ir.plans_to_json(gm),
                        "torch": torch.__version__, "lineage": list(lineage or [])})
    atomic_write(path, lambda tmp: torch.export.save(ep, tmp, extra_files={EXTRA_FILE: extra}))
    log.info("wrote %s", path)


# ------------------------------------------------------------------ loading

def _example_value(val: Any) -> Any:
    """A concrete input like the one a placeholder was traced with (zeros: valid token ids)."""
    if not isinstance(val, torch.Tensor):
        return val
    shape = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    return torch.zeros(shape, dtype=val.dtype)


def _restore_example_inputs(ep: torch.export.ExportedProgram, gm: fx.GraphModule) -> tuple[tuple, dict]:
    placeholders = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    values = [_example_value(v) for v in placeholders]
    in_spec = ep.call_spec.in_spec
    if in_spec is None:
        return tuple(values), {}
    args, kwargs = torch.utils._pytree.tree_unflatten(values, in_spec)
    return tuple(args), dict(kwargs)


_TRANSFORMERS_TYPE = re.compile(rb'(?<![\w.])(transformers(?:\.[a-z_]\w*)+)\.[A-Z]\w*')  # module, then a class


def _import_output_types(path: str) -> None:
    """A graph traced from a Hugging Face model returns transformers' ModelOutput classes,
    which torch.export can read back only once their module has registered them with pytree:
    import the transformers modules the archive's program names (and no other module)."""
    with zipfile.ZipFile(path) as archive:
        programs = [n for n in archive.namelist() if "/models/" in n and n.endswith(".json")]
        modules = {m.decode() for name in programs for m in _TRANSFORMERS_TYPE.findall(archive.read(name))}
    if modules:
        from bmc.extras import require
        for module in sorted(modules):
            require(module, f"reading {path} (a graph of a Hugging Face model)")


def read_pt2_metadata(path: str) -> dict:
    """bmc's metadata of an archive (pipeline, lineage, ...), read without loading the program."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{EXTRA_FILE}")]
            return json.loads(archive.read(names[0])) if names else {}
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelLoadError(f"cannot read '{path}' as a torch.export archive: {exc}") from None


def load_pt2(path: str) -> tuple[fx.GraphModule, dict]:
    """Read a torch.export archive as a bmc graph; returns (graph, bmc metadata)."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' not found; write one with `bmc-opt zoo:NAME -o {path}` (or "
                             f"hf:DIR), prog.save('{path}') or torch.export.save")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"'{path}' is not a torch.export archive (not a zip file); "
                             f"write one with torch.export.save or bmc-opt -o")
    extra = {EXTRA_FILE: ""}
    _import_output_types(path)
    try:
        ep = torch.export.load(path, extra_files=extra)
        gm = ep.module()
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
        raise ModelLoadError(f"cannot read '{path}' as a torch.export archive: {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:160]}") from None
    meta = json.loads(extra[EXTRA_FILE]) if extra[EXTRA_FILE] else {}
    for node in gm.graph.nodes:
        text = node.meta.get("custom", {}).get(ir.CUSTOM_KEY)
        if text:
            ir.annotations_from_json(node, text)
    params = ir.parameter_nodes(gm)
    for name, text in meta.get("params", {}).items():
        if name in params:
            ir.annotations_from_json(params[name], text)
    ir.plans_from_json(gm, meta.get("plans", {}), source=f"'{path}'")
    _retie(gm, meta.get("ties", []))
    args, kwargs = _restore_example_inputs(ep, gm)
    model_name = meta.get("model_name") or os.path.splitext(os.path.basename(path))[0]
    set_trace_info(gm, TraceInfo(model_name, args, kwargs, _symbol_names(gm)))
    gm = restore_regions(gm)
    return gm, meta


def load_pickled_module(path: str, trust_pickle: bool) -> torch.nn.Module:
    """A whole nn.Module saved with torch.save. Unpickling runs code from the file, so it is
    refused unless the caller says it trusts the file."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' not found")
    if not trust_pickle:
        raise ModelLoadError(f"refusing to unpickle '{path}': loading a pickled module runs code from "
                             f"the file; pass --trust-pickle (trust_pickle=True) if you trust its source, "
                             f"or save it with torch.export.save as a .pt2")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot unpickle '{path}': {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:160]}") from None
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"'{path}' holds a {type(obj).__name__}, not an nn.Module; save the whole "
                             f"module (torch.save(model, path)) or a torch.export archive (.pt2)")
    return obj


def load_graph(spec: str, *, trust_pickle: bool = False, example_inputs: Any = None, dynamic: Any = True,
               device: str | None = None, dtype: torch.dtype | None = None) -> tuple[fx.GraphModule, dict]:
    """MODEL as bmc-opt takes it: `zoo:NAME`, `hf:DIR` (a Hugging Face checkpoint directory:
    config.json and safetensors, read on the meta device without its weights when `device` is
    "meta"; a directory holding config.json may be given without the prefix), a `.pt2`
    archive, or a pickled `.pt` module."""
    if spec.startswith("hf:") or os.path.isfile(os.path.join(spec, "config.json")):
        from bmc.models import hf
        return hf.load_graph(spec, example=example_inputs, dynamic=dynamic, device=device, dtype=dtype), {}
    if spec.startswith("zoo:"):
        from bmc.models import zoo
        model = zoo.build(spec[4:], device=device, dtype=dtype)
        return trace(model, example_inputs, dynamic=dynamic), {}
    if spec.endswith(".pt2"):
        return load_pt2(spec)
    if spec.endswith(PICKLE_SUFFIXES):
        model = load_pickled_module(spec, trust_pickle)
        if dtype is not None:
            model = model.to(dtype)
        return trace(model, example_inputs, dynamic=dynamic), {}
    raise ModelLoadError(f"don't know how to read '{spec}': give zoo:NAME, hf:DIR, a .pt2 archive "
                         f"(torch.export.save) or a pickled module ({', '.join(PICKLE_SUFFIXES)})")
