"""The Ray Tune trainable around the Trainer: the only trainer code that imports Ray.

One ``step`` is one check (``steps_per_check`` fused training steps). Actors are reused across
trials (``reset_config``), so a worker imports TensorFlow and compiles each optimizer's training
call once, not once per trial. The data (and a builder function the Python API was given) arrive
through Ray's object store (``tune.with_parameters``).

A trial's config is ``trial_config.py``'s: the searched keys at its top level (a builder option under
``model.options``), the fixed rest as plain dicts. A searched key acts where it belongs: in flight in
the traced step, the batch size without a retrace, a builder option in a Trainer built with it (an
actor keeps one per model config it met).

What it reports so that every restore can be audited from the two sides (names.py):

- at each check after which a checkpoint is due (a PBT member: every check), and at the last, the
  live state's digests (``state_digest``, ``slots_digest``) under a fresh ``state_id``; a
  checkpoint taken then carries that id;
- on the first check after a restore, what it restored: the checkpoint's id, the digests of the
  state as loaded, whose checkpoint it was and at which step, the PBT decision it carries out, and
  where it switched optimizer the digest of a newly built one; every check reports the rate its
  traced call read (``lr_used``). The driver's audit compares the two sides; nothing here trusts
  the files.

A PBT recipient keeps its donor's weights and slots, not its batches: it draws from a data stream of
its own (its seed and the decision's number). A checkpoint also carries its member's ancestry:
segments (step, recipe: every searched key, data seed, trial) from step 0, so the winner's schedule
is read from its last checkpoint, not rebuilt.

Every report also says where its actor's seconds went since the actor's last report
(``seconds_by_part``, a ``PartClock`` started at the process's birth): training, compiling,
validation, checkpoints, digests, start, waiting, and Ray's time between the calls. The driver
sums them into the run's time breakdown (``results/breakdown.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, replace

import psutil
import ray
from ray import tune

from pbt_lab import StorageFull
from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.config.space import segment_recipe
from pbt_lab.names import (
    ACTOR_BORN_AT,
    ACTOR_START,
    ANCESTRY,
    AUDIT,
    CHECK_SECONDS,
    CHECK_STARTED_AT,
    CHECKPOINT_RESTORE,
    CHECKPOINT_SAVE,
    CHECKPOINT_TRANSFER,
    DIVERGED,
    DIVERGED_FLAG,
    EXPLOIT,
    FRESH_SLOTS_DIGEST,
    LR,
    MODEL_OPTIONS,
    NODE_ID,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    RAY,
    RECIPE,
    REPORTED_AT,
    RESTORED_DIGEST,
    RESTORED_ID,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SLOTS_DIGEST,
    SAVED_BY,
    SCORE,
    SECONDS_BY_PART,
    SEED,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOTS_DIGEST,
    STATE_DIGEST,
    STATE_ID,
    STEP,
    TEST_ACC,
    TEST_EVERY_CHECK,
    TRAINABLE,
    USED,
    VAL_LOSS,
    WAITING,
    WEIGHTS,
)
from pbt_lab.storage import is_storage_full
from pbt_lab.training.clock import PartClock
from pbt_lab.training.state import stream_seed
from pbt_lab.tuning.trial_config import TRAIN_KEYS, segment, train_config

STUDY_KEYS = (OPTIMIZER, LR)  # what a run's ancestry records where it searched nothing else
MAX_TRAINERS = 4  # Trainers an actor keeps (one per model config it met): each holds a model and traced calls
STATE_KEYS = (STATE_ID, STATE_DIGEST, SLOTS_DIGEST, OPTIMIZER_STEPS)
RESTORE_KEYS = (
    SEGMENT_FROM,
    SEGMENT_STEP,
    RESTORED_ID,
    RESTORED_DIGEST,
    RESTORED_SLOTS_DIGEST,
    FRESH_SLOTS_DIGEST,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_OPTIMIZER,
    EXPLOIT,
)


class LabTrainable(tune.Trainable):
    """Ray Tune's view of a Trainer: setup, step (one check), checkpoints, reset for reuse."""

    def setup(self, config: dict, data=None, builder=None):
        # Born with the process: its start and TensorFlow's import count to actor_start.
        self.clock = PartClock(born_at=psutil.Process().create_time())
        with self.clock.part(ACTOR_START):
            from pbt_lab.training import trainer  # TensorFlow loads here, on the worker: once per process

            self.threads = int(config["threads"])
            trainer.configure_tensorflow(self.threads)
            # Kept: a reused actor may need a Trainer of another shape.
            self.data, self.builder = data, builder
            self._fresh_digests: dict = {}
            self._fresh_start = None  # a reset's new recipe, until its fresh state is made or restored over
            # A Trainer per model config (a searched builder option rebuilds the model), kept for reuse.
            self._trainers: dict = {}
            self.trainer = self._trainer_for(ModelConfig(**config["model"]), train_config(config))
            self._start()

    def _trainer_for(self, model: ModelConfig, train: TrainConfig, fresh: bool = True):
        """This actor's Trainer of ``model``, reset to ``train`` (built the first time; its training,
        validation and compiling count to their own parts of this actor's clock). ``fresh`` False: one
        it holds takes ``train``'s recipe only, its state left for a restore to replace."""
        from pbt_lab.training.trainer import Trainer

        key = json.dumps(asdict(model), sort_keys=True, default=repr)
        held = self._trainers.get(key)
        if held is not None and not held.retraces(train):
            (held.reset if fresh else held.set_recipe)(train)
        else:  # none yet, or a traced setting changed: a new Trainer
            if len(self._trainers) >= MAX_TRAINERS:
                self._trainers.pop(next(iter(self._trainers)))
            held = self._trainers[key] = Trainer(self.data, train, model, self.builder, self.clock)
        return held

    @property
    def _searched(self) -> tuple:
        """The keys its ancestry records: PBT's search space, a replay's schedule's, or the study's."""
        schedule = self.config.get("schedule")
        if schedule:
            return tuple(schedule[0][1])
        return tuple((self.config.get("population") or {}).get("searched") or STUDY_KEYS)

    def _start(self) -> None:
        """A fresh trial on this actor: its ancestry starts here, at step 0."""
        self._fresh_start = None
        self._ancestry = [self._segment_here()]
        self._live = None  # the live state's id and digests, once computed (None: changed since)
        # What the next report says about where its state came from: a fresh start here, or a restore.
        self._restore_report = {SEGMENT_FROM: self.trial_id, SEGMENT_STEP: 0}
        self._score, self._waited = None, 0

    def _segment_here(self) -> dict:
        """A segment of this trial's ancestry starting where its trainer stands now."""
        t = self.trainer
        return segment(t.progress.step, t.recipe(self._searched), t.order.seed, self.trial_id)

    def train(self) -> dict:
        with self.clock.part(RAY):  # Ray's own work around ``step`` on the worker
            return super().train()

    def _settle_fresh_start(self) -> None:
        """Reset, and no restore came before this call: the fresh start the reset deferred."""
        if self._fresh_start is not None:
            with self.clock.part(ACTOR_START):
                self.trainer.reset(self._fresh_start)
                self._start()

    def step(self) -> dict:
        self._settle_fresh_start()
        population = self.config.get("population")
        if population and self.trainer.progress.status == DIVERGED:
            with self.clock.part(WAITING):
                return self._report(self._wait_for_donor(population))
        with self.clock.part(TRAINABLE):
            return self._report(self._check(population))

    def _check(self, population: dict | None) -> dict:
        started_at = time.time()
        self._follow_schedule()
        before = self.trainer.progress.train_seconds
        row = self.trainer.check()
        self._live = None
        diverged = self.trainer.progress.status == DIVERGED
        recipe = self.trainer.recipe(self._searched)
        # The check's start in wall-clock time (Ray's timestamp is whole seconds; ``_report`` adds when
        # the report left): the gaps between one report and the next check on a worker are Tune's.
        result = {
            **row,
            CHECK_SECONDS: self.trainer.progress.train_seconds - before,
            CHECK_STARTED_AT: started_at,
            DIVERGED_FLAG: diverged,
            # Under PBT a diverged member keeps its slot until it exploits a better one.
            "done": self.trainer.done and not (population and diverged),
            RECIPE: recipe,
            # The options the model that trained was built with (the traced call reports the rest).
            **{k + USED: v for k, v in recipe.items() if k.startswith(MODEL_OPTIONS)},
        }
        if population:
            result[SCORE] = self._rank_score(population["metric"], row)
        self._waited = 0
        return result

    def _report(self, result: dict) -> dict:
        """The result with what the audit reads: the last restore (once), the live state's digests
        where a checkpoint may follow, and the test accuracy once, at the end."""
        result.update(dict.fromkeys(RESTORE_KEYS), **self._restore_report, **dict.fromkeys(STATE_KEYS))
        self._restore_report = {}
        # Every report, a waiting member's too: Ray's node (node_ip is shared by nodes on one host).
        result[WEIGHTS] = self.trainer.model.count_params()
        result[NODE_ID] = ray.get_runtime_context().get_node_id()
        # Ray saves at its checkpoint frequency and at the end; a PBT member also whenever PBT pauses
        # or copies it, which need not fall on that frequency (a resumed or redirected member's clock):
        # a member reports the state after every check, so that every save is of a reported state.
        every = self.config.get("checkpoint_every") or 0
        if every and (result["done"] or self.config.get("population") or (self.iteration + 1) % every == 0):
            result.update(self._live_state())
        # Once, at the end of a run that learned; at every check where the run may be stopped from
        # outside (the comparison's budget, ASHA's cuts), so that whichever state ends up chosen has it.
        if (result["done"] and self.trainer.learned) or self.config.get(TEST_EVERY_CHECK):
            result[TEST_ACC] = self.trainer.evaluate_test()
        # Last: every second of this actor up to here, in the report that carries it, and the moment it
        # was sent (a diverged member's waits too): the worker is Ray's again from here.
        result.update({SECONDS_BY_PART: self.clock.take(), ACTOR_BORN_AT: self.clock.born_at})
        result[REPORTED_AT] = time.time()
        return result

    def _live_state(self) -> dict:
        if self._live is None:
            with self.clock.part(AUDIT):
                state, slots = self.trainer.state_digests()
            self._live = {
                STATE_ID: uuid.uuid4().hex,
                STATE_DIGEST: state,
                SLOTS_DIGEST: slots,
                OPTIMIZER_STEPS: self.trainer.optimizers.steps,
            }
        return self._live

    def _wait_for_donor(self, population: dict) -> dict:
        """A diverged PBT member trains no more: it reports its last row, ranked last, until PBT
        copies a donor into it (a restore), or ends once PBT had its chance and did not (no
        healthy member was left to copy)."""
        self._waited += 1
        last = self.trainer.progress.last
        unused = dict.fromkeys(k for k in last if k.endswith(USED))  # nothing trained, nothing used
        done = self._waited > population["rescue_checks"]
        return {**last, CHECK_SECONDS: 0.0, **unused, SCORE: self._score, DIVERGED_FLAG: True, "done": done}

    def _follow_schedule(self) -> None:
        """A replay's trial carries ``schedule`` [[step, {key: value}, data seed], …]: at a step it sets the
        recipe as the member's exploit set it there (a new data seed: the new stream an exploit gave it)."""
        schedule = self.config.get("schedule")
        if not schedule:
            return
        t = self.trainer
        _, recipe, seed = [c for c in schedule if c[0] <= t.progress.step][-1]
        if recipe == t.recipe(recipe) and seed == t.order.seed:
            return
        options = {
            k.removeprefix(MODEL_OPTIONS + "."): v for k, v in recipe.items() if k.startswith(MODEL_OPTIONS)
        }
        train = replace(t.cfg, **{k: v for k, v in recipe.items() if k in TRAIN_KEYS})
        model = replace(t.model_cfg, options={**t.model_cfg.options, **options})
        if model != t.model_cfg:  # a builder option: the same weights in a model rebuilt with it
            self.trainer = self._trainer_for(model, train)
            self.trainer.take_state(t)
        self.trainer.set_recipe(train)
        if seed != self.trainer.order.seed:
            self.trainer.order.reseed(seed)
        self._ancestry.append(self._segment_here())

    def _rank_score(self, metric: str, row: dict) -> float:
        """PBT's score, on every report (Ray requires it): the last validation carries forward until the
        next; members validate at every perturbation, where they are ranked."""
        if row.get(metric) is not None:
            self._score = row[metric]
        elif self._score is None:
            self._score = self.trainer.evaluate()[metric == VAL_LOSS]  # (accuracy, loss)
        return self._score

    def save(self, checkpoint_dir=None):
        with self.clock.part(CHECKPOINT_TRANSFER):  # Ray's copy of what save_checkpoint wrote to storage
            try:
                return super().save(checkpoint_dir)
            except OSError as e:
                if not is_storage_full(e):
                    raise
                # The driver stops the run on this line (StopWhenStorageFull): say what did not fit.
                where = self._storage.storage_fs_path if self._storage else "the storage"
                size = f"{self.trainer.state_bytes / 1e6:.1f} MB"
                why = str(e).splitlines()[0]
                raise StorageFull(
                    f"storage {where} is full: a checkpoint of {size} did not fit ({why})"
                ) from None

    def restore(self, checkpoint_path):
        with self.clock.part(CHECKPOINT_TRANSFER):  # Ray's fetch from storage (a download on another node)
            return super().restore(checkpoint_path)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self._settle_fresh_start()
        # The id the last report gave this state; a state no report described gets one of its own
        # (its exploits then count as unverifiable: the saver never reported its digests).
        state_id = self._live[STATE_ID] if self._live else uuid.uuid4().hex
        with self.clock.part(CHECKPOINT_SAVE):
            self.trainer.save(
                checkpoint_dir, extra={SAVED_BY: self.trial_id, STATE_ID: state_id, ANCESTRY: self._ancestry}
            )

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self._fresh_start = None  # the whole state is the checkpoint's
        t = self.trainer
        with self.clock.part(CHECKPOINT_RESTORE):
            meta = t.restore(checkpoint_dir)
        switched = meta[OPTIMIZER] != t.optimizers.name
        with self.clock.part(AUDIT):
            state, slots = t.state_digests()
            fresh = self._new_slots_digest() if switched else None
        saver = meta.get(SAVED_BY)
        decision = self.config.get(EXPLOIT) if saver != self.trial_id else None
        # Reported, not raised: the driver's audit compares these with what the saver reported. The
        # rate the optimizer uses is reported by the first check (lr_used), read inside its traced call.
        self._restore_report = {
            SEGMENT_FROM: saver,
            SEGMENT_STEP: meta[STEP],
            RESTORED_ID: meta.get(STATE_ID),
            RESTORED_DIGEST: state,
            RESTORED_SLOTS_DIGEST: slots,
            FRESH_SLOTS_DIGEST: fresh,
            RESTORED_OPTIMIZER_STEPS: t.optimizers.steps,
            RESTORED_OPTIMIZER: meta[OPTIMIZER],
            EXPLOIT: decision,
        }
        self._live = {
            STATE_ID: meta.get(STATE_ID),
            STATE_DIGEST: state,
            SLOTS_DIGEST: slots,
            OPTIMIZER_STEPS: t.optimizers.steps,
        }
        self._ancestry = list(
            meta.get(ANCESTRY)
            or [segment(0, {OPTIMIZER: meta[OPTIMIZER], LR: meta[LR]}, t.order.seed, saver)]
        )
        if decision is not None:
            # A copy keeps its donor's weights and slots, not its batches: its own data stream from here.
            t.order.reseed(stream_seed(int(self.config[SEED]), int(decision)))
            self._live = None
        last, here = self._ancestry[-1], self._segment_here()
        if saver != self.trial_id or (segment_recipe(last), last[SEED]) != (here[RECIPE], here[SEED]):
            self._ancestry.append(here)
        population = self.config.get("population")
        self._score = meta.get("last", {}).get(population["metric"]) if population else None
        self._waited = 0

    def _new_slots_digest(self) -> str:
        """The slots digest of a newly built optimizer of the live kind on this model (once per kind and
        worker): what a switch must have left, computed apart from the bank that switched."""
        bank = self.trainer.optimizers
        shapes = tuple(tuple(v.shape) for v in self.trainer.model.trainable_variables)
        key = (shapes, bank.name, repr(sorted(bank.overrides.items())))
        if key not in self._fresh_digests:
            from pbt_lab.training.optimizers import new_slots_digest  # Keras: on the worker only

            self._fresh_digests[key] = new_slots_digest(
                bank.name, self.trainer.model.trainable_variables, **bank.overrides
            )
        return self._fresh_digests[key]

    def reset_config(self, new_config: dict) -> bool:
        if int(new_config["threads"]) != self.threads:
            return False  # TF's thread pools are fixed once it has started
        # The seconds since this actor's last call: it held its slot with no trial to train.
        with self.clock.part(ACTOR_START, gap=WAITING):
            # Another width (the scaling study), builder option or traced setting: another Trainer in this
            # worker (Ray 2.60 fails the trial if a reused actor answers False here: it starts no fresh one).
            train = train_config(new_config)
            self.trainer = self._trainer_for(ModelConfig(**new_config["model"]), train, fresh=False)
            # A PBT turn restores a checkpoint next, which replaces the whole state: the fresh start
            # (initial weights, fresh slots, step 0) waits for a check that comes first (a new trial).
            self._fresh_start, self._live = train, None
        return True
