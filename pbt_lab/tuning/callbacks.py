"""Tune callbacks: why each restore happened; beside LabPBT, its state kept across a resume, and the
population's own stop; Ray's result loggers minus a loss of reports, and its TensorBoard logger minus a
file and a flush per turn."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from tensorboardX import SummaryWriter

from pbt_lab import StorageFull
from pbt_lab.names import (
    EXPLOIT_RESTORE,
    NODE_ID,
    PAUSE_RESTORE,
    RESTART_RESTORE,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESUME_RESTORE,
    SEGMENT_FROM,
    SEGMENT_STEP,
    STEP,
    STEPS_TO_TARGET,
)
from pbt_lab.storage import free_bytes
from pbt_lab.tuning.console import NORMAL, Console
from pbt_lab.tuning.scheduler import LabPBT


class NameRestores(tune.Callback):
    """Names why a trial restored a checkpoint, in the first report after the restore (Ray lets a
    callback add to a result before its loggers write it): another member's checkpoint is an exploit;
    its own is a restart after a failure (Ray's ``on_trial_recover``), a resume (its first report to
    this driver) or else a pause (PBT's turns). The audit counts restores by kind. A restart prints one
    line: where the member trained before and where it goes on (a lost node's members move)."""

    def __init__(self):
        self._recovering: set[str] = set()
        self._reported: set[str] = set()  # trials that reported to this driver
        self._node: dict[str, str] = {}  # each trial's node at its last report

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._recovering.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        first = trial.trial_id not in self._reported
        self._reported.add(trial.trial_id)
        recovering = trial.trial_id in self._recovering
        self._recovering.discard(trial.trial_id)  # a restart without a checkpoint restored nothing
        before, self._node[trial.trial_id] = self._node.get(trial.trial_id), result.get(NODE_ID)
        if recovering and Console.level >= NORMAL:
            print(restart_line(trial.trial_id, before, result), flush=True)
        if result.get(RESTORED_DIGEST) is None:
            return
        if result.get(SEGMENT_FROM) != trial.trial_id:
            result[RESTORE_KIND] = EXPLOIT_RESTORE
        elif recovering:
            result[RESTORE_KIND] = RESTART_RESTORE
        else:
            result[RESTORE_KIND] = RESUME_RESTORE if first else PAUSE_RESTORE


def restart_line(trial_id: str, node_before: str | None, result: dict) -> str:
    """``MOVED:`` (on another node: its node was lost) or ``RESTARTED:`` (the same), and from what."""
    before, after = (node_before or "?")[:8], (result.get(NODE_ID) or "?")[:8]
    moved = node_before is not None and result.get(NODE_ID) != node_before
    since = (
        f"its checkpoint at step {result.get(SEGMENT_STEP)}"
        if result.get(RESTORED_DIGEST) is not None
        else "the start (no checkpoint yet)"
    )
    failed = f"MOVED: {trial_id} failed on node {before}" if moved else f"RESTARTED: {trial_id} failed"
    return f"{failed}; it continues on node {after} from {since}"


class StopWhenStorageFull(tune.Callback):
    """Stops the run, resumably, when its storage is full or about to be: on a result, when the free
    space falls under ``reserve`` bytes (what the checkpoints in flight and the tables take); on a
    trial that failed because a save did not fit (the trainable raises ``StorageFull``).

    Where Ray's last snapshot fits, the run stops as Ray stops one on Ctrl+C (SIGUSR1, Ray's own
    signal for it): Ray writes the snapshot and ends with the trials unfinished. Where it would not
    fit, the callback raises ``StorageFull``: Tune ends at once and writes nothing more, so the
    snapshot in storage stays the last one Ray wrote whole. Either way ``--resume`` goes on once space
    is freed. The reason is kept on the class (a resumed run's callback is the copy Ray unpickles
    from its ``tuner.pkl``, not the one this driver made): ``stopped()``."""

    why: str | None = None

    def __init__(self, storage_path: str, reserve: int):
        self.storage_path, self.reserve = storage_path, reserve

    @classmethod
    def stopped(cls) -> str | None:
        """Why the last run stopped for its storage (None: it did not), forgotten once read."""
        why, StopWhenStorageFull.why = cls.why, None
        return why

    def on_trial_result(self, iteration, trials, trial, result, **info):
        free = free_bytes(self.storage_path)
        if free is not None and free < self.reserve:
            self._stop(
                f"storage {self.storage_path} is nearly full: {free / 1e6:.1f} MB free, under the "
                f"{self.reserve / 1e6:.1f} MB the checkpoints in flight and the tables need",
                trial,
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stop_if_full(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._stop_if_full(trial)

    def _stop_if_full(self, trial) -> None:
        error = Path(trial.error_file) if trial.error_file else None
        found = re.findall(r"StorageFull: (.+)", error.read_text()) if error and error.is_file() else []
        if found:
            self._stop(found[-1], trial)

    def _stop(self, why: str, trial) -> None:
        if StopWhenStorageFull.why:
            return  # stopping already
        StopWhenStorageFull.why = why
        # The saves still in flight fail on the full disk by design; Ray would print each as an
        # unhandled error with its traceback when it drops them. The one line the run ends with says it.
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        staged = Path(trial.local_experiment_path)  # what Ray's last snapshot copies to storage
        snapshot = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
        free = free_bytes(self.storage_path)
        if threading.current_thread() is threading.main_thread() and (free is None or free > 2 * snapshot):
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's interrupt: it ends the loop and saves its state
        else:
            raise StorageFull(why)


class KeepPBTState(tune.Callback):
    """Saves LabPBT's state with every experiment snapshot, restores it on resume.

    Ray saves callback states in the same snapshot as the trials' (``callback-states-*.pkl``), so
    a resumed scheduler matches the trials it resumes. It is handed the same scheduler object: Ray
    pickles TuneConfig and RunConfig together in ``tuner.pkl``.
    """

    def __init__(self, scheduler: LabPBT):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        self.scheduler.keeper.snapshot_taken()
        state = self.scheduler.state_dict()
        self.scheduler.write_state(state)
        return state

    def set_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):  # Ray saves at the end without asking the scheduler first
            self.scheduler.keeper.make_room(trial, trials)

    def on_trial_save(self, iteration, trials, trial, **info):
        # The new checkpoint may replace one (Ray saves a state twice: PBT's save, then the pause's),
        # and the pause's save follows this one.
        self.scheduler.keeper.make_room(trial, trials)


class PopulationStop(tune.Stopper):
    """Stops every member once any member has reached the target (``pbt.stop_at_target``)."""

    def __init__(self):
        self.reached = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.reached = self.reached or result.get(STEPS_TO_TARGET) is not None
        return False

    def stop_all(self) -> bool:
        return self.reached


class BudgetStop(tune.Stopper):
    """Stops every trial once the training steps the trials took add up to ``budget``. Counted as the
    tables count them: a check trains from the step before it, or from the step a restore (a PBT
    exploit) put it at. Trials in flight finish their check: it overshoots by one check per running trial."""

    def __init__(self, budget: int):
        self.budget, self.spent, self.step = budget, 0, {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        start = result.get(SEGMENT_STEP)
        start = self.step.get(trial_id, 0) if start is None else start
        self.spent += max(0, result[STEP] - start)
        self.step[trial_id] = result[STEP]
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.budget


class _KeepLocalLog:
    """Ray's trial loggers minus a loss of results (Ray 2.60, seen here).

    Ray copies a trial's ``result.json`` and ``progress.csv`` back from storage whenever the
    trial restarts from a checkpoint, as PBT's members do after every pause: storage lags the
    driver's own copy by up to an experiment snapshot (≥ 10 s), so the reports in between were
    overwritten. These fetch the file only when this driver has none (a resumed run).
    """

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonLog(_KeepLocalLog, JsonLoggerCallback):
    """``result.json``, every report kept."""


class CSVLog(_KeepLocalLog, CSVLoggerCallback):
    """``progress.csv``, every report kept."""


class _TimedWriter(SummaryWriter):
    """Flushes on its own thread every ``flush_secs`` and when closed, not whenever asked."""

    def flush(self):
        pass


class SteadyBoard(TBXLoggerCallback):
    """Ray's TensorBoard logger (its ``ray/tune/…`` scalars, hparams at a trial's end) with one writer per
    trial for the run, flushed every few seconds and at the trial's or experiment's end. Ray's closes and
    reopens a trial's writer at each start, which a PBT turn is (a new event file each turn), and flushes
    it after each result: a few ms on the driver each (the turn did not move measurably without them)."""

    FLUSH_SECONDS = 5  # how far behind a live TensorBoard may be

    def on_experiment_end(self, trials, **info):
        # Members still live at the end (an interrupt, a full disk): written before Ray's last sync.
        for writer in self._trial_writer.values():
            writer.close()
        self._trial_writer.clear()
        self._trial_result.clear()

    def log_trial_start(self, trial):
        if trial not in self._trial_writer:
            trial.init_local_path()
            self._trial_writer[trial] = _TimedWriter(trial.local_path, flush_secs=self.FLUSH_SECONDS)
            self._trial_result[trial] = {}


def pbt_callbacks(scheduler: LabPBT) -> list[tune.Callback]:
    """What a Tuner runs beside ``LabPBT`` on any trainable: its state (``KeepPBTState``), Ray's
    ``result.json`` and ``progress.csv`` with every report kept (the audit reads them), and Ray's
    TensorBoard scalars without a new file and a flush at every turn (``SteadyBoard``)."""
    return [KeepPBTState(scheduler), JsonLog(), CSVLog(), SteadyBoard()]
