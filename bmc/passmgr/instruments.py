"""Pass instrumentation, as MLIR offers it: print the IR after passes, dump one file per pass,
time passes, collect statistics, and write a reproducer when a pass fails."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
from typing import TextIO

import torch.fx as fx

from bmc import ir
from bmc.passmgr.manager import Instrument, PassResult, PassSpec, Pipeline
from bmc.ir.serialize import atomic_write_text, save_pt2

log = logging.getLogger(__name__)


def _banner(title: str) -> str:
    return f"// ----- // IR Dump {title} // ----- //\n"


class PrintIR(Instrument):
    """--print-ir-after-all, --print-ir-after=PASS[,PASS] and --print-ir-after-change."""

    def __init__(self, stream: TextIO, *, after_all: bool = False, after: tuple[str, ...] = (),
                 after_change: bool = False):
        self.stream, self.after_all, self.after, self.after_change = stream, after_all, set(after), after_change

    def after_pass(self, index: int, spec: PassSpec, gm: fx.GraphModule, result: PassResult,
                   seconds: float) -> None:
        wanted = self.after_all or spec.name in self.after or (self.after_change and result.modified)
        if wanted:
            self.stream.write(_banner(f"After {spec} (#{index})") + ir.format_graph(gm) + "\n")


class DumpDir(Instrument):
    """--dump-dir DIR: NN-<pass>.txt (the text graph) and NN-<pass>.dot per pass, with
    00-input for the graph before the pipeline; .svg too where Graphviz's `dot` is installed."""

    def __init__(self, directory: str, *, render_svg: bool = True):
        self.directory = directory
        self.dot = shutil.which("dot") if render_svg else None
        self.written: list[str] = []
        self.say_no_svg = render_svg and self.dot is None

    def _no_svg_notice(self) -> None:
        """Said once, when the first graph is written (not before: a bad input stays one line)."""
        if self.say_no_svg:
            self.say_no_svg = False
            log.warning("Graphviz's `dot` is not on PATH: %s gets .txt and .dot graphs, no .svg "
                        "(install graphviz, or render a .dot elsewhere)", self.directory)

    def before_pipeline(self, gm: fx.GraphModule, pipeline: Pipeline) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._no_svg_notice()
        self._dump(0, "input", gm, f"// input graph; pipeline: {pipeline}\n")

    def after_pass(self, index: int, spec: PassSpec, gm: fx.GraphModule, result: PassResult,
                   seconds: float) -> None:
        stats = ", ".join(f"{k}={v}" for k, v in result.statistics.items())
        header = f"// after {spec}: {'changed' if result.modified else 'no change'}; {stats}\n"
        self._dump(index, spec.name, gm, header)

    def _dump(self, index: int, name: str, gm: fx.GraphModule, header: str) -> None:
        stem = os.path.join(self.directory, f"{index:02d}-{name}")
        atomic_write_text(stem + ".txt", header + ir.format_graph(gm, title=name))
        atomic_write_text(stem + ".dot", ir.to_dot(gm, title=f"{index:02d}-{name}"))
        self.written += [stem + ".txt", stem + ".dot"]
        if self.dot:
            try:
                subprocess.run([self.dot, "-Tsvg", stem + ".dot", "-o", stem + ".svg"], check=True,
                               capture_output=True, timeout=120)
                self.written.append(stem + ".svg")
            except (subprocess.SubprocessError, OSError) as exc:
                log.warning("could not render %s.svg with dot: %s", stem, exc)


class Timing(Instrument):
    """--timing: wall time of each pass."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def after_pass(self, index, spec, gm, result, seconds) -> None:
        self.rows.append((str(spec), seconds))

    def format(self) -> str:
        total = sum(s for _, s in self.rows) or 1e-12
        lines = ["pass timing:", f"  {'seconds':>9}  {'share':>6}  pass"]
        lines += [f"  {s:9.4f}  {100 * s / total:5.1f}%  {name}" for name, s in self.rows]
        lines.append(f"  {sum(s for _, s in self.rows):9.4f}  100.0%  total")
        return "\n".join(lines) + "\n"


class Statistics(Instrument):
    """--pass-statistics: the counters each pass reported."""

    def __init__(self):
        self.rows: list[tuple[str, dict]] = []

    def after_pass(self, index, spec, gm, result, seconds) -> None:
        self.rows.append((str(spec), dict(result.statistics)))

    def format(self) -> str:
        lines = ["pass statistics:"]
        for name, stats in self.rows:
            lines.append(f"  {name}")
            lines += [f"    {value:>12}  {key}" for key, value in stats.items()] or ["    (none)"]
        return "\n".join(lines) + "\n"


class Reproducer(Instrument):
    """--reproducer DIR: on failure, write the pipeline's input graph (input.pt2) and the
    pipeline string, which `bmc-opt --run-reproducer DIR` runs again."""

    def __init__(self, directory: str):
        self.directory = directory
        self._input: fx.GraphModule | None = None
        self._pipeline = ""

    def before_pipeline(self, gm: fx.GraphModule, pipeline: Pipeline) -> None:
        # Passes rewrite the graph in place, so keep the input as it was.
        self._input = copy.deepcopy(gm)
        self._input.meta.update(gm.meta)
        self._pipeline = str(pipeline)

    def on_failure(self, index: int, spec: PassSpec, exc: BaseException) -> str | None:
        if self._input is None:
            return None
        try:
            os.makedirs(self.directory, exist_ok=True)
            save_pt2(self._input, os.path.join(self.directory, "input.pt2"))
        except Exception as save_exc:  # noqa: BLE001 - the original failure matters more
            log.warning("could not write the reproducer's input graph: %s", save_exc)
            return f"no reproducer: {save_exc}"
        atomic_write_text(os.path.join(self.directory, "pipeline.txt"), self._pipeline + "\n")
        atomic_write_text(os.path.join(self.directory, "failure.txt"),
                          f"pass #{index} {spec} failed: {type(exc).__name__}: {exc}\n")
        return f"reproducer written to {self.directory} (rerun: bmc-opt --run-reproducer {self.directory})"


class Progress(Instrument):
    """On a terminal, the pass running now (`bmc-opt: pass 2/3 prune-heads{score=taylor} ...`),
    redrawn in place and cleared when the pipeline ends; nothing when `stream` is not a
    terminal (piped output stays clean)."""

    def __init__(self, stream: TextIO):
        self.stream = stream if stream.isatty() else None
        self.count = 0

    def before_pipeline(self, gm: fx.GraphModule, pipeline: Pipeline) -> None:
        self.count = len(pipeline.passes)

    def before_pass(self, index: int, spec: PassSpec) -> None:
        if self.stream is not None:
            self.stream.write(f"\rbmc-opt: pass {index}/{self.count} {spec} ...\x1b[K")
            self.stream.flush()

    def after_pipeline(self, gm: fx.GraphModule) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
