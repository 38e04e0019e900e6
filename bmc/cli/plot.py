"""`bmc plot RUN_DIR [RUN_DIR ...] [-o loss.png]`: the loss curves of training runs (the --out
directories of tools/train.py, each with its loss.jsonl), overlaid in one picture."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bmc.errors import BmcError


class PlotUsageError(BmcError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise PlotUsageError(f"{message} (see bmc plot --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bmc plot", description="Draw the loss curves of training runs, overlaid.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a tools/train.py --out directory (its loss.jsonl)")
    p.add_argument("-o", "--output", default="loss.png", metavar="FILE.png", help="the picture (default loss.png)")
    return p


def run(argv: Sequence[str] | None, out) -> int:
    from bmc.cli.plots import loss_figure
    args = build_parser().parse_args(argv)
    out.write(f"wrote {loss_figure(args.runs, args.output)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv, sys.stdout)
    except BmcError as exc:
        sys.stderr.write(f"bmc plot: error: {' '.join(str(exc).split())}\n")
        return 2
