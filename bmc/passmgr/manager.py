"""The pass manager: declared passes, one registry, pipeline strings, presets, requirement
checks before anything runs, verification after every pass, and instrumentation hooks.

A pass is declared once:

    @register_pass("dce", options=DceOptions, provides=(), invalidates=("cost",))
    class DeadCodeElimination(Pass):
        '''Remove nodes whose results are never used.'''
        def run(self, gm) -> PassResult: ...

and run from a pipeline string that round-trips: `tp{degree=2},zero{stage=3},insert-remat`.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch.fx as fx

from bmc.errors import BmcError, PassFailure, PipelineError
from bmc.passmgr.equivalence import EXACT, Equivalence
from bmc.passmgr.properties import PROVIDER, Properties, check_backend, check_pipeline, graph_properties

log = logging.getLogger(__name__)

# Properties a freshly traced graph has. Passes declare what they require, provide and break.
INITIAL_PROPERTIES = frozenset({"shapes"})


@dataclass(frozen=True)
class PassResult:
    """What a pass returns (torch.fx's PassResult plus statistics)."""

    graph_module: fx.GraphModule
    modified: bool
    statistics: Mapping[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


@dataclass
class PassContext:
    """What a pass may know besides the graph: the plan's world size and mesh, the settings
    the cost model evaluates at, and calibration batches for data-driven passes (each batch
    what example_inputs is: a tuple of args or an (args, kwargs) pair; bmc/calibration.py)."""

    world_size: int = 1
    mesh: Mapping[str, int] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    calibration: Sequence[Any] | None = None


class Pass:
    """Base class of every pass. Subclasses are declared with @register_pass."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()
    forbids: ClassVar[tuple[tuple[str, str], ...]] = ()
    contract: ClassVar[Equivalence] = EXACT

    def __init__(self, options: Any = None, context: PassContext | None = None):
        self.options = options if options is not None else self.Options()
        self.context = context or PassContext()

    def check(self) -> None:
        """Validate options against the context before anything runs; raise a BmcError."""

    def properties(self) -> Properties:
        """The graph properties this pass, with its options, requires, provides, invalidates and
        forbids (bmc/passmgr/properties.py). Passes whose options change them override this."""
        return Properties(self.requires, self.provides, self.invalidates, self.forbids)

    def equivalence(self) -> Equivalence:
        """What this pass, with its options, promises about the function (bmc.check holds it
        to it). Passes whose options change it override this."""
        return self.contract

    def run(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


REGISTRY: dict[str, type[Pass]] = {}
PRESETS: dict[str, tuple[str, str]] = {}  # name -> (pipeline, summary)


def register_pass(name: str, *, options: type = NoOptions, requires: Sequence[str] = (),
                  provides: Sequence[str] = (), invalidates: Sequence[str] = (),
                  forbids: Sequence[tuple[str, str] | str] = (), equivalence: Equivalence = EXACT):
    """Class decorator declaring a pass: its name, typed options, the graph properties it
    requires, provides, invalidates and forbids (a property that must not hold yet, alone or
    with the reason to give), and what it promises about the function (bmc/passmgr/
    equivalence.py; exact by default). The docstring's first line is its summary."""
    if not dataclasses.is_dataclass(options) or not options.__dataclass_params__.frozen:
        raise TypeError(f"options of pass {name!r} must be a frozen dataclass")

    def wrap(cls: type[Pass]) -> type[Pass]:
        if name in REGISTRY or name in PRESETS:
            raise ValueError(f"pass {name!r} is already registered")
        doc = (cls.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"pass {name!r} needs a docstring whose first line is its summary")
        cls.name, cls.summary, cls.Options = name, doc.splitlines()[0], options
        cls.requires, cls.provides, cls.invalidates = tuple(requires), tuple(provides), tuple(invalidates)
        cls.forbids = tuple((f, "") if isinstance(f, str) else tuple(f) for f in forbids)
        cls.contract = equivalence
        REGISTRY[name] = cls
        return cls

    return wrap


def register_preset(name: str, pipeline: str, summary: str) -> None:
    """A short name users type (`zero3`, `ckpt`) that expands to a pipeline."""
    if name in REGISTRY or name in PRESETS:
        raise ValueError(f"{name!r} is already a pass or preset")
    PRESETS[name] = (pipeline, summary)


def unregister(name: str) -> None:
    """Remove a pass or preset (tests register throwaway passes)."""
    REGISTRY.pop(name, None)
    PRESETS.pop(name, None)


def load_builtin_passes() -> None:
    """Load the pass plugins (bmc.plugins), so every installed pass registers itself."""
    from bmc.plugins import load_passes
    load_passes()


# ------------------------------------------------------------------ option values

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _type_name(_unwrap_optional(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an int", float: "a number", bool: "true|false", str: "a string"}.get(tp, str(tp))


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(tp)


def _unwrap_optional(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def parse_value(raw: Any, tp: Any) -> Any:
    """Convert the text of an option value to the option's declared type (ValueError if not)."""
    if _is_optional(tp):
        return None if raw == "none" else parse_value(raw, _unwrap_optional(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ValueError
    if origin is tuple:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(parse_value(item, typing.get_args(tp)[0]) for item in items)
    if isinstance(raw, list):
        raise ValueError
    if tp is bool:
        if raw in ("true", "false"):
            return raw == "true"
        raise ValueError
    if tp is int:
        return int(raw.replace("_", ""), 0)
    if tp is float:
        return float(raw)
    if tp is str:
        return raw
    raise ValueError


def format_value(value: Any) -> str:
    """The canonical text of an option value; parse_value(format_value(v)) == v."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and (not value or any(c in value for c in ',{}=[]" ')):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value) if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ pipelines

@dataclass(frozen=True)
class PassSpec:
    """One pass in a pipeline with the options given explicitly (in the order given)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in self.options) + "}"

    def make_options(self) -> Any:
        cls = REGISTRY[self.name].Options
        try:
            return cls(**dict(self.options))
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"bad options for pass '{self.name}': {exc}") from None


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __len__(self) -> int:
        return len(self.passes)


class _Parser:
    """Recursive-descent parser for `name{key=value,...},name`; errors point at the column."""

    STOP = set(',{}=[]"')

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, expected: str) -> PipelineError:
        got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of input"
        return PipelineError(f"malformed pipeline {self.text!r} at column {self.pos + 1}: "
                             f"expected {expected}, got {got}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(repr(char))
        self.pos += 1

    def word(self, what: str) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in self.STOP \
                and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.fail(what)
        return self.text[start:self.pos]

    def value(self) -> Any:
        char = self.peek()
        if char == "[":
            self.pos += 1
            items = [] if self.peek() == "]" else [self.value()]
            while self.peek() == ",":
                self.pos += 1
                items.append(self.value())
            self.expect("]")
            return items
        if char == '"':
            return self.quoted()
        return self.word("an option value")

    def quoted(self) -> str:
        self.pos += 1
        out = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            out.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            raise self.fail("a closing '\"'")
        self.pos += 1
        return "".join(out)

    def item(self) -> tuple[str, list[tuple[str, Any, int]], int]:
        self.skip_space()
        column = self.pos
        name = self.word("a pass name")
        options: list[tuple[str, Any, int]] = []
        if self.peek() == "{":
            self.pos += 1
            if self.peek() != "}":
                options.append(self.option())
                while self.peek() == ",":
                    self.pos += 1
                    options.append(self.option())
            self.expect("}")
        return name, options, column

    def option(self) -> tuple[str, Any, int]:
        self.skip_space()
        column = self.pos
        key = self.word("an option name")
        self.expect("=")
        return key, self.value(), column

    def items(self) -> list:
        if not self.text.strip():
            raise PipelineError("empty pipeline: give passes as --pass=NAME[,NAME...] (see --list-passes)")
        found = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            found.append(self.item())
        if self.peek():
            raise self.fail("',' or '{'")
        return found


def _unknown_pass(name: str) -> PipelineError:
    known = sorted(REGISTRY) + sorted(PRESETS)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return PipelineError(f"unknown pass '{name}'; {hint}known passes: {', '.join(known)}")


def _typed_option(pass_name: str, key: str, raw: Any, column: int) -> tuple[str, Any]:
    options_cls = REGISTRY[pass_name].Options
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    if key not in fields:
        names = ", ".join(fields) or "none"
        raise PipelineError(f"pass '{pass_name}' has no option '{key}' (column {column + 1}); its options: {names}")
    tp = typing.get_type_hints(options_cls)[key]
    try:
        return key, parse_value(raw, tp)
    except ValueError:
        raise PipelineError(f"option '{key}' of pass '{pass_name}' expects {_type_name(tp)}, "
                            f"got {raw!r} (column {column + 1})") from None


def parse_pipeline(text: str | Pipeline | Sequence[str]) -> Pipeline:
    """Parse a pipeline string (or a list of them), expanding presets, checking every pass
    name, option name and option type. Raises PipelineError pointing at the column."""
    if isinstance(text, Pipeline):
        return text
    load_builtin_passes()
    if not isinstance(text, str):
        return Pipeline(tuple(spec for part in text for spec in parse_pipeline(part).passes))
    specs: list[PassSpec] = []
    for name, options, column in _Parser(text).items():
        if name in PRESETS:
            if options:
                raise PipelineError(f"preset '{name}' takes no options (column {column + 1}); "
                                    f"write its expansion instead: {PRESETS[name][0]}")
            specs.extend(parse_pipeline(PRESETS[name][0]).passes)
            continue
        if name not in REGISTRY:
            raise _unknown_pass(name)
        typed = tuple(_typed_option(name, key, raw, col) for key, raw, col in options)
        seen = [k for k, _ in typed]
        if len(set(seen)) != len(seen):
            raise PipelineError(f"pass '{name}' is given an option twice (column {column + 1})")
        spec = PassSpec(name, typed)
        spec.make_options()
        specs.append(spec)
    return Pipeline(tuple(specs))


# ------------------------------------------------------------------ instrumentation

class Instrument:
    """Hooks the manager calls around the pipeline and around every pass (no-ops here)."""

    def before_pipeline(self, gm: fx.GraphModule, pipeline: Pipeline) -> None: ...

    def before_pass(self, index: int, spec: PassSpec) -> None: ...

    def after_pass(self, index: int, spec: PassSpec, gm: fx.GraphModule, result: PassResult,
                   seconds: float) -> None: ...

    def after_pipeline(self, gm: fx.GraphModule) -> None: ...

    def on_failure(self, index: int, spec: PassSpec, exc: BaseException) -> str | None:
        """Called when a pass or its verification fails; may return a note for the error."""
        return None


# ------------------------------------------------------------------ the manager

@dataclass
class PassRecord:
    """What one pass did in a run."""

    spec: PassSpec
    modified: bool
    statistics: Mapping[str, int | float]
    seconds: float


class PassManager:
    """Runs a pipeline on a graph: requirement checks first, then each pass, each followed by
    verification (unless verify=False) and the instruments' hooks."""

    def __init__(self, pipeline: str | Pipeline | Sequence[str], *, context: PassContext | None = None,
                 verify: bool = True, instruments: Sequence[Instrument] = ()):
        load_builtin_passes()
        self.pipeline = parse_pipeline(pipeline)
        self.context = context or PassContext()
        self.verify = verify
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []
        self.passes = [REGISTRY[s.name](s.make_options(), self.context) for s in self.pipeline.passes]

    def check(self, initial: Mapping[str, str] | frozenset[str] = INITIAL_PROPERTIES, backend=None) -> dict[str, str]:
        """Every pass's option checks and declared properties, from the `initial` ones (a
        graph's, by graph_properties) through the pipeline to the backend, before anything
        runs. Returns the properties the pipeline ends with (property -> what gave it)."""
        for pass_ in self.passes:
            pass_.check()
        if not isinstance(initial, Mapping):
            initial = {prop: PROVIDER.get(prop, "the input graph") for prop in initial}
        if self.context.calibration is not None:
            initial = {**initial, "calibration": "calibration data"}
        steps = [(spec.name, str(spec), pass_.properties()) for spec, pass_ in zip(self.pipeline.passes, self.passes)]
        providers: dict[str, list[str]] = {}
        for name, cls in sorted(REGISTRY.items()):
            for prop in cls.provides:
                providers.setdefault(prop, []).append(name)
        available = check_pipeline(steps, initial, providers)
        if backend is not None:
            check_backend(backend, available)
        return available

    def run(self, gm: fx.GraphModule, backend=None) -> PassResult:
        from bmc.ir.verify import verify_graph
        self.check(graph_properties(gm), backend)
        for instrument in self.instruments:
            instrument.before_pipeline(gm, self.pipeline)
        self.records = []
        for index, (spec, pass_) in enumerate(zip(self.pipeline.passes, self.passes), start=1):
            for instrument in self.instruments:
                instrument.before_pass(index, spec)
            start = time.perf_counter()
            try:
                before = _node_signatures(gm)
                result = pass_.run(gm)
                gm = result.graph_module
                if result.modified:
                    _record_origins(gm, before, spec.name)
                if result.modified:
                    gm.recompile()
                if self.verify:
                    verify_graph(gm, after=spec.name)
            except Exception as exc:  # noqa: BLE001 - every failure gets the reproducer hook
                raise self._failure(index, spec, exc) from exc
            seconds = time.perf_counter() - start
            self.records.append(PassRecord(spec, result.modified, dict(result.statistics), seconds))
            log.info("pass %s: %s in %.3fs %s", spec, "changed" if result.modified else "no change",
                     seconds, dict(result.statistics))
            for instrument in self.instruments:
                instrument.after_pass(index, spec, gm, result, seconds)
        for instrument in self.instruments:
            instrument.after_pipeline(gm)
        stats = {f"{r.spec.name}.{k}": v for r in self.records for k, v in r.statistics.items()}
        return PassResult(gm, any(r.modified for r in self.records), stats)

    def equivalence(self) -> Equivalence:
        """What the whole pipeline promises about the function (its loosest pass)."""
        from bmc.passmgr.equivalence import combine
        return combine((spec.name, pass_.equivalence()) for spec, pass_ in zip(self.pipeline.passes, self.passes))

    def _failure(self, index: int, spec: PassSpec, exc: Exception) -> BmcError:
        notes = [n for i in self.instruments if (n := i.on_failure(index, spec, exc))]
        suffix = ("; " + "; ".join(notes)) if notes else ""
        if isinstance(exc, BmcError):
            exc.args = (f"{exc.args[0] if exc.args else exc}{suffix}",)
            return exc
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return PassFailure(f"pass '{spec.name}' (#{index}) failed: {type(exc).__name__}: {first}{suffix}")


# node.meta key: every pass that created or changed the node, in order (not a bmc.* annotation:
# it does not travel through a .pt2 archive; bmc.check reads it in the process that compiled)
TOUCHED_KEY = "bmc_touched_by"


def _node_signatures(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: _signature(n) for n in gm.graph.nodes}


def _signature(node: fx.Node) -> str:
    """What a pass may change about a node: what it computes, from what, at which shape."""
    return f"{node.op} {node.target} {node.args} {node.kwargs} {getattr(node.meta.get('val'), 'shape', '')}"


def _record_origins(gm: fx.GraphModule, before: Mapping[str, str], pass_name: str) -> None:
    """`bmc.origin` on every node the pass created or rewrote, where the pass did not record
    one itself: a new node comes from its first input that existed before, a rewritten node
    (other inputs, another shape) from itself. The first pass to touch a node keeps it (tp
    splits a projection; insert-collectives only feeds it through f afterwards). bmc.check
    names the pass that made the first wrong value from it."""
    from bmc import ir
    for node in gm.graph.nodes:
        signature = before.get(node.name)
        if signature is not None and signature == _signature(node):
            continue
        touched = node.meta.setdefault(TOUCHED_KEY, [])
        if pass_name not in touched:
            touched.append(pass_name)
        if ir.get(node, ir.Origin) is not None:
            continue
        if signature is None:
            source = next((a.name for a in node.all_input_nodes if a.name in before), "")
        else:
            source = node.name
        ir.annotate(node, ir.Origin(pass_name, source))


def describe_passes() -> str:
    """A listing of every pass with its options, and every preset."""
    load_builtin_passes()
    lines = ["passes:"]
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        opts = ", ".join(f"{f.name}={format_value(f.default) if f.default is not dataclasses.MISSING else '?'}"
                         for f in dataclasses.fields(cls.Options))
        lines.append(f"  {name:<18} {cls.summary}" + (f"  {{{opts}}}" if opts else ""))
    lines.append("presets:")
    for name in sorted(PRESETS):
        lines.append(f"  {name:<18} {PRESETS[name][1]}  = {PRESETS[name][0]}")
    return "\n".join(lines) + "\n"
