"""bmc.passes: one pass per file, the file named after the pass. Importing this package
registers every pass and preset with the pass manager."""
from bmc.passes import (amp, annotate_cost, dce, dp, insert_collectives, insert_offload, insert_remat, pp,  # noqa: F401, I001
                        prune_ffn, prune_heads, prune_layers, quant_int8, shape_prop, tap, tp, verify, zero)
from bmc.passmgr.manager import register_preset

register_preset("cleanup", "dce,shape-prop", "drop dead nodes and refresh shapes")
register_preset("analyze", "shape-prop,annotate-cost", "refresh shapes and annotate every node's cost")
