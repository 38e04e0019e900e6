"""tools/recipes/train_compress_serve.py at small scale, end to end: a zoo GPT and an HF LLaMA
trained on 2 ranks, pruned, distilled, quantized and served, each build's lineage running from
the training run to the build, every link holding, a flipped byte anywhere caught."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bmc
from bmc.errors import BmcError
from bmc.lineage import check_chain
from bmc.models import weights

ROOT = Path(__file__).resolve().parents[2]


# end to end over what tests of their own check one by one (training, pruning, distillation,
# int8, serving, lineage): 50 s, so with -m slow
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("recipe")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "recipes" / "train_compress_serve.py"), "--small",
                           "--repeat", "1", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "results.json").read_text())


def test_the_recipe_prints_every_stage_for_both_models(recipe):
    _, shown, results = recipe
    assert [r["model"] for r in results] == ["gpt", "llama"]
    for result in results:
        assert list(result["perplexity"]) == ["trained (fp32)", "pruned", "pruned + distilled", "+ int8 (torch)",
                                              "served int8 build"]
        sizes = result["weight_bytes"]
        assert sizes["pruned"] < sizes["trained (fp32)"] and sizes["served int8 build"] < sizes["pruned + distilled"]
        # the build serves what the int8 torch program computes (same weights, same int8 arithmetic)
        torch_int8, served = result["perplexity"]["+ int8 (torch)"], result["perplexity"]["served int8 build"]
        assert abs(served / torch_int8 - 1) < 0.01, (torch_int8, served)
        assert all(v > 0 for v in result["tokens_per_s"].values())
    assert shown.count("| served int8 build |") == 2


def test_each_builds_lineage_runs_from_training_to_the_build(recipe):
    out, _, results = recipe
    for result in results:
        lineage = bmc.load(result["served"]).lineage
        assert [s["kind"] for s in lineage] == ["train", "compile", "distill", "build"]
        assert lineage[0]["world_size"] == 2 and lineage[0]["pipeline"] == "zero3,ckpt"
        assert "prune-heads" in lineage[1]["pipeline"] and lineage[1]["calibration"]["batches"] == 4
        assert not check_chain(lineage)
        # the first step's checksums are the weights directory's files as they are now
        recorded = lineage[0]["files"]
        on_disk = json.loads((Path(result["weights"]) / weights.LINEAGE).read_text())["steps"][-1]["files"]
        assert recorded == on_disk


def _flip(path: Path) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    return original


def test_a_flipped_byte_in_any_steps_file_is_caught(recipe):
    _, _, results = recipe
    result = results[0]
    trained = Path(result["weights"])
    for name in json.loads((trained / weights.LINEAGE).read_text())["steps"][-1]["files"]:
        original = _flip(trained / name)
        with pytest.raises(BmcError, match="does not match the checksum"):
            weights.lineage_of(trained)
        (trained / name).write_bytes(original)
    served = Path(result["served"])
    manifest = json.loads((served / "manifest.json").read_text())
    for name in list(manifest["files"])[:3] + [n for n in manifest["files"] if n.endswith(".bin")][-1:]:
        original = _flip(served / name)
        with pytest.raises(BmcError, match="does not match its checksum"):
            bmc.load(str(served))
        (served / name).write_bytes(original)
    bmc.load(str(served))
