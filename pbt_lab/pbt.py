"""Population-based training on Ray Tune: a population of trainers that copy and mutate the best.

    python -m pbt_lab.pbt --config configs/pbt-quick.yaml
    python -m pbt_lab.pbt --replay RUN_DIR --set model.scale=1     # retrain the winner's schedule

Ray Tune's own PopulationBasedTraining decides: every ``perturbation_interval`` checks, a member
in the bottom ``quantile_fraction`` copies a top member's checkpoint (weights, step, and the
optimizer slots when the optimizer is the same) and a mutated copy of its hyperparameters. The
learning rate is perturbed (× 0.8 / 1.2) or resampled by Ray, then kept inside the optimizer's
range; the optimizer is switched only by resampling (``OptimizerSwitch``). Every exploit is
verified by the trainable and lands in ``lineage.parquet``.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from pbt_lab import UserError, results
from pbt_lab.config import PBTConfig, PBTExperiment
from pbt_lab.launch import Launch
from pbt_lab.trainable import DIVERGED_SCORE, trial_space


@dataclass(frozen=True)
class OptimizerSwitch:
    """PBT's ``custom_explore_fn``: keep the rate inside its optimizer's range, and sometimes switch
    optimizer, by resampling (a list of names has no meaningful neighbour).

    A switched member keeps its rate's *relative* place in the range: a donor that PBT has
    decayed to the bottom of Adam's range lands at the bottom of SGD's, so a well-trained model
    is not hit with a rate suited to training from scratch.
    """

    optimizers: tuple[str, ...]
    lr_ranges: dict
    switch_probability: float

    def __call__(self, config: dict) -> dict:
        low, high = self.lr_ranges[config["optimizer"]]
        lr = min(max(config["lr"], low), high)
        others = [o for o in self.optimizers if o != config["optimizer"]]
        if others and random.random() < self.switch_probability:
            place = (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))
            config["optimizer"] = random.choice(others)
            low, high = self.lr_ranges[config["optimizer"]]
            lr = math.exp(math.log(low) + place * (math.log(high) - math.log(low)))
        config["lr"] = lr
        return config


def initial_population(p: PBTConfig, seed: int) -> list[dict]:
    """Members' starting points: optimizer and log-uniform rate in its range, from a seeded generator."""
    rng = np.random.default_rng(p.seed)
    members = []
    for i in range(p.population):
        optimizer = p.optimizers[rng.integers(len(p.optimizers))]
        low, high = p.lr_ranges[optimizer]
        members.append({"optimizer": optimizer, "lr": float(np.exp(rng.uniform(np.log(low), np.log(high)))),
                        "seed": seed + i})
    return members


class LabPBT(PopulationBasedTraining):
    """Ray's PBT with two fixes, measured as failures here:

    - a diverged member is never a donor: with more diverged members than the lower quantile
      holds, Ray would rank some into the upper one and copy their weights;
    - fair turns: Ray runs the waiting member with the least training time, ties broken by the
      trial list's order. A recipient inherits its donor's time, so it ties with the paused donors;
      after a resume the recipients came first in that order, exploited the paused donors again and
      again and never let them run (a livelock). Ties go to the member that reported longest ago.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._reports = 0
        self._last_report: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._reports += 1
        self._last_report[trial.trial_id] = self._reports
        return super().on_trial_result(tune_controller, trial, result)

    def choose_trial_to_run(self, tune_controller):
        waiting = [t for t in tune_controller.get_trials() if t.status in (Trial.PENDING, Trial.PAUSED)]
        return min(waiting, default=None, key=lambda t: (self._trial_state[t].last_train_time,
                                                         self._last_report.get(t.trial_id, 0)))

    def _quantiles(self):
        lower, upper = super()._quantiles()
        upper = [t for t in upper if self._trial_state[t].last_score > DIVERGED_SCORE]
        return (lower, upper) if upper else ([], [])


def scheduler(p: PBTConfig) -> PopulationBasedTraining:
    low = min(p.lr_ranges[o][0] for o in p.optimizers)
    high = max(p.lr_ranges[o][1] for o in p.optimizers)
    return LabPBT(
        time_attr="training_iteration",
        metric="score",
        mode="max",
        perturbation_interval=p.perturbation_interval,
        burn_in_period=p.burn_in_period,
        quantile_fraction=p.quantile_fraction,
        perturbation_factors=tuple(p.perturbation_factors),
        resample_probability=p.resample_probability,
        hyperparam_mutations={"lr": tune.loguniform(low, high)},
        custom_explore_fn=OptimizerSwitch(tuple(p.optimizers), p.lr_ranges, p.optimizer_switch_probability),
    )


class PopulationStop(tune.Stopper):
    """Stops every member once any member has reached the target."""

    def __init__(self):
        self.reached = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.reached = self.reached or result.get("steps_to_target") is not None
        return False

    def stop_all(self) -> bool:
        return self.reached


def run_population(launch: Launch) -> dict:
    cfg: PBTExperiment = launch.cfg
    p = cfg.pbt
    random.seed(p.seed)  # PBT's own choices (quantiles ties, donors, perturbations) use `random`
    # Members never stop at the target on their own (the population may); they validate at
    # every perturbation, where they are ranked.
    train = replace(cfg.train, stop_at_target=False, val_every=math.gcd(cfg.train.val_every, p.perturbation_interval))
    members = initial_population(p, train.seed)
    # A diverged member waits for PBT to copy a donor into it: past burn-in, PBT decides at least
    # once per interval, and a donor may lack a checkpoint at the first decision.
    population = {"metric": p.metric, "rescue_checks": p.burn_in_period + 2 * p.perturbation_interval}
    space = trial_space(train, cfg.model, threads=cfg.resources.threads, population=population,
                        optimizer=tune.choice(p.optimizers), lr=members[0]["lr"], seed=train.seed)
    launch.fit(space, scheduler=scheduler(p), search_alg=BasicVariantGenerator(points_to_evaluate=members),
               num_samples=p.population, stop=PopulationStop() if p.stop_at_target else None,
               checkpoint_every=p.perturbation_interval,
               # A recipient may wait paused while its donor trains on, pausing (and checkpointing)
               # in turn: with 4 kept, a busy machine deleted a donor's checkpoint before the copy.
               keep_checkpoints=2 * p.population)
    return results.write_tables(launch.run_dir, kind="pbt", config=launch.config_dict(), data=launch.data.identity(),
                                wall_seconds=launch.wall_seconds, stopped_as="capped")


# --- replay ----------------------------------------------------------------------------------


def _source_config(args) -> dict | None:
    if not getattr(args, "replay", None):
        return None
    _, _, summary = results.read_tables(args.replay)
    if summary.get("kind") != "pbt" or not summary.get("best"):
        raise UserError(f"--replay {args.replay}: not a finished PBT run (its summary.json has no PBT winner)")
    return summary["config"]


def replay_schedule(source: Path, fixed: dict) -> tuple[str, list[tuple[int, dict]]]:
    """The winner and its schedule as (step it takes effect, trial config) pairs, from the lab's own
    lineage records (Ray's policy files lose what came before a resume), with the replay's fixed parts."""
    trials, history, summary = results.read_tables(source)
    winner = summary["winner"]["trial_id"]
    rows = results.member_schedule(history, winner)
    seed = int(trials.set_index("trial_id").loc[rows.iloc[0]["trial_id"], "seed"])  # the lineage's root
    return winner, [(c["step"], {"optimizer": c["optimizer"], "lr": c["lr"], "seed": seed, **fixed})
            for c in results.schedule_changes(rows)]


def run_replay(launch: Launch) -> dict:
    """Retrain the winner's schedule on a fresh model (``--set model.scale=…`` for another width).

    One trial whose trainable switches optimizer and rate at the schedule's steps, as the winner
    did. (Ray's PopulationBasedTrainingReplay pauses and restores the trial at each change; on
    this Ray it dropped results around the pauses and once stopped the trial early.)
    """
    source = Path(launch.args.replay).expanduser()
    cfg: PBTExperiment = launch.cfg
    train = replace(cfg.train, stop_at_target=False)
    fixed = trial_space(train, cfg.model, threads=cfg.resources.threads)
    winner, schedule = replay_schedule(source, fixed)
    space = {**schedule[0][1], "schedule": [[step, c["optimizer"], c["lr"]] for step, c in schedule]}
    launch.fit(space)
    return results.write_tables(launch.run_dir, kind="replay", config=launch.config_dict(),
                                data=launch.data.identity(), wall_seconds=launch.wall_seconds,
                                extra={"replay_of": {"run_dir": str(source), "trial_id": winner, "schedule": [
                                    {"step": step, "optimizer": c["optimizer"], "lr": c["lr"]} for step, c in schedule]}})


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser):
        parser.add_argument("--replay", metavar="RUN_DIR", help="retrain the winner of this PBT run on a fresh model")

    launch = Launch.parse("pbt", PBTExperiment, __doc__.splitlines()[0], argv, add_arguments, _source_config)
    tables = run_replay(launch) if launch.args.replay else run_population(launch)
    print(results.console_summary(tables, launch.run_dir))
    return results.exit_status(tables)


if __name__ == "__main__":
    sys.exit(main())
