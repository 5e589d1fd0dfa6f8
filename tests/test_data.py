"""load_mnist: sources in order, the study's splits, validation that names the file, no pickle."""

import numpy as np
import pytest

from pbt_lab import UserError
from pbt_lab.training.data import BUNDLED_PATH, ENV_VAR, load_mnist, make_subset, read_npz


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
        "y_train": np.arange(120) % 10,
        "x_test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_test": np.arange(20) % 10,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_bundled_subset_has_the_study_split_and_every_class(bundled):
    assert (len(bundled.y_train), len(bundled.y_val), len(bundled.y_test)) == (11_000, 1_000, 2_000)
    assert bundled.x_train.dtype == np.uint8 and bundled.x_train.shape[1:] == (28, 28)
    for labels in (bundled.y_train, bundled.y_val, bundled.y_test):
        share = np.bincount(labels, minlength=10) / len(labels)
        assert share.min() > 0.08 and share.max() < 0.12  # stratified: MNIST's classes are 9-11 %
    assert bundled.identity()["source"] == "bundled"


def test_full_file_splits_55k_5k_10k(full_mnist_path):
    data = load_mnist(full_mnist_path)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (55_000, 5_000, 10_000)
    assert len(data.identity()["sha256"]) == 64


def test_bundled_subset_is_reproducible_from_the_full_file(full_mnist_path):
    remade = make_subset(read_npz(full_mnist_path))
    with np.load(BUNDLED_PATH, allow_pickle=False) as shipped:
        for key, array in remade.items():
            np.testing.assert_array_equal(array, shipped[key])


def test_sources_in_order_explicit_then_env(tmp_path, monkeypatch):
    env_file = write_npz(tmp_path / "env.npz")
    explicit = write_npz(
        tmp_path / "explicit.npz", x_test=np.zeros((30, 28, 28), np.uint8), y_test=np.zeros(30, int)
    )
    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert load_mnist().source == str(env_file)
    assert len(load_mnist(explicit).y_test) == 30
    assert (len(load_mnist().y_train), len(load_mnist().y_val)) == (110, 10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"x_train": np.zeros((120, 27, 28), np.uint8)}, r"x_train is uint8\[120, 27, 28\]"),
        ({"x_train": np.zeros((120, 28, 28), np.float32)}, "expected uint8"),
        ({"y_train": np.full(120, 10)}, "labels outside 0..9"),
        ({"y_test": np.zeros(19, int)}, "y_test is"),
        ({"y_test": None}, "lacks y_test"),
        ({"y_train": np.array([object()] * 120)}, "pickled objects"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, overrides, message):
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(UserError, match=message) as err:
        load_mnist(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_mnist(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"not a readable \.npz"):
        load_mnist(corrupt)
