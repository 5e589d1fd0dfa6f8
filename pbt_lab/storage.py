"""Where runs live: a local path, or a URI (s3://, gs://, file://) read through pyarrow.fs as Ray's
own storage is. No Ray, no TensorFlow: the launcher checks a storage path with it before anything
runs, and the tables are read and written through it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pbt_lab import UserError

LOCAL_URI = "file://"  # a URI of this machine's (or a shared mount's) files: checked as a path


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, no credentials, bucket not found…
        raise UserError(f"storage {uri}: {str(e).splitlines()[0]}") from None


def uri_exists(uri: str) -> bool:
    """Whether anything is stored under ``uri`` (a run directory behind a URI)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    try:
        return any(filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)))
    except OSError as e:
        raise UserError(f"storage {uri}: {str(e).splitlines()[0]}") from None


def file_exists(path: str | Path) -> bool:
    """Whether a file is stored at ``path``, a local path or a URI."""
    if not is_uri(path):
        return Path(path).is_file()
    from pyarrow import fs

    filesystem, where = _filesystem(str(path))
    try:
        return filesystem.get_file_info(where).type == fs.FileType.File
    except OSError as e:
        raise UserError(f"storage {path}: {str(e).splitlines()[0]}") from None


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
        return  # listing it (the run-directory check) names a bad scheme, bucket or credentials
    existing = _nearest_existing(local)
    if not existing.is_dir():
        raise UserError(f"{flag} {storage}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise UserError(f"{flag} {storage}: cannot write in {existing} ({e.strerror or e})") from None


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
