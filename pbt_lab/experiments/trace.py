"""The study's trace: each optimizer at its best rate, validating at every check.

    python -m pbt_lab.trace --grid ~/ray_results/grid-cpu --set train.max_steps=1000
    python -m pbt_lab.trace --config configs/trace-quick.yaml

One trial per optimizer, at the best rate of a grid run (``--grid RUN_DIR``: its summary's
per-optimizer table; optimizers that reached no target there are left out) or at ``trace.lrs``.
Every trial trains its whole budget (no stop at the target) and validates at every check; the
figures are validation accuracy over training seconds and over steps.
"""

from __future__ import annotations

from ray import tune

from pbt_lab import UserError, cli, results
from pbt_lab.config import TraceExperiment
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.trial_config import trial_space


def grid_best_rates(run_dir: str) -> dict:
    """{optimizer: best rate} of a finished grid run (optimizers that never reached the target left out)."""
    _, _, summary = results.read_tables(run_dir)
    best = {
        name: o["best_lr"]
        for name, o in (summary.get("optimizers") or {}).items()
        if o["best_lr"] is not None
    }
    if not best:
        raise UserError(f"--grid {run_dir}: no optimizer reached the target there, so it has no best rates")
    return best


def _grid_config(args) -> dict | None:
    """The grid's best rates as the base of this run's config (YAML and --set still override)."""
    return {"trace": {"lrs": grid_best_rates(args.grid)}} if args.grid else None


def main(argv: list[str] | None = None, call: cli.Call | None = None) -> int:
    def add_arguments(parser):
        parser.add_argument(
            "--grid", metavar="RUN_DIR", help="take each optimizer's best rate from this grid run"
        )

    run = cli.parse("trace", TraceExperiment, __doc__, argv, add_arguments, _grid_config, call=call)
    cfg = run.cfg
    rates = cfg.trace.lrs
    space = trial_space(
        cfg.train,
        cfg.model,
        threads=cfg.resources.threads,
        seed=cfg.train.seed,
        optimizer=tune.grid_search(list(rates)),
        lr=tune.sample_from(lambda spec: rates[spec.config.optimizer]),
    )
    with cli.one_line_errors(run):
        fit(run, space)
    return cli.finish(run, extra={"trace_of": run.args.grid})
