"""A run's state beside its weights and optimizer: where it is (``Progress``) and which images come
next (``DataOrder``). Both are a few numbers, so a checkpoint saves and restores them exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pbt_lab.names import EXAMPLES, RUNNING, SECONDS_TO_TARGET, STATUS, STEP, STEPS_TO_TARGET, TRAIN_SECONDS


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
        return np.concatenate(parts or [np.empty(0, np.int32)]).reshape(steps, batch_size)

    def state(self) -> list[int]:
        return [self.seed, self.epoch, self.position]

    def restore(self, state: list[int]) -> None:
        self.seed, self.epoch, self.position = map(int, state)
        self._perm = self._permutation()

    def reseed(self, seed: int) -> None:
        """Start a new stream: ``seed``'s first epoch, from its first image."""
        self.restore([seed, 0, 0])


def stream_seed(seed: int, decision: int) -> int:
    """The data-order seed of a PBT recipient after ``decision``: its own, from its seed and the decision
    (a copy that kept its donor's stream would see the donor's batches in the donor's order)."""
    return int(np.random.SeedSequence([seed, decision]).generate_state(1)[0])


def at_chance(loss: float, num_classes: int, tolerance: float) -> bool:
    """A check's mean training loss no lower than chance, ln K, less ``tolerance``: nothing learned.
    A loss above chance (a rate too high to learn, too low to diverge) counts too."""
    return not loss < math.log(num_classes) - tolerance


@dataclass
class Progress:
    """How far a run has got, and how it stands: what ``check()`` updates and a checkpoint keeps."""

    step: int = 0
    """Training steps taken."""
    examples: int = 0
    """Training examples seen (steps × each step's batch size)."""
    checks: int = 0
    """Checks (fused calls of ``steps_per_check`` steps) done."""
    train_seconds: float = 0.0
    """Seconds inside training steps only."""
    status: str = RUNNING
    """running, then reached, capped, diverged or stalled."""
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    last: dict = field(default_factory=dict)
    """The last check's metrics row."""
    checks_at_chance: int = 0
    """Checks in a row, up to the last, whose training loss stayed at chance (``at_chance``)."""

    def count_chance(self, loss: float, num_classes: int, tolerance: float) -> int:
        """Count one more check at chance, or start over at 0 if its loss learned; returns the count."""
        self.checks_at_chance = self.checks_at_chance + 1 if at_chance(loss, num_classes, tolerance) else 0
        return self.checks_at_chance

    def meta(self) -> dict:
        """For a checkpoint's metadata (the metric names as keys)."""
        return {
            STEP: self.step,
            EXAMPLES: self.examples,
            "checks": self.checks,
            TRAIN_SECONDS: self.train_seconds,
            STATUS: self.status,
            STEPS_TO_TARGET: self.steps_to_target,
            SECONDS_TO_TARGET: self.seconds_to_target,
            "last": self.last,
            "checks_at_chance": self.checks_at_chance,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        return cls(
            step=meta[STEP],
            examples=meta.get(EXAMPLES, 0),  # a checkpoint from before examples were counted: 0
            checks=meta["checks"],
            train_seconds=meta[TRAIN_SECONDS],
            status=meta[STATUS],
            steps_to_target=meta[STEPS_TO_TARGET],
            seconds_to_target=meta[SECONDS_TO_TARGET],
            last=meta.get("last", {}),
            checks_at_chance=meta.get("checks_at_chance", 0),
        )

    def as_dict(self) -> dict:
        return asdict(self)
