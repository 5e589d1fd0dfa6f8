"""PBT's record read back: the lineage table, the exploit audit, the decisions' quantile sizes, the winner.

Pure pandas on the history table and the scheduler's ``pbt_state.json``: no Ray, no TensorFlow, so
every check here is unit-tested on hand-made rows, wrong ones included.

The audit joins three independent records of each exploit:

- the scheduler's decision (``pbt_state.json``): recipient, donor, the donor state it meant to
  copy and the new hyperparameters;
- the donor's report of the state it was in when the checkpoint was taken (its digests);
- the recipient's report of what it restored (the checkpoint's state id and the digests of the
  state as loaded, the live rate, the optimizer's step counter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pbt_lab.config import quantile_size
from pbt_lab.names import (
    ANCESTRY,
    CHECK_SECONDS,
    EXPLOIT,
    EXPLOITED,
    FINAL_VAL_ACC,
    FRESH_SLOTS_SHA256,
    LR,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    PBT_STATE_FILE,
    REPORTED_AT,
    RESTORED_ID,
    RESTORED_LR,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SHA256,
    RESTORED_SLOTS_SHA256,
    SCORE,
    SECONDS_TO_TARGET,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOTS_SHA256,
    STATE_ID,
    STATE_SHA256,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_SECONDS,
    TRIAL_ID,
    VAL_ACC,
)
from pbt_lab.results.ray_files import read_checkpoint_meta

VERDICTS = ("verified", "mismatched", "unverifiable")
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
    """The scheduler's state as of the run's last experiment snapshot (empty if there is none)."""
    path = Path(run_dir) / PBT_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def exploit_rows(history: pd.DataFrame) -> pd.DataFrame:
    """The first report after each restore of another member's checkpoint: one per exploit."""
    return history[history[SEGMENT_FROM].notna() & (history[SEGMENT_FROM] != history[TRIAL_ID])]


def _same_lr(a, b) -> bool:
    return (
        a is not None
        and b is not None
        and not pd.isna(a)
        and not pd.isna(b)
        and math.isclose(a, b, rel_tol=1e-6)
    )


def audit(exploits: pd.DataFrame, saves: pd.DataFrame, decisions: list[dict]) -> pd.DataFrame:
    """One verdict per exploit (index of ``exploits``): ``matched`` (the scheduler decided it: this
    recipient, this donor's checkpoint, this new optimizer and rate), and
    ``verdict``: verified, mismatched (with the ``problem``) or unverifiable (the donor never
    reported the state it saved).

    Verified means: the restored state is the one the decision meant (same state id), its digest
    equals the donor's report of that state, the live rate is the new config's, and the optimizer's
    slots are the donor's (same optimizer: equal digest and step counter) or fresh (switched: the
    digest of its slots as built, and 0 steps). A decision that recorded no donor state meant none.
    """
    decided = {d["decision"]: d for d in decisions if d.get("action") == EXPLOITED}
    reported = saves.drop_duplicates(STATE_ID).set_index(STATE_ID) if len(saves) else pd.DataFrame()
    rows = []
    for index, e in exploits.iterrows():
        d = decided.get(int(e[EXPLOIT])) if pd.notna(e[EXPLOIT]) else None
        matched = (
            d is not None
            and d["member"] == e[TRIAL_ID]
            and d["donor"] == e[SEGMENT_FROM]
            and d["new"][OPTIMIZER] == e[OPTIMIZER]
            and _same_lr(d["new"][LR], e[LR])
        )
        saved = reported.loc[e[RESTORED_ID]] if e[RESTORED_ID] in reported.index else None
        problem = None
        if saved is None:
            verdict = "unverifiable"
        else:
            same_optimizer = e[RESTORED_OPTIMIZER] == e[OPTIMIZER]
            # Same optimizer: the donor's slots; switched: the slots as built, which the recipient's own
            # optimizer may have moved from before the exploit (its step counter alone would not show it).
            # Runs before fresh digests were reported lack one: their switches keep the step-counter check.
            slots = saved[SLOTS_SHA256] if same_optimizer else e[FRESH_SLOTS_SHA256]
            if not same_optimizer and pd.isna(slots):
                slots = e[RESTORED_SLOTS_SHA256]
            checks = [
                (d is None or d.get("donor_state_id") == e[RESTORED_ID], "not the state the decision meant"),
                (saved[STATE_SHA256] == e[RESTORED_SHA256], "weights differ from what the donor saved"),
                (_same_lr(e[RESTORED_LR], e[LR]), "live rate is not the new config's"),
                (
                    e[RESTORED_SLOTS_SHA256] == slots,
                    "optimizer slots differ from the donor's"
                    if same_optimizer
                    else "optimizer slots are not fresh",
                ),
                (
                    e[RESTORED_OPTIMIZER_STEPS] == (saved[OPTIMIZER_STEPS] if same_optimizer else 0),
                    "optimizer step counter is neither the donor's nor fresh",
                ),
            ]
            problem = next((why for ok, why in checks if not ok), None)
            verdict = "mismatched" if problem else "verified"
        rows.append({"index": index, "matched": matched, "verdict": verdict, "problem": problem})
    return pd.DataFrame(rows, columns=["index", "matched", "verdict", "problem"]).set_index("index")


def audit_counts(verdicts: pd.DataFrame, decisions: list[dict], exploits: pd.DataFrame) -> dict:
    """What summary.json reports: the counts add up to ``exploits`` twice (matched + unmatched, and
    verified + mismatched + unverifiable)."""
    decided = {d["decision"] for d in decisions if d.get("action") == EXPLOITED}
    carried_out = set(exploits[EXPLOIT].dropna().astype(int))
    return {
        "exploits": len(verdicts),
        "exploits_matched": int(verdicts["matched"].sum()),
        "exploits_unmatched": int((~verdicts["matched"].astype(bool)).sum()),
        **{f"exploits_{v}": int((verdicts["verdict"] == v).sum()) for v in VERDICTS},
        "exploits_decided": len(decided),
        # Decided, never carried out: the recipient was still paused when the run ended.
        "exploits_not_carried_out": len(decided - carried_out),
        "problems": sorted({p for p in verdicts["problem"].dropna()}),
    }


def lineage_table(
    exploits: pd.DataFrame,
    verdicts: pd.DataFrame,
    decisions: list[dict],
    winner_ancestry: list[dict] | None = None,
) -> pd.DataFrame:
    """One row per exploit (DESIGN §3's parquet), in the order they were carried out."""
    decided = {d["decision"]: d for d in decisions if d.get("action") == EXPLOITED}
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
            }
        )
    table = pd.DataFrame(rows, columns=LINEAGE_COLUMNS)
    return table.astype({"decision": "Int64"}).sort_values([REPORTED_AT, "recipient"]).reset_index(drop=True)


def quantile_sizes(decisions: list[dict], fraction: float) -> list[dict]:
    """Per population size ranked: how many decisions, the sizes of the replaced and donor sets
    seen, and floor(fraction × ranked) (at least 1) for comparison."""
    rows = {}
    for d in decisions:
        if d.get("lower") is None or d["lower"] == 0:
            continue  # fewer than two members ranked yet: nothing to replace
        row = rows.setdefault(
            d["ranked"],
            {
                "ranked": d["ranked"],
                "decisions": 0,
                "replaced": set(),
                "donors": set(),
                "expected": quantile_size(fraction, d["ranked"]),
            },
        )
        row["decisions"] += 1
        row["replaced"].add(d["lower"])
        row["donors"].add(d["upper"])
    return [
        {**r, "replaced": sorted(r["replaced"]), "donors": sorted(r["donors"])}
        for _, r in sorted(rows.items())
    ]


def choose_winner(trials: pd.DataFrame, history: pd.DataFrame, stopped_at_target: bool) -> str | None:
    """The run's answer, chosen on validation only (never on the test split).

    With ``pbt.stop_at_target`` the member that reached the target first wins (the run stopped for
    it); otherwise the member with the best final validation accuracy, ties to the earlier trial.
    """
    if stopped_at_target:
        reached = history[history[STEPS_TO_TARGET].notna()].sort_values(["timestamp", TRAIN_SECONDS])
        if len(reached):
            return reached.iloc[0][TRIAL_ID]
    ranked = trials.dropna(subset=[FINAL_VAL_ACC]).sort_values(
        [FINAL_VAL_ACC, TRIAL_ID], ascending=[False, True]
    )
    return ranked.iloc[0][TRIAL_ID] if len(ranked) else None


def schedule(ancestry: list[dict]) -> list[dict]:
    """The ancestry as a schedule: [{step, optimizer, lr}], one entry per change, from step 0."""
    out = []
    for s in ancestry:
        if not out or (out[-1][OPTIMIZER], out[-1][LR]) != (s[OPTIMIZER], s[LR]):
            out.append({STEP: int(s[STEP]), OPTIMIZER: s[OPTIMIZER], LR: float(s[LR])})
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
    schedule figures draw (the schedule itself is read from the member's last checkpoint)."""
    rows = history[history[TRIAL_ID] == trial_id]
    if before is not None:
        rows = rows[rows["timestamp"] <= before]
    exploits = exploit_rows(rows)
    if not len(exploits):
        return rows
    last = exploits.iloc[-1]
    head = member_schedule(history, last[SEGMENT_FROM], before=last["timestamp"])
    return pd.concat([head[head[STEP] <= last[SEGMENT_STEP]], rows.loc[last.name :]])


def schedule_changes(rows: pd.DataFrame) -> list[dict]:
    """Where the (optimizer, rate) of a run of rows changes: [{step, optimizer, lr}, …], from step 0.

    A change always comes with a restore (or a replay's switch), whose row names the step it
    started from; that step is used, not the previous row's.
    """
    changes, current, start = [], None, 0
    for _, r in rows.iterrows():
        if pd.notna(r[SEGMENT_STEP]):
            start = int(r[SEGMENT_STEP])
        if (r[OPTIMIZER], r[LR]) != current:
            changes.append({STEP: start, OPTIMIZER: r[OPTIMIZER], LR: float(r[LR])})
            current = (r[OPTIMIZER], r[LR])
        start = int(r[STEP])
    return changes


def pbt_summary(
    run_dir: Path, config: dict, trials: pd.DataFrame, history: pd.DataFrame, saves: pd.DataFrame
) -> tuple[dict, pd.DataFrame]:
    """The PBT parts of summary.json, and the lineage table: the winner (chosen on validation,
    reported on test, its ancestry read from its last checkpoint), the first member to reach the
    target, the decisions' quantile sizes, the exploit audit, the checkpoints left on disk."""
    state = read_pbt_state(run_dir)
    decisions = state.get("decisions", [])
    p = config["pbt"]
    winner_id = choose_winner(trials, history, p["stop_at_target"])
    winner = {TRIAL_ID: winner_id}
    if winner_id:
        row = trials.set_index(TRIAL_ID).loc[winner_id]
        winner.update(
            {
                VAL_ACC: plain(row[FINAL_VAL_ACC]),
                TEST_ACC: plain(row[TEST_ACC]),
                STATUS: row[STATUS],
                "steps": int(row["steps"]),
            }
        )
        if row["checkpoint"]:
            ancestry = read_checkpoint_meta(run_dir, row["checkpoint"]).get(ANCESTRY, [])
            winner.update(checkpoint=row["checkpoint"], ancestry=ancestry, schedule=schedule(ancestry))
    exploits = exploit_rows(history)
    verdicts = audit(exploits, saves, decisions)
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
            "exploits_decided": sum(d.get("action") == EXPLOITED for d in decisions),
            "quantile_fraction": p["quantile_fraction"],
            "quantile_sizes": quantile_sizes(decisions, p["quantile_fraction"]),
        },
        "exploits": {
            **audit_counts(verdicts, decisions, exploits),
            "optimizer_switches": int((table[RESTORED_OPTIMIZER] != table["new_optimizer"]).sum()),
        },
        "checkpoints": {
            "count": len(checkpoints),
            "bytes": sum(f.stat().st_size for d in checkpoints for f in d.rglob("*") if f.is_file()),
            "most_per_member": int(per_member.max()) if len(per_member) else 0,
        },
    }, table
