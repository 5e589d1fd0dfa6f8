"""The winner of a PBT run in TensorBoard (``tensorboard --logdir RUN_DIR``): its schedule and metrics
along its lineage as a run of its own, ``winner/``, under the tags the members' runs use (each
member's ``schedule/KEY``, written live by ``tuning.console.ScheduleBoard``, and Ray's own
``ray/tune/METRIC``), all stepped by training step, so the winner lays over the population."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pbt_lab.config.space import Space
from pbt_lab.names import RAY_TAG, SCHEDULE_TAG, STEP, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

BOARD_METRICS = (TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS)


def winner_board(directory: Path, rows: pd.DataFrame, space: Space, winner: str) -> Path:
    """``rows``: the winner's lineage (``member_schedule``: its donors' reports up to each copy, then
    its own)."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        writer.add_text(SCHEDULE_TAG, f"the winner, {winner}, along its lineage\n\n{space.legend()}", 0)
        for _, row in rows.sort_values(STEP, kind="stable").iterrows():
            step = int(row[STEP])
            for tag, value in space.scalars({key: row.get(key) for key in space.keys}).items():
                writer.add_scalar(tag, value, global_step=step)
            for metric in BOARD_METRICS:
                if pd.notna(row.get(metric)):
                    writer.add_scalar(f"{RAY_TAG}/{metric}", float(row[metric]), global_step=step)
    return directory
