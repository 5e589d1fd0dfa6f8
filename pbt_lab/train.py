"""``python -m pbt_lab.train``: one training run, on its own (no Ray): the study's, or your model's.

python -m pbt_lab.train --optimizer adam --lr 0.00146 --data bundled --scale 0.25 --json
"""

from __future__ import annotations

import json
import math
import sys

from pbt_lab import OneLineParser, UserError
from pbt_lab.cli import native_stderr_held
from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.names import (
    SECONDS_TO_TARGET,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VAL_ACC,
)
from pbt_lab.training.data import load_dataset


def _progress(row: dict) -> str:
    val = f"  val_acc {row[VAL_ACC]:.4f}" if row[VAL_ACC] is not None else ""
    return (
        f"step {row[STEP]:6d}  train_acc {row[TRAIN_ACC]:.4f}  loss {row[TRAIN_LOSS]:.4f}{val}"
        f"  train {row[TRAIN_SECONDS]:7.2f}s  {row[STATUS]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m pbt_lab.train", description="One training run, on its own (no Ray)."
    )
    parser.add_argument(
        "--optimizer", default=TrainConfig.optimizer, help="gd, momentum, adam, adagrad, adadelta, rmsprop"
    )
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate")
    parser.add_argument(
        "--scale", type=float, default=ModelConfig.scale, help="width factor passed to the builder"
    )
    parser.add_argument(
        "--builder",
        default=ModelConfig.builder,
        help="the model: 'module:function' or 'file.py:function' (default: the study's CNN)",
    )
    parser.add_argument("--target", type=float, default=TrainConfig.target, help="training accuracy to reach")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget")
    parser.add_argument(
        "--max-seconds", type=float, default=TrainConfig.max_seconds, help="training-seconds budget"
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--data",
        default=None,
        help="a Keras-layout .npz path, mnist, fashion_mnist, cifar10 or bundled "
        "(default: $PBT_LAB_DATA, then Keras's MNIST)",
    )
    parser.add_argument("--threads", type=int, default=None, help="TF threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object, last")
    args = parser.parse_args(argv)
    try:
        train = TrainConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            target=args.target,
            max_steps=args.max_steps,
            max_seconds=args.max_seconds,
            seed=args.seed,
        )
        model = ModelConfig(builder=args.builder, scale=args.scale)
        data = load_dataset(args.data)
    except UserError as e:
        parser.error(str(e))
    try:
        with native_stderr_held():  # TensorFlow loads here; its start-up lines would bury a one-line error
            from pbt_lab.training.trainer import Trainer, configure_tensorflow

            configure_tensorflow(args.threads)
            trainer = Trainer(data, train, model)  # builds the model: a bad builder is one line too
    except UserError as e:
        parser.error(str(e))
    print(
        f"{model.builder} ({trainer.model.count_params():,} weights), {train.optimizer} lr={train.lr:g} "
        f"scale={model.scale:g} on {data.source} "
        f"({len(data.y_train)} train / {len(data.y_val)} val images {data.input_shape}, "
        f"{data.num_classes} classes), "
        f"target {train.target_metric} ≥ {train.target}"
    )
    summary = trainer.run(on_check=lambda row: print(_progress(row), flush=True))
    if args.json:
        print(
            json.dumps(
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
            )
        )
    else:
        reached = (
            f"reached at step {summary[STEPS_TO_TARGET]} after {summary[SECONDS_TO_TARGET]:.2f}s of training"
            if summary[STEPS_TO_TARGET] is not None
            else "target not reached"
        )
        print(
            f"{summary[STATUS]}: {reached}; {summary['steps']} steps, "
            f"{summary[TRAIN_SECONDS]:.2f}s training, "
            f"final val_acc {summary['final_val_acc']:.4f}, test_acc {summary[TEST_ACC]:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
