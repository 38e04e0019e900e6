"""What bmc reads off a graph: its structure (blocks, attention layouts, MLPs, ties), graph
patterns, the sympy cost model, and measurements to check the cost model against."""
