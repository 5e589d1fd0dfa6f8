"""``python -m pbt_lab.compare``: the command; the recipe is ``pbt_lab/experiments/compare.py``."""

import sys

from pbt_lab.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
