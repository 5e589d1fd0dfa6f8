"""LabPBT's state across a resume: what ``pbt_state.json`` holds and a resumed scheduler reloads.

Ray restarts a scheduler empty on resume (ray#30838): ``KeepPBTState`` saves this state with every
experiment snapshot and hands it back; the members' parts are applied as Ray re-adds each trial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.experiment import Trial

from pbt_lab.names import DIVERGED_FLAG, PBT_STATE_FILE
from pbt_lab.storage import replace_atomically


class ResumableState:
    """LabPBT's ``state_dict`` / ``load_state_dict`` and ``pbt_state.json`` (a part of LabPBT)."""

    def state_dict(self) -> dict:
        """Everything a resumed run needs to go on as if uninterrupted (JSON-ready)."""
        members = {}
        for trial, s in self._trial_state.items():
            members[trial.trial_id] = {
                "last_score": plain(s.last_score),
                "last_perturbation_time": s.last_perturbation_time,
                "last_train_time": s.last_train_time,
                "has_checkpoint": s.last_checkpoint is not None,
                DIVERGED_FLAG: trial.trial_id in self._diverged,
                "pending": trial.trial_id in self._pending,
                "awaiting": self._pending.get(trial.trial_id),
                "last_report": self._last_report.get(trial.trial_id, 0),
            }
        # "snapshot" first: prune() reads the stored file's first bytes only.
        return {
            "snapshot": self.keeper.snapshot_count,
            "moved": {path: holder for path, (holder, _) in self.keeper.moved.items()},
            "format": 1,
            "rng": self._rng.bit_generator.state,
            "reports": self._reports,
            "next_perturbation_sync": self._next_perturbation_sync,
            "members": members,
            "decisions": self.decisions,
        }

    def load_state_dict(self, state: dict) -> None:
        self.keeper.snapshot_count = state["snapshot"]
        self.keeper.moved = {path: (holder, None) for path, holder in state.get("moved", {}).items()}
        self._rng.bit_generator.state = state["rng"]
        self._reports = state["reports"]
        self._next_perturbation_sync = state["next_perturbation_sync"]
        self.decisions = list(state["decisions"])
        self._restored = dict(state["members"])

    def _apply_member_state(self, trial: Trial, member: dict) -> None:
        s = self._trial_state[trial]
        s.last_score = member["last_score"]
        s.last_perturbation_time, s.last_train_time = (
            member["last_perturbation_time"],
            member["last_train_time"],
        )
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        if latest:
            # It resumes from its latest checkpoint: the state of its last decision, reported then.
            s.last_result = latest.metrics
            if member["has_checkpoint"]:
                s.last_checkpoint = latest.checkpoint
        if member[DIVERGED_FLAG]:
            self._diverged.add(trial.trial_id)
        if member["pending"]:
            self._pending[trial.trial_id] = member.get("awaiting")
        self._last_report[trial.trial_id] = member["last_report"]

    def write_state(self, state: dict) -> None:
        """``pbt_state.json`` beside Ray's experiment state (synced with it): what the tables read."""
        if self._trial_state:  # the driver's copy of the run directory, which Ray syncs to storage
            run_dir = next(iter(self._trial_state)).local_experiment_path
            path = Path(run_dir) / PBT_STATE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(state)))


def plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
