"""What summary.json says of a run beside the tables: the best trial, each optimizer's best rates and
band, the compute spent and saved, the machine and versions it ran on. Pure pandas on the trials table.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd

from pbt_lab.names import (
    BEST_VAL_ACC,
    BUILDER,
    CAPPED,
    DIVERGED,
    ERROR,
    FINAL_VAL_ACC,
    LR,
    OPTIMIZER,
    REACHED,
    SECONDS_TO_TARGET,
    SEED,
    STALLED,
    STATUS,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_SECONDS,
    TRIAL_ID,
    VALIDATE,
    WEIGHTS,
)
from pbt_lab.results.lineage import plain as _plain


def per_optimizer(trials: pd.DataFrame, check_steps: int | None = None) -> dict:
    """Per optimizer: the best rate, fewest steps to target (then seconds), and the band of rates within
    one check (``check_steps``) of those steps, which the check interval cannot tell apart; the band
    of rates that reached at all; counts per status."""
    out = {}
    for name, t in trials.groupby(OPTIMIZER):
        reached = t[t[STATUS] == REACHED].sort_values([STEPS_TO_TARGET, SECONDS_TO_TARGET])
        best = reached.iloc[0] if len(reached) else None
        tied = reached[reached[STEPS_TO_TARGET] <= reached[STEPS_TO_TARGET].min() + (check_steps or 0)]
        out[name] = {
            "best_lr": float(best[LR]) if best is not None else None,
            "best_band": [float(tied[LR].min()), float(tied[LR].max())] if len(tied) else None,
            "best_band_lrs": sorted(float(x) for x in tied[LR].unique()),
            STEPS_TO_TARGET: int(best[STEPS_TO_TARGET]) if best is not None else None,
            SECONDS_TO_TARGET: float(best[SECONDS_TO_TARGET]) if best is not None else None,
            "band": [float(reached[LR].min()), float(reached[LR].max())] if len(reached) else None,
            "reached_lrs": sorted(float(x) for x in reached[LR].unique()),
            "trials": len(t),
            REACHED: len(reached),
            DIVERGED: int((t[STATUS] == DIVERGED).sum()),
            STALLED: int((t[STATUS] == STALLED).sum()),
            CAPPED: int((t[STATUS] == CAPPED).sum()),
            "errors": int((t[STATUS] == ERROR).sum()),
        }
    return out


def best_trial(trials: pd.DataFrame) -> dict | None:
    """The fastest trial to the target (fewest steps, then seconds); if none reached it, the best
    validation accuracy."""
    reached = trials[trials[STATUS] == REACHED].sort_values([STEPS_TO_TARGET, SECONDS_TO_TARGET])
    pool = reached if len(reached) else trials.sort_values(BEST_VAL_ACC, ascending=False)
    if not len(pool):
        return None
    row = pool.iloc[0]
    return {
        k: _plain(row[k])
        for k in (
            TRIAL_ID,
            OPTIMIZER,
            LR,
            SEED,
            BUILDER,
            "scale",
            WEIGHTS,
            STATUS,
            STEPS_TO_TARGET,
            SECONDS_TO_TARGET,
            BEST_VAL_ACC,
            FINAL_VAL_ACC,
            TEST_ACC,
            "trial_dir",
        )
    }


def compute_totals(trials: pd.DataFrame, session: dict) -> dict:
    """Compute spent, the session it was spent in (start, wall seconds, slots), and what stopping
    diverged and stalled trials early saved (estimated: each would otherwise have run as long as
    the median trial that ran to its budget)."""
    capped = trials[trials[STATUS] == CAPPED]
    full_run = float(capped[TRAIN_SECONDS].median()) if len(capped) else None
    totals = {
        "trials": len(trials),
        "steps": int(trials["steps"].sum()),
        TRAIN_SECONDS: float(trials["compute_train_seconds"].sum()),
        "trial_seconds": float(trials["compute_trial_seconds"].sum()),
        **{k: session.get(k) for k in SESSION},
    }
    for status, saving in ((DIVERGED, "divergence"), (STALLED, "stall")):
        stopped = trials[trials[STATUS] == status]
        totals |= {
            f"{status}_trials": len(stopped),
            f"{status}_train_seconds": float(stopped[TRAIN_SECONDS].sum()),
            f"{saving}_saved_train_seconds_estimate": float(
                (full_run - stopped[TRAIN_SECONDS]).clip(lower=0).sum()
            )
            if full_run
            else 0.0,
        }
    return totals


def config_value(config: dict | None, previous: dict, section: str, key: str):
    """A setting of the run's config (a rebuild: the last summary's), None where it has none."""
    return ((config if config is not None else previous.get("config")) or {}).get(section, {}).get(key)


SESSION = ("started_at", "wall_seconds", "slots")  # the last fit: when, how long, on how many trial slots


def versions() -> dict:
    names = ("pbt_lab", "ray", "tensorflow", "keras", "numpy", "pandas", "pyarrow")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), **found}


def machine() -> dict:
    """The machine a run's seconds were measured on: its CPU model and cores."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count()}


def ranking_figures(summary: dict, trials: pd.DataFrame) -> dict | None:
    """What PBT's ranking trades: the validation examples each member is ranked on, the standard error
    of an accuracy measured on that many at the population's accuracy (the median member's last
    validation), √(p(1 − p)/n), and validation's share of the slot-seconds."""
    validation = (summary.get("data") or {}).get("val")
    rank = config_value(summary.get("config"), {}, "train", "rank_examples")
    examples = min(rank, validation) if rank and validation else validation
    accuracy = trials[FINAL_VAL_ACC].dropna().median() if FINAL_VAL_ACC in trials else None
    if not examples or accuracy is None or pd.isna(accuracy):
        return None
    breakdown = summary.get("time_breakdown") or {}
    return {
        "examples": int(examples),
        "whole_split": int(validation),
        "accuracy": float(accuracy),
        "standard_error": math.sqrt(accuracy * (1 - accuracy) / examples),
        "share": (breakdown.get("shares") or {}).get(VALIDATE),
    }
