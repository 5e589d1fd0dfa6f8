"""The study's six optimizers, by case-insensitive name, with TensorFlow 1's defaults.

    make_optimizer("RMSProp", 1e-3)                 # decay 0.9, epsilon 1e-10, momentum 0
    make_optimizer("adam", 1e-3, epsilon=1e-7)      # any Keras argument overrides a default

Keras 3's optimizers compute the same updates as TF1's, with two default-level differences
this module removes: Keras's epsilons default to 1e-7, and Keras starts RMSProp's mean-square
slot at 0 where TF1 started it at 1 (the main reason the study's RMSProp needed small rates).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from pbt_lab import UserError
from pbt_lab.config import OPTIMIZER_NAMES, canonical_name
from pbt_lab.config.space import IN_FLIGHT_OPTIMIZER_ARGS, OPTIMIZER_ARGS
from pbt_lab.digest import digest


class TF1RMSprop(keras.optimizers.RMSprop):
    """Keras RMSprop whose mean-square slot starts at ``initial_rms`` (TF1: 1.0), not 0."""

    def __init__(self, *args, initial_rms: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_rms = initial_rms

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for v in self._velocities:
            v.assign(keras.ops.full(v.shape, self.initial_rms, v.dtype))

    def get_config(self):
        return {**super().get_config(), "initial_rms": self.initial_rms}


class MomentumSGD(keras.optimizers.SGD):
    """Keras SGD with momentum whose ``momentum`` may be a variable its traced step reads (PBT changes it
    in flight): Keras's update without its Python test of the value (same arithmetic, in the same order)."""

    def __init__(self, *args, name: str = "SGD", **kwargs):  # Keras's SGD's name: its variables' paths
        super().__init__(*args, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        m = self.momentums[self._get_variable_index(variable)]
        momentum = keras.ops.cast(self.momentum, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        learning_rate = keras.ops.cast(learning_rate, variable.dtype)
        self.assign(
            m,
            keras.ops.subtract(keras.ops.multiply(m, momentum), keras.ops.multiply(gradient, learning_rate)),
        )
        self.assign_add(variable, m)


# name → (Keras class, TF1 defaults). Names are the study's.
OPTIMIZERS: dict[str, tuple[type, dict]] = {
    "gd": (keras.optimizers.SGD, {}),
    "momentum": (MomentumSGD, {"momentum": 0.5}),
    "adam": (keras.optimizers.Adam, {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8}),
    "adagrad": (keras.optimizers.Adagrad, {"initial_accumulator_value": 0.1, "epsilon": 1e-8}),
    "adadelta": (keras.optimizers.Adadelta, {"rho": 0.95, "epsilon": 1e-8}),
    "rmsprop": (TF1RMSprop, {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-10, "initial_rms": 1.0}),
}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES


def make_optimizer(name: str, learning_rate: float, **overrides) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer for ``name`` with the study's TF1 defaults and ``overrides``."""
    cls, defaults = OPTIMIZERS[canonical_name(name)]
    return cls(learning_rate=float(learning_rate), **{**defaults, **overrides})


def check_optimizer_args(names: set[str], args: dict, variables: list) -> None:
    """Build each optimizer with the user's ``args`` and apply one zero update to ``variables``: an
    argument Keras does not take, or a value it cannot use, is one line before any trial starts."""
    for name in sorted(names):
        try:
            optimizer = make_optimizer(name, 1e-3, **args)
            optimizer.apply([keras.ops.zeros_like(v) for v in variables], variables)
        except (TypeError, ValueError) as e:  # what Keras raises for an argument or value it cannot use
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"train.optimizer_args={args}: {name} cannot use them ({why})") from None


def slots_digest(optimizer: keras.optimizers.Optimizer) -> str:
    """The digest of the optimizer's variables with its step counter but without its learning rate: an
    exploit changes the rate, not the slots."""
    return digest(v.numpy() for v in optimizer.variables if v is not optimizer.learning_rate)


def new_slots_digest(name: str, variables: list, **overrides) -> str:
    """``slots_digest`` of a newly built ``name`` optimizer on ``variables``: what an optimizer switched
    to must hold. Built here, apart from any bank, so that a bank whose switch keeps stale slots (or
    remembers wrong ones as fresh) cannot agree with itself."""
    optimizer = make_optimizer(name, 1.0, **overrides)
    optimizer.build(variables)
    return slots_digest(optimizer)


class _Built(NamedTuple):
    optimizer: keras.optimizers.Optimizer
    fresh: list  # its variables' values as built: what a switch to it assigns
    train_fn: object  # its traced training call
    own: dict  # its in-flight arguments' values as built (defaults and overrides)


class OptimizerBank:
    """The optimizers a Trainer has used, each built and traced once, and the live one.

    Switching back and forth (as PBT does) costs a variable reset, not a retrace: each optimizer
    keeps its fresh variable values and the training call traced for it (``trace(optimizer)``).
    ``in_flight`` holds the hyperparameters the traced call reads from variables: the optimizers' own
    (``OPTIMIZER_ARGS``: momentum, Adam's β₁ and β₂, read by their updates) and the training step's
    (``step_args``): PBT changes them without a retrace or new slots.
    """

    def __init__(self, variables: list, trace, step_args: tuple[str, ...]):
        self._variables, self._trace = variables, trace
        self.in_flight = {
            name: tf.Variable(0.0, trainable=False, name=name)
            for name in (*step_args, *IN_FLIGHT_OPTIMIZER_ARGS)
        }
        self._built: dict[str, _Built] = {}
        self._key, self.name, self.lr = "", "", 0.0
        self.overrides: dict = {}  # the live optimizer's Keras arguments beside the TF1 defaults

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self._built[self._key].optimizer

    @property
    def train_fn(self):
        """The traced training call of the live optimizer."""
        return self._built[self._key].train_fn

    def switch(self, name: str, lr: float, in_flight: dict | None = None, **overrides) -> None:
        """Make ``name`` live with fresh slots, rate ``lr`` and its in-flight arguments ``in_flight``
        (a value of None: its own default or override)."""
        name = canonical_name(name)
        self.overrides = overrides
        key = f"{name} {sorted(overrides.items())}"
        if key not in self._built:
            optimizer = make_optimizer(name, lr, **overrides)
            optimizer.build(self._variables)
            fresh = [v.numpy() for v in optimizer.variables]
            own = {arg: float(getattr(optimizer, arg)) for arg in OPTIMIZER_ARGS.get(name, ())}
            for arg in own:  # built with the float; its traced update reads the variable
                setattr(optimizer, arg, self.in_flight[arg])
            self._built[key] = _Built(optimizer, fresh, self._trace(optimizer), own)
        optimizer, fresh = self._built[key].optimizer, self._built[key].fresh
        for variable, value in zip(optimizer.variables, fresh):
            variable.assign(value)
        self.name, self._key = name, key
        self.set_lr(lr)
        self.set_in_flight(in_flight or {})

    def set_in_flight(self, values: dict) -> None:
        """Assign the live optimizer's in-flight arguments (None: its own value as built)."""
        for arg, own in self._built[self._key].own.items():
            value = values.get(arg)
            self.in_flight[arg].assign(own if value is None else value)

    @property
    def in_flight_args(self) -> tuple[str, ...]:
        """The in-flight arguments the live optimizer reads."""
        return tuple(self._built[self._key].own)

    def set_lr(self, lr: float) -> None:
        """Assign the live optimizer's learning-rate variable: the traced call reads it, no retrace."""
        self.optimizer.learning_rate.assign(lr)
        self.lr = float(lr)

    @property
    def steps(self) -> int:
        """Updates the live optimizer's slots have seen (0: fresh slots)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def built(self) -> bool:
        return bool(self._built)

    @property
    def tracing_count(self) -> int:
        """How many times the training calls were traced (a retrace costs seconds)."""
        return sum(built.train_fn.experimental_get_tracing_count() for built in self._built.values())
