"""The pass manager: declared passes and presets, pipeline strings, requirement checks,
verification after every pass, and instrumentation (instruments.py)."""
from bmc.passmgr.manager import (INITIAL_PROPERTIES, PRESETS, REGISTRY, NoOptions, Pass, PassContext,  # noqa: F401
                                 PassManager, PassRecord, PassResult, PassSpec, Pipeline, describe_passes,
                                 format_value, load_builtin_passes, parse_pipeline, parse_value, register_pass,
                                 register_preset, unregister, Instrument)
