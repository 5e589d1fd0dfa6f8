"""The grid end to end on Ray Tune (shared local Ray, one fake GPU): contract, valley, reuse,
TensorBoard, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pbt_lab import grid
from pbt_lab.names import HISTORY, SUMMARY, TRIALS
from pbt_lab.results import read_tables, write_tables

QUICK = str(Path(__file__).resolve().parents[1] / "configs" / "grid-quick.yaml")
TRIAL_COLUMNS = [
    "trial_id",
    "optimizer",
    "lr",
    "scale",
    "seed",
    "status",
    "steps_to_target",
    "seconds_to_target",
    "steps",
    "train_seconds",
    "final_train_acc",
    "final_val_acc",
    "best_val_acc",
]
HISTORY_COLUMNS = [
    "trial_id",
    "iteration",
    "step",
    "train_seconds",
    "train_acc",
    "train_loss",
    "val_acc",
    "optimizer",
    "lr",
]


@pytest.mark.slow
def test_quick_grid_writes_the_contract(quick_grid):
    trials, history, summary = read_tables(quick_grid)
    assert len(trials) == 6 * 6 and set(TRIAL_COLUMNS) <= set(trials.columns)
    assert set(HISTORY_COLUMNS) <= set(history.columns)
    assert set(trials["status"]) <= {"reached", "capped", "diverged"}
    assert summary["kind"] == "grid" and summary["data"]["source"] == "bundled"
    assert summary["config"]["grid"]["lrs"] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 100.0]
    assert summary["compute"]["trials"] == 36 and summary["compute"]["train_seconds"] > 0
    assert {p.name for p in (quick_grid / "figures").iterdir()} >= {
        "valley_seconds.png",
        "valley_steps.png",
        "fastest_slowest.png",
    }
    # every reported iteration of every trial is a history row
    assert len(history) == trials["iterations"].sum()
    assert (
        history.groupby("trial_id")["step"].max().sort_index()
        == trials.set_index("trial_id")["steps"].sort_index()
    ).all()


@pytest.mark.slow
def test_statuses_agree_with_steps(quick_grid):
    trials, _, _summary = read_tables(quick_grid)
    reached = trials[trials["status"] == "reached"]
    assert len(reached) and (reached["steps_to_target"] == reached["steps"]).all()
    assert (reached["final_train_acc"] >= 0.95).all()
    capped = trials[trials["status"] == "capped"]
    assert (capped["steps"] == 300).all() and capped["steps_to_target"].isna().all()
    diverged = trials[trials["status"] == "diverged"]
    assert diverged["steps_to_target"].isna().all() and (diverged["steps"] < 300).all()


@pytest.mark.slow
def test_adam_band_includes_1e3_and_high_rates_diverge_early(quick_grid):
    _, _, summary = read_tables(quick_grid)
    adam = summary["optimizers"]["adam"]
    assert adam["band"][0] <= 1e-3 <= adam["band"][1] and 1e-3 in adam["reached_lrs"]
    assert summary["best"]["status"] == "reached"
    # chosen on time to the target, reported also on the held-out test split (evaluated at its end)
    assert 0.9 < summary["best"]["test_acc"] <= 1 and summary["best"]["final_val_acc"] > 0.9
    trials = pd.read_parquet(quick_grid / TRIALS)
    at_100 = trials[trials["lr"] == 100.0]
    assert (at_100["status"] == "diverged").sum() >= 5
    assert (at_100.loc[at_100["status"] == "diverged", "steps"] < 50).all()  # within the first check


@pytest.mark.slow
def test_actors_are_reused(quick_grid):
    history = pd.read_parquet(quick_grid / HISTORY)
    workers = history["pid"].nunique()
    assert workers <= 4 < history["trial_id"].nunique()


@pytest.mark.slow
def test_tensorboard_events_have_the_metrics(quick_grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_dir = next(quick_grid.glob("*lr=0.0010,optimizer=adam*"))
    events = EventAccumulator(str(next(trial_dir.glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ray/tune/train_acc", "ray/tune/train_loss", "ray/tune/val_acc", "ray/tune/lr"} <= tags
    assert events.Scalars("ray/tune/lr")[0].value == pytest.approx(1e-3)


@pytest.mark.slow
def test_tables_rebuild_from_the_run_dir(quick_grid):
    before = pd.read_parquet(quick_grid / TRIALS)
    (quick_grid / TRIALS).unlink()
    tables = write_tables(quick_grid, figures=False)
    pd.testing.assert_frame_equal(tables["trials"].reset_index(drop=True), before.reset_index(drop=True))
    assert json.loads((quick_grid / SUMMARY).read_text())["config"]["model"]["scale"] == 0.25


def test_set_overrides_reach_the_run_and_bad_ones_stop_before_ray(tmp_path, capsys):
    for bad, message in (
        (["--set", "train.targt=0.9"], "did you mean 'train.target'"),
        (["--set", "grid.lrs=[0.1, -1]"], "grid.lrs must be a positive number"),
        (["--set", "train.target=high"], "train.target must be a number"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--name", "nothing-here", "--resume"], "--resume: there is no run"),
    ):
        with pytest.raises(SystemExit) as exit_:
            grid.main(["--config", QUICK, "--storage-path", str(tmp_path), *bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def _finished(run_dir: Path) -> dict[str, str]:
    """Trial dir → result.json text, for trials whose last report says they are done."""
    done = {}
    for result in run_dir.glob("*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("done"):
            done[result.parent.name] = result.read_text()
    return done


@pytest.mark.slow
def test_interrupted_grid_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    args = [
        "--config",
        QUICK,
        "--storage-path",
        str(tmp_path),
        "--name",
        "cut",
        # 9 trials: storage shows a finished trial only after Ray's next sync (about every 10 s)
        "--set",
        "grid.optimizers=[adam, gd, momentum]",
        "--set",
        "grid.lrs=[1.0e-3, 1.0e-2, 0.1]",
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pbt_lab.grid", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while len(_finished(tmp_path / "cut")) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl+C sends to the whole process group
    driver.wait(timeout=120)
    before = _finished(tmp_path / "cut")
    assert 2 <= len(before) < 9, "the interrupt should land mid-grid"

    with pytest.raises(SystemExit) as exit_:  # a second plain start would clobber it
        grid.main(args)
    assert exit_.value.code == 2
    assert grid.main([*args, "--resume"]) == 0

    after = _finished(tmp_path / "cut")
    assert len(after) == 9
    for name, text in before.items():
        assert after[name] == text  # finished trials were not rerun
    trials, _, _ = read_tables(tmp_path / "cut")
    assert len(trials) == 9 and set(trials["status"]) <= {"reached", "capped", "diverged"}
