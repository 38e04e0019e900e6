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
