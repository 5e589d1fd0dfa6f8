"""The study's pictures: the valley, PBT's population and lineage, the width study, the trace."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pbt_lab.names import (
    DIVERGED,
    LR,
    OPTIMIZER,
    REACHED,
    SECONDS_TO_TARGET,
    SEGMENT_FROM,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TRAIN_SECONDS,
    TRIAL_ID,
    VAL_ACC,
    WEIGHTS,
)
from pbt_lab.plots.common import COLOURS, plt, save
from pbt_lab.plots.time import plot_time_breakdown


def _cap(trials: pd.DataFrame, column: str) -> float:
    """Where failures are drawn: the most any trial spent (the budget, when one ran out)."""
    return float(trials[TRAIN_SECONDS if column == SECONDS_TO_TARGET else "steps"].max())


def _valley_points(trials: pd.DataFrame, column: str, cap: float) -> pd.DataFrame:
    """Median (over seeds) of ``column`` per optimizer and rate, failures counted at the cap."""
    t = trials.assign(
        value=trials[column].astype(float).where(trials[STATUS] == REACHED, cap),
        failed=trials[STATUS] != REACHED,
        diverged=trials[STATUS] == DIVERGED,
    )
    return t.groupby([OPTIMIZER, LR], as_index=False).agg(
        value=("value", "median"), failed=("failed", "all"), diverged=(DIVERGED, "all")
    )


def plot_valley(trials: pd.DataFrame, column: str, cap: float, label: str, path: Path) -> Path:
    """The study's valley: ``column`` against learning rate, log-log, one line per optimizer;
    failures sit on the cap (hollow: capped, ×: diverged)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    points = _valley_points(trials, column, cap)
    for name, p in points.groupby(OPTIMIZER):
        colour = COLOURS.get(name)
        ax.plot(p[LR], p["value"], "-", color=colour, alpha=0.6, label=name)
        ok, capped, diverged = p[~p["failed"]], p[p["failed"] & ~p[DIVERGED]], p[p[DIVERGED]]
        ax.plot(ok[LR], ok["value"], "o", color=colour, ms=5)
        ax.plot(capped[LR], capped["value"], "o", mfc="none", color=colour, ms=5)
        ax.plot(diverged[LR], diverged["value"], "x", color=colour, ms=6)
    ax.axhline(cap, color="grey", lw=0.8, ls=":")
    ax.text(
        points[LR].min(), cap, " cap: failed (○ capped, × diverged)", va="bottom", fontsize=8, color="grey"
    )
    ax.set(
        xscale="log", yscale="log", xlabel="learning rate", ylabel=label, title=f"{label} vs learning rate"
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_fastest_slowest(trials: pd.DataFrame, cap: float, path: Path) -> Path:
    """Per learning rate, the fastest and the slowest optimizer to the target (failures at the cap)."""
    points = _valley_points(trials, SECONDS_TO_TARGET, cap)
    fig, ax = plt.subplots(figsize=(8, 5))
    for lr, p in points.groupby(LR):
        for row, marker in ((p.loc[p["value"].idxmin()], "v"), (p.loc[p["value"].idxmax()], "^")):
            ax.plot(lr, row["value"], marker, color=COLOURS.get(row[OPTIMIZER]), ms=7)
    best = points.groupby(LR)["value"].min()
    worst = points.groupby(LR)["value"].max()
    ax.fill_between(best.index, best.values, worst.values, color="grey", alpha=0.15)
    for name in sorted(points[OPTIMIZER].unique()):
        ax.plot([], [], "s", color=COLOURS.get(name), label=name)
    ax.plot([], [], "kv", label="fastest"), ax.plot([], [], "k^", label="slowest")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="seconds to target (cap: failed)",
        title="Fastest and slowest optimizer per learning rate",
    )
    ax.legend(fontsize=8, ncol=2)
    return save(fig, path)


def grid_figures(trials: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The valley in seconds and in steps, and fastest/slowest per rate (any run's trials)."""
    seconds_cap, steps_cap = _cap(trials, SECONDS_TO_TARGET), _cap(trials, STEPS_TO_TARGET)
    out_dir = Path(out_dir)
    return [
        plot_valley(
            trials, SECONDS_TO_TARGET, seconds_cap, "seconds to target", out_dir / "valley_seconds.png"
        ),
        plot_valley(trials, STEPS_TO_TARGET, steps_cap, "steps to target", out_dir / "valley_steps.png"),
        plot_fastest_slowest(trials, seconds_cap, out_dir / "fastest_slowest.png"),
    ]


# --- population-based training --------------------------------------------------------------


def _segments(h: pd.DataFrame):
    """A member's history cut where its state came from elsewhere (an exploit), so lines do not
    jump back and forth across a copy."""
    starts = h[SEGMENT_FROM].notna() & (h[SEGMENT_FROM] != h[TRIAL_ID])
    return [seg for _, seg in h.groupby(starts.cumsum())]


def plot_population(history: pd.DataFrame, lineage: pd.DataFrame | None, metric: str, path: Path) -> Path:
    """Every member's ``metric`` over steps, coloured by the optimizer it was using; exploits marked."""
    fig, ax = plt.subplots(figsize=(9, 5))
    rows = history.dropna(subset=[metric])
    for _, h in rows.groupby(TRIAL_ID):
        for seg in _segments(h):
            for _, part in seg.groupby((seg[OPTIMIZER] != seg[OPTIMIZER].shift()).cumsum()):
                ax.plot(
                    part[STEP],
                    part[metric],
                    "-",
                    color=COLOURS.get(part[OPTIMIZER].iloc[0]),
                    lw=1,
                    alpha=0.8,
                )
    if lineage is not None and len(lineage):
        ax.plot(lineage[STEP], lineage["donor_score"], "k*", ms=7, label="exploit (copied at)")
    for name in sorted(rows[OPTIMIZER].unique()):
        ax.plot([], [], "-", color=COLOURS.get(name), label=name)
    ax.set(
        xlabel="training step",
        ylabel=metric.replace("_", " "),
        title=f"Population: {metric.replace('_', ' ')} over steps",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_lr_schedules(history: pd.DataFrame, path: Path) -> Path:
    """Every member's learning rate over steps (log scale), coloured by optimizer."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for _, h in history.groupby(TRIAL_ID):
        for seg in _segments(h):
            ax.step(
                seg[STEP],
                seg[LR],
                where="pre",
                color=COLOURS.get(seg[OPTIMIZER].iloc[-1]),
                lw=1,
                alpha=0.8,
            )
    for name in sorted(history[OPTIMIZER].unique()):
        ax.plot([], [], "-", color=COLOURS.get(name), label=name)
    ax.set(
        yscale="log",
        xlabel="training step",
        ylabel="learning rate",
        title="Learning-rate schedules of all members",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_key_schedules(
    history: pd.DataFrame, keys: list[str], title: str, path: Path, lineage_of: str | None = None
) -> Path:
    """One panel per searched key: its value over steps for every member in ``history`` (a log axis
    where a key's values span more than a decade), coloured by the optimizer in use; with
    ``lineage_of``, ``history`` is that member's rows along its lineage, drawn as one line."""
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 1.9 * len(keys) + 1), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        values = pd.to_numeric(history[key], errors="coerce")
        rows = history.assign(**{key: values})
        for _, h in rows.groupby(TRIAL_ID) if lineage_of is None else [(lineage_of, rows)]:
            for seg in _segments(h) if lineage_of is None else [h]:
                for _, part in seg.groupby((seg[OPTIMIZER] != seg[OPTIMIZER].shift()).cumsum()):
                    ax.step(
                        part[STEP], part[key], where="pre", color=COLOURS.get(part[OPTIMIZER].iloc[0]), lw=1
                    )
        positive = values[values > 0]
        if len(positive) and positive.max() > 10 * positive.min():
            ax.set_yscale("log")
        ax.set_ylabel(key.removeprefix("model.options."), fontsize=8)
    for name in sorted(history[OPTIMIZER].unique()):
        axes[0, 0].plot([], [], "-", color=COLOURS.get(name), label=name)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("training step")
    return save(fig, path)


def plot_lineage(history: pd.DataFrame, lineage: pd.DataFrame, path: Path) -> Path:
    """Who copied whom, when: a row per member over wall time, an arrow from donor to recipient."""
    members = sorted(history[TRIAL_ID].unique())
    y = {t: i for i, t in enumerate(members)}
    start = history["timestamp"].min()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(members) + 2))
    for t, h in history.groupby(TRIAL_ID):
        ax.plot(h["timestamp"] - start, [y[t]] * len(h), "-", color="lightgrey", lw=3)
    for _, e in lineage.iterrows():
        ax.annotate(
            "",
            xy=(e["timestamp"] - start, y[e["recipient"]]),
            xytext=(e["timestamp"] - start, y[e["donor"]]),
            arrowprops={"arrowstyle": "->", "color": COLOURS.get(e["new_optimizer"]), "lw": 1},
        )
    ax.set_yticks(range(len(members)), [m.rsplit("_", 1)[-1] for m in members], fontsize=7)
    ax.set(
        xlabel="wall seconds",
        ylabel="member",
        title="Lineage: arrows from donor to recipient at each exploit",
    )
    return save(fig, path)


def plot_schedule(schedule_rows: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """One schedule: learning rate (log, left) and accuracy (right) over steps, optimizer labelled."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.step(schedule_rows[STEP], schedule_rows[LR], where="pre", color="black")
    changed = schedule_rows[OPTIMIZER] != schedule_rows[OPTIMIZER].shift()
    for _, r in schedule_rows[changed].iterrows():
        ax.annotate(r[OPTIMIZER], (r[STEP], r[LR]), fontsize=8, color=COLOURS.get(r[OPTIMIZER]))
    ax.set(yscale="log", xlabel="training step", ylabel="learning rate", title=title)
    acc = schedule_rows.dropna(subset=[metric])
    right = ax.twinx()
    right.plot(acc[STEP], acc[metric], "o-", color="tab:green", ms=3)
    right.set_ylabel(metric.replace("_", " "), color="tab:green")
    return save(fig, path)


def pbt_figures(tables: dict, out_dir: Path) -> list[Path]:
    """The PBT figures: population accuracy, learning-rate schedules, lineage, the winner's schedule
    (``tables["winner_rows"]``: the history rows along its lineage)."""
    history, lineage, summary = tables["history"], tables.get("lineage"), tables["summary"]
    out_dir = Path(out_dir)
    made = [
        plot_population(history, lineage, VAL_ACC, out_dir / "population.png"),
        plot_lr_schedules(history, out_dir / "lr_schedules.png"),
    ]
    keys = tables.get("searched") or [LR]
    if len(keys) > 1:  # a recipe beyond the rate: a panel per key, for the population and the winner
        made.append(
            plot_key_schedules(history, keys, "Every searched key of every member", out_dir / "schedules.png")
        )
    if lineage is not None and len(lineage):
        made.append(plot_lineage(history, lineage, out_dir / "lineage.png"))
    winner = (summary.get("best") or {}).get(TRIAL_ID)
    if winner and len(keys) > 1 and tables.get("winner_rows") is not None:
        title = f"Winner {winner}: its schedule of every searched key"
        path = out_dir / "winner_schedules.png"
        made.append(plot_key_schedules(tables["winner_rows"], keys, title, path, lineage_of=winner))
    if winner and tables.get("winner_rows") is not None:
        made.append(
            plot_schedule(
                tables["winner_rows"],
                VAL_ACC,
                f"Winner {winner}: its schedule",
                out_dir / "winner_schedule.png",
            )
        )
    return made


def run_figures(kind: str | None, tables: dict, out_dir: Path) -> list[Path]:
    """The figures of a run of this kind (what ``results.write_tables`` draws)."""
    breakdown = tables["summary"].get("time_breakdown")
    made = [plot_time_breakdown(breakdown, Path(out_dir) / "time_breakdown.png")] if breakdown else []
    if kind == "scaling":
        return made + scaling_figures(tables["trials"], tables["summary"]["scaling"], out_dir)
    if kind == "trace":
        return made + trace_figures(tables["history"], out_dir)
    made += grid_figures(tables["trials"], out_dir)
    if kind in ("pbt", "replay"):
        made += pbt_figures(tables, out_dir)
    return made


# --- width scaling --------------------------------------------------------------------------


def plot_scaling(trials: pd.DataFrame, scaling: dict, column: str, label: str, path: Path) -> Path:
    """``column`` (steps or seconds to target) against width, one line per optimizer × rate (reached
    trials only), with each rate's fit c + k·n (n = weights) dashed."""
    t = trials[trials[STATUS] == REACHED].assign(width=trials["scale"] / scaling["base_scale"])
    fits = {(f[OPTIMIZER], f[LR]): f for f in scaling["fits"]}
    widths = trials.assign(width=trials["scale"] / scaling["base_scale"]).groupby("width")[WEIGHTS].first()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("viridis")
    rates = sorted(t.groupby([OPTIMIZER, LR]).groups)
    for i, (optimizer, lr) in enumerate(rates):
        colour = colours(i / max(1, len(rates) - 1))
        p = t[(t[OPTIMIZER] == optimizer) & (t[LR] == lr)].sort_values("width")
        ax.plot(p["width"], p[column].astype(float), "o-", color=colour, ms=4, label=f"{optimizer} {lr:.3g}")
        fit = fits[(optimizer, lr)].get("seconds" if column == SECONDS_TO_TARGET else "steps")
        if fit:
            ax.plot(widths.index, fit["c"] + fit["k"] * widths.values, "--", color=colour, lw=0.8)
    ax.set(
        xlabel=f"width (× model.scale {scaling['base_scale']:g})",
        ylabel=label,
        title=f"{label} vs width (dashed: c + k·n, n = weights)",
    )
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)


def plot_best_rate(scaling: dict, path: Path, lrs=()) -> Path:
    """The best rate at each width per optimizer; the bar spans the rates tied with it (same steps).
    Faint lines mark ``lrs``, the rates trained: the resolution of the answer."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for lr in lrs:
        ax.axhline(lr, color="grey", lw=0.5, alpha=0.5)
    for optimizer, rows in scaling["best_rates"].items():
        rows = [r for r in rows if r["best_lr"] is not None]
        if not rows:
            continue
        x = [r["width"] for r in rows]
        best = [r["best_lr"] for r in rows]
        low = [b - min(r["tied_lrs"]) for b, r in zip(best, rows)]
        high = [max(r["tied_lrs"]) - b for b, r in zip(best, rows)]
        ax.errorbar(
            x, best, yerr=[low, high], fmt="o-", capsize=4, color=COLOURS.get(optimizer), label=optimizer
        )
    ax.set(
        yscale="log",
        xlabel=f"width (× model.scale {scaling['base_scale']:g})",
        ylabel="best learning rate",
        title="Best learning rate vs width (bar: rates tied at the fewest steps)",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def scaling_figures(trials: pd.DataFrame, scaling: dict, out_dir: Path) -> list[Path]:
    """Steps and seconds to target vs width per rate, and the best rate vs width."""
    out_dir = Path(out_dir)
    return [
        plot_scaling(trials, scaling, STEPS_TO_TARGET, "steps to target", out_dir / "scaling_steps.png"),
        plot_scaling(
            trials, scaling, SECONDS_TO_TARGET, "seconds to target", out_dir / "scaling_seconds.png"
        ),
        plot_best_rate(scaling, out_dir / "best_rate_vs_width.png", sorted(trials[LR].unique())),
    ]


# --- trace and run comparison -----------------------------------------------------------------


def plot_trace(history: pd.DataFrame, x: str, label: str, path: Path) -> Path:
    """Validation accuracy against ``x`` (train_seconds or step), one line per trial's optimizer and rate."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for (optimizer, lr), h in history.dropna(subset=[VAL_ACC]).groupby([OPTIMIZER, LR]):
        ax.plot(h[x], h[VAL_ACC], ".-", color=COLOURS.get(optimizer), ms=4, label=f"{optimizer} {lr:.3g}")
    ax.set(
        xlabel=label,
        ylabel="validation accuracy",
        title=f"Validation accuracy over {label}, each optimizer at its best rate",
    )
    ax.set_ylim(max(0.0, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=8)
    return save(fig, path)


def trace_figures(history: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The study's trace: validation accuracy over training seconds and over steps."""
    out_dir = Path(out_dir)
    return [
        plot_trace(history, TRAIN_SECONDS, "training seconds", out_dir / "trace_time.png"),
        plot_trace(history, STEP, "steps", out_dir / "trace_steps.png"),
    ]
