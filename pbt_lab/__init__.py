"""pbt_lab: population-based training vs the exhaustive optimizer × learning-rate grid.

See README.md for the quick start and DESIGN.md (shared) for the architecture.
"""

import argparse

__version__ = "0.1.0"


class UserError(ValueError):
    """Bad input from the user: entry points print it as one line and exit with code 2."""


class StorageFull(RuntimeError):
    """The run's storage filled up mid-run: the run stops, resumable, says so in one line, exits 1."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def __getattr__(name: str):
    """The Python API (``pbt_lab.run_pbt``, ``pbt_lab.run_grid``) and the scheduler for any Ray trainable
    (``pbt_lab.LabPBT`` with its callbacks ``pbt_lab.pbt_callbacks``), imported on first use: Ray and the
    experiments load only when asked for."""
    if name in ("run_pbt", "run_grid", "RunResult", "LabPBT", "KeepPBTState", "pbt_callbacks", "audited"):
        from pbt_lab import api

        return getattr(api, name)
    raise AttributeError(f"module 'pbt_lab' has no attribute {name!r}")
