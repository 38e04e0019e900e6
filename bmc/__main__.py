"""`bmc run DIR ...` / `python -m bmc run DIR ...` serves an ort-paged build (bmc/serve.py);
`python -m bmc ...` otherwise runs bmc-opt."""
import sys


def entry() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        from bmc.cli.run import main as serve
        return serve(sys.argv[2:])
    if sys.argv[0].endswith("bmc") and len(sys.argv) > 1 and sys.argv[1] not in ("run",):
        sys.stderr.write("bmc: the command is `bmc run DIR --prompt TEXT` (bmc-opt plans and builds)\n")
        return 2
    from bmc.cli.opt import main
    return main()


if __name__ == "__main__":
    sys.exit(entry())
