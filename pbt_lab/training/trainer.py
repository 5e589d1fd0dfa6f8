"""A plain-TensorFlow trainer for one network on one image set: no Ray here.

    python -m pbt_lab.train --optimizer adam --lr 0.00146 --data bundled --scale 0.25   # pbt_lab/train.py

K training steps run fused in one ``tf.function`` call (a "check"); between checks the trainer
records accuracy, tests the target and the budgets, and stops at once when the loss turns
non-finite or explodes (diverged). Its whole state saves to and restores from a directory
exactly (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TF's start-up INFO lines off the console

import keras
import numpy as np
import tensorflow as tf

from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.config.space import IN_FLIGHT_OPTIMIZER_ARGS
from pbt_lab.names import (
    BUILDER,
    CAPPED,
    COMPILE,
    DATA_SEED,
    DIVERGED,
    EXAMPLES,
    FINAL_VAL_ACC,
    LR,
    MODEL_OPTIONS,
    OPTIMIZER,
    REACHED,
    RUNNING,
    SECONDS_TO_TARGET,
    SEED,
    STALLED,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_PART,
    TRAIN_SECONDS,
    USED,
    VAL_ACC,
    VAL_LOSS,
    VALIDATE,
    WEIGHTS,
)
from pbt_lab.training import checkpoint
from pbt_lab.training.clock import PartClock
from pbt_lab.training.data import Dataset
from pbt_lab.training.model import build_model, builder_name, resolve_builder
from pbt_lab.training.optimizers import OptimizerBank
from pbt_lab.training.state import DataOrder, Progress
from pbt_lab.training.steps import NO_CLIP, STEP_ARGS, evaluation, train_steps

TRACED = ("jit_compile", "divergence_loss", "stop_on_divergence")  # baked into the traced call
CLIP_NORM = "clip_norm"
RANKING, RANKING_SEED = "ranking", 20260101  # the validation subset PBT ranks on (train.rank_examples)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras's global seed generator (weights, dropout)."""
    keras.utils.set_random_seed(seed)


def configure_tensorflow(threads: int | None = None) -> None:
    """TF thread pools sized to this process's CPUs, and GPU memory growth.

    Must run before TF touches a device: afterwards TF refuses the change (we then keep TF's own
    setting). Memory growth lets fractional-GPU trials share one card instead of the first
    trial grabbing all of its memory.
    """
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # TF already initialized in this process: its settings stand


def optimizer_args(train: TrainConfig) -> dict:
    return {arg: getattr(train, arg) for arg in IN_FLIGHT_OPTIMIZER_ARGS}


class Trainer:
    """Trains ``model.builder``'s network on ``data`` with one recipe at a time; see the module doc.

    ``check()`` runs one fused call of ``steps_per_check`` steps and returns its metrics;
    ``run()`` checks until the target, a budget or divergence ends the run. The live optimizer
    is ``optimizers`` (switch it, or its rate, between checks), the run's state ``progress`` and
    ``order``; ``checkpoint.save`` / ``checkpoint.restore`` keep them. Given a ``clock``, its
    training calls count to the clock's ``train`` part, its evaluations to ``validate`` and the
    compiling of both (once per optimizer, before its first use) to ``compile``.
    """

    def __init__(
        self,
        data: Dataset,
        train: TrainConfig | None = None,
        model: ModelConfig | None = None,
        builder: Callable | None = None,
        clock: PartClock | None = None,
    ):
        """``builder``: a builder function that replaces ``model.builder`` (the Python API's);
        ``clock``: counts this trainer's seconds by part (its compiling too, from here on)."""
        self.cfg, self.model_cfg = train or TrainConfig(), model or ModelConfig()
        if builder:  # recorded by name, as the Python API records it in the config
            self.model_cfg = replace(self.model_cfg, builder=builder_name(builder))
        make = builder or resolve_builder(self.model_cfg.builder)

        def build():
            return build_model(
                make, data.input_shape, data.num_classes, self.model_cfg.scale, self.model_cfg.options
            )

        @functools.lru_cache(maxsize=8)
        def initial_values(seed: int) -> tuple:
            """A new model's variables at ``seed``: built once per seed (a reused actor resets at every
            PBT turn and every grid trial, and building the model cost more than assigning it)."""
            seed_everything(seed)
            return tuple(v.numpy() for v in build().variables)

        self._initial_values = initial_values
        self.model = build()
        # uint8 images stay uint8 on the device (4× less memory, and what the object store ships);
        # each step gathers its batch and converts it inside the traced call.
        self._splits = {  # the test split is evaluated once, at the end (``evaluate_test``)
            TRAIN_ACC: (tf.constant(data.x_train), tf.constant(data.y_train.astype(np.int32))),
            VAL_ACC: (tf.constant(data.x_val), tf.constant(data.y_val.astype(np.int32))),
            TEST_ACC: (data.x_test, data.y_test),
        }
        self.num_classes = data.num_classes
        self.clock = clock
        self._eval_fn = self._make_eval_fn()
        self.optimizers = OptimizerBank(self.model.trainable_variables, self._make_train_fn, STEP_ARGS)
        self.reset(self.cfg)

    def reset(self, train: TrainConfig) -> bool:
        """Start a fresh run with ``train`` (new seed, optimizer, rate, budgets) on this trainer.

        Weights are re-initialized exactly as a new Trainer would initialize them, and the traced
        calls are reused (Ray Tune reuses actors this way). False, changing nothing, if ``train``
        differs in a setting baked into the traced calls: then build a new Trainer.
        """
        if self.retraces(train):
            return False
        for variable, value in zip(self.model.variables, self._initial_values(train.seed)):
            variable.assign(value)
        seed_everything(train.seed)  # what else draws (dropout's generators are variables: assigned above)
        self.cfg = train
        self.order = DataOrder(len(self._splits[TRAIN_ACC][1]), train.seed)
        self.optimizers.switch(train.optimizer, train.lr, optimizer_args(train), **train.optimizer_args)
        self._assign_step_args(train)
        self.progress = Progress()
        return True

    def retraces(self, train: TrainConfig) -> bool:
        """Whether ``train`` differs from this trainer's config in a setting baked into its traced calls."""
        return self.optimizers.built and any(getattr(train, k) != getattr(self.cfg, k) for k in TRACED)

    @property
    def state_bytes(self) -> int:
        """The bytes of its arrays (weights and optimizer slots): about what a checkpoint of it holds."""
        variables = [*self.model.variables, *self.optimizers.optimizer.variables]
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    def set_recipe(self, train: TrainConfig) -> None:
        """Go on with ``train``'s hyperparameters from the state this trainer holds: a new optimizer starts
        with fresh slots; the rate, the in-flight settings and the batch size change in place (no retrace)."""
        if any(getattr(train, k) != getattr(self.cfg, k) for k in TRACED):
            raise ValueError(
                f"set_recipe cannot change {', '.join(TRACED)}: they are baked into the traced call"
            )
        bank, args = self.optimizers, optimizer_args(train)
        if train.optimizer != bank.name or train.optimizer_args != bank.overrides:
            bank.switch(train.optimizer, train.lr, args, **train.optimizer_args)
        else:
            bank.set_lr(train.lr)
            bank.set_in_flight(args)
        self.cfg = train
        self._assign_step_args(train)

    @property
    def optimizer_args(self) -> dict:
        """The in-flight optimizer arguments of this trainer's config (None: the optimizer's own)."""
        return optimizer_args(self.cfg)

    def recipe(self, keys) -> dict:
        """The live value of each searched key (a trial config path): what the trainer trains with now."""
        live = {OPTIMIZER: self.optimizers.name, LR: self.optimizers.lr}
        return {
            key: live[key]
            if key in live
            else self.model_cfg.options.get(key.removeprefix(MODEL_OPTIONS + "."))
            if key.startswith(MODEL_OPTIONS + ".")
            else getattr(self.cfg, key)
            for key in keys
        }

    def _assign_step_args(self, train: TrainConfig) -> None:
        for name in STEP_ARGS:
            value = getattr(train, name)
            self.optimizers.in_flight[name].assign(NO_CLIP if value is None else value)

    # --- the traced calls --------------------------------------------------------------------

    def _make_train_fn(self, optimizer):
        x, y = self._splits[TRAIN_ACC]
        traced = train_steps(self.model, x, y, optimizer, self.optimizers.in_flight, self.cfg)
        self._compile(traced, run=not self.cfg.jit_compile)  # XLA compiles per shape: on real calls
        return traced

    def _make_eval_fn(self):
        traced = evaluation(self.model, self._splits[TRAIN_ACC][0])
        self._compile(traced)
        return traced

    def _compile(self, traced, run: bool = True) -> None:
        """Trace ``traced`` now and, with ``run``, optimize its graph by running it on empty inputs (its
        loop body never runs: nothing trains, nothing is evaluated). Its first real call would count a
        fraction of a second of this as training, more in a worker that had not met the optimizer
        before. What remains for the first real call is per-shape: kernel set-up, XLA's compile."""
        with self._part(COMPILE):
            if run:
                traced(*(tf.zeros([d or 0 for d in s.shape], s.dtype) for s in traced.input_signature))
            else:
                traced.get_concrete_function()

    # --- training ----------------------------------------------------------------------------

    def train(self, steps: int) -> dict:
        """Run ``steps`` training steps in one call (fewer if the loss diverges). Returns its metrics and,
        as ``KEY_used``, each hyperparameter as the call read it."""
        batches = self.order.take(steps, self.cfg.batch_size)
        with self._part(TRAIN_PART):
            start = time.perf_counter()
            done, loss_sum, correct, diverged, used = self.optimizers.train_fn(batches)
            done = int(done)  # note: a device-to-host sync point, so the time below is the real one
            self.progress.train_seconds += time.perf_counter() - start
        self.progress.step += done
        self.progress.examples += done * self.cfg.batch_size
        used = {name: value.numpy().item() for name, value in used.items()}
        used[CLIP_NORM] = None if used[CLIP_NORM] == NO_CLIP else used[CLIP_NORM]
        return {
            TRAIN_ACC: float(correct) / (done * self.cfg.batch_size) if done else float("nan"),
            TRAIN_LOSS: float(loss_sum) / done if done else float("nan"),
            DIVERGED: bool(diverged),
            **{name + USED: value for name, value in used.items()},
        }

    def evaluate(self, x=None, y=None, *, whole: bool = True) -> tuple[float, float]:
        """(accuracy, mean loss) on the validation split (``whole=False``: on ``train.rank_examples`` of
        it, where set), or on ``x``/``y`` if given."""
        if x is None:
            x, y = self._splits[VAL_ACC] if whole or not self.cfg.rank_examples else self._ranking_split()
        with self._part(VALIDATE):
            acc, loss = self._eval_fn(x, tf.cast(y, tf.int32))
            return float(acc), float(loss)

    def _ranking_split(self) -> tuple:
        """The first ``train.rank_examples`` of one fixed permutation of the validation split: every
        member, every run, ranks on the same images (kept beside the splits once made)."""
        k = min(self.cfg.rank_examples, len(self._splits[VAL_ACC][1]))
        if RANKING not in self._splits or len(self._splits[RANKING][1]) != k:
            x, y = self._splits[VAL_ACC]
            chosen = np.sort(np.random.default_rng(RANKING_SEED).permutation(len(y))[:k])
            self._splits[RANKING] = (tf.gather(x, chosen), tf.gather(y, chosen))
        return self._splits[RANKING]

    def _part(self, name: str):
        return self.clock.part(name) if self.clock else contextlib.nullcontext()

    def evaluate_test(self) -> float:
        """Accuracy on the held-out test split, for the record: when the run ends (or, where a run may be
        stopped from outside, at every check); winners are always chosen on validation."""
        return self.evaluate(*self._splits[TEST_ACC])[0]

    def check(self) -> dict:
        """Train one check (K steps), then update target, budgets and status; returns the metrics row."""
        cfg, p = self.cfg, self.progress
        steps = min(cfg.steps_per_check, cfg.max_steps - p.step) if cfg.max_steps else cfg.steps_per_check
        result = self.train(steps)
        p.checks += 1
        row = {
            STEP: p.step,
            TRAIN_SECONDS: p.train_seconds,
            TRAIN_ACC: result[TRAIN_ACC],
            TRAIN_LOSS: result[TRAIN_LOSS],
            VAL_ACC: None,
            VAL_LOSS: None,
            OPTIMIZER: self.optimizers.name,
            LR: self.optimizers.lr,
            DATA_SEED: self.order.seed,
            EXAMPLES: p.examples,
            **{k: v for k, v in result.items() if k.endswith(USED)},
        }
        if result[DIVERGED] and cfg.stop_on_divergence:
            p.status = DIVERGED
        elif cfg.target_metric == VAL_ACC or p.checks % cfg.val_every == 0:
            row[VAL_ACC], row[VAL_LOSS] = self.evaluate(whole=False)
            if cfg.rank_examples and cfg.target_metric == VAL_ACC and row[VAL_ACC] >= cfg.target:
                row[VAL_ACC], row[VAL_LOSS] = self.evaluate()  # the target is judged on the whole split
        if p.status != DIVERGED:
            if p.steps_to_target is None and (row[cfg.target_metric] or 0.0) >= cfg.target:
                p.steps_to_target, p.seconds_to_target = p.step, p.train_seconds
            out_of_budget = (cfg.max_steps and p.step >= cfg.max_steps) or (
                cfg.max_seconds and p.train_seconds >= cfg.max_seconds
            )
            if p.steps_to_target is not None and (cfg.stop_at_target or out_of_budget):
                p.status = REACHED
            elif out_of_budget:
                p.status = CAPPED
            elif (
                cfg.stall_checks
                and p.steps_to_target is None
                and p.count_chance(row[TRAIN_LOSS], self.num_classes, cfg.stall_tolerance) >= cfg.stall_checks
            ):
                p.status = STALLED  # at chance for stall_checks checks in a row
        if self.done and (row[VAL_ACC] is None or cfg.rank_examples):
            row[VAL_ACC], row[VAL_LOSS] = self.evaluate()  # every run ends with a validation of the whole
        row.update(
            {STATUS: p.status, STEPS_TO_TARGET: p.steps_to_target, SECONDS_TO_TARGET: p.seconds_to_target}
        )
        p.last = row
        return row

    @property
    def done(self) -> bool:
        return self.progress.status != RUNNING

    @property
    def learned(self) -> bool:
        """Not a run that diverged or stalled: its end is worth a test pass (theirs is chance's, and
        nothing chooses them; a grid's failures are most of its trials)."""
        return self.progress.status not in (DIVERGED, STALLED)

    def run(self, on_check=None) -> dict:
        """Check until the run ends, then evaluate on the test split once; ``on_check(row)`` sees every
        row. Returns ``summary()``."""
        while not self.done:
            row = self.check()
            if on_check:
                on_check(row)
        if self.learned:
            self.progress.last[TEST_ACC] = self.evaluate_test()
        return self.summary()

    def summary(self) -> dict:
        """The run's outcome: status, steps/seconds to target, budgets used, final accuracies."""
        p = self.progress
        return {
            STATUS: p.status,
            OPTIMIZER: self.optimizers.name,
            LR: self.optimizers.lr,
            BUILDER: self.model_cfg.builder,
            "scale": self.model_cfg.scale,
            WEIGHTS: self.model.count_params(),
            SEED: self.cfg.seed,
            "steps": p.step,
            STEPS_TO_TARGET: p.steps_to_target,
            SECONDS_TO_TARGET: p.seconds_to_target,
            TRAIN_SECONDS: p.train_seconds,
            "final_train_acc": p.last.get(TRAIN_ACC),
            FINAL_VAL_ACC: p.last.get(VAL_ACC),
            TEST_ACC: p.last.get(TEST_ACC),
        }

    # --- state (checkpoint.py does the files) ------------------------------------------------

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        return checkpoint.save(self, directory, extra)

    def restore(self, directory: str | os.PathLike) -> dict:
        return checkpoint.restore(self, directory)

    def take_state(self, other: Trainer) -> None:
        """Go on from ``other``'s state (weights, the slots where the optimizer is the same, progress, data
        order) through a checkpoint: a model rebuilt with other builder options that a replay reaches."""
        with tempfile.TemporaryDirectory() as directory:
            other.save(directory)
            self.restore(directory)

    def state_digests(self) -> tuple[str, str]:
        return checkpoint.digests(self)
