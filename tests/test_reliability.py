"""Faults survived: a killed worker, a killed driver, a diverging PBT member; nothing lost."""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pbt_lab import grid, pbt
from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.names import LINEAGE
from pbt_lab.results import ray_trial_states, read_tables, write_tables
from pbt_lab.tuning.trial_config import trial_space

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GRID_QUICK, PBT_QUICK = str(CONFIGS / "grid-quick.yaml"), str(CONFIGS / "pbt-quick.yaml")


def _reports(trial_dir: Path) -> list[dict]:
    """A trial's reports so far (a line being written right now is skipped)."""
    reports = []
    for line in (
        (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    ):
        with contextlib.suppress(ValueError):
            reports.append(json.loads(line))
    return reports


def _run_and_kill_its_worker(
    tmp_path: Path, name: str, before_kill=lambda trial_dir: None
) -> tuple[int, dict]:
    """One grid trial (checkpoint every 2 checks, 2 restarts allowed) whose worker is killed with
    SIGKILL after its 5th check; returns the run's exit code and the step and pid it was killed at."""
    killed = {}

    def kill_the_worker_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline:
            for trial_dir in (tmp_path / name).glob("*/"):
                reports = _reports(trial_dir)
                if reports and reports[-1]["training_iteration"] >= 5:
                    before_kill(trial_dir)
                    killed.update(step=reports[-1]["step"], pid=reports[-1]["pid"])
                    os.kill(killed["pid"], signal.SIGKILL)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_worker_mid_run, daemon=True)
    killer.start()
    code = grid.main(
        [
            "--config",
            GRID_QUICK,
            "--storage-path",
            str(tmp_path),
            "--name",
            name,
            "--set",
            "grid.optimizers=[adam]",
            "--set",
            "grid.lrs=[1.0e-3]",
            "--set",
            "train.stop_at_target=false",
            "--set",
            "train.max_steps=600",
            "--set",
            "run.checkpoint_every=2",
            "--set",
            "run.max_failures=2",
            "--set",
            "resources.gpu=0",
        ]
    )
    killer.join()
    assert killed, "the worker was never killed"
    return code, killed


@pytest.mark.slow
def test_killed_worker_restarts_from_its_last_checkpoint(ray_session, tmp_path):
    code, killed = _run_and_kill_its_worker(tmp_path, "kill")
    assert code == 0
    trials, history, summary = read_tables(tmp_path / "kill")
    assert len(trials) == 1 and trials.iloc[0]["steps"] == 600 and trials.iloc[0]["status"] == "reached"
    assert trials.iloc[0]["failures"] == 1  # recorded, though recovered
    restores = summary["restores"]
    assert restores["by_kind"]["restart"] == {"verified": 1, "mismatched": 0, "unverifiable": 0}
    reports = _reports(next((tmp_path / "kill").glob("LabTrainable_*")))
    pids = [r["pid"] for r in reports]
    assert killed["pid"] in pids and pids[-1] != killed["pid"]  # a new worker finished the trial
    restart = next(r for r in reports if r["pid"] != killed["pid"] and r["segment_from"] is not None)
    assert killed["step"] - restart["segment_step"] <= 2 * 50  # at most one checkpoint interval lost
    assert history["step"].is_monotonic_increasing  # the repeated checks replace the lost ones


@pytest.mark.slow
def test_a_corrupt_checkpoint_fails_its_trial_naming_the_file(ray_session, tmp_path, capsys):
    def corrupt_checkpoints(trial_dir):
        for npz in trial_dir.glob("checkpoint_*/trainer.npz"):
            npz.write_bytes(b"not a checkpoint")

    code, _ = _run_and_kill_its_worker(tmp_path, "corrupt", before_kill=corrupt_checkpoints)
    assert code == 1  # the run ends, and says a trial failed
    trials, _, _summary = read_tables(tmp_path / "corrupt")
    assert (
        list(trials["status"]) == ["error"] and trials.iloc[0]["failures"] == 3
    )  # the kill, then 2 restores
    assert re.search(r"checkpoint .*checkpoint_\d+ is missing or corrupt", trials.iloc[0]["error"])
    assert "FAILED" in capsys.readouterr().out


def _finished_in_rays_saved_state(run: Path) -> set[str]:
    """Trials that Ray's experiment state, as last saved to the run directory, records as finished."""
    try:
        return {name for name, state in ray_trial_states(run).items() if state["status"] == "TERMINATED"}
    except ValueError:  # being written right now
        return set()


@pytest.mark.slow
def test_sigkilled_grid_driver_resumes(ray_session, tmp_path):
    run = tmp_path / "cut"
    args = [
        "--config",
        GRID_QUICK,
        "--storage-path",
        str(tmp_path),
        "--name",
        "cut",
        "--set",
        "resources.gpu=0",
        "--set",
        "grid.optimizers=[adam, momentum]",
        "--set",
        "grid.lrs=[1.0e-3, 1.0e-2, 0.1, 1.0]",
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pbt_lab.grid", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not _finished_in_rays_saved_state(run) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: no clean-up at all
    driver.wait(timeout=60)
    finished = _finished_in_rays_saved_state(run)
    assert 1 <= len(finished) < 8, "the kill should land mid-grid, after Ray saved a finished trial"
    saved = {name: (run / name / "result.json").read_text() for name in finished}

    assert grid.main([*args, "--resume"]) == 0
    trials, _, _ = read_tables(run)
    assert len(trials) == 8 and set(trials["status"]) <= {"reached", "capped", "diverged"}
    for name, text in saved.items():
        assert (run / name / "result.json").read_text() == text  # not rerun


def test_files_torn_by_a_killed_driver_fall_back_to_rays_state(quick_grid, tmp_path):
    # A driver killed while Ray copied a finished trial's files leaves them empty; Ray's experiment
    # state still has the trial's config and last report, so its outcome is not lost.
    run = tmp_path / "torn"
    shutil.copytree(quick_grid, run)
    before = read_tables(run)[0].set_index("trial_id")
    trial_dir = sorted(run.glob("LabTrainable_*"))[0]
    (trial_dir / "params.json").write_text("")
    (trial_dir / "result.json").write_text("")
    with open(sorted(run.glob("LabTrainable_*"))[1] / "result.json", "a") as f:
        f.write('{"trial_id": "cut sh')  # a last line cut short
    after = write_tables(run, kind="grid", figures=False)["trials"].set_index("trial_id")
    columns = ["optimizer", "lr", "status", "steps", "steps_to_target", "final_val_acc"]
    pd.testing.assert_frame_equal(after[columns].sort_index(), before[columns].sort_index())


@pytest.mark.slow
def test_diverging_members_are_recipients_never_donors(ray_session, tmp_path):
    # GD above 10 diverges within a check (loss past train.divergence_loss): those members must be
    # rescued by copying a healthy member, and the run must finish like any other.
    assert (
        pbt.main(
            [
                "--config",
                PBT_QUICK,
                "--storage-path",
                str(tmp_path),
                "--name",
                "nan",
                "--set",
                "resources.gpu=0",
                "--set",
                "train.max_steps=400",
                "--set",
                "pbt.optimizers=[adam, gd]",
                "--set",
                "pbt.lr_ranges.gd=[30, 100]",
                "--set",
                "pbt.optimizer_switch_probability=0",
            ]
        )
        == 0
    )
    trials, history, summary = read_tables(tmp_path / "nan")
    lineage = pd.read_parquet(tmp_path / "nan" / LINEAGE)
    diverged = set(history.loc[history["status"] == "diverged", "trial_id"])
    assert diverged, "no member diverged: the test proves nothing"
    assert diverged & set(lineage["recipient"]), "no diverged member was rescued by an exploit"
    # Every donor was healthy: the first check after each exploit trained from a checkpoint that was
    # not diverged (a diverged one would have restored the diverged status), and no decision named
    # a member that had reported itself diverged as a donor.
    exploits = history[history["segment_from"].notna() & (history["segment_from"] != history["trial_id"])]
    assert len(exploits) == len(lineage) and (exploits["status"] != "diverged").all()
    decisions = json.loads((tmp_path / "nan" / "pbt_state.json").read_text())["decisions"]
    flagged = [d for d in decisions if d["diverged"]]
    assert flagged, "the scheduler saw no diverged member"
    # a diverged member is always replaced when a healthy member is left to copy, and never copied
    assert all(d["action"] in ("exploit", "no checkpoint") for d in flagged if d["upper"])
    e = summary["exploits"]
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"]
    assert trials["final_val_acc"].max() > 0.8
    # Disk stays bounded (what exploits and a resume can still need), and the summary says how much
    # the finished run takes.
    assert max(len(list(d.glob("checkpoint_*"))) for d in (tmp_path / "nan").glob("LabTrainable_*")) <= 4
    on_disk = sum(f.stat().st_size for f in (tmp_path / "nan").rglob("*") if f.is_file())
    assert summary["disk_bytes"] == pytest.approx(on_disk, rel=0.05)


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (the suite runs as root), unmounted after."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=False)
    if mounted.returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def pbt_command(storage: Path, name: str, *argv: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pbt_lab.pbt",
        "--config",
        PBT_QUICK,
        "--storage-path",
        str(storage),
        "--name",
        name,
        "--set",
        "resources.gpu=0",
        *argv,
    ]


def test_a_storage_too_small_for_the_run_is_refused_before_it_starts(tmp_path):
    with small_disk(tmp_path / "tiny", "512k") as disk:
        done = subprocess.run(pbt_command(disk, "tiny"), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert re.search(
            r"this run \(5 trials, 15 checkpoints at most\) needs about .* MB and .* free", done.stderr
        )
        assert not list(disk.iterdir())


@pytest.mark.slow
def test_a_storage_that_fills_mid_run_stops_it_cleanly_and_a_resume_finishes_it(tmp_path):
    with small_disk(tmp_path / "disk", "200m") as disk:
        run, filler = disk / "full", disk / "filler"

        def fill_once_a_checkpoint_is_written():
            deadline = time.time() + 300
            while time.time() < deadline and not list(run.glob("*/checkpoint_*/trainer.json")):
                time.sleep(0.05)
            # Someone else's file takes all but 30 MB: under the 42 MB the run keeps in reserve (two
            # slots' checkpoints in flight, 9.9 MB each, Ray's last snapshot and the tables).
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 30_000_000)

        threading.Thread(target=fill_once_a_checkpoint_is_written, daemon=True).start()
        with open(tmp_path / "full.log", "w") as log:  # the console, on another disk
            code = subprocess.run(
                pbt_command(disk, "full"), stdout=log, stderr=subprocess.STDOUT, timeout=900
            )
        console = (tmp_path / "full.log").read_text()
        assert code.returncode == 1, console[-3000:]
        assert "Traceback" not in console
        # (Ray's workers may still print after it: the console's order is issue 27's.)
        assert re.search(r"^STOPPED: storage .*full.*; free space, then --resume --name full$", console, re.M)
        # What was written is whole: the tables read it, and say what the run lacks.
        rebuilt = subprocess.run(
            [sys.executable, "-m", "pbt_lab.results", str(run)], capture_output=True, text=True, timeout=300
        )
        assert "INCOMPLETE: " in rebuilt.stdout and "Traceback" not in rebuilt.stderr, rebuilt.stderr
        assert rebuilt.returncode == code.returncode == 1  # as the run's own command: cut short
        trials, _, _ = read_tables(run)
        assert (trials["status"] == "running").any()

        filler.unlink()
        with open(tmp_path / "resumed.log", "w") as log:
            code = subprocess.run(
                pbt_command(disk, "full", "--resume"), stdout=log, stderr=subprocess.STDOUT, timeout=900
            )
        console = (tmp_path / "resumed.log").read_text()
        assert code.returncode == 0, console[-3000:]
        trials, _, summary = read_tables(run)
        assert (trials["steps"] == 600).all() and set(trials["status"]) <= {"reached", "capped"}
        restores = summary["restores"]
        assert restores["count"] == restores["verified"] and "resume" in restores["by_kind"]
        assert summary["incomplete"] is None  # every trial ended, and no copy cut short was left


BAD_INPUTS = [
    # (arguments, what the one line must say)
    (["--set", "train.optimizer=adamw"], "unknown optimizer 'adamw'"),
    (["--set", "pbt.optimizers=[adam, sgd]"], "unknown optimizer 'sgd'"),
    (["--set", "train.lr=0"], "train.lr must be a positive number"),
    (["--set", "train.lr=-1e-3"], "train.lr must be a positive number"),
    (["--set", "train.lr=.nan"], "train.lr must be a positive number"),
    (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
    (["--set", "train.target=0"], r"train.target must be in \(0, 1\]"),
    (["--set", "train.target=1.5"], r"train.target must be in \(0, 1\]"),
    (["--set", "model.scale=0"], "model.scale must be a positive number"),
    (["--set", "pbt.population=1"], "pbt.population must be an integer ≥ 2"),
    (["--set", "pbt.quantile_fraction=0.7"], r"pbt.quantile_fraction must be in \(0, 0.5\]"),
    (["--set", "pbt.quantile_fraction=0"], r"pbt.quantile_fraction must be in \(0, 0.5\]"),
    (["--set", "pbt.perturbation_interval=0"], "pbt.perturbation_interval must be a positive integer"),
    (["--set", "pbt.populaton=8"], r"unknown config key 'pbt.populaton' \(did you mean 'pbt.population'\?\)"),
    (["--set", "pbt.population=many"], "pbt.population must be an integer"),
    (["--set", "train.stall_checks=5"], "train.stall_checks=5: PBT replaces a member that cannot learn"),
    (["--set", "train.stall_checks=0"], "train.stall_checks must be a positive integer"),
    (["--set", "train.stall_tolerance=-0.1"], "train.stall_tolerance must be a positive number"),
    (["--set", "nokey"], "--set expects key=value"),
    (["--config", "{missing}"], "config file .*missing.yaml does not exist"),
    (["--config", "{malformed}"], r"not valid YAML \(line"),
    (["--config", "{typo}"], r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    (["--set", "data.source={nodata}"], "data file .*nodata.npz does not exist"),
    (["--set", "data.source={corrupt}"], "corrupt.npz.*not a readable .npz"),
    (["--set", "data.source={wrong_shape}"], r"wrong_shape.npz.*x_train is uint8\[10, 27, 28\]"),
    (["--resume", "--name", "never-ran"], "--resume: there is no run"),
    (["--config", "{duplicate}"], r"not valid YAML \(line 3\): key 'lr' is written twice"),
    (["--storage-path", "/proc/nope"], "--storage-path /proc/nope: cannot write in /proc"),
    (["--storage-path", "file:///proc/nope"], "--storage-path file:///proc/nope: cannot write in /proc"),
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray head answers there"),
    (["--address", "256.1.1.1:99999"], "port 99999 is not a TCP port"),
    (["--address", "256.1.1.1:6379"], "256.1.1.1 is not an IPv4 address"),
    (
        ["--set", "pbt.population=100000"],
        r"this run \(100000 trials, 300000 checkpoints at most\) needs about .* GB and .* free",
    ),
    (
        ["--set", "resources.cpu=64"],
        r"resources.cpu=64 but this machine has \d+ CPUs: one trial would never start",
    ),
    (["--member", "abc_00001"], "--member names a member to replay: use it with --replay"),
    (["--set", "pbt.seed=-1"], "pbt.seed must be a non-negative integer"),
    # Keras arguments are tried on each of the population's optimizers before any trial starts.
    (
        ["--set", "train.optimizer_args={{bogus: 1}}"],
        r"adadelta cannot use them \(Argument\(s\) not recognized",
    ),
    (["--set", "train.optimizer_args={{epsilon: abc}}"], "train.optimizer_args=.*adadelta cannot use them"),
    (
        ["--set", "pbt.optimizers=[adam, momentum]", "--set", "train.optimizer_args={{epsilon: 1.0e-7}}"],
        "momentum cannot use them",
    ),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, argv, message):
    files = tmp_path / "inputs"
    files.mkdir()
    (files / "malformed.yaml").write_text("train: [1, 2\n")
    (files / "typo.yaml").write_text("trian:\n  lr: 0.1\n")
    (files / "duplicate.yaml").write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    (files / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(
        files / "wrong_shape.npz",
        x_train=np.zeros((10, 27, 28), np.uint8),
        y_train=np.zeros(10, np.uint8),
        x_test=np.zeros((10, 28, 28), np.uint8),
        y_test=np.zeros(10, np.uint8),
    )
    paths = {
        name: files / f"{name}{ext}"
        for name, ext in (
            ("missing", ".yaml"),
            ("malformed", ".yaml"),
            ("typo", ".yaml"),
            ("duplicate", ".yaml"),
            ("nodata", ".npz"),
            ("corrupt", ".npz"),
            ("wrong_shape", ".npz"),
        )
    }
    argv = [a.format(**paths) for a in argv]
    storage = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        pbt.main(["--config", PBT_QUICK, "--storage-path", str(storage), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert "Traceback" not in err and not storage.exists()  # nothing written


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_resuming_a_directory_that_holds_no_tune_run_is_one_line_and_leaves_it(tmp_path, capsys, uri):
    kept = tmp_path / "runs" / "notes"
    kept.mkdir(parents=True)
    (kept / "mine.txt").write_text("not a run")
    storage = f"file://{tmp_path / 'runs'}" if uri else str(tmp_path / "runs")
    with pytest.raises(SystemExit) as exit_:
        pbt.main(["--config", PBT_QUICK, "--storage-path", storage, "--name", "notes", "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "tuner.pkl is missing" in err, err
    assert [p.name for p in kept.iterdir()] == ["mine.txt"] and (kept / "mine.txt").read_text() == "not a run"


# --- a full disk, on hand-made inputs (no tmpfs needed) ---------------------------------------


def failed_trial(tmp_path: Path, error: str):
    """A trial as the callback sees it: Ray wrote its error to ``error.txt`` in the driver's copy."""
    (tmp_path / "error.txt").write_text(error)
    return types.SimpleNamespace(error_file=str(tmp_path / "error.txt"), local_experiment_path=str(tmp_path))


def test_a_trial_that_failed_on_a_full_disk_stops_the_run_and_says_why(tmp_path, monkeypatch):
    from pbt_lab import StorageFull
    from pbt_lab.tuning import callbacks

    full = callbacks.StopWhenStorageFull(str(tmp_path), reserve=10)
    other = failed_trial(tmp_path, "Failure # 1\nray::save() ...\nValueError: something else\n")
    full.on_trial_error(0, [], other)
    assert callbacks.StopWhenStorageFull.stopped() is None  # not a full disk: Ray's to handle
    trial = failed_trial(
        tmp_path,
        "Failure # 1\n...\npbt_lab.StorageFull: storage /x is full: a checkpoint of 9.8 MB did not fit\n",
    )
    signals = []
    monkeypatch.setattr(callbacks.os, "kill", lambda pid, sig: signals.append(sig))
    full.on_trial_recover(0, [], trial)  # room for Ray's last snapshot: Ray's own interrupt
    assert signals == [callbacks.signal.SIGUSR1]
    assert callbacks.StopWhenStorageFull.stopped() == "storage /x is full: a checkpoint of 9.8 MB did not fit"
    monkeypatch.setattr(callbacks, "free_bytes", lambda path: 0)  # none: stop at once, write nothing
    with pytest.raises(StorageFull, match=r"a checkpoint of 9\.8 MB did not fit"):
        full.on_trial_error(0, [], trial)
    assert (
        callbacks.StopWhenStorageFull.stopped() is not None
        and callbacks.StopWhenStorageFull.stopped() is None
    )


def test_a_result_with_too_little_room_left_stops_the_run(tmp_path, monkeypatch):
    from pbt_lab.tuning import callbacks

    full = callbacks.StopWhenStorageFull(str(tmp_path), reserve=50_000_000)
    trial = failed_trial(tmp_path, "")
    signals = []
    monkeypatch.setattr(callbacks.os, "kill", lambda pid, sig: signals.append(sig))
    monkeypatch.setattr(callbacks, "free_bytes", lambda path: 60_000_000)
    full.on_trial_result(0, [], trial, {})
    assert not signals and callbacks.StopWhenStorageFull.stopped() is None
    monkeypatch.setattr(callbacks, "free_bytes", lambda path: 40_000_000)
    full.on_trial_result(0, [], trial, {})
    assert signals and "40.0 MB free, under the 50.0 MB" in callbacks.StopWhenStorageFull.stopped()


def test_a_save_that_does_not_fit_says_so_for_the_driver(ray_session, bundled, monkeypatch):
    from ray import tune

    from pbt_lab import StorageFull
    from pbt_lab.tuning.trainable import LabTrainable

    space = trial_space(
        TrainConfig(steps_per_check=5), ModelConfig(scale=0.25), 1, optimizer="adam", lr=1e-3, seed=0
    )
    member = tune.with_parameters(LabTrainable, data=bundled)(config={**space, "checkpoint_every": 1})
    member.train()

    def fails(error: OSError):
        def save(self, checkpoint_dir=None):
            self.save_checkpoint(
                tempfile.mkdtemp()
            )  # written on the worker's disk; the copy to storage fails
            raise error

        return save

    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    monkeypatch.setattr(tune.Trainable, "save", fails(full))
    with pytest.raises(StorageFull, match=r"is full: a checkpoint of \d+\.\d MB did not fit \(\[Errno 28\]"):
        member.save()
    monkeypatch.setattr(tune.Trainable, "save", fails(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # any other failure stays what it is
        member.save()
    member.stop()
