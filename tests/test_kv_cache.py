"""The decode step derived from a traced causal LM: prefill then one token at a time with the
cache gives the full forward's logits, and left-padded rows give their unpadded logits."""
import pytest
import torch

import bmc
from bmc.serve import kv_cache
from bmc.models import zoo


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_cached_steps_equal_the_full_forward(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    step, layout = kv_cache.decode_step(bmc.trace(model, model.example_inputs(), dynamic=True))
    assert layout.layers == 2 and layout.max_positions == 64
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache, logits, past = kv_cache.empty_cache(layout, 2), [], 0
    for chunk in (ids[:, :4], ids[:, 4:5], ids[:, 5:6], ids[:, 6:7]):
        new = chunk.shape[1]
        inputs = (chunk, torch.arange(past, past + new).expand(2, new), torch.ones(2, past + new, dtype=torch.long),
                  *cache)
        out = step(*inputs, torch.arange(new))
        logits.append(out[0])
        # the last position's logits alone (what generation asks for), the same caches
        last = step(*inputs, torch.tensor([new - 1]))
        assert last[0].shape[1] == 1  # one row through the head instead of T: the same up to float reassociation
        torch.testing.assert_close(last[0], out[0][:, -1:], atol=1e-6, rtol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(last[1:], out[1:]))
        cache, past = list(out[1:]), past + new
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)
    # row 1 left-padded by two: its real tokens see only themselves
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :5]], 1)])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    out = step(batch, (mask.cumsum(1) - 1).clamp(min=0), mask, *kv_cache.empty_cache(layout, 2), torch.arange(7))[0]
    torch.testing.assert_close(out[1, 2:], model(ids[1:, :5])[0], atol=1e-5, rtol=1e-5)


def test_models_the_cache_cannot_follow_are_refused():
    class NotCausal(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)
    gm = bmc.trace(NotCausal(), (torch.randn(1, 2, 4, 8),))
    with pytest.raises(kv_cache.CacheError, match="token ids"):
        kv_cache.decode_step(gm)
