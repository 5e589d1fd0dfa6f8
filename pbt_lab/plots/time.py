"""Where a run's slot-seconds went, as stacked bars (``summary.json``'s ``time_breakdown``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pbt_lab.plots.common import plt, save


def plot_time_breakdown(breakdown: dict, path: Path) -> Path:
    """Where the slot-seconds went: one stacked bar for the run (slot_idle included), one per member."""
    members = breakdown["members"]
    bars = {"run": breakdown["parts"], **members}
    parts = list(breakdown["parts"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(bars) + 3), 5))
    bottom = np.zeros(len(bars))
    colours = plt.get_cmap("tab20")
    for i, part in enumerate(parts):
        values = np.array([max(0.0, bar.get(part, 0.0)) for bar in bars.values()])
        ax.bar(range(len(bars)), values, bottom=bottom, color=colours(i), label=part)
        bottom += values
    ax.axhline(breakdown["slot_seconds"], color="black", ls=":", lw=1, label="wall × slots")
    ax.set_xticks(
        range(len(bars)), [name[-5:] if name != "run" else name for name in bars], rotation=90, fontsize=7
    )
    ax.set(
        ylabel="seconds",
        title=f"Where the slot-seconds went: efficiency {breakdown['efficiency']:.0%} "
        f"({breakdown['slots']} slots × {breakdown['wall_seconds']:.0f} s)",
    )
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)
