"""Runs and searchers compared at equal compute."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pbt_lab.names import BEST_VAL_ACC
from pbt_lab.plots.common import plt, save


def plot_compute_curves(curves: dict, x: str, label: str, path: Path) -> Path:
    """Best validation accuracy so far against compute spent so far, one line per run (equal-compute view)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        c = curve.dropna(subset=[BEST_VAL_ACC])
        ax.step(c[x], c[BEST_VAL_ACC], where="post", label=name)
    ax.set(
        xscale="log",
        xlabel=label,
        ylabel="best validation accuracy so far",
        title=f"What each run had found for its compute ({label})",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def step_values(x: pd.Series, y: pd.Series, at: np.ndarray) -> np.ndarray:
    """``y`` as the step function of ``x`` it is (each value holds until the next), read at ``at``;
    NaN before the first ``x``."""
    i = np.searchsorted(x.to_numpy(float), at, side="right") - 1
    values = y.ffill().to_numpy(float)
    return np.where(i >= 0, values[np.clip(i, 0, None)], np.nan)


def compare_figure(curves: pd.DataFrame, summary: dict, path: Path) -> Path:
    """Best validation accuracy so far against training steps spent, per method: the median over
    seeds, with their range as a band; the budget dotted."""
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = np.linspace(0, summary["budget_steps"], 200)
    for i, (method, c) in enumerate(curves.groupby("method", sort=False)):
        runs = [step_values(s["cum_steps"], s[BEST_VAL_ACC], steps) for _, s in c.groupby("seed")]
        colour = plt.get_cmap("tab10")(i)
        with warnings.catch_warnings():  # before a seed's first check it has no value: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            middle, low, high = (f(runs, axis=0) for f in (np.nanmedian, np.nanmin, np.nanmax))
        ax.plot(steps, middle, color=colour, label=f"{method} ({len(runs)} seeds)")
        ax.fill_between(steps, low, high, color=colour, alpha=0.2)
    ax.axvline(summary["budget_steps"], color="grey", ls=":", lw=1)
    ax.set(xlabel="training steps spent (all trials)", ylabel="best validation accuracy so far")
    ax.set_ylim(max(0.0, float(curves[BEST_VAL_ACC].quantile(0.05)) - 0.02), 1.0)
    ax.legend(loc="lower right")
    ax.set_title("Searchers at equal compute")
    return save(fig, path)
