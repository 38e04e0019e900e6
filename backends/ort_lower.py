"""Lowering for the ort-paged backend: the decode step of a causal LM cut into parts (the
embedding, one part per residual block, the head), each exported to ONNX with torch.onnx, its
weights in a file of its own.

The parts are lowered one at a time, start to end (_lower_part): a part's weights are made real
(read from the memory-mapped checkpoint where they are deferred, bmc/ir/deferred.py: a model
larger than memory), it runs on the example inputs the parts before it gave, is exported and
written, and is let go of, so a build holds one part's weights at a time.

Each part is a GraphModule of the step's nodes (bmc/kv_cache.py), exported by torch.onnx's
dynamo exporter with bmc's own ops translated (ort_ops.py: `bmc::int8_linear`,
`bmc::cached_attention`). CPU builds first put ONNX Runtime's fused kernels where the graph
proves them: RMSNorm, RoPE (bmc/rewrite/rms_norm.py, rotary.py), RoPE inside the attention,
rotating by cache slot (slot_rotary.py), and q|k|v as one product the attention reads packed
(merge_projections.py, ort_layouts.py).

The exported initializers are written to `part-NN.bin` (64-byte aligned) and the graph twice:
`part-NN.onnx` reads them as external data (ONNX Runtime folds, prepacks and fuses constant
weights) and `part-NN.stream.onnx` takes them as inputs (fed from a swap slot at run time).
CPU builds add a third form, `part-NN.packed.onnx` + `.packed.bin`: the graph as ONNX Runtime
optimized it, its prepacked weights saved to the data file
(`session.save_external_prepacked_constant_initializers`), which ONNX Runtime memory-maps on
load; the runtime pages those mapped weights (ort_paged.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers the bmc ops the step holds
from bmc import ir
from bmc.errors import BackendError
from bmc.ir.deferred import materialize_module
from bmc.backends.ort_artifacts import SMALL, int8_weight_format, machine_key, open_session
from bmc.backends.ort_layouts import tokens_first
from bmc.backends.ort_streamer import trim_malloc
from bmc.backends.ort_ops import translation_table
from bmc.analysis.structure import structure_of
from bmc.rewrite.merge_projections import merge_shared_input_projections
from bmc.rewrite.rms_norm import fuse_rms_norms
from bmc.rewrite.rotary import fuse_rotaries
from bmc.rewrite.slot_rotary import fuse_slot_rotaries

log = logging.getLogger(__name__)
aten = torch.ops.aten
ALIGN = 64


@dataclass
class Part:
    name: str  # "embed", a block's module path, or "head"
    nodes: list[fx.Node]
    inputs: list[fx.Node] = dataclasses.field(default_factory=list)
    outputs: list[fx.Node] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ cutting the step


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def partition(step: fx.GraphModule, block_names: list[str]) -> list[Part]:
    """Every computing node of the step in one part: the block its module lies in; before the
    first block, the embedding; nodes outside blocks later on, the first part that reads them
    (or the head)."""
    names = ["embed", *block_names, "head"]
    order = {name: i for i, name in enumerate(names)}
    where: dict[fx.Node, int] = {}
    seen_block = False
    pending = []
    for node in step.graph.nodes:
        if node.op != "call_function":
            continue
        block = next((b for b in block_names if _within(ir.module_path(node), b)), None)
        if block is not None:
            where[node], seen_block = order[block], True
        elif not seen_block:
            where[node] = 0
        else:
            pending.append(node)
    for node in reversed(pending):
        readers = [where[u] for u in node.users if u in where]
        where[node] = min(readers) if readers else len(names) - 1
    parts = [Part(name, []) for name in names]
    for node in step.graph.nodes:
        if node in where:
            parts[where[node]].nodes.append(node)
    _connect(step, parts, where)
    return [p for p in parts if p.nodes]


def _connect(step: fx.GraphModule, parts: list[Part], where: dict[fx.Node, int]) -> None:
    output = step.graph.output_node()
    for index, part in enumerate(parts):
        members = set(part.nodes)
        for node in part.nodes:
            for arg in node.all_input_nodes:
                if arg in members or arg.op == "get_attr" or _is_size(arg):
                    continue
                if arg.op == "call_function" and where[arg] > index:
                    raise BackendError(f"ort-paged: {node.name} in {part.name} reads {arg.name} computed later; "
                                       f"the graph does not cut into parts in order")
                if arg not in part.inputs:
                    part.inputs.append(arg)
    for index, part in enumerate(parts):
        members = set(part.nodes)
        for node in part.nodes:
            later = any(u not in members and (u is output or where.get(u, -1) > index) for u in node.users)
            if later and not _is_size(node):
                part.outputs.append(node)


def onnx_name(node: fx.Node) -> str:
    """The ONNX name of a value between parts: the step's inputs keep their names (the manifest's
    feeds); every other value gets a "bmc:" prefix, a character torch.onnx never puts in the
    names it gives a graph's own values or weights (a part output named plainly after its step
    node, "add_8", collided with the part's internal "add_8": "Duplicate definition of name")."""
    return node.name if node.op == "placeholder" else f"bmc:{node.name}"


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.sym_size.int


def part_module(step: fx.GraphModule, part: Part) -> fx.GraphModule:
    """The part as its own GraphModule: its inputs as placeholders (by the step's node names),
    sizes read off its own inputs, its outputs as a tuple."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in part.inputs:
        env[node] = graph.placeholder(onnx_name(node).replace(":", "_"))

    def value(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
        elif _is_size(node):
            env[node] = _size_from(graph, node, part, env)
        else:
            raise BackendError(f"ort-paged: part {part.name} reads {node.name}, which it has no input for")
        return env[node]

    for node in part.nodes:
        env[node] = graph.node_copy(node, value)
    graph.output(tuple(env[n] for n in part.outputs))
    module = fx.GraphModule(step, graph, class_name="Part")
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _size_from(graph: fx.Graph, node: fx.Node, part: Part, env: dict) -> fx.Node:
    """sym_size(x, d) of a tensor outside the part, re-read off an input of the part that has
    the same size there: the same tensor if it is an input, else the first with that symbol."""
    source, dim = node.args
    if source in env:
        return graph.call_function(aten.sym_size.int, (env[source], dim))
    want = ir.tensor_val(source).shape[dim] if ir.tensor_val(source) is not None else None
    for candidate in part.inputs:
        val = ir.tensor_val(candidate)
        for axis, size in enumerate(val.shape if val is not None else ()):
            if want is not None and isinstance(size, torch.SymInt) and str(size) == str(want):
                return graph.call_function(aten.sym_size.int, (env[candidate], axis))
    raise BackendError(f"ort-paged: part {part.name} needs the size {node.name} and no input of it has that dim")


# ------------------------------------------------------------------ example values


def placeholder_values(step: fx.GraphModule, inputs: tuple) -> dict[fx.Node, torch.Tensor]:
    return dict(zip(step.graph.find_nodes(op="placeholder"), inputs))


def run_part(module: fx.GraphModule, part: Part, values: dict[fx.Node, torch.Tensor]) -> None:
    """Run the part on the values of its inputs; its outputs go into `values` (the example
    values every later part, and the exporter, are given)."""
    with torch.no_grad():
        results = module(*(values[n] for n in part.inputs))
    values.update(zip(part.outputs, results))


# ------------------------------------------------------------------ ONNX


@contextlib.contextmanager
def _quiet(*loggers: str):
    """torch.onnx logs a warning per missing torchvision op on every export: not ours to show."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def export_part(module: fx.GraphModule, part: Part, examples: tuple, other: tuple, gpu: bool = False,
                int8_weights: str = "s8"):
    """The part as an ONNX ModelProto; dims that differ between the two example runs are dynamic;
    `int8_weights`: how bmc::int8_linear's weights reach the CPU's integer kernels (_int8_translation)."""
    from torch.export import Dim
    dynamic = []
    for a, b in zip(examples, other):
        dims = {d: Dim.AUTO for d in range(a.dim()) if a.shape[d] != b.shape[d]}
        dynamic.append(dims or None)
    names = [onnx_name(n) for n in part.inputs]
    chatter = io.StringIO()  # torch.onnx prints its progress and warns about training mode
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, examples, dynamo=True, dynamic_shapes=tuple(dynamic),
                                        input_names=names, output_names=[onnx_name(n) for n in part.outputs],
                                        custom_translation_table=translation_table(gpu, int8_weights),
                                        verbose=False)
        log.debug("torch.onnx on %s: %s", part.name, chatter.getvalue())
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many kinds; one line names the part
        raise BackendError(f"ort-paged: exporting part {part.name} to ONNX failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:200]}") from exc
    model = program.model_proto
    if not gpu:  # the CPU kernels take q, k, v tokens first: the round trips into heads go
        model = tokens_first(model)
    if not gpu and int8_weights == "u8":
        fold_integer_weights(model)
    return model


_FOLDABLE = {"Cast", "Add", "Transpose", "Identity", "Constant"}


def fold_integer_weights(model) -> int:
    """Compute the constant weight operands of MatMulInteger (the u8 form's int8 -> int16 + 128
    -> uint8, which torch.onnx folds only below 8192 elements) once, here: the weight file then
    holds the uint8 weights the kernels read, one byte each, and a streamed block (weights fed
    as inputs) does not recompute them every step. Returns how many it folded."""
    import onnx
    from onnx import numpy_helper
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    cache: dict[str, np.ndarray | None] = {}

    def value(name: str):
        if name in cache:
            return cache[name]
        node, result = producer.get(name), None
        if name in initializers:
            result = numpy_helper.to_array(initializers[name])
        elif node is not None and node.op_type in _FOLDABLE:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            args = [value(i) for i in node.input]
            if all(a is not None for a in args):
                if node.op_type == "Constant" and "value" in attrs:
                    result = numpy_helper.to_array(attrs["value"])
                elif node.op_type == "Constant" and "value_int" in attrs:
                    result = np.array(attrs["value_int"], np.int64)
                elif node.op_type == "Cast":
                    result = args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
                elif node.op_type == "Add":
                    result = args[0] + args[1]
                elif node.op_type == "Transpose":
                    result = np.transpose(args[0], attrs.get("perm"))
                elif node.op_type == "Identity":
                    result = args[0]
        cache[name] = result
        return result

    folded = 0
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] in initializers:
            continue
        weight = value(node.input[1])
        if weight is None:
            continue
        name = node.input[1] + "_folded"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        node.input[1] = name
        folded += 1
    if folded:  # drop what fed only the folded weights
        while True:
            used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
            dead = [n for n in graph.node if not any(out in used for out in n.output)]
            if not dead:
                break
            for n in dead:
                graph.node.remove(n)
        used = {i for n in graph.node for i in n.input}
        for tensor in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(tensor)
    return folded


def split_weights(model, weight_path: str) -> list[dict]:
    """Move the model's weights (initializers of SMALL bytes or more) into one aligned raw file
    and out of the model; their table (name, dtype, shape, offset, nbytes). Each is written
    from the bytes the model holds, without a copy: an embedding of LLaMA-7B's is 512 MiB,
    and copies of it were the build's peak."""
    from onnx import helper
    from bmc.ir.serialize import atomic_write
    large = [init for init in model.graph.initializer if _nbytes(init) >= SMALL]
    table, offset = [], 0
    for init in large:
        offset += (-offset) % ALIGN
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        table.append({"name": init.name, "dtype": dtype.str, "shape": list(init.dims), "offset": offset,
                      "nbytes": _nbytes(init), "onnx_type": init.data_type})
        offset += _nbytes(init)

    def write(tmp):
        with open(tmp, "wb") as f:
            for init, entry in zip(large, table):
                f.write(b"\0" * (entry["offset"] - f.tell()))
                f.write(_raw_bytes(init))
    atomic_write(weight_path, write)
    _keep_small(model, table)
    return table


def _raw_bytes(init):
    """An initializer's bytes as the file stores them (little-endian, row-major): its raw_data
    as it is (what torch.onnx writes), else converted from the typed fields."""
    if init.HasField("raw_data"):
        return memoryview(init.raw_data)
    from onnx import numpy_helper
    return np.ascontiguousarray(numpy_helper.to_array(init)).tobytes()


def _nbytes(init) -> int:
    from onnx import helper
    count = 1
    for d in init.dims:
        count *= d
    return count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _keep_small(proto, table: list[dict]) -> None:
    paged = {entry["name"] for entry in table}
    kept = [init for init in proto.graph.initializer if init.name not in paged]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def resident_form(model, table: list[dict], weight_file: str):
    """The graph with its initializers as external data in `weight_file` (offset, length)."""
    import onnx
    resident = onnx.ModelProto()
    resident.CopyFrom(model)
    _keep_small(resident, table)
    for entry in table:
        init = resident.graph.initializer.add()
        init.name, init.data_type = entry["name"], entry["onnx_type"]
        init.dims.extend(entry["shape"])
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", weight_file), ("offset", str(entry["offset"])), ("length", str(entry["nbytes"]))):
            item = init.external_data.add()
            item.key, item.value = key, val
    return resident


def streamed_form(model, table: list[dict]):
    """The graph with its initializers as inputs (fed from a swap slot at run time)."""
    import onnx
    streamed = onnx.ModelProto()
    streamed.CopyFrom(model)
    _keep_small(streamed, table)
    for entry in table:
        streamed.graph.input.append(onnx.helper.make_tensor_value_info(entry["name"], entry["onnx_type"],
                                                                       entry["shape"]))
    return streamed


def write_prepacked(directory: str, stem: str) -> list[str]:
    """`stem.packed.onnx` + `stem.packed.bin`: ONNX Runtime's optimized graph of `stem.onnx` with
    its constant weights prepacked (the layout its kernels read) and saved as external data, so
    a session maps them from the file instead of packing them on the heap. ONNX Runtime writes
    both files itself; they are made under temporary names and renamed (written whole or not
    at all). Prepacked layouts belong to this ONNX Runtime and this CPU's kernels (the
    manifest records both: `machine_key`)."""
    import onnxruntime as ort
    graph, data = stem + ".packed.onnx", stem + ".packed.bin"
    staging = f".{stem}.packing"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    options.optimized_model_filepath = os.path.join(directory, staging + ".onnx")
    for key, value in (("session.optimized_model_external_initializers_file_name", staging + ".bin"),
                       ("session.optimized_model_external_initializers_min_size_in_bytes", str(SMALL)),
                       ("session.save_external_prepacked_constant_initializers", "1")):
        options.add_session_config_entry(key, value)
    open_session(os.path.join(directory, stem + ".onnx"), options, ["CPUExecutionProvider"], f"{stem}.onnx")
    import onnx
    model = onnx.load(os.path.join(directory, staging + ".onnx"), load_external_data=False)
    for tensor in _external_tensors(model):  # the graph names its data file: point it at the final name
        for item in tensor.external_data:
            if item.key == "location":
                item.value = data
    if os.path.exists(os.path.join(directory, staging + ".bin")):
        os.replace(os.path.join(directory, staging + ".bin"), os.path.join(directory, data))
    else:  # nothing large enough to externalize: an empty data file keeps the file set uniform
        open(os.path.join(directory, data), "wb").close()
    save_proto(model, os.path.join(directory, graph))
    os.remove(os.path.join(directory, staging + ".onnx"))
    return [graph, data]


def _external_tensors(model):
    import onnx
    # an optimized part has no subgraphs (no If/Loop in a block): the top graph's initializers are all
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def whole_model(directory: str, entries: list[dict], inputs: list[str], outputs: list[str]):
    """The parts' resident graphs composed into one model reading the same weight files: what
    a build runs when it holds every block (a session per part costs a decode step ~10% at 12
    layers of width 768: 44 against 49 tokens/s, one thread, measured; each run's own setup,
    and the value hand-offs between them).
    Names a part keeps to itself get its stem as a prefix; the names parts pass between them
    are the step's."""
    import onnx
    shared = set(inputs) | set(outputs) | {name for e in entries for name in (*e["inputs"], *e["outputs"])}
    graph, opsets, declared = onnx.GraphProto(name="step"), {}, {}
    ir_version = 0
    for entry in entries:
        part = onnx.load(os.path.join(directory, entry["stem"] + ".onnx"), load_external_data=False)
        ir_version = max(ir_version, part.ir_version)
        for opset in part.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        prefix = entry["stem"] + "/"

        def local(name: str, prefix=prefix) -> str:
            return name if not name or name in shared else prefix + name
        for init in part.graph.initializer:
            init.name = local(init.name)
            graph.initializer.append(init)
        for node in part.graph.node:
            node.input[:] = [local(n) for n in node.input]
            node.output[:] = [local(n) for n in node.output]
            node.name = prefix + node.name
            graph.node.append(node)
        for value in (*part.graph.input, *part.graph.output):
            declared.setdefault(value.name, value)
    # a step input no part reads (position_ids, where RoPE rotates by slot) is no graph input
    graph.input.extend(declared[name] for name in inputs if name in declared)
    graph.output.extend(declared[name] for name in outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    return model


def save_proto(model, path: str) -> None:
    from bmc.ir.serialize import atomic_write
    atomic_write(path, lambda tmp: open(tmp, "wb").write(model.SerializeToString()))


def block_names(gm: fx.GraphModule) -> list[str]:
    blocks = structure_of(gm).blocks
    if not blocks:
        raise BackendError("ort-paged pages residual blocks, and the structure analysis found none in this model")
    return [b.name for b in blocks]


TASKS = ("causal-lm", "encoder")
WHOLE = "whole.onnx"  # every part in one graph (whole_model)


def task_of(gm: fx.GraphModule, task: str | None = None) -> str:
    """"causal-lm" when every attention is causal: sdpa's is_causal, or a mask the graph builds from
    the length alone that is proved, by evaluating it, to be the causal triangle (HF's explicit
    masks); served as its decode step with a KV cache. "encoder" when every attention sees every
    token (no mask, or a mask proved all-visible); served as its forward, token ids and an
    attention mask in, hidden states out. `task` states it instead, for graphs that cannot be told."""
    if task is not None:
        if task not in TASKS:
            raise BackendError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    from bmc.serve import kv_cache
    sites = gm.graph.find_nodes(op="call_function", target=kv_cache.SDPA)
    placeholders = gm.graph.find_nodes(op="placeholder")
    if not sites:
        raise BackendError("ort-paged serves causal LMs and encoders built on scaled_dot_product_attention; "
                           "this graph has none")
    kinds = set()
    for node in sites:
        args = kv_cache.sdpa_arguments(node)
        mask = args.get("attn_mask")
        if mask is None:
            kinds.add("causal" if args.get("is_causal") else "full")
        else:  # proved by evaluating the mask the graph builds from the length (64 positions checked)
            kinds.add(kv_cache.proved_causal(gm, placeholders[0], mask, 64) if len(placeholders) == 1 else "")
    if kinds == {"causal"}:
        return "causal-lm"
    if kinds == {"full"}:
        return "encoder"
    raise BackendError("ort-paged cannot tell whether this model is a causal LM or an encoder (its attention masks "
                       + ("are not built from the length alone" if "" in kinds else "are mixed")
                       + "); pass task='causal-lm' or task='encoder'")


def _padding_mask(graph: fx.Graph, attention_mask: fx.Node, dtype: torch.dtype) -> fx.Node:
    """[B, 1, 1, S] additive: 0 where attention_mask is 1, the dtype's lowest where it is 0 (as
    HF builds it, so a row of padding stays finite)."""
    call = graph.call_function
    blocked = call(aten.eq.Scalar, (attention_mask, 0))
    bias = call(aten.masked_fill.Scalar, (call(aten.zeros_like.default, (blocked,), {"dtype": dtype}), blocked,
                                          torch.finfo(dtype).min))
    return call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (bias, 1)), 1))


def encoder_step(gm: fx.GraphModule, max_len: int | None = None):
    """The forward of an encoder as the step to cut into parts: token ids and an attention mask
    [B, S] (1: a token, 0: padding) in, the hidden states (the first output) out. Each attention's
    own mask must be proved to let every token see every token (sdpa without a mask, or one the
    graph builds from the length alone: HF's); it is replaced by the padding mask, so padded rows
    give what their unpadded tokens give. Its layout has no cache; max_positions are the rows of
    the position tables (less their offset), capped by `max_len`."""
    from bmc.serve import kv_cache
    step = kv_cache.copy_graph(gm)
    graph = step.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != 1:
        raise BackendError(f"ort-paged serves encoders traced on token ids alone (it adds the attention mask); "
                           f"this one takes {len(placeholders)} inputs: trace it with input_ids only")
    ids = placeholders[0]
    bound = kv_cache.table_bound(step, ids)
    limit = min(x for x in (max_len, bound or None) if x) if (max_len or bound) else 512
    sites = list(graph.find_nodes(op="call_function", target=kv_cache.SDPA))
    for node in sites:
        args = kv_cache.sdpa_arguments(node)
        mask = args.get("attn_mask")
        if args.get("is_causal") or (mask is not None and kv_cache.proved_causal(step, ids, mask, min(limit, 512)) != "full"):
            raise BackendError(f"ort-paged: attention {ir.module_path(node) or node.name} of this encoder has a mask "
                               f"that is not proved to let every token see every other; it cannot take a padding mask")
    with graph.inserting_after(ids):
        attention_mask = graph.placeholder("attention_mask")
    with graph.inserting_before(attention_mask.next):  # in order, before the first layer
        padding = _padding_mask(graph, attention_mask, ir.tensor_val(kv_cache.sdpa_arguments(sites[0])["query"]).dtype)
    heads = []
    for node in sites:
        args = kv_cache.sdpa_arguments(node)
        heads.append(int(ir.tensor_val(args["query"]).shape[1]))
        kwargs = {"scale": args["scale"]} if args.get("scale") is not None else {}
        node.args, node.kwargs = (args["query"], args["key"], args["value"], padding), kwargs
    for node in list(graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default)):
        graph.erase_node(node)
    output = graph.output_node()
    hidden = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    output.args = ((hidden,),)
    kv_cache.flatten_signature(step)
    rows = [r for r in (bound, max_len) if r]
    layout = kv_cache.CacheLayout((), (), vocab=0, max_positions=min(rows, default=0))
    return step, layout, tuple(heads)


def _lower_part(step: fx.GraphModule, part: Part, index: int, directory: str, values: tuple[dict, dict], gpu: bool,
                int8_weights: str | None, prepacked: bool) -> dict:
    """One part, start to end: its weights made real (read from the checkpoint where they are
    deferred: bmc/ir/deferred.py), run on both example inputs, exported, written, and let go
    of, so a build holds one part's weights at a time."""
    module = part_module(step, part)
    materialize_module(module)
    for example in values:
        run_part(module, part, example)
    small, other = values
    proto = export_part(module, part, tuple(small[n] for n in part.inputs), tuple(other[n] for n in part.inputs),
                        gpu=gpu, int8_weights=int8_weights or "s8")
    del module
    stem = f"part-{index:02d}"
    table = split_weights(proto, os.path.join(directory, stem + ".bin"))
    save_proto(resident_form(proto, table, stem + ".bin"), os.path.join(directory, stem + ".onnx"))
    save_proto(streamed_form(proto, table), os.path.join(directory, stem + ".stream.onnx"))
    del proto
    packed = write_prepacked(directory, stem) if prepacked and not gpu else []
    gc.collect()  # the part's tensors and protos hold cycles (fx modules, onnx graphs): free them now
    trim_malloc()  # and give their pages back, so the heap does not grow part by part
    return {"name": part.name, "kind": "embed" if index == 0 else "head" if part.name == "head" else "block",
            "stem": stem, "inputs": [onnx_name(n) for n in part.inputs], "outputs": [onnx_name(n) for n in part.outputs],
            "weights": table, "weight_bytes": sum(t["nbytes"] for t in table), "packed": packed}


def lower_to_directory(gm: fx.GraphModule, directory: str, gpu: bool = False, progress=None,
                       max_len: int | None = None, task: str | None = None, prepacked: bool = True) -> dict:
    """Write the parts of `gm`'s step (a causal LM's decode step, an encoder's forward) to
    `directory`; the manifest's `parts` entries. `max_len` caps the positions served (and
    gives them where no position table does: RoPE); `task` overrides task_of's analysis."""
    from bmc.serve import kv_cache
    names = block_names(gm)
    task = task_of(gm, task)
    if task == "causal-lm":
        try:
            step, layout = kv_cache.decode_step(gm, max_len)
        except kv_cache.CacheError as exc:
            raise BackendError(f"ort-paged: {exc}") from exc
        heads = tuple(int(ir.tensor_val(kv_cache.sdpa_arguments(n)["query"]).shape[1])
                      for n in gm.graph.find_nodes(op="call_function", target=kv_cache.SDPA))
        examples = [kv_cache.example_step_inputs(layout, batch=2, new=3, past=2),
                    kv_cache.example_step_inputs(layout, batch=3, new=4, past=5)]
    else:
        step, layout, heads = encoder_step(gm, max_len)
        examples = [(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
                    (torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))]
    if not layout.max_positions:
        raise BackendError("ort-paged cannot tell how many positions this model takes (no position table: RoPE "
                           "computed in the graph, and no config); pass max_len=N (bmc-opt --max-len N), its "
                           "max_position_embeddings")
    if not gpu:  # ONNX Runtime's CPU kernels for them (ort_ops); GPU builds keep the traced ops
        fuse_rms_norms(step)
        tokens = [p for p in step.graph.find_nodes(op="placeholder") if p.name == "input_ids"]
        if tokens and ir.tensor_val(tokens[0]) is not None:
            fuse_rotaries(step, tokens[0])
    positions = [p for p in step.graph.find_nodes(op="placeholder") if p.name == "position_ids"]
    by_slot = bool(positions) and fuse_slot_rotaries(step, positions[0], layout.max_positions) > 0
    # q|k|v as one product (GroupQueryAttention reads it packed). Not gate|up: its Split costs
    # more than the second product saves (12 layers of width 768, 2 threads at batch 8 and 1
    # at batch 1: 19.59/24.34 ms a decode step against 19.74/24.68 merged; int8 6.63/8.11
    # against 6.82/8.64, measured)
    merge_shared_input_projections(step, owners={b.attention.module for b in structure_of(gm).blocks if b.attention})
    parts = partition(step, names)
    int8_weights = None if gpu else int8_weight_format()  # u8 where this CPU's u8 x s8 kernels saturate
    small, other = (placeholder_values(step, inputs) for inputs in examples)
    entries = []
    os.makedirs(directory, exist_ok=True)
    for index, part in enumerate(parts):
        if progress is not None:
            progress(index, len(parts), f"exporting {part.name}")
        entries.append(_lower_part(step, part, index, directory, (small, other), gpu, int8_weights, prepacked))
    if progress is not None:
        progress(len(parts), len(parts), "the whole-step graph")
    step_outputs = [onnx_name(n) for n in step.graph.output_node().args[0]]
    step_inputs = [n.name for n in step.graph.find_nodes(op="placeholder")]
    save_proto(whole_model(directory, entries, step_inputs, step_outputs), os.path.join(directory, WHOLE))
    tokens = 2 * 3  # the first example's batch x new tokens
    selected = {step.graph.output_node().args[0][0]} if "logits_positions" in step_inputs else set()
    # a causal LM's logits are of the positions asked for (one, generating): not per token
    widest = max(v.numel() // tokens for n, v in small.items() if isinstance(v, torch.Tensor) and v.dim() >= 2
                 and v.shape[0] == 2 and v.numel() % tokens == 0 and n not in selected)
    return {"parts": entries, "outputs": step_outputs, "layout": dataclasses.asdict(layout),
            "inputs": step_inputs, "whole": WHOLE,
            "max_len": layout.max_positions, "widest_per_token": int(widest), "task": task,
            "attention_heads": max(heads, default=0), "rotary_by_slot": by_slot,
            "prepacked_for": None if gpu or not prepacked else machine_key(), "int8_weights": int8_weights}
