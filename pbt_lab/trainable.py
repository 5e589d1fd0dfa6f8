"""The Ray Tune trainable around the Trainer: the only trainer code that imports Ray.

One ``step`` is one check (``steps_per_check`` fused training steps). Actors are reused across
trials (``reset_config``), so a worker imports TensorFlow and traces its training call once,
not once per trial. The data arrives through Ray's object store (``tune.with_parameters``).

A trial's config is flat where Tune searches or PBT mutates (``optimizer``, ``lr``, ``seed``)
and carries the fixed rest of the experiment as plain dicts (``train``, ``model``), plus
``threads`` and, under PBT, ``population`` settings.

Every restore is verified: the weights after loading must hash to what the checkpoint's owner
saved, and the live learning rate must be the trial's configured one; a mismatch is an error.
The first result after a start or restore says where its state came from (``segment_from``:
the trial whose checkpoint it is, ``segment_step``: the step it holds), which is how the
results tables tell an exploit from a resume.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import ray
from ray import tune

from pbt_lab.config import ModelConfig, TrainConfig

SEARCHED = ("optimizer", "lr", "seed")
SEGMENT_KEYS = ("segment_from", "segment_step", "restored_sha256", "restored_lr", "restored_optimizer",
                "restored_optimizer_steps")
DIVERGED_SCORE = -1.0  # below any accuracy: a diverged member ranks last (and LabPBT never copies it)
DIVERGED = "diverged"  # train.DIVERGED, named here so the driver need not import TensorFlow


def trial_space(train: TrainConfig, model: ModelConfig, threads: int, population: dict | None = None, **searched) -> dict:
    """A Tune ``param_space``: the searched keys (values or Tune domains) and the fixed rest."""
    fixed = {k: v for k, v in asdict(train).items() if k not in SEARCHED}
    return {**searched, "train": fixed, "model": asdict(model), "threads": threads, "population": population}


def train_config(config: dict) -> TrainConfig:
    """The TrainConfig of one trial's config."""
    return TrainConfig(**config["train"], **{k: config[k] for k in SEARCHED})


class LabTrainable(tune.Trainable):
    """Ray Tune's view of a Trainer: setup, step (one check), checkpoints, reset for reuse."""

    def setup(self, config: dict, data=None):
        from pbt_lab import train  # TensorFlow loads here, on the worker: once per process

        self.threads = int(config["threads"])
        train.configure_tensorflow(self.threads)
        self.data = data  # kept: a reused actor may need a Trainer of another shape
        self.trainer = train.Trainer(data, train_config(config), ModelConfig(**config["model"]))
        self._segment = {"segment_from": self.trial_id, "segment_step": 0}
        self._score, self._waited = None, 0

    def step(self) -> dict:
        population = self.config.get("population")
        if population and self.trainer.status == DIVERGED:
            return self._wait_for_donor(population)
        started_at = time.time()
        self._follow_schedule()
        before = self.trainer.train_seconds
        row = self.trainer.check()
        diverged = self.trainer.status == DIVERGED
        # Wall-clock bounds of the check (Ray's timestamp is whole seconds): the gaps between one
        # report and the next check on a worker are what the benchmark charges to Tune.
        result = {**row, "check_seconds": self.trainer.train_seconds - before, "started_at": started_at,
                  "reported_at": time.time(),
                  **dict.fromkeys(SEGMENT_KEYS), **self._segment,
                  # Under PBT a diverged member keeps its slot until it exploits a better one.
                  "done": self.trainer.done and not (population and diverged)}
        if population:
            result["score"] = DIVERGED_SCORE if diverged else self._rank_score(population["metric"], row)
        result["node_id"] = ray.get_runtime_context().get_node_id()  # Ray's node: node_ip is shared by nodes on one host
        self._segment, self._waited = {}, 0
        return result

    def _wait_for_donor(self, population: dict) -> dict:
        """A diverged PBT member trains no more: it reports its last row, ranked last, until PBT
        copies a donor into it (a restore), or ends once PBT had its chance and did not (no
        healthy member was left to copy)."""
        self._waited += 1
        return {**self.trainer.last, "check_seconds": 0.0, **dict.fromkeys(SEGMENT_KEYS),
                "score": DIVERGED_SCORE, "done": self._waited > population["rescue_checks"]}

    def _follow_schedule(self) -> None:
        """A replay's trial carries ``schedule`` [[step, optimizer, lr], …]: switch when a step is reached."""
        schedule = self.config.get("schedule")
        if not schedule:
            return
        _, optimizer, lr = [c for c in schedule if c[0] <= self.trainer.step][-1]
        if optimizer != self.trainer.optimizer_name:
            self.trainer.set_optimizer(optimizer, lr)  # fresh slots, as when an exploit switches
        elif lr != self.trainer.lr:
            self.trainer.set_lr(lr)
        else:
            return
        self._segment = {"segment_from": self.trial_id, "segment_step": self.trainer.step}

    def _rank_score(self, metric: str, row: dict) -> float:
        """PBT's score, on every report: PBT may rank a member at any report (after a resume its clock
        restarts off the validation rhythm), so the last validation carries forward until the next."""
        if row.get(metric) is not None:
            self._score = row[metric]
        elif self._score is None:
            self._score = self.trainer.evaluate()[0]
        return self._score

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.save(checkpoint_dir, extra={"trial_id": self.trial_id})

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        meta = self.trainer.restore(checkpoint_dir)
        digest = self.trainer.weights_digest()
        live_lr = float(self.trainer.optimizer.learning_rate.numpy())
        if digest != meta["weights_sha256"]:
            raise RuntimeError(f"restored weights do not match checkpoint {checkpoint_dir} (saved by {meta.get('trial_id')})")
        if not np.isclose(live_lr, self.config["lr"], rtol=1e-6, atol=0):
            raise RuntimeError(f"live learning rate {live_lr:g} is not the configured {self.config['lr']:g} after restore")
        # Optimizer steps of the live slots: the donor's count when its slots were copied, 0 when fresh.
        self._segment = {"segment_from": meta.get("trial_id"), "segment_step": meta["step"], "restored_sha256": digest,
                         "restored_lr": live_lr, "restored_optimizer": meta["optimizer"], "restored_optimizer_steps": int(self.trainer.optimizer.iterations.numpy())}
        population = self.config.get("population")
        self._score = meta.get("last", {}).get(population["metric"]) if population else None
        self._waited = 0

    def reset_config(self, new_config: dict) -> bool:
        if int(new_config["threads"]) != self.threads:
            return False  # TF's thread pools are fixed once it has started
        model, train_cfg = ModelConfig(**new_config["model"]), train_config(new_config)
        if model != self.trainer.model_cfg or not self.trainer.reset(train_cfg):
            # Another width (the scaling study) or traced setting: a new Trainer in this worker.
            # Ray 2.60 fails the trial if a reused actor answers False here; it does not start a fresh one.
            from pbt_lab import train

            self.trainer = train.Trainer(self.data, train_cfg, model)
        self._segment = {"segment_from": self.trial_id, "segment_step": 0}
        self._score, self._waited = None, 0
        return True
