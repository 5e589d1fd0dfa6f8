"""The exploit audit can fail: real trainables save and restore real checkpoints (no Tune run), the
test tampers with what lies between, and the audit must say so; each of its checks failing on its
own, on hand-made rows. Also the tables' handling of a resumed recipient that carries out its
exploit a second time."""

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
    FRESH_SLOTS_SHA256,
    LR,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    RESTORED_ID,
    RESTORED_LR,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SHA256,
    RESTORED_SLOTS_SHA256,
    SEGMENT_FROM,
    SLOTS_SHA256,
    STATE_ID,
    STATE_SHA256,
    TRIAL_ID,
)
from pbt_lab.results import lineage
from pbt_lab.results.tables import read_history, read_saved_states
from pbt_lab.training.optimizers import OptimizerBank
from pbt_lab.tuning.trainable import LabTrainable, trial_space


@pytest.fixture(scope="module")
def member_class(ray_session, bundled):
    from ray import tune

    return tune.with_parameters(LabTrainable, data=bundled)


def member(member_class, trial_id: str, **searched):
    """A PBT member outside Tune (its trial id set as Tune would), reporting its state every 2 checks."""
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
    return member_class(config={**config, "checkpoint_every": 2, TRIAL_INFO: info})


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


def exploit(
    member_class,
    donor,
    tmp_path,
    tamper=None,
    optimizer="adam",
    lr=8e-4,
    decision=None,
    reported=True,
    edit_report=lambda report: report,
    trained_before=False,
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
    report = edit_report(r.train())
    r.stop()
    decision = decision or decided(new={OPTIMIZER: optimizer, LR: lr}, donor_state_id=reports[-1]["state_id"])
    runs = {"donor": reports if reported else reports[:1], "recipient": [report]}
    history = read_history(runs)
    exploits = lineage.exploit_rows(history)
    verdicts = lineage.audit(exploits, read_saved_states(runs), [decision])
    return verdicts.iloc[0], lineage.audit_counts(verdicts, [decision], exploits)


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

    def switch_keeping_slots(bank, name, lr, **overrides):
        kept = [v.numpy() for v in bank.optimizer.variables] if bank.built and bank.name == name else None
        switch(bank, name, lr, **overrides)
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


def test_a_restore_no_decision_explains_is_unmatched(member_class, donor, tmp_path):
    decision = decided(member="someone else", donor_state_id=None)
    verdict, counts = exploit(member_class, donor, tmp_path, decision=decision)
    assert not verdict["matched"] and counts["exploits_unmatched"] == 1


def test_the_restored_rate_must_be_the_new_configs(member_class, donor, tmp_path):
    # The decision says 5e-4; the recipient ran 8e-4 (Keras restoring an optimizer's old rate is the
    # classic way to lose a mutation): unmatched, as the config it ran is not the one decided.
    decision = decided(new={OPTIMIZER: "adam", LR: 5e-4}, donor_state_id=None)
    verdict, _ = exploit(member_class, donor, tmp_path, decision=decision)
    assert not verdict["matched"]


def test_a_live_rate_left_at_the_donors_is_mismatched(member_class, donor, tmp_path):
    # What the recipient would report had it kept the rate Keras restores with the slots (the donor's).
    verdict, _ = exploit(member_class, donor, tmp_path, edit_report=lambda r: {**r, "restored_lr": 1e-3})
    assert verdict["verdict"] == "mismatched" and "live rate" in verdict["problem"]


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
    exploits = lineage.exploit_rows(history)
    assert list(exploits[EXPLOIT]) == [4, 9]
    assert list(history["iteration"]) == [1, 2, 3, 4, 5, 6, 7]
    assert history["compute_train_seconds"].iloc[0] == 9.0  # the repeated checks were still spent


def test_quantile_sizes_compare_each_decision_with_floor_of_the_fraction():
    decisions = [
        {"ranked": 1, "lower": 0, "upper": 0},
        {"ranked": 5, "lower": 1, "upper": 1},
        {"ranked": 10, "lower": 2, "upper": 2},
        {"ranked": 10, "lower": 3, "upper": 2},
    ]
    sizes = lineage.quantile_sizes(decisions, 0.2)
    assert sizes == [
        {"ranked": 5, "decisions": 1, "replaced": [1], "donors": [1], "expected": 1},
        {"ranked": 10, "decisions": 2, "replaced": [2, 3], "donors": [2], "expected": 2},
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
    assert list(history["step"]) == [100, 200, 250] and not len(lineage.exploit_rows(history))


# --- the audit's verdicts, on hand-made rows (no Ray, no training) ---------------------------


def audited(
    switched: bool = False,
    decision: dict | None = None,
    saved: bool = True,
    donor_slots="adam slots",
    **restored,
):
    """Decision 7's exploit of the donor's state s1, as the recipient's first report after the
    restore says, with ``restored`` fields changed (and the slots digest the donor reported);
    returns its verdict row."""
    new = {OPTIMIZER: "momentum" if switched else "adam", LR: 0.05 if switched else 8e-4}
    row = {
        TRIAL_ID: "recipient",
        EXPLOIT: 7,
        SEGMENT_FROM: "donor",
        **new,
        RESTORED_ID: "s1",
        RESTORED_OPTIMIZER: "adam",
        RESTORED_SHA256: "weights",
        RESTORED_LR: new[LR],
        RESTORED_SLOTS_SHA256: "fresh" if switched else "adam slots",
        FRESH_SLOTS_SHA256: "fresh" if switched else "adam fresh",
        RESTORED_OPTIMIZER_STEPS: 0 if switched else 20,
        **restored,
    }
    saves = pd.DataFrame(
        [{STATE_ID: "s1", STATE_SHA256: "weights", SLOTS_SHA256: donor_slots, OPTIMIZER_STEPS: 20}]
    )
    decision = decision or decided(new=new, donor_state_id="s1")
    return lineage.audit(pd.DataFrame([row]), saves if saved else saves.iloc[:0], [decision]).iloc[0]


@pytest.mark.parametrize(
    "switched, restored, problem",
    [
        (False, {}, None),
        (True, {}, None),
        (False, {"restored_sha256": "other"}, "weights differ from what the donor saved"),
        (False, {"restored_lr": 1e-3}, "live rate is not the new config's"),
        (False, {"restored_slots_sha256": "other"}, "optimizer slots differ from the donor's"),
        (False, {"restored_optimizer_steps": 0}, "optimizer step counter is neither the donor's nor fresh"),
        (True, {"restored_slots_sha256": "adam slots"}, "optimizer slots are not fresh"),
        (True, {"restored_optimizer_steps": 20}, "optimizer step counter is neither the donor's nor fresh"),
    ],
)
def test_each_check_of_the_audit_fails_on_its_own(switched, restored, problem):
    verdict = audited(switched, **restored)
    assert verdict["matched"] and verdict["problem"] == problem
    assert verdict["verdict"] == ("mismatched" if problem else "verified")


def test_the_audit_needs_the_decisions_state_and_the_donors_report():
    no_state = audited(decision=decided(donor_state_id=None))  # what the scheduler failed to record
    assert no_state["matched"] and no_state["problem"] == "not the state the decision meant"
    assert audited(saved=False)["verdict"] == "unverifiable"
    assert not audited(decision=decided(member="someone else", donor_state_id="s1"))["matched"]


def test_a_donor_report_without_a_slots_digest_verifies_no_same_optimizer_exploit():
    assert audited(donor_slots=None)["problem"] == "optimizer slots differ from the donor's"


def test_a_run_from_before_fresh_digests_keeps_the_step_counter_check_for_its_switches():
    assert audited(True, fresh_slots_sha256=None)["verdict"] == "verified"
    verdict = audited(True, fresh_slots_sha256=None, restored_optimizer_steps=20)
    assert verdict["problem"] == "optimizer step counter is neither the donor's nor fresh"
