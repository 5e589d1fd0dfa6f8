"""Where a run's time goes: the actors' clocks (pure), the breakdown and its check on hand-made
reports, and the breakdown of the session's quick runs adding up to their slot-seconds."""

import time

import pandas as pd
import pytest

from pbt_lab.names import (
    ACTOR_BORN_AT,
    ACTOR_START,
    AUDIT,
    CHECK_STARTED_AT,
    CHECKPOINT_RESTORE,
    CHECKPOINT_SAVE,
    COMPILE,
    DIVERGED_FLAG,
    NODE_ID,
    RAY,
    REPORTED_AT,
    SECONDS_BY_PART,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOT_IDLE,
    TIME_PARTS,
    TRAIN_PART,
    TRIAL_ID,
    VALIDATE,
    WAITING,
)
from pbt_lab.results import read_tables
from pbt_lab.results.breakdown import (
    check_breakdown,
    check_overhead_seconds,
    forecast_lines,
    forecast_table,
    idle_slot_seconds,
    overhead_forecast,
    time_breakdown,
    turn_seconds,
)
from pbt_lab.results.console import idle_line
from pbt_lab.training.clock import PartClock


def test_a_clock_counts_every_second_once_nested_parts_exclusive():
    born = time.time() - 1.0  # the process started a second before the clock
    clock = PartClock(born_at=born)
    outer = time.time()
    with clock.part(TRAIN_PART):
        time.sleep(0.05)
        with clock.part(VALIDATE):
            time.sleep(0.05)
        time.sleep(0.05)
    outer = time.time() - outer
    time.sleep(0.03)  # back in Ray's hands
    with clock.part(ACTOR_START, gap=WAITING):
        time.sleep(0.01)
    taken = clock.take()
    assert taken[ACTOR_START] >= 1.0 + 0.01  # the process's start before the first call, and the reset
    assert taken[TRAIN_PART] >= 0.1 and taken[VALIDATE] >= 0.05 and taken[WAITING] >= 0.03
    assert taken[TRAIN_PART] + taken[VALIDATE] == pytest.approx(outer, abs=0.005)  # nested: not twice
    assert sum(taken.values()) == pytest.approx(time.time() - born, abs=0.005)
    with clock.part(TRAIN_PART):
        again = clock.take()  # inside an open part: counted up to now, then zero
    assert set(again) == {RAY, TRAIN_PART} and clock.take()[TRAIN_PART] < 0.01


def report(trial: str, actor: str, born: float, at: float, **seconds) -> dict:
    node, pid = actor.split(":")
    return {
        TRIAL_ID: trial,
        NODE_ID: node,
        "pid": int(pid),
        ACTOR_BORN_AT: born,
        REPORTED_AT: at,
        SECONDS_BY_PART: seconds,
    }


def two_slot_run() -> dict:
    """Two actors on two slots over a 10 s run: the first lives 0–9 s, the second 2–10 s."""
    return {
        "a": [
            report("a", "n:1", 100.0, 104.0, **{ACTOR_START: 1.0, TRAIN_PART: 3.0}),
            report("a", "n:1", 100.0, 109.0, **{TRAIN_PART: 4.0, CHECKPOINT_SAVE: 0.5, RAY: 0.5}),
        ],
        "b": [report("b", "n:2", 102.0, 110.0, **{ACTOR_START: 1.0, TRAIN_PART: 6.0, VALIDATE: 1.0})],
    }


def test_the_breakdown_adds_the_actors_parts_and_the_slots_they_left_idle():
    b = time_breakdown(two_slot_run(), started_at=100.0, wall_seconds=10.0, slots=2)
    assert b["slot_seconds"] == 20.0
    assert b["parts"][TRAIN_PART] == 13.0 and b["efficiency"] == 0.65
    assert b["parts"][SLOT_IDLE] == pytest.approx(3.0)  # slot 2 before 102 s, slot 1 after 109 s
    assert b["unaccounted"] == pytest.approx(0.0) and check_breakdown(b) == []
    assert b["members"]["a"][TRAIN_PART] == 7.0 and b["actors"] == 2


def test_a_process_started_before_the_run_is_charged_from_the_run_start():
    reports = {"a": [report("a", "n:1", 90.0, 110.0, **{ACTOR_START: 12.0, TRAIN_PART: 8.0})]}
    b = time_breakdown(reports, started_at=100.0, wall_seconds=10.0, slots=1)
    assert b["parts"][ACTOR_START] == pytest.approx(2.0) and check_breakdown(b) == []


def test_work_is_training_compiling_and_validating_and_the_rest_is_overhead():
    b = time_breakdown(two_slot_run(), started_at=100.0, wall_seconds=10.0, slots=2)
    assert b["work_share"] == pytest.approx(14.0 / 20.0)  # train 13 s, validate 1 s of 20 slot-seconds
    assert b["overhead_share"] == pytest.approx(6.0 / 20.0)  # idle slots and unaccounted time included
    assert b["fixed_seconds"] == pytest.approx(2.0)  # each worker's start, on its first report only
    assert b["turns"] == 0 and b["turn_seconds_median"] is None  # (no checks' start times here)


def test_fixed_seconds_are_each_workers_start_and_first_compiles_from_the_run_start():
    reports = {
        "a": [
            report("a", "n:1", 90.0, 105.0, **{ACTOR_START: 12.0, COMPILE: 1.0, TRAIN_PART: 2.0}),
            report("a", "n:1", 90.0, 110.0, **{COMPILE: 0.5, TRAIN_PART: 4.5}),  # a later compile: per turn
        ]
    }
    assert time_breakdown(reports, started_at=100.0, wall_seconds=10.0, slots=1)["fixed_seconds"] == 3.0


def test_a_turn_is_the_gap_before_a_member_resumes_from_a_checkpoint():
    # One worker: a trial, a fresh trial after it (no turn: nothing restored), its own turn after a
    # pause (0.05 s) and an exploit (0.08 s); another worker's ordinary turn (0.07 s).
    rows = [  # worker, trial, started_at, reported_at, segment_from, segment_step
        ("n:1", "z", -1.50, -0.50, "z", 0),
        ("n:1", "a", 0.00, 1.00, "a", 0),
        ("n:1", "a", 1.05, 2.05, "a", 50),
        ("n:1", "c", 2.13, 3.13, "a", 100),
        ("n:2", "b", 0.00, 1.00, "b", 0),
        ("n:2", "b", 1.07, 2.07, "b", 50),
    ]
    frame = pd.DataFrame(
        [
            {
                TRIAL_ID: t,
                NODE_ID: w,
                "pid": 1,
                CHECK_STARTED_AT: s,
                REPORTED_AT: r,
                SEGMENT_FROM: f,
                SEGMENT_STEP: k,
            }
            for w, t, s, r, f, k in rows
        ]
    )
    turns = turn_seconds(frame)  # (pid 1 on both nodes: two workers)
    assert turns["turns"] == 3
    assert turns["turn_seconds_median"] == pytest.approx(0.06) and turns[
        "exploit_gap_seconds_median"
    ] == pytest.approx(0.08)


def test_a_checks_overhead_is_its_seconds_outside_work_where_no_restore_came_before_it():
    rows = [
        report("a", "n:1", 0.0, 1.0, **{TRAIN_PART: 0.9, RAY: 0.02, AUDIT: 0.01}),
        report("a", "n:1", 0.0, 2.0, **{TRAIN_PART: 0.9, VALIDATE: 0.1, RAY: 0.03, AUDIT: 0.01}),
        report("a", "n:1", 0.0, 3.0, **{TRAIN_PART: 0.8, RAY: 0.3, CHECKPOINT_RESTORE: 0.2}),  # after a turn
    ]
    rows[2][SEGMENT_FROM] = "a"
    waiting = report("a", "n:1", 0.0, 4.0, **{WAITING: 1.0, RAY: 0.01})  # diverged, waiting for a donor
    rows.append({**waiting, DIVERGED_FLAG: True})
    assert check_overhead_seconds(rows) == pytest.approx(0.035)  # median of 0.03 and 0.04: the turn apart
    assert check_overhead_seconds(rows[2:]) is None


def test_the_forecast_weighs_a_turn_and_each_checks_overhead_against_an_intervals_training():
    # 200 steps of 5 ms: 1 s of training; 4 checks of 20 ms and a turn of 80 ms: 0.16 s of overhead.
    share = overhead_forecast(
        turn_seconds=0.08, check_seconds=0.02, steps_per_check=50, interval_steps=200, step_seconds=0.005
    )
    assert share == pytest.approx(0.16 / 1.16)
    table = forecast_table(0.08, 0.02, 50)
    assert table[200][5] == share and table[50][1] > table[1000][1] > table[1000][20]  # longer: cheaper
    assert len(forecast_lines(table)) == 1 + len(table) and forecast_table(None, 0.02, 50) == {}


def test_the_check_fails_a_part_counted_twice_or_seconds_lost():
    doubled = two_slot_run()
    doubled["b"][0][SECONDS_BY_PART][VALIDATE] += 6.0  # the training call counted as validation too
    problems = check_breakdown(time_breakdown(doubled, started_at=100.0, wall_seconds=10.0, slots=2))
    assert len(problems) == 1 and "counted twice" in problems[0]
    lost = two_slot_run()
    del lost["a"][1][SECONDS_BY_PART][TRAIN_PART]  # four seconds of training nobody reported
    problems = check_breakdown(time_breakdown(lost, started_at=100.0, wall_seconds=10.0, slots=2))
    assert len(problems) == 1 and "uncounted" in problems[0]
    crowded = time_breakdown(two_slot_run(), started_at=100.0, wall_seconds=10.0, slots=1)  # 2 actors, 1 slot
    assert "more actors alive than slots" in check_breakdown(crowded)[0]


def test_idle_slots_are_integrated_over_the_run():
    assert idle_slot_seconds([], 0.0, 5.0, 2) == 10.0
    assert idle_slot_seconds([(1.0, 4.0), (2.0, 9.0)], 0.0, 5.0, 2) == pytest.approx(1 + 2 + 1 + 0)
    assert time_breakdown({}, started_at=None, wall_seconds=1.0, slots=1) is None


def test_the_console_says_in_one_line_when_a_slot_stayed_idle():
    # Five members' reports on one worker of two slots (issue 23: "actors: 1, slot_idle 50.0 %").
    one_worker = {
        t: [report(t, "n:1", 100.0, 100.0 + 2 * (i + 1), **{TRAIN_PART: 2.0})] for i, t in enumerate("abcde")
    }
    b = time_breakdown(one_worker, started_at=100.0, wall_seconds=10.0, slots=2)
    assert b["actors"] == 1 and b["shares"][SLOT_IDLE] == pytest.approx(0.5)
    assert idle_line(b) == (
        "IDLE: the 2 slots had no live worker for 50.0% of the slot-seconds; 1 worker trained "
        "(summary.json: time_breakdown)"
    )
    both = {**one_worker, "f": [report("f", "n:2", 100.0, 110.0, **{TRAIN_PART: 10.0})]}
    assert idle_line(time_breakdown(both, started_at=100.0, wall_seconds=10.0, slots=2)) is None


@pytest.mark.parametrize("fixture, slots", [("quick_grid", 2), ("quick_pbt", 1)])  # the PBT: serial
def test_a_quick_runs_breakdown_adds_up_to_its_slot_seconds(fixture, slots, request):
    run_dir = request.getfixturevalue(fixture)
    _, _, summary = read_tables(run_dir)
    b = summary["time_breakdown"]
    assert b["problems"] == [] and abs(b["unaccounted"]) <= 0.05 * b["slot_seconds"]
    assert set(TIME_PARTS) <= set(b["parts"]) and b["slots"] == summary["compute"]["slots"] == slots
    # Training as the actors' clocks measured it is the training the trainer timed, check by check.
    assert b["parts"][TRAIN_PART] == pytest.approx(summary["compute"]["train_seconds"], rel=0.02)
    assert b["slot_seconds"] == pytest.approx(summary["compute"]["wall_seconds"] * slots)
    # Against Ray's own timer of every step (time_this_iter_s, summed): training happens inside the
    # steps, and the steps inside the actors' lives (the parts but the slots' idle time).
    lives = b["slot_seconds"] - b["parts"][SLOT_IDLE]
    assert b["parts"][TRAIN_PART] <= summary["compute"]["trial_seconds"] <= lives
    assert (run_dir / "figures" / "time_breakdown.png").is_file()


def test_slots_are_the_trials_the_cluster_holds_at_once():
    from pbt_lab.tuning.launch import TRIAL_SLOT, trial_slots

    assert (
        trial_slots({"CPU": 8.0, "GPU": 1.0}, cpu=1, gpu=0.25, max_concurrent=None) == 4
    )  # the GPU's quarters
    assert trial_slots({"CPU": 8.0}, cpu=2, gpu=0, max_concurrent=None) == 4
    assert trial_slots({"CPU": 8.0}, cpu=1, gpu=0, max_concurrent=3) == 3
    assert trial_slots({"CPU": 2.0, TRIAL_SLOT: 1.0}, cpu=1, gpu=0, max_concurrent=None) == 1
