"""The restore audit can fail: real trainables save and restore real checkpoints (no Tune run), the
test tampers with what lies between or breaks the trainer the way a real defect would, and the
audit must say so, for an exploit and for a member's restore of its own checkpoint; each of its
checks failing on its own, on hand-made rows. Also: a copy draws its own batches; the tables'
handling of a resumed recipient that carries out its exploit a second time; the audit fails closed."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.names import (
    EXPLOIT,
    FRESH_SLOTS_DIGEST,
    LR,
    LR_USED,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESTORED_ID,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SLOTS_DIGEST,
    SEGMENT_FROM,
    SLOTS_DIGEST,
    STATE_DIGEST,
    STATE_ID,
    TRIAL_ID,
)
from pbt_lab.results import audit, lineage
from pbt_lab.results.tables import read_history, read_saved_states
from pbt_lab.training.optimizers import OptimizerBank
from pbt_lab.tuning.trainable import LabTrainable
from pbt_lab.tuning.trial_config import trial_space


@pytest.fixture(scope="module")
def member_class(ray_session, bundled):
    from ray import tune

    return tune.with_parameters(LabTrainable, data=bundled)


def member(member_class, trial_id: str, **searched):
    """A PBT member outside Tune (its trial id set as Tune would), reporting its state every 2 checks."""
    return member_class(config=member_config(trial_id, **searched))


def member_config(trial_id: str, **searched) -> dict:
    """A member's config as Tune hands it to a worker (at its start or a reset)."""
    from ray.tune.result import TRIAL_INFO

    config = trial_space(
        TrainConfig(steps_per_check=10, max_steps=200),
        ModelConfig(scale=0.25),
        threads=1,
        population={"metric": "val_acc", "rescue_checks": 2},
        **searched,
    )
    info = types.SimpleNamespace(
        trial_id=trial_id, trial_name=trial_id, experiment_name="audit", trial_resources=None
    )
    return {**config, "checkpoint_every": 2, TRIAL_INFO: info}


@pytest.fixture(scope="module")
def donor(member_class, tmp_path_factory):
    """A donor that trained 2 checks, reported its state, and saved it."""
    d = member(member_class, "donor", optimizer="adam", lr=1e-3, seed=1)
    reports = [d.train(), d.train()]
    checkpoint = Path(d.save().checkpoint.path)
    kept = tmp_path_factory.mktemp("donor") / "checkpoint"
    shutil.copytree(checkpoint, kept)
    d.stop()
    return reports, kept


def audited_reports(
    runs: dict, decisions: list[dict], registered: list[dict] = ()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The history of ``runs`` (trial -> reports) and the audit's verdict on each of its restores
    (``registered``: reports as Ray registered them with checkpoints, pbt_state.json's)."""
    history = read_history(runs)
    restores = audit.restore_rows(history)
    return restores, audit.audit(restores, read_saved_states(runs, registered), decisions)


def exploit(
    member_class,
    donor,
    tmp_path,
    tamper=None,
    optimizer="adam",
    lr=8e-4,
    decision=None,
    reported=True,
    trained_before=False,
    registered=(),
):
    """A recipient restores (a copy of) the donor's checkpoint, tampered with or not, and trains one
    check; returns the audit's verdict and the counts over this one exploit. ``trained_before``: the
    recipient trained a check of its own first, as a PBT member has (its optimizer's slots are used)."""
    reports, checkpoint = donor
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    if tamper:
        tamper(copy)
    r = member(member_class, "recipient", optimizer=optimizer, lr=lr, seed=2, **{EXPLOIT: 7})
    if trained_before:
        r.train()
    r.restore(str(copy))
    report = r.train()
    r.stop()
    decision = decision or decided(new={OPTIMIZER: optimizer, LR: lr}, donor_state_id=reports[-1]["state_id"])
    runs = {"donor": reports if reported else reports[:1], "recipient": [report]}
    _, verdicts = audited_reports(runs, [decision], registered)
    return verdicts.iloc[0], audit.exploit_counts(verdicts, [decision], [])


def decided(**changes) -> dict:
    """The scheduler's record of decision 7: the recipient copies the donor at a new Adam rate."""
    record = {"decision": 7, "action": "exploit", "member": "recipient", "donor": "donor"}
    return {**record, "new": {OPTIMIZER: "adam", LR: 8e-4}, "donor_state_id": None, **changes}


def change_arrays(checkpoint: Path, prefix: str) -> None:
    """Nudge the first array under ``prefix`` in a checkpoint, leaving its metadata as it was."""
    with np.load(checkpoint / "trainer.npz") as f:
        arrays = dict(f)
    key = next(
        k for k in arrays if k.startswith(prefix) and arrays[k].dtype.kind == "f" and arrays[k].size > 1
    )
    arrays[key] = arrays[key] + np.float32(1e-3)
    np.savez(checkpoint / "trainer.npz", **arrays)


def test_an_untouched_copy_is_verified(member_class, donor, tmp_path):
    verdict, counts = exploit(member_class, donor, tmp_path)
    assert verdict["matched"] and verdict["verdict"] == "verified"
    assert counts["exploits"] == counts["exploits_matched"] == counts["exploits_verified"] == 1


def test_weights_changed_between_save_and_restore_are_mismatched(member_class, donor, tmp_path):
    verdict, counts = exploit(member_class, donor, tmp_path, tamper=lambda c: change_arrays(c, "model/"))
    assert verdict["verdict"] == "mismatched" and "weights differ" in verdict["problem"]
    assert counts["exploits_mismatched"] == 1 and counts["exploits_verified"] == 0


def test_optimizer_slots_changed_between_save_and_restore_are_mismatched(member_class, donor, tmp_path):
    verdict, _ = exploit(member_class, donor, tmp_path, tamper=lambda c: change_arrays(c, "optimizer/"))
    assert verdict["verdict"] == "mismatched" and "slots differ" in verdict["problem"]


@pytest.mark.parametrize("trained_before", [False, True])
def test_a_switched_optimizer_starts_with_fresh_slots_and_is_verified(
    member_class, donor, tmp_path, trained_before
):
    verdict, _ = exploit(
        member_class, donor, tmp_path, optimizer="momentum", lr=0.05, trained_before=trained_before
    )
    assert verdict["verdict"] == "verified"


def test_a_switch_that_kept_the_recipients_used_slots_is_mismatched(
    member_class, donor, tmp_path, monkeypatch
):
    # A switch that resets only the step counter (and the rate): the recipient's own momentum from its
    # check before the exploit survives the copy, which a step-counter check alone would not see.
    switch = OptimizerBank.switch

    def switch_keeping_slots(bank, name, lr, in_flight=None, **overrides):
        kept = [v.numpy() for v in bank.optimizer.variables] if bank.built and bank.name == name else None
        switch(bank, name, lr, in_flight, **overrides)
        for variable, value in zip(bank.optimizer.variables, kept or []):
            if variable is not bank.optimizer.iterations and variable is not bank.optimizer.learning_rate:
                variable.assign(value)

    monkeypatch.setattr(OptimizerBank, "switch", switch_keeping_slots)
    verdict, counts = exploit(
        member_class, donor, tmp_path, optimizer="momentum", lr=0.05, trained_before=True
    )
    assert verdict["verdict"] == "mismatched" and verdict["problem"] == "optimizer slots are not fresh"
    assert counts["exploits_verified"] == 0


def test_a_checkpoint_other_than_the_decisions_is_mismatched(member_class, donor, tmp_path):
    decision = decided(donor_state_id="another state")
    verdict, _ = exploit(member_class, donor, tmp_path, decision=decision)
    assert verdict["verdict"] == "mismatched" and "not the state the decision meant" in verdict["problem"]


def test_a_state_its_donor_never_reported_is_unverifiable_not_verified(member_class, donor, tmp_path):
    verdict, counts = exploit(member_class, donor, tmp_path, reported=False)
    assert verdict["verdict"] == "unverifiable" and counts["exploits_verified"] == 0


def test_a_donor_report_a_kill_lost_is_read_from_rays_registered_copy_and_still_checked(
    member_class, donor, tmp_path
):
    # A run killed before the donor's result.json reached storage: a resumed run keeps the report Ray
    # registered with the checkpoint (pbt_state.json's registered_reports). A wrong copy is caught.
    reports, _ = donor
    registered = {k: v for k, v in reports[-1].items() if not isinstance(v, dict)}
    verdict, _ = exploit(member_class, donor, tmp_path / "kept", reported=False, registered=[registered])
    assert verdict["verdict"] == "verified"
    wrong = {**registered, STATE_DIGEST: "0" * 32}  # a digest of today's kind, of another state
    verdict, _ = exploit(member_class, donor, tmp_path / "wrong", reported=False, registered=[wrong])
    assert verdict["verdict"] == "mismatched" and "weights differ" in verdict["problem"]


def test_a_restore_no_decision_explains_is_unmatched(member_class, donor, tmp_path):
    decision = decided(member="someone else", donor_state_id=None)
    verdict, counts = exploit(member_class, donor, tmp_path, decision=decision)
    assert not verdict["matched"] and counts["exploits_unmatched"] == 1


def test_the_restored_rate_must_be_the_new_configs(member_class, donor, tmp_path):
    # The decision says 5e-4; the recipient ran 8e-4: unmatched, as the config it ran is not the one decided.
    decision = decided(new={OPTIMIZER: "adam", LR: 5e-4}, donor_state_id=None)
    verdict, _ = exploit(member_class, donor, tmp_path, decision=decision)
    assert not verdict["matched"]


def test_a_rate_the_traced_call_never_saw_is_mismatched(member_class, donor, tmp_path, monkeypatch):
    # A bank whose set_lr records the rate but never assigns the variable the traced call reads: the
    # restore then leaves the donor's rate (Keras restores it with the slots), the classic way to lose
    # a mutation. The rate is read inside the training call, so the recipient cannot report 8e-4.
    monkeypatch.setattr(OptimizerBank, "set_lr", lambda bank, lr: setattr(bank, "lr", float(lr)))
    verdict, _ = exploit(member_class, donor, tmp_path)
    assert verdict["verdict"] == "mismatched" and verdict["problem"] == "live rate is not the new config's"


def test_a_bank_that_remembers_used_slots_as_fresh_is_caught(member_class, donor, tmp_path, monkeypatch):
    # A bank that, switching away from an optimizer, keeps its used slots as that optimizer's "fresh"
    # ones: switching back restores them, and any digest taken of what the bank holds agrees with it.
    # The audit compares with a newly built optimizer, built apart from the bank.
    switch = OptimizerBank.switch

    def switch_remembering_used_slots(bank, name, lr, in_flight=None, **overrides):
        if bank.built:
            used = [v.numpy() for v in bank.optimizer.variables]
            bank._built[bank._key] = bank._built[bank._key]._replace(fresh=used)
        switch(bank, name, lr, in_flight, **overrides)

    monkeypatch.setattr(OptimizerBank, "switch", switch_remembering_used_slots)

    reports, checkpoint = donor
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    r = member(member_class, "recipient", optimizer="momentum", lr=0.05, seed=2, **{EXPLOIT: 7})
    r.train()  # momentum's slots are used now
    r.trainer.optimizers.switch("adam", 1e-3)  # away from momentum: the bank remembers its used slots
    r.trainer.optimizers.switch("momentum", 0.05)  # as a restore from an Adam checkpoint would
    r.restore(str(copy))
    report = r.train()
    r.stop()
    decision = decided(new={OPTIMIZER: "momentum", LR: 0.05}, donor_state_id=reports[-1]["state_id"])
    _, verdicts = audited_reports({"donor": reports, "recipient": [report]}, [decision])
    assert verdicts.iloc[0]["problem"] == "optimizer slots are not fresh"


# --- a member's restore of its own checkpoint (a pause, a restart, a resume) ---------------------


def own_restore(member_class, tmp_path, tamper=None, kind="pause"):
    """A member trains 2 checks and saves (a PBT pause), its checkpoint is tampered with or not, and
    the member (on a new worker) restores it and trains on; returns the verdict on that restore."""
    m = member(member_class, "m", optimizer="adam", lr=1e-3, seed=1)
    reports = [m.train(), m.train()]
    checkpoint = Path(m.save().checkpoint.path)
    m.stop()
    if tamper:
        tamper(checkpoint)
    again = member(member_class, "m", optimizer="adam", lr=1e-3, seed=1)
    again.restore(str(checkpoint))
    reports.append({**again.train(), "restore_kind": kind})
    again.stop()
    restores, verdicts = audited_reports({"m": reports}, [])
    assert len(restores) == 1
    return verdicts.iloc[0]


def test_a_worker_reset_for_another_member_restores_its_turn_verified_or_starts_it_afresh(member_class):
    # Ray's PBT turn on a reused worker: reset to the next member, whose checkpoint is then restored
    # (the reset leaves the state to it); or a new trial, whose first check starts from initial weights.
    m = member(member_class, "m", optimizer="adam", lr=1e-3, seed=1)
    reports = [m.train(), m.train()]
    checkpoint = m.save().checkpoint.path
    m.stop()
    worker = member(member_class, "other", optimizer="rmsprop", lr=1e-2, seed=7)
    worker.train()
    assert worker.reset(member_config("m", optimizer="adam", lr=1e-3, seed=1))
    worker.restore(checkpoint)
    reports.append({**worker.train(), "restore_kind": "pause"})
    _, verdicts = audited_reports({"m": reports}, [])
    assert list(verdicts["verdict"]) == ["verified"]
    assert worker.reset(member_config("n", optimizer="adam", lr=1e-3, seed=3))
    first = worker.train()
    worker.stop()
    new_worker = member(member_class, "n", optimizer="adam", lr=1e-3, seed=3)
    assert first[STATE_DIGEST] == new_worker.train()[STATE_DIGEST] and first[SEGMENT_FROM] == "n"
    new_worker.stop()


def scale_weights(checkpoint: Path, factor=1.001) -> None:
    """What the issue's watcher did: one weight array × 1.001 (the file still loads)."""
    with np.load(checkpoint / "trainer.npz") as f:
        arrays = dict(f)
    arrays["model/0"] = arrays["model/0"] * np.float32(factor)
    np.savez(checkpoint / "trainer.npz", **arrays)


def test_an_untouched_own_checkpoint_is_verified(member_class, tmp_path):
    verdict = own_restore(member_class, tmp_path)
    assert (verdict["kind"], verdict["matched"], verdict["verdict"]) == ("pause", True, "verified")


def test_an_own_checkpoint_tampered_after_its_save_is_mismatched(member_class, tmp_path):
    verdict = own_restore(member_class, tmp_path, tamper=scale_weights, kind="resume")
    assert verdict["kind"] == "resume" and verdict["verdict"] == "mismatched"
    assert verdict["problem"] == "weights differ from what the member saved"
    slots = own_restore(member_class, tmp_path / "slots", tamper=lambda c: change_arrays(c, "optimizer/"))
    assert slots["problem"] == "optimizer slots differ from what the member saved"


# --- a copy draws its own batches --------------------------------------------------------------


def test_a_copy_keeps_its_donors_state_but_draws_its_own_batches(member_class, donor, tmp_path):
    from pbt_lab.training.state import stream_seed

    _, checkpoint = donor
    copies = []
    for _ in range(2):
        r = member(member_class, "recipient", optimizer="adam", lr=8e-4, seed=2, **{EXPLOIT: 7})
        r.restore(str(checkpoint))
        copies.append((r.trainer.order.state(), r.trainer.order.take(3, 100)))
        r.stop()
    d = member(member_class, "donor", optimizer="adam", lr=1e-3, seed=1)
    d.restore(str(checkpoint))  # the donor going on from the state it saved
    donor_batches = d.trainer.order.take(3, 100)
    d.stop()
    (state, batches), (again, batches_again) = copies
    assert state == [stream_seed(2, 7), 0, 0]  # its own seed and the decision: a stream of its own
    streams = {stream_seed(seed, decision) for seed in (1, 2) for decision in (7, 8)}
    assert len(streams) == 4 and 1 not in streams  # another seed or decision, another stream
    assert not np.array_equal(batches, donor_batches)
    assert again == state and np.array_equal(batches, batches_again)  # the same decision, the same stream


# --- the tables, on hand-made reports ----------------------------------------------------------


def report(trial, iteration, step, **extra):
    row = {
        "trial_id": trial,
        "training_iteration": iteration,
        "step": step,
        OPTIMIZER: "adam",
        LR: 1e-3,
        "timestamp": iteration,
        "check_seconds": 1.0,
    }
    return {**row, **extra}


def test_a_resumed_recipient_repeating_its_exploit_counts_once_and_a_real_second_exploit_twice():
    restore = {"segment_from": "d", "segment_step": 100, EXPLOIT: 4, "restored_id": "s1"}
    runs = {
        "r": [
            report("r", 1, 50, segment_from="r", segment_step=0),
            report("r", 2, 100),
            report("r", 3, 150, **restore),
            report("r", 4, 200),
            # the driver died; on resume the recipient restarts from the same donor checkpoint
            report("r", 3, 150, **restore),
            report("r", 4, 200),
            report("r", 5, 250),
            # later, a new decision copies the same (unchanged) donor checkpoint again
            report("r", 6, 150, **{**restore, EXPLOIT: 9}),
            report("r", 7, 200),
        ]
    }
    history = read_history(runs)
    exploits = audit.exploit_rows(history)
    assert list(exploits[EXPLOIT]) == [4, 9]
    assert list(history["iteration"]) == [1, 2, 3, 4, 5, 6, 7]
    assert history["compute_train_seconds"].iloc[0] == 9.0  # the repeated checks were still spent


def test_initial_values_come_from_the_first_report_not_from_rays_rewritten_params(tmp_path):
    from pbt_lab.results.ray_files import read_reports
    from pbt_lab.results.tables import read_trials

    trial = tmp_path / "LabTrainable_x_00000"
    trial.mkdir()
    # Ray rewrote params.json at the member's exploit: it names the config it had last.
    (trial / "params.json").write_text(
        json.dumps({OPTIMIZER: "momentum", LR: 0.0158, "seed": 3, "model": {"scale": 0.25}})
    )
    rows = [
        report("x_00000", 1, 50, optimizer="rmsprop", lr=0.000429),
        report("x_00000", 2, 100, optimizer="momentum", lr=0.0158, segment_from="d", segment_step=50),
    ]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = read_history(read_reports(tmp_path, {}))
    trials = read_trials(tmp_path, history, ray_states={})
    row = trials.iloc[0]
    assert (row["initial_optimizer"], row["initial_lr"]) == ("rmsprop", 0.000429)
    assert (row[OPTIMIZER], row[LR]) == ("momentum", 0.0158)


def test_a_state_saved_under_sha256_and_loaded_under_xxh3_is_unverifiable_not_mismatched():
    # A run resumed across the digest's change: its saver's SHA-256 cannot be compared with the xxh3_128
    # of what was loaded; the audit fails closed on it, without calling the state altered.
    row = {**row_of_exploit(own=True), RESTORED_DIGEST: "b" * 32}
    saves = pd.DataFrame(
        [{STATE_ID: "s1", STATE_DIGEST: "a" * 64, SLOTS_DIGEST: "c" * 64, OPTIMIZER_STEPS: 20}]
    )
    verdict = audit.audit(pd.DataFrame([row]), saves, []).iloc[0]
    assert (verdict["verdict"], verdict["problem"]) == (
        "unverifiable",
        "saved and loaded under different digests",
    )


def test_a_run_from_before_xxh3_is_read_with_its_sha256_digests_under_todays_names(tmp_path):
    from pbt_lab.results.ray_files import read_reports

    trial = tmp_path / "LabTrainable_x_00000"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    old = {"state_id": "s1", "state_sha256": "a" * 64, "restored_slots_sha256": "b" * 64, "lr": 0.1}
    (trial / "result.json").write_text(json.dumps(old) + "\n")
    [row] = read_reports(tmp_path, {})[trial.name]
    assert row == {"state_id": "s1", STATE_DIGEST: "a" * 64, RESTORED_SLOTS_DIGEST: "b" * 64, "lr": 0.1}


def test_a_lineage_followed_back_ends_when_two_members_copied_each_other_within_a_second():
    # a copies b's step-100 state, then b copies a's step-150 state, all within Ray's second 7.
    def row(trial, iteration, step, at, **extra):
        return report(trial, iteration, step, timestamp=7, reported_at=at, data_seed=1, **extra)

    runs = {
        "a": [
            row("a", 1, 50, 7.1),
            row("a", 2, 100, 7.2),
            row("a", 3, 150, 7.5, segment_from="b", segment_step=100),
        ],
        "b": [
            row("b", 1, 50, 7.15),
            row("b", 2, 100, 7.3),
            row("b", 3, 200, 7.6, segment_from="a", segment_step=150),
        ],
    }
    history = read_history(runs)
    followed = lineage.member_schedule(history, "b")
    assert [(r["trial_id"], r["step"]) for _, r in followed.iterrows()] == [
        ("b", 50),
        ("b", 100),
        ("a", 150),
        ("b", 200),
    ]


def test_quantile_sizes_compare_each_decision_with_floor_of_the_fraction():
    decisions = [
        {"ranked": 1, "lower": 0, "upper": 0},
        {"ranked": 5, "population": 5, "lower": 1, "upper": 1},
        {"ranked": 4, "population": 5, "lower": 0, "upper": 0},  # one in flight: 20 % of 4 is nobody
        {"ranked": 3, "population": 4, "lower": 1, "upper": 1},  # under 1 / 0.2 members: at least one
        {"ranked": 10, "lower": 2, "upper": 2},
        {"ranked": 10, "lower": 3, "upper": 2},
    ]
    sizes = lineage.quantile_sizes(decisions, 0.2)
    assert sizes == [
        {"ranked": 3, "population": 4, "decisions": 1, "replaced": [1], "donors": [1], "expected": 1},
        {"ranked": 4, "population": 5, "decisions": 1, "replaced": [0], "donors": [0], "expected": 0},
        {"ranked": 5, "population": 5, "decisions": 1, "replaced": [1], "donors": [1], "expected": 1},
        {"ranked": 10, "population": 10, "decisions": 2, "replaced": [2, 3], "donors": [2], "expected": 2},
    ]


def test_the_winner_is_chosen_on_validation_never_on_test():
    trials = pd.DataFrame(
        {"trial_id": ["a", "b", "c"], "final_val_acc": [0.97, 0.99, 0.98], "test_acc": [0.99, 0.90, 0.95]}
    )
    history = pd.DataFrame(
        {"trial_id": ["a"], "steps_to_target": [None], "timestamp": [1], "train_seconds": [1.0]}
    )
    assert lineage.choose_winner(trials, history, stopped_at_target=False) == "b"
    shuffled = trials.assign(test_acc=trials["test_acc"].sample(frac=1, random_state=3).to_numpy())
    assert lineage.choose_winner(shuffled, history, stopped_at_target=False) == "b"


def test_the_pbt_state_file_is_what_the_tables_read(tmp_path):
    (tmp_path / "pbt_state.json").write_text(json.dumps({"decisions": [{"decision": 0}]}))
    assert lineage.read_pbt_state(tmp_path)["decisions"] == [{"decision": 0}]
    assert lineage.read_pbt_state(tmp_path / "missing") == {}


def test_a_resume_from_before_an_exploit_drops_the_exploit_it_will_redo_not_the_rows_before():
    # The recipient was at step 200 (state s2) when it copied a donor's step-100 state; the driver
    # died before Ray's snapshot recorded that, so the resume restarts it from its own s2.
    runs = {
        "r": [
            report("r", 1, 100, state_id="s1"),
            report("r", 2, 200, state_id="s2"),
            report("r", 3, 150, segment_from="d", segment_step=100, restored_id="x", **{EXPLOIT: 4}),
            report("r", 3, 250, segment_from="r", segment_step=200, restored_id="s2"),
        ]
    }
    history = read_history(runs)
    assert list(history["step"]) == [100, 200, 250] and not len(audit.exploit_rows(history))


# --- the audit's verdicts, on hand-made rows (no Ray, no training) ---------------------------


def row_of_exploit(switched: bool = False, own: bool = False) -> dict:
    """The first report after decision 7's exploit of the donor's state s1 (``own``: the member's
    restore of its own s1), as a well-made recipient reports it."""
    new = {OPTIMIZER: "momentum" if switched else "adam", LR: 0.05 if switched else 8e-4}
    return {
        TRIAL_ID: "recipient",
        EXPLOIT: None if own else 7,
        SEGMENT_FROM: "recipient" if own else "donor",
        **new,
        RESTORED_ID: "s1",
        RESTORED_OPTIMIZER: "adam",
        RESTORED_DIGEST: "weights",
        LR_USED: new[LR],
        RESTORED_SLOTS_DIGEST: "fresh" if switched else "adam slots",
        FRESH_SLOTS_DIGEST: "fresh" if switched else None,
        RESTORED_OPTIMIZER_STEPS: 0 if switched else 20,
        RESTORE_KIND: "pause" if own else "exploit",
    }


def audited(
    switched: bool = False,
    decision: dict | None = None,
    saved: bool = True,
    donor_slots="adam slots",
    own: bool = False,
    **restored,
):
    """Decision 7's exploit of the donor's state s1 (``own``: the member's restore of its own s1), as
    the restoring trial's first report after the restore says, with ``restored`` fields changed (and
    the slots digest the saver reported); returns its verdict row."""
    new = {OPTIMIZER: "momentum" if switched else "adam", LR: 0.05 if switched else 8e-4}
    row = {**row_of_exploit(switched, own), **restored}
    saves = pd.DataFrame(
        [{STATE_ID: "s1", STATE_DIGEST: "weights", SLOTS_DIGEST: donor_slots, OPTIMIZER_STEPS: 20}]
    )
    decision = decision or decided(new=new, donor_state_id="s1")
    return audit.audit(pd.DataFrame([row]), saves if saved else saves.iloc[:0], [decision]).iloc[0]


@pytest.mark.parametrize(
    "switched, restored, problem",
    [
        (False, {}, None),
        (True, {}, None),
        (False, {"restored_digest": "other"}, "weights differ from what the donor saved"),
        (False, {"lr_used": 1e-3}, "live rate is not the new config's"),
        (False, {"restored_slots_digest": "other"}, "optimizer slots differ from what the donor saved"),
        (False, {"restored_optimizer_steps": 0}, "optimizer step counter is neither the donor's nor fresh"),
        (True, {"restored_slots_digest": "adam slots"}, "optimizer slots are not fresh"),
        (True, {"restored_optimizer_steps": 20}, "optimizer step counter is neither the donor's nor fresh"),
    ],
)
def test_each_check_of_the_audit_fails_on_its_own(switched, restored, problem):
    verdict = audited(switched, **restored)
    assert verdict["matched"] and verdict["problem"] == problem
    assert verdict["verdict"] == ("mismatched" if problem else "verified")


@pytest.mark.parametrize(
    "restored, problem",
    [
        ({}, None),
        ({"lr_used": None}, None),  # a diverged member waiting for a donor trains nothing: no rate used
        ({"restored_digest": "other"}, "weights differ from what the member saved"),
        ({"lr_used": 1e-3}, "live rate is not its config's"),
        ({"restored_slots_digest": "other"}, "optimizer slots differ from what the member saved"),
        ({"restored_optimizer_steps": 0}, "optimizer step counter is neither the member's nor fresh"),
        ({"restored_optimizer": "momentum"}, "its checkpoint holds another optimizer than its own"),
    ],
)
def test_each_check_of_an_own_restore_fails_on_its_own(restored, problem):
    verdict = audited(own=True, **restored)
    assert verdict["kind"] == "pause" and verdict["matched"] and verdict["problem"] == problem
    assert verdict["verdict"] == ("mismatched" if problem else "verified")


def test_the_audit_needs_the_decisions_state_and_the_savers_report():
    no_state = audited(decision=decided(donor_state_id=None))  # what the scheduler failed to record
    assert no_state["matched"] and no_state["problem"] == "not the state the decision meant"
    assert audited(saved=False)["verdict"] == "unverifiable"
    assert audited(own=True, saved=False)["verdict"] == "unverifiable"
    assert not audited(decision=decided(member="someone else", donor_state_id="s1"))["matched"]
    # An exploit whose first check did not say which rate it used cannot be verified.
    assert audited(lr_used=None)["verdict"] == "unverifiable"


def test_a_scheduler_that_keeps_no_decisions_is_audited_on_the_digests_alone():
    # Ray's PB2 (in a comparison) copies donors without the lab's record: nothing to match, all to verify.
    row = audited()  # a well-formed exploit, audited with the record
    saves = pd.DataFrame(
        [{STATE_ID: "s1", STATE_DIGEST: "weights", SLOTS_DIGEST: "adam slots", OPTIMIZER_STEPS: 20}]
    )
    exploit = pd.DataFrame([{**row_of_exploit(), RESTORED_DIGEST: "other"}])
    verdict = audit.audit(exploit, saves, None).iloc[0]
    assert verdict["matched"] and verdict["problem"] == "weights differ from what the donor saved"
    assert not audit.audit(exploit, saves, []).iloc[0]["matched"]  # a lab run that lost its record
    assert row["verdict"] == "verified"


def test_a_donor_report_without_a_slots_digest_verifies_no_same_optimizer_exploit():
    assert audited(donor_slots=None)["problem"] == "optimizer slots differ from what the donor saved"


def test_a_run_from_before_fresh_digests_keeps_the_step_counter_check_for_its_switches():
    legacy = {"fresh_slots_digest": None, "lr_used": None, "restored_lr": 0.05}  # what such a run reported
    assert audited(True, **legacy)["verdict"] == "verified"
    verdict = audited(True, **legacy, restored_optimizer_steps=20)
    assert verdict["problem"] == "optimizer step counter is neither the donor's nor fresh"
    assert audited(True, **{**legacy, "restored_lr": 1e-3})["problem"] == "live rate is not the new config's"
    # A run of today's that did not report the fresh digest is not let off so.
    assert audited(True, fresh_slots_digest=None)["problem"] == "optimizer slots are not fresh"


# --- the audit fails closed ----------------------------------------------------------------------


def summary_of(verdicts: list[str], kind="pause", undone=(), allow=False) -> dict:
    """A summary's audit parts for restores of ``kind`` with ``verdicts``, and exploits left undone."""
    rows = pd.DataFrame({"kind": kind, "matched": True, "verdict": verdicts, "problem": None})
    return {
        "restores": {**audit.restore_counts(rows), "allow_unverified": allow},
        "exploits": audit.exploit_counts(rows.iloc[:0], [], list(undone)),
    }


def test_the_audit_fails_closed_unless_unverified_restores_are_allowed():
    assert audit.audit_failures(summary_of(["verified", "verified"])) == []
    assert audit.audit_failures(summary_of(["verified", "mismatched"])) == ["1 pause restore(s) mismatched"]
    assert audit.audit_failures(summary_of(["unverifiable"], kind="exploit")) == [
        "1 exploit restore(s) unverifiable"
    ]
    assert audit.audit_failures(summary_of(["unverifiable"], allow=True)) == []
    assert audit.audit_failures(summary_of(["mismatched"], allow=True)) == ["1 pause restore(s) mismatched"]
    undone = {
        "decision": 3,
        "member": "m",
        "why": "the run ended first, its member running",
        "explained": False,
    }
    assert audit.audit_failures(summary_of([], undone=[undone])) == [
        "exploit decision 3 (m) never carried out: the run ended first, its member running"
    ]
    assert audit.audit_failures(summary_of([], undone=[{**undone, "explained": True}])) == []
    assert audit.audit_failures(summary_of([], undone=[undone], allow=True)) == []


def test_an_exploit_left_undone_is_explained_only_by_the_runs_end():
    decisions = [
        {"decision": 0, "action": "exploit", "member": "a"},
        {"decision": 1, "action": "exploit", "member": "b"},
        {"decision": 2, "action": "exploit", "member": "c", "carried_out": False},
        {"decision": 3, "action": "exploit", "member": "d"},
        {"decision": 4, "action": "keep", "member": "e"},
    ]
    done = pd.DataFrame({EXPLOIT: [3]})
    undone = audit.undone_exploits(
        decisions, done, {"a": "stopped", "b": "running", "c": "capped", "d": "capped"}
    )
    assert [(u["decision"], u["explained"]) for u in undone] == [(0, True), (1, False), (2, False)]
    assert undone[2]["why"] == "its member reported again without carrying it out"


# --- another trainable's restores (tuning/audited.py's records) ----------------------------------


def test_another_trainables_restores_are_verified_only_by_what_their_saver_reported():
    from pbt_lab.results.audit import audit_digests, digest_audit_lines
    from pbt_lab.tuning import audited

    state, record = [3, 0.5], None
    record = audited.saving(state)  # outside a trial: no trial id of its own
    record["saved_by"] = "b"
    saved = {"trial_id": "b", "training_iteration": 3, **record}
    decision = {"decision": 0, "action": "exploit", "member": "a", "donor": "b"}

    def first_report(trial, loaded, rec, config_decision=0):
        return {
            "trial_id": trial,
            "training_iteration": 4,
            "config": {"exploit_decision": config_decision},
            **audited.restored(loaded, rec),
        }

    good = audit_digests({"b": [saved], "a": [first_report("a", state, record)]}, [decision])
    assert (
        good["verdict"].tolist() == ["verified"]
        and good["matched"].all()
        and good["kind"].tolist() == ["exploit"]
    )
    assert digest_audit_lines(good)[1]
    tampered = audit_digests({"b": [saved], "a": [first_report("a", [3, 0.5000001], record)]}, [decision])
    assert tampered["verdict"].tolist() == ["mismatched"]
    lines, passed = digest_audit_lines(tampered)
    assert not passed and lines[1].startswith("MISMATCHED: a at iteration 4 restored b's state")
    unknown = audit_digests(
        {"a": [first_report("a", state, {**record, "state_id": "never-reported"})]}, [decision]
    )
    assert unknown["verdict"].tolist() == ["unverifiable"] and not digest_audit_lines(unknown)[1]
    undecided = audit_digests(
        {"b": [saved], "a": [first_report("a", state, record, config_decision=7)]}, [decision]
    )
    assert not undecided["matched"].any() and not digest_audit_lines(undecided)[1]
    own = audit_digests({"b": [saved, first_report("b", state, record)]}, [])
    assert (
        own["kind"].tolist() == ["own"] and own["matched"].all() and own["verdict"].tolist() == ["verified"]
    )
    # A digest is of dtype, shape and bytes: the same numbers in another shape are another state.
    assert audited.digest([[1.0, 2.0]]) != audited.digest([[[1.0], [2.0]]]) != audited.digest([[1, 2]])


def test_an_exploits_restore_lost_from_result_json_is_audited_from_the_schedulers_copy():
    """LabPBT keeps each exploit's first report of what the member loaded (its decision's ``restored``):
    audited where Ray's result.json lost the report, and failing where the member loaded another state."""
    from pbt_lab.results.audit import audit_digests, digest_audit_lines
    from pbt_lab.tuning import audited

    record = {**audited.saving([3, 0.5]), "saved_by": "b"}
    saved = {"trial_id": "b", "training_iteration": 3, **record}
    own = {**audited.saving([1, 4.0]), "saved_by": "a"}
    a_saved = {"trial_id": "a", "training_iteration": 3, **own}

    def decision(loaded, rec):
        return {
            "decision": 0,
            "action": "exploit",
            "member": "a",
            "donor": "b",
            "donor_state_id": record["state_id"],
            "restored": audited.restored(loaded, rec),
        }

    lost = audit_digests({"b": [saved], "a": [a_saved]}, [decision([3, 0.5], record)])
    assert lost["verdict"].tolist() == ["verified"] and lost["matched"].all() and digest_audit_lines(lost)[1]
    tampered = audit_digests({"b": [saved], "a": [a_saved]}, [decision([3, 0.6], record)])
    assert tampered["verdict"].tolist() == ["mismatched"] and not digest_audit_lines(tampered)[1]
    # It reloaded its own state instead of the donor's: one row, failing, even beside its own report of it.
    kept_own = decision([1, 4.0], own)
    first = {"trial_id": "a", "training_iteration": 4, "config": {}, **kept_own["restored"]}
    not_copied = audit_digests({"b": [saved], "a": [a_saved, first]}, [kept_own])
    lines, passed = digest_audit_lines(not_copied)
    assert len(not_copied) == 1 and not not_copied["matched"].any() and not passed
    meant = "not the state a LabPBT decision meant"
    assert lines[1] == f"VERIFIED: a at iteration 4 restored a's state {own['state_id']}: {meant}"


@pytest.mark.parametrize(
    "new, used, problem",
    [
        ({"batch_size": 64, "weight_decay": 1e-4}, {"batch_size_used": 64, "weight_decay_used": 1e-4}, None),
        ({"batch_size": 64}, {"batch_size_used": 100}, "live batch_size is not the new config's"),
        ({"weight_decay": 1e-4}, {"weight_decay_used": 0.0}, "live weight_decay is not the new config's"),
        ({"weight_decay": 1e-4}, {}, "live weight_decay is not the new config's"),  # not reported: not live
        (
            {"model.options.dropout": 0.3},
            {"model.options.dropout_used": 0.4},
            "live model.options.dropout is not the new config's",
        ),
        ({"momentum": 0.9}, {}, None),  # Adam has no momentum: nothing to read
        ({"beta_1": 0.8}, {"beta_1_used": 0.9}, "live beta_1 is not the new config's"),
    ],
)
def test_every_searched_key_of_an_exploit_is_checked_live(new, used, problem):
    decision = decided(new={OPTIMIZER: "adam", LR: 8e-4, **new}, donor_state_id="s1")
    verdict = audited(decision=decision, **used)
    assert verdict["matched"] and verdict["problem"] == problem


def test_the_ranking_figures_state_the_error_of_ranking_on_fewer_examples():
    from pbt_lab.results.summary import ranking_figures

    trials = pd.DataFrame({"final_val_acc": [0.90, 0.96, 0.98]})
    summary = {"data": {"val": 1000}, "config": {"train": {"rank_examples": 250}}, "time_breakdown": None}
    r = ranking_figures(summary, trials)
    assert r["examples"] == 250 and r["whole_split"] == 1000 and r["accuracy"] == 0.96
    assert r["standard_error"] == pytest.approx((0.96 * 0.04 / 250) ** 0.5)
    whole = ranking_figures({**summary, "config": {"train": {"rank_examples": None}}}, trials)
    assert whole["examples"] == 1000 and whole["standard_error"] == pytest.approx(r["standard_error"] / 2)
