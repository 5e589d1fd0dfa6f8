"""The lab's population-based training: Ray Tune's PBT with the semantics DESIGN §7 promises.

    scheduler = LabPBT(metric="loss", mode="min", perturbation_interval=2, seed=0,
                       hyperparam_mutations={"lr": tune.loguniform(1e-4, 1e-1), "opt": {"beta": [0.9, 0.99]}})
    tune.Tuner(any_trainable, tune_config=TuneConfig(scheduler=scheduler),
               run_config=RunConfig(callbacks=pbt_callbacks(scheduler)))   # its record, resume, disk bound

Every argument of Ray's ``PopulationBasedTraining`` means what it means there, on any Ray trainable
(function or class API); ``space`` (config/space.py) replaces ``hyperparam_mutations`` for the lab's own
runs. What Ray's PBT does differently, and the lab changes:

- **Truncation**: Ray replaces ``ceil(q × N)`` members; the lab ``floor(q × N)`` of the N fresh scores
  (``truncate``): a recipient is neither ranked nor a donor until it reports again. Divergence is an
  explicit flag in each result, never read off a score: a diverged member is never a donor and
  always replaced.
- **Explore** (``explore``, by each key's kind): a range is perturbed × f and reflected at its bounds
  (Ray clips), or resampled inside it; an int always changes; a list moves to a neighbour, a
  ``tune.choice`` is resampled or kept; a rate's range may depend on the optimizer, whose switch keeps
  the rate's relative place; a draw that changes nothing is redrawn. ``custom_explore_fn`` runs after.
  The recipient keeps its own ``seed`` where its config has one (its data stream derives from it).
- **Seeded**: ranking ties, donors and explore draw from one generator seeded by ``seed``
  (Ray's own draw from the unseeded ``random`` and NumPy generators). Ray's policy logs
  (``pbt_global.txt``, ``pbt_policy_*.txt``) are written as Ray writes them (``log_config``).
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
- **A lost node**: its members restart on the nodes left, even those it lost before they trained
  (``controller.RecoversLostWorkers``; Ray 2.60 left them PENDING or ERROR with retries left).
- **Every slot busy**: Ray asks for one member per step and keeps a paused member's worker only
  for a member already handed to it. Ray's PBT hands the same waiting member until it runs: two
  members pausing together left one worker with no one to keep it for, Ray stopped it, and the
  population trained on one slot (the time breakdown's idle slots). While the next in turn waits
  for a worker and none is free, the lab hands Ray the next one too; a free worker goes to the next
  in turn whose own is not starting on the idle slot (Ray would cancel that start for it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

from pbt_lab.config.space import Space, set_path
from pbt_lab.names import (
    DIVERGED_FLAG,
    EXPLOIT,
    EXPLOITED,
    KEPT,
    NO_CHECKPOINT,
    RESTORED_DIGEST,
    RESTORED_ID,
    SAVED,
    SCORE,
    SEED,
    SEGMENT_FROM,
    STATE_ID,
)
from pbt_lab.tuning.controller import RecoversLostWorkers, free_workers, worker_coming
from pbt_lab.tuning.disk import CheckpointKeeper
from pbt_lab.tuning.explore import explore, operation_text, ranked_members, truncate
from pbt_lab.tuning.pbt_state import ResumableState, plain
from pbt_lab.tuning.ray_space import mutations_of, space_of_mutations, values_at

# --- the scheduler -------------------------------------------------------------------------


class LabPBT(RecoversLostWorkers, ResumableState, PopulationBasedTraining):
    """Ray's PBT with the lab's truncation, explore, seeding, record, resume and disk bound
    (module docstring). Time is ``training_iteration``: one check."""

    def __init__(
        self,
        time_attr: str = "time_total_s",
        metric: str | None = None,
        mode: str | None = None,
        perturbation_interval: float = 60.0,
        burn_in_period: float = 0.0,
        hyperparam_mutations: dict | None = None,
        quantile_fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturbation_factors: tuple[float, ...] = (1.2, 0.8),
        custom_explore_fn: Callable[[dict], dict] | None = None,
        log_config: bool = True,
        require_attrs: bool = True,
        synch: bool = False,
        *,
        seed: int | np.random.SeedSequence = 0,
        space: Space | None = None,
        max_checkpoints_per_member: int = 3,
    ):
        """Ray's arguments mean what they mean in Ray's ``PopulationBasedTraining`` (README: where the lab
        differs). ``seed``: every choice PBT makes; ``space``: the lab's search space (config/space.py)
        instead of ``hyperparam_mutations``; ``max_checkpoints_per_member``: the disk bound."""
        self._space = space or space_of_mutations(
            hyperparam_mutations, resample_probability, perturbation_factors
        )
        super().__init__(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            perturbation_interval=perturbation_interval,
            burn_in_period=burn_in_period,
            quantile_fraction=quantile_fraction,
            hyperparam_mutations=hyperparam_mutations if space is None else mutations_of(space),
            resample_probability=resample_probability,
            perturbation_factors=tuple(perturbation_factors),
            custom_explore_fn=custom_explore_fn,
            log_config=log_config,
            require_attrs=require_attrs,
            synch=synch,
        )
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
            # The member's next report says whether it carried out its exploit: the donor's checkpoint
            # (a trainable that reports no restores leaves it unknown).
            self._pending[trial.trial_id] = None
            record = self.decisions[number]
            if EXPLOIT in result:
                record["carried_out"] = (
                    result.get(EXPLOIT) == number and result.get(SEGMENT_FROM) != trial.trial_id
                )
            elif RESTORED_ID in result:
                # Another trainable's record of what it loaded (tuning/audited.py), kept here too: the
                # audit checks it even where Ray's result.json lost the report.
                record["restored"] = {k: result.get(k) for k in (RESTORED_ID, RESTORED_DIGEST, SEGMENT_FROM)}
                record["carried_out"] = (
                    result.get(SEGMENT_FROM) == record["donor"]
                    and result[RESTORED_ID] == record["donor_state_id"]
                )
        self._handed.discard(trial.trial_id)
        self._gone.discard(trial.trial_id)  # a member that failed and was retried is back
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
        if trial.should_recover() and trial.status in (Trial.ERROR, Trial.PENDING):
            # ERROR: Ray requeues it (a running member failed). PENDING: it failed while its worker
            # started or restored (its node lost, say): requeued at the next turn (controller.py).
            return
        self._leaves(tune_controller, trial)

    def may_requeue(self, trial: Trial) -> bool:
        return trial.trial_id not in self._gone

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
        self.requeue_failed_starts(tune_controller)
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
            SCORE: plain(state.last_score * self._metric_op) if state.last_score is not None else None,
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
                donor_score=plain(self._trial_state[donor].last_score * self._metric_op),
                old=values_at(trial.config, self._space),
                donor_config=values_at(donor.config, self._space),
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
        new, operations = explore(values_at(trial_to_clone.config, self._space), self._space, self._rng)
        config = trial_to_clone.config
        for key, value in new.items():
            config = set_path(config, key, value)
        if self._custom_explore_fn:  # Ray's hook: it may change any key after the lab's explore
            config = self._custom_explore_fn(config)
            new = values_at(config, self._space)
        record = self._deciding["exploit"]
        record.update(
            action=EXPLOITED,
            new=new,
            operations=operations,
            operation=operation_text(operations),
            donor_state_id=(self._trial_state[trial_to_clone].last_result or {}).get(STATE_ID),
        )
        # The recipient keeps its own seed: its data stream after the copy derives from it (trainable);
        # its config names the decision it carries out, which its next report echoes.
        config = {**config, EXPLOIT: record["decision"]}
        if SEED in trial.config:
            config[SEED] = trial.config[SEED]
        nested: dict = {}
        for key, operation in operations.items():
            nested = set_path(nested, key, operation)
        return config, nested

    def _exploit(self, tune_controller, trial, trial_to_clone):
        super()._exploit(tune_controller, trial, trial_to_clone)
        # Ray points the recipient at the donor's checkpoint behind its run metadata's cached JSON: the
        # next experiment snapshot would keep its own, and a run killed after it resumed the recipient
        # from its own state with the donor's config (the audit caught it: never carried out).
        trial.run_metadata.invalidate_cache()
        self._diverged.discard(trial.trial_id)  # it now holds the donor's healthy state
        self._pending[trial.trial_id] = self._deciding["exploit"]["decision"]
