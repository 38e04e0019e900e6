"""A model torch.export cannot capture (a Python branch on a tensor), for error tests. It
lives in its own module so a pickled instance can be loaded by a bmc-opt subprocess."""
import torch


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if self.lin(x).sum() > 0:
            return x
        return -x
