"""``python -m pbt_lab.scaling``: the command; the recipe is ``pbt_lab/experiments/scaling.py``."""

import sys

from pbt_lab.experiments.scaling import main

if __name__ == "__main__":
    sys.exit(main())
