"""Names shared by the trainer, the trainable, the scheduler and the tables: defined once, here.

No imports: the driver, the workers and the notebooks all read these without TensorFlow or Ray.
"""

# --- metrics a check reports ---------------------------------------------------------------
STEP = "step"
TRAIN_SECONDS = "train_seconds"
TRAIN_ACC = "train_acc"
TRAIN_LOSS = "train_loss"
VAL_ACC = "val_acc"
VAL_LOSS = "val_loss"
# Evaluated when a trial that learned ends (not diverged or stalled; TEST_EVERY_CHECK: at every check);
# never used to choose.
TEST_ACC = "test_acc"
LR = "lr"
BATCH_SIZE = "batch_size"
MODEL_OPTIONS = "model.options"  # a searched builder option's key: model.options.NAME
EXAMPLES = "examples"  # training examples seen (steps × each step's batch size)
USED = "_used"  # KEY_used: the value the traced training call read for a searched KEY (the audit's)
LR_USED = LR + USED  # the rate the traced training call read: what the optimizer used in the check
DATA_SEED = "data_seed"  # the seed of the data-order stream a check drew its batches from
LR_PLACE = "lr_place"  # PB2's view of the rate: its place in the optimizer's range, 0..1 in log space
LR_RANGES = "lr_ranges"  # a trial config's {optimizer: [low, high]}, where it carries LR_PLACE
TEST_EVERY_CHECK = "test_every_check"  # a trial config flag: report test_acc at every check
OPTIMIZER = "optimizer"
STATUS = "status"
STEPS_TO_TARGET = "steps_to_target"
SECONDS_TO_TARGET = "seconds_to_target"
SEED = "seed"
FINAL_VAL_ACC = "final_val_acc"  # a trial's last validation: its final state's
FINAL_VAL_LOSS = "final_val_loss"
BEST_VAL_ACC = "best_val_acc"  # a trial's best validation at any check
WINNER_VAL_ACC = "winner_val_acc"  # a comparison run's winner's final validation accuracy
WEIGHTS = "weights"  # the built model's parameter count
BUILDER = "builder"  # the model builder, as 'module:function'

TRIAL_ID = "trial_id"  # Ray's name of a trial, a column of every table
CHECK_SECONDS = "check_seconds"  # a report's seconds in its check (training and validation)
CHECK_STARTED_AT = "started_at"  # the epoch second a report's check started on its actor

# --- statuses: a trial is RUNNING until it ends as one of the others -------------------------
RUNNING = "running"
REACHED = "reached"  # trained to the target
CAPPED = "capped"  # used its budget (steps or seconds) without reaching the target
DIVERGED = "diverged"  # its loss turned non-finite or exploded
STALLED = "stalled"  # its loss stayed at chance for train.stall_checks checks: it cannot learn
STOPPED = "stopped"  # stopped by the population's own stop (pbt.stop_at_target)
ERROR = "error"  # failed: the console names the error

# --- where an actor's seconds go (training/clock.py; results/breakdown.py sums them) ----------------
SECONDS_BY_PART = "seconds_by_part"  # a report's {part: seconds} on its actor since the actor's last report
ACTOR_BORN_AT = "actor_born_at"  # the epoch second the actor's process started
REPORTED_AT = "reported_at"  # the epoch second a report left its actor
NODE_ID = "node_id"  # the actor's Ray node (node_ip is shared by nodes on one host); with Ray's pid: a worker
TRAIN_PART = "train"  # inside the fused training call
COMPILE = "compile"  # tracing and optimizing a traced call before its first use
VALIDATE = "validate"  # validation and test passes
CHECKPOINT_SAVE = "checkpoint_save"  # writing a checkpoint's files
CHECKPOINT_RESTORE = "checkpoint_restore"  # loading one into the model
CHECKPOINT_TRANSFER = "checkpoint_transfer"  # Ray copying a checkpoint to or from storage (and between nodes)
AUDIT = "audit"  # the state digests every exploit is audited with
ACTOR_START = (
    "actor_start"  # the process's start, TensorFlow's import, the model's build (and a reset's rebuild)
)
WAITING = (
    "waiting"  # an actor holding its slot with nothing to train: between trials, or a diverged member's wait
)
TRAINABLE = "trainable"  # the trainable's own Python around those (metrics, reports)
RAY = "ray"  # between the trainable's calls on a live actor: Ray's bookkeeping, result handling, scheduling
SLOT_IDLE = "slot_idle"  # a slot with no live actor (before its first call, after its last report)
TIME_PARTS = (
    TRAIN_PART,
    COMPILE,
    VALIDATE,
    CHECKPOINT_SAVE,
    CHECKPOINT_RESTORE,
    CHECKPOINT_TRANSFER,
    AUDIT,
    ACTOR_START,
    WAITING,
    TRAINABLE,
    RAY,
)  # measured on the actors; SLOT_IDLE is measured from their lifetimes by the driver
WORK_PARTS = (TRAIN_PART, COMPILE, VALIDATE)  # what a run is for; every other second is overhead

# --- what a PBT member reports, so the driver can audit every exploit ------------------------
SCORE = "score"  # what PBT ranks: the last validation of pbt.metric
DIVERGED_FLAG = "diverged"  # explicit: PBT never infers divergence from a score
# The saving side: the live state at a check after which a checkpoint may be taken.
STATE_ID = "state_id"  # names this state; a checkpoint of it carries the same id
STATE_DIGEST = "state_digest"  # weights, step and data order
SLOTS_DIGEST = "slots_digest"  # the optimizer's variables, its step counter included
OPTIMIZER_STEPS = "optimizer_steps"
# The restoring side: the first report after a restore says what was restored.
SEGMENT_FROM = "segment_from"  # the trial whose checkpoint it is (itself after a resume)
SEGMENT_STEP = "segment_step"  # the step that checkpoint holds
RESTORED_ID = "restored_id"
RESTORED_DIGEST = "restored_digest"
RESTORED_SLOTS_DIGEST = "restored_slots_digest"
# The digest of a newly built optimizer of the live kind (built apart from the live one): what a switch must
# restore. The rate that a restore must leave live is the LR_USED of its first check.
FRESH_SLOTS_DIGEST = "fresh_slots_digest"
RESTORED_OPTIMIZER_STEPS = "restored_optimizer_steps"
RESTORED_OPTIMIZER = "restored_optimizer"  # the optimizer the checkpoint was saved with
LEGACY_RESTORED_LR = "restored_lr"  # runs before lr_used: the live rate a restore had assigned
# Runs before the digests were xxh3_128 named them by SHA-256, which they were: read under today's names.
LEGACY_DIGEST_LENGTH = 64  # hex digits of such a SHA-256 (today's: 32)
LEGACY_DIGEST_NAMES = {
    name.replace("digest", "sha256"): name
    for name in (STATE_DIGEST, SLOTS_DIGEST, RESTORED_DIGEST, RESTORED_SLOTS_DIGEST, FRESH_SLOTS_DIGEST)
}
EXPLOIT = "exploit_decision"  # the scheduler's decision number, carried in the recipient's config
RECIPE = "recipe"  # an ancestry segment's {searched key: value}
ANCESTRY = "ancestry"  # a checkpoint's lineage: segments of step, optimizer, lr, seed, trial since step 0
SAVED_BY = "trial_id"  # a checkpoint's metadata: the trial that saved it
SAVED_BY_TRIAL = "saved_by"  # the same, in the record another trainable keeps (tuning/audited.py)
# Why a trial restored a checkpoint (the driver names it in the first report after the restore):
RESTORE_KIND = "restore_kind"
EXPLOIT_RESTORE = "exploit"  # another member's checkpoint, as a PBT decision said
PAUSE_RESTORE = "pause"  # its own, after a pause (PBT's turns)
RESTART_RESTORE = "restart"  # its own, on a new worker after a failure
RESUME_RESTORE = "resume"  # its own, in a driver that resumed the run
RESTORE_KINDS = (EXPLOIT_RESTORE, PAUSE_RESTORE, RESTART_RESTORE, RESUME_RESTORE)
# What the audit says of a restore:
VERIFIED = "verified"  # what it loaded is what its saver reported
MISMATCHED = "mismatched"  # it differs (the problem says how)
UNVERIFIABLE = "unverifiable"  # the saver never reported that state
VERDICTS = (VERIFIED, MISMATCHED, UNVERIFIABLE)

# --- what a PBT decision did (pbt_state.json) -------------------------------------------------
EXPLOITED = "exploit"  # the member copies a donor
SAVED = "save"  # a top member: PBT saves it for others to copy
KEPT = "keep"  # neither
NO_CHECKPOINT = "no checkpoint"  # it would copy, but the donor has no checkpoint of its ranked state
UNRECORDED = "unrecorded"  # made by a run killed before its record was stored (a resume's gap)

# --- files the lab writes beside Ray's in a run directory ---------------------------------------
TRIALS, HISTORY, LINEAGE = "trials.parquet", "history.parquet", "lineage.parquet"
RESTORES = "restores.parquet"  # every restore of a checkpoint, with the audit's verdict
SUMMARY, FIGURES = "summary.json", "figures"
SCHEDULE_TAG = "schedule"  # TensorBoard: schedule/KEY charts a searched key
EXPLOIT_TAG = "exploit"  # TensorBoard: a member's text entry per exploit
RAY_TAG = "ray/tune"  # TensorBoard: Ray's logger's tags of the results' keys
WINNER_BOARD = "winner"  # the PBT winner's schedule and metrics along its lineage, for TensorBoard
TUNER_FILE = "tuner.pkl"  # Ray Tune's own record of a run: what --resume restores from
PBT_STATE_FILE = "pbt_state.json"  # the scheduler's decisions and state, with every experiment snapshot
CHECKPOINT_META = "trainer.json"  # a checkpoint's metadata
CHECKPOINT_ARRAYS = "trainer.npz"  # a checkpoint's arrays: weights, optimizer slots
