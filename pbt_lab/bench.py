"""Benchmarks, each figure a ratio of two things measured side by side in one run.

    python -m pbt_lab.bench --quick --json

These machines are shared and noisy: Trainer/fit alternates its sides over rounds (the ratio of the
medians, the rounds' range); the Tune figures are measured ``--repeats`` times (median and range), each
run against itself (its time breakdown) or a twin run made moments before. The machine is printed.

Tune figures, at a size (``--size``; ``--quick`` is ``--size quick``): quick, configs/*-quick.yaml on the
bundled subset; cpu, the reference (grid-cpu.yaml and pbt-cpu-reference.yaml: 10 members × 3,000 steps,
so the workers' start is a small share) on full MNIST ($PBT_LAB_DATA), without the twin grid (its
stopped trials would run on to 1,000 steps); study, the study's configs. Goals are judged on cpu only:
- work_share / overhead_share _grid / _pbt: work (train, compile, validate) against the rest, of the
  slot-seconds; fixed_seconds_pbt: workers' start and first compiles; turn_seconds_median_pbt: a
  hand-over on a worker (a report to the next member's first step from a checkpoint);
  check_overhead_seconds_median_pbt: an ordinary check's seconds outside work, which with a turn's
  make ``overhead_forecast_pbt`` (each interval and step time); ranking_share_pbt: validation's share;
- lab_vs_ray_pbt_work_share: the lab PBT's work share ÷ that of Ray's own PBT with a textbook Keras
  trainable (``experiments/textbook.py``: ``model.fit`` per interval, ``save_weights``) on the same
  population, data, interval, budget and slots, run right after it; ray_vs_lab_pbt_seconds_to_accuracy:
  Ray's wall seconds to the lower of the two runs' best validation accuracies ÷ the lab's (_wall: to the
  budget's end); tune_efficiency_grid / _pbt: Σ training seconds ÷ (wall × slots) (``share_<run>_<part>``:
  each part's); ``_past_start``: without the workers' start;
- exploit_cost_ratio: median idle seconds of a worker from the report on which PBT exploited a member
  to that member's next training step on the worker, ÷ training seconds per perturbation interval;
  ``exploit_extra_ratio``: the same less an ordinary turn's, what the exploit itself adds;
- divergence_savings: 1 − the grid's trial-seconds ÷ its twin's without the stops; pbt_vs_grid_compute:
  PBT's training seconds until a member is within 0.2 pt of the grid's best validation ÷ the grid's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pbt_lab import OneLineParser, UserError, results
from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.names import (
    ACTOR_START,
    BEST_VAL_ACC,
    CHECK_SECONDS,
    LR,
    OPTIMIZER,
    REACHED,
    SEED,
    SEGMENT_FROM,
    SEGMENT_STEP,
    STATUS,
    STEPS_TO_TARGET,
    TRAIN_PART,
    TRAIN_SECONDS,
    VAL_ACC,
    VALIDATE,
)
from pbt_lab.results.breakdown import forecast_lines, forecast_table, worker_gaps
from pbt_lab.results.tables import write_json
from pbt_lab.storage import check_storage
from pbt_lab.training.data import Dataset, load_dataset


@dataclass(frozen=True)
class Throughput:
    """Images per second of the Trainer and of Keras ``fit`` (medians of the rounds), each round's ratio."""

    trainer: float
    fit: float
    ratios: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.trainer / self.fit


def trainer_vs_fit(data: Dataset, scale: float, steps: int, rounds: int) -> Throughput:
    """Time ``steps`` Adam steps of batch 100 per round, alternating the Trainer and ``model.fit``."""
    import keras  # TensorFlow loads here, its start-up lines after any one-line error on the arguments

    from pbt_lab.training.model import build_cnn
    from pbt_lab.training.optimizers import make_optimizer
    from pbt_lab.training.trainer import Trainer

    batch = TrainConfig.batch_size
    steps = min(steps, len(data.y_train) // batch)
    trainer = Trainer(data, TrainConfig(optimizer="adam", steps_per_check=steps), ModelConfig(scale=scale))
    model = build_cnn(data.input_shape, data.num_classes, scale)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(make_optimizer("adam", TrainConfig.lr), loss, metrics=["accuracy"])
    # What a Keras user feeds fit: float images in [0, 1].
    x = data.x_train[: steps * batch].astype(np.float32) / (255.0 if data.x_train.dtype == np.uint8 else 1.0)
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
    trainer_rate, fit_rate = (statistics.median(side) for side in zip(*samples, strict=True))
    return Throughput(trainer_rate, fit_rate, tuple(t / f for t, f in samples))


# --- Ray Tune -------------------------------------------------------------------------------


def tune_run(module, config: Path, storage: Path, name: str, *sets: str) -> dict:
    """Run an experiment module's ``main`` on the local Ray and return its tables."""
    argv = ["--config", str(config), "--storage-path", str(storage), "--name", name]
    code = module.main([*argv, *(a for s in ("resources.gpu=0", *sets) for a in ("--set", s))])
    if code != 0:
        raise RuntimeError(
            f"the {name} run ended with exit code {code}: see its lines above and {storage / name}"
        )
    return dict(zip(("trials", "history", "summary"), results.read_tables(storage / name)))


def tune_efficiency(tables: dict, past_start: bool = False) -> float:
    """Training seconds ÷ (wall seconds × trial slots), from the run's time breakdown: 1.0 is every
    slot training all the time. ``past_start``: of the slot-seconds after the workers' start (their
    processes, TensorFlow's import, the model's build: a fixed cost per worker, which a short run
    cannot amortize), what the rest of the run spends on training."""
    b = tables["summary"]["time_breakdown"]
    return b["parts"][TRAIN_PART] / (b["slot_seconds"] - (b["parts"][ACTOR_START] if past_start else 0.0))


def exploit_cost(history: pd.DataFrame, interval: int) -> dict:
    """Median worker gap before an exploited member's first check, against an interval's training;
    and what it adds to an ordinary turn's gap (a member resuming from its own checkpoint)."""
    h = worker_gaps(history)
    exploit = h[SEGMENT_FROM].notna() & ~h["own"]
    per_interval = interval * h.loc[~exploit, CHECK_SECONDS].median()
    gaps, turn_gap = h.loc[exploit, "gap"], h.loc[h["own"] & (h[SEGMENT_STEP] > 0), "gap"].median()
    turn_gap = None if pd.isna(turn_gap) else turn_gap  # no ordinary turn on a worker that had reported
    return {
        "exploit_cost_ratio": gaps.median() / per_interval,
        "exploit_extra_ratio": None if turn_gap is None else (gaps.median() - turn_gap) / per_interval,
        "exploit_gap_seconds_median": gaps.median(),
        "turn_gap_seconds_median": turn_gap,
        "exploits": int(exploit.sum()),
        "exploits_on_a_fresh_worker": int(gaps.isna().sum()),
        "train_seconds_per_interval": per_interval,
    }


def trial_start(history: pd.DataFrame) -> float:
    """Median worker gap before a trial's first check: starting a trial on a reused worker."""
    h = worker_gaps(history)
    return h.loc[h["own"] & (h[SEGMENT_STEP] == 0), "gap"].median()


def divergence_savings(with_stop: dict, without_stop: dict) -> dict:
    """What the divergence stop saved, and whether the trials that reached the target were untouched:
    the same trials in both runs, the same ones reached, each in the same number of steps."""
    keys = [OPTIMIZER, LR, SEED]

    def reached(trials: pd.DataFrame) -> pd.DataFrame:
        return trials.loc[trials[STATUS] == REACHED, [*keys, STEPS_TO_TARGET]]

    both = reached(with_stop["trials"]).merge(
        reached(without_stop["trials"]), on=keys, how="outer", suffixes=("", "_without")
    )
    same_trials = set(map(tuple, with_stop["trials"][keys].to_numpy())) == set(
        map(tuple, without_stop["trials"][keys].to_numpy())
    )
    same_steps = both[STEPS_TO_TARGET].eq(both[f"{STEPS_TO_TARGET}_without"]).fillna(False).astype(bool)
    return {
        "divergence_savings": 1
        - with_stop["summary"]["compute"]["trial_seconds"]
        / without_stop["summary"]["compute"]["trial_seconds"],
        "diverged_trials": with_stop["summary"]["compute"]["diverged_trials"],
        "reached_identical": bool(same_trials and len(both) and same_steps.all()),
    }


def pbt_vs_grid(grid_tables: dict, pbt_tables: dict, tolerance: float = 0.002) -> dict:
    """PBT's compute to come within ``tolerance`` of the grid's best validation accuracy, ÷ the grid's."""
    best = float(grid_tables["trials"][BEST_VAL_ACC].max())
    curve = results.compute_curve(pbt_tables["history"])
    reached = results.compute_until(curve, curve[VAL_ACC] >= best - tolerance)
    grid_seconds = grid_tables["summary"]["compute"][TRAIN_SECONDS]
    return {
        "pbt_vs_grid_compute": reached[TRAIN_SECONDS] / grid_seconds if reached else None,
        "grid_best_val_acc": best,
        "pbt_best_val_acc": float(pbt_tables["trials"][BEST_VAL_ACC].max()),
        "pbt_train_seconds_to_grid_best": reached[TRAIN_SECONDS] if reached else None,
        "grid_train_seconds": grid_seconds,
    }


SIZES = {  # the configs each size runs (configs/<grid>.yaml, configs/<pbt>.yaml), and whether the twin runs
    "quick": ("grid-quick", "pbt-quick", True),
    "cpu": ("grid-cpu", "pbt-cpu-reference", False),
    "study": ("grid", "pbt", True),
}


RUNS = ("grid", "grid-no-divergence-stop", "pbt", "ray-pbt")  # a repeat's runs, named RUN-REPEAT

BREAKDOWN_FIGURES = (
    "work_share", "overhead_share", "fixed_seconds", "turn_seconds_median", "check_overhead_seconds_median",
)  # fmt: skip


def tune_figures(size: str, storage: Path, cpus: int, repeat: int) -> dict:
    """One repeat of the Tune figures: the grid, its twin without the divergence stop, and PBT."""
    import ray

    from pbt_lab.experiments import grid, pbt, textbook

    configs = Path(__file__).resolve().parents[1] / "configs"
    grid_name, pbt_name, twin = SIZES[size]
    grid_config, pbt_config = configs / f"{grid_name}.yaml", configs / f"{pbt_name}.yaml"
    quiet = {"logging_level": "ERROR", "log_to_driver": False}  # workers' lines stay in Ray's logs
    ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, **quiet)
    try:
        grid_run, no_stop_run, pbt_run, ray_run = (f"{run}-{repeat}" for run in RUNS)
        grid_tables = tune_run(grid, grid_config, storage, grid_run)
        no_stops = ("train.stop_on_divergence=false", "train.stall_checks=null")
        no_stop = twin and tune_run(grid, grid_config, storage, no_stop_run, *no_stops)
        pbt_tables = tune_run(pbt, pbt_config, storage, pbt_run)
        ray_pbt = textbook.side_by_side(pbt_tables, str(storage), ray_run)
    finally:
        ray.shutdown()
    interval = pbt_tables["summary"]["config"]["pbt"]["perturbation_interval"]
    return {
        "tune_efficiency_grid": tune_efficiency(grid_tables),
        "tune_efficiency_pbt": tune_efficiency(pbt_tables),
        "tune_efficiency_grid_past_start": tune_efficiency(grid_tables, past_start=True),
        "tune_efficiency_pbt_past_start": tune_efficiency(pbt_tables, past_start=True),
        **exploit_cost(pbt_tables["history"], interval),
        **(divergence_savings(grid_tables, no_stop) if no_stop else {}),
        **pbt_vs_grid(grid_tables, pbt_tables),
        "trial_start_seconds_median_grid": trial_start(grid_tables["history"]),
        **{
            f"share_{kind}_{part}": share
            for kind, tables in (("grid", grid_tables), ("pbt", pbt_tables))
            for part, share in tables["summary"]["time_breakdown"]["shares"].items()
        },
        **{
            f"{figure}_{kind}": tables["summary"]["time_breakdown"][figure]
            for kind, tables in (("grid", grid_tables), ("pbt", pbt_tables))
            for figure in BREAKDOWN_FIGURES
        },
        "steps_per_check_pbt": pbt_tables["summary"]["config"]["train"]["steps_per_check"],
        "ranking_share_pbt": pbt_tables["summary"]["time_breakdown"]["shares"][VALIDATE],
        **ray_pbt,
        "slots": grid_tables["summary"]["time_breakdown"]["slots"],
    }


def repeat_figures(size: str, storage: Path, repeat: int) -> dict:
    """One repeat's figures, kept in ``figures-SIZE-N.json``: a bench run again on its storage reads them."""
    kept = storage / f"figures-{size}-{repeat}.json"
    if not kept.exists():
        for run in (storage / f"{name}-{repeat}" for name in RUNS):  # an unfinished try's runs: set
            if run.exists():  # aside, never read as this one's
                run.rename(run.with_name(f"{run.name}-unfinished-{time.strftime('%Y%m%d-%H%M%S')}"))
        write_json(kept, tune_figures(size, storage, os.cpu_count() or 1, repeat))  # whole or not at all
    else:
        print(f"repeat {repeat}: measured before, read from {kept}", flush=True)
    return json.loads(kept.read_text())  # the same figures, read back or resumed


def medians(repeats: list[dict]) -> dict:
    """Each numeric figure's median over the repeats, and its range as ``<name>_range`` [min, max]."""
    out = {}
    for key in dict.fromkeys(k for r in repeats for k in r):  # a figure some repeats lack: a list
        values = [r.get(key) for r in repeats]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
            out[f"{key}_range"] = [min(values), max(values)]
        else:
            out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


GOALS = {  # judged at every size
    "trainer_vs_fit_small": (">=", 1.0),
    "trainer_vs_fit_full": (">=", 1.0),
}
CPU_GOALS = {  # judged on the cpu reference only: a run long enough to mean something
    "overhead_share_grid": ("<=", 0.015),
    "overhead_share_pbt": ("<=", 0.035),
    "turn_seconds_median_pbt": ("<=", 0.030),
    "exploit_extra_ratio": ("<=", 0.01),
    "lab_vs_ray_pbt_work_share": (">=", 1.25),
}
SHOWN = (  # reported without a goal (at the quick size, every Tune figure)
    "work_share_grid", "work_share_pbt", "overhead_share_grid", "overhead_share_pbt", "fixed_seconds_pbt",
    "turn_seconds_median_pbt", "check_overhead_seconds_median_pbt", "exploit_extra_ratio",
    "ranking_share_pbt", "lab_vs_ray_pbt_work_share", "ray_vs_lab_pbt_seconds_to_accuracy",
    "ray_vs_lab_pbt_wall", "tune_efficiency_grid", "tune_efficiency_pbt", "exploit_cost_ratio",
    "divergence_savings", "pbt_vs_grid_compute",
)  # fmt: skip


def goal_table(figures: dict, size: str = "quick") -> list[str]:
    """The console's table: each figure measured, its median and range, and its goal, met or missed."""
    lines = [f"{'figure':32}   median   range            goal"]
    goals = {**GOALS, **(CPU_GOALS if size == "cpu" else {})}
    for key, (op, goal) in [*goals.items(), *((k, (None, None)) for k in SHOWN if k not in goals)]:
        if key not in figures:
            continue
        value, spread = figures[key], figures.get(f"{key}_range")
        shown = f"{value:.3f}" if isinstance(value, float | int) else "–"
        between = f"{spread[0]:.3f}–{spread[1]:.3f}" if spread and None not in spread else ""
        if op is None:
            lines.append(f"{key:32} {shown:>8}   {between}")
            continue
        met = isinstance(value, float | int) and (value >= goal if op == ">=" else value <= goal)
        lines.append(f"{key:32} {shown:>8}   {between:15}  {op} {goal:<5} {'met' if met else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pbt_lab.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="study",
        help="the Tune runs' configs: quick (bundled data, ~10 min on 2 cores with fewer rounds), "
        "cpu (full MNIST, 45–75 min a repeat on 2 cores), study (the study's: a GPU cluster)",
    )
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="--size quick")
    parser.add_argument("--data", help="mnist.npz or 'bundled' for Trainer/fit (default: bundled if --quick)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per Trainer/fit comparison")
    parser.add_argument("--only", choices=("trainer", "tune"), help="run one half of the benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="Tune runs: each figure a median and range")
    parser.add_argument(
        "--storage-path",
        help="where the Tune runs go (default: a new temporary directory); a bench run again on the same "
        "path reads the repeats measured there and runs the rest",
    )
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object, last")
    args = parser.parse_args(argv)
    if (args.rounds is not None and args.rounds < 1) or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    quick = args.size == "quick"
    try:
        if args.storage_path and args.only != "trainer":
            check_storage(args.storage_path)
        source = args.data or ("bundled" if quick else None)
        data = load_dataset(source) if args.only != "tune" else None
        if args.only != "trainer" and not quick and (data is None or source is not None):
            # What the cpu and study configs read ($PBT_LAB_DATA, else Keras's MNIST), unless loaded just
            # above: a missing copy is one line before anything runs.
            load_dataset(None)
    except UserError as e:
        parser.error(str(e))
    rounds = args.rounds or (3 if quick else 5)

    figures: dict[str, float] = {}
    if args.only != "tune":
        from pbt_lab.training.trainer import configure_tensorflow

        configure_tensorflow()
        for key, scale, steps in (("small", 0.25, 100), ("full", 1.0, 40 if quick else 100)):
            t = trainer_vs_fit(data, scale, steps, rounds)
            figures |= {
                f"trainer_vs_fit_{key}": t.ratio,
                f"trainer_vs_fit_{key}_range": [min(t.ratios), max(t.ratios)],
                f"trainer_img_per_s_{key}": t.trainer,
                f"fit_img_per_s_{key}": t.fit,
            }
            line = f"scale {scale:g}: Trainer {t.trainer:,.0f} img/s, Keras fit {t.fit:,.0f} img/s"
            print(f"{line}, ratio {t.ratio:.2f}", flush=True)
    if args.only != "trainer":
        storage = Path(args.storage_path or tempfile.mkdtemp(prefix="pbt_lab-bench-")).resolve()
        repeats = [repeat_figures(args.size, storage, i) for i in range(args.repeats)]
        figures |= medians(repeats) | {"repeats": args.repeats, "runs": str(storage)}
        measured = ("turn_seconds_median", "check_overhead_seconds_median", "steps_per_check")
        figures["overhead_forecast_pbt"] = forecast_table(*(figures[f"{k}_pbt"] for k in measured))
        print("\n".join(forecast_lines(figures["overhead_forecast_pbt"])))
    figures["machine"] = {**results.machine(), **results.versions()}
    m = figures["machine"]
    print(f"\non {m['cpu']}, {m['cores']} cores; TensorFlow {m['tensorflow']}, Ray {m['ray']}")
    print("\n".join(goal_table(figures, args.size)))
    if args.json:
        print(json.dumps(figures, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
