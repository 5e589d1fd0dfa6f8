"""Shared launching code for every experiment module: flags, config, Ray, the Tuner, the run dir.

Each experiment's ``main`` is ``Launch.parse`` (everything validated before Ray starts), then
``launch.fit(param_space, …)``, then ``results.write_tables``. Common flags:

    --config PATH  --set key=value …  --name NAME  --storage-path PATH|URI  --address auto|HOST:PORT  --resume

On a cluster (README, "Run on a cluster") the storage path is shared by every node (an ``s3://``
URI, or the same NFS path everywhere: Ray ≥ 2.7 no longer syncs trial dirs to the head), and
``--address`` connects the driver to the running cluster instead of starting a local Ray.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from pbt_lab import UserError
from pbt_lab.config import OneLineParser, load_config
from pbt_lab.data import Mnist, load_mnist
from pbt_lab.results import is_uri, uri_exists

STORAGE_ENV = "PBT_LAB_STORAGE"
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default
ADDRESS = re.compile(r"auto|(?P<host>[\w.-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)")  # what ray.init(address=…) connects to
TRIAL_SLOT = "pbt_lab_trial_slot"  # a local Ray's custom resource: resources.max_concurrent of them
CONNECT_TIMEOUT = 3.0  # seconds to wait for a Ray head to answer before saying so


def check_address(address: str) -> None:
    """A Ray head we can reach, or one line within seconds (Ray itself retries for minutes)."""
    match = ADDRESS.fullmatch(address)
    if not match:
        raise UserError(f"--address {address!r}: expected auto or HOST:PORT of a running Ray head (e.g. 10.0.0.5:6379)")
    if address == "auto":
        return  # Ray reads the address `ray start` left on this machine, and fails at once without one
    host, port = match["host"].strip("[]"), int(match["port"])
    if not 0 < port < 65536:
        raise UserError(f"--address {address!r}: port {port} is not a TCP port (1-65535)")
    if re.fullmatch(r"[\d.]+", host) and (host.count(".") != 3 or any(int(p) > 255 for p in host.split(".") if p)):
        raise UserError(f"--address {address!r}: {host} is not an IPv4 address")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise UserError(f"--address {address}: no Ray head answers there ({e.strerror or e})") from None


def check_storage(storage: str) -> None:
    """A storage path the run can write, tried without leaving anything behind."""
    if is_uri(storage):
        return  # listing it (the run-directory check) names a bad scheme, bucket or credentials
    path = Path(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--storage-path {storage}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise UserError(f"--storage-path {storage}: cannot write in {existing} ({e.strerror or e})") from None


def free_bytes(storage: str) -> int | None:
    """Free space where runs are stored (None behind a URI: object stores do not say)."""
    if is_uri(storage):
        return None
    path = Path(storage)
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


def default_name(kind: str) -> str:
    """``KIND-DATE-TIME-XXXX``: the random suffix keeps runs submitted in the same second to one
    cluster (and one storage path) apart."""
    return f"{kind}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class _KeepLocalLog:
    """Ray's trial loggers minus a loss of results (Ray 2.60, seen here).

    Ray copies a trial's ``result.json`` and ``progress.csv`` back from storage whenever the
    trial restarts from a checkpoint, as PBT's members do after every pause: storage lags the
    driver's own copy by up to an experiment snapshot (≥ 10 s), so the reports in between were
    overwritten. These fetch the file only when this driver has none (a resumed run).
    """

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonLog(_KeepLocalLog, JsonLoggerCallback):
    """``result.json``, every report kept."""


class CSVLog(_KeepLocalLog, CSVLoggerCallback):
    """``progress.csv``, every report kept."""


@dataclass
class Launch:
    """A validated experiment launch: its config, data, and where its run directory is."""

    kind: str
    cfg: object
    data: Mnist
    name: str
    storage_path: str
    address: str | None
    resume: bool
    parser: OneLineParser
    args: object = None
    wall_seconds: float = 0.0

    @property
    def run_dir(self) -> Path | str:
        """``<storage_path>/<name>``: a Path, or a URI string (Path would fold ``s3://`` into ``s3:/``)."""
        if is_uri(self.storage_path):
            return f"{self.storage_path.rstrip('/')}/{self.name}"
        return Path(self.storage_path) / self.name

    @classmethod
    def parse(cls, kind: str, config_cls: type, description: str, argv: list[str] | None = None,
              add_arguments=None, base_config=None, validate=None) -> Launch:
        """Parse the common flags and validate config, data, storage, address and run directory; one
        line and exit 2 if bad.

        ``add_arguments(parser)`` adds an experiment's own flags; ``base_config(args)`` returns a
        recorded config (a dict) that the YAML and ``--set`` then override; ``validate(launch)``
        raises UserError for what the experiment itself cannot run.
        """
        parser = OneLineParser(prog=f"python -m pbt_lab.{kind}", description=description)
        parser.add_argument("--config", help="YAML file listing what differs from the defaults (see configs/)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override one config value, e.g. --set train.target=0.96 (repeatable)")
        parser.add_argument("--name", help=f"run name (default: {kind}-DATE-TIME-XXXX, unique per submission)")
        parser.add_argument("--storage-path", help=f"where runs live: a path, or a URI such as s3://bucket/runs shared by "
                                                   f"every node of a cluster (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})")
        parser.add_argument("--address", help="connect to this running Ray cluster (auto or HOST:PORT) instead of starting one")
        parser.add_argument("--resume", action="store_true", help="continue the interrupted run --name")
        if add_arguments:
            add_arguments(parser)
        args = parser.parse_args(argv)
        try:
            cfg = load_config(config_cls, args.config, args.set, base=base_config(args) if base_config else None)
            storage = args.storage_path or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
            if not is_uri(storage):
                storage = str(Path(storage).expanduser().resolve())
            if args.name is not None and not re.fullmatch(r"[\w.-]+", args.name):
                raise UserError(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' only (it names a directory)")
            check_storage(storage)
            launch = cls(kind, cfg, data=None, name=args.name or default_name(kind),
                         storage_path=storage, address=args.address, resume=args.resume, parser=parser, args=args)
            launch._check_run_dir(args.name)
            launch.data = load_mnist(cfg.data.source)
            if validate:
                validate(launch)
            if args.address is not None:
                check_address(args.address)
        except UserError as e:
            parser.error(str(e))
        return launch

    def _check_run_dir(self, named: str | None) -> None:
        if is_uri(self.storage_path):
            exists = uri_exists(self.run_dir)
        else:
            exists = self.run_dir.is_dir() and any(self.run_dir.iterdir())
        if self.resume and not named:
            raise UserError("--resume needs --name of the run to continue")
        if self.resume and not exists:
            raise UserError(f"--resume: there is no run {self.run_dir} (check --name and --storage-path)")
        if not self.resume and exists:
            raise UserError(f"run {self.run_dir} already exists: pass --resume to continue it, or choose another --name")

    def fit(self, param_space: dict, *, scheduler=None, search_alg=None, num_samples: int = 1, stop=None,
            callbacks=(), checkpoint_every: int | None = None, keep_all_checkpoints: bool = False):
        """Run (or resume) the experiment on Ray Tune with the lab's trainable; returns the ResultGrid.

        ``keep_all_checkpoints``: Ray deletes none (PBT's scheduler prunes them itself)."""
        import ray
        from ray import tune

        from pbt_lab.trainable import LabTrainable

        res = self.cfg.resources
        # A cluster (--address, or RAY_ADDRESS as set for a Ray Job's driver) may still grow nodes
        # through its autoscaler; a local Ray never does, so a trial it cannot hold would wait forever.
        joined = self.address is not None or bool(os.environ.get("RAY_ADDRESS"))
        started = not ray.is_initialized()
        # Ray ignores max_concurrent_trials beside a search algorithm (PBT's): a local Ray started
        # here gets that many trial slots instead, a resource every search honours.
        slots = {TRIAL_SLOT: res.max_concurrent} if res.max_concurrent and started and not joined else {}
        if res.max_concurrent and search_alg is not None and not slots:
            self.parser.error(f"resources.max_concurrent={res.max_concurrent}: with PBT it only applies to a local Ray "
                              f"this run starts; size the cluster or resources.cpu instead")
        if started:
            try:
                # Without --address (or RAY_ADDRESS, set for a Ray Job's driver) start a local Ray even
                # if `ray start` left a cluster running here: Ray itself would join that one.
                ray.init(address=self.address or os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING",
                         resources=slots or None)
            except ConnectionError as e:  # no cluster there, or it refused us (auth token)
                self.parser.error(f"cannot connect to the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS')}: "
                                  f"{str(e).splitlines()[0]}")
        have = ray.cluster_resources()
        missing = [f"resources.{name}={value:g} but this machine has {have.get(key, 0):g} {unit}"
                   for name, key, unit, value in (("cpu", "CPU", "CPUs", res.cpu), ("gpu", "GPU", "GPUs", res.gpu))
                   if value > have.get(key, 0)]
        if missing and not joined:
            if started:
                ray.shutdown()
            self.parser.error(f"{missing[0]}: one trial would never start (lower it with --set)")
        trainable = tune.with_resources(tune.with_parameters(LabTrainable, data=self.data),
                                        {"cpu": res.cpu, "gpu": res.gpu, **dict.fromkeys(slots, 1)})
        run = self.cfg.run
        every = run.checkpoint_every if checkpoint_every is None else checkpoint_every
        start = time.perf_counter()
        if self.resume:
            tuner = tune.Tuner.restore(str(self.run_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                # The trainable reports its state's digests at the checks after which a checkpoint is due.
                param_space={**param_space, "checkpoint_every": every},
                tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg, num_samples=num_samples,
                                            reuse_actors=True, max_concurrent_trials=res.max_concurrent),
                run_config=tune.RunConfig(
                    name=self.name,
                    storage_path=self.storage_path,
                    stop=stop,
                    callbacks=[JsonLog(), CSVLog(), *callbacks],
                    # No checkpoint at the end unless asked: a finished grid trial never resumes, and
                    # 288 final checkpoints of the full model would take 11 GB.
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=None if keep_all_checkpoints else run.keep_checkpoints,
                        checkpoint_frequency=every, checkpoint_at_end=every > 0),
                    failure_config=tune.FailureConfig(max_failures=run.max_failures),
                    verbose=1,
                ),
            )
        results = tuner.fit()
        self.wall_seconds += time.perf_counter() - start
        return results

    def config_dict(self) -> dict:
        return asdict(self.cfg)
