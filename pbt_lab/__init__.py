"""pbt_lab: population-based training vs the exhaustive optimizer × learning-rate grid.

See README.md for the quick start and DESIGN.md (shared) for the architecture.
"""

__version__ = "0.1.0"


class UserError(ValueError):
    """Bad input from the user: entry points print it as one line and exit with code 2."""
