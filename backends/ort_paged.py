"""The ort-paged backend: a causal LM served by ONNX Runtime, block by block, with its block
weights paged under a memory budget (BMInf's policy) and loading overlapped with compute.

    prog = bmc.compile(model, passes="quant-int8", backend="ort-paged", budget=40 << 20)
    prog.save("served/")                       # manifest, part-NN.onnx / .stream.onnx / .bin
    served = bmc.load("served/", budget=...)   # checksums verified before anything runs
    for tokens in served.generate(prompts, max_new_tokens=32, stream=True): ...

Policy (`plan_residency`): the embedding and the head stay resident; as many blocks as fit in
what the budget leaves after them, the KV cache, the activations and the swap slots are
resident, spread evenly over the depth; the others are streamed through two swap slots, the
next streamed block read from its weight file on a background thread while the current one
computes. Resident blocks keep ONNX Runtime's optimizations (constant weights folded, prepacked
and fused); streamed blocks take their weights as inputs from the slot (no copy).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from bmc.errors import BackendError

log = logging.getLogger(__name__)
FORMAT = "bmc-ort-paged/1"
SLOTS = 2


class ArtifactError(BackendError):
    """A served directory that is missing files, corrupted, or from another format."""


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    resident: tuple[int, ...]  # block positions (0-based among the blocks) kept in memory
    streamed: tuple[int, ...]
    slot_bytes: int
    weight_bytes: int  # what the plan holds: fixed parts, resident blocks, slots


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` positions spread evenly (BMInf keeps resident blocks apart so each
    streamed block has compute around it to hide its load)."""
    if count >= total:
        return list(range(total))
    if count <= 0:
        return []
    return sorted({round(i * (total - 1) / max(count - 1, 1)) if count > 1 else total // 2 for i in range(count)})


def plan_residency(block_bytes: list[int], fixed_bytes: int, budget: int | None, reserved: int = 0) -> Plan:
    """Which blocks stay resident under `budget` (None: all), given the always-resident parts
    and the bytes `reserved` for the KV cache and activations."""
    total = len(block_bytes)
    if budget is None:
        return Plan(tuple(range(total)), (), 0, fixed_bytes + sum(block_bytes))
    largest = max(block_bytes)
    everything = fixed_bytes + sum(block_bytes) + reserved
    if everything <= budget:
        return Plan(tuple(range(total)), (), 0, fixed_bytes + sum(block_bytes))
    need = fixed_bytes + SLOTS * largest + reserved
    if budget < need:
        raise BackendError(f"budget {budget:,} bytes is below what serving needs: {need:,} (embedding and head "
                           f"{fixed_bytes:,}, {SLOTS} swap slots of the largest block {largest:,}, KV cache and "
                           f"activations {reserved:,}); give --budget {need} or more")
    room = budget - need
    count = 0  # how many could fit at best (the smallest ones)
    while count < total and sum(sorted(block_bytes)[:count + 1]) <= room:
        count += 1
    # evenly spread; with blocks of different sizes (per-layer pruning) the spread may not fit
    # where the smallest would, and one fewer is kept
    resident = spread(count, total)
    while sum(block_bytes[i] for i in resident) > room and resident:
        resident = spread(len(resident) - 1, total)
    streamed = tuple(i for i in range(total) if i not in resident)
    slot = max((block_bytes[i] for i in streamed), default=0)
    held = fixed_bytes + sum(block_bytes[i] for i in resident) + SLOTS * slot
    return Plan(tuple(resident), streamed, slot, held)


# ------------------------------------------------------------------ the manifest


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory} is not a bmc ort-paged build: manifest.json is missing "
                            f"(write one with prog.save(DIR) or bmc-opt --backend=ort-paged -o DIR)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is format {manifest.get('format')!r}, this bmc reads {FORMAT!r}; rebuild it")
    return manifest


def verify_files(directory: str, manifest: dict) -> None:
    """Every file the manifest lists exists and has its checksum, before anything is loaded."""
    from bmc.backends.ort_lower import sha256
    for name, digest in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing from the build; copy the whole directory or rebuild it")
        if sha256(path) != digest:
            raise ArtifactError(f"{path} does not match its checksum in manifest.json (corrupted or changed); "
                                f"restore it or rebuild the directory")


# ------------------------------------------------------------------ swap slots and prefetch


_POPULATE_READ = 22  # MADV_POPULATE_READ (Linux 5.14): map a range's pages from the page cache


def _populate(mapping, size: int) -> None:
    """Fault every page of `mapping` in. Through libc's madvise (ctypes lets go of the GIL, so
    the main thread's ONNX Runtime calls go on meanwhile); touching a byte per page from numpy
    where the kernel lacks MADV_POPULATE_READ (that holds the GIL)."""
    import ctypes
    view = np.frombuffer(mapping, dtype=np.uint8)
    libc = _libc()
    if libc is not None and libc.madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), _POPULATE_READ) == 0:
        return
    view[::4096].sum()


def _libc():
    import ctypes
    import ctypes.util
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def _bound_malloc() -> None:
    """Keep glibc from holding freed activation and cache buffers. Its mmap threshold rises
    after every large free (up to 32 MB), so the caches that grow by a slot per step end up
    carved from the heap and never return: measured here, +78 MiB over 32 steps of a 16-block
    model, against +7 MiB with the threshold pinned at 128 KiB and two arenas. Process-wide,
    which a serving process is."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)


class _Slot:
    def __init__(self, nbytes: int):
        self.buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
        self.block: int | None = None
        self.ready = threading.Event()


class _Streamer:
    """Brings streamed blocks' weights into memory, the next one ahead on a thread, at most
    SLOTS blocks at a time.

    mode "mmap" (the default): each weight file is mapped read-only; bringing a block in touches
    its pages (a minor fault each, from the page cache), and after the block ran its pages are
    dropped from this process (MADV_DONTNEED), so resident memory stays at SLOTS blocks. Measured
    here at 12.6 MB a block: 1.1 ms to fault a block back in against 2.8 ms to read it into a
    buffer, and ONNX Runtime reads the mapped arrays without a copy. mode "read": the file is
    read into one of SLOTS preallocated buffers (BMInf's swap slots, what a device copy needs).
    """

    def __init__(self, directory: str, parts: list[dict], streamed: tuple[int, ...], slot_bytes: int, prefetch: bool,
                 mode: str = "mmap"):
        if mode not in ("mmap", "read"):
            raise BackendError(f"streaming mode must be mmap or read, got {mode!r}")
        self.directory, self.parts, self.order, self.prefetch, self.mode = directory, parts, list(streamed), prefetch, mode
        self.slots = [_Slot(slot_bytes if mode == "read" else 0) for _ in range(SLOTS)] if streamed else []
        self.maps = {block: self._map(block) for block in streamed} if mode == "mmap" else {}
        self.bytes_read = 0
        self._threads: list[threading.Thread] = []

    def _path(self, block: int) -> str:
        return os.path.join(self.directory, self.parts[block]["stem"] + ".bin")

    def _map(self, block: int):
        import mmap
        with open(self._path(block), "rb") as f:
            return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)

    def _read(self, slot: _Slot, block: int) -> None:
        size = self.parts[block]["weight_bytes_file"]
        if self.mode == "mmap":
            _populate(self.maps[block], size)
        else:
            with open(self._path(block), "rb", buffering=0) as f:
                f.readinto(memoryview(slot.buffer)[:size])
        self.bytes_read += size
        slot.ready.set()

    def _start(self, slot: _Slot, block: int) -> None:
        slot.block = block
        slot.ready.clear()
        if self.prefetch:
            thread = threading.Thread(target=self._read, args=(slot, block), daemon=True)
            thread.start()
            self._threads.append(thread)
        else:
            self._read(slot, block)

    def begin(self) -> None:
        """A forward pass starts: the first streamed block into slot 0."""
        if self.order:
            self._join()
            self._start(self.slots[0], self.order[0])

    def weights(self, block: int) -> dict[str, np.ndarray]:
        """The block's weights (waiting for them), and the next streamed block started into the
        other slot."""
        position = self.order.index(block)
        slot = self.slots[position % SLOTS]
        if slot.block != block:
            self._start(slot, block)
        slot.ready.wait()
        if position + 1 < len(self.order):
            self._start(self.slots[(position + 1) % SLOTS], self.order[position + 1])
        source = self.maps[block] if self.mode == "mmap" else slot.buffer
        return {t["name"]: np.frombuffer(source, dtype=np.dtype(t["dtype"]), count=int(np.prod(t["shape"])),
                                         offset=t["offset"]).reshape(t["shape"]) for t in self.parts[block]["weights"]}

    def release(self, block: int) -> None:
        """The block ran: its mapped pages leave this process's memory (they stay in the page cache)."""
        if self.mode == "mmap" and block in self.maps:
            import mmap
            self.maps[block].madvise(mmap.MADV_DONTNEED)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads = []


# ------------------------------------------------------------------ the runtime


def _session_options(threads: int | None, arena: bool = True):
    """`arena=False` for the streamed blocks' shared session: ORT's arena grows in doubling
    chunks and keeps its high-water mark for good (+100 MiB here, measured), where malloc per
    run costs little beside bringing a block's weights in."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    return options


def reserved_bytes(manifest: dict, batch: int, max_len: int) -> int:
    """KV cache for `batch` sequences of `max_len` slots, plus activations: four live tensors
    of the widest per-token value the lowering recorded, for a whole prompt (fp32)."""
    layout = manifest["layout"]
    cache = sum(2 * batch * h * max_len * d * 4 for h, d in zip(layout["heads"], layout["head_dims"]))
    return cache + 4 * manifest["widest_per_token"] * batch * max_len * 4


def canonical_form(model) -> tuple[bytes, dict[str, str]]:
    """The graph with every value renamed by its order of appearance (inputs, weights, outputs,
    internals), and the renaming; blocks of one shape give the same bytes, so they can share
    one streamed session (one arena, one graph) and take their own weights as inputs."""
    import onnx
    canon = onnx.ModelProto()
    canon.CopyFrom(model)
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name:
            return name
        if name not in names:
            names[name] = f"v{len(names)}"
        return names[name]

    graph = canon.graph
    for value in (*graph.input, *graph.output):
        value.name = rename(value.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    for position, node in enumerate(graph.node):
        node.name = f"n{position}"
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for value in graph.value_info:
        value.name = rename(value.name)
    graph.name = "block"
    return canon.SerializeToString(), names


class PagedRuntime:
    """Runs the decode step part by part; block weights resident or streamed as planned."""

    def __init__(self, directory: str, manifest: dict, budget: int | None = None, *, prefetch: bool = True,
                 providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
                 streaming: str = "mmap"):
        import onnxruntime as ort
        _bound_malloc()
        self.directory, self.manifest = directory, manifest
        self.parts = manifest["parts"]
        for part in self.parts:
            part["weight_bytes_file"] = os.path.getsize(os.path.join(directory, part["stem"] + ".bin"))
        blocks = [i for i, p in enumerate(self.parts) if p["kind"] == "block"]
        fixed = sum(p["weight_bytes_file"] for i, p in enumerate(self.parts) if i not in blocks)
        self.max_len = max_len or manifest["max_len"]
        self.reserved = reserved_bytes(manifest, batch, self.max_len)
        plan = plan_residency([self.parts[i]["weight_bytes_file"] for i in blocks], fixed, budget, self.reserved)
        self.plan = Plan(tuple(blocks[i] for i in plan.resident), tuple(blocks[i] for i in plan.streamed),
                         plan.slot_bytes, plan.weight_bytes)
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions, self.renames = [], []
        shared: dict[bytes, object] = {}
        for index, part in enumerate(self.parts):
            if index in self.plan.streamed:  # one session per distinct block shape
                import onnx
                graph, names = canonical_form(onnx.load(os.path.join(directory, part["stem"] + ".stream.onnx")))
                if graph not in shared:
                    shared[graph] = ort.InferenceSession(graph, _session_options(threads, arena=False),
                                                         providers=self.providers)
                self.sessions.append(shared[graph])
                self.renames.append(names)
                continue
            self.sessions.append(ort.InferenceSession(os.path.join(directory, part["stem"] + ".onnx"),
                                                      _session_options(threads), providers=self.providers))
            self.renames.append(None)
        self.streamed_sessions = len(shared)
        self.streamer = _Streamer(directory, self.parts, self.plan.streamed, self.plan.slot_bytes, prefetch, streaming)
        self.last_use = {}
        for index, part in enumerate(self.parts):
            for name in part["inputs"]:
                self.last_use[name] = index
        log.info("ort-paged: %d blocks resident, %d streamed (through %d shared sessions), %s bytes of weights held",
                 len(self.plan.resident), len(self.plan.streamed), self.streamed_sessions, f"{self.plan.weight_bytes:,}")

    def step(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One decode step: feeds by input name; the step's outputs (logits, present caches).
        Values between parts stay ONNX Runtime's own (OrtValues: no copy into numpy and back
        per part, which cost ~5% of a forward at gpt-mini's size); numpy arrays are wrapped
        without a copy."""
        from onnxruntime import OrtValue
        env = {name: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in feeds.items()}
        keep = set(self.manifest["outputs"])
        self.streamer.begin()
        for index, (part, session) in enumerate(zip(self.parts, self.sessions)):
            inputs = {name: env[name] for name in part["inputs"]}
            names = self.renames[index]
            if names is not None:
                inputs.update({k: OrtValue.ortvalue_from_numpy(v) for k, v in self.streamer.weights(index).items()})
                inputs = {names[k]: v for k, v in inputs.items()}
                outputs = session.run_with_ort_values([names[n] for n in part["outputs"]], inputs)
                del inputs
                self.streamer.release(index)
            else:
                outputs = session.run_with_ort_values(part["outputs"], inputs)
            env.update(zip(part["outputs"], outputs))
            for name in part["inputs"]:
                if self.last_use.get(name) == index and name not in keep:
                    env.pop(name, None)  # free what no later part reads
        return [env[name].numpy() for name in self.manifest["outputs"]]


# ------------------------------------------------------------------ the program


class PagedProgram:
    """A causal LM built for ONNX Runtime: `prog(input_ids)` gives logits, `prog.generate(...)`
    tokens, `prog.save(DIR)` a directory `bmc.load(DIR)` (or `bmc run DIR`) serves."""

    backend = "ort-paged"

    def __init__(self, directory: str, manifest: dict, *, budget: int | None = None, prefetch: bool = True,
                 providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
                 streaming: str = "mmap"):
        self.directory, self.manifest, self.pipeline = directory, manifest, manifest.get("pipeline", "")
        self.runtime = PagedRuntime(directory, manifest, budget, prefetch=prefetch, providers=providers,
                                    threads=threads, batch=batch, max_len=max_len, streaming=streaming)
        layout = manifest["layout"]
        self.heads, self.head_dims = layout["heads"], layout["head_dims"]

    @property
    def plan(self) -> Plan:
        return self.runtime.plan

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=np.float32) for h, d in zip(self.heads, self.head_dims) for _ in (0, 1)]

    def step(self, ids, positions, mask, caches):
        names = self.manifest["inputs"]
        feeds = dict(zip(names, [ids, positions, mask, *caches]))
        out = self.runtime.step(feeds)
        return out[0], out[1:]

    def __call__(self, input_ids):
        """Logits of whole sequences (no cache), as a torch tensor when given one."""
        import torch
        as_torch = isinstance(input_ids, torch.Tensor)
        ids = input_ids.cpu().numpy() if as_torch else np.asarray(input_ids)
        batch, seq = ids.shape
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        logits, _ = self.step(ids.astype(np.int64), positions, np.ones((batch, seq), dtype=np.int64),
                              self.empty_cache(batch))
        return torch.from_numpy(logits) if as_torch else logits

    def generate(self, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                 eos: int | None = None, stream: bool = False):
        from bmc import generate as gen
        kw = dict(max_new_tokens=max_new_tokens, sampling=gen.Sampling(temperature, top_k, seed), eos=eos,
                  max_len=self.manifest["max_len"])
        if stream:
            return gen.stream(self.step, self.empty_cache, prompts, **kw)
        return gen.generate(self.step, self.empty_cache, prompts, **kw)

    def save(self, directory: str) -> None:
        """Copy the build to `directory` (published by rename: a reader sees all of it or none)."""
        import shutil
        from bmc.serialize import staged_directory
        if os.path.abspath(directory) == os.path.abspath(self.directory):
            return  # already there
        with staged_directory(directory) as staging:
            for name in [*self.manifest["files"], "manifest.json"]:
                shutil.copyfile(os.path.join(self.directory, name), os.path.join(staging, name))

    def __repr__(self) -> str:
        return (f"PagedProgram({self.manifest['model']}, {len(self.plan.resident)} blocks resident, "
                f"{len(self.plan.streamed)} streamed, pipeline={self.pipeline!r})")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    from importlib.metadata import version
    return {"bmc": version("bmc"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def build(gm, directory: str, *, pipeline: str = "", gpu: bool = False, progress=None) -> dict:
    """Lower `gm` into `directory` and write its manifest (last, atomically: a directory
    without one is not a build)."""
    from bmc import ir
    from bmc.backends import ort_lower
    from bmc.serialize import atomic_write_text
    from bmc.structure import structure_of
    from bmc.trace import trace_info
    lowered = ort_lower.lower_to_directory(gm, directory, gpu=gpu, progress=progress)
    files = {}
    for part in lowered["parts"]:
        for suffix in (".onnx", ".stream.onnx", ".bin"):
            name = part["stem"] + suffix
            files[name] = ort_lower.sha256(os.path.join(directory, name))
    info = trace_info(gm)
    manifest = {"format": FORMAT, "model": info.model_name if info else "graph", "pipeline": pipeline,
                "blocks": [b.name for b in structure_of(gm).blocks], "dtype": "float32", "gpu": gpu,
                "quantized": any(ir.get(n, ir.Quant) is not None for n in gm.graph.nodes),
                "versions": _versions(), "files": files, **lowered}
    atomic_write_text(os.path.join(directory, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def load(directory: str, **options) -> PagedProgram:
    """A served directory, checksums verified before any session is created."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return PagedProgram(directory, manifest, **options)


def _register() -> None:
    from bmc.backends import register_backend

    @register_backend("ort-paged")
    def lower(gm, context, *, budget: int | None = None, directory: str | None = None, prefetch: bool = True,
              providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
              streaming: str = "mmap"):
        """Build `gm` for ONNX Runtime into `directory` (a temporary one when None; `prog.save`
        keeps it) and serve it under `budget` bytes."""
        import tempfile
        if context.world_size != 1:
            raise BackendError("ort-paged serves on one process: compile with world_size=1")
        if budget is not None and budget <= 0:
            raise BackendError(f"budget must be a positive number of bytes, got {budget}")
        gpu = any(p != "CPUExecutionProvider" for p in (providers or []) if isinstance(p, str))
        target = directory or tempfile.mkdtemp(prefix="bmc-ort-")
        build(gm, target, pipeline=context.settings.get("pipeline", ""), gpu=gpu)
        return load(target, budget=budget, prefetch=prefetch, providers=providers, threads=threads, batch=batch,
                    max_len=max_len, streaming=streaming)


_register()
