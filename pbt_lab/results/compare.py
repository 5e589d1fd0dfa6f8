"""The comparison's tables (``python -m pbt_lab.compare``): one row per method × seed, medians and
ranges per method, and the Markdown a README takes as it is. Pure pandas: no Ray, no TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pbt_lab import UserError
from pbt_lab.names import (
    BEST_VAL_ACC,
    ERROR,
    FIGURES,
    FINAL_VAL_ACC,
    LR,
    OPTIMIZER,
    STATUS,
    TEST_ACC,
    TRIAL_ID,
    WINNER_VAL_ACC,
)
from pbt_lab.results.analysis import compute_until
from pbt_lab.results.tables import write_json, write_parquet

COMPARE, CURVES = "compare.parquet", "compare_curves.parquet"
COMPARE_SUMMARY, COMPARE_MD = "compare_summary.json", "compare.md"
MEASURES = (WINNER_VAL_ACC, TEST_ACC, "steps", "steps_to_grid_best", "efficiency")


def compare_row(method: str, seed: int, tables: dict, curve: pd.DataFrame) -> dict:
    """What one method at one seed found, and the compute it spent: the end of ``curve``, its
    history's ``compute_curve``."""
    trials, summary = tables["trials"], tables["summary"]
    if method == "pbt" and (summary.get("winner") or {}).get(TRIAL_ID):
        pool = trials[trials[TRIAL_ID] == summary["winner"][TRIAL_ID]]
    else:
        pool = trials[trials[TEST_ACC].notna()].sort_values(FINAL_VAL_ACC, ascending=False)
    winner = pool.iloc[0] if len(pool) else None
    return {
        "method": method,
        "seed": seed,
        "steps": int(curve["cum_steps"].iloc[-1]) if len(curve) else 0,
        "trials": int((trials["iterations"] > 0).sum()),  # not those a budget stop left unstarted
        WINNER_VAL_ACC: float(winner[FINAL_VAL_ACC]) if winner is not None else None,
        TEST_ACC: float(winner[TEST_ACC]) if winner is not None else None,
        OPTIMIZER: winner[OPTIMIZER] if winner is not None else None,
        LR: float(winner[LR]) if winner is not None else None,
        "winner": winner[TRIAL_ID] if winner is not None else None,
        "errors": int((trials[STATUS] == ERROR).sum()),
        # The share of its slot-seconds that trained (its time_breakdown): the searcher's cost in wall time.
        "efficiency": (summary.get("time_breakdown") or {}).get("efficiency"),
        "run_dir": str(summary["run_dir"]),
    }


def compare_line(row: dict, seconds: float) -> str:
    """The progress line of one finished method × seed."""
    found = (
        f"winner val {row[WINNER_VAL_ACC]:.4f}, test {row[TEST_ACC]:.4f} ({row[OPTIMIZER]} at {row[LR]:.3g})"
        if row[WINNER_VAL_ACC] is not None
        else "no trial ran to its end"
    )
    errors = f", {row['errors']} failed" if row["errors"] else ""
    spent = f"{row['steps']:,} steps in {row['trials']} trials"
    return f"{row['method']:6} seed {row['seed']}: {spent}, {found}{errors}, {seconds:.0f} s"


def steps_to_grid_best(frame: pd.DataFrame, curves: pd.DataFrame, near_best: float) -> list:
    """Per row: the steps its method had spent when the best validation any of its trials had shown so
    far first came within ``near_best`` of the grid's winner's at the same seed (None: never, or no grid
    at that seed)."""
    grid_best = frame[frame["method"] == "grid"].set_index("seed")[WINNER_VAL_ACC]
    out = []
    for row in frame.itertuples():
        curve = curves[(curves["method"] == row.method) & (curves["seed"] == row.seed)]
        level = grid_best.get(row.seed)
        hit = None if level is None else compute_until(curve, curve[BEST_VAL_ACC] >= level - near_best - 1e-9)
        out.append(hit["steps"] if hit else None)
    return out


def write_comparison(
    run_dir: Path,
    rows: list[dict],
    curves: list[pd.DataFrame],
    *,
    config: dict,
    data: dict,
    budget: int,
    near_best: float,
    wall_seconds: float,
) -> dict:
    """compare.parquet, compare_curves.parquet, compare_summary.json, compare.md and its figure."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    curve = pd.concat(curves, ignore_index=True)
    frame["steps_to_grid_best"] = pd.array(steps_to_grid_best(frame, curve, near_best), dtype="Int64")
    write_parquet(run_dir / COMPARE, frame)
    write_parquet(run_dir / CURVES, curve)
    summary = {
        "kind": "compare",
        "budget_steps": budget,
        "near_best": near_best,
        "config": config,
        "data": data,
        "wall_seconds": wall_seconds,
        "methods": {m: method_stats(g) for m, g in frame.groupby("method", sort=False)},
        "runs": json.loads(frame.to_json(orient="records")),
    }
    write_json(run_dir / COMPARE_SUMMARY, summary)
    markdown = compare_markdown(summary)
    (run_dir / COMPARE_MD).write_text(markdown + "\n")
    from pbt_lab import plots  # matplotlib loads only where figures are drawn

    plots.compare_figure(curve, summary, run_dir / FIGURES / "compare.png")
    return {"compare": frame, "curves": curve, "summary": summary, "markdown": markdown}


def method_stats(g: pd.DataFrame) -> dict:
    """Median and range over seeds of each measure; how many seeds reached the grid's best."""
    stats = {"seeds": len(g), "reached_grid_best": int(g["steps_to_grid_best"].notna().sum())}
    for measure in MEASURES:
        values = g[measure].dropna().astype(float) if measure in g else pd.Series(dtype=float)
        stats[measure] = (
            {"median": float(values.median()), "min": float(values.min()), "max": float(values.max())}
            if len(values)
            else None
        )
    return stats


def compare_markdown(summary: dict) -> str:
    """Median [min – max] over seeds per method: the table the README shows."""

    def cell(s: dict | None, fmt: str) -> str:
        if s is None:
            return "–"
        return f"{s['median']:{fmt}} [{s['min']:{fmt}} – {s['max']:{fmt}}]"

    pt = f"{summary['near_best'] * 100:g}"
    lines = [
        f"| method | seeds | steps used | winner's val acc | its test acc | steps to grid best − {pt} pt |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in summary["methods"].items():
        reached = f"{cell(s['steps_to_grid_best'], ',.0f')} ({s['reached_grid_best']}/{s['seeds']})"
        lines.append(
            f"| {method} | {s['seeds']} | {cell(s['steps'], ',.0f')} | {cell(s[WINNER_VAL_ACC], '.4f')} "
            f"| {cell(s[TEST_ACC], '.4f')} | {reached} |"
        )
    return "\n".join(lines)


def read_comparison(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(compare, curves, summary) of a comparison's run directory."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / COMPARE_SUMMARY).is_file():
        raise UserError(f"{run_dir} has no {COMPARE_SUMMARY}: not a finished python -m pbt_lab.compare run")
    return (
        pd.read_parquet(run_dir / COMPARE),
        pd.read_parquet(run_dir / CURVES),
        json.loads((run_dir / COMPARE_SUMMARY).read_text()),
    )
