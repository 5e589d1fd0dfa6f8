"""load_dataset: sources in order, the study's splits, any image set in Keras layout, validation that
names the source, no pickle."""

import numpy as np
import pytest

from pbt_lab import UserError
from pbt_lab.training.data import (
    BUNDLED_PATH,
    ENV_VAR,
    check_arrays,
    content_sha256,
    load_dataset,
    make_subset,
    read_npz,
)


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
    assert bundled.x_train.dtype == np.uint8 and bundled.input_shape == (28, 28, 1)
    assert bundled.num_classes == 10 and bundled.y_train.dtype == np.int32
    for labels in (bundled.y_train, bundled.y_val, bundled.y_test):
        share = np.bincount(labels, minlength=10) / len(labels)
        assert share.min() > 0.08 and share.max() < 0.12  # stratified: MNIST's classes are 9-11 %
    assert bundled.identity()["source"] == "bundled"


def test_full_file_splits_55k_5k_10k(full_mnist_path):
    data = load_dataset(full_mnist_path)
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
    assert load_dataset().source == str(env_file)
    assert len(load_dataset(explicit).y_test) == 30
    assert (len(load_dataset().y_train), len(load_dataset().y_val)) == (110, 10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"x_train": np.zeros((120, 28), np.uint8)},
            r"x_train is uint8\[120, 28\], expected uint8 or float32",
        ),
        ({"x_train": np.zeros((120, 28, 28), np.float64)}, "x_train is float64"),
        ({"x_train": np.zeros((120, 27, 28), np.uint8)}, "the images must match"),
        ({"x_test": np.zeros((20, 28, 28), np.float32)}, "the images must match"),
        ({"y_train": np.full(120, -1)}, r"labels outside 0..9 \(-1..9\)"),
        ({"y_train": np.arange(120) % 10 + 0.0}, "expected integer labels"),
        ({"y_test": np.zeros(19, int)}, r"y_test is int64\[19\], expected integer labels \[20\]"),
        ({"y_test": None}, "lacks y_test"),
        ({"y_train": np.array([object()] * 120)}, "pickled objects"),
        ({"y_train": np.zeros(120, int), "y_test": np.zeros(20, int)}, "a classifier needs at least 2"),
        ({"x_train": np.zeros((11, 28, 28), np.uint8), "y_train": np.arange(11) % 10}, "too few images"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, overrides, message):
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"not a readable \.npz"):
        load_dataset(corrupt)


def test_any_image_set_in_keras_layout(tmp_path):
    """Colour float32 images and 5 classes with labels as a column (CIFAR's layout) load as they are."""
    rng = np.random.default_rng(1)
    x = rng.random((60, 32, 32, 3), dtype=np.float32)
    path = write_npz(
        tmp_path / "colour.npz",
        x_train=x,
        y_train=(np.arange(60) % 5)[:, None],
        x_test=x[:10],
        y_test=np.arange(10) % 5,
    )
    data = load_dataset(path)
    assert data.input_shape == (32, 32, 3) and data.num_classes == 5
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (55, 5, 10)
    assert data.x_train.dtype == np.float32 and data.y_train.shape == (55,)
    identity = data.identity()
    assert identity["input_shape"] == [32, 32, 3] and identity["dtype"] == "float32"
    assert identity["num_classes"] == 5 and len(identity["sha256"]) == 64


def test_nan_images_and_classes_beyond_the_configured_count_fail(tmp_path):
    x = np.zeros((120, 8, 8), np.float32)
    x[3, 2, 2] = np.nan
    with pytest.raises(UserError, match="x_train holds NaN"):
        load_dataset(write_npz(tmp_path / "nan.npz", x_train=x, x_test=np.zeros((20, 8, 8), np.float32)))
    with pytest.raises(UserError, match=r"labels outside 0..4 \(0..9\)"):
        load_dataset(write_npz(tmp_path / "ten.npz"), num_classes=5)
    assert load_dataset(write_npz(tmp_path / "ok.npz"), num_classes=12).num_classes == 12


def test_content_hash_is_of_the_content_and_sees_one_pixel(tmp_path, bundled):
    """The same arrays hash alike from any file; one changed pixel or a changed shape does not."""
    arrays = read_npz(BUNDLED_PATH)
    copy = tmp_path / "copy.npz"
    np.savez_compressed(copy, **arrays)
    assert load_dataset(copy).sha256 == bundled.sha256
    arrays["x_test"] = arrays["x_test"].copy()
    arrays["x_test"][0, 0, 0] ^= 1
    np.savez(tmp_path / "changed.npz", **arrays)
    assert load_dataset(tmp_path / "changed.npz").sha256 != bundled.sha256
    flat = np.zeros(12, np.uint8)
    assert content_sha256(flat) != content_sha256(flat.reshape(3, 4))


def test_check_arrays_counts_the_classes():
    arrays = {
        "x_train": np.zeros((24, 4, 4), np.uint8),
        "y_train": np.arange(24) % 3,
        "x_test": np.zeros((3, 4, 4), np.uint8),
        "y_test": np.arange(3),
    }
    assert check_arrays("made", arrays) == 3
