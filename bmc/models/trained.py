"""Trained reference weights shipped with bmc (safetensors, never pickle), and how to save more.

    model = trained.load("gpt-mini")     # zoo gpt-mini trained on the standard library's sources

The checkpoint is made by tools/train_reference.py; compression accuracy is measured on it,
since random weights hide outliers and head importance.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from bmc.models import zoo
from bmc.errors import ZooError
from bmc.ir.serialize import atomic_write

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINTS = {"gpt-mini": "gpt-mini-stdlib.safetensors"}


def path_of(name: str) -> Path:
    if name not in CHECKPOINTS:
        raise ZooError(f"no trained checkpoint for {name!r}; trained models: {', '.join(CHECKPOINTS)}")
    return ASSETS / CHECKPOINTS[name]


def save_weights(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """The model's weights as safetensors (tied tensors stored once), written atomically."""
    atomic_write(str(path), lambda tmp: save_model(model, tmp, metadata=metadata))


def load(name: str = "gpt-mini") -> torch.nn.Module:
    """The zoo model `name` with its trained weights, in eval mode."""
    path = path_of(name)
    if not path.exists():
        raise ZooError(f"the trained checkpoint {path} is missing; make it with python tools/train_reference.py")
    model = zoo.build(name)
    missing, unexpected = load_model(model, str(path), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise ZooError(f"{path} does not fit zoo {name}: missing {sorted(missing)[:3]}, unexpected "
                       f"{sorted(unexpected)[:3]}; regenerate it with python tools/train_reference.py")
    return model.eval()
