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
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from pbt_lab import UserError
from pbt_lab.config import OneLineParser, load_config
from pbt_lab.data import Mnist, load_mnist
from pbt_lab.results import is_uri, uri_exists

STORAGE_ENV = "PBT_LAB_STORAGE"
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default
ADDRESS = re.compile(r"auto|[\w.-]+:\d+|\[[0-9a-fA-F:]+\]:\d+")  # what ray.init(address=…) connects to


def default_name(kind: str) -> str:
    """``KIND-DATE-TIME-XXXX``: the random suffix keeps runs submitted in the same second to one
    cluster (and one storage path) apart."""
    return f"{kind}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


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
              add_arguments=None, base_config=None) -> Launch:
        """Parse the common flags and validate config, data and run directory; one line and exit 2 if bad.

        ``add_arguments(parser)`` adds an experiment's own flags; ``base_config(args)`` returns a
        recorded config (a dict) that the YAML and ``--set`` then override.
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
            if args.address is not None and not ADDRESS.fullmatch(args.address):
                raise UserError(f"--address {args.address!r}: expected auto or HOST:PORT of a running Ray head (e.g. 10.0.0.5:6379)")
            if args.name is not None and not re.fullmatch(r"[\w.-]+", args.name):
                raise UserError(f"--name {args.name!r}: use letters, digits, '_', '-' and '.' only (it names a directory)")
            launch = cls(kind, cfg, data=None, name=args.name or default_name(kind),
                         storage_path=storage, address=args.address, resume=args.resume, parser=parser, args=args)
            launch._check_run_dir(args.name)
            launch.data = load_mnist(cfg.data.source)
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
            checkpoint_every: int | None = None, keep_checkpoints: int | None = None):
        """Run (or resume) the experiment on Ray Tune with the lab's trainable; returns the ResultGrid."""
        import ray
        from ray import tune

        from pbt_lab.trainable import LabTrainable

        started = not ray.is_initialized()
        if started:
            try:
                # Without --address (or RAY_ADDRESS, set for a Ray Job's driver) start a local Ray even
                # if `ray start` left a cluster running here: Ray itself would join that one.
                ray.init(address=self.address or os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING")
            except ConnectionError as e:  # no cluster there, or it refused us (auth token)
                self.parser.error(f"cannot connect to the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS')}: "
                                  f"{str(e).splitlines()[0]}")
        res = self.cfg.resources
        # A cluster (--address, or RAY_ADDRESS as set for a Ray Job's driver) may still grow GPU
        # nodes through its autoscaler; a local Ray never does.
        joined = self.address is not None or bool(os.environ.get("RAY_ADDRESS"))
        if not joined and res.gpu > ray.cluster_resources().get("GPU", 0):
            if started:
                ray.shutdown()  # a local cluster never grows GPUs: trials would wait forever
            self.parser.error(f"resources.gpu={res.gpu:g} but this machine has no GPU: use --set resources.gpu=0")
        trainable = tune.with_resources(tune.with_parameters(LabTrainable, data=self.data),
                                        {"cpu": res.cpu, "gpu": res.gpu})
        run = self.cfg.run
        every = run.checkpoint_every if checkpoint_every is None else checkpoint_every
        keep = None if run.keep_checkpoints is None else max(run.keep_checkpoints, keep_checkpoints or 0)
        start = time.perf_counter()
        kept_log = self._ray_policy_log()
        if self.resume:
            tuner = tune.Tuner.restore(str(self.run_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg, num_samples=num_samples,
                                            reuse_actors=True, max_concurrent_trials=res.max_concurrent),
                run_config=tune.RunConfig(
                    name=self.name,
                    storage_path=self.storage_path,
                    stop=stop,
                    # No checkpoint at the end unless asked: a finished grid trial never resumes, and
                    # 288 final checkpoints of the full model would take 11 GB.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep, checkpoint_frequency=every,
                                                            checkpoint_at_end=every > 0),
                    failure_config=tune.FailureConfig(max_failures=run.max_failures),
                    verbose=1,
                ),
            )
        results = tuner.fit()
        self.wall_seconds += time.perf_counter() - start
        self._keep_ray_policy_log(kept_log)
        return results

    # Ray restores only .json/.pkl files into its driver staging dir on resume, then syncs its
    # fresh pbt_global.txt over the old one: PBT's log of decisions made before the interrupt
    # would be lost. The lab keeps it.
    # (With a URI storage path Ray's own log is left as Ray writes it.)
    def _ray_policy_log(self) -> str:
        if not self.resume or is_uri(self.storage_path):
            return ""
        log = self.run_dir / "pbt_global.txt"
        return log.read_text() if log.is_file() else ""

    def _keep_ray_policy_log(self, before: str) -> None:
        if not before:
            return
        log = self.run_dir / "pbt_global.txt"
        now = log.read_text() if log.is_file() else ""
        if before and not now.startswith(before):
            log.write_text(before + now)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
