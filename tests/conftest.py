import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_models.py, tests/helpers.py

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def fresh_registry():
    """Lets a test register throwaway passes; they are removed afterwards."""
    from bmc import passmgr
    passmgr.load_builtin_passes()
    before_passes, before_presets = dict(passmgr.REGISTRY), dict(passmgr.PRESETS)
    yield passmgr
    passmgr.REGISTRY.clear()
    passmgr.REGISTRY.update(before_passes)
    passmgr.PRESETS.clear()
    passmgr.PRESETS.update(before_presets)
