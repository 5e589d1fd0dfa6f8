"""Shared fixtures: the bundled data once per session, the full MNIST file when it is beside the repo."""

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

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
