"""MNIST for the lab: load, validate and split it; make the bundled offline subset.

    python -m pbt_lab.training.data make-subset ../shared/data/mnist.npz   # rebuilds pbt_lab/assets/

Sources, in this order (DESIGN §6): an explicit ``.npz`` path, ``$PBT_LAB_DATA``, Keras's cache
(downloaded by Keras when online). ``"bundled"`` is the small stratified subset shipped in the
package, the offline default of the quick configs and the tests. Files load with
``allow_pickle=False``: a data file can never run code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbt_lab import UserError

BUNDLED = "bundled"
BUNDLED_PATH = Path(__file__).parents[1] / "assets" / "mnist_subset.npz"
ENV_VAR = "PBT_LAB_DATA"
KEYS = ("x_train", "y_train", "x_test", "y_test")
# The study's split: the last 1/12 of the training images (5,000 of 60,000) validate.
VAL_FRACTION = 12
SUBSET_SEED = 0
SUBSET_TRAIN, SUBSET_TEST = 12_000, 2_000
# Keras's own MNIST file (keras.datasets.mnist): same origin and hash, so the cache is shared.
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"


@dataclass(frozen=True, eq=False)
class Mnist:
    """The three splits as uint8 images (N, 28, 28) and uint8 labels (N,), plus where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    sha256: str

    def identity(self) -> dict:
        """What summary.json records so a run names the exact data it used."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
        }


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """The path (or ``"bundled"``) that ``load_mnist`` reads, following DESIGN §6's order."""
    if source:
        return str(source)
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    return _keras_cached_mnist()


def load_mnist(source: str | os.PathLike | None = None) -> Mnist:
    """Load, validate and split MNIST from ``source`` (a .npz path, ``"bundled"``, or None)."""
    resolved = resolve_source(source)
    path = BUNDLED_PATH if resolved == BUNDLED else Path(resolved).expanduser()
    arrays = read_npz(path)
    n_val = len(arrays["x_train"]) // VAL_FRACTION
    split = len(arrays["x_train"]) - n_val
    return Mnist(
        x_train=arrays["x_train"][:split],
        y_train=arrays["y_train"][:split],
        x_val=arrays["x_train"][split:],
        y_val=arrays["y_train"][split:],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        source=BUNDLED if resolved == BUNDLED else str(path),
        sha256=_sha256(path),
    )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read the four Keras-layout arrays from ``path``, or raise one clear line saying what is wrong."""
    fix = f"pass --data PATH to a Keras-layout mnist.npz, set ${ENV_VAR}, or use --data {BUNDLED}"
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise UserError(f"data file {path} lacks {', '.join(missing)}: {fix}")
            arrays = {k: f[k] for k in KEYS}
    except UserError:
        raise
    except ValueError as e:  # numpy's refusal of pickled object arrays
        raise UserError(f"data file {path} holds pickled objects, which are never loaded: {fix}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"data file {path} is not a readable .npz ({e}): {fix}") from e
    _validate(path, arrays, fix)
    return arrays


def _validate(path: Path, a: dict[str, np.ndarray], fix: str) -> None:
    for part in ("train", "test"):
        x, y = a[f"x_{part}"], a[f"y_{part}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise UserError(
                f"data file {path}: x_{part} is {x.dtype}{list(x.shape)}, expected uint8[N, 28, 28]: {fix}"
            )
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(
                f"data file {path}: y_{part} is {y.dtype}{list(y.shape)}, expected integers[{len(x)}]: {fix}"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise UserError(f"data file {path}: y_{part} has labels outside 0..9: {fix}")
    if len(a["x_train"]) < VAL_FRACTION or len(a["x_test"]) == 0:
        raise UserError(f"data file {path} has too few images to split: {fix}")


def _keras_cached_mnist() -> str:
    """Keras's cached mnist.npz, downloading it if needed (the same file keras.datasets.mnist uses)."""
    from keras.utils import get_file  # heavy import: only on this route

    try:
        return get_file("mnist.npz", origin=KERAS_ORIGIN, file_hash=KERAS_SHA256)
    except Exception as e:  # Keras wraps network failures in several types
        raise UserError(
            f"MNIST is not in Keras's cache and could not be downloaded ({type(e).__name__}): "
            f"pass --data PATH to an mnist.npz, set ${ENV_VAR}, or use --data {BUNDLED}"
        ) from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        subset = make_subset(read_npz(args.full))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **subset)
    print(f"wrote {args.out}: {len(subset['y_train'])} train+val, {len(subset['y_test'])} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
