#!/usr/bin/env python3
"""The coverage table: Hugging Face architectures (small configs, random weights) through every
pass and both backends, each cell checked numerically against the original model.

    OMP_NUM_THREADS=1 python tools/coverage.py                      # every architecture, every cell
    OMP_NUM_THREADS=1 python tools/coverage.py --arch llama,gpt2 --cell tp2,quant-int8

A cell is `pass` (the check below held), `refused: ...` (a one-line bmc error naming what is
unsupported) or `FAIL: ...` (a wrong number, or any other exception): the last must never
happen. What each cell checks, on inputs other than the tracing example:

    trace          the traced graph's output equals eager's (another batch and length)
    zero3          3 AdamW steps on 2 gloo ranks: the losses of a one-process eager run (1e-5)
    tp2            2 gloo ranks: outputs equal eager's (1e-5)
    pp2            2 stages on 2 gloo ranks, 2 microbatches: the loss and every gradient of one
                   eager step (1e-5)
    prune-heads    equals the original with the removed heads' columns of o zeroed (1e-5)
    prune-layers   equals the original with block 1 replaced by the identity (1e-5)
    prune-ffn      equals the original with the removed neurons' columns of down zeroed (1e-5)
    quant-int8     equals the original with the same linears quantized here, per row (1e-4)
    ort fp32       causal LMs (briefly trained, see ort int8): logits of whole sequences within 1e-4
                   of eager, greedy tokens
                   equal transformers' generate, one prompt and a left-padded batch of two; encoders: hidden states on the real tokens of a
                   padded batch within 1e-4 of eager
    ort int8       logits (or hidden states) within 1% (norm-relative) of the ort fp32 build's,
                   causal LMs after 300 training steps on text (on random weights the logits
                   are noise and rounding the weights alone moves them ~1%), on text
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import bmc  # noqa: E402
from bmc.errors import BmcError  # noqa: E402

VOCAB = 256
CELLS = ("trace", "zero3", "tp2", "pp2", "prune-heads", "prune-layers", "prune-ffn", "quant-int8", "ort fp32", "ort int8")
DISTRIBUTED = ("zero3", "tp2", "pp2")


# ----------------------------------------------------------------------------- architectures

def _common() -> dict:
    return dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(arch: str):
    import transformers as tf
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                 max_position_embeddings=128, **_common())
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, **_common())
    if arch in ("llama", "llama-tied"):
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=arch == "llama-tied", **small)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **small)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **small)
    if arch == "gpt-neox":
        return tf.GPTNeoXConfig(rotary_pct=0.5, **small)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=2,
                            word_embed_proj_dim=64, max_position_embeddings=128, **_common())
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **small)
    if arch == "bert":
        return tf.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                             max_position_embeddings=128, vocab_size=VOCAB, pad_token_id=0)
    raise KeyError(arch)


ARCHS = ("gpt2", "llama", "llama-tied", "mistral", "qwen2", "gpt-neox", "opt", "phi3", "bert")
ENCODERS = ("bert",)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf
    torch.manual_seed(seed)
    config = _config(arch)
    config._attn_implementation = "sdpa"
    cls = tf.AutoModel if arch in ENCODERS else tf.AutoModelForCausalLM
    model = cls.from_config(config)
    return model.eval()


def ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def example(batch: int = 2, seq: int = 16, seed: int = 0, labels: bool = False):
    x = ids(batch, seq, seed)
    return (), ({"input_ids": x, "labels": x} if labels else {"input_ids": x})


def main_output(out) -> torch.Tensor:
    """Logits of a causal LM, the last hidden state of an encoder."""
    if isinstance(out, torch.Tensor):
        return out
    for field in ("logits", "last_hidden_state"):
        if getattr(out, field, None) is not None:
            return getattr(out, field)
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def loss_of(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    return loss if loss is not None else main_output(out).float().square().mean()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} where the original gives {tuple(want.shape)}")
    worst = float((got.float() - want.float()).abs().max())
    if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
        raise AssertionError(f"{what}: max abs difference {worst:.3g} over the tolerance {tol:g}")


# ----------------------------------------------------------------------------- one process cells

def check_trace(arch: str) -> None:
    model = build(arch)
    gm = bmc.trace(copy.deepcopy(model), example(), dynamic=True)
    x = ids(3, 12, 7)
    _close(main_output(gm(input_ids=x)), main_output(model(input_ids=x)), 1e-5, "traced output")


def _compiled(model, passes: str):
    return bmc.compile(copy.deepcopy(model), passes=passes, example_inputs=example(), dynamic=True)


def _structure(model):
    from bmc.analysis.structure import structure_of
    return structure_of(bmc.trace(copy.deepcopy(model), example(), dynamic=True))


def _zero_inputs_of(model, linear, features: list[int]) -> None:
    """Zero the input features (columns) of a projection: what removing them leaves."""
    with torch.no_grad():
        weight = model.get_parameter(linear.weight)
        if linear.transposed:
            weight[features] = 0
        else:
            weight[:, features] = 0


def _check_against(prog, reference, model, what: str, tol: float = 1e-5) -> None:
    x = ids(3, 12, 11)
    got, want = main_output(prog(input_ids=x)), main_output(reference(input_ids=x))
    _close(got, want, tol, what)
    if torch.allclose(want, main_output(model(input_ids=x)), atol=1e-4):
        raise AssertionError(f"{what}: the change did not change the output, so the check proves nothing")


def check_prune_heads(arch: str) -> None:
    from bmc import ir
    model = build(arch)
    prog = _compiled(model, "prune-heads{ratio=0.25}")
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_heads()
    reference = copy.deepcopy(model)
    for block in _structure(model).blocks:
        att = block.attention
        drop = sorted(set(range(att.num_heads)) - set(kept.get(att.module, range(att.num_heads))))
        _zero_inputs_of(reference, att.o, [h * att.head_dim + i for h in drop for i in range(att.head_dim)])
    _check_against(prog, reference, model, "pruned heads")


def check_prune_layers(arch: str) -> None:
    model = build(arch)
    prog = _compiled(model, "prune-layers{drop=[1]}")
    reference = copy.deepcopy(model)
    block = reference.get_submodule(_structure(model).blocks[1].name)
    block.register_forward_hook(_identity_hook)
    _check_against(prog, reference, model, "dropped block")


def _identity_hook(module, args, output):
    hidden = args[0]
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def check_prune_ffn(arch: str) -> None:
    from bmc import ir
    model = build(arch)
    prog = _compiled(model, "prune-ffn{ratio=0.5}")
    kept = ir.get_plan(prog.graph_module, ir.PrunePlan).kept_neurons()
    reference = copy.deepcopy(model)
    for block in _structure(model).blocks:
        mlp = block.mlp
        width = mlp.down.in_features
        _zero_inputs_of(reference, mlp.down, sorted(set(range(width)) - set(kept.get(mlp.module, range(width)))))
    _check_against(prog, reference, model, "pruned neurons")


def check_quant_int8(arch: str) -> None:
    model = build(arch)
    prog = _compiled(model, "quant-int8")
    left = {name for name, _ in prog.graph_module.named_parameters()}
    linears = {p.weight: p for b in _structure(model).blocks for p in (*b.attention.projections(), *b.mlp.projections())}
    quantized = [name for name, _ in model.named_parameters() if name not in left and name in linears]
    if not quantized:
        raise AssertionError("quant-int8 quantized none of the blocks' projections")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in quantized:
            weight = reference.get_parameter(name)
            rows = weight.t() if linears[name].transposed else weight  # one scale per output feature
            scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            rows.copy_((rows / scale).round().clamp(-127, 127) * scale)
    _check_against(prog, reference, model, "int8 linears", tol=1e-4)


# ----------------------------------------------------------------------------- serving cells

def _served(model, passes: str, directory: str):
    return bmc.compile(copy.deepcopy(model), passes=passes, example_inputs=example(), dynamic=True,
                       backend="ort-paged", directory=directory)


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return x, mask


def _hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    x, mask = _left_padded(prompts, model.config.pad_token_id or 0)
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                         pad_token_id=model.config.pad_token_id or 0)  # no eos: all 16 tokens, as bmc's
    return out[:, x.shape[1]:].tolist()


PROMPTS = ([5, 17, 99, 42, 7, 250, 33], [61, 8, 120])


_SERVED: dict = {}  # arch -> (model, its fp32 build): the int8 cell compares against the same build


def _served_fp32(arch: str, directory: str):
    """The served model (briefly trained, for causal LMs: see `trained`) and its fp32 build."""
    if arch not in _SERVED:
        model = build(arch) if arch in ENCODERS else trained(arch)
        _SERVED[arch] = (model, _served(model, "", os.path.join(directory, f"{arch}-fp32")))
    return _SERVED[arch]


def check_ort_fp32(arch: str, directory: str) -> None:
    model, prog = _served_fp32(arch, directory)
    if arch in ENCODERS:
        x, mask = _left_padded([list(p) for p in PROMPTS], 0)
        got = torch.as_tensor(prog(x.numpy(), mask.numpy()))
        want = model(input_ids=x, attention_mask=mask).last_hidden_state
        real = mask.bool()
        _close(got[real], want[real], 1e-4, "encoder hidden states on the real tokens")
        return
    x = ids(3, 21, 2)
    _close(torch.as_tensor(prog(x.numpy())), main_output(model(input_ids=x)), 1e-4, "whole-sequence logits")
    for prompts in ([list(PROMPTS[0])], [list(p) for p in PROMPTS]):
        got = [list(t) for t in prog.generate(prompts, 16)]
        want = _hf_greedy(model, prompts, 16)
        if got != want:
            raise AssertionError(f"greedy tokens differ from transformers' for {len(prompts)} prompt(s): "
                                 f"{got} != {want}")


def trained(arch: str, steps: int = 300) -> torch.nn.Module:
    """The model after a few hundred AdamW steps on the standard library's sources (one token
    per byte): int8 is judged on weights that carry a signal, as served models' do. On random
    weights the logits are noise around zero and rounding the weights alone moves them ~1%."""
    from bmc.models import data
    model = build(arch).train()
    tokens = data.text_tokens()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pick = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - 65, (8,), generator=pick)
        x = torch.stack([tokens[i:i + 64] for i in starts]).long()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def check_ort_int8(arch: str, directory: str) -> None:
    from bmc.models import data
    model, fp32 = _served_fp32(arch, directory)
    x = data.text_tokens()[4096:4096 + 24].long().view(2, 12)
    full = torch.as_tensor(fp32(x.numpy()))
    int8 = torch.as_tensor(_served(model, "quant-int8", os.path.join(directory, f"{arch}-int8"))(x.numpy()))
    error = float((int8 - full).norm() / full.norm())
    if error > 0.01:
        raise AssertionError(f"int8 build off the fp32 build by {error:.2%} (relative), over 1%")


# ----------------------------------------------------------------------------- distributed cells

def _rank_cells(rank: int, world: int, archs: list[str], cells: list[str]) -> dict:
    """Every distributed cell of every architecture in one launch of `world` ranks."""
    results = {}
    for arch in archs:
        for cell in cells:
            results[(arch, cell)] = _outcome(lambda: DISTRIBUTED_CHECKS[cell](rank, world, arch))
    return results


def _check_zero3(rank: int, world: int, arch: str) -> None:
    model = build(arch)
    batch = example(batch=4, seq=12, seed=3, labels=arch not in ENCODERS)[1]
    reference = _eager_losses(copy.deepcopy(model), batch, steps=3)
    local = {k: v.chunk(world)[rank] for k, v in batch.items()}
    prog = bmc.compile(copy.deepcopy(model), passes="zero3", dynamic=True,
                       example_inputs=example(labels=arch not in ENCODERS))
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)
    for step, want in enumerate(reference):
        loss = loss_of(prog(**local))
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        got = float(mean) / world
        if abs(got - want) > 1e-5 * max(1.0, abs(want)):
            raise AssertionError(f"step {step}: loss {got:.7f} where one process gives {want:.7f}")


def _eager_losses(model, batch: dict, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of(model(**batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def _check_tp2(rank: int, world: int, arch: str) -> None:
    model = build(arch)
    prog = bmc.compile(copy.deepcopy(model), passes="tp2", example_inputs=example(), dynamic=True)
    x = ids(3, 12, 9)
    _close(main_output(prog(input_ids=x)), main_output(model(input_ids=x)), 1e-5, "tp2 outputs")


def _square_mean(out, target):
    return main_output(out).float().square().mean()


def _check_pp2(rank: int, world: int, arch: str) -> None:
    """Two stages, two microbatches: the step's loss and every gradient a stage holds equal one
    eager step's (1e-5). Causal LMs compute their own loss; an encoder's is the caller's."""
    model = build(arch)
    causal = arch not in ENCODERS
    x = ids(4, 12, 13)
    prog = bmc.compile(copy.deepcopy(model), passes=f"pp{{stages={world},microbatches=2}}",
                       example_inputs=example(batch=2, seq=12, labels=causal))
    if causal:
        want = model(input_ids=x, labels=x).loss
        got = prog.step(input_ids=x, labels=x)
    else:
        want = _square_mean(model(input_ids=x), None)
        got = prog.step(input_ids=x, target=torch.zeros(4), loss_fn=_square_mean)
    want.backward()
    if abs(float(got) - float(want)) > 1e-5 * max(1.0, abs(float(want))):
        raise AssertionError(f"pp2 loss {float(got):.7f} where one process gives {float(want):.7f}")
    reference = dict(model.named_parameters(remove_duplicate=False))
    for name, p in prog.named_parameters():
        if p.grad is not None or reference[name].grad is not None:
            _close(p.grad, reference[name].grad, 1e-5, f"pp2 gradient of {name}")


DISTRIBUTED_CHECKS = {"zero3": _check_zero3, "tp2": _check_tp2, "pp2": _check_pp2}


# ----------------------------------------------------------------------------- the table

def _outcome(check) -> str:
    try:
        check()
        return "pass"
    except BmcError as exc:
        return "refused: " + str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - a wrong number or a crash: both are what the table exposes
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
        return f"FAIL: {' '.join(detail)[:300]}"


def run_table(archs: list[str], cells: list[str], progress=None) -> dict[tuple[str, str], str]:
    """Every (architecture, cell) outcome. Distributed cells of all architectures share one
    2-rank launch; a cell failing on either rank fails."""
    results: dict[tuple[str, str], str] = {}
    local = {"trace": check_trace, "prune-heads": check_prune_heads, "prune-layers": check_prune_layers,
             "prune-ffn": check_prune_ffn, "quant-int8": check_quant_int8}
    _SERVED.clear()
    with tempfile.TemporaryDirectory(prefix="bmc-coverage-") as work:
        for arch in archs:
            for cell in cells:
                if cell in local:
                    results[(arch, cell)] = _outcome(lambda: local[cell](arch))
                elif cell in ("ort fp32", "ort int8"):
                    serve = check_ort_fp32 if cell == "ort fp32" else check_ort_int8
                    results[(arch, cell)] = _outcome(lambda: serve(arch, work))
                if progress and (arch, cell) in results:
                    progress(arch, cell, results[(arch, cell)])
        wanted = [c for c in cells if c in DISTRIBUTED]
        if wanted:
            from bmc.cli.local_ranks import run_ranks
            per_rank = run_ranks(2, _rank_cells, archs, wanted, timeout=1800)
            for key in per_rank[0]:
                outcomes = [r[key] for r in per_rank]
                results[key] = next((o for o in outcomes if o.startswith("FAIL")), outcomes[0])
                if progress:
                    progress(*key, results[key])
    _SERVED.clear()
    return results


def format_table(results: dict, archs: list[str], cells: list[str]) -> str:
    """Markdown: a mark per cell, then the refusals and failures spelled out."""
    marks = {"pass": "ok", "refused": "refused", "FAIL": "**FAIL**"}
    lines = ["| architecture | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    notes = []
    for arch in archs:
        row = []
        for cell in cells:
            outcome = results.get((arch, cell), "")
            kind = outcome.split(":")[0]
            row.append(marks.get(kind, ""))
            if kind != "pass" and outcome:
                notes.append(f"- {arch} / {cell}: {outcome}")
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    p.add_argument("--cell", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    args = p.parse_args()
    archs, cells = args.arch.split(","), args.cell.split(",")
    unknown = sorted(set(archs) - set(ARCHS)) + sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"unknown architecture or cell: {', '.join(unknown)}")
    results = run_table(archs, cells, progress=lambda a, c, o: print(f"{a:>12} {c:<13} {o[:120]}", file=sys.stderr))
    sys.stdout.write(format_table(results, archs, cells))
    return 1 if any(o.startswith("FAIL") for o in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
