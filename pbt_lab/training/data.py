"""The data a run trains on: load, validate and split an image set; make the bundled MNIST subset.

    python -m pbt_lab.training.data make-subset ../shared/data/mnist.npz   # rebuilds pbt_lab/assets/

``data.source`` is one of (DESIGN §6): a Keras-layout ``.npz`` path (``x_train, y_train, x_test,
y_test``); ``mnist``, ``fashion_mnist`` or ``cifar10``, through Keras's downloaders and cache;
``bundled``, the small stratified MNIST subset shipped in the package (the offline default of the
quick configs and the tests); or null: ``$PBT_LAB_DATA``, then Keras's MNIST. Images are uint8
(scaled to [0, 1] on the device) or float32 (used as they are), ``N×H×W`` or ``N×H×W×C``; labels
are integers 0..K−1. Files load with ``allow_pickle=False``: a data file can never run code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbt_lab import UserError

BUNDLED = "bundled"
BUNDLED_PATH = Path(__file__).parents[1] / "assets" / "mnist_subset.npz"
KERAS_SETS = ("mnist", "fashion_mnist", "cifar10")  # keras.datasets.<name>.load_data()
ENV_VAR = "PBT_LAB_DATA"
KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_DTYPES = (np.uint8, np.float32)
# The study's split: the last 1/12 of the training images (5,000 of 60,000) validate.
VAL_FRACTION = 12
SUBSET_SEED = 0
SUBSET_TRAIN, SUBSET_TEST = 12_000, 2_000
# Keras's own MNIST file (keras.datasets.mnist): same origin and hash, so the cache is shared.
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
DOWNLOAD_TIMEOUT = 60.0  # seconds a download may stall before it counts as unreachable


@dataclass(frozen=True, eq=False)
class Dataset:
    """The three splits: images (N, H, W, C), uint8 or float32, and int32 labels 0..K−1 (N,); plus
    where they came from and a hash of their content."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    sha256: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape, (H, W, C): what a model builder is given."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def identity(self) -> dict:
        """What summary.json records so a run names the exact data it used."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "input_shape": list(self.input_shape),
            "dtype": str(self.x_train.dtype),
            "num_classes": self.num_classes,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
        }


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """What ``load_dataset`` reads: ``source``, else ``$PBT_LAB_DATA``, else Keras's MNIST."""
    if source:
        return str(source)
    return os.environ.get(ENV_VAR) or "mnist"


def load_dataset(source: str | os.PathLike | None = None, num_classes: int | None = None) -> Dataset:
    """Load, validate and split the image set ``source`` names (module doc); ``num_classes`` K (None:
    the largest label + 1). Anything wrong is one UserError line naming the source."""
    resolved = resolve_source(source)
    if resolved in KERAS_SETS:
        arrays, name = _keras_dataset(resolved), resolved
    else:
        path = BUNDLED_PATH if resolved == BUNDLED else Path(resolved).expanduser()
        arrays, name = read_npz(path), BUNDLED if resolved == BUNDLED else str(path)
    k = check_arrays(name, arrays, num_classes)
    x_train, x_test = (_with_channels(arrays[key]) for key in ("x_train", "x_test"))
    y_train, y_test = (arrays[key].reshape(-1).astype(np.int32) for key in ("y_train", "y_test"))
    split = len(x_train) - len(x_train) // VAL_FRACTION
    return Dataset(
        x_train=x_train[:split],
        y_train=y_train[:split],
        x_val=x_train[split:],
        y_val=y_train[split:],
        x_test=x_test,
        y_test=y_test,
        num_classes=k,
        source=name,
        sha256=content_sha256(x_train, y_train, x_test, y_test),
    )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four Keras-layout arrays of ``path``, or one clear line saying what is wrong."""
    fix = f"pass a Keras-layout .npz path, one of {', '.join(KERAS_SETS)}, or {BUNDLED}"
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise UserError(f"data file {path} lacks {', '.join(missing)}: {fix}")
            return {k: f[k] for k in KEYS}
    except UserError:
        raise
    except ValueError as e:  # numpy's refusal of pickled object arrays
        raise UserError(f"data file {path} holds pickled objects, which are never loaded: {fix}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"data file {path} is not a readable .npz ({e}): {fix}") from e


def check_arrays(name: str, a: dict[str, np.ndarray], num_classes: int | None = None) -> int:
    """The number of classes K of the four arrays, or one UserError line naming ``name`` and what is
    wrong: images uint8 or float32 of rank 3 or 4 and one shape, finite; labels integers 0..K−1, one
    per image; enough images to split off a validation part."""
    for part in ("train", "test"):
        x, y = a[f"x_{part}"], a[f"y_{part}"]
        if x.dtype not in IMAGE_DTYPES or x.ndim not in (3, 4):
            raise UserError(
                f"data {name}: x_{part} is {x.dtype}{list(x.shape)}, expected uint8 or float32 images "
                f"[N, H, W] or [N, H, W, C]"
            )
        if x.shape[1:] != a["x_train"].shape[1:] or x.dtype != a["x_train"].dtype:
            raise UserError(
                f"data {name}: x_test is {x.dtype}{list(x.shape)} but x_train is "
                f"{a['x_train'].dtype}{list(a['x_train'].shape)}: the images must match"
            )
        if y.reshape(-1).shape != (len(x),) or y.ndim > 2 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(
                f"data {name}: y_{part} is {y.dtype}{list(y.shape)}, expected integer labels [{len(x)}]"
            )
        if x.dtype == np.float32 and not np.isfinite(x).all():
            raise UserError(f"data {name}: x_{part} holds NaN or infinite values")
    labels = np.concatenate([a["y_train"].reshape(-1), a["y_test"].reshape(-1)])
    k = int(labels.max()) + 1 if num_classes is None and len(labels) else num_classes
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise UserError(f"data {name}: labels outside 0..{k - 1} ({labels.min()}..{labels.max()})")
    if k is None or k < 2:
        raise UserError(f"data {name}: {k} class(es); a classifier needs at least 2")
    if len(a["x_train"]) // VAL_FRACTION < 1 or len(a["x_test"]) == 0:
        raise UserError(
            f"data {name} has too few images to split ({len(a['x_train'])} train, {len(a['x_test'])} "
            f"test): the last 1/{VAL_FRACTION} of x_train validates, so it needs ≥ {VAL_FRACTION}"
        )
    return k


def content_sha256(*arrays: np.ndarray) -> str:
    """A hash of the arrays' dtypes, shapes and bytes: the same data gives the same hash from any source."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


@contextmanager
def _download_timeout():
    """Keras downloads with no timeout: a network that drops packets would hang the run's start."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _keras_dataset(name: str) -> dict[str, np.ndarray]:
    """Keras's ``name`` data set from its cache, downloading it if needed."""
    import keras  # heavy import: only on this route

    try:
        with _download_timeout():
            if name == "mnist":  # the file itself, checked against Keras's published hash
                path = keras.utils.get_file("mnist.npz", origin=KERAS_ORIGIN, file_hash=KERAS_SHA256)
                return read_npz(Path(path))
            (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except UserError:
        raise
    except Exception as e:  # Keras wraps network failures in several types
        raise UserError(
            f"{name} is not in Keras's cache and could not be downloaded ({type(e).__name__}): "
            f"run once where the machine can reach the internet, pass a Keras-layout .npz path, "
            f"or use {BUNDLED}"
        ) from e
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def stratified_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices into ``labels`` with each class in proportion (largest remainder), sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / counts.sum()
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota)[: size - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def make_subset(full: dict[str, np.ndarray], seed: int = SUBSET_SEED) -> dict[str, np.ndarray]:
    """The bundled subset: stratified draws from each split of the full set, keeping the split rule.

    Train and validation parts are drawn separately from the full set's train and validation
    images, so the subset's last 1/12 is still drawn from the full set's validation images.
    """
    rng = np.random.default_rng(seed)
    n_val_full = len(full["x_train"]) // VAL_FRACTION
    split_full = len(full["x_train"]) - n_val_full
    n_val = SUBSET_TRAIN // VAL_FRACTION
    train_idx = stratified_indices(full["y_train"][:split_full], SUBSET_TRAIN - n_val, rng)
    val_idx = split_full + stratified_indices(full["y_train"][split_full:], n_val, rng)
    test_idx = stratified_indices(full["y_test"], SUBSET_TEST, rng)
    idx = np.concatenate([train_idx, val_idx])
    return {
        "x_train": full["x_train"][idx],
        "y_train": full["y_train"][idx],
        "x_test": full["x_test"][test_idx],
        "y_test": full["y_test"][test_idx],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pbt_lab.training.data", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-subset", help="rebuild the bundled subset from the full mnist.npz")
    make.add_argument("full", type=Path, help="the full Keras-layout mnist.npz")
    make.add_argument("--out", type=Path, default=BUNDLED_PATH)
    args = parser.parse_args(argv)
    try:
        full = read_npz(args.full)
        check_arrays(str(args.full), full)
        subset = make_subset(full)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **subset)
    print(f"wrote {args.out}: {len(subset['y_train'])} train+val, {len(subset['y_test'])} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
