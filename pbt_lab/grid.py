"""The exhaustive baseline: every optimizer × learning rate trained to the target or its budget.

    python -m pbt_lab.grid --config configs/grid-quick.yaml

Reproduces the study's 6 × 48 grid (configs/grid.yaml) and maps its valley: time to target
against learning rate, per optimizer. Writes the tables and figures of DESIGN §3 into the run
directory and prints a per-optimizer table.
"""

from __future__ import annotations

import sys

from ray import tune

from pbt_lab import results
from pbt_lab.config import GridExperiment
from pbt_lab.launch import Launch
from pbt_lab.trainable import trial_space


def main(argv: list[str] | None = None) -> int:
    launch = Launch.parse("grid", GridExperiment, __doc__.splitlines()[0], argv)
    cfg = launch.cfg
    space = trial_space(cfg.train, cfg.model, threads=cfg.resources.threads,
                        optimizer=tune.grid_search(cfg.grid.optimizers), lr=tune.grid_search(cfg.grid.lrs),
                        seed=tune.grid_search(cfg.grid.seeds))
    launch.fit(space)
    tables = results.write_tables(launch.run_dir, kind="grid", config=launch.config_dict(),
                                  data=launch.data.identity(), wall_seconds=launch.wall_seconds)
    print(results.console_summary(tables, launch.run_dir))
    return results.exit_status(tables)


if __name__ == "__main__":
    sys.exit(main())
