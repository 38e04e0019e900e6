"""A small LM whose projections are written as matmuls by a weight, not nn.Linear: the third
projection form the structure analysis knows (x @ W.t() with W stored (out, in), and x @ W with
W stored (in, out)), for the tests of the passes that rewrite projections."""
import torch
from torch import nn

VOCAB, WIDTH, FFN, SEQ = 64, 32, 96, 8


class MatmulMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(FFN, WIDTH) / WIDTH ** 0.5)  # (out, in), used as x @ up.t()
        self.up_bias = nn.Parameter(torch.randn(FFN) * 0.1)
        self.gate = nn.Parameter(torch.randn(FFN, WIDTH) / WIDTH ** 0.5)  # (out, in), used as x @ gate.T
        self.down = nn.Parameter(torch.randn(FFN, WIDTH) / FFN ** 0.5)  # (in, out), used as h @ down

    def forward(self, x):
        up = x @ self.up.t() + self.up_bias
        gate = torch.matmul(x, self.gate.T)
        return (torch.nn.functional.silu(gate) * up) @ self.down


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = MatmulMLP()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MatmulLM(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Parameter(torch.randn(WIDTH, VOCAB) / WIDTH ** 0.5)  # (in, out)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.norm(x) @ self.head


HEADS, KV_HEADS = 4, 2
HEAD_DIM = WIDTH // HEADS


class MatmulAttention(nn.Module):
    """GQA attention whose q/k/v/o are matmuls by weights in both storage orders, biases added
    after the product on either side (q and v stored (out, in), k and o stored (in, out))."""

    def __init__(self):
        super().__init__()
        kv = KV_HEADS * HEAD_DIM
        self.q = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH ** 0.5)  # (out, in), x @ q.t()
        self.q_bias = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.k = nn.Parameter(torch.randn(WIDTH, kv) / WIDTH ** 0.5)  # (in, out), x @ k
        self.k_bias = nn.Parameter(torch.randn(kv) * 0.1)
        self.v = nn.Parameter(torch.randn(kv, WIDTH) / WIDTH ** 0.5)  # (out, in), x @ v.T
        self.v_bias = nn.Parameter(torch.randn(kv) * 0.1)
        self.o = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH ** 0.5)  # (in, out), h @ o
        self.o_bias = nn.Parameter(torch.randn(WIDTH) * 0.1)

    def forward(self, x):
        b, t, _ = x.shape
        q = (x @ self.q.t() + self.q_bias).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = (self.k_bias + x @ self.k).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = torch.matmul(x, self.v.T).add(self.v_bias).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        group = HEADS // KV_HEADS  # each kv head repeated for its query heads, as HF's repeat_kv does
        k = k[:, :, None].expand(b, KV_HEADS, group, t, HEAD_DIM).reshape(b, HEADS, t, HEAD_DIM)
        v = v[:, :, None].expand(b, KV_HEADS, group, t, HEAD_DIM).reshape(b, HEADS, t, HEAD_DIM)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h.transpose(1, 2).reshape(b, t, WIDTH) @ self.o + self.o_bias


class AttentionBlock(Block):
    def __init__(self):
        super().__init__()
        self.attn_norm = nn.LayerNorm(WIDTH)
        self.attn = MatmulAttention()

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return super().forward(x)


def build_with_attention(seed: int = 0) -> MatmulLM:
    """MatmulLM whose blocks also hold a matmul-form GQA attention (for tp and prune-heads)."""
    torch.manual_seed(seed)
    model = MatmulLM()
    model.layers = nn.ModuleList(AttentionBlock() for _ in model.layers)
    return model.eval()


def build(seed: int = 0) -> MatmulLM:
    torch.manual_seed(seed)
    return MatmulLM().eval()


def example_inputs(batch: int = 2, seq: int = SEQ, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=gen),)


class SlicedGateUp(nn.Module):
    """A fused gate|up taken apart by slices (h[..., :FFN], h[..., FFN:])."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(WIDTH, 2 * FFN)
        self.down = nn.Linear(FFN, WIDTH)

    def forward(self, x):
        h = self.gate_up(x)
        return self.down(torch.nn.functional.silu(h[..., :FFN]) * h[..., FFN:])


def build_sliced_gate_up(seed: int = 0) -> MatmulLM:
    model = build(seed)
    for block in model.layers:
        block.mlp = SlicedGateUp()
    return model


class InterleavedGateUp(SlicedGateUp):
    """A fused gate|up whose gate and up features alternate (h[..., 0::2], h[..., 1::2])."""

    def forward(self, x):
        h = self.gate_up(x)
        return self.down(torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2])


def build_interleaved_gate_up(seed: int = 0) -> MatmulLM:
    model = build(seed)
    for block in model.layers:
        block.mlp = InterleavedGateUp()
    return model
