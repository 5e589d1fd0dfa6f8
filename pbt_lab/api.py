"""The lab from Python (a notebook, a script): the commands' own code path, raising instead of exiting.

    import pbt_lab

    result = pbt_lab.run_pbt(
        "configs/pbt-quick.yaml",                # a YAML path, a dict of sections, or None (defaults)
        builder=my_mlp,                          # (input_shape, num_classes, scale) -> keras.Model
        data={"source": "my_images.npz"},        # sections override the config, like --set
        train={"target": 0.9},
    )
    result.summary["winner"], result.trials, result.lineage

``verbose``: 0 prints the summary only, 1 (default) progress and events too, 2 Ray's own tables and the
workers' logs (the commands' ``--quiet`` and ``--verbose``). Bad input raises ``pbt_lab.UserError`` (one
line) before anything is written; a run in which a trial failed returns with ``ok`` false, as the CLI
exits 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pbt_lab import cli
from pbt_lab.config import merge
from pbt_lab.experiments import grid, pbt
from pbt_lab.tuning import audited
from pbt_lab.tuning.callbacks import KeepPBTState, pbt_callbacks
from pbt_lab.tuning.scheduler import LabPBT

__all__ = [
    "KeepPBTState",
    "LabPBT",
    "RunResult",
    "audited",
    "pbt_callbacks",
    "run_grid",
    "run_pbt",
]  # LabPBT: on any Ray trainable


@dataclass
class RunResult:
    """What a run wrote (DESIGN §3), as the tables and summary in its run directory hold them."""

    run_dir: str
    trials: pd.DataFrame
    history: pd.DataFrame
    summary: dict
    lineage: pd.DataFrame | None = None
    """PBT only: one row per exploit, audited."""
    exit_code: int = 0
    """The CLI's: 1 when a trial failed or an exploit failed the audit."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_grid(
    config: str | Path | dict | None = None,
    *,
    builder: Callable | None = None,
    name: str | None = None,
    storage_path: str | None = None,
    address: str | None = None,
    resume: bool = False,
    verbose: int = 1,
    **sections: dict,
) -> RunResult:
    """``python -m pbt_lab.grid``: every optimizer × rate of ``config``, with ``sections`` (e.g.
    ``grid={"lrs": [...]}``) laid over it and ``builder`` as the model builder."""
    return _call(grid.main, config, builder, sections, name, storage_path, address, resume, verbose, [])


def run_pbt(
    config: str | Path | dict | None = None,
    *,
    builder: Callable | None = None,
    replay: str | Path | None = None,
    member: str | None = None,
    name: str | None = None,
    storage_path: str | None = None,
    address: str | None = None,
    resume: bool = False,
    verbose: int = 1,
    **sections: dict,
) -> RunResult:
    """``python -m pbt_lab.pbt``: a population under PBT (or, with ``replay``, the retraining of that
    run's winner or ``member``), with ``sections`` laid over ``config`` and ``builder`` as the model
    builder."""
    extra = [*(["--replay", str(replay)] if replay else []), *(["--member", member] if member else [])]
    return _call(pbt.main, config, builder, sections, name, storage_path, address, resume, verbose, extra)


def _call(main, config, builder, sections, name, storage_path, address, resume, verbose, extra) -> RunResult:
    settings = merge(config, sections) if isinstance(config, dict) else sections
    argv = [
        *(["--config", str(config)] if config is not None and not isinstance(config, dict) else []),
        *(["--name", name] if name else []),
        *(["--storage-path", str(storage_path)] if storage_path else []),
        *(["--address", address] if address else []),
        *(["--resume"] if resume else []),
        *({0: ["--quiet"], 2: ["--verbose"]}.get(verbose, [])),
        *extra,
    ]
    call = cli.Call(builder=builder, settings=settings)
    code = main(argv, call)
    run = call.run
    return RunResult(
        run_dir=str(run.run_dir),
        trials=run.tables["trials"],
        history=run.tables["history"],
        summary=run.tables["summary"],
        lineage=run.tables.get("lineage"),
        exit_code=code,
    )
