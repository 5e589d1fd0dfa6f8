"""Shared fixtures: the bundled data once per session, the full MNIST file when it is beside the repo,
one local Ray, the quick grid and quick PBT runs (each run once per session, read by several modules),
and a local S3 server; a private Ray cluster of two nodes in a subprocess."""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pbt_lab.training.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
FULL_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"


@pytest.fixture(scope="session")
def bundled():
    return load_dataset("bundled")


@pytest.fixture(scope="session")
def full_mnist_path():
    if not FULL_MNIST.is_file():
        pytest.skip(f"full MNIST not found at {FULL_MNIST}")
    return FULL_MNIST


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session: 2 CPUs and one fake GPU."""
    import ray

    # "local": never join a cluster that `ray start` left running on this machine
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def quick_grid(tmp_path_factory):
    """The quick grid as a user runs it (``python -m pbt_lab.grid``, its own local Ray: two CPU slots),
    once for the session's tests; its console (stdout and stderr) is ``<storage>/quick.log``."""
    storage = tmp_path_factory.mktemp("runs")
    with open(storage / "quick.log", "w") as log:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pbt_lab.grid", "--config", str(CONFIGS / "grid-quick.yaml")),
                *("--storage-path", str(storage), "--name", "quick"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    assert done.returncode == 0, (storage / "quick.log").read_text()[-3000:]
    return storage / "quick"


def run_pbt(storage: Path, name: str, *argv: str) -> subprocess.Popen:
    """The quick PBT as a user runs it (``python -m pbt_lab.pbt``), with a local Ray of its own; its
    console goes to ``<storage>/<name>.log`` (a pipe nobody reads would stall it)."""
    storage.mkdir(parents=True, exist_ok=True)
    with open(storage / f"{name}.log", "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pbt_lab.pbt",
                "--config",
                str(CONFIGS / "pbt-quick.yaml"),
                "--storage-path",
                str(storage),
                "--name",
                name,
                *argv,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(driver: subprocess.Popen, storage: Path, name: str) -> None:
    """Wait for a run started by ``run_pbt``; it must succeed."""
    driver.wait(timeout=900)
    assert driver.returncode == 0, (storage / f"{name}.log").read_text()[-3000:]


SERIAL = ("--set", "resources.max_concurrent=1")  # one member at a time: a seed gives one lineage


def checkpoints_per_member(run: Path) -> int:
    """The most checkpoints any member has on disk right now."""
    return max((len(list(d.glob("checkpoint_*"))) for d in run.glob("LabTrainable_*")), default=0)


@pytest.fixture(scope="session")
def quick_pbt(tmp_path_factory):
    """The quick PBT population, serial (so its lineage is a function of its seed), run once for the
    session's tests; the most checkpoints a member held at any moment is kept beside it."""
    storage = tmp_path_factory.mktemp("runs")
    driver, most = run_pbt(storage, "quick", *SERIAL), 0
    while driver.poll() is None:
        most = max(most, checkpoints_per_member(storage / "quick"))
        time.sleep(0.05)
    finish(driver, storage, "quick")
    (storage / "observed.json").write_text(json.dumps({"most_checkpoints_per_member": most}))
    return storage / "quick"


@pytest.fixture(scope="session")
def quick_scaling(ray_session, tmp_path_factory):
    """The quick width study (Adam at 2 rates × 3 widths of the quarter-width CNN), run once per session."""
    from pbt_lab import scaling

    storage = tmp_path_factory.mktemp("runs")
    assert (
        scaling.main(
            [
                "--config",
                str(CONFIGS / "scaling-quick.yaml"),
                "--storage-path",
                str(storage),
                "--name",
                "scaling-quick",
            ]
        )
        == 0
    )
    return storage / "scaling-quick"


# The comparison, small: all five methods × 2 seeds at a 3 × 2 grid of 100-step trials (600 steps).
COMPARE_SMALL = (
    "--set",
    "train.max_steps=100",
    "--set",
    "grid.lrs=[1.0e-3, 1.0e-1]",
    "--set",
    "compare.seeds=[0, 1]",
)


@pytest.fixture(scope="session")
def quick_compare(ray_session, tmp_path_factory):
    """configs/compare-quick.yaml at a smaller budget, run once for the session's tests."""
    from pbt_lab import compare

    storage = tmp_path_factory.mktemp("runs")
    argv = ["--config", str(CONFIGS / "compare-quick.yaml"), "--storage-path", str(storage)]
    assert compare.main([*argv, "--name", "compare", *COMPARE_SMALL]) == 0
    return storage / "compare"


@dataclass(frozen=True)
class LocalS3:
    """A local S3-compatible server (moto) and the one user whose keys it accepts."""

    host: str  # 127.0.0.1:PORT
    keys: dict  # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of that user
    bucket: str = "runs"

    def uri(self, path: str, bucket: str | None = None) -> str:
        """The form Arrow and Ray document for an S3-compatible store: options in the query string."""
        options = f"endpoint_override={self.host}&scheme=http&region=us-east-1"
        return f"s3://{bucket or self.bucket}/{path}?{options}"

    def use_keys(self, monkeypatch) -> None:
        """This process reads the bucket too (the tables, through pyarrow): the user's keys, for the test."""
        for name, value in self.keys.items():
            monkeypatch.setenv(name, value)

    def env(self, **more) -> dict:
        """This process's environment with the user's keys (a run's local Ray and its workers inherit it)."""
        return {**os.environ, **self.keys, **more}

    def objects(self, prefix: str) -> dict[str, int]:
        """Every object stored under ``prefix`` in the bucket: key → size."""
        client = self.client(**self.keys)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read_parquet(self, key: str):
        """A table stored in the bucket, read as the user's keys allow."""
        import io

        import pandas as pd

        body = self.client(**self.keys).get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return pd.read_parquet(io.BytesIO(body))

    def client(self, service: str = "s3", **keys):
        import boto3

        return boto3.client(
            service,
            endpoint_url=f"http://{self.host}",
            region_name="us-east-1",
            aws_access_key_id=keys.get("AWS_ACCESS_KEY_ID", "setup"),
            aws_secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY", "setup"),
        )


@pytest.fixture(scope="session")
def local_s3():
    """moto's S3 server on the loopback address, checking credentials as S3 does: one bucket, one IAM
    user allowed s3:*, and every request after the set-up signed with that user's keys or refused."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host = f"127.0.0.1:{server.get_host_and_port()[1]}"
    setup = LocalS3(host, {})
    setup.client().create_bucket(Bucket=setup.bucket)
    iam = setup.client("iam")
    iam.create_user(UserName="lab")
    allow_s3 = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="lab", PolicyName="s3", PolicyDocument=json.dumps(allow_s3))
    key = iam.create_access_key(UserName="lab")["AccessKey"]
    # From here on moto authenticates every request (its set-up requests were the unauthenticated ones).
    reset = f"http://{host}/moto-api/reset-auth"
    urllib.request.urlopen(urllib.request.Request(reset, b"0", {"Content-Type": "text/plain"}, method="POST"))
    yield LocalS3(
        host, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    )
    server.stop()


# --- a private two-node Ray cluster ------------------------------------------------------------


@pytest.fixture
def isolated_ray(tmp_path):
    """Environment for a private Ray: its own temp dir (short: Ray's socket paths must fit in
    107 bytes) and token authentication with a fresh token."""
    temp = tempfile.mkdtemp(prefix="pl", dir="/tmp")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=temp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
    )
    yield env
    subprocess.run(["rm", "-rf", temp], check=False)


# The second node is lost (its raylet killed, no graceful drain) once LOSE_AFTER checkpoints are of
# trials training there (their last report came from it), if asked: the line LOST says when.
TWO_NODES = """
import importlib, json, os, re, sys, threading, time
import pyarrow.fs
import ray
from ray.cluster_utils import Cluster

head = {"num_cpus": 2, "num_gpus": 1, "include_dashboard": False}
cluster = Cluster(initialize_head=True, head_node_args=head)
second = cluster.add_node(num_cpus=2, num_gpus=1)
cluster.wait_for_nodes()
print("NODES " + json.dumps([cluster.head_node.node_id, second.node_id]), flush=True)

def on_second(fs, trial_dir):
    try:
        with fs.open_input_stream(trial_dir + "/result.json") as f:
            return json.loads(f.read().decode().strip().splitlines()[-1]).get("node_id") == second.node_id
    except (OSError, ValueError, IndexError):
        return False

def lose_second(run, after):
    fs, path = pyarrow.fs.FileSystem.from_uri(run)
    while True:
        found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        saved = {m.groups() for i in found if (m := re.search(r"(.*)/(checkpoint_[0-9]+)", i.path))}
        if sum(on_second(fs, trial_dir) for trial_dir, _ in saved) >= after:
            print(f"LOST {time.time()}", flush=True)
            cluster.remove_node(second, allow_graceful=False)
            return
        time.sleep(0.2)

if os.environ.get("LOSE_RUN"):
    args = (os.environ["LOSE_RUN"], int(os.environ["LOSE_AFTER"]))
    threading.Thread(target=lose_second, args=args, daemon=True).start()
command = importlib.import_module("pbt_lab.experiments." + sys.argv[1])
try:
    code = command.main(["--address", cluster.address, *sys.argv[2:]])
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
"""


def two_nodes(env: dict, cwd: Path, command: str, *argv: str) -> tuple[subprocess.CompletedProcess, list]:
    """The lab's ``command`` (pbt, grid) on a two-node Ray cluster (``ray.cluster_utils.Cluster``), and
    the nodes' ids, head first."""
    done = subprocess.run(
        [sys.executable, "-c", TWO_NODES, command, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (cwd / "two_nodes.log").write_text(done.stdout + done.stderr)  # the whole console, for a failure
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("NODES "))[6:])
    return done, nodes
