"""Rewrite machinery the passes share: projections and their operands (linear.py), region
fusion (regions.py), parameter slicing (params.py) and the table-driven engine that follows a
split or head dimension through views, reshapes, expands and splits (dims.py)."""
