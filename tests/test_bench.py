"""The benchmark's figures, computed from the session's quick runs (no goal is asserted: timings
on a shared machine are noise; `python -m pbt_lab.bench` reports them against their goals)."""

import json
import re
import subprocess
import sys

import pandas as pd

from pbt_lab import bench, results
from pbt_lab.names import (
    ACTOR_START,
    CAPPED,
    DIVERGED,
    LR,
    OPTIMIZER,
    REACHED,
    SEED,
    STATUS,
    STEPS_TO_TARGET,
    TRAIN_PART,
    VALIDATE,
)
from pbt_lab.results import read_tables


def _tables(run_dir) -> dict:
    return dict(zip(("trials", "history", "summary"), read_tables(run_dir)))


def test_tune_figures_from_the_quick_runs(quick_grid, quick_pbt):
    grid, pbt = _tables(quick_grid), _tables(quick_pbt)
    for tables in (grid, pbt):
        assert 0 < bench.tune_efficiency(tables) < bench.tune_efficiency(tables, past_start=True) <= 1
    cost = bench.exploit_cost(pbt["history"], interval=1)
    assert (
        cost["exploits"] >= 1
        and cost["exploit_gap_seconds_median"] >= 0
        and cost["train_seconds_per_interval"] > 0
    )
    assert bench.trial_start(grid["history"]) >= 0
    versus = bench.pbt_vs_grid(grid, pbt)
    assert versus["grid_best_val_acc"] == grid["trials"]["best_val_acc"].max()
    if versus["pbt_vs_grid_compute"] is not None:
        assert (
            0 < versus["pbt_train_seconds_to_grid_best"] <= pbt["summary"]["compute"]["train_seconds"] + 1e-6
        )


def test_tune_efficiency_is_training_over_the_slot_seconds_with_or_without_the_start():
    breakdown = {"slot_seconds": 10.0, "parts": {TRAIN_PART: 6.0, ACTOR_START: 2.0, VALIDATE: 2.0}}
    tables = {"summary": {"time_breakdown": breakdown}}
    assert bench.tune_efficiency(tables) == 0.6 and bench.tune_efficiency(tables, past_start=True) == 0.75


def test_divergence_savings_compares_twin_runs(quick_grid):
    grid = _tables(quick_grid)
    assert bench.divergence_savings(grid, grid) == {
        "divergence_savings": 0.0,
        "reached_identical": True,
        "diverged_trials": grid["summary"]["compute"]["diverged_trials"],
    }


def twin(statuses: list[str], steps: list, seconds: float) -> dict:
    trials = pd.DataFrame(
        {
            OPTIMIZER: ["adam", "gd", "gd"][: len(statuses)],
            LR: [1e-3, 0.1, 100.0][: len(statuses)],
            SEED: 0,
            STATUS: statuses,
            STEPS_TO_TARGET: pd.array(steps, dtype="Int64"),
        }
    )
    return {"trials": trials, "summary": {"compute": {"trial_seconds": seconds, "diverged_trials": 1}}}


def test_reached_identical_fails_when_the_twin_reached_other_trials_or_steps_or_lacks_one():
    stopped = twin([REACHED, CAPPED, DIVERGED], [100, None, None], 6.0)
    same = bench.divergence_savings(stopped, twin([REACHED, CAPPED, CAPPED], [100, None, None], 8.0))
    assert same["reached_identical"] and same["divergence_savings"] == 0.25
    for other in (
        twin([REACHED, REACHED, CAPPED], [100, 300, None], 8.0),  # the stop cut a trial that would reach
        twin([REACHED, CAPPED, CAPPED], [150, None, None], 8.0),  # it reached in other steps
        twin([REACHED, CAPPED], [100, None], 8.0),  # the twin lacks a trial
        twin([CAPPED, CAPPED, CAPPED], [None, None, None], 8.0),  # only the stopped run reached
    ):
        assert not bench.divergence_savings(stopped, other)["reached_identical"]


def test_trainer_half_prints_its_figures_as_json():
    out = subprocess.run(
        [sys.executable, "-m", "pbt_lab.bench", "--quick", "--only", "trainer", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["trainer_vs_fit_small"] > 0 and figures["trainer_vs_fit_full"] > 0
    assert "trainer_vs_fit_small" in out and ("met" in out or "MISSED" in out)


def test_repeats_are_reported_as_median_and_range():
    repeats = [
        {"x": 0.9, "n": 3, "runs": "a"},
        {"x": 0.7, "n": 3, "runs": "a"},
        {"x": 0.8, "n": 5, "runs": "a"},
    ]
    assert bench.medians(repeats) == {
        "x": 0.8,
        "x_range": [0.7, 0.9],
        "n": 3,
        "n_range": [3, 5],
        "runs": "a",
    }
    assert bench.medians([{"y": None}, {"y": 0.5}]) == {"y": [None, 0.5]}  # a figure a repeat lacked
    # A figure only later repeats have (an older bench's files resumed), or only earlier ones: kept, not lost
    assert bench.medians([{"x": 1.0}, {"x": 2.0, "z": 3.0}]) == {
        "x": 1.5,
        "x_range": [1.0, 2.0],
        "z": [None, 3.0],
    }


def test_a_bench_run_again_on_its_storage_reads_the_repeats_it_measured_and_runs_the_rest(
    tmp_path, monkeypatch, capsys
):
    """A 2-hour bench killed (or a session ended) after 2 of 3 repeats: run again on the same storage, it
    reads those two and runs the third, setting aside the killed attempt's runs (never read as its own)."""
    import numpy as np

    ran = []

    def measure(size, storage, cpus, repeat):  # the Ray runs themselves are tested by the quick fixtures
        ran.append(repeat)
        assert not (storage / f"grid-{repeat}").exists()  # the killed attempt's run was set aside
        return {"x": np.float64(0.5 + repeat), "n": np.int64(7), "turn_seconds_median_pbt": 0.09}

    monkeypatch.setattr(bench, "tune_figures", measure)
    for name in ("figures-cpu-0.json", "figures-quick-1.json"):  # a cpu repeat; another size's
        (tmp_path / name).write_text(json.dumps({"x": 0.1, "n": 7, "turn_seconds_median_pbt": 0.07}))
    for run in ("grid-1", "pbt-1", "pbt-11", "grid-0", "notes-1"):
        (tmp_path / run).mkdir()
    figures = [bench.repeat_figures("cpu", tmp_path, i) for i in range(3)]
    assert ran == [1, 2] and "repeat 0: measured before" in capsys.readouterr().out
    assert figures == [
        {"x": 0.1, "n": 7, "turn_seconds_median_pbt": 0.07},
        {"x": 1.5, "n": 7, "turn_seconds_median_pbt": 0.09},
        {"x": 2.5, "n": 7, "turn_seconds_median_pbt": 0.09},
    ]  # the same whether measured now or read back
    assert {type(v) for f in figures for v in f.values()} == {int, float}  # numpy's numbers as Python's
    assert bench.medians(figures)["x_range"] == [0.1, 2.5]
    runs = sorted(re.sub(r"unfinished-\d{8}-\d{6}$", "unfinished-TIME", p.name) for p in tmp_path.iterdir())
    assert runs == [
        "figures-cpu-0.json",
        "figures-cpu-1.json",
        "figures-cpu-2.json",
        "figures-quick-1.json",
        "grid-0",
        "grid-1-unfinished-TIME",
        "notes-1",
        "pbt-1-unfinished-TIME",
        "pbt-11",
    ]  # only the bench's own runs set aside
    assert bench.repeat_figures("cpu", tmp_path, 2) == figures[2] and ran == [1, 2]  # read, not rerun


def test_the_machine_is_named_in_every_summary(quick_grid):
    m = results.machine()
    assert m["cpu"] and m["cores"] >= 1 and read_tables(quick_grid)[2]["machine"] == m
    assert results.versions()["ray"].startswith("2.") and results.versions()["tensorflow"]


def test_a_bench_of_no_repeats_is_one_line_and_exit_2():
    done = subprocess.run(
        [sys.executable, "-m", "pbt_lab.bench", "--quick", "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The last line (TensorFlow's own start-up lines may come before it: the bench imports Keras first).
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("got None and 0")
    assert not done.stdout


def test_exploit_cost_against_an_interval_and_against_an_ordinary_turn():
    import pandas as pd

    # One worker: a trial, a fresh start after it (a 0.5 s gap: no turn), an ordinary turn (0.05 s)
    # and an exploit (0.08 s); checks of 1 s.
    rows = [  # trial, started_at, reported_at, segment_from, segment_step
        ("z", -1.50, -0.50, "z", 0),
        ("a", 0.00, 1.00, "a", 0),
        ("a", 1.05, 2.05, "a", 50),
        ("c", 2.13, 3.13, "a", 100),
    ]
    history = pd.DataFrame(
        [
            {"trial_id": t, "pid": 1, "started_at": s, "reported_at": r, "segment_from": f, "segment_step": k}
            for t, s, r, f, k in rows
        ]
    ).assign(check_seconds=1.0)
    cost = bench.exploit_cost(history, interval=2)
    assert cost["exploits"] == 1 and cost["exploits_on_a_fresh_worker"] == 0
    assert cost["train_seconds_per_interval"] == 2.0
    assert abs(cost["exploit_cost_ratio"] - 0.08 / 2) < 1e-9
    assert abs(cost["turn_gap_seconds_median"] - 0.05) < 1e-9  # the fresh start is no turn
    assert abs(cost["exploit_extra_ratio"] - 0.03 / 2) < 1e-9


def test_a_bench_without_the_full_data_set_is_one_line_and_exit_2(tmp_path):
    import os

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pbt_lab.bench",
            "--size",
            "cpu",
            "--only",
            "tune",
            "--storage-path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PBT_LAB_DATA": str(tmp_path / "missing.npz")},
    )
    assert done.returncode == 2 and "missing.npz" in done.stderr.strip().splitlines()[-1]
    assert not done.stdout and not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_the_goal_table_says_met_or_missed_and_shows_figures_without_goals():
    figures = {
        "overhead_share_grid": 0.012,
        "overhead_share_grid_range": [0.010, 0.014],
        "overhead_share_pbt": 0.05,
        "turn_seconds_median_pbt": None,
        "exploit_extra_ratio": 0.004,
    }
    rows = {line.split()[0]: line for line in bench.goal_table(figures, "cpu")[1:]}
    assert rows["overhead_share_grid"].endswith("met") and "0.010–0.014" in rows["overhead_share_grid"]
    assert rows["overhead_share_pbt"].endswith("MISSED") and rows["turn_seconds_median_pbt"].endswith(
        "MISSED"
    )
    assert rows["exploit_extra_ratio"].endswith("met")
    quick = {line.split()[0]: line for line in bench.goal_table(figures, "quick")[1:]}
    assert quick["overhead_share_pbt"].split()[1:] == ["0.050"]  # at the quick size: shown, no goal
    assert "pbt_vs_grid_compute" not in rows  # not measured: not shown


def test_rays_textbook_pbt_runs_the_same_population_and_reports_its_work(ray_session, bundled, tmp_path):
    """The bench's yardstick (``experiments/textbook.py``): Ray's PBT with a Keras trainable as Ray's
    documentation writes one, on hand-picked members; each interval's fit and evaluate seconds reported."""
    from pbt_lab.experiments.textbook import WORK_SECONDS, run_textbook

    members = [{"optimizer": "adam", "lr": 1e-3}, {"optimizer": "gd", "lr": 1e-4}]
    ran = run_textbook(
        bundled,
        members,
        scale=0.25,
        interval_steps=20,
        budget_steps=80,
        batch_size=100,
        lr_range=(1e-5, 1.0),
        storage=str(tmp_path),
        name="textbook",
    )
    rows = pd.concat(ran["rows"], ignore_index=True)
    assert sorted(rows.groupby("trial_id")["step"].max()) == [80, 80]  # every member ran its budget
    # Its work is timed inside each step: never more than Ray's own timer of the step
    assert (rows[WORK_SECONDS] > 0).all() and (rows[WORK_SECONDS] <= rows["time_this_iter_s"]).all()
    assert rows["val_acc"].max() > 0.5  # it trains: adam at 1e-3 learns within 80 steps
