"""`bmc run DIR ...` / `python -m bmc run DIR ...` serves an ort-paged build (bmc/serve.py);
`python -m bmc ...` otherwise runs bmc-opt."""
import sys


USAGE = """usage: bmc run DIR (--prompt TEXT | --prompt-ids IDS) [--max-tokens N] [--budget BYTES] ...

commands:
  bmc run DIR --prompt TEXT     generate text with an ort-paged build directory, under a memory
                                budget if given (`bmc run --help`: every option)
  bmc plot RUN_DIR ... -o FILE  loss curves of training runs (tools/train.py --out), overlaid
  bmc-opt MODEL --pass=...      trace, transform, plan, report and build: MODEL is zoo:NAME,
                                hf:DIR or a .pt2 (`bmc-opt --help`, `bmc-opt --list-passes`)

a build to serve: bmc-opt zoo:gpt-mini --weights trained --backend=ort-paged -o served/
"""


def entry() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        from bmc.cli.run import main as serve
        return serve(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        from bmc.cli.plot import main as plot
        return plot(sys.argv[2:])
    if sys.argv[0].endswith("bmc"):
        if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help", "help"):
            sys.stdout.write(USAGE)
            return 0
        sys.stderr.write(USAGE if len(sys.argv) == 1 else
                         f"bmc: unknown command {sys.argv[1]!r}: the commands are `bmc run DIR --prompt TEXT` "
                         f"and `bmc plot RUN_DIR ...` (bmc-opt plans and builds; bmc --help)\n")
        return 2
    from bmc.cli.opt import main
    return main()


if __name__ == "__main__":
    sys.exit(entry())
