"""The bench's yardstick for the lab's PBT: Ray's own ``PopulationBasedTraining`` with a Keras trainable
written the way Ray's documentation writes one, on the same population, data, interval and slots.

``TextbookKeras`` is a ``tune.Trainable`` whose ``step`` calls ``model.fit`` for one perturbation
interval and validates with ``model.evaluate``; it checkpoints with ``model.save_weights`` and
recompiles its model on a new configuration (``reset_config``, as ``reuse_actors=True`` needs). Each
result reports the seconds inside ``fit`` and ``evaluate``: its work, to set against the lab's.
"""

from __future__ import annotations

import os
import time

import numpy as np
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from pbt_lab.names import LR, OPTIMIZER, REPORTED_AT, STEP, VAL_ACC

WORK_SECONDS = "work_seconds"  # a textbook result's seconds inside fit and evaluate


class TextbookKeras(tune.Trainable):
    def setup(self, config: dict, data=None):
        scale = 255.0 if data.x_train.dtype == np.uint8 else 1.0
        self.x, self.y = data.x_train.astype(np.float32) / scale, data.y_train.astype(np.int32)
        self.x_val, self.y_val = data.x_val.astype(np.float32) / scale, data.y_val.astype(np.int32)
        self.shape = (data.input_shape, data.num_classes)
        self._build(config)

    def _build(self, config: dict) -> None:
        """A new model, compiled for ``config``: a member starts from fresh weights (a paused one's come
        back from its checkpoint), as a new worker would give it."""
        import keras

        from pbt_lab.training.model import build_cnn
        from pbt_lab.training.optimizers import make_optimizer

        self.model = build_cnn(*self.shape, config["scale"])
        self.model.compile(
            make_optimizer(config[OPTIMIZER], config[LR]),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    def step(self) -> dict:
        start = time.perf_counter()
        steps, batch = self.config["interval_steps"], self.config["batch_size"]
        chosen = (np.arange(steps * batch) + self.iteration * steps * batch) % len(self.y)
        self.model.fit(self.x[chosen], self.y[chosen], batch_size=batch, epochs=1, shuffle=False, verbose=0)
        _, accuracy = self.model.evaluate(self.x_val, self.y_val, batch_size=1000, verbose=0)
        return {
            VAL_ACC: float(accuracy),
            STEP: (self.iteration + 1) * steps,
            WORK_SECONDS: time.perf_counter() - start,
            REPORTED_AT: time.time(),
        }

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.model.save_weights(os.path.join(checkpoint_dir, "model.weights.h5"))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.model.load_weights(os.path.join(checkpoint_dir, "model.weights.h5"))

    def reset_config(self, new_config: dict) -> bool:
        self._build(new_config)
        return True


def run_textbook(data, members: list[dict], *, scale: float, interval_steps: int, budget_steps: int,
                 batch_size: int, lr_range: tuple, storage: str, name: str) -> dict:  # fmt: skip
    """Ray's PBT over ``members`` ([{optimizer, lr}, …], the lab's initial population) on the Ray this
    process runs, one CPU per member: as many at once as it has CPUs (the bench's Ray has one per slot
    of the lab's run; Ray's concurrency limit would keep the rest of a PBT population from starting)."""
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        metric=VAL_ACC,
        mode="max",
        perturbation_interval=1,  # one step is one interval
        hyperparam_mutations={LR: tune.loguniform(*lr_range)},
    )
    trainable = tune.with_resources(tune.with_parameters(TextbookKeras, data=data), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={
            OPTIMIZER: tune.choice(sorted({m[OPTIMIZER] for m in members})),
            LR: tune.loguniform(*lr_range),
            "scale": scale,
            "interval_steps": interval_steps,
            "batch_size": batch_size,
        },
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(points_to_evaluate=members),
            num_samples=len(members),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop={"training_iteration": budget_steps // interval_steps},
            verbose=0,
        ),
    )
    started = time.time()
    grid = tuner.fit()
    wall = time.time() - started
    rows = [r.metrics_dataframe for r in grid if r.metrics_dataframe is not None]
    return {"started_at": started, "wall_seconds": wall, "rows": rows}


def side_by_side(pbt_tables: dict, storage: str, name: str) -> dict:
    """Ray's textbook PBT on the lab run's population, data, interval, budget and slots (run here, after
    it, on the same Ray); the two runs' work shares and wall seconds to the same validation accuracy
    (the lower of the two bests), as ratios: the lab's ÷ Ray's, and Ray's seconds ÷ the lab's (to that
    accuracy, and the whole population's budget)."""
    import pandas as pd

    from pbt_lab.training.data import load_dataset

    summary, trials, history = pbt_tables["summary"], pbt_tables["trials"], pbt_tables["history"]
    cfg, breakdown = summary["config"], summary["time_breakdown"]
    members = [
        {OPTIMIZER: o, LR: float(lr)} for o, lr in zip(trials["initial_optimizer"], trials["initial_lr"])
    ]
    lows, highs = zip(*cfg["pbt"]["lr_ranges"].values(), strict=True)
    ray_run = run_textbook(
        load_dataset(summary["data"]["source"]),
        members,
        scale=cfg["model"]["scale"],
        interval_steps=cfg["pbt"]["perturbation_interval"] * cfg["train"]["steps_per_check"],
        budget_steps=cfg["train"]["max_steps"],
        batch_size=cfg["train"]["batch_size"],
        lr_range=(min(lows), max(highs)),
        storage=storage,
        name=name,
    )
    rows = pd.concat(ray_run["rows"], ignore_index=True)
    ray_work = rows[WORK_SECONDS].sum() / (ray_run["wall_seconds"] * breakdown["slots"])
    same = min(float(history[VAL_ACC].max()), float(rows[VAL_ACC].max()))

    def seconds_to(frame, started_at: float) -> float:
        return float(frame.loc[frame[VAL_ACC] >= same, REPORTED_AT].min() - started_at)

    lab_seconds = seconds_to(history, summary["compute"]["started_at"])
    ray_seconds = seconds_to(rows, ray_run["started_at"])
    return {
        "ray_pbt_work_share": ray_work,
        "lab_vs_ray_pbt_work_share": breakdown["work_share"] / ray_work,
        "ray_vs_lab_pbt_seconds_to_accuracy": ray_seconds / lab_seconds,
        "ray_vs_lab_pbt_wall": ray_run["wall_seconds"] / summary["compute"]["wall_seconds"],
        "same_val_acc": same,
        "ray_pbt_wall_seconds": ray_run["wall_seconds"],
    }
