"""The lab's population-based training: Ray Tune's PBT with the semantics DESIGN §7 promises.

    scheduler = LabPBT(ExplorePolicy.of(pbt_config), seed=0, ...)   # ExplorePolicy: tuning.explore
    tune.Tuner(..., tune_config=TuneConfig(scheduler=scheduler),
               run_config=RunConfig(callbacks=[KeepPBTState(scheduler)]))

What Ray's ``PopulationBasedTraining`` does differently, and the lab changes:

- **Truncation**: Ray replaces ``ceil(q × N)`` members; the lab ``floor(q × N)`` of the N fresh scores
  (``truncate``): a recipient is neither ranked nor a donor until it reports again. Divergence is an
  explicit flag in each result, never read off a score: a diverged member is never a donor and
  always replaced.
- **Explore** (``explore``): a rate is perturbed × f and reflected at its optimizer's range, or
  resampled log-uniform inside that range; an optimizer switch keeps the rate's relative place. The
  recipient keeps its own seed (its data stream after the copy derives from it).
- **Seeded**: ranking ties, donors and explore draw from one generator seeded by ``pbt.seed``
  (Ray's own draw from the unseeded ``random`` and NumPy generators).
- **Recorded**: every decision (ranked, replaced, donors, scores, new config) lands in
  ``pbt_state.json``; a recipient's config carries its decision's number, so the tables join
  each restore to the decision behind it, and its next report says whether it carried it out.
- **Resumable**: the scheduler's state (clocks, scores, generator, decisions) is saved with every
  experiment snapshot through a Tune callback and restored on ``--resume`` (Ray restarts it
  empty: ray#30838).
- **Bounded disk**: at most ``pbt.max_checkpoints_per_member`` checkpoints per member at any moment
  (``disk.CheckpointKeeper``; Ray's ``num_to_keep`` would delete one a paused recipient is about to copy).
- **Fair turns**: waiting members run in order of training time, ties to the one that reported
  longest ago (Ray's list order starved paused donors after a resume); Ray's sync-point rule kept,
  and the synchronous decision made when a member ends before the sync point (Ray waited for ever).
- **Every slot busy**: Ray asks for one member per step and keeps a paused member's worker only
  for a member already handed to it. Ray's PBT hands the same waiting member until it runs: two
  members pausing together left one worker with no one to keep it for, Ray stopped it, and the
  population trained on one slot (the time breakdown's idle slots). While the next in turn waits
  for a worker and none is free, the lab hands Ray the next one too; a free worker goes to the next
  in turn whose own is not starting on the idle slot (Ray would cancel that start for it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

from pbt_lab.names import (
    DIVERGED_FLAG,
    EXPLOIT,
    EXPLOITED,
    KEPT,
    LR,
    NO_CHECKPOINT,
    OPTIMIZER,
    PBT_STATE_FILE,
    SAVED,
    SCORE,
    SEED,
    SEGMENT_FROM,
    STATE_ID,
)
from pbt_lab.storage import replace_atomically
from pbt_lab.tuning.disk import CheckpointKeeper
from pbt_lab.tuning.explore import ExplorePolicy, explore, ranked_members, truncate

# --- the scheduler -------------------------------------------------------------------------


class LabPBT(PopulationBasedTraining):
    """Ray's PBT with the lab's truncation, explore, seeding, record, resume and disk bound
    (module docstring). Time is ``training_iteration``: one check."""

    def __init__(
        self,
        policy: ExplorePolicy,
        *,
        seed: int,
        metric: str,
        perturbation_interval: int,
        burn_in_period: int = 0,
        quantile_fraction: float = 0.2,
        mode: str = "max",
        synch: bool = False,
        max_checkpoints_per_member: int = 3,
    ):
        super().__init__(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            perturbation_interval=perturbation_interval,
            burn_in_period=burn_in_period,
            quantile_fraction=quantile_fraction,
            # Named for Ray's console lines and trial tags only: ``explore`` draws the new values.
            hyperparam_mutations={
                OPTIMIZER: list(policy.optimizers),
                LR: [
                    min(r[0] for r in policy.lr_ranges.values()),
                    max(r[1] for r in policy.lr_ranges.values()),
                ],
            },
            log_config=False,  # pbt_state.json records every decision, and survives a resume
            synch=synch,
        )
        self._policy = policy
        self._rng = np.random.default_rng(seed)
        self._diverged: set[str] = set()  # members whose last result was diverged
        # Recipients whose score is not fresh: not ranked, not donors, until they report a score again;
        # each with its exploit decision until its next report (None after it).
        self._pending: dict[str, int | None] = {}
        self._gone: set[str] = set()  # members that completed, failed or were removed
        self._reports = 0
        self._last_report: dict[str, int] = {}
        self._handed: set[str] = set()  # members handed to Ray to start that have not reported since
        # The decision being made: its quantiles' sizes, and its record if it is an exploit.
        self._deciding: dict = {"sizes": {}, "exploit": None}
        self.keeper = CheckpointKeeper(self, max_checkpoints_per_member)
        self._restored: dict = {}  # a resumed run's member states, applied as Ray re-adds the trials
        self.decisions: list[dict] = []

    def __setstate__(self, state: dict) -> None:
        """A run started before the checkpoint keeper and the map of pending recipients (its
        ``tuner.pkl`` holds the scheduler as it was) resumes with them."""
        self.__dict__.update(state)
        if isinstance(self._pending, set):
            self._pending = dict.fromkeys(self._pending)
        self.__dict__.setdefault("_gone", set())
        if "keeper" not in state:
            self.keeper = CheckpointKeeper(self, 3)

    # --- bookkeeping on every result -------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial):
        super().on_trial_add(tune_controller, trial)
        if trial.trial_id in self._restored:
            self._apply_member_state(trial, self._restored.pop(trial.trial_id))
            if not self._restored:  # every member is back: their checkpoints are known
                self.keeper.redirect_resumed()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self.keeper.make_room(trial, tune_controller.get_trials())  # a save may follow this result
        self._reports += 1
        self._last_report[trial.trial_id] = self._reports
        if result.get(DIVERGED_FLAG):
            self._diverged.add(trial.trial_id)
        else:
            self._diverged.discard(trial.trial_id)
        number = self._pending.get(trial.trial_id)
        if number is not None:
            # The member's next report says whether it carried out its exploit: the donor's checkpoint.
            self._pending[trial.trial_id] = None
            self.decisions[number]["carried_out"] = (
                result.get(EXPLOIT) == number and result.get(SEGMENT_FROM) != trial.trial_id
            )
        self._handed.discard(trial.trial_id)
        decided = len(self.decisions)
        decision = super().on_trial_result(tune_controller, trial, result)
        if len(self.decisions) > decided:
            self.keeper.prune(tune_controller.get_trials())
        return decision

    def _save_trial_state(self, state, time, result, trial):
        # Ray records a member's score only where it is ranked: from here on its score is fresh.
        self._pending.pop(trial.trial_id, None)
        return super()._save_trial_state(state, time, result, trial)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
        super().on_trial_complete(tune_controller, trial, result)
        self._leaves(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial):
        super().on_trial_error(tune_controller, trial)
        self._leaves(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial):
        super().on_trial_remove(tune_controller, trial)
        self._leaves(tune_controller, trial)

    def _leaves(self, tune_controller, trial: Trial) -> None:
        """A member ended (its budget, the target, an error, stopped). Ray makes a synchronous decision
        only when the last member still training reports at the sync point: one that ends before it
        never reports there, and the others would wait at the point for ever. Decide now if everyone
        left has arrived."""
        self._gone.add(trial.trial_id)
        if self._synch:
            self._decide_if_all_arrived(tune_controller)
        self.keeper.prune(tune_controller.get_trials())

    def _decide_if_all_arrived(self, tune_controller) -> None:
        """Ray's synchronous decision (``on_trial_result``'s), made for the members still in the run
        once all of them wait at the sync point."""
        members = [
            t for t in tune_controller.get_trials() if not t.is_finished() and t.trial_id not in self._gone
        ]
        times = [self._trial_state[t].last_train_time for t in members]
        if not members or min(times) < self._next_perturbation_sync:
            return
        lower, upper = self._quantiles()
        for t in [*upper, *(t for t in members if t not in lower and t not in upper), *lower]:
            self._trial_state[t].last_perturbation_time = max(times)
            self._checkpoint_or_exploit(t, tune_controller, upper, lower)
        self._next_perturbation_sync = max(
            self._next_perturbation_sync + self._perturbation_interval, max(times)
        )

    def choose_trial_to_run(self, tune_controller):
        waiting = sorted(
            (
                t
                for t in tune_controller.get_trials()
                if t.status in (Trial.PENDING, Trial.PAUSED)
                # Ray's sync rule: in synchronous mode nobody runs past the next sync point
                and (not self._synch or self._trial_state[t].last_train_time < self._next_perturbation_sync)
            ),
            key=lambda t: (
                self._trial_state[t].last_train_time,
                self._last_report.get(t.trial_id, 0),
                t.trial_id,
            ),
        )
        if not waiting:
            return None
        chosen = waiting[0]
        if free_workers(tune_controller):
            # Not to a member whose own worker is starting or resetting: Ray would cancel the start.
            chosen = next((t for t in waiting if not worker_coming(tune_controller, t)), chosen)
        elif chosen.trial_id in self._handed:
            # The next in turn already waits for a worker and none is free: hand Ray the next one as
            # well, so that Ray keeps the next worker that pauses (it keeps one only for a member handed).
            chosen = next((t for t in waiting if t.trial_id not in self._handed), chosen)
        self._handed.add(chosen.trial_id)
        return chosen

    # --- decisions --------------------------------------------------------------------------

    def _quantiles(self):
        # Every member ranks by the score it last reported, if that score is fresh: a recipient (a
        # rescued diverged member too) holds another state than the one it was scored on until it
        # reports a score again, so it is neither ranked nor a donor (its stale score would fill the
        # bottom slot and shield the real laggard, or a rescued member's old top score make it a donor).
        # The quantiles are of the fresh scores: 20 % of the 4 fresh ones in a population of 5 is
        # nobody, so one recipient at a time is in flight there (at least one of any ranking made
        # every other member's report an exploit while two or three recipients were in flight).
        members = [t for t in self._trial_state if not t.is_finished() and t.trial_id not in self._gone]
        scores = {t: self._trial_state[t].last_score for t in members if t.trial_id not in self._pending}
        diverged = {t for t in scores if t.trial_id in self._diverged}
        lower, upper = truncate(
            scores, diverged, self._quantile_fraction, self._rng, lambda t: t.trial_id, len(members)
        )
        self._deciding["sizes"] = {
            "ranked": len(ranked_members(scores, diverged)),
            "population": len(members),
            "lower": len(lower),
            "upper": len(upper),
            "diverged_ranked": len(diverged),
        }
        return lower, upper

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        state = self._trial_state[trial]
        record = {
            "decision": len(self.decisions),
            "iteration": state.last_train_time,
            "member": trial.trial_id,
            SCORE: _plain(state.last_score * self._metric_op) if state.last_score is not None else None,
            DIVERGED_FLAG: trial.trial_id in self._diverged,
            **self._deciding["sizes"],
            "action": SAVED if trial in upper_quantile else KEPT,
        }
        self._deciding["exploit"] = None
        if trial in lower_quantile and upper_quantile:
            donor = upper_quantile[self._rng.integers(len(upper_quantile))]
            self._checkpoint_of_ranked_state(donor)
            record.update(
                action=NO_CHECKPOINT,
                donor=donor.trial_id,
                donor_score=_plain(self._trial_state[donor].last_score * self._metric_op),
                old={OPTIMIZER: trial.config[OPTIMIZER], LR: trial.config[LR]},
                donor_config={OPTIMIZER: donor.config[OPTIMIZER], LR: donor.config[LR]},
            )
            self._deciding["exploit"] = record
            upper_quantile = [donor]  # Ray draws its donor from this list with the unseeded `random`
        self.decisions.append(record)
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _checkpoint_of_ranked_state(self, donor: Trial) -> None:
        """Ray copies only a donor that was in the top quantile at its own last decision (it saves
        only those): one ranked in the middle then, and on top now, was skipped. Its latest
        checkpoint holds the very state it was ranked on when the ids agree: copy that."""
        state = self._trial_state[donor]
        latest = donor.run_metadata.checkpoint_manager.latest_checkpoint_result
        ranked = (state.last_result or {}).get(STATE_ID)
        if state.last_checkpoint is None and latest and ranked and latest.metrics.get(STATE_ID) == ranked:
            state.last_checkpoint = latest.checkpoint

    def _get_new_config(self, trial, trial_to_clone):
        donor = trial_to_clone.config
        new = explore(donor[OPTIMIZER], donor[LR], self._policy, self._rng)
        record = self._deciding["exploit"]
        record.update(
            action=EXPLOITED,
            new={OPTIMIZER: new[OPTIMIZER], LR: new[LR]},
            operation=new["operation"],
            donor_state_id=(self._trial_state[trial_to_clone].last_result or {}).get(STATE_ID),
        )
        # The recipient keeps its own seed: its data stream after the copy derives from it (trainable).
        config = {
            **donor,
            OPTIMIZER: new[OPTIMIZER],
            LR: new[LR],
            SEED: trial.config[SEED],
            EXPLOIT: record["decision"],
        }
        return config, {OPTIMIZER: new["operation"], LR: new["operation"]}

    def _exploit(self, tune_controller, trial, trial_to_clone):
        super()._exploit(tune_controller, trial, trial_to_clone)
        self._diverged.discard(trial.trial_id)  # it now holds the donor's healthy state
        self._pending[trial.trial_id] = self._deciding["exploit"]["decision"]

    # --- state across a resume --------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs to go on as if uninterrupted (JSON-ready)."""
        members = {}
        for trial, s in self._trial_state.items():
            members[trial.trial_id] = {
                "last_score": _plain(s.last_score),
                "last_perturbation_time": s.last_perturbation_time,
                "last_train_time": s.last_train_time,
                "has_checkpoint": s.last_checkpoint is not None,
                DIVERGED_FLAG: trial.trial_id in self._diverged,
                "pending": trial.trial_id in self._pending,
                "awaiting": self._pending.get(trial.trial_id),
                "last_report": self._last_report.get(trial.trial_id, 0),
            }
        # "snapshot" first: prune() reads the stored file's first bytes only.
        return {
            "snapshot": self.keeper.snapshot_count,
            "moved": {path: holder for path, (holder, _) in self.keeper.moved.items()},
            "format": 1,
            "rng": self._rng.bit_generator.state,
            "reports": self._reports,
            "next_perturbation_sync": self._next_perturbation_sync,
            "members": members,
            "decisions": self.decisions,
        }

    def load_state_dict(self, state: dict) -> None:
        self.keeper.snapshot_count = state["snapshot"]
        self.keeper.moved = {path: (holder, None) for path, holder in state.get("moved", {}).items()}
        self._rng.bit_generator.state = state["rng"]
        self._reports = state["reports"]
        self._next_perturbation_sync = state["next_perturbation_sync"]
        self.decisions = list(state["decisions"])
        self._restored = dict(state["members"])

    def _apply_member_state(self, trial: Trial, member: dict) -> None:
        s = self._trial_state[trial]
        s.last_score = member["last_score"]
        s.last_perturbation_time, s.last_train_time = (
            member["last_perturbation_time"],
            member["last_train_time"],
        )
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        if latest:
            # It resumes from its latest checkpoint: the state of its last decision, reported then.
            s.last_result = latest.metrics
            if member["has_checkpoint"]:
                s.last_checkpoint = latest.checkpoint
        if member[DIVERGED_FLAG]:
            self._diverged.add(trial.trial_id)
        if member["pending"]:
            self._pending[trial.trial_id] = member.get("awaiting")
        self._last_report[trial.trial_id] = member["last_report"]

    def write_state(self, state: dict) -> None:
        """``pbt_state.json`` beside Ray's experiment state (synced with it): what the tables read."""
        if self._trial_state:  # the driver's copy of the run directory, which Ray syncs to storage
            run_dir = next(iter(self._trial_state)).local_experiment_path
            path = Path(run_dir) / PBT_STATE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(state)))


def free_workers(tune_controller) -> int:
    """Workers Ray holds with no trial to run (its actor cache; Ray 2.60's private state, 0 where absent)."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    cache = getattr(controller, "_actor_cache", None)
    return int(getattr(cache, "num_cached_objects", 0) or 0)


def worker_coming(tune_controller, trial: Trial) -> bool:
    """Whether ``trial``'s own worker holds a slot: starting or resetting (Ray 2.60's private state)."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    actor = getattr(controller, "_trial_to_actor", {}).get(trial)
    return actor is not None and controller._actor_manager.is_actor_started(actor)


def _plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
