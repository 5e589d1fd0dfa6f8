"""``python -m pbt_lab.grid``: the command; the recipe is ``pbt_lab/experiments/grid.py``."""

import sys

from pbt_lab.experiments.grid import main

if __name__ == "__main__":
    sys.exit(main())
