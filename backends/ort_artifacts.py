"""The files of an ort-paged build that serving reads without torch: checksums, the machine
key prepacked weights are valid for, and the size below which initializers stay in a graph.
ort_lower.py (which needs torch) writes them; ort_paged.py (which must not, so a serving
process stays ~200 MiB smaller) reads them."""
from __future__ import annotations

import hashlib
import platform

from bmc.checksums import sha256  # noqa: F401 - the builds' checksums, re-exported to ort_lower / ort_paged

SMALL = 1024  # bytes: constants below this (shapes, slice bounds, scalars) stay in the graph, where
# ONNX Runtime's shape inference reads them; everything larger is a weight and is paged


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo's first `flags` line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_key() -> str:
    """What prepacked weights are valid for: the ONNX Runtime version and the CPU's vector
    extensions (its kernels, chosen by them, fix the packed layout)."""
    import onnxruntime as ort
    flags = " ".join(sorted(x for x in cpu_flags()
                            if x.startswith(("avx", "amx", "sse", "fma", "f16c", "neon", "asimd", "sve"))))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"onnxruntime-{ort.__version__}/{platform.machine()}/{digest}"


INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 extensions with an exact u8 x s8 dot product


def saturating_u8s8(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 integer GEMM (MatMulInteger, DynamicQuantizeMatMul with
    int8 weights) loses products on this CPU. On x86 without VNNI/AMX its kernels (MLAS AVX2,
    AVX-512 BW) multiply with vpmaddubsw, which adds each adjacent pair of u8*s8 products into
    an int16 with saturation: |a0*w0 + a1*w1| can reach 2*255*127 = 64770 > 32767, and asymmetric
    u8 activations sit around 128, so full-range int8 weights saturate (measured: 5x the
    quantization error of the exact product on gpt-tiny's c_attn/c_fc). VNNI's vpdpbusd and
    AMX sum into int32 exactly; other architectures' kernels widen first."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not (set(INT8_DOT) & (cpu_flags() if flags is None else flags))


def int8_weight_format(flags: set[str] | None = None, machine: str | None = None) -> str:
    """How CPU builds hand int8 weights to ONNX Runtime: "s8" (int8 as they are, the u8 x s8
    kernels) where those are exact, else "u8" (int8 + 128 with zero point 128: the same
    integers, run by the u8 x u8 kernels, which widen to int16 before multiplying and never
    saturate)."""
    return "u8" if saturating_u8s8(flags, machine) else "s8"


def error_line(exc: BaseException) -> str:
    """ONNX Runtime's message, first line: its exceptions carry the whole graph context."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def open_session(model, options, providers, what: str):
    """An ONNX Runtime session over `model` (a path or serialized bytes); ONNX Runtime's own
    exception (a graph it rejects, a provider it lacks) becomes one BackendError line naming
    `what` it was opening."""
    import onnxruntime as ort
    from bmc.errors import BackendError
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported kinds
        raise BackendError(f"ort-paged: ONNX Runtime refused {what}: {error_line(exc)}; rebuild the directory with this "
                           f"bmc, or report the model") from exc
