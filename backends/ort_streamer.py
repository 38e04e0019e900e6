"""Bringing streamed blocks' weights into memory and out again, for the ort-paged runtime
(ort_paged.py): swap slots, the prefetch worker, and the Linux page-level mechanics under them
(madvise on ONNX Runtime's own mappings, found in /proc/self/maps; glibc's malloc bounds).

Page control goes through libc's madvise by ctypes: Python's mmap.madvise only reaches
mappings Python made, and the prepacked weights are mapped by ONNX Runtime.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bmc.errors import BackendError

SLOTS = 2  # swap slots: the block computing and the next one coming in
POPULATE_READ = 22  # MADV_POPULATE_READ (Linux 5.14): map a range's pages from the page cache
DONTNEED = 4  # MADV_DONTNEED: a range's pages leave this process (a file's stay in the page cache)

_LIBC = None
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


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


def bound_malloc() -> None:
    """Keep glibc from holding freed activation and cache buffers. Its mmap threshold rises
    after every large free (up to 32 MB), so the caches that grow by a slot per step end up
    carved from the heap and never return: measured here, +78 MiB over 32 steps of a 16-block
    model, against +7 MiB with the threshold pinned at 128 KiB and two arenas. Process-wide,
    which a serving process is."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)


def trim_malloc() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): a build frees a
    part's weights and exports after each part, and pinning the mmap threshold as serving
    does (bound_malloc) would slow every allocation of the torch work around it by half
    (measured: 3.0 against 2.0 s for 3000 small linear layers)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def advise(ranges: list[tuple[int, int]], advice: int) -> None:
    """madvise each (address, length) range. ctypes lets go of the GIL, so the compute thread's
    ONNX Runtime calls go on meanwhile. Where the kernel lacks MADV_POPULATE_READ (before Linux
    5.14) the pages are faulted in by reading a byte of each (that holds the GIL)."""
    import ctypes
    libc = _libc()
    for start, length in ranges:
        if libc is not None and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0:
            continue
        if advice == POPULATE_READ:
            np.frombuffer((ctypes.c_char * length).from_address(start), dtype=np.uint8)[::4096].sum()
            continue
        errno = ctypes.get_errno() if libc is not None else 0
        raise BackendError(f"ort-paged: madvise({advice}) on ONNX Runtime's mapped weights failed "
                           f"({os.strerror(errno)}); pass streaming='mmap'")


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """The address ranges of this process that map `path` (Linux: /proc/self/maps)."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end - start))
    return found


def drop_mapped(path: str) -> None:
    """Every page of this process's mappings of `path` out of its memory."""
    advise(mapped_ranges(path), DONTNEED)


class _Slot:
    def __init__(self, nbytes: int):
        self.buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
        self.block: int | None = None
        self.pending = None  # the prefetch worker's Future bringing `block` in


class Streamer:
    """Brings streamed blocks' weights into memory, the next one ahead on a thread, at most
    SLOTS blocks at a time. Modes:

    "prepacked" (the default on CPU): every block has its own session over its prepacked
    weights, which ONNX Runtime maps from `part-NN.packed.bin`; a streamed block's mapped pages
    are faulted in ahead (MADV_POPULATE_READ on ONNX Runtime's own mapping, found in
    /proc/self/maps) and dropped after it ran (MADV_DONTNEED: they stay in the page cache,
    not in this process). A streamed block computes exactly as a resident one, prepacked.
    "mmap": the block's plain weights are fed as inputs from a read-only mapping of
    `part-NN.bin` (faulted in ahead, dropped after); no prepacking, as ONNX Runtime packs
    weights that are inputs on every run (measured: ~2.7x a resident block's time).
    "read": the file is read into one of SLOTS preallocated buffers (BMInf's swap slots, what
    a device copy needs) and fed as inputs.
    """

    MODES = ("prepacked", "mmap", "read")

    def __init__(self, directory: str, parts: list[dict], streamed: tuple[int, ...], slot_bytes: int, prefetch: bool,
                 mode: str):
        if mode not in self.MODES:
            raise BackendError(f"streaming mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.directory, self.parts, self.order, self.prefetch, self.mode = directory, parts, list(streamed), prefetch, mode
        self.slots = [_Slot(slot_bytes if mode == "read" else 0) for _ in range(SLOTS)] if streamed else []
        self.maps = {block: self._map(block) for block in streamed} if mode == "mmap" else {}
        # the (address, length) ranges paged per block: ONNX Runtime's mappings (prepacked), ours (mmap)
        self.ranges: dict[int, list[tuple[int, int]]] = {
            block: [(np.frombuffer(mapping, dtype=np.uint8).ctypes.data, parts[block]["weight_bytes_file"])]
            for block, mapping in self.maps.items()}
        self.bytes_read = 0
        # (lane, part name, start, end) per page-in when a timeline is recorded (bmc run --plot)
        self.events: list | None = None
        # one worker, first in first out: a block's drop runs before the bring-in queued after it
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="bmc-prefetch") if prefetch and streamed else None
        self._drops: list = []

    @property
    def overlapping(self) -> bool:
        """Page-ins run on a thread of their own, beside compute."""
        return self._worker is not None

    def track(self, block: int, path: str, before: list[tuple[int, int]]) -> int:
        """A streamed block's session was made over `path`: remember the mappings it added to
        those `before` (another session may map the same file) and drop their pages now (they
        come back when the block is next due); the bytes mapped."""
        earlier = set(before)
        ranges = [r for r in mapped_ranges(path) if r not in earlier]
        self.ranges[block] = ranges
        advise(ranges, DONTNEED)
        return sum(length for _, length in ranges)

    def _path(self, block: int) -> str:
        return os.path.join(self.directory, self.parts[block]["stem"] + ".bin")

    def _map(self, block: int):
        import mmap
        with open(self._path(block), "rb") as f:
            return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)

    def _read(self, slot: _Slot, block: int) -> None:
        start = time.perf_counter()
        self._bring_in(slot, block)
        if self.events is not None:
            self.events.append(("page-in", self.parts[block]["name"], start, time.perf_counter()))

    def _bring_in(self, slot: _Slot, block: int) -> None:
        if self.mode == "read":
            size = self.parts[block]["weight_bytes_file"]
            with open(self._path(block), "rb", buffering=0) as f:
                f.readinto(memoryview(slot.buffer)[:size])
        else:
            advise(self.ranges[block], POPULATE_READ)
            size = sum(length for _, length in self.ranges[block])
        self.bytes_read += size

    def _start(self, slot: _Slot, block: int) -> None:
        slot.block = block
        if self._worker is None:
            slot.pending = None
            self._read(slot, block)
        else:
            slot.pending = self._worker.submit(self._read, slot, block)

    def begin(self) -> None:
        """A forward pass starts: the first streamed block into slot 0."""
        if self.order:
            self._start(self.slots[0], self.order[0])

    def weights(self, block: int) -> dict[str, np.ndarray]:
        """Wait for the block's weights and start the next streamed block into the other slot;
        the weights to feed (none in prepacked mode: the session maps its own)."""
        position = self.order.index(block)
        slot = self.slots[position % SLOTS]
        if slot.block != block:
            self._start(slot, block)
        if slot.pending is not None:
            slot.pending.result()  # re-raises what went wrong on the worker
        while self._drops and self._drops[0].done():
            self._drops.pop(0).result()
        if position + 1 < len(self.order):
            self._start(self.slots[(position + 1) % SLOTS], self.order[position + 1])
        if self.mode == "prepacked":
            return {}
        source = self.maps[block] if self.mode == "mmap" else slot.buffer
        return {t["name"]: np.frombuffer(source, dtype=np.dtype(t["dtype"]), count=int(np.prod(t["shape"])),
                                         offset=t["offset"]).reshape(t["shape"]) for t in self.parts[block]["weights"]}

    def release(self, block: int) -> None:
        """The block ran: its mapped pages leave this process's memory (they stay in the page
        cache). On the worker, ahead of the next block it brings in: never more than SLOTS
        blocks in memory, and the compute thread does not wait on the drop."""
        if self.mode == "read":
            return  # the slot's buffer is reused by the block after next
        if self._worker is None:
            self._drop(block)
        else:
            self._drops.append(self._worker.submit(self._drop, block))

    def _drop(self, block: int) -> None:
        advise(self.ranges[block], DONTNEED)
