"""ort-paged builds of a sharded Hugging Face checkpoint read it block by block (bmc/ir/deferred.py):
the build equals the one made from the loaded model, byte for byte; its peak memory, measured
from outside, does not grow with the depth; a disk without room is refused before anything is
written, with the number; a build that fails half-way leaves no directory."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import bmc  # noqa: E402
from bmc.backends import ort_paged  # noqa: E402
from bmc.cli import opt  # noqa: E402
from bmc.errors import BackendError  # noqa: E402
from bmc.models import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "tools" / "make_checkpoint.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def _checkpoint(root, shape: str, layers: int, shard: str) -> Path:
    out = root / f"{shape}-{layers}"
    make.make_checkpoint(shape, out, layers=layers, shard_bytes=make.parse_size(shard), progress=False)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # 4 blocks in 10 shards (8 blocks measured the same; 4 keep CI's time)
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), "llama-tiny", 4, "60KB")


def _weight_files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.suffix == ".bin"}


def test_a_streamed_build_equals_the_build_of_the_loaded_model(sharded, tmp_path):
    shards = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= 6
    pipeline = ["prune-ffn{ratio=0.25}", "quant-int8"]
    # without the prepacked form (ONNX Runtime's own packing of the same weights): 40 -> 30 s
    streamed = bmc.compile(f"hf:{sharded}", passes=pipeline, backend="ort-paged", directory=str(tmp_path / "s"),
                           prepacked=False)
    loaded = hf.load_graph(f"hf:{sharded}", device="cpu", dtype=torch.float32)
    whole = bmc.compile(loaded, passes=pipeline, backend="ort-paged", directory=str(tmp_path / "w"), max_len=256,
                        prepacked=False)
    assert _weight_files(tmp_path / "s") == _weight_files(tmp_path / "w")
    ids = np.random.RandomState(0).randint(0, 512, (2, 9))
    assert np.array_equal(np.asarray(streamed(ids)[0]), np.asarray(whole(ids)[0]))
    assert streamed.generate([[5, 6, 7]], max_new_tokens=6) == whole.generate([[5, 6, 7]], max_new_tokens=6)


def _peak_rss_of_build(checkpoint: Path, out: Path) -> int:
    """bmc-opt's build in a process of its own; its peak RSS as the kernel counted it (wait4)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.stderr", "w+") as err:  # a file, not a pipe nobody drains
        proc = subprocess.Popen([sys.executable, "-m", "bmc.cli.opt", f"hf:{checkpoint}", "--pass=quant-int8",
                                 "--backend=ort-paged", "-o", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, err.read()[-2000:]
    return usage.ru_maxrss * 1024


def test_peak_build_memory_does_not_grow_with_depth(tmp_path):
    # blocks of 12.6 MB in fp32: a build that held its model would grow 150 MB from 4 to 16
    # blocks (measured: 774 MB at 16 blocks loaded whole; streamed 558 MB at 4, 574 MB at 16)
    four, sixteen = (_checkpoint(tmp_path, "llama-small", n, "20MB") for n in (4, 16))
    assert len(json.loads((sixteen / "model.safetensors.index.json").read_text())["weight_map"]) > 100
    small = _peak_rss_of_build(four, tmp_path / "b4")
    deep = _peak_rss_of_build(sixteen, tmp_path / "b16")
    twelve_blocks = 12 * 4 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1536)  # fp32 bytes
    assert deep < small * 1.10 and deep - small < twelve_blocks / 2, (small, deep, twelve_blocks)
    assert ort_paged.load(str(tmp_path / "b16")).generate([[1, 2, 3]], max_new_tokens=3)


def test_a_disk_without_room_is_refused_with_the_number_before_anything_is_written(sharded, tmp_path,
                                                                                  monkeypatch, capsys):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "build"
    code = opt.main([f"hf:{sharded}", "--pass=quant-int8", "--backend=ort-paged", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs about" in err and "GB free" in err and "--no-prepacked" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bmc-staging")]


def test_a_build_that_fails_half_way_leaves_no_directory(sharded, tmp_path, monkeypatch, capsys):
    from bmc.backends import ort_lower
    written = []
    real = ort_lower.split_weights

    def failing(proto, path):
        written.append(path)
        if len(written) == 4:
            raise BackendError("ort-paged: the disk went away (a test)")
        return real(proto, path)
    monkeypatch.setattr(ort_lower, "split_weights", failing)
    out = tmp_path / "build"
    assert opt.main([f"hf:{sharded}", "--pass=quant-int8", "--backend=ort-paged", "-o", str(out),
                     "--no-prepacked"]) == 2
    assert "the disk went away" in capsys.readouterr().err
    assert len(written) == 4 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bmc-staging")]


def test_the_disk_estimate_counts_the_weights_as_built(sharded):
    graph = hf.load_graph(f"hf:{sharded}", device="deferred", dtype=torch.float32)
    weights = sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))
    assert ort_paged.build_bytes(graph, prepacked=True) == int(weights * 3 * 1.125)
    assert ort_paged.build_bytes(graph, prepacked=False) == int(weights * 1.125)
    import shutil
    from collections import namedtuple
    from unittest import mock
    with mock.patch.object(shutil, "disk_usage", return_value=namedtuple("usage", "total used free")(1, 1, 0)):
        with pytest.raises(BackendError, match="needs about"):
            ort_paged.check_disk_room(graph, "/tmp/nowhere/x", prepacked=False)
