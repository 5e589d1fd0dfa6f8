"""``python -m pbt_lab.trace``: the command; the recipe is ``pbt_lab/experiments/trace.py``."""

import sys

from pbt_lab.experiments.trace import main

if __name__ == "__main__":
    sys.exit(main())
