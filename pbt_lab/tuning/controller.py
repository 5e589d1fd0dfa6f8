"""What the lab's schedulers read of Ray Tune 2.60's private controller, and the two places they mend
it when a node is lost. Each read degrades to Ray's own behaviour where the state is absent.

A lost node breaks Ray 2.60's recovery in two ways, both on a member whose worker dies while it is not
yet training (found by removing a node of ``ray.cluster_utils.Cluster`` mid-PBT):

- Ray was resetting a cached worker for the member (``reuse_actors``) and the reset failed: Ray keeps
  the member in its ``_resetting_trials`` for ever, so every later start of it "reuses" a worker it
  never gets. The member stays PENDING, the run never ends. An error now ends the reset.
- The member failed while its worker started or restored: Ray retries only a running trial and ends
  this one in ERROR with retries left. It goes back to the queue through Ray's own requeue of a
  running one, at the next turn.
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler


def controller_of(tune_controller):
    """Tune's controller itself (schedulers are handed a wrapper that hides its private state)."""
    return getattr(tune_controller, "_tune_controller", tune_controller)


def free_workers(tune_controller) -> int:
    """Workers Ray holds with no trial to run (its actor cache; 0 where absent)."""
    cache = getattr(controller_of(tune_controller), "_actor_cache", None)
    return int(getattr(cache, "num_cached_objects", 0) or 0)


def worker_coming(tune_controller, trial: Trial) -> bool:
    """Whether ``trial``'s own worker holds a slot: starting or resetting."""
    controller = controller_of(tune_controller)
    actor = getattr(controller, "_trial_to_actor", {}).get(trial)
    return actor is not None and controller._actor_manager.is_actor_started(actor)


class RecoversLostWorkers:
    """A Tune scheduler mixin: a member whose worker was lost before it trained starts again
    (module docstring). ``may_requeue`` says which failed members may go back to the queue."""

    def on_trial_error(self, tune_controller, trial: Trial):
        getattr(controller_of(tune_controller), "_resetting_trials", set()).discard(trial)
        super().on_trial_error(tune_controller, trial)

    def may_requeue(self, trial: Trial) -> bool:
        return True

    def requeue_failed_starts(self, tune_controller) -> None:
        controller = controller_of(tune_controller)
        for trial in list(tune_controller.get_trials()):
            if trial.status == Trial.ERROR and trial.should_recover() and self.may_requeue(trial):
                controller._requeue_trial(trial)
                controller._callbacks.on_trial_recover(
                    iteration=controller._iteration, trials=controller._trials, trial=trial
                )


class LabFIFO(RecoversLostWorkers, FIFOScheduler):
    """Ray's first-in first-out order (the grid's, random search's) with a lost node's members restarted."""

    def choose_trial_to_run(self, tune_controller):
        self.requeue_failed_starts(tune_controller)
        return super().choose_trial_to_run(tune_controller)
