"""A user's own network on a user's own data: an MLP on synthetic 32×32×3 images of 5 classes, through
the grid and PBT from the command line (its module beside the user, as they would run it) and from the
Python API (its builder a function); and every bad model and data set refused in one line, before
anything is written."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pbt_lab
from pbt_lab import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES, SIDE, HIDDEN = 5, 32, 32

MODELS = textwrap.dedent(
    f"""
    import keras
    from keras import layers


    def mlp(input_shape, num_classes, scale=1.0):
        return keras.Sequential(
            [
                keras.Input(input_shape),
                layers.Flatten(),
                layers.Dense(max(1, round({HIDDEN} * scale)), activation="relu"),
                layers.Dense(num_classes),
            ]
        )


    def three_logits(input_shape, num_classes, scale=1.0):
        return mlp(input_shape, 3, scale)


    def not_a_model(input_shape, num_classes, scale=1.0):
        return "a model"


    def fails(input_shape, num_classes, scale=1.0):
        raise RuntimeError("no GPU in the notebook")


    def for_mnist(input_shape, num_classes, scale=1.0):
        return keras.Sequential([keras.Input((28, 28, 1)), layers.Flatten(), layers.Dense(num_classes)])
    """
)


def mlp_weights(hidden: int = HIDDEN) -> int:
    """The MLP's parameter count, by hand: flatten → dense hidden → dense 5."""
    return SIDE * SIDE * 3 * hidden + hidden + hidden * CLASSES + CLASSES


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class a fixed random picture under heavy noise: learnable, not at once."""
    templates = np.random.default_rng(0).integers(0, 256, (CLASSES, SIDE, SIDE, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = templates[y] * 0.2 + rng.integers(0, 205, (n, SIDE, SIDE, 3))
    return x.astype(np.uint8), y


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's directory: my_models.py and images.npz (Keras layout)."""
    home = tmp_path_factory.mktemp("user")
    (home / "my_models.py").write_text(MODELS)
    (x_train, y_train), (x_test, y_test) = synthetic_images(1200, 1), synthetic_images(300, 2)
    np.savez(home / "images.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return home


OWN = ("--set", "model.builder=my_models:mlp", "--set", "data.source=images.npz")
QUICK = ("--set", "train.target=0.9", "--set", "model.scale=1")


def cli(command: str, project: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pbt_lab.{command}", "--storage-path", str(project / "runs"), *argv],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def check_own_run(run_dir: Path, kind: str) -> dict:
    """What every run of the MLP on the synthetic images must show."""
    import pandas as pd

    summary = json.loads((run_dir / "summary.json").read_text())
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert summary["kind"] == kind
    assert summary["data"]["input_shape"] == [SIDE, SIDE, 3] and summary["data"]["num_classes"] == CLASSES
    assert summary["data"]["source"].endswith("images.npz") and len(summary["data"]["sha256"]) == 64
    assert summary["best"]["builder"].endswith("mlp") and summary["best"]["weights"] == mlp_weights()
    assert (trials["weights"] == mlp_weights()).all() and trials["builder"].str.endswith("mlp").all()
    assert summary["best"]["test_acc"] > 1 / CLASSES + 0.2  # well above chance on the held-out split
    assert list((run_dir / "figures").glob("*.png"))
    return summary


def test_own_model_grid_from_the_command_line(project):
    done = cli(
        "grid",
        project,
        "--config",
        str(CONFIGS / "grid-quick.yaml"),
        *OWN,
        *QUICK,
        "--set",
        "grid.optimizers=[adam, gd]",
        "--set",
        "grid.lrs=[1.0e-3, 1.0e-1]",
        "--name",
        "grid",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = check_own_run(project / "runs" / "grid", "grid")
    assert summary["config"]["model"]["builder"] == "my_models:mlp"


def test_own_model_pbt_from_the_command_line_with_its_file_path(project):
    done = cli(
        "pbt",
        project,
        "--config",
        str(CONFIGS / "pbt-quick.yaml"),
        *OWN,
        *QUICK,
        "--set",
        f"model.builder={project / 'my_models.py'}:mlp",
        "--set",
        "train.max_steps=300",
        "--name",
        "pbt",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = check_own_run(project / "runs" / "pbt", "pbt")
    assert (
        summary["exploits"]["exploits"] > 0
        and summary["exploits"]["exploits_verified"] == (summary["exploits"]["exploits"])
    )


# --- the Python API: the builder as a function, as in a notebook -----------------------------------


def notebook_mlp():
    """A builder defined where it is used (a notebook's cell): Ray ships it by value."""
    import keras
    from keras import layers

    def mlp(input_shape, num_classes, scale=1.0):
        return keras.Sequential(
            [
                keras.Input(input_shape),
                layers.Flatten(),
                layers.Dense(max(1, round(HIDDEN * scale)), activation="relu"),
                layers.Dense(num_classes),
            ]
        )

    return mlp


def test_own_model_from_python_grid_pbt_and_replay(project, ray_session):
    builder = notebook_mlp()
    own = {"data": {"source": str(project / "images.npz")}, "train": {"target": 0.9}, "model": {"scale": 1}}
    grid = pbt_lab.run_grid(
        str(CONFIGS / "grid-quick.yaml"),
        builder=builder,
        storage_path=project / "api",
        name="grid",
        grid={"optimizers": ["adam"], "lrs": [1e-3, 1e-2]},
        **own,
    )
    assert grid.ok and len(grid.trials) == 2 and grid.lineage is None
    check_own_run(Path(grid.run_dir), "grid")
    assert grid.summary["config"]["model"]["builder"].endswith("notebook_mlp.<locals>.mlp")

    pbt = pbt_lab.run_pbt(
        str(CONFIGS / "pbt-quick.yaml"),
        builder=builder,
        storage_path=project / "api",
        name="pbt",
        pbt={"population": 4},
        resources={"cpu": 2},  # one member at a time: its lineage, and so its winner, a function of the seed
        **{**own, "train": {"target": 0.9, "max_steps": 200}},
    )
    assert pbt.ok and len(pbt.trials) == 4 and len(pbt.lineage) == pbt.summary["exploits"]["exploits"]
    check_own_run(Path(pbt.run_dir), "pbt")

    replay = pbt_lab.run_pbt(replay=pbt.run_dir, builder=builder, storage_path=project / "api", name="replay")
    assert replay.ok and replay.summary["replay_of"]["trial_id"] == pbt.summary["winner"]["trial_id"]
    assert replay.trials["weights"].tolist() == [mlp_weights()]


# --- bad models and data: one line, nothing written -------------------------------------------------


def refused_by_the_api(project: Path, name: str, **settings) -> str:
    with pytest.raises(UserError) as err:
        pbt_lab.run_grid(
            str(CONFIGS / "grid-quick.yaml"), storage_path=project / "refused", name=name, **settings
        )
    assert not (project / "refused" / name).exists()
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "builder, message",
    [
        ("my_modles:mlp", "cannot import my_modles (ModuleNotFoundError"),
        ("my_models:cnn", "my_models has no function cnn"),
        ("my_models.mlp", "model.builder must be 'module:function'"),
        ("no/such/file.py:mlp", "/no/such/file.py"),
        ("my_models:not_a_model", "returned str, expected a keras.Model"),
        ("my_models:three_logits", "outputs shape (3,) per image, expected (5,)"),
        ("my_models:fails", "failed to build a model (RuntimeError: no GPU in the notebook)"),
        ("my_models:for_mnist", "does not take images of shape (32, 32, 3)"),
    ],
)
def test_bad_models_are_refused(project, builder, message, monkeypatch):
    monkeypatch.chdir(project)  # where the user's module is, as on the command line
    monkeypatch.syspath_prepend(str(project))
    settings = {"model": {"builder": builder}, "data": {"source": str(project / "images.npz")}}
    assert message in refused_by_the_api(project, "bad-model", **settings)


def bad_arrays(case: str) -> dict:
    (x_train, y_train), (x_test, y_test) = synthetic_images(120, 1), synthetic_images(20, 2)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if case == "labels outside":
        arrays["y_train"] = arrays["y_train"] + 1  # 1..5 with num_classes 5
    elif case == "lengths differ":
        arrays["y_test"] = arrays["y_test"][:-1]
    elif case == "NaN":
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
        arrays["x_test"] = arrays["x_test"].astype(np.float32)
        arrays["x_train"][0, 0, 0, 0] = np.nan
    elif case == "wrong rank":
        arrays["x_train"], arrays["x_test"] = arrays["x_train"][..., 0, 0], arrays["x_test"][..., 0, 0]
    elif case == "too few":
        arrays = {k: v[:11] for k, v in arrays.items()}
    return arrays


@pytest.mark.parametrize(
    "case, message",
    [
        ("labels outside", "labels outside 0..4 (0..5)"),
        ("lengths differ", "y_test is int64[19], expected integer labels [20]"),
        ("NaN", "x_train holds NaN or infinite values"),
        ("wrong rank", "x_train is uint8[120, 32], expected uint8 or float32 images"),
        ("too few", "too few images to split"),
        ("object dtype", "holds pickled objects"),
        ("batch too big", "its training part has 110 images, fewer than train.batch_size=1000"),
    ],
)
def test_bad_data_is_refused(project, case, message):
    path = project / f"bad-{case.replace(' ', '-')}.npz"
    arrays = bad_arrays(case)
    if case == "object dtype":
        arrays["y_train"] = np.array([object()] * 120)
    np.savez(path, **arrays, allow_pickle=True)
    train = {"batch_size": 1000} if case == "batch too big" else {}
    found = refused_by_the_api(
        project, "bad-data", data={"source": str(path), "num_classes": CLASSES}, train=train
    )
    assert message in found and str(path) in found


def test_bad_model_and_data_from_the_command_line(project):
    """The CLI's side of the same checks: exit 2, one line on stderr, no run directory."""
    for argv, message in (
        (("--set", "model.builder=my_models:three_logits"), "expected (5,): one logit per class"),
        (("--set", "data.num_classes=3"), "labels outside 0..2"),
    ):
        done = cli("grid", project, *OWN, *argv, "--name", "refused")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (project / "runs" / "refused").exists()


def test_a_keras_data_set_out_of_reach_is_one_line(project, tmp_path):
    """cifar10 on a machine that cannot reach Keras's servers (an empty Keras cache): one line, exit 2.
    Where it can, the oversized batch stops the run after loading, before any work."""
    done = cli(
        "grid",
        project,
        "--set",
        "data.source=cifar10",
        "--set",
        "train.batch_size=1000000",
        "--name",
        "cifar",
        env={"KERAS_HOME": str(tmp_path / "keras")},
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    if "fewer than train.batch_size" in done.stderr:
        pytest.skip("this machine reached Keras's servers and loaded cifar10")
    assert "cifar10 is not in Keras's cache and could not be downloaded" in done.stderr
    assert not (project / "runs" / "cifar").exists()


def test_a_replay_on_other_data_is_refused(tmp_path, bundled):
    """A replay trains on its run's data: the content hash recorded in its summary must match."""
    import pandas as pd

    from pbt_lab.experiments.replay import check_same_data

    run = tmp_path / "pbt-run"
    run.mkdir()
    pd.DataFrame({"trial_id": ["a"]}).to_parquet(run / "trials.parquet")
    pd.DataFrame({"trial_id": ["a"]}).to_parquet(run / "history.parquet")

    def recorded(sha256: str) -> None:
        identity = {**bundled.identity(), "sha256": sha256}
        (run / "summary.json").write_text(json.dumps({"kind": "pbt", "data": identity}))

    recorded(bundled.sha256)
    check_same_data(run, bundled)  # the same data: no complaint
    recorded("0" * 64)
    with pytest.raises(UserError, match=r"set data\.source to the run's data"):
        check_same_data(run, bundled)
