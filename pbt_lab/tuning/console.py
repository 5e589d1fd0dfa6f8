"""What a run prints while it runs, and the population's schedules where people look (TensorBoard).

By default a run prints one header line, a progress line (a bar on a terminal; on a pipe, a CI log or a
Ray Job's log, one line every ``PROGRESS_EVERY`` seconds), one line per exploit with the verdict on what
the recipient loaded, one per trial that ends abnormally (and ``MOVED:``/``RESTARTED:`` from
``callbacks.NameRestores``), then the lab's summary (``cli.finish``), last. ``--quiet``: the summary
only. ``--verbose``: Ray's own tables and every worker's log lines, as Ray prints them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import TIMESTEPS_TOTAL

from pbt_lab.names import (
    DIVERGED,
    EXPLOIT,
    EXPLOIT_RESTORE,
    EXPLOIT_TAG,
    LR,
    MISMATCHED,
    OPTIMIZER,
    RECIPE,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESTORED_ID,
    SCHEDULE_TAG,
    STALLED,
    STATE_DIGEST,
    STATE_ID,
    STATUS,
    STEP,
    UNVERIFIABLE,
    VAL_ACC,
    VERIFIED,
)

QUIET, NORMAL, VERBOSE = 0, 1, 2
PROGRESS_EVERY = 30.0  # seconds between progress lines on a pipe
# Ray's driver-side loggers: a failed trial's whole traceback (the lab prints one line and the log's
# path), per-step chatter, the token-authentication notice.
RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


@contextmanager
def ray_quieted(verbosity: int) -> Iterator[None]:
    """Below ``--verbose``, Ray's driver prints nothing of its own during the fit: its loggers keep
    what ends a run, and its console engine is the older one (Ray 2.60's newer one prints the
    experiment's configuration box and paths even at ``verbose=0``)."""
    if verbosity >= VERBOSE:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in RAY_LOGGERS}
    engine = os.environ.get(NEW_OUTPUT)
    os.environ[NEW_OUTPUT] = "0"
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger(INSUFFICIENT).setLevel(logging.WARNING)  # a run that cannot start says why
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if engine is None:
            os.environ.pop(NEW_OUTPUT, None)
        else:
            os.environ[NEW_OUTPUT] = engine


NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"
INSUFFICIENT = "ray.tune.execution.insufficient_resources_manager"


def count_trials(param_space: dict, num_samples: int = 1) -> int:
    """The trials Ray makes of ``param_space``: every ``grid_search`` crossed, ``num_samples`` times."""

    def grid_points(value) -> int:
        if isinstance(value, dict):
            if set(value) == {"grid_search"}:
                return len(value["grid_search"])
            return math.prod(grid_points(v) for v in value.values())
        return 1

    return grid_points(param_space) * num_samples


def header(run, trials: int) -> str:
    """What runs where, in one line: ``pbt NAME: 5 trials × 600 steps, 2 at a time on a local Ray (2
    CPUs, 0 GPUs); run directory DIR``."""
    import ray

    have = ray.cluster_resources()
    where = f"the Ray cluster at {run.address}" if run.address else "a local Ray"
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    budget = f" × {run.cfg.train.max_steps:,} steps" if run.cfg.train.max_steps else ""
    return (
        f"{run.kind} {run.name}{' (resumed)' if run.resume else ''}: {trials} trials{budget}, "
        f"{run.session.slots} at a time on {where} ({cpus:g} CPUs, {gpus:g} GPUs); "
        f"run directory {run.run_dir}"
    )


def number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def changes(old: dict, new: dict) -> str:
    """``lr 0.01 → 0.012, optimizer adam → rmsprop``: the keys an explore changed."""
    moved = [f"{k} {number(old.get(k))} → {number(v)}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(moved) or "no change"


def decision_of(result: dict, scheduler) -> dict:
    """The PBT decision a recipient's report says it carried out ({} where none, or unknown here)."""
    number = result.get(EXPLOIT)
    return (
        scheduler.decisions[number] if number is not None and 0 <= number < len(scheduler.decisions) else {}
    )


def exploit_text(recipient: str, result: dict, scheduler) -> str:
    """``at step S: RECIPIENT ← DONOR (donor's score vs its own): what explore changed``."""
    record = decision_of(result, scheduler)
    scores = (
        f" ({number(record['donor_score'])} vs {number(record['score'])})"
        if record.get("donor_score") is not None and record.get("score") is not None
        else ""
    )
    return (
        f"at step {result.get(STEP)}: {recipient} ← {record.get('donor', '?')}{scores}: "
        f"{changes(record.get('old') or {}, record.get('new') or {})}"
    )


class Console(tune.Callback):
    """The header, the progress line, one line per exploit and per abnormal end (module docstring).

    ``budget``: each trial's step budget (None: a time budget; the line then has no total);
    ``scheduler``: the lab's PBT, whose decisions name an exploit's donor and values."""

    level = NORMAL  # this fit's verbosity, for every Console (a resumed run's is the one Ray unpickles)

    @classmethod
    @contextmanager
    def speaking(cls, level: int) -> Iterator[None]:
        """Every Console (and ``NameRestores``) at ``level`` for the time of a fit."""
        before, cls.level = cls.level, level
        try:
            yield
        finally:
            cls.level = before

    def __init__(self, trials: int, budget: int | None, scheduler=None, every: float = PROGRESS_EVERY):
        self.trials, self.budget, self.scheduler, self.every = trials, budget, scheduler, every
        self.setup()

    def setup(self, **info):
        """Ray calls it as the fit starts (a resumed one too): the counts start afresh."""
        self._steps: dict[str, int] = {}
        self._best: float | None = None
        self._exploits = 0
        self._saved: dict[str, str] = {}  # every reported state's digest, by its id
        self._started = self._last_line = time.monotonic()
        self._bar = None
        if info and self.level == NORMAL and sys.stdout.isatty():
            from tqdm import tqdm

            total = self.trials * self.budget if self.budget else None
            self._bar = tqdm(total=total, unit="step", file=sys.stdout, dynamic_ncols=True, leave=False)

    def __getstate__(self) -> dict:  # Ray pickles callbacks with the run; a bar stays in its process
        return {**self.__dict__, "_bar": None}

    # --- what it prints ---------------------------------------------------------------------

    def say(self, line: str) -> None:
        if self.level < NORMAL:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def progress(self, trials: list[Trial]) -> str:
        """``1,450/3,000 steps (48%), 2 running, 3 waiting, best val_acc 0.9820, 2 exploits, 30 s, about
        32 s left``: the pipe's line (a terminal's bar shows the steps and times itself)."""
        done = sum(self._steps.values())
        total = self.trials * self.budget if self.budget else None
        elapsed = time.monotonic() - self._started
        parts = [f"{done:,}/{total:,} steps ({done / total:.0%})" if total else f"{done:,} steps"]
        parts += [*self.population(trials), f"{elapsed:.0f} s"]
        if total and done:
            parts.append(f"about {elapsed * (total - done) / done:.0f} s left")
        return ", ".join(parts)

    def population(self, trials: list[Trial]) -> list[str]:
        running = sum(t.status == Trial.RUNNING for t in trials)
        waiting = sum(t.status in (Trial.PENDING, Trial.PAUSED) for t in trials) + self.trials - len(trials)
        parts = [f"{running} running, {max(waiting, 0)} waiting"]
        if self._best is not None:
            parts.append(f"best val_acc {self._best:.4f}")
        if self.scheduler is not None:
            parts.append(f"{self._exploits} exploit{'s' if self._exploits != 1 else ''}")
        return parts

    # --- Tune's callbacks --------------------------------------------------------------------

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._steps[trial.trial_id] = result.get(STEP) or 0
        if result.get(VAL_ACC) is not None:
            self._best = max(self._best or 0.0, result[VAL_ACC])
        if result.get(STATE_ID) and result.get(STATE_DIGEST):
            self._saved[result[STATE_ID]] = result[STATE_DIGEST]
        if result.get(RESTORE_KIND) == EXPLOIT_RESTORE and self.scheduler is not None:
            self._exploits += 1
            self.say(self.exploit_line(trial.trial_id, result))
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.budget:
            self._steps[trial.trial_id] = self.budget  # a trial that ended early used its budget up
        if result.get(STATUS) in (DIVERGED, STALLED):
            self.say(
                f"{result[STATUS].upper()}: {trial.trial_id} ({result.get(OPTIMIZER)}, lr "
                f"{number(result.get(LR))}) at step {result.get(STEP)}"
            )
        self._show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.should_recover():  # it restarts (RESTARTED/MOVED when it reports again)
            return
        error = Path(trial.error_file) if trial.error_file else None
        said = (error.read_text().strip().splitlines() if error and error.is_file() else []) or [
            "see Ray's log"
        ]
        self.say(f"ERROR: {trial.trial_id} failed: {said[-1]}" + (f" ({error})" if error else ""))

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, trials) -> None:
        if self._bar is not None:
            self._bar.n = sum(self._steps.values())  # (an exploit may set a member's step back)
            self._bar.set_postfix_str(", ".join(self.population(trials)), refresh=True)
        elif self.level == NORMAL and time.monotonic() - self._last_line >= self.every:
            self._last_line = time.monotonic()
            self.say(f"progress: {self.progress(trials)}")

    # --- an exploit, as the recipient reports what it loaded -----------------------------------

    def exploit_line(self, recipient: str, result: dict) -> str:
        """``EXPLOIT at step S: RECIPIENT ← DONOR (scores): changes; loaded state verified``."""
        record = decision_of(result, self.scheduler)
        verdict = self.loaded_verdict(result, record.get("donor_state_id"))
        return f"EXPLOIT {exploit_text(recipient, result, self.scheduler)}; loaded state {verdict}"

    def loaded_verdict(self, result: dict, decided_state: str | None) -> str:
        """What the recipient loaded against what its donor reported saving (the run's audit, at its end,
        is the full check): verified, mismatched, or unverifiable (no report of that state seen here)."""
        loaded = result.get(RESTORED_ID)
        if decided_state is not None and loaded != decided_state:
            return f"{MISMATCHED.upper()} (state {loaded}, decided {decided_state})"
        saved = self._saved.get(loaded)
        if saved is None:
            return UNVERIFIABLE
        return VERIFIED if result.get(RESTORED_DIGEST) == saved else f"{MISMATCHED.upper()} (digest)"


class ScheduleBoard(tune.Callback):
    """Each member's searched values as TensorBoard scalars ``schedule/KEY`` beside Ray's own, one text
    entry per exploit, in its trial directory (the winner's run: ``plots/board.py``). Ray's logger steps
    its scalars by ``timesteps_total``, set here to the training step: every chart shares one axis."""

    def __init__(self, space, scheduler=None):
        self.space, self.scheduler = space, scheduler
        self._writers: dict[str, object] = {}

    def _writer(self, trial: Trial):
        if trial.trial_id not in self._writers:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(trial.local_path, filename_suffix=".schedule", flush_secs=30)
            writer.add_text(SCHEDULE_TAG, self.space.legend(), 0)
            self._writers[trial.trial_id] = writer
        return self._writers[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(STEP) is None:
            return
        result[TIMESTEPS_TOTAL] = result[STEP]
        writer = self._writer(trial)
        for tag, value in self.space.scalars(result.get(RECIPE) or {}).items():
            writer.add_scalar(tag, value, global_step=result[STEP])
        if result.get(RESTORE_KIND) == EXPLOIT_RESTORE and self.scheduler is not None:
            writer.add_text(EXPLOIT_TAG, exploit_text(trial.trial_id, result, self.scheduler), result[STEP])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self._writers):
            self._close(trial_id)

    def _close(self, trial_id: str) -> None:
        writer = self._writers.pop(trial_id, None)
        if writer is not None:
            writer.close()

    def __getstate__(self) -> dict:  # Ray pickles callbacks with the run: open files stay behind
        return {**self.__dict__, "_writers": {}}
