"""Population-based training on Ray Tune: a population of trainers that copy and mutate the best.

    python -m pbt_lab.pbt --config configs/pbt-quick.yaml
    python -m pbt_lab.pbt --replay RUN_DIR --set model.scale=1     # retrain the winner's schedule (replay.py)

Every ``perturbation_interval`` checks a member is ranked: if it is in the bottom
``max(1, floor(quantile_fraction × N))`` it copies a top member's checkpoint (weights, step, and the
optimizer slots when the optimizer stays the same) and explores new hyperparameters inside its
optimizer's range (``tuning/scheduler.py``: Ray Tune's PopulationBasedTraining with the lab's semantics).
Every exploit is audited from both sides and lands in ``lineage.parquet``; the winner is chosen on
validation and reported on the test split.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from ray.tune.search import BasicVariantGenerator

from pbt_lab import UserError, cli
from pbt_lab.config import PBTConfig, PBTExperiment
from pbt_lab.config.space import Space, nested
from pbt_lab.experiments.replay import check_same_data, replay_schedule, run_replay, source_config
from pbt_lab.names import SCORE, SEED, STOPPED
from pbt_lab.tuning.callbacks import KeepPBTState, PopulationStop
from pbt_lab.tuning.console import ScheduleBoard
from pbt_lab.tuning.explore import sample
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.scheduler import LabPBT
from pbt_lab.tuning.trial_config import points_space, trial_space


def seeds(p: PBTConfig) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams from ``pbt.seed``: the initial population's, and the scheduler's."""
    population, scheduler = np.random.SeedSequence(p.seed).spawn(2)
    return population, scheduler


def random_configs(space: Space, n: int, rng, seed: int) -> list[dict]:
    """``n`` starting points drawn from ``space`` (each key by its kind; a rate in its optimizer's range),
    seeds ``seed``, ``seed + 1``, … (PBT's population; random search, ASHA and PB2 in the comparison)."""
    return [{**sample(space, rng), SEED: seed + i} for i in range(n)]


def initial_population(p: PBTConfig, seed: int) -> list[dict]:
    """Members' starting points, drawn from ``pbt.seed``."""
    return random_configs(p.search_space, p.population, np.random.default_rng(seeds(p)[0]), seed)


def validate(run: cli.Run) -> None:
    """Before anything runs: a replay's member must have its ancestry, and a population's
    checkpoints must fit the storage."""
    if run.args.member and not run.args.replay:
        raise UserError("--member names a member to replay: use it with --replay RUN_DIR")
    if run.args.replay:
        replay_schedule(run.args.replay, run.args.member)
        check_same_data(run.args.replay, run.data)
        return
    if run.cfg.train.stall_checks:
        raise UserError(
            f"train.stall_checks={run.cfg.train.stall_checks}: PBT replaces a member that cannot learn "
            f"with a copy of one that does; leave it null"
        )
    p = run.cfg.pbt
    run.check_room(p.population, p.population * p.max_checkpoints_per_member)


def population_setup(run: cli.Run) -> tuple[dict, dict]:
    """The population's trial space and ``fit`` arguments (the comparison's pbt method too); records
    the effective training config in ``run.cfg``."""
    p = run.cfg.pbt
    # A member ends at the target only when the population does; every member validates at each
    # perturbation, where it is ranked. The summary records this effective configuration.
    train = replace(
        run.cfg.train,
        stop_at_target=p.stop_at_target,
        val_every=math.gcd(run.cfg.train.val_every, p.perturbation_interval),
        rank_examples=p.rank_examples or run.cfg.train.rank_examples,
    )
    run.cfg = replace(run.cfg, train=train)
    members = initial_population(p, train.seed)
    # A diverged member waits for PBT to copy a donor into it: past burn-in, PBT decides at least
    # once per interval, and a donor may lack a checkpoint at the first decision.
    population = {
        "metric": p.metric,
        "rescue_checks": p.burn_in_period + 2 * p.perturbation_interval,
        "searched": p.search_space.keys,
    }
    # The searched keys must be in the space; points_to_evaluate gives each member its values.
    space = trial_space(
        train,
        run.cfg.model,
        threads=run.cfg.resources.threads,
        population=population,
        **points_space(members),
    )
    scheduler = LabPBT(
        time_attr="training_iteration",  # one check
        metric=SCORE,
        mode=p.mode,
        log_config=True,  # Ray's own policy logs, for Ray's PopulationBasedTrainingReplay
        space=p.search_space,
        seed=seeds(p)[1],
        perturbation_interval=p.perturbation_interval,
        burn_in_period=p.burn_in_period,
        quantile_fraction=p.quantile_fraction,
        synch=p.synch,
        max_checkpoints_per_member=p.max_checkpoints_per_member,
    )
    return space, {
        "scheduler": scheduler,
        "search_alg": BasicVariantGenerator(
            points_to_evaluate=[nested(m) for m in members], random_state=p.seed
        ),
        "num_samples": p.population,
        "stop": PopulationStop() if p.stop_at_target else None,
        "callbacks": [KeepPBTState(scheduler), ScheduleBoard(p.search_space, scheduler)],
        "checkpoint_every": p.perturbation_interval,
        "keep_all_checkpoints": True,  # the scheduler deletes what no exploit or resume can need
    }


def run_population(run: cli.Run) -> int:
    space, arguments = population_setup(run)
    with cli.one_line_errors(run):
        fit(run, space, **arguments)
    return cli.finish(run, stopped_as=STOPPED if run.cfg.pbt.stop_at_target else None)


def main(argv: list[str] | None = None, call: cli.Call | None = None) -> int:
    def add_arguments(parser):
        parser.add_argument(
            "--replay", metavar="RUN_DIR", help="retrain the winner of this PBT run on a fresh model"
        )
        parser.add_argument("--member", metavar="TRIAL_ID", help="with --replay: retrain this member instead")

    run = cli.parse("pbt", PBTExperiment, __doc__, argv, add_arguments, source_config, validate, call)
    return run_replay(run) if run.args.replay else run_population(run)
