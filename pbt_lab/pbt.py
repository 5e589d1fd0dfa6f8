"""Population-based training on Ray Tune: a population of trainers that copy and mutate the best.

    python -m pbt_lab.pbt --config configs/pbt-quick.yaml
    python -m pbt_lab.pbt --replay RUN_DIR --set model.scale=1     # retrain the winner's schedule

Every ``perturbation_interval`` checks a member is ranked: if it is in the bottom
``max(1, floor(quantile_fraction × N))`` it copies a top member's checkpoint (weights, step, and the
optimizer slots when the optimizer stays the same) and explores new hyperparameters inside its
optimizer's range (``scheduler.py``: Ray Tune's PopulationBasedTraining with the lab's semantics).
Every exploit is audited from both sides and lands in ``lineage.parquet``; the winner is chosen on
validation and reported on the test split.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune.search import BasicVariantGenerator

from pbt_lab import UserError, lineage, results
from pbt_lab.config import PBTConfig, PBTExperiment
from pbt_lab.launch import Launch, free_bytes
from pbt_lab.names import ANCESTRY, SCORE, STOPPED
from pbt_lab.scheduler import ExplorePolicy, KeepPBTState, LabPBT, PopulationStop
from pbt_lab.trainable import trial_space

CHECKPOINTS_PER_MEMBER = 3  # what the scheduler keeps at most, about (README, "What PBT does here")


def seeds(p: PBTConfig) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams from ``pbt.seed``: the initial population's, and the scheduler's."""
    population, scheduler = np.random.SeedSequence(p.seed).spawn(2)
    return population, scheduler


def initial_population(p: PBTConfig, seed: int) -> list[dict]:
    """Members' starting points: optimizer and log-uniform rate in its range, from ``pbt.seed``."""
    rng = np.random.default_rng(seeds(p)[0])
    members = []
    for i in range(p.population):
        optimizer = p.optimizers[rng.integers(len(p.optimizers))]
        low, high = p.lr_ranges[optimizer]
        members.append({"optimizer": optimizer, "lr": float(np.exp(rng.uniform(np.log(low), np.log(high)))),
                        "seed": seed + i})
    return members


def validate(launch: Launch) -> None:
    """Before anything runs: a replay's member must have its ancestry, and a population's
    checkpoints must fit the storage."""
    if launch.args.member and not launch.args.replay:
        raise UserError("--member names a member to replay: use it with --replay RUN_DIR")
    if launch.args.replay:
        replay_schedule(launch.args.replay, launch.args.member)
        return
    p, model = launch.cfg.pbt, launch.cfg.model
    # Weights and up to two slots per weight (Adam, Adadelta), 4 bytes each.
    need = p.population * CHECKPOINTS_PER_MEMBER * 12 * results.weight_count(asdict(model))
    free = free_bytes(launch.storage_path)
    if free is not None and need > free:
        raise UserError(f"pbt.population={p.population}: its checkpoints need about {need / 1e9:.3g} GB and "
                        f"{launch.storage_path} has {free / 1e9:.3g} GB free")


def run_population(launch: Launch) -> dict:
    p = launch.cfg.pbt
    # A member ends at the target only when the population does; every member validates at each
    # perturbation, where it is ranked. The summary records this effective configuration.
    train = replace(launch.cfg.train, stop_at_target=p.stop_at_target,
                    val_every=math.gcd(launch.cfg.train.val_every, p.perturbation_interval))
    launch.cfg = replace(launch.cfg, train=train)
    members = initial_population(p, train.seed)
    # A diverged member waits for PBT to copy a donor into it: past burn-in, PBT decides at least
    # once per interval, and a donor may lack a checkpoint at the first decision.
    population = {"metric": p.metric, "rescue_checks": p.burn_in_period + 2 * p.perturbation_interval}
    space = trial_space(train, launch.cfg.model, threads=launch.cfg.resources.threads, population=population,
                        optimizer=tune.choice(p.optimizers), lr=members[0]["lr"], seed=train.seed)
    scheduler = LabPBT(ExplorePolicy.of(p), seed=seeds(p)[1], metric=SCORE, perturbation_interval=p.perturbation_interval,
                       burn_in_period=p.burn_in_period, quantile_fraction=p.quantile_fraction, synch=p.synch)
    launch.fit(space, scheduler=scheduler,
               search_alg=BasicVariantGenerator(points_to_evaluate=members, random_state=p.seed),
               num_samples=p.population, stop=PopulationStop() if p.stop_at_target else None,
               callbacks=[KeepPBTState(scheduler)], checkpoint_every=p.perturbation_interval,
               keep_all_checkpoints=True)  # the scheduler deletes what no exploit or resume can need
    return results.write_tables(launch.run_dir, kind="pbt", config=launch.config_dict(), data=launch.data.identity(),
                                wall_seconds=launch.wall_seconds, stopped_as=STOPPED if p.stop_at_target else None)


# --- replay ----------------------------------------------------------------------------------


def _source_config(args) -> dict | None:
    if not getattr(args, "replay", None):
        return None
    _, _, summary = results.read_tables(args.replay)
    if summary.get("kind") != "pbt" or not (summary.get("winner") or {}).get("checkpoint"):
        raise UserError(f"--replay {args.replay}: not a finished PBT run (its summary.json names no winner's checkpoint)")
    return summary["config"]


def replay_schedule(source: str | Path, member: str | None = None) -> tuple[str, int, list[dict]]:
    """A PBT run's winner (or ``member``), its lineage's seed and its schedule [{step, optimizer, lr}],
    read from the ancestry in the member's last checkpoint (not rebuilt from the tables)."""
    trials, _, summary = results.read_tables(source)
    member = member or summary["winner"]["trial_id"]
    checkpoints = trials.set_index("trial_id")["checkpoint"]
    if member not in checkpoints.index or not checkpoints[member]:
        raise UserError(f"--member {member}: {source} has no such member with a checkpoint "
                        f"(members: {', '.join(sorted(checkpoints.index))})")
    ancestry = results.read_checkpoint_meta(source, checkpoints[member]).get(ANCESTRY)
    if not ancestry:
        raise UserError(f"--replay {source}: the checkpoint {checkpoints[member]} records no ancestry")
    return member, int(ancestry[0]["seed"]), lineage.schedule(ancestry)


def run_replay(launch: Launch) -> dict:
    """Retrain the winner's (or ``--member``'s) schedule on a fresh model (``--set model.scale=…`` for another width).

    One trial whose trainable switches optimizer and rate at the schedule's steps, as the winner
    did, from the seed its lineage started with (weights, dropout and data order). (Ray's
    PopulationBasedTrainingReplay pauses and restores the trial at each change; on this Ray it
    dropped results around the pauses and once stopped the trial early.)
    """
    source = launch.args.replay
    train = replace(launch.cfg.train, stop_at_target=False)
    launch.cfg = replace(launch.cfg, train=train)
    winner, seed, schedule = replay_schedule(source, launch.args.member)
    space = {**trial_space(train, launch.cfg.model, threads=launch.cfg.resources.threads,
                           optimizer=schedule[0]["optimizer"], lr=schedule[0]["lr"], seed=seed),
             "schedule": [[c["step"], c["optimizer"], c["lr"]] for c in schedule]}
    launch.fit(space)
    return results.write_tables(launch.run_dir, kind="replay", config=launch.config_dict(),
                                data=launch.data.identity(), wall_seconds=launch.wall_seconds,
                                extra={"replay_of": {"run_dir": str(source), "trial_id": winner, "seed": seed,
                                                     "schedule": schedule}})


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser):
        parser.add_argument("--replay", metavar="RUN_DIR", help="retrain the winner of this PBT run on a fresh model")
        parser.add_argument("--member", metavar="TRIAL_ID", help="with --replay: retrain this member instead of the winner")

    launch = Launch.parse("pbt", PBTExperiment, __doc__.splitlines()[0], argv, add_arguments, _source_config,
                          validate)
    tables = run_replay(launch) if launch.args.replay else run_population(launch)
    print(results.console_summary(tables, launch.run_dir))
    return results.exit_status(tables)


if __name__ == "__main__":
    sys.exit(main())
