"""The commands' shared front and back end: the common flags, the config (defaults, then YAML, then
``--set``), everything checked before Ray starts; and the one ``finish()`` that writes the tables,
prints the result and chooses the exit code. No Ray here.

    run = cli.parse("grid", GridExperiment, __doc__, argv)      # or one line on stderr, exit 2
    with cli.one_line_errors(run):
        fit(run, param_space)                                   # pbt_lab.tuning.launch
    return cli.finish(run, "grid")

Common flags: ``--config PATH  --set key=value …  --name NAME  --storage-path PATH|URI
--address auto|HOST:PORT  --resume  --verbose|--quiet``. On a cluster (README, "Run on a cluster")
the storage path is shared by every node (an ``s3://`` URI, or the same NFS path everywhere: Ray ≥
2.7 no longer syncs trial dirs to the head), and ``--address`` connects the driver to the cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from pbt_lab import OneLineParser, UserError, results
from pbt_lab.config import STUDY_CNN, load_config
from pbt_lab.names import TUNER_FILE
from pbt_lab.storage import (
    check_room,
    check_storage,
    file_exists,
    is_storage_full,
    is_uri,
    join,
    reserve_bytes,
    run_bytes,
    uri_exists,
)
from pbt_lab.training.data import Dataset, load_dataset

STORAGE_ENV = "PBT_LAB_STORAGE"
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default
ADDRESS = re.compile(
    r"auto|(?P<host>[\w.-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)"
)  # what ray.init(address=…) takes
CONNECT_TIMEOUT = 3.0  # seconds to wait for a Ray head to answer before saying so


class RaisingParser(OneLineParser):
    """The Python API's parser: a bad argument or config raises UserError instead of exiting."""

    def error(self, message):
        raise UserError(message)


@dataclass
class Call:
    """A Python API call (``pbt_lab.api``): what it passes in beside the arguments, and the run it
    gets back (``parse`` fills ``run``; ``finish`` its tables)."""

    builder: Callable | None = None
    """A model builder function, in place of ``model.builder``."""
    settings: dict | None = None
    """Config sections laid over the YAML file, e.g. {"train": {"target": 0.9}}."""
    run: Run | None = None


# --- a run, validated before anything starts ------------------------------------------------


@dataclass
class Session:
    """The fit a run made: what its compute totals and time breakdown are measured against."""

    started_at: float | None = None
    """When the fit started (epoch seconds)."""
    wall_seconds: float = 0.0
    slots: int | None = None
    """Trials the cluster held at once when the fit started (an autoscaler may add more)."""
    stopped: str | None = None
    """Why the fit stopped before its end (its storage filled up): the run exits 1, resumable."""


@dataclass
class Run:
    """A validated command: its config and data, and where its run directory is."""

    kind: str
    cfg: object
    data: Dataset | None
    name: str
    storage_path: str
    address: str | None
    resume: bool
    parser: OneLineParser
    args: argparse.Namespace
    builder: Callable | None = None
    weights: int | None = None
    session: Session = field(default_factory=Session)
    tables: dict | None = None

    @property
    def verbosity(self) -> int:
        """0 ``--quiet``: the summary only; 1 (default): progress and events; 2 ``--verbose``: Ray's own."""
        return 0 if getattr(self.args, "quiet", False) else 2 if getattr(self.args, "verbose", False) else 1

    @property
    def run_dir(self) -> Path | str:
        """``<storage_path>/<name>``: a Path, or a URI string (Path would fold ``s3://`` into ``s3:/``)."""
        return join(self.storage_path, self.name)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def checkpoint_bytes(self) -> int:
        """One checkpoint of this run's model: its weights and up to two slots per weight (Adam,
        Adadelta), 4 bytes each, and the metadata."""
        return 12 * (self.weights or 0) + 100_000

    def check_room(self, trials: int, checkpoints: int) -> None:
        """One line if the storage cannot hold ``trials`` trials' reports and tables and ``checkpoints``
        checkpoints at once, beside the room the run keeps free to stop cleanly (its slots: as many
        trials as this machine's CPUs hold)."""
        res = self.cfg.resources
        slots = min(trials, res.max_concurrent or trials, max(1, int((os.cpu_count() or 1) / res.cpu)))
        need = run_bytes(trials, self.cfg.train.most_checks, checkpoints, self.checkpoint_bytes)
        need += reserve_bytes(slots, self.checkpoint_bytes)
        if self.resume and not is_uri(self.run_dir):  # what it holds already is part of what it needs
            need -= sum(f.stat().st_size for f in self.run_dir.rglob("*") if f.is_file())
        check_room(self.storage_path, need, f"this run ({trials} trials, {checkpoints} checkpoints at most)")

    def check_run_dir(self) -> None:
        named = self.args.name
        exists = (
            uri_exists(self.run_dir)
            if is_uri(self.run_dir)
            else (self.run_dir.is_dir() and any(self.run_dir.iterdir()))
        )
        if self.resume and not named:
            raise UserError("--resume needs --name of the run to continue")
        if self.resume and not exists:
            raise UserError(f"--resume: there is no run {self.run_dir} (check --name and --storage-path)")
        # (A comparison's directory holds its runs, not one: its own check says it starts afresh.)
        if self.resume and self.kind != "compare" and not file_exists(join(self.run_dir, TUNER_FILE)):
            raise UserError(
                f"--resume: {self.run_dir} holds no Ray Tune run ({TUNER_FILE} is missing): it cannot go on"
            )
        if not self.resume and exists:
            raise UserError(
                f"run {self.run_dir} already exists: pass --resume to continue it, or choose another --name"
            )


def default_name(kind: str) -> str:
    """``KIND-DATE-TIME-XXXX``: the random suffix keeps runs submitted in the same second to one
    cluster (and one storage path) apart."""
    return f"{kind}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_address(address: str) -> None:
    """A Ray head we can reach, or one line within seconds (Ray itself retries for minutes)."""
    match = ADDRESS.fullmatch(address)
    if not match:
        raise UserError(
            f"--address {address!r}: expected auto or HOST:PORT of a running Ray head (e.g. 10.0.0.5:6379)"
        )
    if address == "auto":
        return  # Ray reads the address `ray start` left on this machine, and fails at once without one
    host, port = match["host"].strip("[]"), int(match["port"])
    if not 0 < port < 65536:
        raise UserError(f"--address {address!r}: port {port} is not a TCP port (1-65535)")
    if re.fullmatch(r"[\d.]+", host) and (
        host.count(".") != 3 or any(int(p) > 255 for p in host.split(".") if p)
    ):
        raise UserError(f"--address {address!r}: {host} is not an IPv4 address")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise UserError(f"--address {address}: no Ray head answers there ({e.strerror or e})") from None


def check_batch(data: Dataset, batch_size: int) -> None:
    if len(data.y_train) < batch_size:
        raise UserError(
            f"data {data.source}: its training part has {len(data.y_train)} images, fewer than "
            f"train.batch_size={batch_size} (lower it with --set train.batch_size=N)"
        )


@contextmanager
def native_stderr_held() -> Iterator[None]:
    """TensorFlow's C++ start-up lines (absl, CUDA probes; TF 2.21 prints them whatever
    TF_CPP_MIN_LOG_LEVEL says) held back from stderr, where they would bury a one-line error;
    printed after all if something other than a UserError goes wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except UserError:
            raise
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def check_model(run: Run) -> None:
    """Build the model once for this data (the builder imports, returns a keras.Model with one logit per
    class), record a builder function's name in the config, count the weights, and try the optimizers
    on it with ``train.optimizer_args``."""
    # Keras loads here: only once checked
    from pbt_lab.training.model import build_model, builder_name, check_options_keep_shapes
    from pbt_lab.training.optimizers import check_optimizer_args

    model_cfg = run.cfg.model
    where, _, name = model_cfg.builder.rpartition(":")
    if where.endswith(".py"):  # workers run in their trial's directory: name the file absolutely
        model_cfg = replace(model_cfg, builder=f"{Path(where).expanduser().resolve()}:{name}")
        run.cfg = replace(run.cfg, model=model_cfg)
    if run.builder is not None:
        if model_cfg.builder not in (STUDY_CNN, builder_name(run.builder)):  # a replay records the name
            raise UserError(
                f"a builder function and model.builder={model_cfg.builder!r} were both given: give one"
            )
        model_cfg = replace(model_cfg, builder=builder_name(run.builder))
        run.cfg = replace(run.cfg, model=model_cfg)
    model = build_model(
        run.builder or model_cfg.builder,
        run.data.input_shape,
        run.data.num_classes,
        model_cfg.scale,
        model_cfg.options,
    )
    run.weights = model.count_params()
    space = getattr(getattr(run.cfg, "pbt", None), "search_space", None)
    searched = {h.key: h.values or h.bounds for h in space.params} if space else {}
    check_options_keep_shapes(run.builder or model_cfg.builder, run.data, model_cfg, model, searched)
    if run.cfg.train.optimizer_args:
        check_optimizer_args(run.cfg.optimizers, run.cfg.train.optimizer_args, model.trainable_variables)


def parse(
    kind: str,
    config_cls: type,
    doc: str,
    argv: list[str] | None = None,
    add_arguments: Callable | None = None,
    base_config: Callable | None = None,
    validate: Callable | None = None,
    call: Call | None = None,
) -> Run:
    """Parse the common flags; check config, storage, run directory, data, model and address; one
    line and exit 2 if anything is wrong, before anything is written (under the Python API's
    ``call``: UserError raised).

    ``add_arguments(parser)`` adds a command's own flags; ``base_config(args)`` returns a recorded
    config (a dict) that the YAML and ``--set`` then override; ``validate(run)`` raises UserError
    for what the command itself cannot run.
    """
    parser_cls = RaisingParser if call else OneLineParser
    parser = parser_cls(prog=f"python -m pbt_lab.{kind}", description=doc.splitlines()[0])
    parser.add_argument("--config", help="YAML file listing what differs from the defaults (see configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.target=0.96 (repeatable)",
    )
    parser.add_argument("--name", help=f"run name (default: {kind}-DATE-TIME-XXXX, unique per submission)")
    parser.add_argument(
        "--storage-path",
        help=f"where runs live: a path, or a URI such as s3://bucket/runs shared "
        f"by every node of a cluster (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})",
    )
    parser.add_argument("--address", help="connect to this running Ray cluster (auto or HOST:PORT)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run --name")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "--verbose", action="store_true", help="print Ray's own trial tables and every worker's log lines"
    )
    loudness.add_argument("--quiet", action="store_true", help="print the summary only")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(
            config_cls,
            args.config,
            args.set,
            base=base_config(args) if base_config else None,
            settings=call.settings if call else None,
        )
        storage = args.storage_path or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
        if not is_uri(storage):
            storage = str(Path(storage).expanduser().resolve())
        if args.name is not None and not re.fullmatch(r"[\w.-]+", args.name):
            raise UserError(
                f"--name {args.name!r}: use letters, digits, '_', '-' and '.' only (it names a directory)"
            )
        check_storage(storage)
        run = Run(
            kind,
            cfg,
            data=None,
            name=args.name or default_name(kind),
            storage_path=storage,
            address=args.address,
            resume=args.resume,
            parser=parser,
            args=args,
        )
        run.check_run_dir()
        if call:
            call.run = run
            run.builder = call.builder
        with native_stderr_held():  # Keras's data sets and the model check load TensorFlow
            run.data = load_dataset(cfg.data.source, cfg.data.num_classes)
            check_batch(run.data, cfg.train.batch_size)
            check_model(run)
        if validate:
            validate(run)
        if args.address is not None:
            check_address(args.address)
    except UserError as e:
        parser.error(str(e))
    return run


@contextmanager
def one_line_errors(run: Run) -> Iterator[None]:
    """What the cluster turns out not to provide (resources, a refused connection): one line, exit 2."""
    try:
        yield
    except UserError as e:
        run.parser.error(str(e))


def finish(
    run: Run,
    kind: str | None = None,
    *,
    stopped_as: str | None = None,
    extra: dict | None = None,
    describe: Callable[[dict], str] | None = None,
) -> int:
    """Every command's end: write the tables, summary and figures of a run of ``kind`` (the command's
    own by default), print the result (and ``describe(tables)``), and return the exit code: 1 if a
    trial failed, the restores failed the audit, or the run stopped before its end (its storage full:
    the last line says so)."""
    why = run.session.stopped
    stopped = f"STOPPED: {why}; free space, then --resume --name {run.name}" if why else None
    if stopped and not is_uri(run.run_dir):
        results.remove_cut_short_checkpoints(run.run_dir)  # the saves the full disk cut short
    try:
        tables = results.write_tables(
            run.run_dir,
            kind=kind or run.kind,
            config=run.config_dict(),
            data=run.data.identity(),
            session=asdict(run.session),
            stopped_as=stopped_as,
            extra=extra,
        )
    except (OSError, UserError) as e:
        if not stopped or (isinstance(e, OSError) and not is_storage_full(e)):
            raise
        print(f"{stopped} (no tables written: {str(e).splitlines()[0]})")
        return 1
    run.tables = tables
    print(results.console_summary(tables, run.run_dir))
    if describe:
        print(describe(tables))
    if stopped:
        print(stopped)
        return 1
    return results.exit_status(tables)
