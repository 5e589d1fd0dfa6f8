"""``python -m pbt_lab.pbt``: the command; the recipe is ``pbt_lab/experiments/pbt.py``."""

import sys

from pbt_lab.experiments.pbt import main

if __name__ == "__main__":
    sys.exit(main())
