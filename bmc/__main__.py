"""`python -m bmc ...` runs bmc-opt."""
import sys

from bmc.cli import main

sys.exit(main())
