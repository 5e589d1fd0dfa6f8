"""LabPBT's disk bound: the checkpoints a member's directory holds, never more than
``pbt.max_checkpoints_per_member`` at any moment (the one being written included).

A member's directory holds what something can still restore: its latest checkpoint (a pause, a
restart), the one the experiment snapshot in storage names as its latest (a resume), what PBT would
copy from it (a future exploit) and what a paused recipient waits to copy. Before a member saves,
its directory is brought under the bound: what nothing needs is deleted; a checkpoint a recipient
waits to copy moves into the recipient's directory (its decision records it: the recipient loads the
very state decided, so neither the lineage nor a seed's reproducibility depends on when Ray took its
snapshots); PBT's copy of an older ranked state is dropped; and if a snapshot is still on its way to
storage, the driver waits for it, so that the snapshot before it names nothing any more. A
snapshot's recipient waiting on a donor's checkpoint does not hold it: if it is gone when the run
resumes, the recipient copies the donor's checkpoint that snapshot names (``redirect_resumed``). A
recipient that restored the donor's checkpoint and has not saved since resumes from it: the
snapshot holds it in the donor's directory until storage has a later one (found on S3, where a
resume restored a recipient from a donor checkpoint deleted after the snapshot named it); the donor
may hold one over the bound meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
import re

from pyarrow import fs
from ray.train._internal.session import _FutureTrainingResult, _TrainingResult
from ray.tune import Checkpoint
from ray.tune.experiment import Trial

from pbt_lab.names import PBT_STATE_FILE, STATE_ID

MOVED = "its donor saved again, and keeping the decided checkpoint there would exceed the bound"
COPY_PREFIX = "checkpoint_copy-"  # a waited-on checkpoint moved into its recipient's directory


class CheckpointKeeper:
    """LabPBT's checkpoint keeping. It reads the scheduler's member states (Ray's ``_trial_state``),
    its decisions and the recipients waiting for their exploit (``_pending``)."""

    def __init__(self, scheduler, max_checkpoints: int):
        self.scheduler, self.max_checkpoints = scheduler, max_checkpoints
        # Checkpoints each experiment snapshot names, by number, until storage holds a later one.
        self.snapshots: list[tuple[int, set[str]]] = []
        self.snapshot_count = 0
        # A moved checkpoint (its path) -> the recipient whose directory holds it, and its filesystem.
        self.moved: dict[str, tuple[str, object]] = {}

    @property
    def _trial_state(self) -> dict:
        return self.scheduler._trial_state

    def _awaited(self, trial_id: str) -> int | None:
        """The exploit decision a recipient waits to carry out (None: none)."""
        return self.scheduler._pending.get(trial_id)

    def make_room(self, trial: Trial, trials: list[Trial]) -> None:
        """Before ``trial`` saves: at most max − 1 checkpoints in its directory, so that the one it is
        about to write is at most the max-th."""
        self.prune(trials)
        if self._held(trial) < self.max_checkpoints:
            return
        latest = _newest(trial)
        for recipient in trials:
            self._move_to_recipient(recipient, trial, latest, trials)
        state = self._trial_state[trial]
        copied = state.last_checkpoint  # a save in flight (a future) is the latest to be
        if _path(copied) - {latest.checkpoint.path}:
            state.last_checkpoint = None  # PBT copies it from its latest, or not at all
        self.prune(trials)
        if self._held(trial) >= self.max_checkpoints:
            with contextlib.suppress(Exception):  # a failed upload is Ray's to report
                trial.storage.syncer.wait()  # the snapshot on its way: the one before it then names nothing
            self.prune(trials)

    def _held(self, trial: Trial) -> int:
        """Checkpoints in the member's directory: those it saved, and those moved in for it to copy."""
        registered = len(trial.run_metadata.checkpoint_manager.best_checkpoint_results)
        return registered + sum(holder == trial.trial_id for holder, _ in self.moved.values())

    def _move_to_recipient(
        self, recipient: Trial, donor: Trial, latest: _TrainingResult, trials: list[Trial]
    ) -> None:
        """A checkpoint of ``donor`` older than its latest, that ``recipient`` waits to copy, moves into
        the recipient's directory (the same state: its audit is the same). Every member whose latest
        it is (another recipient of the same state) then restores from there."""
        waiting = recipient.run_metadata.checkpoint_manager.latest_checkpoint_result
        decision = self._awaited(recipient.trial_id)
        registered = donor.run_metadata.checkpoint_manager.best_checkpoint_results
        source = next(
            (r for r in registered if waiting and r.checkpoint.path == waiting.checkpoint.path), None
        )
        if decision is None or source is None or source.checkpoint.path == latest.checkpoint.path:
            return
        if recipient.status not in (Trial.PAUSED, Trial.PENDING):
            return
        sharing = [t for t in trials if _latest_path(t) == source.checkpoint.path]
        if any(t.is_restoring for t in sharing):
            return  # Ray is restoring one from it already: from where it lies
        if self._trial_state[donor].last_checkpoint is source.checkpoint:
            return  # PBT may copy the donor from it again
        checkpoint = source.checkpoint
        target = f"{recipient.storage.trial_fs_path}/{COPY_PREFIX}{decision:06d}"
        _move(checkpoint, target)
        self.moved[target] = (recipient.trial_id, checkpoint.filesystem)
        registered.remove(source)  # no longer the donor's
        for member in sharing:
            metrics = member.run_metadata.checkpoint_manager.latest_checkpoint_result.metrics
            _restores_next(member, _TrainingResult(Checkpoint(target, checkpoint.filesystem), metrics))
            if (awaited := self._awaited(member.trial_id)) is not None:
                self.scheduler.decisions[awaited]["moved"] = {"to": target, "why": MOVED}

    def _redirect(self, recipient: Trial, donor: Trial, latest: _TrainingResult, why: str) -> None:
        """A recipient waiting to copy a checkpoint of ``donor`` that is gone copies ``latest`` instead,
        and its PBT clocks move to that state's."""
        manager = recipient.run_metadata.checkpoint_manager
        decision = self._awaited(recipient.trial_id)
        if decision is None or manager.latest_checkpoint_result is None:
            return
        _restores_next(recipient, _TrainingResult(copy.copy(latest.checkpoint), latest.metrics))
        clocks = self._trial_state[recipient]
        # Ray gave it the donor's clocks at the decision; it now resumes from this state's iteration
        # (left behind, it would be ranked and saved at iterations its reports did not expect).
        clocks.last_train_time = clocks.last_perturbation_time = latest.metrics.get(
            "training_iteration", clocks.last_train_time
        )
        record = self.scheduler.decisions[decision]
        record["redirected"] = {"from_state_id": record.get("donor_state_id"), "why": why}
        record["donor_state_id"] = latest.metrics.get(STATE_ID)

    def redirect_resumed(self) -> None:
        """On a resume: a recipient that was waiting for its exploit when the snapshot was taken, whose
        donor checkpoint was deleted since, copies the donor's checkpoint the snapshot names instead."""
        members = {t.trial_id: t for t in self._trial_state}
        for recipient_id, decision in list(self.scheduler._pending.items()):
            if decision is None:
                continue
            recipient, donor = (
                members.get(recipient_id),
                members.get(self.scheduler.decisions[decision]["donor"]),
            )
            latest = donor and donor.run_metadata.checkpoint_manager.latest_checkpoint_result
            waiting = recipient and recipient.run_metadata.checkpoint_manager.latest_checkpoint_result
            if not (latest and waiting) or _exists(waiting.checkpoint):
                continue
            self._redirect(recipient, donor, latest, why="resumed: the decided checkpoint was deleted")

    def prune(self, trials: list[Trial]) -> None:
        """Delete every checkpoint nothing can restore any more. Kept: each member's latest (a
        paused recipient's latest is its donor's, until it saves), what PBT would copy from a donor,
        and what the experiment snapshot in storage names (a resume restores from it)."""
        # Storage is read only when there is an older snapshot to let go of (on S3, a request per read).
        stored = self._stored_snapshot() if len(self.snapshots) > 1 else None
        self.snapshots = [(k, paths) for k, paths in self.snapshots if stored is None or k >= stored]
        needed = set().union(*(paths for _, paths in self.snapshots))
        for trial in trials:
            latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
            if latest:
                needed.add(latest.checkpoint.path)
        for trial, state in self._trial_state.items():
            checkpoint, result = state.last_checkpoint, state.last_result
            if isinstance(checkpoint, _FutureTrainingResult):
                saved = checkpoint.resolve(block=False)  # not saved yet: then it is registered nowhere either
                checkpoint, result = (saved.checkpoint, saved.metrics) if saved else (None, None)
            latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
            same = (
                latest and (result or {}).get(STATE_ID) and latest.metrics.get(STATE_ID) == result[STATE_ID]
            )
            if checkpoint is not None and same:
                # Ray saved the same state twice (its PBT save, then a pause or periodic save): copy
                # from the latest, so the other can go.
                state.last_checkpoint, state.last_result, checkpoint = latest.checkpoint, latest.metrics, None
            if checkpoint is not None:
                needed.add(checkpoint.path)
        for trial in trials:
            # With num_to_keep=None this is the checkpoint manager's own list, which Ray never prunes.
            registered = trial.run_metadata.checkpoint_manager.best_checkpoint_results
            for result in [r for r in registered if r.checkpoint.path not in needed]:
                with contextlib.suppress(OSError):  # already gone: forget it all the same
                    result.checkpoint.filesystem.delete_dir(result.checkpoint.path)
                registered.remove(result)
        storages = {t.trial_id: t.storage.storage_filesystem for t in trials}
        for path in [p for p in self.moved if p not in needed]:  # copied by its recipient, or given up
            holder, filesystem = self.moved.pop(path)  # (a resumed run knows the holder only)
            with contextlib.suppress(OSError, AttributeError):
                (filesystem or storages.get(holder)).delete_dir(path)

    def snapshot_taken(self) -> None:
        """Ray is writing an experiment snapshot: a resume restores each member from the latest
        checkpoint it names, so those stay until storage holds a later snapshot (Ray uploads in the
        background, and skips an upload while the one before is still going)."""
        self.snapshot_count += 1
        self.snapshots.append(
            (
                self.snapshot_count,
                {
                    r.checkpoint.path
                    for t in self._trial_state
                    if (r := t.run_metadata.checkpoint_manager.latest_checkpoint_result)
                    # A waiting recipient's donor checkpoint is not held (redirect_resumed); one it
                    # restored already and has not saved over is: its resume starts there.
                    and (r.checkpoint.path in _own(t) or self._awaited(t.trial_id) is None)
                },
            )
        )

    def _stored_snapshot(self) -> int | None:
        """The number of the snapshot storage holds, from its ``pbt_state.json`` (None: none yet). Not
        while Ray is uploading one: it copies the files one by one, and ``pbt_state.json`` may land
        before Ray's own experiment state is whole (Ray 2.60's private syncer state; absent, read)."""
        if not self._trial_state:
            return None
        storage = next(iter(self._trial_state)).storage
        uploading = getattr(getattr(storage.syncer, "_sync_process", None), "is_running", False)
        if uploading:
            return None
        try:
            with storage.storage_filesystem.open_input_stream(
                f"{storage.experiment_fs_path}/{PBT_STATE_FILE}"
            ) as f:
                head = f.read(64).decode()
        except OSError:
            return None
        found = re.match(r'\{"snapshot": (\d+)', head)
        return int(found[1]) if found else None


def _move(checkpoint: Checkpoint, target: str) -> None:
    """A checkpoint's directory renamed to ``target`` (no second copy on a nearly full disk); where
    the filesystem cannot rename a directory (an object store), copied, then deleted."""
    filesystem = checkpoint.filesystem
    try:
        filesystem.move(checkpoint.path, target)
    except (OSError, NotImplementedError):
        filesystem.create_dir(target)  # local storage wants it; object stores ignore it
        fs.copy_files(
            checkpoint.path, target, source_filesystem=filesystem, destination_filesystem=filesystem
        )
        with contextlib.suppress(OSError):
            filesystem.delete_dir(checkpoint.path)


def _own(trial: Trial) -> set[str]:
    """The checkpoints a member saved itself (in its directory)."""
    return {r.checkpoint.path for r in trial.run_metadata.checkpoint_manager.best_checkpoint_results}


def _restores_next(trial: Trial, result: _TrainingResult) -> None:
    """Point a member at the checkpoint it restores from next, in Ray's experiment snapshot too: Ray
    keeps a trial's run metadata as JSON cached until an attribute of it is set, and the checkpoint
    manager's latest is not one of them (a resume would restore the path before)."""
    trial.run_metadata.checkpoint_manager._latest_checkpoint_result = result
    trial.run_metadata.invalidate_cache()


def _latest_path(trial: Trial) -> str | None:
    """Where a member restores from next (a paused recipient: its donor's checkpoint)."""
    latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    return latest and latest.checkpoint.path


def _path(checkpoint) -> set[str]:
    """The path of a checkpoint PBT holds (none for none, or a save still in flight)."""
    return set() if isinstance(checkpoint, (type(None), _FutureTrainingResult)) else {checkpoint.path}


def _newest(trial: Trial) -> _TrainingResult:
    """The newest checkpoint a member saved itself (its manager registers them in order)."""
    return trial.run_metadata.checkpoint_manager.best_checkpoint_results[-1]


def _exists(checkpoint) -> bool:
    from pyarrow import fs

    try:
        return checkpoint.filesystem.get_file_info(checkpoint.path).type != fs.FileType.NotFound
    except OSError:
        return False
