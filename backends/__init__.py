"""bmc.backends: lower a transformed graph to something that runs. Each backend registers
itself with the core's registry (bmc.plugins) when its module loads; pyproject.toml's
`bmc.backends` entry points name the modules."""
