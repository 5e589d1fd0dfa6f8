"""Tune callbacks beside LabPBT: its state kept across a resume, and the population's own stop."""

from __future__ import annotations

from ray import tune

from pbt_lab.names import SEGMENT_STEP, STEP, STEPS_TO_TARGET
from pbt_lab.tuning.scheduler import LabPBT


class KeepPBTState(tune.Callback):
    """Saves LabPBT's state with every experiment snapshot, restores it on resume.

    Ray saves callback states in the same snapshot as the trials' (``callback-states-*.pkl``), so
    a resumed scheduler matches the trials it resumes. It is handed the same scheduler object: Ray
    pickles TuneConfig and RunConfig together in ``tuner.pkl``.
    """

    def __init__(self, scheduler: LabPBT):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        self.scheduler.snapshot_taken()
        state = self.scheduler.state_dict()
        self.scheduler.write_state(state)
        return state

    def set_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def on_trial_save(self, iteration, trials, trial, **info):
        self.scheduler.prune(trials)  # the new checkpoint may replace one (Ray saves a state twice)


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
