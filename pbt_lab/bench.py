"""Benchmarks, each figure a ratio of two things measured side by side in one run.

    python -m pbt_lab.bench --quick --json

These machines are shared and noisy: every comparison alternates its two sides over several
rounds and reports the ratio of the medians, never an absolute time against a goal.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass

import keras
import numpy as np

from pbt_lab import UserError
from pbt_lab.config import ModelConfig, OneLineParser, TrainConfig
from pbt_lab.data import Mnist, load_mnist
from pbt_lab.model import build_cnn
from pbt_lab.optimizers import make_optimizer
from pbt_lab.train import Trainer, configure_tensorflow


@dataclass(frozen=True)
class Throughput:
    """Images per second of the Trainer and of Keras ``fit`` on the same model, batch and data."""

    trainer: float
    fit: float

    @property
    def ratio(self) -> float:
        return self.trainer / self.fit


def trainer_vs_fit(data: Mnist, scale: float, steps: int, rounds: int) -> Throughput:
    """Time ``steps`` Adam steps of batch 100 per round, alternating the Trainer and ``model.fit``."""
    batch = TrainConfig.batch_size
    steps = min(steps, len(data.y_train) // batch)
    trainer = Trainer(data, TrainConfig(optimizer="adam", steps_per_check=steps), ModelConfig(scale=scale))
    model = build_cnn(scale)
    model.compile(make_optimizer("adam", TrainConfig.lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    # What a Keras user feeds fit: float images in [0, 1] with a channel axis.
    x = (data.x_train[: steps * batch].astype(np.float32) / 255.0)[..., None]
    y = data.y_train[: steps * batch].astype(np.int32)

    def run_trainer() -> float:
        start = time.perf_counter()
        trainer.train(steps)
        return steps * batch / (time.perf_counter() - start)

    def run_fit() -> float:
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        return steps * batch / (time.perf_counter() - start)

    run_trainer(), run_fit()  # warm-up: tracing and graph optimisation are not throughput
    samples = [(run_trainer(), run_fit()) for _ in range(rounds)]
    return Throughput(statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pbt_lab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bundled data, fewer rounds (a few minutes on 2 cores)")
    parser.add_argument("--data", default=None, help="mnist.npz path or 'bundled' (default: bundled with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per comparison")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object, last")
    args = parser.parse_args(argv)
    try:
        data = load_mnist(args.data or ("bundled" if args.quick else None))
    except UserError as e:
        parser.error(str(e))
    rounds = args.rounds or (3 if args.quick else 5)
    configure_tensorflow()

    figures: dict[str, float] = {}
    for key, scale, steps in (("small", 0.25, 100), ("full", 1.0, 40 if args.quick else 100)):
        t = trainer_vs_fit(data, scale, steps, rounds)
        figures |= {f"trainer_vs_fit_{key}": round(t.ratio, 3),
                    f"trainer_img_per_s_{key}": round(t.trainer), f"fit_img_per_s_{key}": round(t.fit)}
        print(f"scale {scale:g}: Trainer {t.trainer:,.0f} img/s, Keras fit {t.fit:,.0f} img/s, ratio {t.ratio:.2f}",
              flush=True)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
