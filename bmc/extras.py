"""Optional packages and the pyproject extras that bring them. A feature that needs one
imports it through `require`, so a missing package is one line naming what to install
instead of an ImportError from deep inside. Imports nothing heavy itself (serving without
torch goes through here)."""
from __future__ import annotations

import importlib
from types import ModuleType

from bmc.errors import MissingExtraError

# package -> the extra of pyproject.toml that installs it
EXTRAS = {
    "onnx": "serve", "onnxruntime": "serve", "onnxscript": "serve", "numpy": "serve",
    "tokenizers": "serve", "transformers": "hf", "accelerate": "hf", "matplotlib": "plot",
}


def require(package: str, feature: str) -> ModuleType:
    """`package` imported, or a MissingExtraError saying which extra brings it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        top = package.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'bmc[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{feature} needs the Python package '{top}', which is not installed: "
                                f"{hint}") from None
