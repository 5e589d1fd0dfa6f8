"""History rows from the trials' reports: one row per reported check, a restart's repeats
replaced, and every state a trial described as one a checkpoint may be taken of."""

from __future__ import annotations

import pandas as pd

from pbt_lab.names import (
    CHECK_SECONDS,
    CHECK_STARTED_AT,
    DATA_SEED,
    DIVERGED_FLAG,
    EXAMPLES,
    EXPLOIT,
    FRESH_SLOTS_DIGEST,
    LEGACY_RESTORED_LR,
    LR,
    LR_USED,
    NODE_ID,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    RECIPE,
    REPORTED_AT,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESTORED_ID,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SLOTS_DIGEST,
    SCORE,
    SECONDS_TO_TARGET,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOTS_DIGEST,
    STATE_DIGEST,
    STATE_ID,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRIAL_ID,
    USED,
    VAL_ACC,
    VAL_LOSS,
    WEIGHTS,
)

HISTORY_COLUMNS = [
    TRIAL_ID,
    "iteration",
    STEP,
    TRAIN_SECONDS,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    TEST_ACC,
    OPTIMIZER,
    LR,
    LR_USED,
    DATA_SEED,
    STATUS,
    STEPS_TO_TARGET,
    SECONDS_TO_TARGET,
    CHECK_SECONDS,
    SCORE,
    DIVERGED_FLAG,
    SEGMENT_FROM,
    SEGMENT_STEP,
    EXPLOIT,
    RESTORE_KIND,
    RESTORED_ID,
    RESTORED_DIGEST,
    RESTORED_SLOTS_DIGEST,
    FRESH_SLOTS_DIGEST,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_OPTIMIZER,
    LEGACY_RESTORED_LR,
    STATE_ID,
    STATE_DIGEST,
    SLOTS_DIGEST,
    OPTIMIZER_STEPS,
    "trial_seconds",
    "timestamp",
    CHECK_STARTED_AT,
    REPORTED_AT,
    "node_ip",
    NODE_ID,
    "pid",
]
SAVED_STATE_COLUMNS = [TRIAL_ID, STEP, OPTIMIZER, STATE_ID, STATE_DIGEST, SLOTS_DIGEST, OPTIMIZER_STEPS]
PER_TRIAL = [
    "trial_dir",
    "compute_train_seconds",
    "compute_trial_seconds",
    WEIGHTS,
]  # carried to the trials table only


def read_history(reports: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per reported check of every trial, in the order reported.

    Rows that a trial re-ran after restarting from its own checkpoint (a resume, a worker
    restart: what followed the report of the restored state) replace the ones they repeat, and
    so does an exploit carried out again (a resumed
    recipient restarting from the donor's checkpoint: same decision); an exploit starts a new
    segment from the donor's state and keeps the recipient's earlier rows. ``check_seconds``
    counts every row reported, repeats included: it is the compute really spent.
    """
    frames = []
    for trial_dir, trial_reports in reports.items():
        # Compute really spent, repeats included (older runs lack check_seconds: their last train_seconds).
        spent = {
            "compute_train_seconds": sum(r.get(CHECK_SECONDS) or 0.0 for r in trial_reports)
            or (trial_reports[-1].get(TRAIN_SECONDS) or 0.0),
            "compute_trial_seconds": sum(r.get("time_this_iter_s") or 0.0 for r in trial_reports),
            WEIGHTS: trial_reports[-1].get(WEIGHTS),
        }
        kept: list[dict] = []
        for r in trial_reports:
            row = {
                **{k: r.get(k) for k in HISTORY_COLUMNS},
                **recipe_columns(r),
                "iteration": r["training_iteration"],
                "trial_seconds": r.get("time_total_s"),
                "trial_dir": trial_dir,
                **spent,
            }
            if row[SEGMENT_FROM] == row[TRIAL_ID] and row[SEGMENT_STEP] is not None:
                # A restart from its own checkpoint repeats what came after the report of the state
                # it restored (an exploit can move a trial's step back, so steps alone can mislead).
                at = next(
                    (
                        i
                        for i in range(len(kept) - 1, -1, -1)
                        if row[RESTORED_ID] and kept[i][STATE_ID] == row[RESTORED_ID]
                    ),
                    None,
                )
                kept = kept[: at + 1] if at is not None else [k for k in kept if k[STEP] <= row[SEGMENT_STEP]]
            elif row[EXPLOIT] is not None:
                again = next((i for i, k in enumerate(kept) if k[EXPLOIT] == row[EXPLOIT]), None)
                kept = kept if again is None else kept[:again]
            kept.append(row)
        frames.append(pd.DataFrame(kept))
    history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    searched = [c for c in history.columns if c not in HISTORY_COLUMNS and c not in PER_TRIAL]
    history = history.reindex(columns=[*HISTORY_COLUMNS, *searched, *PER_TRIAL])
    return history.astype(
        {
            VAL_ACC: float,
            VAL_LOSS: float,
            TRAIN_ACC: float,
            TRAIN_LOSS: float,
            TEST_ACC: float,
            SCORE: float,
            LR_USED: float,
            LEGACY_RESTORED_LR: float,
            DATA_SEED: "Int64",
            SEGMENT_STEP: "Int64",
            EXPLOIT: "Int64",
        }
    ).reset_index(drop=True)


def recipe_keys(history: pd.DataFrame) -> list[str]:
    """The history's columns of searched keys beyond the optimizer and rate (``recipe_columns``)."""
    return [
        c
        for c in history.columns
        if c not in (*HISTORY_COLUMNS, *PER_TRIAL, EXAMPLES) and not c.endswith(USED)
    ]


def recipe_columns(report: dict) -> dict:
    """A report's searched keys beyond the optimizer and rate (its recipe, one column each), the values
    its traced call read (``KEY_used``) and the examples seen."""
    recipe = {k: v for k, v in (report.get(RECIPE) or {}).items() if k not in HISTORY_COLUMNS}
    used = {k: v for k, v in report.items() if k.endswith(USED) and k not in HISTORY_COLUMNS}
    return {**recipe, **used, EXAMPLES: report.get(EXAMPLES)}


def read_saved_states(reports: dict[str, list[dict]], registered: list[dict] = ()) -> pd.DataFrame:
    """Every state a trial described as one a checkpoint might be taken of (its digests), from all
    its reports: a row a later restart re-ran still describes a checkpoint someone may have copied.
    ``registered``: reports as Ray registered them with the checkpoints a resumed run restored (PBT's
    ``registered_reports``): where a killed run's ``result.json`` lost them."""
    rows = [
        {k: r.get(k) for k in SAVED_STATE_COLUMNS}
        for r in [*(r for trial_reports in reports.values() for r in trial_reports), *registered]
        if r.get(STATE_ID)
    ]
    return pd.DataFrame(rows, columns=SAVED_STATE_COLUMNS)
