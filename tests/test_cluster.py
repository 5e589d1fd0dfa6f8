"""Cluster and distribution: the autoscaler configs pass Ray's own validator and open only SSH; a
PBT population spreads over two Ray nodes and exploits across them through a shared storage URI;
an entry point joins a running Ray head with --address.

The multi-node runs live in subprocesses with their own RAY_TMPDIR, so they neither touch the test
session's Ray instance nor advertise themselves (ray_current_cluster) to other Ray users of this
machine. They use token authentication, as the cluster configs do.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import two_nodes

from pbt_lab import cli
from pbt_lab.config import PBTExperiment
from pbt_lab.names import HISTORY, LINEAGE, SUMMARY, TRIALS
from pbt_lab.results import read_tables

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
PBT_QUICK = str(ROOT / "configs" / "pbt-quick.yaml")
GRID_QUICK = str(ROOT / "configs" / "grid-quick.yaml")


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load(path.read_text()))


# --- the autoscaler configs ------------------------------------------------------------------


def test_there_is_a_k80_and_a_current_gpu_config():
    assert [p.name for p in CLUSTER_CONFIGS] == ["gpu.yaml", "k80.yaml"]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validator(path):
    from ray.autoscaler._private.util import validate_config

    config = prepared(path)
    validate_config(config)
    with pytest.raises(Exception):  # noqa: B017 (the validator does reject a broken config, with its own errors)
        validate_config({**config, "idle_timeout_minutes": "soon"})
    raw = yaml.safe_load(path.read_text())
    assert raw["provider"]["type"] == "aws" and raw["idle_timeout_minutes"] > 0
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials run on the workers, not beside the head's services"
    assert not head["node_config"]["InstanceType"].startswith(("p", "g")), "a CPU head"
    family = "p2." if path.name == "k80.yaml" else ("g4dn.", "g5.")
    assert [w["node_config"]["InstanceType"].startswith(family) for w in workers] == [True]
    assert workers[0]["min_workers"] == 0 < workers[0]["max_workers"] <= config["max_workers"]
    # The project is copied to every node and installed from there; the token goes along.
    assert config["file_mounts"] == {"~/pbt_lab": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*-e \S*(~|\$HOME)/pbt_lab", setup) and "ray[default]==2.60.0" in setup
    assert "PBT_LAB_STORAGE=s3://" in setup
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command


def test_the_k80_nodes_install_every_dependency_the_lab_declares():
    # They install the lab with --no-deps over the Kepler stack: its own dependencies must be named.
    import tomllib

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~ ;]", requirement.strip().strip('"'), maxsplit=1)[0].lower()

    declared = {
        name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    setup = " ".join(yaml.safe_load((ROOT / "cluster" / "k80.yaml").read_text())["setup_commands"])
    installed = {name(r) for r in re.findall(r'"([^"]+)"', setup)}
    assert declared - installed == {"tensorboard"}  # (TensorFlow 2.14 requires it)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_opens_no_port_but_ssh_to_the_internet(path):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = prepared(path)
    # Ray makes the security group only for node types that bring none of their own.
    for node_type in config["available_node_types"].values():
        assert not {"SecurityGroupIds", "NetworkInterfaces", "LaunchTemplate"} & set(node_type["node_config"])
    # The inbound rules Ray gives that group: its own defaults plus the config's IpPermissions.
    rules = _create_default_inbound_rules(
        ["sg-cluster"], config["provider"].get("security_group", {}).get("IpPermissions")
    )
    from_outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in from_outside] == [("tcp", 22, 22)]
    assert all(r["UserIdGroupPairs"] == [{"GroupId": "sg-cluster"}] for r in rules if r not in from_outside)
    # The dashboard (and the Jobs API it serves) listens on the head's localhost only.
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


# --- launching: names, storage URIs, --address (no Ray started) ------------------------------


def test_default_run_names_do_not_collide(tmp_path):
    argv = ["--config", PBT_QUICK, "--storage-path", f"file://{tmp_path}"]
    first, second = (cli.parse("pbt", PBTExperiment, "pbt", argv) for _ in range(2))
    assert first.name != second.name and first.name.startswith("pbt-")
    assert first.run_dir == f"file://{tmp_path}/{first.name}"  # a URI stays a URI


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--address", "localhost"], "--address 'localhost': expected auto or HOST:PORT"),
        (["--name", "a/b"], "--name 'a/b': use letters"),
        (
            ["--storage-path", "nosuchscheme://bucket/runs"],
            "--storage-path nosuchscheme://bucket/runs: Unrecognized filesystem type",
        ),
        (["--resume", "--name", "gone"], "--resume: there is no run"),
    ],
)
def test_bad_launch_flags_get_one_line(tmp_path, capsys, argv, message):
    if "--storage-path" not in argv:
        argv = [*argv, "--storage-path", f"file://{tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        cli.parse("pbt", PBTExperiment, "pbt", ["--config", PBT_QUICK, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0]


def test_an_existing_run_behind_a_uri_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.parse(
            "pbt",
            PBTExperiment,
            "pbt",
            ["--config", PBT_QUICK, "--storage-path", f"file://{tmp_path}", "--name", "taken"],
        )
    assert "already exists: pass --resume" in capsys.readouterr().err


# --- real clusters in subprocesses -----------------------------------------------------------


@pytest.mark.slow
def test_pbt_spreads_over_two_nodes_and_exploits_across_them_through_s3(
    isolated_ray, local_s3, tmp_path, monkeypatch
):
    local_s3.use_keys(monkeypatch)  # this process reads the bucket too
    argv = [
        *("--config", PBT_QUICK, "--storage-path", local_s3.uri("cluster"), "--name", "two-nodes"),
        *("--set", "resources.gpu=0.5"),  # one fake GPU per node: two members per node
        *("--set", "train.max_steps=400"),
        *("--set", "pbt.quantile_fraction=0.4"),  # 2 of 5: more exploits to cross
    ]
    started = time.perf_counter()
    _, nodes = two_nodes({**isolated_ray, **local_s3.keys}, tmp_path, "pbt", *argv)
    run = local_s3.uri("cluster/two-nodes")
    stored = local_s3.objects("cluster/two-nodes/")
    assert {TRIALS, HISTORY, LINEAGE, SUMMARY} <= {k.removeprefix("cluster/two-nodes/") for k in stored}
    trials, history, summary = read_tables(run)
    lineage = local_s3.read_parquet(f"cluster/two-nodes/{LINEAGE}")
    assert len(trials) == 5 and (trials["status"] != "error").all()
    assert set(history["node_id"]) == set(nodes) and len(nodes) == 2, "members trained on both nodes"

    # Where each exploit's checkpoint was written (the donor's node when it reported that step) and
    # where it was read: through the bucket, the only storage the nodes share.
    def node(trial_id, column, value):
        rows = history[(history["trial_id"] == trial_id) & (history[column] == value)]
        return rows["node_id"].iloc[0] if len(rows) else None

    moves = [
        (node(e["donor"], "step", e["step"]), node(e["recipient"], "iteration", e["recipient_iteration"]))
        for _, e in lineage.iterrows()
    ]
    assert any(written and written != read for written, read in moves), f"no exploit crossed nodes: {moves}"
    assert summary["run_dir"] == run
    e = summary["exploits"]  # every copy across nodes audited: decided, and the state the donor saved
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"] >= 1
    assert (lineage["verdict"] == "verified").all()
    wall, size = time.perf_counter() - started, sum(stored.values()) / 1e6
    print(f"two nodes on S3: {wall:.0f} s, {len(moves)} exploits, {len(stored)} objects, {size:.1f} MB")


def free_port() -> int:
    """A loopback port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_entry_point_joins_a_head_started_with_ray_start(isolated_ray, tmp_path):
    port = free_port()
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (the head process writes to it until the test ends)
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=1",
            "--include-dashboard=false",
            "--block",
        ],
        env=isolated_ray,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        probe = "import ray; ray.init(address='auto'); print(ray.get_runtime_context().get_node_id())"
        for _ in range(60):
            found = subprocess.run(
                [sys.executable, "-c", probe], env=isolated_ray, capture_output=True, text=True
            )
            if found.returncode == 0:
                break
            time.sleep(1)
        assert found.returncode == 0, (tmp_path / "head.log").read_text()[-2000:] + found.stderr[-2000:]
        head_node = found.stdout.split()[-1]
        # `auto` finds the head that `ray start` recorded; 0.5 GPU is the head's fake GPU (alone,
        # on this GPU-less machine, the launcher would refuse it)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pbt_lab.grid",
                "--address",
                "auto",
                "--config",
                GRID_QUICK,
                "--storage-path",
                str(tmp_path / "runs"),
                "--name",
                "joined",
                "--set",
                "grid.optimizers=[adam]",
                "--set",
                "grid.lrs=[0.001]",
                "--set",
                "train.max_steps=100",
                "--set",
                "resources.gpu=0.5",
            ],
            env=isolated_ray,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        trials = pd.read_parquet(tmp_path / "runs" / "joined" / TRIALS)
        assert list(trials["node_id"]) == [head_node] and list(trials["steps"]) == [100]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        log.close()


def ray_job(address: str, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ray job ARGS --address ADDRESS``: Ray's Jobs CLI, with the head's auth token in ``env``."""
    command = ["ray", "job", *args[:1], "--address", address, *args[1:]]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def job_status(address: str, env: dict, job: str) -> str:
    """A job's status as ``ray job status`` prints it (a finished job's as a sentence)."""
    said = re.sub(r"\x1b\[[0-9;]*m", "", (done := ray_job(address, env, "status", job, timeout=60)).stdout)
    found = re.search(r"Status for job '[^']+': (\w+)", said)
    ended = re.search(r"Job '[^']+' (was stopped|succeeded|failed)", said)
    names = {"was stopped": "STOPPED", "succeeded": "SUCCEEDED", "failed": "FAILED"}
    return found[1] if found else names[ended[1]] if ended else said + done.stderr


@pytest.mark.slow
def test_a_ray_job_submitted_followed_stopped_and_resumed(isolated_ray, tmp_path):
    """Against a head started with ``ray start --head`` (its dashboard serving the Jobs API, token
    authentication on): a quick PBT submitted as a Ray Job, followed, stopped, and resumed as another."""
    port, dashboard, agent = free_port(), free_port(), free_port()  # (another head's agent may linger)
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (the head process writes to it until the test ends)
    head = subprocess.Popen(
        [
            *("ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=1"),
            *("--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"),
            f"--dashboard-agent-listen-port={agent}",
            "--block",
        ],
        env=isolated_ray,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    jobs, runs = f"http://127.0.0.1:{dashboard}", tmp_path / "runs"
    entry = [
        *(sys.executable, "-m", "pbt_lab.pbt", "--config", PBT_QUICK, "--address", "auto"),
        *("--storage-path", str(runs), "--name", "job", "--set", "resources.gpu=0.5"),
        *("--set", "train.max_steps=1000"),
    ]
    try:
        for _ in range(90):  # the head takes jobs once its dashboard and its node's agent are up
            submitted = ray_job(
                jobs, isolated_ray, "submit", "--submission-id", "pbt-1", "--no-wait", "--", *entry
            )
            if submitted.returncode == 0:  # (a refused submission creates no job: it is sent again)
                break
            time.sleep(1)
        assert submitted.returncode == 0, (
            submitted.stdout + submitted.stderr + (tmp_path / "head.log").read_text()
        )
        deadline = time.time() + 300  # followed until PBT has decided an exploit
        while time.time() < deadline and job_status(jobs, isolated_ray, "pbt-1") in ("PENDING", "RUNNING"):
            state = runs / "job" / "pbt_state.json"
            if state.is_file() and any(
                d["action"] == "exploit" for d in json.loads(state.read_text())["decisions"]
            ):
                break
            time.sleep(1)
        assert job_status(jobs, isolated_ray, "pbt-1") == "RUNNING"
        stopped = ray_job(jobs, isolated_ray, "stop", "pbt-1")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert job_status(jobs, isolated_ray, "pbt-1") == "STOPPED"
        first = ray_job(jobs, isolated_ray, "logs", "pbt-1").stdout
        # The job's log is the driver's console: the lab's own lines
        assert re.search(
            r"^pbt job: 5 trials × 1,000 steps, 2 at a time on the Ray cluster at auto", first, re.M
        )

        resumed = ray_job(jobs, isolated_ray, "submit", "--submission-id", "pbt-2", "--", *entry, "--resume")
        assert job_status(jobs, isolated_ray, "pbt-2") == "SUCCEEDED", resumed.stdout[-3000:] + resumed.stderr
        logs = ray_job(jobs, isolated_ray, "logs", "pbt-2").stdout
        assert re.search(r"^pbt job \(resumed\): ", logs, re.M) and "Trial status" not in logs
        assert logs.strip().splitlines()[-1].startswith("tensorboard --logdir"), logs[-3000:]  # summary last
        assert re.search(r"^restores: \d+ \(.*resume.*\): \d+ verified$", logs, re.M), logs[-3000:]
        assert re.search(r"^winner \S+: ", logs, re.M)
        trials, _, summary = read_tables(runs / "job")
        assert (
            len(trials) == 5
            and (trials["steps"] == 1000).all()
            and set(trials["status"]) <= {"reached", "capped"}
        )
        e = summary["exploits"]
        assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"] >= 1
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        log.close()
