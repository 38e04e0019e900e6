"""tools/bench/serve_hf.py runs as its docstring says, on a small checkpoint: onnxruntime-genai's
builds and bmc's side by side, each run in a fresh process of its own (--isolate), every row of
the table measured, and bmc fp32's greedy tokens equal to genai fp32's."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # trains a tokenizer and runs genai's model builder twice: ~40 s
def test_the_serving_benchmark_runs_isolated_on_a_small_checkpoint(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    command = [sys.executable, os.path.join(ROOT, "tools", "bench", "serve_hf.py"), "--layers", "2", "--width", "128",
               "--heads", "4", "--kv-heads", "2", "--vocab", "1000", "--repeat", "1", "--batches", "1", "--isolate",
               "--keep", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^\| (onnxruntime-genai \w+|bmc [^|]+) \| ([\d.]+) ms \| ([\d.]+) \|", done.stdout, re.M)
    assert {name.strip() for name, _, _ in rows} >= {"onnxruntime-genai fp32", "onnxruntime-genai int8", "bmc fp32",
                                                      "bmc int8", "bmc int8, head too"}, done.stdout
    assert all(float(ttft) > 0 and float(tok_s) > 0 for _, ttft, tok_s in rows)
    assert "greedy tokens of bmc fp32 and onnxruntime-genai fp32 equal: True" in done.stdout
