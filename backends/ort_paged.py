"""The ort-paged backend: a causal LM (or an encoder, hidden states out) served by ONNX
Runtime, block by block, with its block weights paged under a memory budget (BMInf's policy)
and loading overlapped with compute.

    prog = bmc.compile(model, passes="quant-int8", backend="ort-paged", budget=40 << 20)
    prog.save("served/")                       # manifest, whole.onnx; per part .onnx, .stream.onnx, .bin, .packed.*
    served = bmc.load("served/", budget=...)   # checksums verified before anything runs
    for tokens in served.generate(prompts, max_new_tokens=32, stream=True): ...

A build that holds every block (no budget, or one it fits) runs the step as one session over
the build's whole graph (`whole.onnx`, the parts composed); under a budget, a session per part.

Policy (`plan_residency`, with the reserve's arithmetic in ort_budget.py): the embedding and the head stay resident; as many blocks as fit in
what the budget leaves after them, the KV cache, the activations and the swap slots are
resident, spread evenly over the depth; the others are streamed through two swap slots, the
next streamed block brought in on a background thread while the current one computes where
the sessions' threads leave a core free, else on the compute thread between parts
(`overlaps_paging`).

How streamed blocks get their weights (`streaming=`, measured in tools/bench/infer.py; the
paging itself is ort_streamer.py): by default ("prepacked", CPU) every block, resident or
streamed, runs in its own session over ONNX Runtime's prepacked weights, memory-mapped from
the build's `part-NN.packed.bin`; paging a block is faulting its mapped pages in ahead and
dropping them after it ran, so a streamed block computes exactly as fast as a resident one. Feeding the plain weights as inputs
("mmap", "read") loses the prepacking: ONNX Runtime packs an input weight on every run.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
import sys

import numpy as np

# plan_residency and reserved_bytes stay importable from here (tests, tools): the runtime's budget arithmetic
from bmc.backends.ort_budget import Plan, plan_residency, reserved_bytes, selects_logits  # noqa: F401
from bmc.backends.ort_artifacts import SMALL, error_line, machine_key, open_session, saturating_u8s8, sha256
from bmc.backends import ort_cache
from bmc.backends.ort_streamer import DONTNEED, Streamer, advise, bound_malloc, mapped_ranges
from bmc.errors import BackendError

log = logging.getLogger(__name__)
FORMAT = "bmc-ort-paged/1"


class ArtifactError(BackendError):
    """A served directory that is missing files, corrupted, or from another format."""


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
    for name, digest in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing from the build; copy the whole directory or rebuild it")
        if sha256(path) != digest:
            raise ArtifactError(f"{path} does not match its checksum in manifest.json (corrupted or changed); "
                                f"restore it or rebuild the directory")


# ------------------------------------------------------------------ the runtime


_SHARED_ARENA = 0  # the first chunk's size, once made


def _shared_arena(first_chunk: int) -> None:
    """One CPU arena for every session of the process (ONNX Runtime's environment allocator).
    A session's own arena keeps its high-water mark for good: with one per block that is the
    activations of every block at once (+86 MiB at 16 blocks x 512, batch 4, measured), where
    parts run one after the other and one arena the size of one part's working set serves them
    all. Its chunks grow by doubling (kNextPowerOfTwo): growing them as requested left a new
    chunk per decode step, as each step's working set is a little larger (+160 MiB over 32
    steps, measured, against +18 MiB); without an arena a decode step ran 1.5x slower. Its first
    chunk is the plan's reserve for the cache and activations (`first_chunk`), so a step that
    holds what the plan counted never extends it (pages of it that are never touched cost no
    memory); the process's first runtime sets it."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        if first_chunk > _SHARED_ARENA:
            log.info("ort-paged: the process's ONNX Runtime arena was made for %s bytes; it grows past them",
                     f"{_SHARED_ARENA:,}")
        return
    import onnxruntime as ort
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0,
                                                             "initial_chunk_size_bytes": first_chunk}))
    _SHARED_ARENA = first_chunk


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def overlaps_paging(prefetch: bool | None, threads: int | None) -> bool:
    """Whether streamed blocks are paged in on a thread of their own, overlapping compute.
    `prefetch` None: only where the sessions' threads leave a core free. Where they take every
    core, mapping pages in and out (kernel work: ~2.4 ms per step for 286 MB, measured) preempts
    one of the threads an operator waits on, and every operator waits for its slowest thread:
    on 2 cores with 2 threads a decode step took 20.3-20.9 ms overlapped against 18.6-19.1 ms
    paged in on the compute thread between parts (batch 1; 32.3-33.1 against 29.4-30.0 ms at
    batch 8), where with 1 thread overlapping won (28.5 against 29.3 ms)."""
    if prefetch is not None:
        return prefetch
    return bool(threads) and threads < usable_cores()


def _session_options(threads: int | None, arena_bytes: int = 0, spinning: str = "off"):
    """Sessions allocate from the process's shared arena (`_shared_arena`, first chunk
    `arena_bytes`); 0 for the shared session of blocks fed their weights as inputs, where
    malloc per run costs little beside bringing a block's weights in.

    `spinning`: whether a session's intra-op threads spin waiting for work rather than sleep
    ("always": a session that runs alone, the whole step). A session per part has threads of
    its own, and after a run they would spin while the next part's want the same cores: with
    14 parts on 2 cores that made a decode step 7x slower (5.7 against 41 tokens/s, measured).
    "during-run" spins within a run and stops the spinning when it returns
    (`session.force_spinning_stop`): no operator waits for a sleeping thread to wake, and no
    part's threads outlive its run (every block resident as parts, 2 threads: 63.6-64.6
    against 58.9-60.3 tokens/s sleeping, "off"). Not beside a prefetch thread, whose page-ins
    then preempt spinning threads (32.9-38.7 against 32.0-32.8 ms per step at batch 8).
    ONNX Runtime's global thread pool would share one set of threads between the parts, but
    once set it refuses every other session in the process that has its own (the user's
    included)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if spinning == "off":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "during-run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    arena = arena_bytes > 0
    options.enable_cpu_mem_arena = arena
    if arena:
        _shared_arena(arena_bytes)
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    return options


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


def packed_bytes(directory: str, part: dict) -> int:
    """The weight bytes a session over the part's prepacked form holds: for each external
    initializer its prepacked buffers where it has them (ONNX Runtime then leaves the plain
    copy unread), else itself. Read off the graph's external-data entries
    (`prepacked_N: "kernel+hash|offset;length;alignment"`)."""
    import onnx
    model = onnx.load(os.path.join(directory, part["stem"] + ".packed.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        entries = {item.key: item.value for item in tensor.external_data}
        packed = [v for k, v in entries.items() if k.startswith("prepacked")]
        if packed:
            total += sum(int(group.split(";")[1]) for v in packed for group in v.split("|")[1:])
        elif "length" in entries and int(entries["length"]) >= SMALL:
            total += int(entries["length"])
    return total


def choose_streaming(manifest: dict, requested: str, providers: list) -> str:
    """`requested` ("auto": prepacked where the build's prepacked weights fit this machine, else
    mmap), or why it cannot be had."""
    usable, why = True, ""
    if not all(part.get("packed") for part in manifest["parts"]):
        usable, why = False, ("the build has no prepacked weights (built with --no-prepacked or for a GPU, or by an "
                              "older bmc)")
    elif manifest.get("prepacked_for") != machine_key():
        usable, why = False, (f"its prepacked weights were made for {manifest.get('prepacked_for')}, this machine "
                              f"is {machine_key()}; rebuild the directory here (bmc-opt ... --backend=ort-paged -o DIR)")
    elif not os.path.exists("/proc/self/maps") or list(providers) != ["CPUExecutionProvider"]:
        usable, why = False, "paging mapped prepacked weights needs Linux and the CPU execution provider"
    if requested == "auto":
        if not usable:
            log.warning("ort-paged: streaming blocks' weights as inputs (slower): %s", why)
        return "prepacked" if usable else "mmap"
    if requested == "prepacked" and not usable:
        raise BackendError(f"streaming='prepacked' is not available: {why}; or pass streaming='mmap'")
    return requested


PAGE = 4096


def row_paged(directory: str, part: dict, batch: int, max_len: int) -> tuple[list[str], int]:
    """The part's lookup tables (weights read only as Gather's table: embeddings, position
    tables) and the bytes they hold when paged by rows: a step looks up at most batch x max_len
    rows, and each row touches at most its pages plus one (rows straddle pages). Their pages
    are dropped after every step (PagedRuntime), so only those rows are ever in memory, where
    holding the table would cost the embedding of a 32k vocabulary at width 4096 (512 MiB fp32)
    to look up a few rows."""
    import onnx
    graph = onnx.load(os.path.join(directory, part["stem"] + ".onnx"), load_external_data=False).graph
    readers: dict[str, set] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, position))
    tables, held = [], 0
    for weight in part["weights"]:
        if len(weight["shape"]) == 2 and readers.get(weight["name"]) == {("Gather", 0)}:
            row = weight["nbytes"] // max(weight["shape"][0], 1)
            tables.append(weight["name"])
            held += min(weight["nbytes"], batch * max_len * (-(-row // PAGE) + 1) * PAGE)
        else:
            held += weight["nbytes"]
    return tables, held


class PagedRuntime:
    """Runs the decode step part by part; block weights resident or streamed as planned."""

    def __init__(self, directory: str, manifest: dict, budget: int | None = None, *, prefetch: bool | None = None,
                 providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
                 streaming: str = "auto"):
        bound_malloc()
        self.directory, self.manifest = directory, manifest
        self.parts = manifest["parts"]
        self.providers = providers or ["CPUExecutionProvider"]
        self.streaming = choose_streaming(manifest, streaming, self.providers)
        for part in self.parts:
            part["weight_bytes_file"] = os.path.getsize(os.path.join(directory, part["stem"] + ".bin"))
            part["held_bytes"] = (packed_bytes(directory, part) if self.streaming == "prepacked"
                                  else part["weight_bytes_file"])
        blocks = [i for i, p in enumerate(self.parts) if p["kind"] == "block"]
        fixed = sum(p["held_bytes"] for i, p in enumerate(self.parts) if i not in blocks)
        self.batch, self.max_len = batch, max_len or manifest["max_len"]
        self.budget = budget
        self.reserved = reserved_bytes(manifest, batch, self.max_len)
        # streaming blocks, the embedding's tables are paged by rows: only where ONNX Runtime
        # maps them (prepacked), so dropping their pages is ours to do
        self.row_paged: dict[int, int] = {}  # part -> bytes its tables held when paged by rows
        fixed_streaming = fixed
        if self.streaming == "prepacked":
            for index, part in enumerate(self.parts):
                if part["kind"] == "embed":
                    tables, held = row_paged(directory, part, batch, self.max_len)
                    if tables and held < part["held_bytes"]:
                        self.row_paged[index] = sum(t["nbytes"] for t in part["weights"] if t["name"] in tables)
                        fixed_streaming -= part["held_bytes"] - held
        plan = plan_residency([self.parts[i]["held_bytes"] for i in blocks], fixed, budget, self.reserved,
                              fixed_streaming)
        if not plan.streamed:
            self.row_paged = {}
        self.plan = Plan(tuple(blocks[i] for i in plan.resident), tuple(blocks[i] for i in plan.streamed),
                         plan.slot_bytes, plan.weight_bytes)
        self.prefetch = overlaps_paging(prefetch, threads)
        self.streamer = Streamer(directory, self.parts, self.plan.streamed, self.plan.slot_bytes, self.prefetch,
                                  self.streaming)
        self.events: list | None = None  # a timeline of the steps, when recorded (record_timeline)
        self._open_sessions(threads)
        self.last_use = {}
        for index, part in enumerate(self.parts):
            for name in part["inputs"]:
                self.last_use[name] = index
        log.info("ort-paged: %d blocks resident, %d streamed (%s), %s bytes of weights held",
                 len(self.plan.resident), len(self.plan.streamed), self.streaming, f"{self.plan.weight_bytes:,}")

    def _open_sessions(self, threads: int | None) -> None:
        """One session per part. Streamed blocks fed as inputs share one session per distinct
        block shape (canonical_form); in prepacked mode each part has its own, and a streamed
        block's mapped weights are dropped right after its session is made, so loading never
        holds more than one streamed block."""
        import onnx
        self.sessions, self.renames, self.session_files = [], [], []
        self.whole = None
        self.table_ranges: dict[int, list[tuple[int, int]]] = {}
        self.cache_pairs: dict[str, str] = {}  # present -> past, where one buffer serves both (ort_cache.py)
        self.sharing_step = None
        self.part_pairs: dict[int, dict[str, str]] = {}  # part -> its present -> past, in its session's names
        whole = self.manifest.get("whole")
        if whole and not self.plan.streamed:
            path = os.path.join(self.directory, whole)
            options = _session_options(threads, self.reserved, spinning="always")
            self.whole = open_session(path, options, self.providers, whole)
            self.whole_reads = {value.name for value in self.whole.get_inputs()}  # not position_ids, rotated by slot
            self.streamed_sessions = 0
            if self.manifest.get("task", "causal-lm") == "causal-lm":
                presents = self.manifest["outputs"][1:]  # (ids, positions, mask, caches..., [logits positions])
                caches = self.manifest["inputs"][3:3 + len(presents)]
                self.cache_pairs = ort_cache.shared_cache_pairs(onnx.load(path, load_external_data=False), caches,
                                                                presents)
                self.sharing_step = ort_cache.SharingStep(
                    self.whole, [n for n in self.manifest["inputs"] if n in self.whole_reads], self.manifest["outputs"],
                    self.cache_pairs, self.manifest["layout"]["vocab"])
            return
        shared: dict[bytes, object] = {}
        spinning = "off" if self.streamer.overlapping else "during-run"
        for index, part in enumerate(self.parts):
            streamed = index in self.plan.streamed
            if streamed and self.streaming != "prepacked":
                graph, names = canonical_form(onnx.load(os.path.join(self.directory, part["stem"] + ".stream.onnx")))
                if graph not in shared:
                    shared[graph] = open_session(graph, _session_options(threads, spinning=spinning), self.providers,
                                                 f"{part['stem']}.stream.onnx")
                self.sessions.append(shared[graph])
                self.renames.append(names)
                self.session_files.append(part["stem"] + ".stream.onnx")
                continue
            suffix = ".packed.onnx" if self.streaming == "prepacked" else ".onnx"
            packed_weights = os.path.join(self.directory, part["stem"] + ".packed.bin")
            before = mapped_ranges(packed_weights) if streamed or index in self.row_paged else []
            self.sessions.append(open_session(os.path.join(self.directory, part["stem"] + suffix),
                                              _session_options(threads, self.reserved, spinning), self.providers,
                                              part["stem"] + suffix))
            self.renames.append(None)
            self.session_files.append(part["stem"] + suffix)
            if index in self.row_paged:
                self._track_tables(index, packed_weights, before)
            if streamed:
                mapped = self.streamer.track(index, packed_weights, before)
                if mapped < part["held_bytes"] // 2:  # ONNX Runtime copied them to its heap instead
                    raise BackendError(f"ort-paged: ONNX Runtime holds block {part['name']}'s prepacked weights on "
                                       f"its heap ({mapped:,} of {part['held_bytes']:,} bytes mapped), so they "
                                       f"cannot be paged; pass streaming='mmap'")
        self.streamed_sessions = len(shared)
        self._prove_part_sharing()

    def _prove_part_sharing(self) -> None:
        """Each block part writes its cache in place when every part's graph proves it
        (ort_cache.part_cache_pairs): a step then allocates no cache, where a new present per
        block and step made ONNX Runtime's shared arena grow by doubling past the budget
        (4.4 GB at a 2.1 GB budget, the 7B at batch 8)."""
        if self.manifest.get("task", "causal-lm") != "causal-lm":
            return
        self.cache_pairs, self.part_pairs = ort_cache.part_cache_pairs(
            self.directory, self.manifest, self.session_files, self.renames)

    def _track_tables(self, index: int, path: str, before: list[tuple[int, int]]) -> None:
        """A row-paged part's session was made: its mappings (tracked as a streamed block's),
        whose pages are dropped after each run; refused when ONNX Runtime copied its tables to
        its heap (the plan counted rows)."""
        if self.streamer.track(index, path, before) < self.row_paged[index]:
            raise BackendError(f"ort-paged: ONNX Runtime holds part {self.parts[index]['name']}'s lookup tables on its "
                               f"heap, so they cannot be paged by rows; give a budget that holds them, or pass "
                               f"streaming='mmap'")
        self.table_ranges[index] = self.streamer.ranges[index]

    def step(self, feeds: dict) -> list:
        """One decode step: feeds by input name (numpy arrays, wrapped without a copy, or the
        OrtValues an earlier step returned); the step's outputs (logits, present caches) as
        OrtValues. Values between parts, and the caches between steps, stay ONNX Runtime's own:
        no copy into numpy and back per part (~5% of a forward at gpt-mini's size) and no third
        copy of the cache at the end of a step. `feeds` is consumed (emptied as parts read it):
        a block's old cache is freed once that block ran, when the caller keeps no other
        reference, so a step holds one cache and one block's new one, not two caches."""
        from onnxruntime import OrtValue
        env = feeds
        for name, value in env.items():
            if not isinstance(value, OrtValue):
                env[name] = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
        if self.whole is not None:
            return self._run_whole(env)
        keep = set(self.manifest["outputs"])
        width = env["attention_mask"].shape()[-1] if "attention_mask" in env else 0  # the positions the step fills
        self.streamer.begin()
        for index, (part, session) in enumerate(zip(self.parts, self.sessions)):
            inputs = {name: env[name] for name in part["inputs"]}
            streamed, names, wanted = index in self.plan.streamed, self.renames[index], part["outputs"]
            started = time.perf_counter()
            if streamed:  # waits for its weights (fed, or mapped in by the session's own mapping)
                inputs.update({k: OrtValue.ortvalue_from_numpy(v) for k, v in self.streamer.weights(index).items()})
                self._event("wait", part, started)
                started = time.perf_counter()
            if names is not None:
                inputs, wanted = {names[k]: v for k, v in inputs.items()}, [names[n] for n in wanted]
            try:
                outputs = ort_cache.run_part(session, inputs, wanted, self.part_pairs.get(index), width)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own kinds; one line names the part
                raise BackendError(f"ort-paged: part {part['name']} failed in ONNX Runtime: {error_line(exc)}") from exc
            del inputs
            self._event("compute-streamed" if streamed else "compute", part, started)
            if streamed:
                self.streamer.release(index)
            if index in self.table_ranges:  # the rows this step looked up leave memory (the page cache keeps them)
                advise(self.table_ranges[index], DONTNEED)
            env.update(zip(part["outputs"], outputs))
            for name in part["inputs"]:
                if self.last_use.get(name) == index and name not in keep:
                    env.pop(name, None)  # free what no later part reads
        return [env[name] for name in self.manifest["outputs"]]

    def record_timeline(self) -> list:
        """From now on, record when each part computes, waits for its weights and is paged in
        (the prefetch thread): (lane, part name, start, end) in perf_counter seconds."""
        self.events = self.streamer.events = []
        return self.events

    def _event(self, lane: str, part: dict, started: float) -> None:
        if self.events is not None:
            self.events.append((lane, part["name"], started, time.perf_counter()))

    @property
    def shares_cache(self) -> bool:
        """The step writes its KV cache in place, in buffers of the positions generation needs
        (PagedProgram.empty_cache), rather than copying it into a new one each step."""
        return bool(self.cache_pairs)

    def _run_whole(self, feeds: dict) -> list:
        """Every block resident: the step as one session (the build's whole graph)."""
        inputs = {name: feeds.pop(name) for name in self.manifest["inputs"] if name in self.whole_reads}
        started = time.perf_counter()
        try:
            if self.cache_pairs and self.sharing_step.fits(inputs):
                return self.sharing_step(inputs)
            return self.whole.run_with_ort_values(self.manifest["outputs"], inputs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own kinds; one line
            raise BackendError(f"ort-paged: the decode step failed in ONNX Runtime: {error_line(exc)}") from exc
        finally:
            self._event("compute", {"name": "whole step"}, started)


# ------------------------------------------------------------------ the program


def slot_positions_hold(positions, mask) -> bool:
    """Each row of `mask` [B, S] is padding, then tokens (left-padded), and the step's T new
    tokens' `positions` [B, T] are their slots less the row's padding: what a build that
    rotates by slot (bmc/rewrite/slot_rotary.py) needs for the positions' result."""
    positions, mask = np.asarray(positions), np.asarray(mask)
    if positions.ndim != 2 or mask.ndim != 2 or positions.shape[1] > mask.shape[1]:
        return False
    started = np.cumsum(mask != 0, axis=1) > 0
    if not np.array_equal(mask != 0, started):  # a padding slot after a token
        return False
    tokens = positions.shape[1]
    slots = np.arange(mask.shape[1] - tokens, mask.shape[1])[None, :] - (mask == 0).sum(1, keepdims=True)
    real = mask[:, -tokens:] != 0
    return bool(np.array_equal(positions[real], slots[real]))


def reserve_excess(batch: int, positions: int, reserved_batch: int,
                   reserved_len: int) -> tuple[str, str, str] | None:
    """What a generation asks beyond the reserve (the batch, the positions, or both), what the
    reserve was sized for, and the load options that would cover it; None when it fits."""
    over, sized, fix = [], [], []
    if batch > reserved_batch:
        over.append(f"{batch} prompts")
        sized.append(f"batch={reserved_batch}")
        fix.append(f"batch={batch}")
    if positions > reserved_len:
        over.append(f"{positions} positions (prompt + new tokens)")
        sized.append(f"max_len={reserved_len}")
        fix.append(f"max_len={positions}")
    if not over:
        return None
    return " and ".join(over), ", ".join(sized), " and ".join(fix)


class PagedProgram:
    """A causal LM built for ONNX Runtime: `prog(input_ids)` gives logits, `prog.generate(...)`
    tokens, `prog.save(DIR)` a directory `bmc.load(DIR)` (or `bmc run DIR`) serves."""

    backend = "ort-paged"

    def __init__(self, directory: str, manifest: dict, *, budget: int | None = None, prefetch: bool | None = None,
                 providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
                 streaming: str = "auto"):
        self.directory, self.manifest, self.pipeline = directory, manifest, manifest.get("pipeline", "")
        self.runtime = PagedRuntime(directory, manifest, budget, prefetch=prefetch, providers=providers,
                                    threads=threads, batch=batch, max_len=max_len, streaming=streaming)
        layout = manifest["layout"]
        self.heads, self.head_dims = layout["heads"], layout["head_dims"]
        self.selects_logits = selects_logits(manifest)
        self._bound_caches = None  # the list of caches the last step returned, bound in place (_step)

    @property
    def plan(self) -> Plan:
        return self.runtime.plan

    @property
    def lineage(self) -> list[dict]:
        """The recorded steps from the training run (where the weights have a record) to this
        build, oldest first, each with the digest of the step it was made from (bmc run --info)."""
        return list(self.manifest.get("lineage", []))

    def empty_cache(self, batch: int, length: int | None = None) -> list:
        """The cache a first step takes: buffers of `length` positions (the runtime's max_len by
        default) the steps write in place where the build's graph allows it, else empty arrays
        each step's present grows from."""
        if self.runtime.shares_cache:
            return ort_cache.empty_shared_cache(batch, self.heads, self.head_dims, length or self.runtime.max_len)
        return [np.zeros((batch, h, 0, d), dtype=np.float32) for h, d in zip(self.heads, self.head_dims) for _ in (0, 1)]

    def step(self, ids, positions, mask, caches: list, logits_positions=None):
        """The decode step of bmc/generate.py: the logits of the last new position (of
        `logits_positions` when given; builds older than that input give every position's).
        `caches` is consumed (emptied): the runtime frees each block's old cache as soon as that
        block ran (PagedRuntime.step)."""
        if self.manifest.get("rotary_by_slot") and not slot_positions_hold(positions, mask):
            raise BackendError("this build rotates RoPE by cache slot (GroupQueryAttention's do_rotary), which gives "
                               "the positions' result only for a left-padded mask with positions counting each "
                               "row's tokens (what generate() feeds); feed those")
        return self._step(ids, positions, mask, caches, logits_positions)

    def _step(self, ids, positions, mask, caches: list, logits_positions=None):
        """step without the check of the positions: generate() feeds left-padded masks and
        positions that count the tokens by construction. Python between two runs costs a
        decode step ~4% at batch 1 (0.5 of 13.5 ms, 12 layers of width 768: the run leaves the
        caches cold), so the checks a generation does not need are not made per token."""
        rows = np.asarray([ids.shape[1] - 1] if logits_positions is None else logits_positions, dtype=np.int64)
        sharing = self.runtime.sharing_step if self.runtime.shares_cache and self.runtime.events is None else None
        if sharing is not None and caches is self._bound_caches and mask.shape[-1] <= sharing.capacity:
            given = dict(zip(self.manifest["inputs"][:3], (ids, positions, mask)))
            given[self.manifest["inputs"][-1]] = rows
            small = {name: np.ascontiguousarray(given[name], dtype=np.int64) for name in sharing.small}
            try:
                return sharing.decode(small).numpy(), caches  # the same buffers, bound as they are
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own kinds; one line
                raise BackendError(f"ort-paged: the decode step failed in ONNX Runtime: {error_line(exc)}") from exc
        values = [ids, positions, mask, *caches]
        if self.selects_logits:
            values.append(rows)
        feeds = dict(zip(self.manifest["inputs"], values))
        caches.clear()
        out = self.runtime.step(feeds)
        caches = out[1:]  # the caches stay OrtValues: only the next step reads them
        self._bound_caches = caches if sharing is not None and sharing.holds(caches) else None
        return out[0].numpy(), caches

    @property
    def task(self) -> str:
        return self.manifest.get("task", "causal-lm")

    def __call__(self, input_ids, attention_mask=None):
        """Logits of whole sequences (no cache), or an encoder's hidden states; a torch tensor
        when given one. `attention_mask` [B, S] (1: a token, 0: padding; all ones by default):
        an encoder's padded rows give, on their tokens, what the tokens alone give."""
        torch = sys.modules.get("torch")  # a torch tensor means torch is imported; serving never imports it
        as_torch = torch is not None and isinstance(input_ids, torch.Tensor)

        def as_numpy(x):
            return (x.cpu().numpy() if torch is not None and isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)
        ids = as_numpy(input_ids)
        batch, seq = ids.shape
        if seq > self.manifest["max_len"]:
            raise BackendError(f"{seq} tokens exceed the model's {self.manifest['max_len']} positions")
        mask = np.ones((batch, seq), dtype=np.int64) if attention_mask is None else as_numpy(attention_mask)
        if mask.shape != ids.shape:
            raise BackendError(f"attention_mask has shape {list(mask.shape)}, the token ids {list(ids.shape)}")
        if self.task == "encoder":
            if len(self.manifest["inputs"]) < 2 and attention_mask is not None:
                raise BackendError("this build takes token ids alone (made by an older bmc); rebuild it to pass "
                                   "an attention_mask")
            feeds = dict(zip(self.manifest["inputs"], (ids, mask)))
            out = self.runtime.step(feeds)[0].numpy()
        elif attention_mask is not None:
            raise BackendError("a causal LM build takes no attention_mask in prog(input_ids); use generate() for "
                               "padded prompts")
        else:
            positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
            self._warn_past_reserve(batch, seq)
            out, _ = self.step(ids, positions, np.ones((batch, seq), dtype=np.int64), self.empty_cache(batch, seq),
                               np.arange(seq, dtype=np.int64))
        return torch.from_numpy(out) if as_torch else out

    def _warn_past_reserve(self, batch: int, seq: int) -> None:
        """Every position's logits are more than the budget's reserve counted (it holds the last
        position's, what generation needs)."""
        if selects_logits(self.manifest) and self.runtime.plan.streamed and seq > 1:
            log.warning("ort-paged: the logits of all %d positions (%s bytes) are beyond what the budget's reserve "
                        "holds (the last position's, for generate); memory may go past the budget", seq,
                        f"{batch * seq * self.manifest['layout']['vocab'] * 4:,}")

    def generate(self, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                 eos: int | None = None, stream: bool = False):
        from bmc.serve import generate as gen
        if self.task == "encoder":
            raise BackendError("this build is an encoder: it gives hidden states (prog(input_ids)), not tokens")
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        excess = reserve_excess(len(prompts), longest, self.runtime.batch, self.runtime.max_len)
        if excess and self.runtime.budget is not None:  # without a budget there is nothing to go past
            log.warning("ort-paged: %s exceed what the budget's reserve was sized for (%s): memory may go past "
                        "the budget; load with %s", *excess)
        kw = dict(max_new_tokens=max_new_tokens, sampling=gen.Sampling(temperature, top_k, seed), eos=eos,
                  max_len=self.manifest["max_len"])
        empty_cache = functools.partial(self.empty_cache, length=longest)
        if stream:
            return gen.stream(self._step, empty_cache, prompts, **kw)
        return gen.generate(self._step, empty_cache, prompts, **kw)

    def save(self, directory: str) -> None:
        """Copy the build to `directory` (published by rename: a reader sees all of it or none)."""
        import shutil
        from bmc.ir.serialize import staged_directory
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


def build(gm, directory: str, *, pipeline: str = "", gpu: bool = False, progress=None, max_len: int | None = None,
          task: str | None = None, lineage: list | None = None, record: dict | None = None,
          prepacked: bool = True) -> dict:
    """Lower `gm` into `directory` and write its manifest (last, atomically: a directory
    without one is not a build). Its `lineage` is the steps the weights came from with this
    build appended (`record`: what the compile adds: pass statistics, calibration, --eval).
    `prepacked=False` leaves out the prepacked form (a third of the disk; streamed blocks are then
    fed as inputs, slower). A filesystem without room for the build is refused first."""
    from bmc import ir
    from bmc.backends import ort_lower
    from bmc.ir.serialize import atomic_write_text
    from bmc.analysis.structure import structure_of
    from bmc.ir.trace import trace_info
    check_disk_room(gm, directory, prepacked and not gpu)
    tokenizer = carry_tokenizer(gm, directory)  # first: a changed tokenizer fails before the slow lowering
    lowered = ort_lower.lower_to_directory(gm, directory, gpu=gpu, progress=progress, max_len=max_len, task=task,
                                           prepacked=prepacked)
    if progress is not None:
        progress(len(lowered["parts"]), len(lowered["parts"]), "checksums")
    files = {}
    for part in lowered["parts"]:
        for name in [part["stem"] + suffix for suffix in (".onnx", ".stream.onnx", ".bin")] + part["packed"]:
            files[name] = sha256(os.path.join(directory, name))
    files[lowered["whole"]] = sha256(os.path.join(directory, lowered["whole"]))
    files.update(tokenizer)
    info = trace_info(gm)
    quants = [q for q in (ir.get(n, ir.Quant) for n in gm.graph.nodes) if q is not None]
    manifest = {"format": FORMAT, "model": info.model_name if info else "graph", "pipeline": pipeline,
                "tokenizer": next(iter(tokenizer), None),
                "blocks": [b.name for b in structure_of(gm).blocks], "dtype": "float32", "gpu": gpu,
                "quantized": bool(quants), "int8_digits": int8_digits(quants, gpu),
                "versions": _versions(), "files": files, **lowered}
    from bmc.models.weights import next_step
    step = {"kind": "build", "backend": "ort-paged", "model": manifest["model"], "pipeline": pipeline,
            "quantized": manifest["quantized"], "bmc_version": manifest["versions"]["bmc"], **(record or {})}
    manifest["lineage"] = next_step(list(lineage or []), step, files)
    atomic_write_text(os.path.join(directory, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def int8_digits(quants: list, gpu: bool) -> int:
    """How many int8 digits a CPU build's projections quantize each activation to
    (ort_ops.int8_linear_cpu): 2 where any is weight-only (act=none), 1 where all are W8A8,
    0 without int8 projections or on GPU providers (dequantized weights). The budget's reserve
    counts the two-digit products (ort_budget.reserved_bytes). `quants`: the graph's
    ir.Quant annotations."""
    if gpu or not quants:
        return 0
    return 2 if any(q.act != "dynamic" for q in quants) else 1


def build_bytes(gm, prepacked: bool) -> int:
    """What a build of `gm` writes, about: its weights as they are after the passes (int8 where
    quantized) in the weight files, and twice more in the prepacked form (ONNX Runtime writes
    the plain copy beside the packed one), plus an eighth for the layouts that pad them and the
    graphs."""
    weights = sum(t.numel() * t.element_size() for t in (*gm.parameters(), *gm.buffers()))
    return int(weights * (3 if prepacked else 1) * 1.125)


def check_disk_room(gm, directory: str, prepacked: bool) -> None:
    import shutil
    need = build_bytes(gm, prepacked)
    parent = os.path.dirname(os.path.abspath(directory))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if free < need:
        hint = "; or leave out the prepacked form (--no-prepacked needs about a third of it)" if prepacked else ""
        raise BackendError(f"ort-paged: the build needs about {need / 1e9:.2f} GB and {parent} has "
                           f"{free / 1e9:.2f} GB free: free some space or build elsewhere{hint}")
    log.info("ort-paged: the build needs about %.2f GB (%.2f GB free)", need / 1e9, free / 1e9)


def carry_tokenizer(gm, directory: str) -> dict[str, str]:
    """Copy the tokenizer of a model read from a Hugging Face directory (its TokenizerPlan)
    into the build: file name -> sha256, tokenizer.json first. A file that changed since the
    model was read is refused: the build would pair the weights with another vocabulary."""
    import shutil
    from bmc import ir
    plan = ir.get_plan(gm, ir.TokenizerPlan)
    copied = {}
    if plan:
        os.makedirs(directory, exist_ok=True)
    for file in plan.files if plan else ():
        source = os.path.join(plan.directory, file.name)
        if not os.path.isfile(source) or sha256(source) != file.sha256:
            raise BackendError(f"{source} is missing or changed since the model was read from {plan.directory}: "
                               f"read hf:{plan.directory} again (or restore the file) and rebuild")
        shutil.copyfile(source, os.path.join(directory, file.name))
        copied[file.name] = file.sha256
    return copied


def load(directory: str, **options) -> PagedProgram:
    """A served directory, checksums verified before any session is created."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    if manifest.get("quantized") and not manifest.get("gpu") and manifest.get("int8_weights", "s8") == "s8" \
            and saturating_u8s8():
        log.warning("ort-paged: %s feeds int8 weights to ONNX Runtime's u8 x s8 kernels, which saturate on this "
                    "CPU (x86 without VNNI): its int8 outputs are off by several times the quantization error; "
                    "rebuild the directory here (it will feed u8 weights)", directory)
    return PagedProgram(directory, manifest, **options)


def _register() -> None:
    from bmc.plugins import register_backend

    @register_backend("ort-paged", load=load, refuses=(
        ("tp-split", "it serves on one process; drop tp (tensor parallelism is for the torch backend)"),
        ("staged", "it serves on one process; drop pp (pipeline stages are for the torch backend)")))
    def lower(gm, context, *, budget: int | None = None, directory: str | None = None, prefetch: bool | None = None,
              providers=None, threads: int | None = None, batch: int = 1, max_len: int | None = None,
              streaming: str = "auto", task: str | None = None, prepacked: bool = True):
        """Build `gm` for ONNX Runtime into `directory` (a temporary one when None; `prog.save`
        keeps it) and serve it under `budget` bytes. `max_len` caps the positions served (the
        model's own, from its position tables or its config, otherwise); `task` ("causal-lm",
        "encoder") overrides what the structure analysis tells."""
        import shutil
        import tempfile
        import weakref
        if context.world_size != 1:
            raise BackendError("ort-paged serves on one process: compile with world_size=1")
        if budget is not None and budget <= 0:
            raise BackendError(f"budget must be a positive number of bytes, got {budget}")
        gpu = any(p != "CPUExecutionProvider" for p in (providers or []) if isinstance(p, str))
        target = directory or tempfile.mkdtemp(prefix="bmc-ort-")
        positions = [n for n in (max_len, context.settings.get("max_positions")) if n]
        try:
            build(gm, target, pipeline=context.settings.get("pipeline", ""), gpu=gpu,
                  max_len=min(positions) if positions else None, task=task,
                  lineage=context.settings.get("lineage"), record=context.settings.get("record"),
                  prepacked=prepacked)
            program = load(target, budget=budget, prefetch=prefetch, providers=providers, threads=threads,
                           batch=batch, max_len=max_len, streaming=streaming)
        except BaseException:
            if directory is None:
                shutil.rmtree(target, ignore_errors=True)
            raise
        if directory is None:  # a build of its own: gone with the program (prog.save(DIR) keeps a copy)
            weakref.finalize(program, shutil.rmtree, target, True)
        return program


_register()
