"""The files of an ort-paged build that serving reads without torch: checksums, the machine
key prepacked weights are valid for, and the size below which initializers stay in a graph.
ort_lower.py (which needs torch) writes them; ort_paged.py (which must not, so a serving
process stays ~200 MiB smaller) reads them."""
from __future__ import annotations

import hashlib
import platform

SMALL = 1024  # bytes: constants below this (shapes, slice bounds, scalars) stay in the graph, where
# ONNX Runtime's shape inference reads them; everything larger is a weight and is paged


def machine_key() -> str:
    """What prepacked weights are valid for: the ONNX Runtime version and the CPU's vector
    extensions (its kernels, chosen by them, fix the packed layout)."""
    import onnxruntime as ort
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(x for x in line.split(":", 1)[1].split()
                                            if x.startswith(("avx", "amx", "sse", "fma", "f16c", "neon", "asimd", "sve"))))
                    break
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"onnxruntime-{ort.__version__}/{platform.machine()}/{digest}"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
