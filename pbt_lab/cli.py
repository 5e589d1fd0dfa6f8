"""The commands' shared front and back end: the common flags, the config (defaults, then YAML, then
``--set``), everything checked before Ray starts; and the one ``finish()`` that writes the tables,
prints the result and chooses the exit code. No Ray here.

    run = cli.parse("grid", GridExperiment, __doc__, argv)      # or one line on stderr, exit 2
    with cli.one_line_errors(run):
        fit(run, param_space)                                   # pbt_lab.tuning.launch
    return cli.finish(run, "grid")

Common flags: ``--config PATH  --set key=value …  --name NAME  --storage-path PATH|URI
--address auto|HOST:PORT  --resume``. On a cluster (README, "Run on a cluster") the storage path
is shared by every node (an ``s3://`` URI, or the same NFS path everywhere: Ray ≥ 2.7 no longer
syncs trial dirs to the head), and ``--address`` connects the driver to the running cluster.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import secrets
import socket
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from datetime import datetime
from pathlib import Path

import yaml

from pbt_lab import UserError, results
from pbt_lab.config import coerce, require
from pbt_lab.storage import check_storage, is_uri, uri_exists
from pbt_lab.training.data import Mnist, load_mnist

STORAGE_ENV = "PBT_LAB_STORAGE"
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default
ADDRESS = re.compile(
    r"auto|(?P<host>[\w.-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)"
)  # what ray.init(address=…) takes
CONNECT_TIMEOUT = 3.0  # seconds to wait for a Ray head to answer before saying so


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_config(
    cls: type, path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
):
    """``cls`` built from its defaults, then ``base`` (e.g. a run's recorded config), then the YAML
    file at ``path``, then ``key=value`` overrides."""
    values: dict = _merge(base or {}, read_yaml(path) if path else {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        require(bool(sep and key), f"--set expects key=value, got {item!r}")
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"--set {key}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[leaf] = raw
    return build(cls, values)


def _merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for key, value in high.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is written twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise UserError(f"config file {path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from e
    require(
        isinstance(values, dict),
        f"config file {path} must hold a mapping of sections, got {type(values).__name__}",
    )
    return values


def build(cls: type, values: dict, prefix: str = ""):
    """``cls(**values)`` with nested sections built, types checked and unknown keys named."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if is_dataclass(kind):
            require(isinstance(value, dict), f"{prefix}{name} must be a section of keys, got {value!r}")
            kwargs[name] = build(kind, {**_experiment_defaults(cls, name), **value}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _experiment_defaults(cls: type, name: str) -> dict:
    """Where an experiment's default section differs from the section's class defaults (the width
    study's 96 % target): those values, so a YAML or --set section that omits them keeps them."""
    f = next(f for f in fields(cls) if f.name == name)
    if f.default_factory is MISSING:
        return {}
    default = f.default_factory()
    plain = type(default)()
    return {
        k.name: getattr(default, k.name)
        for k in fields(default)
        if getattr(default, k.name) != getattr(plain, k.name)
    }


# --- a run, validated before anything starts ------------------------------------------------


@dataclass
class Run:
    """A validated command: its config and data, and where its run directory is."""

    kind: str
    cfg: object
    data: Mnist | None
    name: str
    storage_path: str
    address: str | None
    resume: bool
    parser: OneLineParser
    args: argparse.Namespace
    wall_seconds: float = 0.0

    @property
    def run_dir(self) -> Path | str:
        """``<storage_path>/<name>``: a Path, or a URI string (Path would fold ``s3://`` into ``s3:/``)."""
        if is_uri(self.storage_path):
            return f"{self.storage_path.rstrip('/')}/{self.name}"
        return Path(self.storage_path) / self.name

    def config_dict(self) -> dict:
        return asdict(self.cfg)

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


def parse(
    kind: str,
    config_cls: type,
    doc: str,
    argv: list[str] | None = None,
    add_arguments: Callable | None = None,
    base_config: Callable | None = None,
    validate: Callable | None = None,
) -> Run:
    """Parse the common flags; check config, storage, run directory, data and address; one line and
    exit 2 if anything is wrong, before anything is written.

    ``add_arguments(parser)`` adds a command's own flags; ``base_config(args)`` returns a recorded
    config (a dict) that the YAML and ``--set`` then override; ``validate(run)`` raises UserError
    for what the command itself cannot run.
    """
    parser = OneLineParser(prog=f"python -m pbt_lab.{kind}", description=doc.splitlines()[0])
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
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_cls, args.config, args.set, base=base_config(args) if base_config else None)
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
        run.data = load_mnist(cfg.data.source)
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
    trial failed or an exploit failed the audit."""
    tables = results.write_tables(
        run.run_dir,
        kind=kind or run.kind,
        config=run.config_dict(),
        data=run.data.identity(),
        wall_seconds=run.wall_seconds,
        stopped_as=stopped_as,
        extra=extra,
    )
    print(results.console_summary(tables, run.run_dir))
    if describe:
        print(describe(tables))
    return results.exit_status(tables)
