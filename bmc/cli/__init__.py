"""The application layer: `bmc-opt` (opt.py), `bmc run` (run.py), reports and local rank
launching. Like tools/, it sits on top and may import passes and backends."""
