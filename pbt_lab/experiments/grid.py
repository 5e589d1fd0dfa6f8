"""The exhaustive baseline: every optimizer × learning rate trained to the target or its budget.

    python -m pbt_lab.grid --config configs/grid-quick.yaml

Reproduces the study's 6 × 48 grid (configs/grid.yaml) and maps its valley: time to target
against learning rate, per optimizer. Writes the tables and figures of DESIGN §3 into the run
directory and prints a per-optimizer table.
"""

from __future__ import annotations

from ray import tune

from pbt_lab import cli
from pbt_lab.config import GridExperiment
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.trial_config import trial_space


def validate(run: cli.Run) -> None:
    """The grid's trials, their reports and the checkpoints Ray keeps of each must fit the storage."""
    g, kept = run.cfg.grid, run.cfg.run
    trials = len(g.optimizers) * len(g.lrs) * len(g.seeds)
    every = kept.checkpoint_every
    # Ray keeps run.keep_checkpoints of each trial's checkpoints (null: every one it took).
    per_trial = (kept.keep_checkpoints or run.cfg.train.most_checks // every) if every else 0
    run.check_room(trials, trials * per_trial)


def main(argv: list[str] | None = None, call: cli.Call | None = None) -> int:
    run = cli.parse("grid", GridExperiment, __doc__, argv, validate=validate, call=call)
    cfg = run.cfg
    space = trial_space(
        cfg.train,
        cfg.model,
        threads=cfg.resources.threads,
        optimizer=tune.grid_search(cfg.grid.optimizers),
        lr=tune.grid_search(cfg.grid.lrs),
        seed=tune.grid_search(cfg.grid.seeds),
    )
    with cli.one_line_errors(run):
        fit(run, space)
    return cli.finish(run)
