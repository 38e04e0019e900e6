"""The bmc IR: a torch.fx GraphModule from torch.export, bmc's node annotations (schema.py)
and typed graph plans (plans.py), the bmc:: ops (ops.py), tracing (trace.py), verification
(verify.py), shape propagation (shapes.py) and .pt2 archives (serialize.py).

`from bmc import ir` gives the annotation and plan accessors: `ir.get(node, ir.Shard)`,
`ir.annotate(node, value)`, `ir.get_plan(gm, ir.TensorParallelPlan)`, `ir.set_plan(gm, plan)`."""
from bmc.ir.plans import (PLANS, AmpPlan, DataParallelPlan, Kept, KvCachePlan, Layout, OffloadPlan,  # noqa: F401
                          PipelinePlan, PrunePlan, TapPlan, TensorParallelPlan, TokenizerFile, TokenizerPlan,
                          check_plans, clear_plan, copy_plans, all_plans, get_plan, plan_text, plans_from_json,
                          plans_to_json, replace_plan, set_plan)
from bmc.ir.schema import (CARRIED_META, CUSTOM_KEY, DTYPE_SHORT, MESH_AXES, PLACEMENT_KINDS, SCHEMA,  # noqa: F401
                           Cost, Origin, Placement, Quant, Region, Remat, Shard, Stage, Zero, annotate, annotations,
                           annotations_from_json, annotations_to_json, check_annotations, clear, copy_meta,
                           format_graph, format_node, get, module_path, normalize_module_path, parameter_nodes, place,
                           rename_symbols, replace_node, replace_tensor, target_str, tensor_val, to_dot, type_str)
