"""What a run prints and what it writes for TensorBoard: the quick PBT and grid as users run them
(through a pipe: the session's runs' logs), a quiet run, and the console's parts on hand-made input."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import CONFIGS
from ray.tune.experiment import Trial

from pbt_lab import cli
from pbt_lab.config import PBTConfig, PBTExperiment
from pbt_lab.names import (
    EXPLOIT,
    EXPLOIT_RESTORE,
    LINEAGE,
    LR,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESTORED_ID,
    STATE_DIGEST,
    STATE_ID,
    STEP,
    VAL_ACC,
    WINNER_BOARD,
)
from pbt_lab.tuning.console import NORMAL, QUIET, Console, changes, count_trials

SUMMARY_LAST = re.compile(r"^tensorboard --logdir \S+$")  # the lab's summary ends so
RAY_NOISE = ("Trial status", "(LabTrainable pid=", "cuInit", "Configuration for experiment", "repeated")


def printed(log: Path) -> list[str]:
    return log.read_text().splitlines()


def assert_readable(lines: list[str], most: int) -> None:
    assert len(lines) <= most, "\n".join(lines)
    assert SUMMARY_LAST.match(lines[-1]), lines[-5:]  # the summary is the last thing printed
    assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)]


def test_a_quick_pbt_prints_at_most_40_lines_its_exploits_and_the_summary_last(quick_pbt):
    lines = printed(quick_pbt.parent / "quick.log")
    assert_readable(lines, 40)
    assert re.match(r"^pbt quick: 5 trials × 600 steps, 1 at a time on a local Ray", lines[0])
    lineage = pd.read_parquet(quick_pbt / LINEAGE)
    exploits = [line for line in lines if line.startswith("EXPLOIT at step ")]
    assert len(exploits) == len(lineage) >= 1  # one line per exploit, as the run's own record has them
    assert all(line.endswith("loaded state verified") for line in exploits), exploits
    assert {re.search(r": (\S+) ← (\S+)", line).groups() for line in exploits} == set(
        zip(lineage["recipient"], lineage["donor"], strict=True)
    )


def test_a_quick_grid_prints_at_most_30_lines_and_the_summary_last(quick_grid):
    lines = printed(quick_grid.parent / "quick.log")
    assert_readable(lines, 30)
    assert re.match(r"^grid quick: 36 trials × 300 steps, 2 at a time on a local Ray", lines[0])


def test_quiet_prints_the_summary_only(tmp_path):
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pbt_lab.grid", "--config", str(CONFIGS / "grid-quick.yaml"), "--quiet"),
            *("--storage-path", str(tmp_path), "--name", "quiet", "--set", "grid.optimizers=[adam]"),
            *("--set", "grid.lrs=[0.001]", "--set", "train.max_steps=100"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line]
    assert lines[0].startswith("optimizer  best rates") and SUMMARY_LAST.match(lines[-1]), lines
    assert len(lines) <= 12


def test_verbose_and_quiet_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse("pbt", PBTExperiment, "pbt", ["--verbose", "--quiet"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- TensorBoard, read with TensorBoard's own reader -------------------------------------------


def board(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return reader


def test_tensorboard_holds_each_members_schedule_its_exploits_and_the_winners_lineage(quick_pbt):
    summary = json.loads((quick_pbt / "summary.json").read_text())
    lineage = pd.read_parquet(quick_pbt / LINEAGE)
    texts = 0
    for trial_dir in sorted(quick_pbt.glob("LabTrainable_*")):
        reader = board(trial_dir)
        assert {"schedule/optimizer", "schedule/lr", "ray/tune/val_acc"} <= set(reader.Tags()["scalars"])
        steps = [e.step for e in reader.Scalars("ray/tune/val_acc")]
        assert min(steps) == 50 and max(steps) == 600, "Ray's scalars stepped by training step"
        ray_files = [f for f in trial_dir.glob("events.out.tfevents.*") if not f.name.endswith(".schedule")]
        assert len(ray_files) == 1, "one file for all of a member's turns"
        if "exploit/text_summary" in reader.Tags()["tensors"]:
            texts += len(reader.Tensors("exploit/text_summary"))
    assert texts == len(lineage)  # one text entry per exploit
    # The winner's run: its lineage's rates, as the schedule its checkpoint carries (an independent record)
    winner = board(quick_pbt / WINNER_BOARD)
    charted = {e.step: e.value for e in winner.Scalars("schedule/lr")}
    schedule, compared = summary["best"]["schedule"], 0
    for segment, following in zip(schedule, [*schedule[1:], None], strict=True):
        end = following[STEP] if following else max(charted)
        for step in (s for s in charted if segment[STEP] < s <= end):
            assert charted[step] == pytest.approx(segment[LR], rel=1e-6), (step, segment)
            compared += 1
    assert compared == len(charted) == 12  # every check of the winner's lineage (600 steps, 50 a check)


def test_the_tensorboard_logger_keeps_one_file_per_trial_across_its_turns_and_writes_it_all(tmp_path):
    from pbt_lab.tuning.callbacks import SteadyBoard

    class Member(SimpleNamespace):
        __hash__ = object.__hash__

        def init_local_path(self):
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    trial = Member(local_path=str(tmp_path / "m"), evaluated_params={"lr": 0.1}, trial_id="m")
    logger = SteadyBoard()
    for turn in range(3):  # a PBT member's three turns on a worker: each one a start to Ray's loggers
        logger.log_trial_start(trial)
        for check in (1, 2):
            step = 100 * turn + 50 * check
            logger.log_trial_result(
                0, trial, {"training_iteration": 1, "timesteps_total": step, "val_acc": step}
            )
    logger.log_trial_end(trial)
    assert len(list(Path(trial.local_path).glob("events.out.tfevents.*"))) == 1
    written = {e.step: e.value for e in board(Path(trial.local_path)).Scalars("ray/tune/val_acc")}
    assert written == {s: float(s) for s in (50, 100, 150, 200, 250, 300)}
    # A member still live when the experiment ends (an interrupt): its scalars are written then.
    live = Member(local_path=str(tmp_path / "live"), evaluated_params={}, trial_id="live")
    logger.log_trial_start(live)
    logger.log_trial_result(0, live, {"training_iteration": 1, "timesteps_total": 50, "val_acc": 0.5})
    logger.on_experiment_end([live])
    assert [e.step for e in board(Path(live.local_path)).Scalars("ray/tune/val_acc")] == [50]


# --- the console's parts, on hand-made input (no Ray) -------------------------------------------


def test_count_trials_crosses_every_grid_search():
    space = {
        "optimizer": {"grid_search": ["adam", "sgd"]},
        "nested": {"lr": {"grid_search": [1, 2, 3]}},
        "x": 1,
    }
    assert count_trials(space) == 6 and count_trials(space, num_samples=2) == 12 and count_trials({}, 5) == 5


def test_changes_names_what_explore_changed():
    old, new = (
        {"optimizer": "adam", "lr": 0.01, "batch_size": 64},
        {"optimizer": "adam", "lr": 0.012, "batch_size": 32},
    )
    assert changes(old, new) == "lr 0.01 → 0.012, batch_size 64 → 32"
    assert changes(old, old) == "no change"


def scheduler(donor_state="s-donor") -> SimpleNamespace:
    decision = {"donor": "b", "score": 0.5, "donor_score": 0.9, "old": {"lr": 0.1}, "new": {"lr": 0.2}}
    return SimpleNamespace(decisions=[{**decision, "donor_state_id": donor_state}])


@pytest.mark.parametrize(
    "loaded, digest, verdict",
    [
        ("s-donor", "d1", "verified"),
        ("s-donor", "d2", "MISMATCHED (digest)"),  # the donor saved other weights than were loaded
        ("s-other", "d1", "MISMATCHED (state s-other, decided s-donor)"),  # another state than decided
    ],
)
def test_an_exploit_line_says_whether_the_recipient_loaded_what_its_donor_saved(
    capsys, loaded, digest, verdict
):
    console = Console(trials=2, budget=100, scheduler=scheduler())
    donor = SimpleNamespace(trial_id="b", status=Trial.RUNNING)
    console.on_trial_result(0, [donor], donor, {STEP: 50, STATE_ID: "s-donor", STATE_DIGEST: "d1"})
    recipient = SimpleNamespace(trial_id="a", status=Trial.RUNNING)
    report = {
        STEP: 100,
        RESTORE_KIND: EXPLOIT_RESTORE,
        EXPLOIT: 0,
        RESTORED_ID: loaded,
        RESTORED_DIGEST: digest,
    }
    console.on_trial_result(0, [donor, recipient], recipient, report)
    assert capsys.readouterr().out.splitlines() == [
        f"EXPLOIT at step 100: a ← b (0.9 vs 0.5): lr 0.1 → 0.2; loaded state {verdict}"
    ]


def test_an_exploit_whose_donor_report_was_not_seen_is_unverifiable_here():
    console = Console(trials=2, budget=100, scheduler=scheduler())
    assert (
        console.loaded_verdict({RESTORED_ID: "s-donor", RESTORED_DIGEST: "d1"}, "s-donor") == "unverifiable"
    )


def test_progress_on_a_pipe_and_quiet_prints_nothing(capsys):
    console = Console(trials=2, budget=100, every=0.0)
    running = SimpleNamespace(trial_id="a", status=Trial.RUNNING)
    console.on_trial_result(0, [running], running, {STEP: 50, VAL_ACC: 0.9})
    assert re.match(
        r"^progress: 50/200 steps \(25%\), 1 running, 1 waiting, best val_acc 0.9000, \d+ s",
        capsys.readouterr().out,
    )
    with Console.speaking(QUIET):
        console.on_trial_result(0, [running], running, {STEP: 100})
        console.say("EXPLOIT …")
        assert capsys.readouterr().out == ""


@pytest.fixture(autouse=True)
def console_speaks():
    """Every test here starts with the default console (a fit elsewhere in the session sets it back too)."""
    with Console.speaking(NORMAL):
        yield


def test_an_exploit_the_console_cannot_name_still_gets_its_line(capsys):
    console = Console(trials=2, budget=100, scheduler=scheduler())
    recipient = SimpleNamespace(trial_id="a", status=Trial.RUNNING)
    console.on_trial_result(0, [recipient], recipient, {STEP: 100, RESTORE_KIND: EXPLOIT_RESTORE, EXPLOIT: 7})
    assert capsys.readouterr().out.startswith("EXPLOIT at step 100: a ← ?: no change; loaded state")


def test_a_trial_that_fails_for_good_prints_one_line_with_its_log(tmp_path, capsys):
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nValueError: checkpoint is corrupt\n")
    console = Console(trials=1, budget=100)
    for retries in (True, False):  # one that restarts says so when it reports again (NameRestores)
        trial = SimpleNamespace(trial_id="a", error_file=str(error), should_recover=lambda r=retries: r)
        console.on_trial_error(0, [trial], trial)
    error.write_text("")  # an error file Ray left empty
    console.on_trial_error(0, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        f"ERROR: a failed: ValueError: checkpoint is corrupt ({error})",
        f"ERROR: a failed: see Ray's log ({error})",
    ]


def test_space_scalars_chart_a_choice_by_its_place():
    space = PBTConfig().search_space
    scalars = space.scalars({"optimizer": space["optimizer"].values[1], "lr": 0.01, "other": 3})
    assert scalars == {"schedule/optimizer": 1.0, "schedule/lr": 0.01}
    assert space.scalars({"optimizer": "not-in-the-space", "lr": float("nan")}) == {}  # skipped, not raised
    assert space.legend().startswith("optimizer: 0 ")
