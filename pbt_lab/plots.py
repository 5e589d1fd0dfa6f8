"""The study's pictures, drawn from the tidy tables only (never from Ray, never by training).

    from pbt_lab.plots import grid_figures
    grid_figures(trials, run_dir / "figures")
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: runs headless on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pbt_lab.config import OPTIMIZER_NAMES  # noqa: E402

COLOURS = dict(zip(OPTIMIZER_NAMES, plt.get_cmap("tab10").colors))


def _cap(trials: pd.DataFrame, column: str) -> float:
    """Where failures are drawn: the most any trial spent (the budget, when one ran out)."""
    return float(trials["train_seconds" if column == "seconds_to_target" else "steps"].max())


def _valley_points(trials: pd.DataFrame, column: str, cap: float) -> pd.DataFrame:
    """Median (over seeds) of ``column`` per optimizer and rate, failures counted at the cap."""
    t = trials.assign(value=trials[column].astype(float).where(trials["status"] == "reached", cap),
                      failed=trials["status"] != "reached", diverged=trials["status"] == "diverged")
    return t.groupby(["optimizer", "lr"], as_index=False).agg(
        value=("value", "median"), failed=("failed", "all"), diverged=("diverged", "all"))


def plot_valley(trials: pd.DataFrame, column: str, cap: float, label: str, path: Path) -> Path:
    """The study's valley: ``column`` against learning rate, log-log, one line per optimizer;
    failures sit on the cap (hollow: capped, ×: diverged)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    points = _valley_points(trials, column, cap)
    for name, p in points.groupby("optimizer"):
        colour = COLOURS.get(name)
        ax.plot(p["lr"], p["value"], "-", color=colour, alpha=0.6, label=name)
        ok, capped, diverged = p[~p["failed"]], p[p["failed"] & ~p["diverged"]], p[p["diverged"]]
        ax.plot(ok["lr"], ok["value"], "o", color=colour, ms=5)
        ax.plot(capped["lr"], capped["value"], "o", mfc="none", color=colour, ms=5)
        ax.plot(diverged["lr"], diverged["value"], "x", color=colour, ms=6)
    ax.axhline(cap, color="grey", lw=0.8, ls=":")
    ax.text(points["lr"].min(), cap, " cap: failed (○ capped, × diverged)", va="bottom", fontsize=8, color="grey")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=label, title=f"{label} vs learning rate")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fastest_slowest(trials: pd.DataFrame, cap: float, path: Path) -> Path:
    """Per learning rate, the fastest and the slowest optimizer to the target (failures at the cap)."""
    points = _valley_points(trials, "seconds_to_target", cap)
    fig, ax = plt.subplots(figsize=(8, 5))
    for lr, p in points.groupby("lr"):
        for row, marker in ((p.loc[p["value"].idxmin()], "v"), (p.loc[p["value"].idxmax()], "^")):
            ax.plot(lr, row["value"], marker, color=COLOURS.get(row["optimizer"]), ms=7)
    best = points.groupby("lr")["value"].min()
    worst = points.groupby("lr")["value"].max()
    ax.fill_between(best.index, best.values, worst.values, color="grey", alpha=0.15)
    for name in sorted(points["optimizer"].unique()):
        ax.plot([], [], "s", color=COLOURS.get(name), label=name)
    ax.plot([], [], "kv", label="fastest"), ax.plot([], [], "k^", label="slowest")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="seconds to target (cap: failed)",
           title="Fastest and slowest optimizer per learning rate")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def grid_figures(trials: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The grid's figures: the valley in seconds and in steps, and fastest/slowest per rate."""
    seconds_cap, steps_cap = _cap(trials, "seconds_to_target"), _cap(trials, "steps_to_target")
    out_dir = Path(out_dir)
    return [
        plot_valley(trials, "seconds_to_target", seconds_cap, "seconds to target", out_dir / "valley_seconds.png"),
        plot_valley(trials, "steps_to_target", steps_cap, "steps to target", out_dir / "valley_steps.png"),
        plot_fastest_slowest(trials, seconds_cap, out_dir / "fastest_slowest.png"),
    ]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
