"""Whole weights as files: a directory of safetensors shards that any step of bmc reads, and the
training checkpoints it is made from.

A weights directory is what `save_pretrained` writes, so transformers, `hf:DIR` and every
bmc tool read it: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`; a model that came from a Hugging Face directory also gets its
config.json and tokenizer files. Beside them, `lineage.json` records where the weights came
from (the training run: model, pipeline, world size, steps, losses, data, bmc's version) and
the sha256 of every file written, which a reader verifies before it trusts a byte.

The shards are written tensor by tensor from groups read `GROUP_BYTES` at a time, so writing
holds one group, never a shard or the model (a distributed program's groups come out of a
sharded training checkpoint: torch.distributed.checkpoint reads exactly the pieces asked for,
whichever ranks and plan wrote them).

A training checkpoint (backends/checkpoint.py writes it) is a directory per step with
`manifest.json` (the parameters' full shapes and dtypes) and DCP's files, where each parameter
is one flat tensor of its whole numel under `model.<name>`; a root holds the steps and a
`latest` file naming the newest.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from bmc.checksums import sha256
from bmc.lineage import check_chain, next_step, step_digest  # noqa: F401 - the chain, torch-free
from bmc.errors import ModelLoadError, ModelSaveError

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
LINEAGE = "lineage.json"
MANIFEST = "manifest.json"  # a training checkpoint's step directory
SHARD_BYTES = 2 << 30  # what one shard holds at most (a tensor larger than that is a shard of its own)
GROUP_BYTES = 256 << 20  # what is read (gathered) at once while a shard is written
# the files of a Hugging Face directory a weights directory carries along (not its weights)
_CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


# ------------------------------------------------------------------ training checkpoints


def latest_checkpoint(root: str | Path) -> Path | None:
    """The last published checkpoint under `root`, or None if there is none yet."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def read_checkpoint_manifest(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {Path(path) / MANIFEST}: {exc}; the checkpoint is damaged") from None


class Entry(NamedTuple):
    """One tensor of a weights directory before it is read: its name, shape and dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def checkpoint_entries(step_dir: str | Path) -> list[Entry]:
    """The checkpoint's parameters in the manifest's order, each as it will be read: its fp32
    master where the checkpoint has one (a parameter trained in lower precision: the weights
    the optimizer stepped; the model's copy is their rounding), else the parameter."""
    params = read_checkpoint_manifest(step_dir)["parameters"]
    stored = _stored(step_dir)
    return [Entry(n, tuple(shape), stored.get(_key(n, stored), getattr(torch, dtype)))
            for n, (shape, dtype) in params.items()]


def _key(name: str, stored: dict) -> str:
    return f"master.{name}" if f"master.{name}" in stored else f"model.{name}"


def checkpoint_reader(step_dir: str | Path):
    """read(entries) -> {name: whole tensor}: DCP reads exactly those, in this process alone
    (whatever the other ranks do), from the pieces whichever ranks and plan wrote them."""
    import torch.distributed.checkpoint as dcp
    stored = _stored(step_dir)

    def read(entries: list[Entry]) -> dict[str, torch.Tensor]:
        flat = {_key(e.name, stored): torch.empty(math.prod(e.shape), dtype=e.dtype) for e in entries}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, checkpoint_id=str(step_dir), no_dist=True)
        return {e.name: flat[_key(e.name, stored)].view(e.shape) for e in entries}
    return read


def _stored(step_dir: str | Path) -> dict[str, torch.dtype]:
    """The checkpoint's tensors and their dtypes, from DCP's metadata."""
    import torch.distributed.checkpoint as dcp
    entries = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    return {k: v.properties.dtype for k, v in entries.items() if hasattr(v, "properties")}


def checkpoint_groups(step_dir: str | Path, group_bytes: int = GROUP_BYTES) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's parameters, whole and shaped, at most `group_bytes` at a time."""
    read = checkpoint_reader(step_dir)
    for group in _grouped(checkpoint_entries(step_dir), group_bytes):
        yield read(group)


def export_checkpoint(step_dir: str | Path, directory: str | Path, *, source: str | Path | None = None,
                      provenance: dict | None = None, shard_bytes: int = SHARD_BYTES,
                      group_bytes: int = GROUP_BYTES, lineage: list[dict] = ()) -> Path:
    """A training checkpoint's weights as a weights directory, read `group_bytes` at a time;
    the checkpoint's own record (step, world size, pipeline, what its writer added) goes into
    the provenance under the given one."""
    manifest = read_checkpoint_manifest(step_dir)
    masters = any(k.startswith("master.") for k in _stored(step_dir))
    recorded = {"checkpoint": str(Path(step_dir).resolve()), "step": manifest.get("step"),
                "world_size": manifest.get("world_size"),
                "pipeline": manifest.get("pipeline"), **manifest.get("extra", {}),
                "weights": "fp32 masters" if masters else "the model's parameters"}
    return write_weights(directory, checkpoint_entries(step_dir), checkpoint_reader(step_dir), source=source,
                         provenance={**recorded, **(provenance or {})}, shard_bytes=shard_bytes,
                         group_bytes=group_bytes, lineage=lineage)


def _grouped(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Consecutive runs of entries of at most `limit` bytes (a larger entry alone)."""
    groups, size = [[]], 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return [g for g in groups if g]


def tensor_entries(named: Iterable[tuple[str, torch.Tensor]]):
    """(entries, read) over live tensors: each once (a tied weight under its first name),
    brought to the cpu as it is written."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            tensors[name] = t
    entries = [Entry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    return entries, lambda group: {e.name: tensors[e.name].detach().to("cpu") for e in group}


# ------------------------------------------------------------------ writing


def write_weights(directory: str | Path, entries: list[Entry], read, *, source: str | Path | None = None,
                  provenance: dict | None = None, shard_bytes: int = SHARD_BYTES,
                  group_bytes: int = GROUP_BYTES, lineage: list[dict] = ()) -> Path:
    """Write `entries` as a weights directory: shards of at most `shard_bytes`, each filled
    `group_bytes` at a time from `read(entries) -> {name: tensor}`, so writing holds one group,
    never a shard or the model. `source`: a Hugging Face directory whose config and tokenizer
    come along (or a config file alone); `provenance` (JSON values) goes into lineage.json, as
    the step after `lineage` (the steps the weights came from), and, as strings, into every
    shard's metadata. Staged beside `directory` and published by
    renaming: a crash leaves whatever was there before, never a half-written directory."""
    directory = Path(directory)
    staged = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    metadata = {"format": "pt", **{f"bmc.{k}": _text(v) for k, v in (provenance or {}).items()}}
    shards = _grouped(entries, shard_bytes)
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    try:
        for name, shard in zip(files, shards):
            _write_shard(staged / name, shard, read, metadata, group_bytes)
            log.info("weights: wrote %s (%d tensors)", name, len(shard))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: f for f, shard in zip(files, shards) for e in shard}}
            (staged / INDEX).write_text(json.dumps(index, indent=1))
            files.append(INDEX)
        files += _carry(source, staged)
        record = {**(provenance or {}), "kind": (provenance or {}).get("kind", "weights")}
        steps = next_step(list(lineage), record, {f: sha256(str(staged / f)) for f in files})
        (staged / LINEAGE).write_text(json.dumps({"format": 1, "steps": steps}, indent=1))
        _publish(staged, directory)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return directory


# safetensors' dtype names (its format: an 8-byte little-endian header length, the JSON
# header, the tensors' bytes in header order)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _write_shard(path: Path, shard: list[Entry], read, metadata: dict, group_bytes: int) -> None:
    """One safetensors file written tensor by tensor. By hand, because the safetensors library
    serializes a whole dict of tensors at once, which would hold the shard in memory; the file
    is what its reader (safe_open, load_file) checks and reads."""
    header, offset = {"__metadata__": metadata}, 0
    for entry in shard:
        if entry.dtype not in _DTYPES:
            raise ModelSaveError(f"{entry.name}: safetensors stores no {entry.dtype}")
        header[entry.name] = {"dtype": _DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for group in _grouped(shard, group_bytes):
            tensors = read(group)
            for entry in group:
                tensor = tensors[entry.name].contiguous()
                if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                    raise ModelSaveError(f"{entry.name} read as {tensor.dtype} {list(tensor.shape)}, planned as "
                                         f"{entry.dtype} {list(entry.shape)}")
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensors


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _carry(source: str | Path | None, staged: Path) -> list[str]:
    """The Hugging Face files of `source` (a directory, or a config file alone) copied in."""
    if source is None:
        return []
    if Path(source).is_file():
        shutil.copyfile(source, staged / "config.json")
        return ["config.json"]
    carried = []
    for name in _CARRIED:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, staged / name)
            carried.append(name)
    return carried


def _publish(staged: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staged.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ reading


def verify_lineage(directory: str | Path) -> dict | None:
    """lineage.json's record of the directory, after checking every file it lists has the
    sha256 recorded (None where the directory has no lineage: a plain save_pretrained)."""
    path = Path(directory) / LINEAGE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text())
        files = lineage["steps"][-1]["files"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a readable lineage ({exc}); write the weights again") from None
    for name in files:
        if not (Path(directory) / name).is_file():
            raise ModelLoadError(f"{directory}: {name} is missing (its lineage.json lists it); copy the whole directory")
    # reading the weights and recording their lineage both verify: hash each file once while it is unchanged
    stamp = (str(path.resolve()), tuple((n, *_stat(Path(directory) / n)) for n in files), _stat(path))
    if stamp in _VERIFIED:
        return lineage
    for name, digest in files.items():
        if sha256(str(Path(directory) / name)) != digest:
            raise ModelLoadError(f"{directory}: {name} does not match the checksum its lineage.json records "
                                 f"(damaged or changed since it was written); write the weights again")
    _VERIFIED.add(stamp)
    return lineage


_VERIFIED: set = set()


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def resolve_weights(spec: str | Path) -> tuple[str, object]:
    """What `--weights` / `weights=` names: ("files", [safetensors files]) for a .safetensors
    file or a weights directory (its lineage verified), ("checkpoint", step dir) for a training
    checkpoint (a step directory, or a root: its latest step), and for a training run's output
    directory its weights/ (else its checkpoints/)."""
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"weights {spec}: give a .safetensors file or a directory (pickled weights are "
                                 f"refused: unpickling runs code from the file)")
        return "files", [str(path)]
    if not path.is_dir():
        raise ModelLoadError(f"weights {spec}: no such file or directory")
    if (path / MANIFEST).is_file():
        return "checkpoint", path
    if (path / "latest").is_file():
        step = latest_checkpoint(path)
        if step is None:
            raise ModelLoadError(f"weights {spec}: its 'latest' names no complete checkpoint")
        return "checkpoint", step
    if (path / INDEX).is_file() or (path / SINGLE).is_file():
        verify_lineage(path)
        return "files", _shard_files(path)
    for inner in ("weights", "checkpoints"):
        if (path / inner).is_dir():
            return resolve_weights(path / inner)
    raise ModelLoadError(f"weights {spec}: neither a weights directory ({SINGLE} or {INDEX}) nor a training "
                         f"checkpoint (manifest.json, or a 'latest' file) nor a training run's directory")


def _shard_files(directory: Path) -> list[str]:
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{directory / INDEX} is not a readable index ({exc})") from None
        return [str(directory / name) for name in dict.fromkeys(weight_map.values())]
    return [str(directory / SINGLE)]


def load_weights(model: torch.nn.Module, spec: str | Path) -> str:
    """Every weight of `model` from `spec` (resolve_weights), one group at a time; refused in
    one line where names or shapes do not fit or a weight is left unread. Returns what was read."""
    kind, where = resolve_weights(spec)
    targets = dict(model.state_dict(keep_vars=True))  # a tied weight under each of its names
    loaded: dict[int, str] = {}
    with torch.no_grad():
        for group in _source_groups(kind, where):
            for name, tensor in group.items():
                target = targets.get(name)
                if target is None:
                    raise ModelLoadError(f"weights {spec}: {name} is not a weight of this model; the weights are "
                                         f"another model's")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ModelLoadError(f"weights {spec}: {name} has shape {list(tensor.shape)}, the model's is "
                                         f"{list(target.shape)}; the weights are another model's")
                target.copy_(tensor)
                loaded[id(target)] = name
    missing = [n for n, t in targets.items() if id(t) not in loaded]
    if missing:
        raise ModelLoadError(f"weights {spec} lack {missing[:3]} ({len(missing)} in all); the weights are another "
                             f"model's")
    return f"{len(loaded)} tensors from {where if kind == 'checkpoint' else spec}"


def _source_groups(kind: str, where) -> Iterator[dict[str, torch.Tensor]]:
    if kind == "checkpoint":
        yield from checkpoint_groups(where)
        return
    from safetensors import SafetensorError, safe_open
    for path in where:
        try:
            with safe_open(path, framework="pt") as shard:
                for key in shard.keys():
                    yield {key: shard.get_tensor(key)}
        except SafetensorError as exc:
            raise ModelLoadError(f"cannot read {path} as safetensors: {' '.join(str(exc).split())[:160]}") from None


# ------------------------------------------------------------------ lineage


def weights_digest(module: torch.nn.Module) -> str:
    """The sha256 of a module's weights (each distinct parameter's bytes, in order): what a
    step that writes no file (a compile, a distillation) records of the weights it left."""
    import hashlib
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        digest.update(name.encode())
        digest.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compiled_step(lineage: list[dict], pipeline: str, record: dict, module: torch.nn.Module) -> list[dict]:
    """`lineage` with a compile of weights that have a recorded past appended: the pipeline, what
    it recorded (statistics, calibration, --eval), and the weights it left by digest (it writes
    no file); the lineage as it was where there is no past to continue."""
    if not lineage:
        return list(lineage)
    return next_step(lineage, {"kind": "compile", "pipeline": pipeline, **record}, {"weights": weights_digest(module)})


def lineage_of(spec: str | Path) -> list[dict]:
    """The recorded steps that made the weights `spec` names (resolve_weights), oldest first,
    their files verified: a weights directory's lineage.json; a training checkpoint as one
    step (its manifest's record, checksums of its manifest and DCP's metadata); a bare
    safetensors file or a directory without lineage as one step with its checksums."""
    path = Path(spec)
    kind, where = resolve_weights(spec)
    if kind == "checkpoint":
        manifest = read_checkpoint_manifest(where)
        files = {name: sha256(str(Path(where) / name)) for name in (MANIFEST, ".metadata")
                 if (Path(where) / name).is_file()}
        return [{"kind": "checkpoint", "path": str(Path(where).resolve()), "step": manifest.get("step"),
                 "world_size": manifest.get("world_size"), "pipeline": manifest.get("pipeline"),
                 **manifest.get("extra", {}), "files": files}]
    directory = path if path.is_dir() else path.parent
    for candidate in (directory, directory / "weights"):
        lineage = verify_lineage(candidate) if (candidate / LINEAGE).is_file() else None
        if lineage is not None and all(Path(f).parent == candidate for f in where):
            return [{**s, "path": s.get("path", str(candidate.resolve()))} for s in lineage["steps"]]
    return [{"kind": "weights", "path": str(path.resolve()),
             "files": {Path(f).name: sha256(f) for f in where}}]
