"""A plain-TensorFlow trainer for the study's CNN: no Ray here.

    python -m pbt_lab.train --optimizer adam --lr 0.00146 --data bundled --scale 0.25 --json

K training steps run fused in one ``tf.function`` call (a "check"); between checks the trainer
records accuracy, tests the target and the budgets, and stops at once when the loss turns non-finite or explodes (diverged).
Its whole state (weights, dropout RNG, optimizer slots, step, data order) saves to and restores
from a directory, exactly: N steps straight equal k steps, save, restore, N − k steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TF's start-up INFO lines off the console

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pbt_lab import UserError  # noqa: E402
from pbt_lab.config import ModelConfig, OneLineParser, TrainConfig  # noqa: E402
from pbt_lab.data import Mnist, load_mnist  # noqa: E402
from pbt_lab.model import build_cnn  # noqa: E402
from pbt_lab.config import canonical_name  # noqa: E402
from pbt_lab.optimizers import make_optimizer  # noqa: E402

from pbt_lab.names import (  # noqa: E402  (metric and status names live in names.py)
    CAPPED, DIVERGED, LR, OPTIMIZER, REACHED, RUNNING, SECONDS_TO_TARGET, STATUS, STEP, STEPS_TO_TARGET, TEST_ACC,
    TRAIN_ACC, TRAIN_LOSS, TRAIN_SECONDS, VAL_ACC, VAL_LOSS,
)

STATE_ARRAYS, STATE_META = "trainer.npz", "trainer.json"
EVAL_BATCH = 1000


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


class DataOrder:
    """The order training images are drawn in: a fresh permutation per epoch, keyed by (seed, epoch).

    Its whole state is three integers (seed, epoch, position), so it saves and restores exactly.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).astype(np.int32)

    def take(self, steps: int, batch_size: int) -> np.ndarray:
        """Indices for the next ``steps`` batches, shape (steps, batch_size), crossing epochs."""
        need, parts = steps * batch_size, []
        while need:
            chunk = self._perm[self.position : self.position + need]
            parts.append(chunk)
            need -= len(chunk)
            self.position += len(chunk)
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
        return np.concatenate(parts).reshape(steps, batch_size)

    def state(self) -> list[int]:
        return [self.seed, self.epoch, self.position]

    def restore(self, state: list[int]) -> None:
        self.seed, self.epoch, self.position = map(int, state)
        self._perm = self._permutation()


@dataclass
class _OptimizerSlot:
    """A built optimizer, its fresh variable values (to reset slots) and its traced training call."""

    optimizer: keras.optimizers.Optimizer
    fresh: list[np.ndarray]
    train_fn: tf.types.experimental.PolymorphicFunction


class Trainer:
    """Trains the study's CNN on MNIST with one optimizer and learning rate; see the module doc.

    ``check()`` runs one fused call of ``steps_per_check`` steps and returns its metrics;
    ``run()`` checks until the target, a budget or divergence ends the run.
    """

    def __init__(self, data: Mnist, train: TrainConfig = TrainConfig(), model: ModelConfig = ModelConfig()):
        self.cfg, self.model_cfg = train, model
        self.model = build_cnn(**asdict(model))
        # Images stay uint8 on the device (4× less memory, and what the object store ships);
        # each step gathers its batch and converts it inside the traced call.
        self._x = tf.constant(data.x_train)
        self._y = tf.constant(data.y_train.astype(np.int32))
        self._x_val = tf.constant(data.x_val)
        self._y_val = tf.constant(data.y_val.astype(np.int32))
        self._test = (data.x_test, data.y_test)  # evaluated once, at the end (``evaluate_test``)
        self._eval_fn = self._make_eval_fn()
        self._slots: dict[str, _OptimizerSlot] = {}
        self.reset(train)

    def reset(self, train: TrainConfig) -> bool:
        """Start a fresh run with ``train`` (new seed, optimizer, rate, budgets) on this trainer.

        Weights are re-initialized exactly as a new Trainer would initialize them, and the traced
        calls are reused (Ray Tune reuses actors this way). False, changing nothing, if ``train``
        differs in a setting baked into the traced calls: then build a new Trainer.
        """
        traced = ("batch_size", "jit_compile", "divergence_loss", "stop_on_divergence")
        if self._slots and any(getattr(train, k) != getattr(self.cfg, k) for k in traced):
            return False
        seed_everything(train.seed)
        for variable, value in zip(self.model.variables, build_cnn(**asdict(self.model_cfg)).variables):
            variable.assign(value)
        self.cfg = train
        self._order = DataOrder(len(self._y), train.seed)
        self.optimizer_name, self.lr = "", 0.0
        self.set_optimizer(train.optimizer, train.lr, **train.optimizer_args)
        self.step, self.checks, self.train_seconds = 0, 0, 0.0
        self.status = RUNNING
        self.steps_to_target: int | None = None
        self.seconds_to_target: float | None = None
        self.last: dict = {}
        return True

    # --- optimizer and learning rate -------------------------------------------------------

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self._slots[self._slot_key].optimizer

    def set_optimizer(self, name: str, lr: float, **overrides) -> None:
        """Switch to optimizer ``name`` with fresh slots and rate ``lr``.

        Each optimizer is built and traced once per Trainer and then reused, so switching back and
        forth (as PBT does) costs a variable reset, not a retrace.
        """
        name = canonical_name(name)
        key = f"{name} {sorted(overrides.items())}"
        if key not in self._slots:
            optimizer = make_optimizer(name, lr, **overrides)
            optimizer.build(self.model.trainable_variables)
            fresh = [v.numpy() for v in optimizer.variables]
            self._slots[key] = _OptimizerSlot(optimizer, fresh, self._make_train_fn(optimizer))
        slot = self._slots[key]
        for variable, value in zip(slot.optimizer.variables, slot.fresh):
            variable.assign(value)
        self.optimizer_name, self._slot_key = name, key
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        """Assign the live optimizer's learning-rate variable: the traced call reads it, no retrace."""
        self.optimizer.learning_rate.assign(lr)
        self.lr = float(lr)

    @property
    def tracing_count(self) -> int:
        """How many times the training calls were traced (a retrace costs seconds)."""
        return sum(s.train_fn.experimental_get_tracing_count() for s in self._slots.values())

    # --- the traced calls --------------------------------------------------------------------

    def _make_train_fn(self, optimizer):
        model, x, y = self.model, self._x, self._y
        variables = model.trainable_variables
        batch = self.cfg.batch_size
        max_loss = self.cfg.divergence_loss or float("inf")
        stop = self.cfg.stop_on_divergence

        @tf.function(input_signature=[tf.TensorSpec([None, batch], tf.int32)], jit_compile=self.cfg.jit_compile)
        def train_steps(batches):
            done, loss_sum, correct = tf.constant(0), tf.constant(0.0), tf.constant(0)
            diverged = tf.constant(False)
            for i in tf.range(tf.shape(batches)[0]):
                xb = tf.cast(tf.gather(x, batches[i]), tf.float32)[..., None] / 255.0
                yb = tf.gather(y, batches[i])
                with tf.GradientTape() as tape:
                    logits = model(xb, training=True)
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
                if not tf.math.is_finite(loss) or loss > max_loss:
                    diverged = tf.constant(True)
                    if stop:
                        break  # before the update: the weights stay as they were
                optimizer.apply(tape.gradient(loss, variables), variables)
                done += 1
                loss_sum += loss
                correct += tf.reduce_sum(tf.cast(tf.argmax(logits, 1, output_type=tf.int32) == yb, tf.int32))
            return done, loss_sum, correct, diverged

        return train_steps

    def _make_eval_fn(self):
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8), tf.TensorSpec([None], tf.int32)])
        def evaluate(x, y):
            n = tf.shape(y)[0]
            loss_sum, correct = tf.constant(0.0), tf.constant(0)
            for start in tf.range(0, n, EVAL_BATCH):
                xb = tf.cast(x[start : start + EVAL_BATCH], tf.float32)[..., None] / 255.0
                yb = y[start : start + EVAL_BATCH]
                logits = model(xb, training=False)
                loss_sum += tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
                correct += tf.reduce_sum(tf.cast(tf.argmax(logits, 1, output_type=tf.int32) == yb, tf.int32))
            n_float = tf.cast(n, tf.float32)
            return tf.cast(correct, tf.float32) / n_float, loss_sum / n_float

        return evaluate

    # --- training ----------------------------------------------------------------------------

    def train(self, steps: int) -> dict:
        """Run ``steps`` training steps in one call (fewer if the loss diverges)."""
        batches = self._order.take(steps, self.cfg.batch_size)
        start = time.perf_counter()
        done, loss_sum, correct, diverged = self._slots[self._slot_key].train_fn(batches)
        done = int(done)  # note: a device-to-host sync point, so the time below is the real one
        self.train_seconds += time.perf_counter() - start
        self.step += done
        return {
            TRAIN_ACC: float(correct) / (done * self.cfg.batch_size) if done else float("nan"),
            TRAIN_LOSS: float(loss_sum) / done if done else float("nan"),
            "diverged": bool(diverged),
        }

    def evaluate(self, x: np.ndarray | tf.Tensor | None = None, y: np.ndarray | tf.Tensor | None = None) -> tuple[float, float]:
        """(accuracy, mean loss) on the validation split, or on ``x``/``y`` if given."""
        if x is None:
            x, y = self._x_val, self._y_val
        acc, loss = self._eval_fn(x, tf.cast(y, tf.int32))
        return float(acc), float(loss)

    def evaluate_test(self) -> float:
        """Accuracy on the held-out test split: call it once, when the run has ended and nothing is
        chosen any more (winners are chosen on validation)."""
        return self.evaluate(*self._test)[0]

    def check(self) -> dict:
        """Train one check (K steps), then update target, budgets and status; returns the metrics row."""
        steps = self.cfg.steps_per_check
        if self.cfg.max_steps:
            steps = min(steps, self.cfg.max_steps - self.step)
        result = self.train(steps)
        self.checks += 1
        row = {STEP: self.step, TRAIN_SECONDS: self.train_seconds, TRAIN_ACC: result[TRAIN_ACC],
               TRAIN_LOSS: result[TRAIN_LOSS], VAL_ACC: None, VAL_LOSS: None, OPTIMIZER: self.optimizer_name, LR: self.lr}
        if result["diverged"] and self.cfg.stop_on_divergence:
            self.status = DIVERGED
        elif self.cfg.target_metric == VAL_ACC or self.checks % self.cfg.val_every == 0:
            row[VAL_ACC], row[VAL_LOSS] = self.evaluate()
        if self.status != DIVERGED:
            if self.steps_to_target is None and (row[self.cfg.target_metric] or 0.0) >= self.cfg.target:
                self.steps_to_target, self.seconds_to_target = self.step, self.train_seconds
            out_of_budget = (self.cfg.max_steps and self.step >= self.cfg.max_steps) or (
                self.cfg.max_seconds and self.train_seconds >= self.cfg.max_seconds)
            if self.steps_to_target is not None and (self.cfg.stop_at_target or out_of_budget):
                self.status = REACHED
            elif out_of_budget:
                self.status = CAPPED
        if self.done and row[VAL_ACC] is None:
            row[VAL_ACC], row[VAL_LOSS] = self.evaluate()  # every run ends with a validation
        row.update({STATUS: self.status, STEPS_TO_TARGET: self.steps_to_target, SECONDS_TO_TARGET: self.seconds_to_target})
        self.last = row
        return row

    @property
    def done(self) -> bool:
        return self.status != RUNNING

    def run(self, on_check=None) -> dict:
        """Check until the run ends, then evaluate on the test split once; ``on_check(row)`` sees every
        row. Returns ``summary()``."""
        while not self.done:
            row = self.check()
            if on_check:
                on_check(row)
        self.last[TEST_ACC] = self.evaluate_test()
        return self.summary()

    def summary(self) -> dict:
        """The run's outcome: status, steps/seconds to target, budgets used, final accuracies."""
        return {
            STATUS: self.status, OPTIMIZER: self.optimizer_name, LR: self.lr, "scale": self.model_cfg.scale,
            "seed": self.cfg.seed, "steps": self.step, STEPS_TO_TARGET: self.steps_to_target,
            SECONDS_TO_TARGET: self.seconds_to_target, TRAIN_SECONDS: self.train_seconds,
            "final_train_acc": self.last.get(TRAIN_ACC), "final_val_acc": self.last.get(VAL_ACC),
            TEST_ACC: self.last.get(TEST_ACC),
        }

    # --- state -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the whole state to ``directory`` as arrays (.npz) and JSON (with ``extra``): no pickle, no graph."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"model/{i}": v.numpy() for i, v in enumerate(self.model.variables)}
        arrays |= {f"optimizer/{i}": v.numpy() for i, v in enumerate(self.optimizer.variables)}
        meta = {
            "format": 1, OPTIMIZER: self.optimizer_name, LR: self.lr, STEP: self.step, "checks": self.checks,
            TRAIN_SECONDS: self.train_seconds, STATUS: self.status, STEPS_TO_TARGET: self.steps_to_target,
            SECONDS_TO_TARGET: self.seconds_to_target, "data_order": self._order.state(),
            "model": asdict(self.model_cfg), "model_variables": [v.path for v in self.model.variables],
            "optimizer_variables": [v.path for v in self.optimizer.variables],
            "last": self.last, **(extra or {}),
        }
        # Write beside, then rename: a crash mid-save never leaves a half-written checkpoint.
        for name, write in ((STATE_ARRAYS, lambda f: np.savez(f, **arrays)),
                            (STATE_META, lambda f: f.write(json.dumps(meta).encode()))):
            with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
                write(f)
            os.replace(f.name, directory / name)
        return directory

    def restore(self, directory: str | os.PathLike) -> dict:
        """Load a state saved by ``save``: weights, step and data order always; optimizer slots only
        when the saved optimizer is the current one (fresh slots otherwise). The current learning
        rate is re-assigned afterwards: Keras would otherwise restore the saved one. Returns the
        checkpoint's metadata."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / STATE_META).read_text())
            with np.load(directory / STATE_ARRAYS, allow_pickle=False) as f:
                arrays = dict(f)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {directory} is missing or corrupt ({e})") from e
        shapes = [tuple(v.shape) for v in self.model.variables]
        saved = [arrays.get(f"model/{i}", np.empty(0)).shape for i in range(len(shapes))]
        if saved != shapes:
            raise UserError(f"checkpoint {directory} holds a model of another shape (saved with {meta.get('model')})")
        for i, v in enumerate(self.model.variables):
            v.assign(arrays[f"model/{i}"])
        if meta[OPTIMIZER] == self.optimizer_name:
            for i, v in enumerate(self.optimizer.variables):
                v.assign(arrays[f"optimizer/{i}"])
        else:
            self.set_optimizer(self.optimizer_name, self.lr, **self.cfg.optimizer_args)  # a different one starts fresh
        self.set_lr(self.lr)
        self.step, self.checks, self.train_seconds = meta[STEP], meta["checks"], meta[TRAIN_SECONDS]
        self.status, self.steps_to_target, self.seconds_to_target = meta[STATUS], meta[STEPS_TO_TARGET], meta[SECONDS_TO_TARGET]
        self.last = meta.get("last", {})
        self._order.restore(meta["data_order"])
        return meta

    def state_digests(self) -> tuple[str, str]:
        """(state, slots): SHA-256 of the weights with the step and data order, and of the optimizer's
        variables with its step counter but without its learning rate (an exploit changes the rate,
        not the slots). Equal state, equal digests: how PBT's audit verifies an exploit."""
        state = hashlib.sha256(json.dumps([self.step, self._order.state()]).encode())
        for v in self.model.variables:
            state.update(np.ascontiguousarray(v.numpy()).tobytes())
        slots = hashlib.sha256()
        for v in self.optimizer.variables:
            if v is not self.optimizer.learning_rate:
                slots.update(np.ascontiguousarray(v.numpy()).tobytes())
        return state.hexdigest(), slots.hexdigest()

    @property
    def optimizer_steps(self) -> int:
        """Updates the live optimizer's slots have seen (0: fresh slots)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def data_seed(self) -> int:
        """The seed of the data order in use (after a restore: the checkpoint's)."""
        return self._order.seed


# --- command line ---------------------------------------------------------------------------


def _progress(row: dict) -> str:
    val = f"  val_acc {row[VAL_ACC]:.4f}" if row[VAL_ACC] is not None else ""
    return (f"step {row[STEP]:6d}  train_acc {row[TRAIN_ACC]:.4f}  loss {row[TRAIN_LOSS]:.4f}{val}"
            f"  train {row[TRAIN_SECONDS]:7.2f}s  {row[STATUS]}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pbt_lab.train", description="The study's single training run.")
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, help="gd, momentum, adam, adagrad, adadelta, rmsprop")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate")
    parser.add_argument("--scale", type=float, default=ModelConfig.scale, help="width factor of the conv layers")
    parser.add_argument("--target", type=float, default=TrainConfig.target, help="training accuracy to reach")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget")
    parser.add_argument("--max-seconds", type=float, default=TrainConfig.max_seconds, help="training-seconds budget")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--data", default=None, help="mnist.npz path, or 'bundled' (default: $PBT_LAB_DATA, then Keras's cache)")
    parser.add_argument("--threads", type=int, default=None, help="TF threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object, last")
    args = parser.parse_args(argv)
    try:
        train = TrainConfig(optimizer=args.optimizer, lr=args.lr, target=args.target, max_steps=args.max_steps,
                            max_seconds=args.max_seconds, seed=args.seed)
        model = ModelConfig(scale=args.scale)
        data = load_mnist(args.data)
    except UserError as e:
        parser.error(str(e))
    configure_tensorflow(args.threads)
    trainer = Trainer(data, train, model)
    print(f"{train.optimizer} lr={train.lr:g} scale={model.scale:g} on {data.source} "
          f"({len(data.y_train)} train / {len(data.y_val)} val images), target {train.target_metric} ≥ {train.target}")
    summary = trainer.run(on_check=lambda row: print(_progress(row), flush=True))
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}))
    else:
        reached = (f"reached at step {summary[STEPS_TO_TARGET]} after {summary[SECONDS_TO_TARGET]:.2f}s of training"
                   if summary[STEPS_TO_TARGET] is not None else "target not reached")
        print(f"{summary[STATUS]}: {reached}; {summary['steps']} steps, {summary[TRAIN_SECONDS]:.2f}s training, "
              f"final val_acc {summary['final_val_acc']:.4f}, test_acc {summary[TEST_ACC]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
