"""What the tables answer: the width study's fits and best rates, and
compute curves for comparing runs at equal compute. Pure pandas and NumPy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pbt_lab.names import (
    BEST_VAL_ACC,
    CHECK_SECONDS,
    LR,
    OPTIMIZER,
    REACHED,
    SECONDS_TO_TARGET,
    SEGMENT_STEP,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TRAIN_SECONDS,
    TRIAL_ID,
    VAL_ACC,
)


def linear_fit(x, y) -> dict | None:
    """Least squares y = c + k·x with R² (null below 3 points: two points fit any line exactly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    k, c = np.polyfit(x, y, 1)
    residual = float(((y - (c + k * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = (1 - residual / total if total > 0 else 1.0) if len(x) >= 3 else None
    return {"c": float(c), "k": float(k), "r2": r2, "points": len(x)}


def scaling_summary(trials: pd.DataFrame, base_scale: float) -> dict:
    """The width study's answers: per optimizer the best rate at each width (fewest steps to the
    target, then fewest seconds; rates within the check resolution of it are tied) and whether it
    moved from the narrowest width's; per rate the fits steps, seconds = c + k·n over widths
    (n = weights, reached trials only)."""
    t = trials.assign(width=(trials["scale"] / base_scale).round(6))
    base_width = float(t["width"].min())
    best_rates, moved, fits = {}, {}, []
    for optimizer, o in t.groupby(OPTIMIZER):
        rows = []
        for width, w in o.groupby("width"):
            reached = w[w[STATUS] == REACHED].sort_values([STEPS_TO_TARGET, SECONDS_TO_TARGET])
            best = reached.iloc[0] if len(reached) else None
            rows.append(
                {
                    "width": float(width),
                    "scale": float(w["scale"].iloc[0]),
                    "weights": int(w["weights"].iloc[0]),
                    "best_lr": float(best[LR]) if best is not None else None,
                    STEPS_TO_TARGET: int(best[STEPS_TO_TARGET]) if best is not None else None,
                    SECONDS_TO_TARGET: float(best[SECONDS_TO_TARGET]) if best is not None else None,
                    "tied_lrs": sorted(
                        float(x)
                        for x in reached.loc[reached[STEPS_TO_TARGET] == reached[STEPS_TO_TARGET].min(), LR]
                    ),
                    REACHED: len(reached),
                    "trials": len(w),
                }
            )
        base = rows[0]["best_lr"]
        for row in rows:  # how the narrowest width's best rate does at this width
            at = o[(o["width"] == row["width"]) & np.isclose(o[LR], base or np.nan) & (o[STATUS] == REACHED)]
            row["base_best_lr_steps"] = int(at[STEPS_TO_TARGET].min()) if len(at) else None
        best_rates[optimizer] = rows
        # Moved: at some width the narrowest width's best rate is not among the fastest (or failed).
        moved[optimizer] = (
            None
            if base is None
            else any(r["best_lr"] is not None and base not in r["tied_lrs"] for r in rows)
        )
        for lr, g in o[o[STATUS] == REACHED].groupby(LR):
            fits.append(
                {
                    OPTIMIZER: optimizer,
                    LR: float(lr),
                    "widths": sorted(float(w) for w in g["width"]),
                    "seconds": linear_fit(g["weights"], g[SECONDS_TO_TARGET]),
                    "steps": linear_fit(g["weights"], g[STEPS_TO_TARGET].astype(float)),
                }
            )
    return {
        "base_scale": base_scale,
        "base_width": base_width,
        "widths": sorted(float(w) for w in t["width"].unique()),
        "best_rates": best_rates,
        "best_rate_moved": moved,
        "fits": fits,
    }


def compute_curve(history: pd.DataFrame) -> pd.DataFrame:
    """A run's checks in the order they happened, with the compute spent so far (training seconds,
    steps) and the best validation accuracy seen so far: how far the run had got for its compute."""
    h = history.sort_values(["timestamp", TRIAL_ID]).copy()
    previous = h.groupby(TRIAL_ID)[STEP].shift().fillna(0)
    # A check after a restore trained from the checkpoint's step, not from the row before.
    start = h[SEGMENT_STEP].astype(float).where(h[SEGMENT_STEP].notna(), previous)
    h["check_steps"] = (h[STEP] - start).clip(lower=0)
    h["cum_steps"] = h["check_steps"].cumsum()
    h["cum_train_seconds"] = h[CHECK_SECONDS].fillna(0).cumsum()
    h[BEST_VAL_ACC] = h[VAL_ACC].cummax().ffill()
    h["reached_target"] = h[STEPS_TO_TARGET].notna()
    return h[
        [
            "timestamp",
            TRIAL_ID,
            OPTIMIZER,
            LR,
            STEP,
            VAL_ACC,
            BEST_VAL_ACC,
            "reached_target",
            "cum_steps",
            "cum_train_seconds",
        ]
    ].reset_index(drop=True)


def compute_until(curve: pd.DataFrame, mask: pd.Series) -> dict | None:
    """The compute a run had spent at its first check where ``mask`` holds (None if it never did)."""
    hit = curve[mask]
    if not len(hit):
        return None
    row = hit.iloc[0]
    return {
        "steps": int(row["cum_steps"]),
        TRAIN_SECONDS: float(row["cum_train_seconds"]),
        TRIAL_ID: row[TRIAL_ID],
        OPTIMIZER: row[OPTIMIZER],
        LR: float(row[LR]),
    }
