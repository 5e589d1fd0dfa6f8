"""Shared fixtures: the bundled data once per session, the full MNIST file when it is beside the repo,
one local Ray, and the quick grid and quick PBT runs (each run once per session, read by several modules)."""

from pathlib import Path

import pytest

from pbt_lab.data import load_mnist

FULL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture(scope="session")
def bundled():
    return load_mnist("bundled")


@pytest.fixture(scope="session")
def full_mnist_path():
    if not FULL_MNIST.is_file():
        pytest.skip(f"full MNIST not found at {FULL_MNIST}")
    return FULL_MNIST


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session: 2 CPUs and one fake GPU."""
    import ray

    # "local": never join a cluster that `ray start` left running on this machine
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="session")
def quick_grid(ray_session, tmp_path_factory):
    """The quick grid, run once for the session's tests, half a fake GPU per trial."""
    from pbt_lab import grid

    storage = tmp_path_factory.mktemp("runs")
    assert grid.main(["--config", str(CONFIGS / "grid-quick.yaml"), "--storage-path", str(storage), "--name", "quick",
                      "--set", "resources.gpu=0.5"]) == 0
    return storage / "quick"


@pytest.fixture(scope="session")
def quick_pbt(ray_session, tmp_path_factory):
    """The quick PBT population, run once for the session's tests."""
    from pbt_lab import pbt

    storage = tmp_path_factory.mktemp("runs")
    assert pbt.main(["--config", str(CONFIGS / "pbt-quick.yaml"), "--storage-path", str(storage), "--name", "quick",
                     "--set", "resources.gpu=0.5", "--set", "run.keep_checkpoints=null"]) == 0
    return storage / "quick"


@pytest.fixture(scope="session")
def quick_scaling(ray_session, tmp_path_factory):
    """The quick width study (Adam at 2 rates × 3 widths of the quarter-width CNN), run once per session."""
    from pbt_lab import scaling

    storage = tmp_path_factory.mktemp("runs")
    assert scaling.main(["--config", str(CONFIGS / "scaling-quick.yaml"), "--storage-path", str(storage),
                         "--name", "scaling-quick"]) == 0
    return storage / "scaling-quick"
