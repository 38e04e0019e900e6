"""rewrite/slot_rotary.py: RoPE moved into the cached attention, rotating by cache slot, gives
the positions' logits on a left-padded batch generated token by token (rows whose slots and
positions differ); tables that do not rotate by an angle linear in the position are left as
they were; and the serving side's check of the precondition (left-padded masks, positions that
count the tokens)."""
import numpy as np
import pytest
import torch

import bmc
from bmc.backends.ort_paged import slot_positions_hold
from bmc.rewrite.rotary import fuse_rotaries
from bmc.rewrite.slot_rotary import SLOT_ROTARY_ATTENTION, _linear_angles, fuse_slot_rotaries
from bmc.serve import generate, kv_cache

transformers = pytest.importorskip("transformers")
VOCAB = 97


def _step(kind):
    config = kind(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # head size 16
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gm = bmc.compile(model, example_inputs=(torch.zeros(2, 8, dtype=torch.long),), dynamic=True).graph_module
    step, layout = kv_cache.decode_step(gm, 64)
    placeholders = {p.name: p for p in step.graph.find_nodes(op="placeholder")}
    assert fuse_rotaries(step, placeholders["input_ids"]) == 4
    return step, layout, placeholders["position_ids"]


def _logits_of_a_generation(step, layout, prompts, new=6):
    """Each step's logits, generating greedily from left-padded prompts with the step in torch."""
    seen = []

    def run(ids, positions, mask, caches):
        ids, positions, mask = (torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, positions, mask))
        logits, *caches = step(ids, positions, mask, *caches, torch.tensor([ids.shape[1] - 1]))
        seen.append(logits.detach().numpy())
        return seen[-1], caches

    def empty(batch):
        return [torch.zeros(batch, h, 0, d) for h, d in zip(layout.heads, layout.head_dims) for _ in (0, 1)]
    generate.generate(run, empty, prompts, max_new_tokens=new)
    return seen


@pytest.mark.parametrize("kind", [transformers.LlamaConfig, transformers.Qwen2Config])
def test_rotating_by_slot_gives_the_positions_logits_on_a_left_padded_batch(kind):
    step, layout, positions = _step(kind)
    prompts = [[5, 17, 33, 9, 60, 7, 2], [42, 8, 3], [11, 12, 13, 14, 15]]
    expected = _logits_of_a_generation(step, layout, prompts)
    assert fuse_slot_rotaries(step, positions, 64) == 2
    ops = {n.target for n in step.graph.nodes if n.op == "call_function"}
    assert SLOT_ROTARY_ATTENTION in ops and torch.ops.bmc.rotary.default not in ops
    got = _logits_of_a_generation(step, layout, prompts)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_tables_not_linear_in_the_position_stay_as_they_were():
    step, _, positions = _step(transformers.LlamaConfig)
    with step.graph.inserting_after(positions):  # RoPE of p * p: slots and positions no longer differ by a constant
        squared = step.graph.call_function(torch.ops.aten.mul.Tensor, (positions, positions))
    positions.replace_all_uses_with(squared, delete_user_cb=lambda user: user is not squared)
    step.recompile()
    assert fuse_slot_rotaries(step, positions, 64) == 0


def test_linear_angles_are_told_from_others():
    angles = torch.arange(64.0).unsqueeze(1) * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
    assert _linear_angles(torch.cos(angles), torch.sin(angles))
    assert _linear_angles(0.7 * torch.cos(angles), 0.7 * torch.sin(angles))  # HF's attention_scaling
    assert not _linear_angles(torch.cos(angles * angles), torch.sin(angles * angles))
    assert not _linear_angles(torch.cos(angles), torch.sin(angles) * 0.5)


def test_the_precondition_slots_need_is_checked():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prompt = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert slot_positions_hold(prompt, mask)
    assert slot_positions_hold(np.array([[3], [5]]), np.concatenate([mask, [[1], [1]]], 1))  # a decode step
    assert not slot_positions_hold(np.array([[2], [5]]), np.concatenate([mask, [[1], [1]]], 1))  # not counting
    holed = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # padding after a token
    assert not slot_positions_hold(np.array([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]), holed)
