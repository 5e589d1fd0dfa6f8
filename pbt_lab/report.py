"""A Markdown report comparing runs at equal compute: the table a user shows their team.

    python -m pbt_lab.report ~/ray_results/grid-cpu ~/ray_results/pbt-cpu --out report/

Per run: trials, steps, training seconds and trial-seconds spent, the best validation accuracy,
the fastest trial's steps and seconds to the target, and the compute the run had spent when a
trial first reached it; then for every pair of runs the compute each needed to reach the other's
best validation accuracy (PBT vs grid), and each run's best within the cheapest run's compute.
Reads only the tables (``results.read_tables``); writes ``report.md`` and ``figures/`` into --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pbt_lab import OneLineParser, UserError, plots, results
from pbt_lab.names import (
    BEST_VAL_ACC,
    FIGURES,
    LR,
    OPTIMIZER,
    REACHED,
    SECONDS_TO_TARGET,
    STATUS,
    STEPS_TO_TARGET,
    TRAIN_SECONDS,
    VAL_ACC,
)
from pbt_lab.storage import check_storage


def _fmt(value, spec: str = ",.0f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _compute(c: dict | None) -> str:
    return "not reached" if c is None else f"{c['steps']:,} steps, {c[TRAIN_SECONDS]:,.0f} s"


def load_runs(run_dirs: list[str]) -> dict:
    """{name: (trials, summary, compute curve)} per run directory, named by the directory (and by
    its kind too, when two directories share a name)."""
    loaded = []
    for run_dir in run_dirs:
        trials, history, summary = results.read_tables(run_dir)
        loaded.append(
            (Path(run_dir).expanduser().resolve().name, summary.get("kind"), trials, summary, history)
        )
    names = [name for name, *_ in loaded]
    runs = {}
    for name, kind, trials, summary, history in loaded:
        label = name if names.count(name) == 1 else f"{kind} {name}"
        if label in runs:
            raise UserError(
                f"two {kind} runs are named {name}: compare runs whose directories have different names"
            )
        runs[label] = (trials, summary, results.compute_curve(history))
    return runs


def run_rows(runs: dict) -> list[dict]:
    """One row per run: compute spent and what it found (see the module doc)."""
    cheapest = min(float(curve["cum_train_seconds"].iloc[-1]) for _, _, curve in runs.values())
    rows = []
    for name, (trials, summary, curve) in runs.items():
        best = trials.sort_values(BEST_VAL_ACC, ascending=False).iloc[0]
        reached = trials[trials[STATUS] == REACHED].sort_values([STEPS_TO_TARGET, SECONDS_TO_TARGET])
        fastest = reached.iloc[0] if len(reached) else None
        within = curve.loc[curve["cum_train_seconds"] <= cheapest * (1 + 1e-9), BEST_VAL_ACC].dropna()
        c = summary["compute"]
        rows.append(
            {
                "run": name,
                "kind": summary.get("kind"),
                "trials": c["trials"],
                "steps": c["steps"],
                TRAIN_SECONDS: c[TRAIN_SECONDS],
                "trial_seconds": c["trial_seconds"],
                "wall_seconds": c["wall_seconds"],
                BEST_VAL_ACC: float(best[BEST_VAL_ACC]),
                "best_config": f"{best[OPTIMIZER]} {best[LR]:.3g}",
                "target": summary["config"]["train"]["target"],
                "fastest_steps": int(fastest[STEPS_TO_TARGET]) if fastest is not None else None,
                "fastest_seconds": float(fastest[SECONDS_TO_TARGET]) if fastest is not None else None,
                "first_target": results.compute_until(curve, curve["reached_target"]),
                "best_within_cheapest": float(within.iloc[-1]) if len(within) else None,
            }
        )
    return rows


def cross_rows(runs: dict, rows: list[dict]) -> list[dict]:
    """For every ordered pair (a, b): the compute run a had spent when it first matched b's best."""
    best = {r["run"]: r[BEST_VAL_ACC] for r in rows}
    return [
        {
            "run": a,
            "other": b,
            "other_best": best[b],
            "needed": results.compute_until(curve, curve[VAL_ACC] >= best[b] - 1e-12),
        }
        for a, (_, _, curve) in runs.items()
        for b in runs
        if a != b
    ]


def markdown(rows: list[dict], cross: list[dict], figures: list[Path], out: Path) -> str:
    cheapest = min(r[TRAIN_SECONDS] for r in rows)
    lines = [
        "# pbt_lab report: runs at equal compute",
        "",
        "Seconds are pure training seconds (inside the fused training calls) unless marked trial-seconds "
        "(Ray's time per trial, overheads included); steps compare across machines exactly.",
        "",
        "## Runs",
        "",
        "| run | kind | trials | steps | train-seconds | trial-seconds | wall s | best val acc | best at "
        "| fastest trial to target: steps / s | run compute at first target | best val acc within "
        f"{cheapest:,.0f} train-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fastest = (
            "not reached"
            if r["fastest_steps"] is None
            else f"{r['fastest_steps']:,} / {r['fastest_seconds']:.1f}"
        )
        lines.append(
            f"| {r['run']} | {r['kind']} | {r['trials']} | {r['steps']:,} | {r[TRAIN_SECONDS]:,.0f} | "
            f"{r['trial_seconds']:,.0f} | {_fmt(r['wall_seconds'])} | {r['best_val_acc']:.2%} | "
            f"{r['best_config']} | "
            f"{fastest} (target {r['target']:.0%}) | {_compute(r['first_target'])} | "
            f"{_fmt(r['best_within_cheapest'], '.2%')} |"
        )
    if cross:
        lines += [
            "",
            "## Compute each run needed to reach the other's best",
            "",
            "Counted in the order the run's checks happened (all its trials, in parallel as they ran).",
            "",
            "| run | to reach | its best val acc | compute spent by then |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['run']} | {c['other']} | {c['other_best']:.2%} | {_compute(c['needed'])} |" for c in cross
        ]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str], out: str | Path) -> Path:
    """Write ``report.md`` and its figures into ``out``; returns the Markdown file's path."""
    out = Path(out).expanduser()
    runs = load_runs(run_dirs)
    rows = run_rows(runs)
    curves = {name: curve for name, (_, _, curve) in runs.items()}
    figures = [
        plots.plot_compute_curves(
            curves,
            "cum_train_seconds",
            "training seconds spent",
            out / FIGURES / "best_vs_train_seconds.png",
        ),
        plots.plot_compute_curves(curves, "cum_steps", "steps spent", out / FIGURES / "best_vs_steps.png"),
    ]
    path = out / "report.md"
    path.write_text(markdown(rows, cross_rows(runs, rows), figures, out))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pbt_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by the lab")
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.md and figures/ go")
    args = parser.parse_args(argv)
    try:
        check_storage(str(Path(args.out).expanduser()), flag="--out")
        path = write_report(args.run_dirs, args.out)
    except UserError as e:
        parser.error(str(e))
    print(path.read_text())
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
