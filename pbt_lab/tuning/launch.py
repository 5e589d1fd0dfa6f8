"""Runs a validated command (``cli.Run``) on Ray Tune with the lab's trainable: starts a local Ray
or joins a cluster, checks that one trial fits, builds (or restores) the Tuner, and keeps every
report (``callbacks.JsonLog``).

    run = cli.parse("grid", GridExperiment, __doc__, argv)
    with cli.one_line_errors(run):
        fit(run, param_space)
"""

from __future__ import annotations

import math
import os
import time

import ray
from ray import tune
from ray.tune.error import TuneError

from pbt_lab import StorageFull, UserError
from pbt_lab.storage import is_storage_full, reserve_bytes
from pbt_lab.tuning.callbacks import CSVLog, JsonLog, NameRestores, SteadyBoard, StopWhenStorageFull
from pbt_lab.tuning.console import NORMAL, QUIET, VERBOSE, Console, count_trials, header, ray_quieted
from pbt_lab.tuning.controller import LabFIFO
from pbt_lab.tuning.trainable import LabTrainable

TRIAL_SLOT = "pbt_lab_trial_slot"  # a local Ray's custom resource: resources.max_concurrent of them


def start_ray(run, search_alg, log_to_driver: bool = True) -> dict:
    """Start a local Ray (or join ``--address`` / ``RAY_ADDRESS``) and check that one trial fits;
    returns the extra resources each trial holds (a local Ray's trial slots) and records in
    ``run.session.slots`` how many trials the cluster holds at once now (an autoscaler may add more)."""
    res = run.cfg.resources
    # A cluster (--address, or RAY_ADDRESS as set for a Ray Job's driver) may still grow nodes
    # through its autoscaler; a local Ray never does, so a trial it cannot hold would wait forever.
    address = run.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    # Ray ignores max_concurrent_trials beside a search algorithm (PBT's): a local Ray started
    # here gets that many trial slots instead, a resource every search honours.
    slots = {TRIAL_SLOT: res.max_concurrent} if res.max_concurrent and started and not address else {}
    if res.max_concurrent and search_alg is not None and not slots:
        raise UserError(
            f"resources.max_concurrent={res.max_concurrent}: with PBT it only applies to a local "
            f"Ray this run starts; size the cluster or resources.cpu instead"
        )
    if started and not address:  # what the local Ray will find: one line before it starts
        check_resources(res, local_resources())
    if started:
        try:
            # Without an address start a local Ray even if `ray start` left a cluster running here:
            # Ray itself would join that one.
            ray.init(
                address=address or "local",
                # A local Ray the lab starts has no dashboard (ray[default] would start one): the lab's
                # tables and TensorBoard show the run; `ray start --head` and --address auto give one.
                include_dashboard=False if not address else None,
                logging_level="WARNING" if run.verbosity >= VERBOSE else "ERROR",
                resources=slots or None,
                log_to_driver=log_to_driver,  # off: workers' TensorFlow start-up lines stay in Ray's logs
            )
        except ConnectionError as e:  # no cluster there, or it refused us (auth token)
            raise UserError(
                f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}"
            ) from None
    have = ray.cluster_resources()
    if not address and not started:  # a Ray this process ran before (tests' fake GPUs); clusters grow
        check_resources(res, have)
    run.session.slots = trial_slots(have, res.cpu, res.gpu, res.max_concurrent)
    return dict.fromkeys(slots, 1)


def local_resources() -> dict:
    """The CPUs and GPUs a local Ray started here would have (Ray's own detection: cgroup quotas,
    CUDA_VISIBLE_DEVICES)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    gpus = get_accelerator_manager_for_resource("GPU")
    visible = gpus.get_current_process_visible_accelerator_ids()  # None: CUDA_VISIBLE_DEVICES unset
    found = gpus.get_current_node_num_accelerators()
    return {"CPU": get_num_cpus(), "GPU": found if visible is None else min(found, len(visible))}


def check_resources(res, have: dict) -> None:
    """One trial's CPUs and GPUs against what this machine's Ray has: otherwise it would wait forever."""
    for name, key, unit, value in (("cpu", "CPU", "CPUs", res.cpu), ("gpu", "GPU", "GPUs", res.gpu)):
        if value > have.get(key, 0):
            raise UserError(
                f"resources.{name}={value:g} but this machine has {have.get(key, 0):g} {unit}: "
                f"one trial would never start (lower it with --set)"
            )


def trial_slots(have: dict, cpu: float, gpu: float, max_concurrent: int | None) -> int:
    """How many trials of ``cpu`` CPUs and ``gpu`` GPUs the resources ``have`` hold at once."""
    fits = [have.get("CPU", 0) // cpu if cpu else math.inf, have.get("GPU", 0) // gpu if gpu else math.inf]
    if TRIAL_SLOT in have:
        fits.append(have[TRIAL_SLOT])
    if max_concurrent:
        fits.append(max_concurrent)
    return max(1, int(min(fits)))


def fit(
    run,
    param_space: dict,
    *,
    scheduler=None,
    search_alg=None,
    num_samples: int = 1,
    stop=None,
    callbacks=(),
    checkpoint_every: int | None = None,
    keep_all_checkpoints: bool = False,
    console: bool = True,
):
    """Run (or resume) ``run`` on Ray Tune with the lab's trainable; returns the ResultGrid.

    ``keep_all_checkpoints``: Ray deletes none (PBT's scheduler prunes them itself); ``console=False``:
    no header or progress of this fit (a comparison prints its own line per run). What the console
    shows follows ``run.verbosity`` (``tuning/console.py``)."""
    with ray_quieted(run.verbosity), Console.speaking(run.verbosity if console else QUIET):
        return _fit(run, param_space, scheduler, search_alg, num_samples, stop, callbacks, checkpoint_every,
                    keep_all_checkpoints, console)  # fmt: skip


def _fit(run, param_space, scheduler, search_alg, num_samples, stop, callbacks, checkpoint_every,
         keep_all_checkpoints, console):  # fmt: skip
    res, tune_run, loud = run.cfg.resources, run.cfg.run, run.verbosity
    slot = start_ray(run, search_alg, log_to_driver=loud >= VERBOSE)
    trainable = tune.with_resources(
        tune.with_parameters(LabTrainable, data=run.data, builder=run.builder),
        {"cpu": res.cpu, "gpu": res.gpu, **slot},
    )
    every = tune_run.checkpoint_every if checkpoint_every is None else checkpoint_every
    full = StopWhenStorageFull(run.storage_path, reserve_bytes(run.session.slots, run.checkpoint_bytes))
    trials = count_trials(param_space, num_samples)
    if Console.level == NORMAL:
        print(header(run, trials), flush=True)
    shown = Console(trials, run.cfg.train.max_steps, scheduler if hasattr(scheduler, "decisions") else None)
    run.session.started_at, start = time.time(), time.perf_counter()
    if run.resume:
        tuner = tune.Tuner.restore(str(run.run_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # The trainable reports its state's digests at the checks after which a checkpoint is due.
            param_space={**param_space, "checkpoint_every": every},
            tune_config=tune.TuneConfig(
                scheduler=scheduler or LabFIFO(),  # (a lost node's members restart: controller.py)
                search_alg=search_alg,
                num_samples=num_samples,
                reuse_actors=True,
                max_concurrent_trials=res.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=run.name,
                storage_path=run.storage_path,
                stop=stop,
                # NameRestores first: it adds to the results that the loggers after it write; the
                # TensorBoard logger after the caller's (ScheduleBoard steps its scalars by training step).
                callbacks=[NameRestores(), JsonLog(), CSVLog(), full, *callbacks, SteadyBoard(), shown],
                # No checkpoint at the end unless asked: a finished grid trial never resumes, and
                # 288 final checkpoints of the full model would take 11 GB.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if keep_all_checkpoints else tune_run.keep_checkpoints,
                    checkpoint_frequency=every,
                    checkpoint_at_end=every > 0,
                ),
                failure_config=tune.FailureConfig(max_failures=tune_run.max_failures),
                verbose=1 if loud >= VERBOSE else 0,
            ),
        )
    StopWhenStorageFull.stopped()  # nothing left from a run before in this process
    try:
        grid = tuner.fit()
    except (TuneError, StorageFull, OSError) as e:  # Tune passes on what its callbacks raise in a TuneError
        if isinstance(e, OSError) and is_storage_full(e):  # the driver's own files did not fit
            StopWhenStorageFull.why = f"the driver's files did not fit: {str(e).splitlines()[0]}"
        if not StopWhenStorageFull.why:
            raise
        grid = None
    run.session.wall_seconds += time.perf_counter() - start
    run.session.stopped = StopWhenStorageFull.stopped()
    return grid
