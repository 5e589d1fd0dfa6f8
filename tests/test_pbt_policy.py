"""PBT's choices as pure functions on hand-made inputs (no Ray run, no training): exact truncation,
explore inside each optimizer's range, seeded draws, the scheduler's state across a resume."""

import io
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pyarrow.fs import LocalFileSystem
from ray.tune import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.trainable.metadata import _TrainingRunMetadata

from pbt_lab.config import PBTConfig
from pbt_lab.config.space import Space, build_space
from pbt_lab.names import LR, OPTIMIZER
from pbt_lab.results.audit import undone_exploits
from pbt_lab.tuning import explore as explore_by_kind
from pbt_lab.tuning.controller import LabFIFO
from pbt_lab.tuning.explore import operation_text, truncate
from pbt_lab.tuning.scheduler import LabPBT

RANGES = {"adam": (1e-4, 1e-2), "gd": (1e-2, 1.0), "adadelta": (1.0, 100.0)}


def policy(switch_probability=0.0, resample_probability=0.25, perturbation_factors=(0.8, 1.2)) -> Space:
    """The study's space over RANGES' optimizers (what PBTConfig builds without ``pbt.space``)."""
    pbt = SimpleNamespace(
        optimizers=list(RANGES),
        lr_ranges=RANGES,
        perturbation_factors=perturbation_factors,
        resample_probability=resample_probability,
        optimizer_switch_probability=switch_probability,
    )
    return build_space(pbt, {})


def explore(optimizer: str, lr: float, space: Space, rng) -> dict:
    new, operations = explore_by_kind.explore({OPTIMIZER: optimizer, LR: lr}, space, rng)
    return {**new, "operation": operation_text(operations)}


def lab_pbt(**kwargs) -> LabPBT:
    """The lab's scheduler over the study's space (``policy()``), ranking ``score`` higher-better, a check
    its unit of time."""
    return LabPBT(space=policy(), time_attr="training_iteration", mode="max", metric="score", **kwargs)


def place(lr, low, high):
    return (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))


# --- truncation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, fraction, expected",
    [
        (5, 0.2, 1),
        (10, 0.2, 2),
        (15, 0.2, 3),
        (20, 0.2, 4),
        (16, 0.2, 3),
        (6, 0.34, 2),
        (4, 0.2, 1),
        (2, 0.5, 1),
        (30, 0.1, 3),
    ],
)
def test_bottom_and_top_are_floor_of_the_fraction(n, fraction, expected):
    scores = {f"m{i}": i / n for i in range(n)}
    lower, upper = truncate(scores, set(), fraction, np.random.default_rng(0))
    assert len(lower) == len(upper) == expected  # Ray's ceil would give 4 of 16, 3 of 6
    assert sorted(lower) == sorted(f"m{i}" for i in range(expected))
    assert sorted(upper) == sorted(f"m{i}" for i in range(n - expected, n))


def test_unranked_members_are_left_out_and_one_ranked_member_decides_nothing():
    assert truncate({"a": 0.5, "b": None, "c": float("nan")}, set(), 0.5, np.random.default_rng(0)) == (
        [],
        [],
    )
    lower, upper = truncate({"a": 0.5, "b": None, "c": 0.9}, set(), 0.5, np.random.default_rng(0))
    assert (lower, upper) == (["a"], ["c"])


def test_diverged_members_are_all_replaced_and_never_donate_whatever_their_score():
    # Scores below −1 and a minimised metric's negated scores: divergence comes from the flag alone.
    scores = {"a": -5.0, "b": -4.0, "c": -3.0, "d": -2.0, "e": -1.5}
    lower, upper = truncate(scores, {"d", "e"}, 0.2, np.random.default_rng(0))
    assert sorted(lower) == ["d", "e"]  # more diverged than floor(0.2 × 5) = 1: all of them
    assert upper == ["c"]
    healthy = truncate(scores, set(), 0.2, np.random.default_rng(0))
    assert healthy == (["a"], ["e"])


def test_nobody_left_to_copy_means_no_decision():
    assert truncate({"a": 0.9, "b": 0.8}, {"a", "b"}, 0.2, np.random.default_rng(0)) == ([], [])


def test_ties_break_by_the_seeded_generator_whatever_order_members_are_listed_in():
    scores = {f"m{i}": 0.5 for i in range(10)}

    def draw(seed, listed=scores):
        return truncate(listed, set(), 0.2, np.random.default_rng(seed))

    assert (
        draw(1) == draw(1) == draw(1, dict(reversed(scores.items())))
    )  # a resume re-adds members in another order
    assert len({tuple(draw(seed)[0]) for seed in range(20)}) > 5  # not always the same members


# --- explore ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1e-4, 1e-2, 1.2e-4, 0.9e-2, 1e-3])
def test_a_perturbed_rate_stays_inside_its_range_and_never_equals_the_donors(lr):
    p = policy(resample_probability=0.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        new = explore("adam", lr, p, rng)
        assert new["optimizer"] == "adam" and 1e-4 <= new["lr"] <= 1e-2 and new["lr"] != lr
        assert any(math.isclose(new["lr"], lr * f) for f in (0.8, 1.2, 1 / 0.8, 1 / 1.2))


def test_a_step_past_a_bound_is_reflected_back_inside():
    p = policy(resample_probability=0.0, perturbation_factors=(1.2,))
    new = explore("adam", 1e-2, p, np.random.default_rng(0))
    assert new["lr"] == pytest.approx(1e-2 / 1.2) and "reflected" in new["operation"]
    p = policy(resample_probability=0.0, perturbation_factors=(0.8,))
    assert explore("adam", 1e-4, p, np.random.default_rng(0))["lr"] == pytest.approx(1e-4 / 0.8)


def test_resampled_rates_spread_over_the_optimizers_own_range_not_piled_at_its_ends():
    p = policy(resample_probability=1.0)
    rng = np.random.default_rng(0)
    rates = np.array([explore("gd", 0.5, p, rng)["lr"] for _ in range(4000)])
    assert (rates >= 1e-2).all() and (rates <= 1.0).all()
    places = np.log10(rates / 1e-2) / 2  # 0 at the bottom of gd's range, 1 at the top
    counts, _ = np.histogram(places, bins=10, range=(0, 1))
    assert counts.min() > 0.7 * len(rates) / 10 and counts.max() < 1.3 * len(rates) / 10  # log-uniform
    ends = np.isclose(rates, 1e-2) | np.isclose(rates, 1.0)
    assert ends.mean() < 0.01


def test_a_switch_keeps_the_rates_relative_place_in_the_new_range():
    p = policy(switch_probability=1.0, resample_probability=0.0, perturbation_factors=(1.2,))
    rng = np.random.default_rng(0)
    for lr in (1e-4, 1e-3, 5e-3):
        new = explore("adam", lr, p, rng)
        assert new["optimizer"] in ("gd", "adadelta") and "switch adam->" in new["operation"]
        low, high = RANGES[new["optimizer"]]
        base = new["lr"] / 1.2 if "reflected" not in new["operation"] else new["lr"] * 1.2
        assert place(base, low, high) == pytest.approx(place(lr, 1e-4, 1e-2), abs=1e-9)
        assert low <= new["lr"] <= high


def test_a_switched_resample_draws_from_the_new_optimizers_range():
    p = policy(switch_probability=1.0, resample_probability=1.0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        new = explore("adam", 1e-3, p, rng)
        low, high = RANGES[new["optimizer"]]
        assert low <= new["lr"] <= high and new["optimizer"] != "adam"


def test_explore_is_a_function_of_its_generator():
    p = policy(switch_probability=0.5)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [explore("adam", 1e-3, p, rng) for _ in range(20)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


def test_config_refuses_ranges_a_reflected_step_would_leave():
    with pytest.raises(ValueError, match="narrower than"):
        PBTConfig(optimizers=["adam"], lr_ranges={"adam": [1e-3, 1.2e-3]})
    with pytest.raises(ValueError, match="other than 1"):
        PBTConfig(perturbation_factors=[1.0, 1.2])
    with pytest.raises(ValueError, match=r"multiple of pbt\.perturbation_interval"):
        PBTConfig(perturbation_interval=4, burn_in_period=6)


# --- the scheduler's state -------------------------------------------------------------------


def scheduler(seed=0) -> LabPBT:
    return lab_pbt(
        seed=seed,
        perturbation_interval=2,
        quantile_fraction=0.2,
    )


def added_member(scheduler: LabPBT, name: str, registered: dict | None = None, **config):
    """A trial as Ray re-adds it to a resumed run, added to ``scheduler``: ``config`` beyond the rate
    (an exploit's number), the report its latest checkpoint was registered with (none: none yet)."""

    class Member(SimpleNamespace):
        __hash__ = object.__hash__

    held = registered and Checkpoint(tempfile.mkdtemp(prefix="pbt-resumed-"), LocalFileSystem())
    latest = registered and SimpleNamespace(checkpoint=held, metrics=registered)
    manager = SimpleNamespace(
        latest_checkpoint_result=latest, checkpoint_config=SimpleNamespace(num_to_keep=None)
    )
    trial = Member(
        trial_id=name,
        experiment_tag=name,
        config={OPTIMIZER: "adam", LR: 1e-3, **config},
        evaluated_params={},
        run_metadata=SimpleNamespace(checkpoint_manager=manager),
    )
    scheduler.on_trial_add(SimpleNamespace(search_alg=None), trial)
    return trial


def test_the_schedulers_state_round_trips_its_generator_decisions_counters_and_members():
    first = scheduler()
    first._rng.random(17)  # some decisions' worth of draws
    first.decisions = [{"decision": i, "action": "keep"} for i in range(3)]
    first.decisions.append({"decision": 3, "action": "exploit", "member": "a", "donor": "b"})
    a, b = added_member(first, "a", exploit_decision=3), added_member(first, "b")
    first._trial_state[a].last_score, first._trial_state[a].last_train_time = 0.9, 6
    first._trial_state[a].last_perturbation_time = 4
    first._reports, first._last_report, first._next_perturbation_sync = 11, {"a": 10, "b": 11}, 8
    first._diverged, first._pending = {"b"}, {"a": 3}
    first.keeper.moved = {"b/checkpoint_copy-000003": ("a", None)}  # b's checkpoint, moved in for a
    state = json.loads(json.dumps(first.state_dict()))  # as pbt_state.json stores it
    second = scheduler(seed=99)
    second.load_state_dict(state)
    waiting = {"trial_id": "b", "state_id": "b6"}  # a waits to copy b's checkpoint, as Ray's snapshot has it
    a2, b2 = added_member(second, "a", registered=waiting, exploit_decision=3), added_member(second, "b")
    assert second.decisions == first.decisions and np.array_equal(second._rng.random(5), first._rng.random(5))
    assert (second._reports, second._next_perturbation_sync, second._last_report) == (
        11,
        8,
        {"a": 10, "b": 11},
    )
    assert (second._diverged, second._pending) == ({"b"}, {"a": 3})
    assert second.keeper.moved == first.keeper.moved
    for old, new in ((a, a2), (b, b2)):
        kept = ("last_score", "last_train_time", "last_perturbation_time")
        assert [getattr(second._trial_state[new], k) for k in kept] == [
            getattr(first._trial_state[old], k) for k in kept
        ]


def resumed_with(decisions: list[dict], pending: dict) -> LabPBT:
    """A scheduler resumed from a state (as pbt_state.json stores it) that holds ``decisions`` and members
    a and b, ``pending`` their awaited exploits."""
    first = scheduler()
    first.decisions = decisions
    for name in "ab":
        added_member(first, name)
    first._pending = pending
    resumed = scheduler()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    return resumed


def test_a_decision_the_resumed_trials_do_not_carry_was_interrupted_and_explained():
    # Ray's snapshot of the trials predates the exploit (a kill during its upload): a resumes from its own
    # checkpoint at iteration 4, with its config from before the decision.
    s = resumed_with([{"decision": 0, "action": "exploit", "member": "a", "donor": "b"}], {"a": 0})
    added_member(s, "a", registered={"trial_id": "a", "state_id": "a4", "training_iteration": 4})
    added_member(s, "b")
    assert s.decisions[0]["interrupted"] and s._pending["a"] is None  # ranked again once it reports
    assert [s._trial_state[t].last_train_time for t in s._trial_state if t.trial_id == "a"] == [4]
    undone = undone_exploits(s.decisions, pd.DataFrame(columns=["exploit_decision"]), {"a": "reached"})
    assert undone[0]["explained"] and "killed" in undone[0]["why"]


def test_an_exploit_the_resumed_trials_carry_and_the_state_lacks_is_recovered_from_them():
    # The snapshot of the trials is newer: a waits to copy b's state b6 under decision 2, which this state
    # (its decision 0 stored) never held.
    s = resumed_with([{"decision": n, "action": "keep"} for n in range(1)], {})
    donors = {"trial_id": "b", "state_id": "b6", "training_iteration": 6, "state_digest": "x"}
    added_member(s, "a", registered=donors, exploit_decision=2, lr=0.05)
    added_member(s, "b", registered={"trial_id": "b", "state_id": "b8", "training_iteration": 8})
    assert [d["action"] for d in s.decisions] == ["keep", "unrecorded", "exploit"]
    recovered = s.decisions[2]
    assert (recovered["member"], recovered["donor"], recovered["donor_state_id"]) == ("a", "b", "b6")
    assert recovered["new"][LR] == 0.05 and s._pending == {"a": 2}
    # Ray's copies of the savers' reports go to pbt_state.json, for the audit.
    assert {r["state_id"] for r in s.state_dict()["registered_reports"]} == {"b6", "b8"}


def test_a_state_older_than_the_trials_does_not_hold_a_member_to_an_exploit_it_carried_out():
    decided = [{"decision": 0, "action": "exploit", "member": "a", "donor": "b"}]
    # It carried out decision 0 and saved its own state since: not pending, and not interrupted.
    s = resumed_with(decided, {"a": 0})
    added_member(s, "a", registered={"trial_id": "a", "state_id": "a8"}, exploit_decision=0)
    assert s._pending["a"] is None and "interrupted" not in s.decisions[0]
    # It went on to a later exploit (2) that this state lacks: 0 stays as it was, 2 is recovered.
    s = resumed_with([dict(d) for d in decided], {"a": 0})
    added_member(s, "a", registered={"trial_id": "b", "state_id": "b9"}, exploit_decision=2)
    assert "interrupted" not in s.decisions[0] and s.decisions[2]["donor_state_id"] == "b9"
    assert s._pending == {"a": 2} and s.decisions[1]["action"] == "unrecorded"


def test_a_resumed_member_that_carries_its_known_exploit_still_awaits_it():
    s = resumed_with([{"decision": 0, "action": "exploit", "member": "a", "donor": "b"}], {"a": 0})
    added_member(s, "a", registered={"trial_id": "b", "state_id": "b6"}, exploit_decision=0)
    assert s._pending == {"a": 0} and "interrupted" not in s.decisions[0]


def waiting_population(scheduler: LabPBT, train_times: dict, reported: dict):
    """Trials waiting to run (paused), as a controller would list them, with PBT's per-trial state."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    class Waiting(SimpleNamespace):
        __hash__ = object.__hash__

    trials = [Waiting(trial_id=name, status=Trial.PAUSED) for name in train_times]
    for t in trials:
        scheduler._trial_state[t] = SimpleNamespace(last_train_time=train_times[t.trial_id])
        scheduler._last_report[t.trial_id] = reported[t.trial_id]
    return SimpleNamespace(get_trials=lambda: trials)


def test_turns_go_to_the_least_trained_then_to_who_reported_longest_ago():
    s = scheduler()
    controller = waiting_population(s, {"a": 4, "b": 2, "c": 2}, {"a": 1, "b": 9, "c": 3})
    assert s.choose_trial_to_run(controller).trial_id == "c"  # b and c tie on training: c waited longer


def test_synchronous_turns_never_run_a_member_past_the_next_sync_point():
    # Ray's rule, which the lab's turn-taking keeps: a member exploited while queued (its clock now
    # its donor's, at the sync point) is not chosen again until everyone has reached the point.
    s = lab_pbt(
        seed=0,
        perturbation_interval=2,
        synch=True,
    )
    s._next_perturbation_sync = 4
    controller = waiting_population(s, {"exploited": 4, "behind": 2}, {"exploited": 1, "behind": 5})
    assert s.choose_trial_to_run(controller).trial_id == "behind"
    s._handed.discard("behind")  # it ran and reported (on_trial_result)
    s._trial_state[controller.get_trials()[1]].last_train_time = 4
    assert s.choose_trial_to_run(controller) is None  # both at the point: the decision comes first


def test_while_the_next_in_turn_waits_for_a_worker_the_next_ones_are_handed_to_ray_too():
    """Ray keeps a paused member's worker only for a member handed to it: handing one waiting member
    again and again let Ray stop a second worker pausing at the same time (one slot trained the
    whole population). A free worker still goes to the member next in turn."""
    s = scheduler()
    controller = waiting_population(s, {"a": 1, "b": 2, "c": 2}, {"a": 5, "b": 9, "c": 3})
    assert [s.choose_trial_to_run(controller).trial_id for _ in "abc"] == ["a", "c", "b"]
    assert s.choose_trial_to_run(controller).trial_id == "a"  # all handed: the first in turn again
    controller._actor_cache = SimpleNamespace(num_cached_objects=1)  # a worker came free
    s._handed.discard("c")  # c ran and reported (on_trial_result), then paused again
    assert s.choose_trial_to_run(controller).trial_id == "a"  # not c, though c was not handed yet
    controller._actor_cache.num_cached_objects = 0
    assert s.choose_trial_to_run(controller).trial_id == "c"  # no worker free: hand c as well


def test_a_free_worker_goes_to_the_next_in_turn_whose_own_worker_is_not_starting():
    """Ray cancels the worker it is starting for a member when it hands that member a free one. The
    oldest request's worker starts first, and it is the next in turn's: with checks shorter than a
    start, every start on the second slot was cancelled and one worker trained the population."""
    s = scheduler()
    controller = waiting_population(s, {"a": 1, "b": 1, "c": 2}, {"a": 3, "b": 5, "c": 1})
    a, b, c = controller.get_trials()
    starting, requested = object(), object()  # a's worker holds the idle slot; b's waits for resources
    controller._trial_to_actor = {a: starting, b: requested}
    controller._actor_manager = SimpleNamespace(is_actor_started=lambda actor: actor is starting)
    controller._actor_cache = SimpleNamespace(num_cached_objects=1)  # a worker came free
    assert s.choose_trial_to_run(controller) is b  # not a: its start would be cancelled, its slot idle
    controller._trial_to_actor = {a: starting, b: starting}
    assert s.choose_trial_to_run(controller) is c
    controller._trial_to_actor = {a: requested}  # only a request: the free worker goes in turn
    assert s.choose_trial_to_run(controller) is a


def test_a_scheduler_pickled_before_the_keeper_resumes_with_one():
    import ray.cloudpickle as pickle

    old = scheduler()
    del old.keeper, old._gone  # as a tuner.pkl written before them holds it
    old._pending = {"a"}
    resumed = pickle.loads(pickle.dumps(old))
    assert resumed._pending == {"a": None} and resumed._gone == set() and resumed.keeper.scheduler is resumed


def test_keep_state_shares_the_scheduler_through_a_pickle_as_tuner_pkl_does():
    import ray.cloudpickle as pickle

    from pbt_lab.tuning.callbacks import KeepPBTState

    s = scheduler()
    scheduler_copy, keeper = pickle.loads(pickle.dumps((s, KeepPBTState(s))))
    assert keeper.scheduler is scheduler_copy  # what set_state restores is the scheduler Tune runs


# --- decision sequences on a hand-made controller (no Ray run) --------------------------------


class Manager:
    """A trial's checkpoint manager as LabPBT reads it: the latest checkpoint and the registered ones."""

    def __init__(self):
        self._latest_checkpoint_result = None
        self.best_checkpoint_results = []
        self.checkpoint_config = SimpleNamespace(num_to_keep=None)

    @property
    def latest_checkpoint_result(self):
        return self._latest_checkpoint_result


class Storage:
    """The experiment's storage as LabPBT reads it: the snapshot number its ``pbt_state.json`` holds
    (none yet: reading fails as a missing file does), raised to ``uploading`` when Ray's upload ends
    (``syncer.wait``)."""

    stored: int | None = None
    uploading: int | None = None

    def __init__(self, trial_dir: Path):
        self.storage_filesystem, self.experiment_fs_path = self, "run"
        self.trial_fs_path = str(trial_dir)  # where a checkpoint moved in for it goes
        self.syncer = SimpleNamespace(wait=self.upload)

    def open_input_stream(self, path):
        if self.stored is None:
            raise FileNotFoundError(path)
        return io.BytesIO(f'{{"snapshot": {Storage.stored}'.encode())

    @classmethod
    def upload(cls):
        cls.stored = cls.uploading


class Member:
    """A trial as LabPBT and Ray's PBT use it (status, config, tags, checkpoint manager)."""

    def __init__(self, name: str, lr: float, root: Path):
        self.trial_id = self.experiment_tag = name
        self.config = {OPTIMIZER: "adam", LR: lr, "seed": 1}
        self.evaluated_params, self.status = {}, Trial.RUNNING
        self.run_metadata = _TrainingRunMetadata()  # Ray's own, whose JSON a snapshot writes
        self.run_metadata.checkpoint_manager = Manager()
        self.temporary_state, self.is_restoring = SimpleNamespace(saving_to=None), False
        self.storage = Storage(root / name)
        self.local_experiment_path = self.local_dir = str(root)  # where Ray's policy logs go
        self.last_result: dict = {}
        self.retries_left = 0  # run.max_failures minus its failures so far

    def is_finished(self):
        return self.status in (Trial.TERMINATED, Trial.ERROR)

    def should_recover(self):
        return self.retries_left > 0

    @property
    def checkpoint(self):
        latest = self.run_metadata.checkpoint_manager.latest_checkpoint_result
        return latest and latest.checkpoint

    def set_experiment_tag(self, tag):
        self.experiment_tag = tag

    def set_config(self, config):
        self.config = config


class Controller:
    """The calls LabPBT and Ray's PBT make on Tune's controller, on hand-made members: a save returns a
    checkpoint at once; a pause pauses."""

    search_alg = None

    def get_trials(self):
        return self.members

    def get_live_trials(self):
        return {m for m in self.members if not m.is_finished()}

    def __init__(self, members: list[Member], root: Path):
        self.members, self.root, self.saves = members, root, 0
        self.recovered: list[Member] = []  # members requeued through Ray's on_trial_recover
        self.requeued: list[Member] = []
        self._resetting_trials: set[Member] = set()  # members Ray is resetting a cached worker for

    def _schedule_trial_save(self, trial, result=None):
        self.saves += 1  # a real directory, as Ray's would be, with the state's id in it
        path = self.root / trial.trial_id / f"checkpoint_{self.saves:06d}"
        path.mkdir(parents=True)
        (path / "state").write_text(result.get("state_id") or "")
        saved = SimpleNamespace(checkpoint=Checkpoint(str(path), LocalFileSystem()), metrics=result)
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result = saved
        trial.run_metadata.checkpoint_manager.best_checkpoint_results.append(saved)  # registered
        return saved.checkpoint

    def pause_trial(self, trial, should_checkpoint=True):
        if should_checkpoint:  # a pause saves the state the member last reported
            self._schedule_trial_save(trial, trial.last_result)
        trial.status = Trial.PAUSED

    # Ray's private requeue, as LabPBT uses it for a member that failed while starting
    _iteration = 0

    def _requeue_trial(self, trial):  # Ray's: the scheduler told of the error again, then re-added
        trial.status = Trial.PENDING
        self.requeued.append(trial)

    @property
    def _trials(self):
        return self.members

    @property
    def _callbacks(self):
        return SimpleNamespace(on_trial_recover=lambda iteration, trials, trial: self.recovered.append(trial))


def population(s: LabPBT, lrs: dict) -> tuple[Controller, dict]:
    root = Path(tempfile.mkdtemp(prefix="pbt-policy-"))
    members = {name: Member(name, lr, root) for name, lr in lrs.items()}
    controller = Controller(list(members.values()), root)
    for m in members.values():
        s.on_trial_add(controller, m)
    return controller, members


def report(s: LabPBT, controller, member: Member, iteration: int, score: float, **extra) -> str:
    # As the lab's trainable reports: every result says which exploit it carries out (None: none).
    result = {
        "training_iteration": iteration,
        "score": score,
        "diverged": False,
        "exploit_decision": None,
        **extra,
    }
    member.status, member.last_result = Trial.RUNNING, result  # a member that reports runs
    return s.on_trial_result(controller, member, result)


def first_exploit(s: LabPBT) -> tuple[Controller, dict, dict]:
    """Five members ranked once (a lowest, e highest), then a reports the lowest score: its exploit."""
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score)
    report(s, controller, m["a"], 2, 0.10)
    return controller, m, s.decisions[-1]


def test_a_recipient_is_neither_ranked_nor_a_donor_until_it_reports_a_fresh_score():
    # Six members at 20 %: one is replaced among six, and among the five fresh ones while a copy is
    # in flight; the recipient's old score would take that one slot and shield the real laggard.
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcdef", 1e-3))
    for name, score in zip("abcdef", (0.50, 0.60, 0.70, 0.80, 0.90, 0.95)):
        report(s, controller, m[name], 1, score)
    assert s.decisions[-1]["action"] == "save" and s.decisions[-1]["ranked"] == 6  # f, on top
    report(s, controller, m["a"], 2, 0.10)  # the bottom one: it copies f, the only top member
    assert s.decisions[-1]["action"] == "exploit" and s.decisions[-1]["donor"] == "f"
    report(s, controller, m["b"], 2, 0.55)  # now the real laggard among the fresh scores
    assert s.decisions[-1]["ranked"] == 5 and s.decisions[-1]["action"] == "exploit"
    s._pending.clear()  # had a's stale 0.10 been ranked, it would have filled the one bottom slot
    assert [t.trial_id for t in s._quantiles()[0]] == ["a"]


def test_one_recipient_at_a_time_in_a_population_of_five():
    # 20 % of the four fresh scores left while a copy is in flight is nobody: no cascade of exploits.
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score)
    report(s, controller, m["a"], 2, 0.10)
    assert s.decisions[-1]["action"] == "exploit"
    for name in "bcde":
        report(s, controller, m[name], 2, 0.20)
        assert s.decisions[-1]["action"] == "keep" and (
            s.decisions[-1]["ranked"],
            s.decisions[-1]["lower"],
        ) == (4, 0)
    report(s, controller, m["a"], 3, 0.95)  # its fresh score: five ranked, one replaced again
    assert s.decisions[-1]["ranked"] == 5 and s.decisions[-1]["lower"] == 1


def test_a_rescued_member_with_an_old_top_score_donates_nothing_until_it_reports_again():
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcdef", 1e-3))
    for name, score in zip("abcdef", (0.50, 0.60, 0.70, 0.80, 0.85, 0.95)):
        report(s, controller, m[name], 1, score)
    report(s, controller, m["f"], 2, 0.95, diverged=True)  # f diverged after its top score: rescued
    assert s.decisions[-1]["action"] == "exploit" and s.decisions[-1]["member"] == "f"
    for name, score in zip("bcde", (0.6, 0.7, 0.8, 0.85)):  # a, still the lowest, stays in the bottom slot
        report(s, controller, m[name], 2, score)
        assert s.decisions[-1]["ranked"] == 5  # f's 0.95 is not ranked: it holds another state now
    assert s.decisions[-1]["action"] == "save"  # e, the top of the fresh scores, not f
    report(s, controller, m["f"], 3, 0.97)  # its first score since the copy: ranked again
    assert s.decisions[-1]["ranked"] == 6 and s.decisions[-1]["action"] == "save"


def test_the_next_report_records_whether_an_exploit_was_carried_out():
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score)
    report(s, controller, m["a"], 2, 0.10)
    decision = s.decisions[-1]
    report(s, controller, m["a"], 2, 0.85, segment_from="e", exploit_decision=decision["decision"])
    assert decision["carried_out"] is True
    report(s, controller, m["b"], 3, 0.10)
    other = s.decisions[-1]
    report(s, controller, m["b"], 4, 0.60)  # it trained on from its own state: not carried out
    assert other["action"] == "exploit" and other["carried_out"] is False


def synchronous(n=3) -> tuple[LabPBT, Controller, dict]:
    s = lab_pbt(
        seed=0,
        perturbation_interval=2,
        quantile_fraction=0.34,
        synch=True,
    )
    controller, m = population(s, {name: 1e-3 for name in "abc"[:n]})
    return s, controller, m


@pytest.mark.parametrize("leaves", ["on_trial_complete", "on_trial_error", "on_trial_remove"])
def test_synchronous_pbt_decides_when_a_member_ends_before_the_sync_point(leaves):
    """A member capped (its budget: Ray's done result never reaches the scheduler), failed or removed
    before the sync point: the others wait there, and the decision is made when it leaves."""
    s, controller, m = synchronous()
    for name, score in (("a", 0.9), ("b", 0.5)):
        assert report(s, controller, m[name], 2, score) == "PAUSE"
        controller.pause_trial(m[name])
    assert not s.decisions and s.choose_trial_to_run(controller) is None  # they wait for c
    if leaves == "on_trial_remove":
        getattr(s, leaves)(controller, m["c"])
    elif leaves == "on_trial_error":
        s.on_trial_error(controller, m["c"])
    else:
        s.on_trial_complete(controller, m["c"], {"training_iteration": 1, "done": True})
    m["c"].status = Trial.TERMINATED if leaves != "on_trial_error" else Trial.ERROR
    assert sorted(d["member"] for d in s.decisions) == ["a", "b"]
    assert {d["action"] for d in s.decisions} == {"save", "exploit"}  # b copies a
    assert s._next_perturbation_sync == 4
    assert s.choose_trial_to_run(controller) is not None  # the population goes on


@pytest.mark.parametrize("retries_left", [1, 0])
def test_a_member_that_fails_while_its_worker_starts_is_requeued_while_it_has_retries(retries_left):
    """Ray 2.60 retries only a running trial: one whose worker died while starting or restoring (its
    node lost) ends in error; LabPBT requeues it (Ray's own restart path) if it has retries left."""
    s = lab_pbt(seed=0, perturbation_interval=2)
    controller, m = population(s, {name: 1e-3 for name in "abc"})
    m["c"].status, m["c"].retries_left = Trial.PENDING, retries_left
    s.on_trial_error(controller, m["c"])  # as Ray calls it, then marks the trial ERROR
    m["c"].status = Trial.ERROR
    s.choose_trial_to_run(controller)
    if retries_left:
        assert m["c"].status == Trial.PENDING and controller.recovered == controller.requeued == [m["c"]]
    else:
        assert m["c"].status == Trial.ERROR and not controller.recovered and "c" in s._gone


@pytest.mark.parametrize("scheduler", ["LabPBT", "LabFIFO"])
def test_a_member_whose_worker_is_lost_while_ray_resets_it_starts_again(scheduler):
    """Ray 2.60 keeps a member whose reset failed (its cached worker's node lost) in its resetting set
    for ever, and every later start of it waits on a worker it never gets: the error ends the reset,
    for PBT and for the grid's first-in first-out order alike."""
    s = lab_pbt(seed=0, perturbation_interval=2) if scheduler == "LabPBT" else LabFIFO()
    controller, m = population(s, {name: 1e-3 for name in "ab"})
    controller._resetting_trials |= {m["a"], m["b"]}
    m["a"].status, m["a"].retries_left = Trial.PENDING, 1
    s.on_trial_error(controller, m["a"])  # Ray's requeue of the failed reset tells the scheduler so
    assert controller._resetting_trials == {m["b"]}  # b's reset goes on
    m["a"].status = Trial.ERROR  # and the grid's member that failed starting is requeued too
    assert s.choose_trial_to_run(controller) is not None
    assert m["a"].status == Trial.PENDING and controller.requeued == [m["a"]]


def test_synchronous_pbt_when_the_last_to_report_is_the_one_exploited():
    """Ray's testSynchPass order: the member that arrives last at the sync point is the bottom one; it is
    exploited as it reports (paused with the donor's checkpoint), and every member runs on."""
    s, controller, m = synchronous()
    for name, score in (("a", 0.9), ("b", 0.7)):
        report(s, controller, m[name], 2, score)
        controller.pause_trial(m[name])
    assert report(s, controller, m["c"], 2, 0.1) == "NOOP"  # Ray paused it for the exploit
    assert m["c"].status == Trial.PAUSED and m["c"].config["exploit_decision"] is not None
    exploit = next(d for d in s.decisions if d["action"] == "exploit")
    assert (exploit["member"], exploit["donor"]) == ("c", "a")
    assert s._next_perturbation_sync == 4
    # all three wait at iteration 2 (c with its donor's clock) for the next point, 4: the one that
    # reported longest ago runs first, and each is handed in turn
    assert [s.choose_trial_to_run(controller).trial_id for _ in range(3)] == ["a", "b", "c"]


def held(member: Member) -> list[str]:
    """The checkpoints in a member's directory, as a poll of the disk sees them."""
    directory = Path(member.storage.trial_fs_path)
    return sorted(p.name for p in directory.glob("checkpoint_*")) if directory.is_dir() else []


def in_snapshot(member: Member):
    """The checkpoint a resume would restore the member from: its run metadata as Ray's experiment
    snapshot writes it (JSON cached since it last changed), read back."""
    return _TrainingRunMetadata.from_json_state(
        member.run_metadata.get_json_state()
    ).checkpoint_manager.latest_checkpoint_result


def held_path(member: Member, index: int) -> str:
    return str(Path(member.storage.trial_fs_path) / held(member)[index])


def test_a_checkpoint_a_recipient_waits_on_moves_into_its_directory_to_keep_the_bound():
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score, state_id=f"{name}1")
    report(s, controller, m["a"], 2, 0.10, state_id="a2")  # a copies e's state e1, and waits for a slot
    decision = s.decisions[-1]
    assert decision["donor"] == "e" and decision["donor_state_id"] == "e1"
    assert in_snapshot(m["a"]).checkpoint.path == held_path(m["e"], 0)
    Storage.stored = Storage.uploading = None
    for iteration in (2, 3, 4, 5):
        report(s, controller, m["e"], iteration, 0.95, state_id=f"e{iteration}")
        controller.pause_trial(m["e"])  # every turn saves the state it reported
        assert len(held(m["e"])) <= 3 and len(held(m["a"])) <= 3
        s.keeper.make_room(m["e"], controller.members)  # on_trial_save: another save may follow
        s.keeper.snapshot_taken()  # an experiment snapshot names e's latest; storage holds the one before
        Storage.stored, Storage.uploading = Storage.uploading, s.keeper.snapshot_count
    waiting = m["a"].run_metadata.checkpoint_manager.latest_checkpoint_result
    assert (Path(waiting.checkpoint.path) / "state").read_text() == "e1"  # the decided state, moved
    assert in_snapshot(m["a"]).checkpoint.path == waiting.checkpoint.path  # a resume restores it too
    assert Path(waiting.checkpoint.path).parent.name == "a" and "moved" in decision
    assert decision["donor_state_id"] == "e1" and "redirected" not in decision
    copied = {"segment_from": "e", "exploit_decision": decision["decision"]}
    report(s, controller, m["a"], 2, 0.9, state_id="a3", **copied)
    controller.pause_trial(m["a"])  # it carried out its exploit and saved: the moved copy goes
    s.keeper.make_room(m["a"], controller.members)
    assert not s.keeper.moved and not any(name.startswith("checkpoint_copy") for name in held(m["a"]))


def test_two_recipients_waiting_on_one_checkpoint_both_restore_it_after_it_moves():
    """One slot: a and b both copy e's state e1 and wait while e saves on; the one copy moved into a's
    directory serves both (each restores the state decided, from a path that exists)."""
    s = lab_pbt(seed=1, perturbation_interval=1, quantile_fraction=0.4)  # (seed 1: both draw e)
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score, state_id=f"{name}1")
    report(s, controller, m["a"], 2, 0.10, state_id="a2")
    report(s, controller, m["b"], 2, 0.05, state_id="b2")
    decisions = s.decisions[-2:]
    assert [(d["member"], d["donor"], d["donor_state_id"]) for d in decisions] == [
        ("a", "e", "e1"),
        ("b", "e", "e1"),
    ]
    Storage.stored = Storage.uploading = None
    for iteration in (2, 3, 4, 5):
        report(s, controller, m["e"], iteration, 0.95, state_id=f"e{iteration}")
        controller.pause_trial(m["e"])
        s.keeper.make_room(m["e"], controller.members)
        s.keeper.snapshot_taken()
        Storage.stored, Storage.uploading = Storage.uploading, s.keeper.snapshot_count
        assert len(held(m["e"])) <= 3
    for member, decision in zip("ab", decisions):
        waiting = Path(m[member].run_metadata.checkpoint_manager.latest_checkpoint_result.checkpoint.path)
        assert (waiting / "state").read_text() == "e1" and "moved" in decision
    for member, decision in zip("ab", decisions):  # each carries its exploit out; then the copy goes
        copied = {"segment_from": "e", "exploit_decision": decision["decision"]}
        report(s, controller, m[member], 2, 0.9, state_id=f"{member}3", **copied)
        controller.pause_trial(m[member])
        s.keeper.make_room(m[member], controller.members)
        assert bool(s.keeper.moved) == (member == "a")  # b still restores from it after a saved


def test_a_donor_checkpoint_a_recipient_resumes_from_stays_until_storage_has_a_later_snapshot():
    """a restored e's e2 and trains on; the snapshot in storage names e2 as a's latest, so a resume
    restores a from it: it stays while e saves on and a saves its own, until a later snapshot is stored."""
    s = lab_pbt(seed=0, perturbation_interval=2, quantile_fraction=0.2)
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 2, score, state_id=f"{name}2")
    report(s, controller, m["a"], 4, 0.10, state_id="a4")  # a copies e2
    decision = s.decisions[-1]
    e2 = Path(m["a"].run_metadata.checkpoint_manager.latest_checkpoint_result.checkpoint.path)
    Storage.stored = Storage.uploading = None
    report(s, controller, m["e"], 4, 0.95, state_id="e4")
    controller.pause_trial(m["e"])  # e saves e4: e2 is no longer e's latest
    copied = {"segment_from": "e", "exploit_decision": decision["decision"]}
    report(s, controller, m["a"], 3, 0.6, state_id="a3", **copied)  # carried out: it trains on from e2
    assert "a" not in s._pending or s._pending["a"] is None
    s.keeper.snapshot_taken()  # names e2 as a's latest
    Storage.uploading = s.keeper.snapshot_count
    controller.pause_trial(m["a"])  # a saves a3: the live run no longer needs e2
    for iteration in (6, 8, 10, 12):
        report(s, controller, m["e"], iteration, 0.95, state_id=f"e{iteration}")
        controller.pause_trial(m["e"])
        s.keeper.make_room(m["e"], controller.members)  # waits for the upload: storage holds that snapshot
        assert (e2 / "state").read_text() == "e2"
    s.keeper.snapshot_taken()  # names a3
    Storage.uploading = s.keeper.snapshot_count
    Storage.upload()
    s.keeper.make_room(m["e"], controller.members)
    assert not e2.exists()


def test_a_checkpoint_ray_is_restoring_already_stays_where_it_is():
    s = lab_pbt(
        seed=0,
        perturbation_interval=1,
        quantile_fraction=0.2,
    )
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score, state_id=f"{name}1")
    report(s, controller, m["a"], 2, 0.10, state_id="a2")  # a copies e1
    report(s, controller, m["e"], 2, 0.95, state_id="e2")
    controller.pause_trial(m["e"])  # e saves e2
    decided = m["a"].run_metadata.checkpoint_manager.latest_checkpoint_result
    m["a"].status, m["a"].is_restoring = Trial.RUNNING, True
    newest = m["e"].run_metadata.checkpoint_manager.best_checkpoint_results[-1]
    s.keeper._move_to_recipient(m["a"], m["e"], newest, controller.members)
    assert m["a"].run_metadata.checkpoint_manager.latest_checkpoint_result is decided
    assert Path(decided.checkpoint.path).is_dir()


def test_a_snapshot_taken_after_an_exploit_resumes_the_recipient_from_the_donors_checkpoint():
    # Ray's experiment snapshot writes each trial's run metadata as JSON cached since its last change;
    # a resumed run restores the recipient from the checkpoint that JSON names.
    s = lab_pbt(seed=0, perturbation_interval=1)
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score, state_id=f"{name}1")
    controller.pause_trial(m["a"])  # a saves a1: its own checkpoint
    m["a"].run_metadata.get_json_state()  # a snapshot
    report(s, controller, m["a"], 2, 0.10, state_id="a2")  # a copies e1
    assert s.decisions[-1]["action"] == "exploit"
    restored = in_snapshot(m["a"])
    assert restored.metrics["state_id"] == "e1" and restored.checkpoint.path == held_path(m["e"], 0)


def test_a_trainable_that_reports_no_restores_leaves_carried_out_unknown():
    # A user's own Ray trainable does not report the decision it carries out: neither done nor undone.
    s = lab_pbt(seed=0, perturbation_interval=1)
    controller, m, decision = first_exploit(s)
    assert decision["action"] == "exploit"
    result = {"training_iteration": 3, "score": 0.85, "diverged": False}  # no exploit_decision key
    m["a"].last_result = result
    s.on_trial_result(controller, m["a"], result)
    assert "carried_out" not in decision


@pytest.mark.parametrize(
    "loaded_from, state, carried_out", [("e", "e1", True), ("a", "a1", False), ("e", "e0", False)]
)
def test_a_trainable_reporting_audited_records_says_what_its_exploit_loaded(loaded_from, state, carried_out):
    # tuning/audited.py's record in the first report after the exploit: the donor's decided state, or not.
    s = lab_pbt(seed=0, perturbation_interval=1)
    controller, m = population(s, dict.fromkeys("abcde", 1e-3))
    for name, score in zip("abcde", (0.50, 0.60, 0.70, 0.80, 0.90)):
        report(s, controller, m[name], 1, score, state_id=f"{name}1")
    report(s, controller, m["a"], 2, 0.10, state_id="a2")  # a copies e's state e1
    decision = s.decisions[-1]
    assert (decision["donor"], decision["donor_state_id"]) == ("e", "e1")
    loaded = {"restored_id": state, "restored_digest": "x", "segment_from": loaded_from}
    result = {"training_iteration": 3, "score": 0.85, "diverged": False, **loaded}
    m["a"].last_result = result
    s.on_trial_result(controller, m["a"], result)
    assert decision["carried_out"] is carried_out and decision["restored"] == loaded


def test_an_exploit_writes_rays_own_policy_logs_with_the_new_config():
    _, m, decision = first_exploit(lab_pbt(seed=0, perturbation_interval=1))
    root = Path(m["a"].local_experiment_path)
    line = json.loads((root / "pbt_global.txt").read_text().splitlines()[-1])
    assert line[5][LR] == decision["new"][LR] and line[5]["exploit_decision"] == decision["decision"]
    assert (root / "pbt_policy_a.txt").is_file()  # Ray's replay reads this member's file
    _, m, decision = first_exploit(lab_pbt(seed=0, perturbation_interval=1, log_config=False))
    assert decision["action"] == "exploit"
    assert not (Path(m["a"].local_experiment_path) / "pbt_global.txt").exists()
