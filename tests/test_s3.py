"""Runs stored on S3, against a local S3-compatible server (moto on the loopback address, which checks
credentials as S3 does: ``conftest.local_s3``), through the commands users run: the URI form Arrow and Ray
document for such a store (``s3://bucket/path?endpoint_override=…&scheme=http&region=…``) and the
``AWS_ENDPOINT_URL`` variable. Each run has a local Ray of its own, which inherits the keys.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pbt_lab.names import EXPLOITED, HISTORY, LINEAGE, PBT_STATE_FILE, SUMMARY, TRIALS
from pbt_lab.results import read_tables

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TABLES = {TRIALS, HISTORY, SUMMARY}


def lab(module: str, *argv: str, env: dict, log: Path | None = None, wait: bool = True):
    """``python -m pbt_lab.MODULE ARGV`` with ``env``, its console in ``log`` (or captured)."""
    command = [sys.executable, "-m", f"pbt_lab.{module}", *argv]
    if not wait:
        with open(log, "w") as out:
            return subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def stored_state(local_s3, key: str) -> dict:
    """The ``pbt_state.json`` Ray's last snapshot put in the bucket (none yet: {})."""
    try:
        return json.loads(
            local_s3.client(**local_s3.keys).get_object(Bucket=local_s3.bucket, Key=key)["Body"].read()
        )
    except Exception:  # not uploaded yet
        return {}


@pytest.mark.slow
def test_pbt_on_s3_resumes_after_a_kill_and_its_tables_rebuild_and_its_winner_replays(
    local_s3, tmp_path, monkeypatch
):
    local_s3.use_keys(monkeypatch)  # this process reads the bucket too
    storage, env = local_s3.uri("lab"), local_s3.env()
    run, state_key = local_s3.uri("lab/cut"), f"lab/cut/{PBT_STATE_FILE}"
    argv = ["--config", str(CONFIGS / "pbt-quick.yaml"), "--storage-path", storage, "--name", "cut"]
    argv += ["--set", "resources.gpu=0", "--set", "pbt.perturbation_interval=2"]
    started = time.perf_counter()
    driver = lab("pbt", *argv, env=env, log=tmp_path / "cut.log", wait=False)
    # Killed once the snapshot after the first with an exploit has reached the bucket: Ray uploads one
    # snapshot at a time, file by file, so the exploit's snapshot is then whole there (its trials'
    # checkpoints with it) and the resume restores them; the kill may still cut the next upload.
    deadline, exploit_snapshot = time.time() + 600, None
    while time.time() < deadline and driver.poll() is None:
        state = stored_state(local_s3, state_key)
        if exploit_snapshot is None and any(d["action"] == EXPLOITED for d in state.get("decisions", [])):
            exploit_snapshot = state["snapshot"]
        if exploit_snapshot is not None and state.get("snapshot", -1) > exploit_snapshot:
            break
        time.sleep(0.5)
    else:
        raise AssertionError((tmp_path / "cut.log").read_text()[-3000:])  # no exploit's snapshot whole
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray: no clean-up at all
    driver.wait(timeout=60)
    before = stored_state(local_s3, state_key)["decisions"]
    assert any(d["action"] == EXPLOITED for d in before), (tmp_path / "cut.log").read_text()[-3000:]

    resumed = lab("pbt", *argv, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    wall = time.perf_counter() - started
    stored = local_s3.objects("lab/cut/")
    names = {key.removeprefix("lab/cut/") for key in stored}
    assert TABLES | {LINEAGE, PBT_STATE_FILE} <= names
    assert any(n.startswith("figures/") and n.endswith(".png") for n in names)
    assert any("/checkpoint_" in n for n in names)
    trials, _, summary = read_tables(run)
    assert len(trials) == 5 and set(trials["status"]) <= {"reached", "capped"}
    after = stored_state(local_s3, state_key)["decisions"]
    # PBT's record went on: what it had decided is still decided (its outcome, e.g. carried_out, is added)
    changed = [(b, a) for b, a in zip(before, after) if {k: a.get(k) for k in b} != b]
    assert not changed and len(after) > len(before), changed
    e, restores = summary["exploits"], summary["restores"]
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"] >= 1
    assert restores["count"] == restores["verified"] and "resume" in restores["by_kind"]
    print(
        f"S3 PBT killed and resumed: {wall:.0f} s, {len(stored)} objects, {sum(stored.values()) / 1e6:.1f} MB"
    )

    # The tables rebuilt from what the bucket holds, equal to the run's own.
    local_s3.client(**local_s3.keys).delete_object(Bucket="runs", Key=f"lab/cut/{TRIALS}")
    rebuilt = lab("results", run, env=env)
    assert rebuilt.returncode == 0 and "Traceback" not in rebuilt.stderr, rebuilt.stderr[-2000:]
    pd.testing.assert_frame_equal(read_tables(run)[0], trials)

    # The winner retrained from its checkpoint's ancestry, read from the bucket.
    replay = lab(
        "pbt",
        "--replay",
        run,
        "--storage-path",
        storage,
        "--name",
        "replay",
        "--set",
        "resources.gpu=0",
        env=env,
    )
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
    replayed, _, replay_summary = read_tables(local_s3.uri("lab/replay"))
    assert replay_summary["replay_of"]["trial_id"] == summary["winner"]["trial_id"] and len(replayed) == 1


@pytest.mark.slow
def test_a_grid_on_s3_named_by_the_endpoint_variable(local_s3, tmp_path, monkeypatch):
    local_s3.use_keys(monkeypatch)  # this process reads the bucket too
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{local_s3.host}")  # the plain URI's endpoint
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    started = time.perf_counter()
    grid = lab(
        "grid",
        *(
            "--config",
            str(CONFIGS / "grid-quick.yaml"),
            "--storage-path",
            "s3://runs/plain",
            "--name",
            "grid",
        ),
        *("--set", "grid.optimizers=[adam, momentum]", "--set", "grid.lrs=[1.0e-3, 1.0e-1]"),
        *("--set", "resources.gpu=0"),
        env=dict(os.environ),
    )
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    stored = local_s3.objects("plain/grid/")
    assert {key.removeprefix("plain/grid/") for key in stored} >= TABLES
    trials, _, summary = read_tables("s3://runs/plain/grid")
    assert len(trials) == 4 and summary["run_dir"] == "s3://runs/plain/grid"
    wall, size = time.perf_counter() - started, sum(stored.values()) / 1e6
    print(f"S3 grid: {wall:.0f} s, {len(stored)} objects, {size:.1f} MB")


@pytest.mark.parametrize(
    "where, keys, says",
    [
        ("bucket", None, "NO_SUCH_BUCKET"),  # a bucket that does not exist
        (
            "keys",
            {"AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": "wrong"},
            "ACCESS_DENIED|InvalidAccessKeyId|does not exist in our records",
        ),
        ("port", None, "NETWORK_CONNECTION"),  # an endpoint nothing listens on
    ],
)
def test_bad_s3_storage_is_one_line_exit_2_before_ray_starts(local_s3, tmp_path, where, keys, says):
    import re

    uri = {
        "bucket": local_s3.uri("lab", bucket="no-such-bucket"),
        "keys": local_s3.uri("lab"),
        "port": local_s3.uri("lab").replace(local_s3.host, "127.0.0.1:1"),
    }[where]
    env = {**local_s3.env(), **(keys or {})}
    started = time.perf_counter()
    done = lab(
        "pbt", "--config", str(CONFIGS / "pbt-quick.yaml"), "--storage-path", uri, "--name", "bad", env=env
    )
    seconds = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and not done.stdout, done.stderr[-2000:]
    assert re.search(says, lines[0]) and "cannot write there" in lines[0], lines[0]
    assert seconds < 60 and not local_s3.objects("lab/bad")  # refused before anything ran or was written
