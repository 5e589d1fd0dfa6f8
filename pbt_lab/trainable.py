"""The Ray Tune trainable around the Trainer: the only trainer code that imports Ray.

One ``step`` is one check (``steps_per_check`` fused training steps). Actors are reused across
trials (``reset_config``), so a worker imports TensorFlow and traces its training call once,
not once per trial. The data arrives through Ray's object store (``tune.with_parameters``).

A trial's config is flat where Tune searches (``optimizer``, ``lr``, ``seed``) and carries the
fixed rest of the experiment as plain dicts (``train``, ``model``) plus ``threads``.
"""

from __future__ import annotations

from dataclasses import asdict

from ray import tune

from pbt_lab.config import ModelConfig, TrainConfig

SEARCHED = ("optimizer", "lr", "seed")


def trial_space(train: TrainConfig, model: ModelConfig, threads: int, **searched) -> dict:
    """A Tune ``param_space``: the searched keys (values or Tune domains) and the fixed rest."""
    fixed = {k: v for k, v in asdict(train).items() if k not in SEARCHED}
    return {**searched, "train": fixed, "model": asdict(model), "threads": threads}


def train_config(config: dict) -> TrainConfig:
    """The TrainConfig of one trial's config."""
    return TrainConfig(**config["train"], **{k: config[k] for k in SEARCHED})


class LabTrainable(tune.Trainable):
    """Ray Tune's view of a Trainer: setup, step (one check), checkpoints, reset for reuse."""

    def setup(self, config: dict, data=None):
        from pbt_lab import train  # TensorFlow loads here, on the worker: once per process

        self.threads = int(config["threads"])
        train.configure_tensorflow(self.threads)
        self.trainer = train.Trainer(data, train_config(config), ModelConfig(**config["model"]))

    def step(self) -> dict:
        row = self.trainer.check()
        return {**row, "done": self.trainer.done}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.save(checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.restore(checkpoint_dir)

    def reset_config(self, new_config: dict) -> bool:
        if ModelConfig(**new_config["model"]) != self.trainer.model_cfg or int(new_config["threads"]) != self.threads:
            return False  # another network shape: Tune starts a fresh actor
        return self.trainer.reset(train_config(new_config))
