"""Hugging Face checkpoint directories (`hf:DIR`): config.json plus safetensors weights, one
file or shards listed by model.safetensors.index.json.

The model is built from its config with transformers (AutoModelForCausalLM for causal LMs,
AutoModel for encoders). For planning it is built on the meta device and no weight is
allocated; otherwise its parameters are allocated uninitialized and every one of them is read
from the safetensors files, shard by shard, tensor by tensor, so at most one checkpoint tensor
is held beside the model. Pickled weights (pytorch_model.bin) are never read: unpickling runs
code from the file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch

from bmc import ir
from bmc.errors import ModelLoadError
from bmc.extras import require
from bmc.checksums import sha256

log = logging.getLogger(__name__)

PREFIX = "hf:"
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = re.compile(r"^(pytorch_model.*\.bin|.*\.(pt|pth|ckpt|pkl))$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the first is required, the rest go along
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16


def is_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def directory_of(spec: str) -> str | None:
    """The checkpoint directory a model path names (`hf:DIR`, or a directory holding
    config.json), or None for other paths."""
    if is_spec(spec):
        return spec[len(PREFIX):]
    return spec if os.path.isfile(os.path.join(spec, CONFIG)) else None


# ------------------------------------------------------------------ the directory


def check_directory(directory: str) -> None:
    """A readable checkpoint directory, or one line saying what is wrong with it."""
    if not os.path.isdir(directory):
        raise ModelLoadError(f"hf:{directory}: no such directory")
    if not os.path.isfile(os.path.join(directory, CONFIG)):
        raise ModelLoadError(f"hf:{directory} has no {CONFIG}: a Hugging Face checkpoint directory holds one "
                             f"(write it with model.save_pretrained(DIR) or config.save_pretrained(DIR))")
    pickles = sorted(f for f in os.listdir(directory) if PICKLED.match(f))
    if pickles and not weight_files(directory):
        raise ModelLoadError(f"hf:{directory} holds its weights only as pickles ({pickles[0]}), which bmc never "
                             f"loads (unpickling runs code from the file): convert them to safetensors with "
                             f"model.save_pretrained(DIR) in transformers, or remove them to plan from "
                             f"config.json alone")


def weight_files(directory: str) -> list[str]:
    """The safetensors files of the checkpoint (empty when there are none): the shards the
    index lists, or model.safetensors."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read {index}: {type(exc).__name__}: {exc}; write the checkpoint again "
                                 f"with save_pretrained") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise ModelLoadError(f"hf:{directory}: shard {missing[0]} listed in {INDEX} is missing "
                                 f"({len(missing)} of {len(shards)}); copy the whole checkpoint directory")
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, SAFETENSORS)
    return [single] if os.path.isfile(single) else []


def read_config(directory: str):
    """The model's transformers config; never runs code from the directory."""
    check_directory(directory)
    transformers = require("transformers", f"reading hf:{directory}")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read hf:{directory}/{CONFIG}: {_first_line(exc)}") from None
    config.use_cache = False  # a traced training/planning graph returns no cache
    return config


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


# ------------------------------------------------------------------ the model


def model_class(config):
    """AutoModelForCausalLM when the checkpoint is a causal LM, AutoModel (the bare encoder or
    decoder, hidden states out) otherwise. `architectures` in config.json says which class
    wrote it; a hand-written config without it is a causal LM when its model type has one and
    no masked-LM head (BERT-likes are encoders)."""
    transformers = require("transformers", "reading Hugging Face checkpoints")
    from transformers.models.auto import modeling_auto as auto
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        is_causal = architectures[0] in set(causal.values())
    else:
        is_causal = config.model_type in causal and config.model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel


def config_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (as transformers' from_pretrained defaults to);
    float32 when the config does not say."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build(directory: str, *, device: str | None = None, dtype: torch.dtype | None = None,
          weights: str | None = None) -> torch.nn.Module:
    """The model of checkpoint directory `directory`, in eval mode: on the meta device (no
    weights read or allocated) when `device` is "meta", else on the cpu with every weight read
    from its safetensors files, or from `weights` (a weights directory, a safetensors file or
    a training checkpoint: bmc/models/weights.py) where given, so a config.json alone will do."""
    config = read_config(directory)
    cls = model_class(config)
    dtype = dtype or config_dtype(config)
    if device == "meta":
        with torch.device("meta"):
            model = _from_config(cls, config, dtype, directory)
        return model.eval()
    if weights is not None:
        from transformers.initialization import no_init_weights
        from bmc.models.weights import load_weights as load_weights_from
        with no_init_weights():
            model = _from_config(cls, config, dtype, directory)
        log.info("hf:%s: %s", directory, load_weights_from(model, weights))
        return model.eval()
    files = weight_files(directory)
    if not files:
        raise ModelLoadError(f"hf:{directory} has {CONFIG} but no weights ({SAFETENSORS} or {INDEX}): plan it on "
                             f"the meta device (bmc-opt without -o/--measure/--eval/--weights, or --device meta), "
                             f"or write the weights with model.save_pretrained(DIR)")
    from transformers.initialization import no_init_weights
    with no_init_weights():  # every parameter is read below: initializing them first is wasted time
        model = _from_config(cls, config, dtype, directory)
    load_weights(model, files, directory)
    return model.eval()


def _from_config(cls, config, dtype: torch.dtype, directory: str) -> torch.nn.Module:
    try:
        model = cls.from_config(config, dtype=dtype, trust_remote_code=False)
    except (ValueError, ImportError, KeyError) as exc:
        raise ModelLoadError(f"cannot build the model of hf:{directory} ({config.model_type}): "
                             f"{_first_line(exc)}") from None
    model.tie_weights()  # transformers ties in init_weights, which no_init_weights skips
    return model


def _checkpoint_name_map(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The model's persistent tensors by name (tied ones under each of their names) and the
    prefix a checkpoint of a model with a head puts before the bare model's names."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    bare = prefix and not hasattr(model, prefix)  # AutoModel: the bare model itself
    return dict(model.state_dict(keep_vars=True)), (prefix + "." if bare else "")


def _ignored(model: torch.nn.Module, attr: str, name: str) -> bool:
    patterns = getattr(model, attr, None) or ()
    return any(re.search(p, name) for p in patterns)


def load_weights(model: torch.nn.Module, files: list[str], directory: str) -> None:
    """Copy every tensor of the safetensors `files` into `model`, one tensor at a time; refuse
    a checkpoint whose names or shapes do not fit the model, that leaves a weight unread, or
    that stores two weights the config ties with different values."""
    from safetensors import SafetensorError, safe_open
    targets, prefix = _checkpoint_name_map(model)
    loaded: dict[int, str] = {}  # id(target) -> the checkpoint name read into it
    skipped: list[str] = []
    with torch.no_grad():
        for path in files:
            try:
                with safe_open(path, framework="pt") as shard:
                    for key in shard.keys():
                        target = targets.get(_model_name(key, prefix))
                        if target is None:
                            skipped.append(key)
                            continue
                        _copy_into(target, shard.get_tensor(key), key, loaded, path)
            except SafetensorError as exc:
                raise ModelLoadError(f"cannot read {path} as safetensors: {_first_line(exc)}; "
                                     f"write the checkpoint again with save_pretrained") from None
    _check_complete(model, targets, loaded, skipped, prefix, directory)


def _copy_into(target: torch.Tensor, tensor: torch.Tensor, key: str, loaded: dict[int, str], path: str) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise ModelLoadError(f"{path}: {key} has shape {list(tensor.shape)} and the model built from config.json "
                             f"wants {list(target.shape)}; the config does not describe this checkpoint")
    first = loaded.get(id(target))
    if first is not None:  # a tied weight stored under both names: they must agree
        if not torch.equal(target, tensor.to(target.dtype)):
            raise ModelLoadError(f"{path}: {key} and {first} are one tied weight in the model (tie_word_embeddings) "
                                 f"but differ in the checkpoint; set tie_word_embeddings to false in config.json")
        return
    target.copy_(tensor)
    loaded[id(target)] = key


def _model_name(key: str, prefix: str) -> str:
    """The model's name for checkpoint `key` (a bare model's checkpoint with a head puts
    `prefix` before it)."""
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def _check_complete(model, targets: dict[str, torch.Tensor], loaded: dict[int, str], skipped: list[str],
                    prefix: str, directory: str) -> None:
    _refuse_unexpected(model, skipped, prefix, directory)
    missing = [name for name, t in targets.items()
               if id(t) not in loaded and not _ignored(model, "_keys_to_ignore_on_load_missing", name)]
    if missing:
        raise ModelLoadError(f"hf:{directory} lacks weights the model needs: {missing[:3]} ({len(missing)} in all); "
                             f"write the whole checkpoint with save_pretrained")
    log.info("hf:%s: read %d tensors", directory, len(loaded))


def _refuse_unexpected(model, skipped: list[str], prefix: str, directory: str) -> None:
    """Refuse a checkpoint holding tensors (`skipped`: keys the model has no name for) that
    the model built from config.json does not have: it is another model's."""
    unexpected = [k for k in skipped if not _ignored(model, "_keys_to_ignore_on_load_unexpected", k)]
    if prefix:  # a bare model read from a checkpoint with a head: the head's weights are not its
        heads = [k for k in unexpected if not k.startswith(prefix)]
        if heads:
            log.info("hf:%s: %d weights of the checkpoint's head are not part of the bare model (e.g. %s)",
                     directory, len(heads), heads[0])
        unexpected = [k for k in unexpected if k.startswith(prefix)]
    if unexpected:
        raise ModelLoadError(f"hf:{directory} holds weights the model built from config.json does not have: "
                             f"{unexpected[:3]} ({len(unexpected)} in all); the config does not describe this "
                             f"checkpoint")


# ------------------------------------------------------------------ tracing


def example_inputs(model: torch.nn.Module, given: Any = None) -> Any:
    """What to trace a Hugging Face model with: `given` as an (args, kwargs) pair or dict
    passes through; plain tensors are input_ids, then labels (a causal LM then returns its
    loss); by default input_ids of zeros, [2, 16] (fewer positions if the model has fewer)."""
    if isinstance(given, dict) or (isinstance(given, tuple) and len(given) == 2 and isinstance(given[1], dict)):
        return given
    if given is not None:
        tensors = (given,) if isinstance(given, torch.Tensor) else tuple(given)
        if not 1 <= len(tensors) <= 2:
            raise ModelLoadError(f"a Hugging Face model takes input_ids and optionally labels as example inputs, "
                                 f"got {len(tensors)} tensors")
        return (), dict(zip(("input_ids", "labels"), tensors))
    longest = getattr(model.config, "max_position_embeddings", None) or EXAMPLE_SEQ
    return (), {"input_ids": torch.zeros(EXAMPLE_BATCH, min(EXAMPLE_SEQ, longest), dtype=torch.long)}


def tokenizer_plan(directory: str) -> ir.TokenizerPlan | None:
    """The tokenizer files of the directory with their checksums (None without tokenizer.json)."""
    if not os.path.isfile(os.path.join(directory, TOKENIZER_FILES[0])):
        return None
    files = tuple(ir.TokenizerFile(name, sha256(os.path.join(directory, name)))
                  for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name)))
    return ir.TokenizerPlan(os.path.abspath(directory), files)


def load_graph(spec: str, *, example: Any = None, dynamic: Any = True, device: str | None = None,
               dtype: torch.dtype | None = None, weights: str | None = None):
    """`hf:DIR` traced (its weights from `weights` where given): the graph, carrying its
    tokenizer's plan when the directory has one. `device="deferred"`: its weights are not
    read, each is a deferred tensor read from the memory-mapped shards when a value is asked
    for (deferred_graph)."""
    from bmc.ir.trace import trace
    directory = directory_of(spec) or spec
    if device == "deferred":
        gm = deferred_graph(directory, example=example, dynamic=dynamic, dtype=dtype)
    else:
        model = build(directory, device=device, dtype=dtype, weights=weights)
        gm = trace(model, example_inputs(model, example), dynamic=dynamic)
    plan = tokenizer_plan(directory)
    if plan is not None:
        ir.set_plan(gm, plan)
    return gm


# ------------------------------------------------------------------ deferred weights


def deferred_graph(directory: str, *, example: Any = None, dynamic: Any = True,
                   dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """The model of `directory` traced without reading a weight: built with its parameters on
    the meta device (its buffers real: RoPE's inverse frequencies are computed, not stored),
    traced, then every parameter and stored buffer replaced by a deferred tensor that reads
    the checkpoint's tensor when its value is asked for (bmc/ir/deferred.py), as `dtype`
    (the config's by default). What a build of a model larger than memory starts from."""
    from bmc.ir import deferred
    from bmc.ir.trace import trace
    config = read_config(directory)
    dtype = dtype or config_dtype(config)
    files = weight_files(directory)
    if not files:
        raise ModelLoadError(f"hf:{directory} has {CONFIG} but no weights ({SAFETENSORS} or {INDEX}) to build from; "
                             f"write them with model.save_pretrained(DIR)")
    accelerate = require("accelerate", "building a model larger than memory (weights read block by block)")
    with accelerate.init_empty_weights(include_buffers=False):
        model = _from_config(model_class(config), config, dtype, directory)
    model.eval()
    gm = trace(model, example_inputs(model, example), dynamic=dynamic)
    deferred.meta_to_cpu(gm)
    where, (targets, prefix) = _checkpoint_keys(files), _checkpoint_name_map(model)
    names = _names_by_tensor(gm)

    def read(name: str, tensor: torch.Tensor) -> torch.Tensor:
        for alias in names[id(tensor)]:  # a tied weight is stored under one of its names
            for key in (alias, prefix + alias):
                if key in where:
                    return _deferred_read(where[key], key, tensor, dtype)
        if _ignored(model, "_keys_to_ignore_on_load_missing", name):
            return None
        raise ModelLoadError(f"hf:{directory} lacks weights the model needs: {name}; write the whole checkpoint "
                             f"with save_pretrained")
    count = deferred.map_deferred(gm, read)
    _refuse_unexpected(model, [key for key in where if _model_name(key, prefix) not in targets], prefix, directory)
    log.info("hf:%s: %d tensors deferred, read from %d file(s) when needed", directory, count, len(files))
    return gm


def _names_by_tensor(module: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, tensor in (*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    return names


def _checkpoint_keys(files: list[str]) -> dict[str, tuple[str, list[int]]]:
    """key -> (file, shape) of every tensor of the safetensors files, read off their headers."""
    from safetensors import SafetensorError, safe_open
    where = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as shard:
                for key in shard.keys():
                    where[key] = (path, list(shard.get_slice(key).get_shape()))
        except SafetensorError as exc:
            raise ModelLoadError(f"cannot read {path} as safetensors: {_first_line(exc)}; "
                                 f"write the checkpoint again with save_pretrained") from None
    return where


def _deferred_read(found: tuple[str, list[int]], key: str, tensor: torch.Tensor, dtype: torch.dtype):
    from bmc.ir import deferred
    path, shape = found
    if shape != list(tensor.shape):
        raise ModelLoadError(f"{path}: {key} has shape {shape} and the model built from config.json wants "
                             f"{list(tensor.shape)}; the config does not describe this checkpoint")
    return deferred.read(path, key, tensor.shape, tensor.dtype if not tensor.is_floating_point() else dtype)
