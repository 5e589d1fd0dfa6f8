"""Retrain a PBT member's schedule from scratch: ``python -m pbt_lab.pbt --replay RUN_DIR``.

    python -m pbt_lab.pbt --replay RUN_DIR --set model.scale=1      # the winner, wider
    python -m pbt_lab.pbt --replay RUN_DIR --member TRIAL_ID        # any member

The schedule is the ancestry in the member's last checkpoint (segments of step, recipe: every searched
key, and data-order stream since step 0), not rebuilt from the tables. One trial whose trainable sets
the recipe (a new optimizer with fresh slots, a rebuilt model for a builder option) and data stream at
the schedule's steps, from the seed its lineage started with (weights, dropout, data order). (Ray's
PopulationBasedTrainingReplay pauses and restores the trial at each change; on this Ray it dropped
results around the pauses and once stopped the trial early.)
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from pbt_lab import UserError, cli, results
from pbt_lab.config import PBTExperiment
from pbt_lab.names import ANCESTRY, RECIPE, SEED, STEP, TRIAL_ID
from pbt_lab.results.lineage import schedule
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.trial_config import trial_space


def source_config(args) -> dict | None:
    """The replayed run's recorded config, the base that the YAML and --set then override."""
    if not getattr(args, "replay", None):
        return None
    _, _, summary = results.read_tables(args.replay)
    if summary.get("kind") != "pbt" or not (summary.get("winner") or {}).get("checkpoint"):
        raise UserError(
            f"--replay {args.replay}: not a finished PBT run (its summary.json names no winner's checkpoint)"
        )
    # A comparison's PBT run records the comparison's whole config: keep what a PBT run reads.
    sections = {f.name for f in fields(PBTExperiment)}
    return {k: v for k, v in summary["config"].items() if k in sections}


def check_same_data(source: str | Path, data) -> None:
    """A replay trains on the data its run trained on (by content: a changed $PBT_LAB_DATA shows)."""
    recorded = results.read_tables(source)[2].get("data") or {}
    # Runs before content hashes recorded the file's hash (and no input shape): nothing to compare.
    if "input_shape" in recorded and recorded.get("sha256") != data.sha256:
        raise UserError(
            f"--replay {source} trained on {recorded.get('source')} (sha256 {recorded['sha256'][:12]}…), "
            f"this run loads {data.source} (sha256 {data.sha256[:12]}…): set data.source to the run's data"
        )


def replay_schedule(source: str | Path, member: str | None = None) -> tuple[str, int, list[dict]]:
    """A PBT run's winner (or ``member``), its lineage's seed and its schedule [{step, recipe, seed}, …],
    read from the ancestry in the member's last checkpoint."""
    trials, _, summary = results.read_tables(source)
    member = member or summary["winner"][TRIAL_ID]
    checkpoints = trials.set_index(TRIAL_ID)["checkpoint"]
    if member not in checkpoints.index or not checkpoints[member]:
        raise UserError(
            f"--member {member}: {source} has no such member with a checkpoint "
            f"(members: {', '.join(sorted(checkpoints.index))})"
        )
    ancestry = results.read_checkpoint_meta(source, checkpoints[member]).get(ANCESTRY)
    if not ancestry:
        raise UserError(f"--replay {source}: the checkpoint {checkpoints[member]} records no ancestry")
    return member, int(ancestry[0][SEED]), schedule(ancestry)


def run_replay(run: cli.Run) -> int:
    source = run.args.replay
    train = replace(run.cfg.train, stop_at_target=False)
    run.cfg = replace(run.cfg, train=train)
    member, seed, changes = replay_schedule(source, run.args.member)
    space = {
        **trial_space(
            train, run.cfg.model, threads=run.cfg.resources.threads, seed=seed, **changes[0][RECIPE]
        ),
        "schedule": [[c[STEP], c[RECIPE], c[SEED]] for c in changes],
    }
    with cli.one_line_errors(run):
        fit(run, space)
    return cli.finish(
        run,
        "replay",
        extra={"replay_of": {"run_dir": str(source), TRIAL_ID: member, SEED: seed, "schedule": changes}},
    )
