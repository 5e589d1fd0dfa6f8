"""The stall stop on recorded histories: trials that cannot learn stop, slow learners never do.

``data/stall_histories.json`` holds the per-check training loss of plain gradient descent at the
study's seed, full MNIST, quarter width, checks of 50 steps, to the 97 % target or 4,800 steps,
recorded with the stall stop off (the Trainer, ``python -m pbt_lab.train``'s settings). Two rates
sit at chance for all 4,800 steps; the slow ones leave it late and learn (0.01 reaches 97 % only
after 3,450 steps).
"""

import json
import math
from pathlib import Path

import pytest

from pbt_lab.config import GridExperiment, TrainConfig
from pbt_lab.names import REACHED, STALLED
from pbt_lab.training.state import Progress, at_chance
from pbt_lab.training.trainer import Trainer

HISTORIES = json.loads((Path(__file__).parent / "data" / "stall_histories.json").read_text())
GRID = GridExperiment().train


def checks_until_stalled(losses: list[float], checks: int, tolerance: float) -> int | None:
    """The check (1-based) at which the Trainer's own count stops the run as stalled, else None."""
    progress = Progress()
    for i, loss in enumerate(losses, 1):
        if progress.count_chance(loss, 10, tolerance) >= checks:
            return i
    return None


@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{h['optimizer']}-{h['lr']:g}")
def test_the_grid_default_stops_what_sits_at_chance_and_nothing_that_learns(history):
    stopped = checks_until_stalled(history["train_loss"], GRID.stall_checks, GRID.stall_tolerance)
    learned = any(not at_chance(loss, 10, GRID.stall_tolerance) for loss in history["train_loss"])
    if learned:  # it left chance, however late: never stopped, whether or not it reached the target
        assert stopped is None
    else:
        assert stopped == GRID.stall_checks and history["status"] != REACHED
        saved = 1 - stopped / len(history["train_loss"])
        assert saved >= 0.85  # of a 4,800-step trial that would have learned nothing


def test_the_recorded_histories_hold_stalled_and_slow_learners():
    by_rate = {h["lr"]: h for h in HISTORIES}
    assert by_rate[0.01]["status"] == REACHED and by_rate[0.01]["steps_to_target"] == 3450
    stalled = [h for h in HISTORIES if all(at_chance(x, 10, GRID.stall_tolerance) for x in h["train_loss"])]
    assert len(stalled) >= 2 and all(len(h["train_loss"]) == 96 for h in stalled)  # 4,800 steps at chance


def test_a_tighter_stop_would_cut_a_slow_learner_and_the_check_sees_it():
    """The check can fail: stopping after two checks at chance would stop GD at 0.0022, which learns."""
    slow = next(h for h in HISTORIES if h["lr"] == 0.0022)
    assert checks_until_stalled(slow["train_loss"], 2, GRID.stall_tolerance) == 2
    assert checks_until_stalled(slow["train_loss"], GRID.stall_checks, GRID.stall_tolerance) is None


def test_a_check_that_learns_resets_the_count():
    chance = math.log(10)
    losses = [chance] * 9 + [chance - 0.2] + [chance] * 9
    assert checks_until_stalled(losses, 10, 0.05) is None
    assert checks_until_stalled([chance + 0.5] * 10, 10, 0.05) == 10  # above chance counts as not learning


def test_the_trainer_stops_a_stalled_run_with_its_status(bundled):
    """GD at 1e-6 barely moves from chance: with a stop after three checks it ends stalled there."""
    t = Trainer(
        bundled, TrainConfig(optimizer="gd", lr=1e-6, steps_per_check=20, max_steps=400, stall_checks=3)
    )
    summary = t.run()
    assert summary["status"] == STALLED and summary["steps"] == 60
    assert t.progress.checks_at_chance == 3
    assert summary["test_acc"] is None and summary["final_val_acc"] < 0.5  # validated, not tested: at chance
