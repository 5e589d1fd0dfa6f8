"""Ray's run directories → the tidy tables of DESIGN §3 → what they answer. Never imports Ray or
TensorFlow: plots, the report and the notebooks read only what is here.

    from pbt_lab.results import read_tables, write_tables
    write_tables("~/ray_results/grid-quick")      # (re)builds the tables, summary.json and figures
    trials, history, summary = read_tables("~/ray_results/grid-quick")

- ``ray_files``: Ray's files read as JSON (no pickle);
- ``tables``: trials, history, summary (and the PBT parts from ``lineage``), written and read;
- ``summary``: what summary.json says beside the tables (best trial, per-optimizer bands, compute);
- ``audit``: every restore held to what its saver reported (``restores.parquet``);
- ``lineage``: PBT's record read back: lineage table, exploit audit, quantile sizes, winner;
- ``analysis``: width-study fits, compute curves;
- ``breakdown``: where a run's slot-seconds went, and whether the parts add up;
- ``console``: what a finished run prints and its exit code;
- ``compare``: the comparison of searchers at equal compute.
"""

from pbt_lab.results.analysis import compute_curve, compute_until, linear_fit, scaling_summary
from pbt_lab.results.breakdown import check_breakdown, time_breakdown
from pbt_lab.results.compare import (
    compare_line,
    compare_markdown,
    compare_row,
    read_comparison,
    write_comparison,
)
from pbt_lab.results.console import console_summary, exit_status
from pbt_lab.results.lineage import member_schedule, schedule_changes
from pbt_lab.results.ray_files import ray_trial_states, read_checkpoint_meta, remove_cut_short_checkpoints
from pbt_lab.results.summary import best_trial, machine, per_optimizer, versions
from pbt_lab.results.tables import read_lineage_table, read_tables, write_tables

__all__ = [
    "best_trial",
    "check_breakdown",
    "compare_line",
    "compare_markdown",
    "compare_row",
    "compute_curve",
    "compute_until",
    "console_summary",
    "exit_status",
    "linear_fit",
    "machine",
    "member_schedule",
    "per_optimizer",
    "ray_trial_states",
    "read_checkpoint_meta",
    "read_comparison",
    "read_lineage_table",
    "read_tables",
    "remove_cut_short_checkpoints",
    "scaling_summary",
    "schedule_changes",
    "time_breakdown",
    "versions",
    "write_comparison",
    "write_tables",
]
