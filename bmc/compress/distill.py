"""Knowledge distillation: train a (pruned) student against its teacher, to win back what
compression lost.

    student = bmc.compile(copy.deepcopy(model), passes="prune-heads{ratio=0.5},prune-layers{ratio=0.25}", ...)
    student, history = bmc.distill(student, model, bmc.data.Batches(train_tokens, 16, 128), signals="both",
                                   steps=40, lr=1e-3)   # tools/bench/distill.py: recovers 0.65 of the loss

The loss of a step is

    alpha * (T^2 KL(softmax(t / T) || softmax(s / T))   [signals logits, both]
             + hidden_weight * mean MSE(s_h, t_h))       [signals hidden, both]
    + (1 - alpha) * cross-entropy(s, targets)            [the LM loss, when alpha < 1]

(Hinton et al. 2015: the T^2 keeps the soft term's gradients on the scale of the hard one).
Hidden states are block outputs, read with the `tap` pass on copies of both graphs; by default
each student block is matched with the teacher block of the same name, which prune-layers
keeps (transformer.h.3 stays transformer.h.3), and `hidden_map={student path: teacher path}`
says otherwise. The logits are the output head's (tapped too, so a model traced with its
targets, which returns its loss, works as well).

Training runs on the torch backend through `prog.optimizer(...)`: a tapped copy of the student
is compiled (with `passes`, by default `dp` when world_size > 1 under an initialized
torch.distributed, each rank taking its slice of every batch), trained, and its weights copied
back into the student, which is returned with the per-step losses.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from bmc import ir
from bmc.models import data as bmc_data
from bmc.compress.calibration import CalibrationError, batches as checked_batches, main_output
from bmc.errors import BmcError
from bmc.passmgr.manager import PassContext, PassManager, PassSpec
from bmc.plugins import get_backend
from bmc.program import Program, compile as bmc_compile, resolve_world_size
from bmc.analysis.structure import structure_of
from bmc.ir.trace import trace, trace_info

log = logging.getLogger(__name__)
SIGNALS = ("logits", "hidden", "both")


class DistillError(BmcError):
    """Distillation asked for something the models or the data cannot give."""


class Distilled(NamedTuple):
    """What `distill` returns: the trained student and one dict of losses per step."""

    student: Program
    history: list[dict[str, float]]


# ------------------------------------------------------------------ arguments and data


def _check_arguments(signals: str, steps: int, temperature: float, alpha: float, world_size: int) -> None:
    if signals not in SIGNALS:
        raise DistillError(f"unknown signals {signals!r}; use one of {', '.join(SIGNALS)}")
    if not isinstance(steps, int) or steps < 1:
        raise DistillError(f"steps must be an int >= 1, got {steps!r}")
    if not temperature > 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise DistillError(f"alpha weighs distillation against the LM loss and must be in [0, 1], got {alpha}")
    if world_size > 1 and not dist.is_initialized():
        raise DistillError(f"world_size={world_size} needs torch.distributed initialized with {world_size} "
                           f"processes; launch with torchrun and call init_process_group first")


class _Data:
    """Batch `step` as this rank's (inputs, targets): bmc.data.Batches slice themselves; a
    callable is called with the step and an iterable is drawn from, and their (global)
    batches are cut into equal row slices, one per rank."""

    def __init__(self, source: Any, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size
        self.iterator = None
        if not isinstance(source, bmc_data.Batches) and not callable(source):
            if not isinstance(source, Iterable):
                raise DistillError(f"data is a {type(source).__name__}; give bmc.data.Batches, a callable "
                                   f"step -> (inputs, targets), or an iterable of (inputs, targets)")
            self.iterator = iter(source)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.source, bmc_data.Batches):
            return self.source.local(step, self.rank, self.world_size)
        batch = self.source(step) if self.iterator is None else self._next(step)
        return self._slice(_pair(batch, step))

    def _next(self, step: int):
        try:
            return next(self.iterator)
        except StopIteration:
            raise DistillError(f"data ran out after {step} batches; give at least as many batches as steps") from None

    def _slice(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return batch
        rows = batch[0].size(0)
        if rows % self.world_size:
            raise DistillError(f"a batch of {rows} rows does not divide over {self.world_size} ranks; "
                               f"use a batch that is a multiple of {self.world_size}")
        local = rows // self.world_size
        return tuple(t[self.rank * local:(self.rank + 1) * local] for t in batch)


def _pair(batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        raise DistillError(f"data batch {step} is not an (inputs, targets) pair of tensors; give token ids "
                           f"[batch, seq] and next-token targets of the same shape")
    return batch[0], batch[1]


# ------------------------------------------------------------------ models


def _graph(model: Any, inputs: torch.Tensor, role: str) -> fx.GraphModule:
    """The traced graph of a Program or module (modules are traced with dynamic batch and
    sequence, on the first batch)."""
    if isinstance(model, Program):
        return model.graph_module
    if isinstance(model, fx.GraphModule) and trace_info(model) is not None:
        return model
    if isinstance(model, torch.nn.Module):
        # contiguous: a strided example (a batch's shifted slice) leaves export guards on strides
        return trace(model, (inputs.contiguous(),), dynamic=True)
    raise DistillError(f"the {role} is a {type(model).__name__}; give a bmc Program or an nn.Module")


def _call_args(gm: fx.GraphModule, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[tuple, dict]:
    """How the graph takes a batch: (inputs), (inputs, targets), or inputs by its one keyword."""
    info = trace_info(gm)
    if len(info.args) == 1 and not info.kwargs:
        return (inputs,), {}
    if len(info.args) == 2 and not info.kwargs:
        return (inputs, targets), {}
    if not info.args and len(info.kwargs) == 1:
        return (), {next(iter(info.kwargs)): inputs}
    raise DistillError(f"distill feeds a model its token ids (and targets); this one was traced with "
                       f"{len(info.args)} positional and {sorted(info.kwargs)} keyword inputs")


def _run(prog: Program, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tapped program on a batch: (its output, {tapped path: tensor})."""
    args, kwargs = _call_args(prog.graph_module, inputs, targets)
    out = prog(*args, **kwargs)
    return out if ir.get_plan(prog.graph_module, ir.TapPlan) else (out, {})


def _check_fits(gm: fx.GraphModule, batch: tuple, role: str) -> None:
    try:
        checked_batches(gm, [_call_args(gm, *batch)], "distillation")
    except CalibrationError as exc:
        raise DistillError(f"the {role} does not take the data's batches: {exc}") from None


def _logits_point(gm: fx.GraphModule) -> str | None:
    """The output head's module path: its output is the logits whatever the graph returns."""
    head = structure_of(gm).head
    return head.module if head is not None else None


def _hidden_pairs(student: fx.GraphModule, teacher: fx.GraphModule,
                  hidden_map: Mapping[str, str] | None) -> dict[str, str]:
    """student path -> teacher path; by default each student block to the teacher block of the
    same name (prune-layers keeps names), else of the same index."""
    if hidden_map is not None:
        if not hidden_map:
            raise DistillError("hidden_map is empty; map at least one student block to a teacher block, "
                               "or leave it out for the default")
        return dict(hidden_map)
    mine, theirs = structure_of(student).blocks, structure_of(teacher).blocks
    if not mine or not theirs:
        who = "student" if not mine else "teacher"
        raise DistillError(f"hidden signals need residual blocks, and the structure analysis found none in the "
                           f"{who}; use signals='logits' or give hidden_map={{student path: teacher path}}")
    by_name, by_index = {b.name: b.name for b in theirs}, {b.index: b.name for b in theirs}
    pairs = {}
    for block in mine:
        match = by_name.get(block.name) or by_index.get(block.index)
        if match is None:
            raise DistillError(f"student block {block.name} has no teacher block of that name or index; "
                               f"give hidden_map={{student path: teacher path}}")
        pairs[block.name] = match
    return pairs


def _tap(points: Sequence[str | None]) -> list[str]:
    """The tap pass naming `points` once each (None, a missing head, is left out); no pass
    when nothing is left (the logits are then the graph's own output)."""
    named = tuple(dict.fromkeys(p for p in points if p is not None))
    return [str(PassSpec("tap", (("points", named),)))] if named else []


def _shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module running a copy of the graph on the same weights (the teacher's: it is
    read, never trained, so nothing needs copying)."""
    with warnings.catch_warnings():
        # deep-copying export's output spec trips torch's own LeafSpec deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    twin = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    twin.meta.update(gm.meta)
    return twin


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy (weights included): the training program's passes (dp, zero) may shard or
    hook its parameters, which the returned student must not carry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


# ------------------------------------------------------------------ losses


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the temperature-softened distributions, per token."""
    vocab = student.size(-1)
    s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _mse(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
         pairs: Mapping[str, str]) -> torch.Tensor:
    terms = [F.mse_loss(student[s].float(), teacher[t].float()) for s, t in pairs.items()]
    return torch.stack(terms).mean()


class _Step:
    """One step's loss from both models' outputs, the terms kept for the history."""

    def __init__(self, signals: str, temperature: float, alpha: float, hidden_weight: float,
                 student_logits: str | None, teacher_logits: str | None, pairs: Mapping[str, str]):
        self.signals, self.temperature, self.alpha, self.hidden_weight = signals, temperature, alpha, hidden_weight
        self.student_logits, self.teacher_logits, self.pairs = student_logits, teacher_logits, pairs

    @staticmethod
    def logits(out: Any, taps: Mapping[str, torch.Tensor], point: str | None, role: str) -> torch.Tensor:
        logits = taps[point] if point is not None else main_output(out)
        if logits.dim() != 3:
            raise DistillError(f"the {role} gives no [batch, seq, vocab] logits (no output head found and it "
                               f"returns {list(logits.shape)}); trace it without targets")
        return logits

    def __call__(self, s_out, s_taps, t_out, t_taps, targets) -> dict[str, torch.Tensor]:
        s_logits = self.logits(s_out, s_taps, self.student_logits, "student")
        t_logits = self.logits(t_out, t_taps, self.teacher_logits, "teacher")
        terms: dict[str, torch.Tensor] = {}
        soft = torch.zeros((), device=s_logits.device)
        if self.signals in ("logits", "both"):
            terms["kl"] = _kl(s_logits, t_logits, self.temperature)
            soft = soft + terms["kl"]
        if self.signals in ("hidden", "both"):
            terms["mse"] = _mse(s_taps, t_taps, self.pairs)
            soft = soft + self.hidden_weight * terms["mse"]
        loss = self.alpha * soft
        if self.alpha < 1:
            terms["lm"] = F.cross_entropy(s_logits.float().reshape(-1, s_logits.size(-1)), targets.reshape(-1))
            loss = loss + (1 - self.alpha) * terms["lm"]
        terms["loss"] = loss
        return terms


def _check_shapes(s_out, s_taps, t_out, t_taps, step: _Step) -> None:
    """Once, on the first batch: the vocabularies and each mapped pair of hidden states agree."""
    s_vocab = step.logits(s_out, s_taps, step.student_logits, "student").size(-1)
    t_vocab = step.logits(t_out, t_taps, step.teacher_logits, "teacher").size(-1)
    if s_vocab != t_vocab:
        raise DistillError(f"the student's vocabulary has {s_vocab} tokens and the teacher's {t_vocab}; "
                           f"distill between models with the same tokenizer")
    if step.signals == "logits":
        return
    for s, t in step.pairs.items():
        if s_taps[s].shape != t_taps[t].shape:
            raise DistillError(f"student {s} gives {list(s_taps[s].shape)} and teacher {t} "
                               f"{list(t_taps[t].shape)}; map states of one width or use signals='logits'")


# ------------------------------------------------------------------ the loop


def _averaged(terms: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """The step's loss terms as numbers, averaged over the ranks' slices."""
    names = sorted(terms)
    values = torch.stack([terms[n].detach().float() for n in names])
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return dict(zip(names, values.tolist()))


def _copy_back(trained: Program, student: fx.GraphModule, teacher: fx.GraphModule) -> None:
    """The trained copy's (gathered) weights into the student: in place, except where a
    student weight is the teacher's storage (a student compiled to share it), which gets a
    tensor of its own: distillation never writes to its teacher."""
    full = trained.full_state_dict()
    teacher_storages = {t.untyped_storage().data_ptr() for t in teacher.parameters()}
    with torch.no_grad():
        for name, param in list(student.named_parameters(remove_duplicate=False)):
            if param.untyped_storage().data_ptr() in teacher_storages:
                ir.replace_tensor(student, param, torch.nn.Parameter(full[name].clone(), param.requires_grad))
            else:
                param.copy_(full[name])


def distill(student: Any, teacher: Any, data: Any, *, signals: str = "logits", steps: int = 100,
            lr: float = 1e-3, temperature: float = 2.0, alpha: float = 1.0, hidden_weight: float = 1.0,
            hidden_map: Mapping[str, str] | None = None, optimizer: type = torch.optim.AdamW,
            weight_decay: float = 0.0, clip: float | None = 1.0, world_size: int | None = None,
            passes: str | Sequence[str] | None = None, log_every: int = 10, progress: bool = True) -> Distilled:
    """Train `student` to match `teacher` for `steps` batches of `data`; see the module doc.

    student, teacher: bmc Programs or nn.Modules (modules are traced on the first batch with
    dynamic batch and sequence). data: bmc.data.Batches, a callable step -> (inputs, targets),
    or an iterable of (inputs, targets). signals: "logits" (KL at `temperature`), "hidden"
    (MSE of block outputs, mapped by `hidden_map` or by name) or "both". alpha: the weight of
    distillation against the LM loss on the targets. passes: the training program's pipeline
    after the tap (default `dp` when world_size > 1). world_size: the process group's by
    default. The teacher is only read. Returns (student Program, history).
    """
    world_size = resolve_world_size(world_size)
    _check_arguments(signals, steps, temperature, alpha, world_size)
    if signals == "logits" and hidden_map is not None:
        raise DistillError("hidden_map maps hidden states, which signals='logits' does not use; "
                           "pass signals='hidden' or 'both', or leave hidden_map out")
    rank = dist.get_rank() if world_size > 1 else 0
    batches = _Data(data, rank, world_size)
    first = batches(0)
    teacher_gm, student_gm = _graph(teacher, first[0], "teacher"), _graph(student, first[0], "student")
    _check_fits(teacher_gm, first, "teacher")
    _check_fits(student_gm, first, "student")
    pairs = _hidden_pairs(student_gm, teacher_gm, hidden_map) if signals != "logits" else {}
    s_head, t_head = _logits_point(student_gm), _logits_point(teacher_gm)
    # the teacher only runs forward on each rank's slice: tapped, not lowered to a backend
    tapped = PassManager(_tap([t_head, *pairs.values()])).run(_shared_copy(teacher_gm)).graph_module
    tapped_teacher = Program(tapped, backend="torch", context=PassContext())
    train = bmc_compile(_private_copy(student_gm), passes=[*_tap([s_head, *pairs]), *_pipeline(passes, world_size)],
                        world_size=world_size)
    opt = train.optimizer(optimizer, lr=lr, weight_decay=weight_decay)
    loss_of = _Step(signals, temperature, alpha, hidden_weight, s_head, t_head, pairs)
    history = _train(train, opt, tapped_teacher, batches, first, loss_of, steps, clip, world_size,
                     log_every, progress and rank == 0)
    _copy_back(train, student_gm, teacher_gm)
    result = student if isinstance(student, Program) else get_backend("torch").lower(student_gm, PassContext())
    result.lineage = _distilled_step(getattr(student, "lineage", []), result, teacher, signals, steps, history)
    return Distilled(result, history)


def _distilled_step(lineage: list[dict], result: Program, teacher: Any, signals: str, steps: int,
                    history: list[dict]) -> list[dict]:
    """The student's lineage with this distillation as a step (the weights it left, by digest)."""
    if not lineage:
        return []
    from bmc.models import weights as weight_files
    teacher_lineage = getattr(teacher, "lineage", [])
    step = {"kind": "distill", "signals": signals, "steps": steps, "final_loss": history[-1]["loss"] if history else None,
            "teacher": weight_files.step_digest(teacher_lineage[-1]) if teacher_lineage else None}
    return weight_files.next_step(lineage, step, {"weights": weight_files.weights_digest(result.graph_module)})


def _pipeline(passes: str | Sequence[str] | None, world_size: int) -> list[str]:
    """What the training copy runs after its tap: the caller's pipeline, else dp on many ranks."""
    if passes is None:
        return ["dp"] if world_size > 1 else []
    return [passes] if isinstance(passes, str) else list(passes)


def _train(train: Program, opt, teacher: Program, batches: _Data, first: tuple, loss_of: _Step, steps: int,
           clip: float | None, world_size: int, log_every: int, progress: bool) -> list[dict[str, float]]:
    history = []
    bar = tqdm(range(steps), desc="distill", unit="step", disable=not progress)
    for step in bar:
        inputs, targets = first if step == 0 else batches(step)
        with torch.no_grad():
            t_out, t_taps = _run(teacher, inputs, targets)
        s_out, s_taps = _run(train, inputs, targets)
        if step == 0:
            _check_shapes(s_out, s_taps, t_out, t_taps, loss_of)
        terms = loss_of(s_out, s_taps, t_out, t_taps, targets)
        terms["loss"].backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
        record = _averaged(terms, world_size)
        if not math.isfinite(record["loss"]):
            raise DistillError(f"the distillation loss became {record['loss']} at step {step}; lower lr")
        history.append({"step": step, **record})
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("distill step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return history
