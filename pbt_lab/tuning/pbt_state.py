"""LabPBT's state across a resume: what ``pbt_state.json`` holds and a resumed scheduler reloads.

Ray restarts a scheduler empty on resume (ray#30838): ``KeepPBTState`` saves this state with every
experiment snapshot and hands it back; the members' parts are applied as Ray re-adds each trial.

Ray uploads a snapshot file by file, so a run killed during an upload resumes with its trials (their
configs and checkpoints: Ray's experiment state, one file) from one snapshot and this state from the one
before or after. The trials are what resumes: a decision they do not carry was interrupted; an exploit
they carry that this state lacks is recovered from them; and the report each member's checkpoint was
registered with (Ray's copy of the saver's report) is kept for the audit, whose own copy (the trial's
``result.json``) such a kill may have lost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.experiment import Trial

from pbt_lab.names import (
    DIVERGED_FLAG,
    EXPLOIT,
    EXPLOITED,
    PBT_STATE_FILE,
    STATE_ID,
    TRIAL_ID,
    UNRECORDED,
)
from pbt_lab.storage import replace_atomically
from pbt_lab.tuning.ray_space import values_at


class ResumableState:
    """LabPBT's ``state_dict`` / ``load_state_dict`` and ``pbt_state.json`` (a part of LabPBT)."""

    # The reports resumed members' checkpoints were registered with, as Ray's snapshot holds them.
    _registered_reports: tuple = ()

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
            "registered_reports": list(self._registered_reports),
        }

    def load_state_dict(self, state: dict) -> None:
        self.keeper.snapshot_count = state["snapshot"]
        self.keeper.moved = {path: (holder, None) for path, holder in state.get("moved", {}).items()}
        self._rng.bit_generator.state = state["rng"]
        self._reports = state["reports"]
        self._next_perturbation_sync = state["next_perturbation_sync"]
        self.decisions = list(state["decisions"])
        self._restored = dict(state["members"])
        self._registered_reports = tuple(state.get("registered_reports", ()))

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
            known = {r[STATE_ID] for r in self._registered_reports}
            if latest.metrics.get(STATE_ID) and latest.metrics[STATE_ID] not in known:
                self._registered_reports += (_jsonable(latest.metrics),)
        if member[DIVERGED_FLAG]:
            self._diverged.add(trial.trial_id)
        awaiting = self._exploit_resumed(trial, member, latest)
        if awaiting is not None or member["pending"]:
            self._pending[trial.trial_id] = awaiting
        self._last_report[trial.trial_id] = member["last_report"]

    def _exploit_resumed(self, trial: Trial, member: dict, latest) -> int | None:
        """The exploit a resumed member is to carry out, as its trial (Ray's snapshot) has it."""
        carries = trial.config.get(EXPLOIT)
        awaiting = member.get("awaiting") if member["pending"] else None
        donor = latest and latest.metrics.get(TRIAL_ID)
        if awaiting is not None and (carries is None or carries < awaiting):
            # Decided after the trials' snapshot (decisions are numbered in time): it resumes from its
            # state before the decision.
            self.decisions[awaiting]["interrupted"] = True
            s = self._trial_state[trial]
            if latest:
                s.last_train_time = s.last_perturbation_time = latest.metrics.get("training_iteration", 0)
            awaiting = None
        elif awaiting is not None and (carries > awaiting or donor in (None, trial.trial_id)):
            awaiting = None  # the trials' snapshot is newer: it carried the exploit out, and saved since
        if donor in (None, trial.trial_id) or carries is None:
            return awaiting
        # Its trial waits to copy another member's checkpoint under the decision its config names.
        if carries < len(self.decisions) and self.decisions[carries]["action"] != UNRECORDED:
            return carries
        # A decision this state lacks: its record, from the trial (the new values, the donor and its
        # state: the report the checkpoint was registered with).
        self.decisions += [
            {"decision": n, "action": UNRECORDED} for n in range(len(self.decisions), carries + 1)
        ]
        record = {  # ("old": not known; "iteration": the state it copies)
            "decision": carries,
            "iteration": latest.metrics.get("training_iteration"),
            "member": trial.trial_id,
            "action": EXPLOITED,
            "donor": donor,
            "donor_state_id": latest.metrics.get(STATE_ID),
            "new": values_at(trial.config, self._space),
            "recovered": "from the trials' snapshot: the run was killed before this record was stored",
        }
        self.decisions[carries] = record
        return carries

    def write_state(self, state: dict) -> None:
        """``pbt_state.json`` beside Ray's experiment state (synced with it): what the tables read."""
        if self._trial_state:  # the driver's copy of the run directory, which Ray syncs to storage
            run_dir = next(iter(self._trial_state)).local_experiment_path
            path = Path(run_dir) / PBT_STATE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(state)))


def _jsonable(metrics: dict) -> dict:
    """A report's plain values (pbt_state.json is JSON)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool, type(None)))}


def plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
