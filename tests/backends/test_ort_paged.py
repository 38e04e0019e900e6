"""ort-paged: the ONNX Runtime build equals the torch backend (fp32 within 1e-4, int8 within the
int8 pass's bound), greedy generation gives the torch reference's tokens, streamed blocks give
what resident ones give, and a damaged or under-budgeted build is refused before it runs."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bmc
from bmc.models import zoo
from bmc.backends import ort_paged
from bmc.errors import BackendError


def _torch_greedy(prog, prompt, steps):
    x = torch.tensor([prompt])
    for _ in range(steps):
        x = torch.cat([x, prog(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(prompt):].tolist()


# GPT with block 1 pruned to 2 of its 4 heads: blocks of different sizes page alike
PASSES = {"gpt-tiny": "prune-heads{heads=[1:0,1:3]}", "llama-tiny": ""}


# LLaMA (GQA, RoPE positions) runs with -m slow; its decode step is checked in CI by test_kv_cache.py
@pytest.fixture(scope="module", params=["gpt-tiny", pytest.param("llama-tiny", marks=pytest.mark.slow)])
def built(request, tmp_path_factory):
    import dataclasses
    torch.manual_seed(0)  # 3 blocks: more than the 2 swap slots, so a tight budget streams them
    model = zoo.build(dataclasses.replace(zoo.config(request.param), n_layer=3)).eval()
    passes = PASSES[request.param] or []
    reference = bmc.compile(copy.deepcopy(model), passes=passes, example_inputs=model.example_inputs(), dynamic=True)
    directory = str(tmp_path_factory.mktemp(request.param))
    served = bmc.compile(copy.deepcopy(model), passes=passes, example_inputs=model.example_inputs(), dynamic=True,
                         backend="ort-paged", directory=directory)
    return reference, served, directory


def test_outputs_and_greedy_tokens_equal_the_torch_backend(built):
    reference, served, _ = built
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(served(ids), reference(ids).detach(), atol=1e-4, rtol=1e-4)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]  # a batch of different lengths: left-padded
    assert served.generate(prompts, 32) == [_torch_greedy(reference, p, 32) for p in prompts]


def test_a_generation_step_computes_the_last_positions_logits_only(built):
    """The step's logits_positions: a prompt step gives the last position's logits (the head
    runs on that row only), equal to the whole sequence's last; the budget's reserve no longer
    counts every position's logits."""
    from bmc.backends.ort_paged import reserved_bytes
    _, served, _ = built
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4)).numpy()
    positions = np.broadcast_to(np.arange(12), (2, 12)).copy()
    logits, caches = served.step(ids, positions, np.ones((2, 12), dtype=np.int64), served.empty_cache(2))
    assert logits.shape == (2, 1, served.manifest["layout"]["vocab"])
    np.testing.assert_allclose(logits, served(ids)[:, -1:], atol=1e-5, rtol=1e-5)
    # the reserve's logits are [batch, vocab]: a vocabulary 1000x larger adds to it once per
    # sequence, not once per position
    vocab = served.manifest["layout"]["vocab"]
    huge = dict(served.manifest, layout=dict(served.manifest["layout"], vocab=1000 * vocab))
    assert reserved_bytes(huge, 8, 64) - reserved_bytes(served.manifest, 8, 64) == 2 * 8 * 999 * vocab * 4
    assert reserved_bytes(huge, 8, 64) - reserved_bytes(huge, 8, 32) == \
        reserved_bytes(served.manifest, 8, 64) - reserved_bytes(served.manifest, 8, 32)


def test_a_resident_step_writes_its_cache_in_place_with_the_copying_steps_numbers(built):
    """GroupQueryAttention given one buffer as past and present appends in place (no copy of
    the cache per layer and step): the same logits as the copying step, prompt and decode, on
    a left-padded batch; a caller's growing cache (zero positions to start) still works."""
    import onnx
    from bmc.backends import ort_cache
    _, served, directory = built
    runtime = served.runtime
    assert runtime.shares_cache and len(runtime.cache_pairs) == 2 * len(served.heads)
    ids, mask = np.array([[0, 0, 3, 1, 4], [9, 2, 6, 5, 3]]), np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = np.maximum(mask.cumsum(1) - 1, 0)

    def steps(caches, count=4):
        out, step_ids, step_mask, step_positions = [], ids, mask, positions
        for _ in range(count):
            logits, caches = served.step(step_ids, step_positions, step_mask, caches)
            out.append(logits)
            step_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            step_positions = step_positions[:, -1:] + 1
            step_mask = np.concatenate([step_mask, np.ones((2, 1), dtype=np.int64)], 1)
        return out, caches

    in_place, caches = steps(served.empty_cache(2, 5 + 3))
    assert caches[0].shape()[2] == 8  # the buffer it was given, filled in place
    with pytest.raises(BackendError, match="decode step failed"):  # its buffers hold two rows, not one
        served.step(ids[:1, :1], positions[:1, -1:] + 4, np.ones((1, 8), dtype=np.int64), caches)
    empty = [np.zeros((2, h, 0, d), np.float32) for h, d in zip(served.heads, served.head_dims) for _ in (0, 1)]
    growing, caches = steps(empty)
    assert caches[0].shape()[2] == 8  # the copying step's present grows by one each step
    for a, b in zip(in_place, growing):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    in_place_tokens = served.generate(prompts, 6)
    pairs, runtime.cache_pairs = runtime.cache_pairs, {}
    try:
        assert served.generate(prompts, 6) == in_place_tokens
    finally:
        runtime.cache_pairs = pairs

    # a graph that reads a past input any other way is not given a shared buffer
    model = onnx.load(os.path.join(directory, served.manifest["whole"]), load_external_data=False)
    past, presents = served.manifest["inputs"][3], served.manifest["outputs"][1:]
    caches_in = served.manifest["inputs"][3:3 + len(presents)]
    assert ort_cache.shared_cache_pairs(model, caches_in, presents)
    model.graph.node.append(onnx.helper.make_node("Shape", [past], ["past_shape"]))
    assert ort_cache.shared_cache_pairs(model, caches_in, presents) == {}


def _mapped_kib(ranges):
    """Rss and Anonymous kB of this process's mappings that start at one of `ranges`."""
    starts, rss, anonymous, current = {start for start, _ in ranges}, 0, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in starts
            elif current and head in ("Rss:", "Anonymous:"):
                kib = int(line.split()[1])
                rss, anonymous = (rss + kib, anonymous) if head == "Rss:" else (rss, anonymous + kib)
    return rss, anonymous


def test_streamed_blocks_under_a_budget_give_the_same_tokens(built):
    _, served, directory = built
    manifest = served.manifest
    # what a block holds: its weight file, or its prepacked weights (the larger, so both modes stream)
    held = [max(os.path.getsize(os.path.join(directory, p["stem"] + ".bin")), ort_paged.packed_bytes(directory, p))
            for p in manifest["parts"]]
    blocks = [h for h, p in zip(held, manifest["parts"]) if p["kind"] == "block"]
    fixed = sum(h for h, p in zip(held, manifest["parts"]) if p["kind"] != "block")
    reserve = ort_paged.reserved_bytes(manifest, 1, 48)
    if served.manifest["pipeline"]:
        assert len(set(blocks)) > 1  # the pruned block is smaller
    budget = fixed + 2 * max(blocks) + reserve  # room for the swap slots only: every block streams
    for prefetch, streaming in ((True, "prepacked"), (False, "prepacked"), (None, "prepacked"), (True, "mmap"),
                                (False, "mmap"), (True, "read")):
        paged = bmc.load(directory, budget=budget, max_len=48, prefetch=prefetch, streaming=streaming)
        assert paged.runtime.streamer.overlapping == bool(prefetch)  # None: threads=None takes every core
        assert paged.plan.streamed and not paged.plan.resident and paged.plan.weight_bytes <= budget - reserve
        assert paged.runtime.whole is None and served.runtime.whole is not None  # parts against the whole graph
        events = paged.runtime.record_timeline()
        assert paged.generate([[7, 7, 1]], 12) == served.generate([[7, 7, 1]], 12)
        _check_timeline(events, paged, steps=12)
        # each block writes its cache into the buffers empty_cache made (no new present per
        # step for the arena to grow by), with the copying step's numbers
        ids, positions, mask = np.array([[7, 7, 1]]), np.array([[0, 1, 2]]), np.ones((1, 3), dtype=np.int64)
        cache = paged.empty_cache(1)
        buffers = list(cache)
        logits, cache = paged.step(ids, positions, mask, cache)
        assert paged.runtime.part_pairs and all(a is b for a, b in zip(cache, buffers)), streaming
        empty = [np.zeros((1, h, 0, d), np.float32) for h, d in zip(paged.heads, paged.head_dims) for _ in (0, 1)]
        copied, grown = paged.step(ids, positions, mask, empty)
        assert grown[0].shape()[2] == 3
        np.testing.assert_allclose(logits, copied, rtol=1e-6, atol=1e-6)
        assert paged.runtime.streamer.bytes_read > 0
        if streaming == "prepacked":  # ONNX Runtime's own mappings were paged: out of memory after each run,
            for block in paged.plan.streamed:  # never copied on write (so dropping their pages loses nothing)
                ranges = paged.runtime.streamer.ranges[block]
                assert ranges and _mapped_kib(ranges) == (0, 0), (block, _mapped_kib(ranges))
    needed = fixed + 2 * max(blocks) + reserve
    with pytest.raises(BackendError, match=f"give --budget {needed} or more"):
        bmc.load(directory, budget=needed - 1, max_len=48)


def test_page_ins_overlap_compute_only_where_a_core_is_left_free(monkeypatch):
    monkeypatch.setattr(ort_paged, "usable_cores", lambda: 2)
    assert ort_paged.overlaps_paging(None, 1)
    assert not ort_paged.overlaps_paging(None, 2) and not ort_paged.overlaps_paging(None, None)
    assert ort_paged.overlaps_paging(True, 2) and not ort_paged.overlaps_paging(False, 1)


def _check_timeline(events, paged, steps):
    """The recorded timeline (bmc run --plot): every part computes once a step, each streamed
    block after waiting for its weights and after its page-in started; spans are ordered."""
    names = [p["name"] for p in paged.manifest["parts"]]
    streamed = {names[i] for i in paged.plan.streamed}
    computed = [e for e in events if e[0].startswith("compute")]
    assert [e[1] for e in computed] == names * steps
    assert {e[1] for e in computed if e[0] == "compute-streamed"} == streamed
    assert sum(e[0] == "wait" for e in events) == len(streamed) * steps
    assert {e[1] for e in events if e[0] == "page-in"} == streamed
    assert all(start <= end for _, _, start, end in events)
    for name in streamed:  # its first compute comes after its first page-in began
        first_in = min(e[2] for e in events if e[0] == "page-in" and e[1] == name)
        assert first_in <= min(e[2] for e in computed if e[1] == name)


def test_prepacked_weights_made_elsewhere_fall_back_to_weights_as_inputs(built, tmp_path, caplog):
    import json
    import logging
    import shutil
    _, served, directory = built
    moved = str(tmp_path / "moved")
    shutil.copytree(directory, moved)
    path = os.path.join(moved, "manifest.json")
    manifest = json.load(open(path))
    manifest["prepacked_for"] = "onnxruntime-0.0.0/riscv64/000000000000"
    json.dump(manifest, open(path, "w"))
    with caplog.at_level(logging.WARNING, logger="bmc"):
        paged = bmc.load(moved, max_len=48)
    assert paged.runtime.streaming == "mmap" and "made for onnxruntime-0.0.0/riscv64" in caplog.text
    assert paged.generate([[7, 7, 1]], 6) == served.generate([[7, 7, 1]], 6)
    with pytest.raises(BackendError, match="streaming='prepacked' is not available.*rebuild the directory here"):
        bmc.load(moved, streaming="prepacked")


def test_an_encoder_gives_the_torch_backends_hidden_states_resident_and_streamed(tmp_path):
    import dataclasses
    torch.manual_seed(0)  # 3 blocks: more than the 2 swap slots, so a tight budget streams them
    model = zoo.build(dataclasses.replace(zoo.config("bert-tiny"), n_layer=3)).eval()
    reference = bmc.compile(copy.deepcopy(model), example_inputs=model.example_inputs(), dynamic=True)
    directory = str(tmp_path / "bert")
    served = bmc.compile(copy.deepcopy(model), example_inputs=model.example_inputs(), dynamic=True,
                         backend="ort-paged", directory=directory)
    assert served.task == "encoder" and [p["kind"] for p in served.manifest["parts"]] == ["embed", "block", "block", "block"]
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    want = reference(ids).detach()
    torch.testing.assert_close(served(ids), want, atol=1e-4, rtol=1e-4)
    held = [ort_paged.packed_bytes(directory, p) for p in served.manifest["parts"]]
    budget = held[0] + 2 * max(held[1:]) + ort_paged.reserved_bytes(served.manifest, 3, 20)
    paged = bmc.load(directory, budget=budget, batch=3, max_len=20)
    assert paged.plan.streamed == (1, 2, 3)
    torch.testing.assert_close(paged(ids), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(BackendError, match="is an encoder"):
        served.generate([[1, 2]], 4)


def test_residency_spreads_kept_blocks_evenly():
    plan = ort_paged.plan_residency([10] * 8, fixed_bytes=5, budget=5 + 2 * 10 + 40, reserved=0)
    assert plan.resident == (0, 2, 5, 7) and plan.streamed == (1, 3, 4, 6)
    assert ort_paged.plan_residency([10] * 4, 5, None).streamed == ()


def test_int8_build_stays_within_the_int8_bound(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("gpt-tiny").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    fp32 = model(ids).detach()
    served = bmc.compile(copy.deepcopy(model), passes="quant-int8", example_inputs=model.example_inputs(),
                         dynamic=True, backend="ort-paged", directory=str(tmp_path / "int8"))
    assert served.manifest["quantized"] and served.manifest["int8_digits"] == 2  # act=none: two digits
    # the budget's reserve counts the two-digit products: four more of the widest values a token
    one_digit = dict(served.manifest, int8_digits=1)
    widest = served.manifest["widest_per_token"]
    assert ort_paged.reserved_bytes(served.manifest, 2, 16) - ort_paged.reserved_bytes(one_digit, 2, 16) == \
        4 * max(widest, max(max(t["shape"]) for p in served.manifest["parts"] if p["kind"] == "block"
                            for t in p["weights"] if t["shape"]), 4 * 16) * 2 * 16 * 4
    error = ((served(ids) - fp32).norm() / fp32.norm()).item()
    assert error < 0.01, error  # the quant-int8 pass's stated bound against fp32
    fp32_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "c_attn" in n or "c_fc" in n or "c_proj" in n)
    one_byte = [t for p in served.manifest["parts"] for t in p["weights"] if t["dtype"] in ("|i1", "|u1")]
    assert {t["dtype"] for t in one_byte} == {"|u1" if served.manifest["int8_weights"] == "u8" else "|i1"}
    assert sum(t["nbytes"] for t in one_byte) <= 0.26 * fp32_bytes


@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_the_cpu_build_multiplies_its_integers_exactly_on_this_cpu(tmp_path, act):
    """The ONNX Runtime graph bmc::int8_linear becomes on the CPU (activations quantized per
    token, one int8 digit for act=dynamic, two for act=none, + MatMulInteger) equals its own
    arithmetic done exactly, and torch's op within what the digits allow, on inputs built to
    saturate: u8 activations of 255 against weights of 127 in adjacent columns, whose pair sum
    2 * 255 * 127 overflows the int16 that x86's u8 x s8 kernels without VNNI (vpmaddubsw) add
    pairs into. The build feeds u8 weights there. A row's result does not depend on the other
    rows of the batch."""
    import numpy as np
    import onnxruntime as ort
    from bmc.backends import ort_lower, ort_ops
    from bmc.backends.ort_artifacts import int8_weight_format
    from bmc.passes.quant_int8 import quantize

    class Linear(torch.nn.Module):
        def __init__(self, q, scale, bias):
            super().__init__()
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
            self.register_buffer("bias", bias)

        def forward(self, x):
            return torch.ops.bmc.int8_linear(x, self.q, self.scale, self.bias, act)

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    w[:, :16] = w.abs().amax() + 1  # every row's absmax: q = 127 in the first 16 columns
    q, scale = quantize(w, "row")
    x = torch.rand(2, 24, 256, generator=g) * 2 - 1
    x[..., :16], x[0, 0, 16] = 1.0, -1.0  # u8 255 (zero point 128) against those 127s
    x[1, 3] *= 50  # one loud token: it must not coarsen the others' quantization
    x[1, 5, 20] = 30.0  # an outlier channel in another
    weights = int8_weight_format()
    with torch.no_grad():
        program = torch.onnx.export(Linear(q, scale, b).eval(), (x,), dynamo=True, input_names=["x"],
                                    custom_translation_table=ort_ops._int8_translation(False, weights))
    model = program.model_proto
    if weights == "u8":
        ort_lower.fold_integer_weights(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.numpy()})[0]
    # symmetric int8 digits per token, then the integer product, in float64 / int64
    xs = x.numpy().astype(np.float64)
    x_scale = np.maximum(np.abs(xs).max(-1, keepdims=True), 1e-8) / 127
    high = np.clip(np.rint(xs / x_scale), -127, 127)
    digits = [high] if act == "dynamic" else [high, np.clip(np.rint((xs / x_scale - high) * 254), -127, 127)]
    integers = [(d.astype(np.int64) @ q.numpy().astype(np.int64).T).astype(np.float64) for d in digits]
    product = integers[0] if act == "dynamic" else integers[0] + integers[1] / 254
    exact = product * x_scale * scale.numpy().astype(np.float64) + b.numpy()
    error = np.abs(out - exact).max() / np.abs(exact).max()
    assert error < 1e-5, (weights, error)
    in_torch = torch.ops.bmc.int8_linear(x, q, scale, b, act).numpy()  # act=none: weight-only
    assert np.abs(out - in_torch).max() / np.abs(in_torch).max() < (1e-5 if act == "dynamic" else 1e-3)
    quiet = x.numpy().copy()
    quiet[1, 3] /= 50  # the same batch without its loud token: row 0 comes out the same
    assert np.array_equal(session.run(None, {"x": quiet})[0][0], out[0])


def test_a_saved_build_loads_in_a_fresh_process_and_damage_is_caught(built, tmp_path):
    _, served, _ = built
    saved = str(tmp_path / "served")
    served.save(saved)
    code = ("import bmc, json, sys; p = bmc.load(%r); print(json.dumps(p.generate([[1, 2, 3]], 8)));"
            "sys.exit(3 if 'torch' in sys.modules else 0)" % saved)  # serving never imports torch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().splitlines()[-1] == str(served.generate([[1, 2, 3]], 8)).replace("'", '"')
    weights = os.path.join(saved, "part-01.bin")
    data = bytearray(open(weights, "rb").read())
    data[100] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ort_paged.ArtifactError, match="part-01.bin does not match its checksum"):
        bmc.load(saved)
    os.remove(weights)
    with pytest.raises(ort_paged.ArtifactError, match="part-01.bin is missing"):
        bmc.load(saved)
    with pytest.raises(ort_paged.ArtifactError, match="manifest.json is missing"):
        bmc.load(str(tmp_path))


def test_sampling_is_seeded_and_stops_at_eos(built):
    _, served, _ = built
    a = served.generate([[5, 6, 7]], 10, temperature=1.0, top_k=20, seed=3)
    assert a == served.generate([[5, 6, 7]], 10, temperature=1.0, top_k=20, seed=3)
    # and the other direction: the seed and the temperature change what is drawn
    assert a != served.generate([[5, 6, 7]], 10, temperature=1.0, top_k=20, seed=4)
    assert a != served.generate([[5, 6, 7]], 10)
    first = served.generate([[5, 6, 7]], 1)[0][0]
    assert served.generate([[5, 6, 7]], 10, eos=first) == [[first]]
    streamed = [tokens for tokens in served.generate([[5, 6, 7], [1]], 4, stream=True)]
    assert len(streamed) == 4 and all(len(t) == 2 for t in streamed)
    with pytest.raises(bmc.BmcError, match="exceeds the model's 64 positions"):
        served.generate([[1] * 60], 10)


def test_u8_weights_where_x86_has_no_exact_u8s8_dot_product():
    from bmc.backends.ort_artifacts import int8_weight_format
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert int8_weight_format(avx2, "x86_64") == "u8"
    assert int8_weight_format(avx2 | {"avx512f", "avx512bw"}, "x86_64") == "u8"  # AVX-512 without VNNI: vpmaddubsw too
    assert int8_weight_format(avx2 | {"avx512f", "avx512_vnni"}, "x86_64") == "s8"
    assert int8_weight_format(avx2 | {"avx_vnni"}, "x86_64") == "s8"
    assert int8_weight_format({"asimd", "asimddp"}, "aarch64") == "s8"


def test_a_build_without_a_directory_is_removed_with_its_program():
    import gc
    torch.manual_seed(0)
    model = zoo.build(zoo.config("gpt-tiny")).eval()
    served = bmc.compile(model, example_inputs=model.example_inputs(), dynamic=True, backend="ort-paged")
    directory = served.directory
    assert os.path.isfile(os.path.join(directory, "manifest.json"))
    del served
    gc.collect()
    assert not os.path.exists(directory)


def test_the_gpu_lowering_in_standard_ops_gives_the_cpu_builds_tokens(built, tmp_path, caplog):
    """A GPU build writes its attention as standard ONNX ops (GroupQueryAttention wants fp16
    there); run here on the CPU provider, it gives what the CPU build (GroupQueryAttention) gives."""
    reference, served, _ = built
    gpu_build = str(tmp_path / "gpu")
    ort_paged.build(reference.graph_module, gpu_build, gpu=True)
    on_cpu = bmc.load(gpu_build, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(on_cpu(ids), served(ids), atol=1e-4, rtol=1e-4)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    assert on_cpu.generate(prompts, 12) == served.generate(prompts, 12)


def test_streaming_blocks_pages_the_embedding_by_rows(tmp_path):
    """Under a budget that streams blocks, the embedding table is counted as the rows a step can
    look up, not the table; its pages leave memory after every step, and tokens do not change."""
    import dataclasses
    torch.manual_seed(0)
    model = zoo.build(dataclasses.replace(zoo.config("gpt-tiny"), n_layer=3, vocab_size=2048)).eval()
    directory = str(tmp_path / "served")
    served = bmc.compile(model, example_inputs=model.example_inputs(), dynamic=True, backend="ort-paged",
                         directory=directory)
    manifest, max_len = served.manifest, 8
    held = [ort_paged.packed_bytes(directory, p) for p in manifest["parts"]]
    blocks = [h for h, p in zip(held, manifest["parts"]) if p["kind"] == "block"]
    embed = next(i for i, p in enumerate(manifest["parts"]) if p["kind"] == "embed")
    tables, rows = ort_paged.row_paged(directory, manifest["parts"][embed], 1, max_len)
    assert tables and rows < held[embed] // 4  # 8 rows' pages against a 2048-row table
    fixed = sum(h for h, p in zip(held, manifest["parts"]) if p["kind"] != "block") - held[embed] + rows
    needed = fixed + 2 * max(blocks) + ort_paged.reserved_bytes(manifest, 1, max_len)
    paged = bmc.load(directory, budget=needed, max_len=max_len)
    assert paged.plan.streamed and embed in paged.runtime.table_ranges
    assert paged.generate([[7, 300, 1500]], 4) == served.generate([[7, 300, 1500]], 4)
    assert _mapped_kib(paged.runtime.table_ranges[embed]) == (0, 0)  # dropped after the last step
    with pytest.raises(BackendError, match=f"give --budget {needed} or more"):
        bmc.load(directory, budget=needed - 1, max_len=max_len)


def test_the_reserve_warning_names_what_exceeds_it():
    """Two prompts on a reserve sized for one: the batch is named, not the positions."""
    from bmc.backends.ort_paged import reserve_excess
    assert reserve_excess(2, 35, 1, 64) == ("2 prompts", "batch=1", "batch=2")
    assert reserve_excess(1, 80, 1, 64) == ("80 positions (prompt + new tokens)", "max_len=64", "max_len=80")
    assert reserve_excess(3, 80, 2, 64)[2] == "batch=3 and max_len=80"
    assert reserve_excess(1, 64, 1, 64) is None
