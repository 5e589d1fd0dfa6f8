"""PBT's record read back: the lineage table, the decisions' quantile sizes, the winner and its schedule.

Pure pandas on the history table and the scheduler's ``pbt_state.json``: no Ray, no TensorFlow, so
every check here is unit-tested on hand-made rows. The exploits are audited as every restore is
(``audit.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pbt_lab.config import quantile_size
from pbt_lab.config.space import segment_recipe
from pbt_lab.names import (
    ANCESTRY,
    CHECK_SECONDS,
    DATA_SEED,
    EXPLOIT,
    FINAL_VAL_ACC,
    FINAL_VAL_LOSS,
    LR,
    OPTIMIZER,
    PBT_STATE_FILE,
    RECIPE,
    REPORTED_AT,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    SCORE,
    SECONDS_TO_TARGET,
    SEED,
    SEGMENT_FROM,
    SEGMENT_STEP,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_SECONDS,
    TRIAL_ID,
    VAL_ACC,
    VAL_LOSS,
)
from pbt_lab.results.audit import exploit_counts, exploit_rows, exploited_decisions, undone_exploits
from pbt_lab.results.history import recipe_keys
from pbt_lab.results.ray_files import read_checkpoint_meta

LINEAGE_COLUMNS = [
    STEP,
    "recipient",
    "donor",
    "old_optimizer",
    "old_lr",
    "new_optimizer",
    "new_lr",
    "recipient_score",
    "donor_score",
    "decision",
    "operation",
    "source",
    "matched",
    "verdict",
    "problem",
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    "in_winner_ancestry",
    "timestamp",
    REPORTED_AT,
    "recipient_iteration",
]


def read_pbt_state(run_dir: str | Path) -> dict:
    """The scheduler's state as of the run's last experiment snapshot (empty if there is none, and
    ``{"cut_short": True}`` if its copy to storage was cut short: no decisions to match, so every
    exploit fails the audit)."""
    path = Path(run_dir) / PBT_STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {"cut_short": True}


def lineage_table(
    exploits: pd.DataFrame,
    verdicts: pd.DataFrame,
    decisions: list[dict],
    winner_ancestry: list[dict] | None = None,
) -> pd.DataFrame:
    """One row per exploit (DESIGN §3's parquet), in the order they were carried out."""
    decided = exploited_decisions(decisions)
    on_winner = {(s["trial"], s[STEP]) for s in (winner_ancestry or [])[1:]}  # the segments a copy began
    rows = []
    for index, e in exploits.iterrows():
        d = decided.get(int(e[EXPLOIT])) if pd.notna(e[EXPLOIT]) else {}
        d = d or {}
        v = verdicts.loc[index]
        rows.append(
            {
                STEP: int(e[SEGMENT_STEP]),
                "recipient": e[TRIAL_ID],
                "donor": d.get("donor", e[SEGMENT_FROM]),
                "old_optimizer": d.get("old", {}).get(OPTIMIZER),
                "old_lr": d.get("old", {}).get(LR),
                "new_optimizer": e[OPTIMIZER],
                "new_lr": e[LR],
                "recipient_score": d.get(SCORE),
                "donor_score": d.get("donor_score"),
                "decision": e[EXPLOIT],
                "operation": d.get("operation"),
                "source": e[SEGMENT_FROM],  # whose save the checkpoint was (the donor, unless Ray swapped it)
                "matched": bool(v["matched"]),
                "verdict": v["verdict"],
                "problem": v["problem"],
                RESTORED_OPTIMIZER: e[RESTORED_OPTIMIZER],
                RESTORED_OPTIMIZER_STEPS: e[RESTORED_OPTIMIZER_STEPS],
                "in_winner_ancestry": (e[TRIAL_ID], int(e[SEGMENT_STEP])) in on_winner,
                "timestamp": e["timestamp"],
                REPORTED_AT: e[REPORTED_AT],
                "recipient_iteration": e["iteration"],
                **key_columns(d),
            }
        )
    extra = sorted({k for r in rows for k in r} - set(LINEAGE_COLUMNS))
    table = pd.DataFrame(rows, columns=[*LINEAGE_COLUMNS, *extra])
    return table.astype({"decision": "Int64"}).sort_values([REPORTED_AT, "recipient"]).reset_index(drop=True)


def changed_keys(decisions: list[dict]) -> dict[str, int]:
    """How many exploits mutated each searched key (its new value other than the donor's)."""
    counts: dict[str, int] = {}
    for d in exploited_decisions(decisions).values():
        for key, value in (d.get("new") or {}).items():
            counts[key] = counts.get(key, 0) + int(value != (d.get("donor_config") or {}).get(key))
    return counts


def key_columns(d: dict) -> dict:
    """An exploit's searched keys: the recipient's old value, the donor's it was explored from, the new
    one and the operation (old_KEY, donor_KEY, new_KEY, operation_KEY; the optimizer's and rate's old and
    new are columns of their own)."""
    operations, donor = d.get("operations") or {}, d.get("donor_config") or {}
    columns = {}
    for key, new in (d.get("new") or {}).items():
        if key not in (OPTIMIZER, LR):
            # (a decision recovered on a resume does not know the old value: None)
            columns |= {f"old_{key}": (d.get("old") or {}).get(key), f"new_{key}": new}
        columns |= {f"donor_{key}": donor.get(key), f"operation_{key}": operations.get(key)}
    return columns


def quantile_sizes(decisions: list[dict], fraction: float) -> list[dict]:
    """Per number of fresh scores ranked (and population): how many decisions, the sizes of the
    replaced and donor sets seen, and the quantile size the rule gives (``quantile_size``)."""
    rows = {}
    for d in decisions:
        if d.get("ranked") is None or d["ranked"] < 2:
            continue  # fewer than two ranked: nothing to compare
        population = d.get("population", d["ranked"])
        row = rows.setdefault(
            (d["ranked"], population),
            {
                "ranked": d["ranked"],
                "population": population,
                "decisions": 0,
                "replaced": set(),
                "donors": set(),
                "expected": quantile_size(fraction, d["ranked"], population),
            },
        )
        row["decisions"] += 1
        row["replaced"].add(d["lower"])
        row["donors"].add(d["upper"])
    return [
        {**r, "replaced": sorted(r["replaced"]), "donors": sorted(r["donors"])}
        for _, r in sorted(rows.items())
    ]


def choose_winner(
    trials: pd.DataFrame,
    history: pd.DataFrame,
    stopped_at_target: bool,
    metric: str = VAL_ACC,
    mode: str = "max",
) -> str | None:
    """The run's answer, chosen by the metric PBT ranked by (``pbt.metric``, ``pbt.mode``), never on the
    test split.

    With ``pbt.stop_at_target`` the member that reached the target first wins (the run stopped for
    it); otherwise the member with the best final ``metric``, ties to the earlier trial.
    """
    if stopped_at_target:
        reached = history[history[STEPS_TO_TARGET].notna()].sort_values(["timestamp", TRAIN_SECONDS])
        if len(reached):
            return reached.iloc[0][TRIAL_ID]
    final = f"final_{metric}"
    ranked = trials.dropna(subset=[final]).sort_values([final, TRIAL_ID], ascending=[mode == "min", True])
    return ranked.iloc[0][TRIAL_ID] if len(ranked) else None


def schedule_entry(step: int, recipe: dict, seed) -> dict:
    """One change of a schedule: from ``step`` on, the searched keys at ``recipe``'s values (the optimizer
    and rate also at the top) and the data-order stream ``seed``."""
    return {STEP: int(step), OPTIMIZER: recipe.get(OPTIMIZER), LR: recipe.get(LR), RECIPE: recipe, SEED: seed}


def schedule(ancestry: list[dict]) -> list[dict]:
    """The ancestry as a schedule: [{step, optimizer, lr, recipe, seed}], one entry per change, from
    step 0 (``recipe``: every searched key; ``seed``: the data-order stream the lineage drew from)."""
    out = []
    for s in ancestry:
        recipe = segment_recipe(s)
        if not out or (out[-1][RECIPE], out[-1][SEED]) != (recipe, int(s[SEED])):
            out.append(schedule_entry(s[STEP], recipe, int(s[SEED])))
    return out


def plain(value):
    """JSON-ready Python values from NumPy/pandas scalars (NaN and NA become null)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def member_schedule(history: pd.DataFrame, trial_id: str, before: float | None = None) -> pd.DataFrame:
    """The history rows along a member's lineage, followed back through its donors: what the
    schedule figures draw (the schedule itself is read from the member's last checkpoint). A donor's
    rows count up to the moment the copy's first report left (``reported_at``, to the microsecond:
    Ray's whole-second ``timestamp`` let two members that copied each other within one second send
    this round in circles)."""
    when = REPORTED_AT if history[REPORTED_AT].notna().all() else "timestamp"  # older runs: seconds
    rows = history[history[TRIAL_ID] == trial_id]
    if before is not None:
        rows = rows[rows[when] < before] if when == REPORTED_AT else rows[rows[when] <= before]
    exploits = exploit_rows(rows)
    if not len(exploits):
        return rows
    last = exploits.iloc[-1]
    head = member_schedule(history, last[SEGMENT_FROM], before=last[when])
    return pd.concat([head[head[STEP] <= last[SEGMENT_STEP]], rows.loc[last.name :]])


def schedule_changes(rows: pd.DataFrame) -> list[dict]:
    """Where the recipe (every searched key) or data seed of a run of rows changes: [{step, optimizer,
    lr, recipe, seed}, …], from step 0: ``schedule`` as the reports recorded it.

    A change always comes with a restore (or a replay's switch), whose row names the step it
    started from; that step is used, not the previous row's.
    """
    changes, current, start = [], None, 0
    keys = recipe_keys(rows)
    for _, r in rows.iterrows():
        if pd.notna(r[SEGMENT_STEP]):
            start = int(r[SEGMENT_STEP])
        seed = None if pd.isna(r.get(DATA_SEED)) else int(r[DATA_SEED])  # runs before data streams: none
        recipe = {OPTIMIZER: r[OPTIMIZER], LR: float(r[LR]), **{k: plain(r[k]) for k in keys}}
        if (recipe, seed) != current:
            changes.append(schedule_entry(start, recipe, seed))
            current = (recipe, seed)
        start = int(r[STEP])
    return changes


def pbt_summary(
    run_dir: Path,
    config: dict,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    decisions: list[dict],
    verdicts: pd.DataFrame,
) -> tuple[dict, pd.DataFrame]:
    """The PBT parts of summary.json, and the lineage table: the winner (chosen on validation,
    reported on test, its ancestry read from its last checkpoint), the first member to reach the
    target, the decisions' quantile sizes, the exploits' audit (``verdicts``: every restore's), the
    checkpoints left on disk."""
    p = config["pbt"]
    winner_id = choose_winner(
        trials, history, p["stop_at_target"], p.get("metric", VAL_ACC), p.get("mode") or "max"
    )
    winner = {TRIAL_ID: winner_id}
    if winner_id:
        row = trials.set_index(TRIAL_ID).loc[winner_id]
        winner.update(
            {
                VAL_ACC: plain(row[FINAL_VAL_ACC]),
                VAL_LOSS: plain(row.get(FINAL_VAL_LOSS)),
                TEST_ACC: plain(row[TEST_ACC]),
                STATUS: row[STATUS],
                "steps": int(row["steps"]),
            }
        )
        if row["checkpoint"]:
            ancestry = read_checkpoint_meta(run_dir, row["checkpoint"]).get(ANCESTRY, [])
            winner.update(checkpoint=row["checkpoint"], ancestry=ancestry, schedule=schedule(ancestry))
    exploits = exploit_rows(history)
    verdicts = verdicts.loc[exploits.index]
    undone = undone_exploits(decisions, exploits, trials.set_index(TRIAL_ID)[STATUS].to_dict())
    table = lineage_table(exploits, verdicts, decisions, winner.get(ANCESTRY))
    reached = history[history[STEPS_TO_TARGET].notna()].sort_values(["timestamp", TRAIN_SECONDS])
    first = None
    if len(reached):
        r = reached.iloc[0]
        first = {
            TRIAL_ID: r[TRIAL_ID],
            STEPS_TO_TARGET: int(r[STEPS_TO_TARGET]),
            SECONDS_TO_TARGET: float(r[SECONDS_TO_TARGET]),
            "population_train_seconds": float(
                history.loc[history["timestamp"] <= r["timestamp"], CHECK_SECONDS].sum()
            ),
        }
    checkpoints = [d for d in run_dir.glob("*/checkpoint_*") if d.is_dir()]
    per_member = pd.Series([d.parent.name for d in checkpoints]).value_counts()
    return {
        "winner": winner,
        "first_to_target": first,
        "decisions": {
            "count": len(decisions),
            "exploits_decided": len(exploited_decisions(decisions)),
            "quantile_fraction": p["quantile_fraction"],
            "quantile_sizes": quantile_sizes(decisions, p["quantile_fraction"]),
        },
        "exploits": {
            **exploit_counts(verdicts, decisions, undone),
            "optimizer_switches": int((table[RESTORED_OPTIMIZER] != table["new_optimizer"]).sum()),
            "changed": changed_keys(decisions),
        },
        "checkpoints": {
            "count": len(checkpoints),
            "bytes": sum(f.stat().st_size for d in checkpoints for f in d.rglob("*") if f.is_file()),
            "most_per_member": int(per_member.max()) if len(per_member) else 0,
        },
    }, table
