"""Where runs live: a local path, or a URI (s3://, gs://, file://) read through pyarrow.fs as Ray's
own storage is. No Ray, no TensorFlow: the launcher checks a storage path with it before anything
runs (its room, what a run will write), and the tables are read and written through it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pbt_lab import UserError

# What a run writes beside its checkpoints, measured on a quick PBT run (5 members, 12 reports each):
# per report, Ray's result.json, progress.csv and event file (5.8 kB), its history row and the
# scheduler's decision (1.7 kB); per trial, its part of Ray's experiment snapshot and its params
# (55 kB); per run, the figures, summary and Ray's own files (0.6 MB). Rounded up.
REPORT_BYTES = 10_000
TRIAL_BYTES = 80_000
RUN_BYTES = 2_000_000

LOCAL_URI = "file://"  # a URI of this machine's (or a shared mount's) files: checked as a path


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join(location: str | Path, *parts: str) -> str | Path:
    """``location/part/…``: a path, or a URI with the parts joined to its path, before its query string
    (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``: Arrow's options stay last)."""
    if not is_uri(location):
        return Path(location).joinpath(*parts)
    base, mark, query = str(location).partition("?")
    return f"{base.rstrip('/')}/{'/'.join(parts)}{mark}{query}"


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, no credentials, bucket not found…
        raise UserError(f"storage {uri}: {_first_line(e)}") from None


def uri_exists(uri: str) -> bool:
    """Whether anything is stored under ``uri`` (a run directory behind a URI)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    try:
        return any(filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)))
    except OSError as e:
        raise UserError(f"storage {uri}: {_first_line(e)}") from None


def file_exists(path: str | Path) -> bool:
    """Whether a file is stored at ``path``, a local path or a URI."""
    if not is_uri(path):
        return Path(path).is_file()
    from pyarrow import fs

    filesystem, where = _filesystem(str(path))
    try:
        return filesystem.get_file_info(where).type == fs.FileType.File
    except OSError as e:
        raise UserError(f"storage {path}: {_first_line(e)}") from None


def _local(storage: str) -> Path | None:
    """The path a local storage path or ``file://`` URI names; None behind any other URI."""
    local = storage.removeprefix(LOCAL_URI)
    return None if is_uri(local) else Path(local)


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def check_storage(storage: str, flag: str = "--storage-path") -> None:
    """A storage path the run can write, tried without leaving anything behind (``flag`` names it)."""
    local = _local(storage)
    if local is None:
        _try_writing(storage, flag)
        return
    existing = _nearest_existing(local)
    if not existing.is_dir():
        raise UserError(f"{flag} {storage}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise UserError(f"{flag} {storage}: cannot write in {existing} ({e.strerror or e})") from None


PROBE_SECONDS = 30  # an object store that has not answered by then will not serve a run either


def _try_writing(uri: str, flag: str) -> None:
    """Write and delete an empty object under ``uri``: a bucket that does not exist, credentials the
    store refuses, an endpoint nothing listens on or an unknown scheme fail here, in one line, before
    Ray starts (listing alone passes a missing bucket). Bounded: an endpoint that never answers too."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            filesystem, root = _filesystem(uri)
            probe = f"{root.rstrip('/')}/.pbt_lab-probe-{uuid.uuid4().hex[:8]}"
            with filesystem.open_output_stream(probe):
                pass
            filesystem.delete_file(probe)
            outcome.append(None)
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=attempt, daemon=True)  # a store that hangs must not hold the exit
    worker.start()
    worker.join(PROBE_SECONDS)
    if not outcome:
        raise UserError(f"{flag} {uri}: no answer from the storage in {PROBE_SECONDS} s")
    if isinstance(outcome[0], UserError):
        raise UserError(f"{flag} {str(outcome[0]).removeprefix('storage ')}") from None
    if outcome[0] is not None:
        raise UserError(f"{flag} {uri}: cannot write there ({_first_line(outcome[0])})") from None


def _first_line(error: BaseException) -> str:
    """An Arrow error's first line, without the AWS SDK's request details after it."""
    return str(error).strip().splitlines()[0]


def run_bytes(trials: int, reports_per_trial: int, checkpoints: int, checkpoint_bytes: int) -> int:
    """What a run of ``trials`` will hold at most: ``checkpoints`` checkpoints of ``checkpoint_bytes``
    at once, and Ray's files and the lab's tables for its reports."""
    return (
        checkpoints * checkpoint_bytes + trials * (TRIAL_BYTES + reports_per_trial * REPORT_BYTES) + RUN_BYTES
    )


def reserve_bytes(slots: int, checkpoint_bytes: int) -> int:
    """What a run keeps free while it runs, to stop cleanly (``StopWhenStorageFull``): a turn's
    checkpoints in flight on every slot (a save and a pause's save), Ray's last snapshot and the tables."""
    return 2 * slots * checkpoint_bytes + RUN_BYTES


def check_room(storage: str, need: int, what: str) -> None:
    """One line if the storage has less free space than ``need`` bytes (``what`` says what needs it)."""
    free = free_bytes(storage)
    if free is not None and need > free:
        raise UserError(f"{what} needs about {_size(need)} and {storage} has {_size(free)} free")


def _size(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def is_storage_full(error: BaseException) -> bool:
    """An error that says the disk is full (pyarrow's OSErrors carry the text, not always the errno)."""
    return isinstance(error, OSError) and (
        error.errno == errno.ENOSPC or "No space left on device" in str(error)
    )


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` beside ``path``, then rename it into place: a full disk or a crash
    mid-write leaves the file as it was, never cut short."""
    temporary = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def free_bytes(storage: str) -> int | None:
    """Free space where runs are stored (None behind a URI: object stores do not say)."""
    local = _local(storage)
    return None if local is None else shutil.disk_usage(_nearest_existing(local)).free


@contextmanager
def staged(uri: str, wanted, upload: tuple[str, ...] = ()) -> Iterator[tuple[Path, dict[str, int]]]:
    """A run directory behind a URI as a local one: the files ``wanted(relative_path)`` picks come
    down (checkpoints and event files stay where they are); the ``upload`` names go back up.
    Yields (local directory, {relative path: bytes} of everything stored under the URI)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
    files = [f for f in filesystem.get_file_info(selector) if f.type == fs.FileType.File]
    with tempfile.TemporaryDirectory(prefix="pbt_lab-") as tmp:
        local = Path(tmp)
        sizes = {}
        for f in files:
            relative = f.path[len(root) :].lstrip("/")
            sizes[relative] = f.size
            if wanted(relative):
                (local / relative).parent.mkdir(parents=True, exist_ok=True)
                fs.copy_files(f.path, str(local / relative), source_filesystem=filesystem)
        yield local, sizes
        for name in upload:
            if (local / name).is_dir():
                filesystem.create_dir(
                    f"{root}/{name}"
                )  # local and NFS targets need it; object stores ignore it
            if (local / name).exists():
                fs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=filesystem)
