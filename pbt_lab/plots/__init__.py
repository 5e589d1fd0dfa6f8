"""The lab's pictures, drawn from the tidy tables only (never from Ray, never by training).

from pbt_lab.plots import grid_figures
grid_figures(trials, run_dir / "figures")
"""

from pbt_lab.plots.board import winner_board
from pbt_lab.plots.compare import compare_figure, plot_compute_curves, step_values
from pbt_lab.plots.study import (
    grid_figures,
    pbt_figures,
    plot_best_rate,
    plot_fastest_slowest,
    plot_lineage,
    plot_lr_schedules,
    plot_population,
    plot_schedule,
    plot_trace,
    plot_valley,
    run_figures,
    scaling_figures,
    trace_figures,
)
from pbt_lab.plots.time import plot_time_breakdown

__all__ = [
    "compare_figure",
    "grid_figures",
    "pbt_figures",
    "plot_best_rate",
    "plot_compute_curves",
    "plot_fastest_slowest",
    "plot_lineage",
    "plot_lr_schedules",
    "plot_population",
    "plot_schedule",
    "plot_time_breakdown",
    "plot_trace",
    "plot_valley",
    "run_figures",
    "scaling_figures",
    "step_values",
    "trace_figures",
    "winner_board",
]
