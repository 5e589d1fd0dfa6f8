"""The Trainer's behaviour on real data: the valley's three regimes, exact resume, live rate changes."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import keras
import numpy as np
import pytest

from pbt_lab import UserError
from pbt_lab.config import ModelConfig, TrainConfig
from pbt_lab.names import CAPPED, COMPILE, DIVERGED, REACHED, TRAIN_PART, VALIDATE
from pbt_lab.train import main
from pbt_lab.training.clock import PartClock
from pbt_lab.training.optimizers import make_optimizer, new_slots_digest, slots_digest
from pbt_lab.training.trainer import Trainer

SMALL = ModelConfig(scale=0.25)


def trainer(data, **train):
    return Trainer(data, TrainConfig(**{"steps_per_check": 20, **train}), SMALL)


def weights(t):
    return [v.numpy().copy() for v in t.model.variables]


def test_adam_at_1e3_reaches_97_percent(bundled):
    summary = trainer(bundled, optimizer="adam", lr=1e-3, steps_per_check=50, max_steps=2000).run()
    assert summary["status"] == REACHED
    assert summary["steps_to_target"] == summary["steps"] <= 2000
    assert 0 < summary["seconds_to_target"] == summary["train_seconds"]
    assert summary["final_train_acc"] >= 0.97 and summary["final_val_acc"] > 0.95


def test_gd_at_1e6_is_capped(bundled):
    summary = trainer(bundled, optimizer="gd", lr=1e-6, max_steps=100).run()
    assert summary["status"] == CAPPED
    assert summary["steps"] == 100 and summary["steps_to_target"] is None
    assert summary["final_val_acc"] < 0.5


def test_gd_at_100_diverges_within_the_first_check(bundled):
    t = trainer(bundled, optimizer="gd", lr=100.0, steps_per_check=50)
    rows = []
    t.run(on_check=rows.append)
    assert t.progress.status == DIVERGED and len(rows) == 1 and t.progress.step < 50
    assert all(np.isfinite(w).all() for w in weights(t))  # stopped before the non-finite update


def test_without_the_divergence_stop_a_diverging_run_spends_its_whole_budget(bundled):
    t = trainer(
        bundled, optimizer="gd", lr=100.0, steps_per_check=50, max_steps=100, stop_on_divergence=False
    )
    t.run()
    assert (
        t.progress.status == CAPPED and t.progress.step == 100 and t.progress.last["val_acc"] < 0.2
    )  # what early stopping saves


def test_seconds_budget_caps_the_run(bundled):
    t = trainer(bundled, optimizer="gd", lr=1e-6, max_seconds=0.5)
    t.run()
    assert t.progress.status == CAPPED and t.progress.train_seconds >= 0.5


def test_resume_is_exact(bundled, tmp_path):
    straight = trainer(bundled, optimizer="adam", lr=1e-3)
    for _ in range(3):
        straight.check()
    first = trainer(bundled, optimizer="adam", lr=1e-3)
    first.check()
    first.save(tmp_path / "ckpt")
    resumed = trainer(bundled, optimizer="adam", lr=1e-3, seed=7)  # another seed: the state must carry it
    resumed.restore(tmp_path / "ckpt")
    assert resumed.progress.step == 20
    resumed.check()
    resumed.check()
    assert resumed.progress.step == straight.progress.step == 60
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(straight.optimizers.optimizer.variables, resumed.optimizers.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_each_optimizer_is_compiled_before_it_trains_and_the_compile_trains_nothing(bundled):
    clock = PartClock()
    t = Trainer(bundled, TrainConfig(steps_per_check=20), SMALL, clock=clock)
    assert t.optimizers.tracing_count == 1 and t._eval_fn.experimental_get_tracing_count() == 1
    compiled = clock.take()
    assert compiled[COMPILE] > 0 and TRAIN_PART not in compiled and VALIDATE not in compiled
    # A new optimizer's call, compiled on no batches: it changes no weight, slot or step, nor the data order.
    optimizer = make_optimizer("rmsprop", 0.001)
    optimizer.build(t.model.trainable_variables)
    start, slots, order = weights(t), [v.numpy().copy() for v in optimizer.variables], t.order.state()
    t._make_train_fn(optimizer)
    assert int(optimizer.iterations.numpy()) == 0 and t.order.state() == order
    for a, b in zip(start + slots, weights(t) + [v.numpy() for v in optimizer.variables]):
        np.testing.assert_array_equal(a, b)
    assert clock.take()[COMPILE] > 0
    t.optimizers.switch("rmsprop", 0.001)  # the bank compiles its own on a switch
    assert t.optimizers.tracing_count == 2 and COMPILE in clock.take()
    t.check()  # its first check and validation trace nothing more: their seconds are training's
    assert t.optimizers.tracing_count == 2 and t._eval_fn.experimental_get_tracing_count() == 1
    assert COMPILE not in clock.take()


def test_under_xla_the_call_is_traced_before_its_first_use_and_compiled_by_it(bundled):
    clock = PartClock()
    t = Trainer(bundled, TrainConfig(steps_per_check=2, jit_compile=True), SMALL, clock=clock)
    assert t.optimizers.tracing_count == 1 and COMPILE in clock.take()
    t.check()  # XLA compiles for this input shape here: that stays in the first check's training
    assert t.optimizers.tracing_count == 1 and t.progress.step == 2 and TRAIN_PART in clock.take()


def test_set_lr_scales_the_update_without_retracing(bundled, tmp_path):
    t = trainer(bundled, optimizer="gd", lr=0.01)
    t.check()  # compiled once, when the Trainer was built
    t.save(tmp_path / "before")
    start = weights(t)
    t.train(1)
    small = [w - s for w, s in zip(weights(t), start)]
    t.restore(tmp_path / "before")
    traces = t.optimizers.tracing_count
    t.optimizers.set_lr(0.02)
    t.train(1)
    large = [w - s for w, s in zip(weights(t), start)]
    assert t.optimizers.tracing_count == traces == 1
    assert float(t.optimizers.optimizer.learning_rate) == pytest.approx(0.02)
    kernels = [i for i, s in enumerate(small) if s.ndim > 1]
    for i in kernels:  # plain gradient descent: twice the rate, twice the step
        np.testing.assert_allclose(large[i], 2 * small[i], rtol=1e-3, atol=1e-7)


def test_restore_keeps_the_configured_rate_and_changes_slots_only_with_the_same_optimizer(bundled, tmp_path):
    donor = trainer(bundled, optimizer="adam", lr=1e-3)
    donor.check()
    donor.save(tmp_path / "donor")
    same = trainer(bundled, optimizer="adam", lr=5e-4)
    same.restore(tmp_path / "donor")
    assert float(same.optimizers.optimizer.learning_rate) == pytest.approx(5e-4)  # not the donor's 1e-3
    assert int(same.optimizers.optimizer.iterations) == 20
    assert same.state_digests() == donor.state_digests()  # the slots' digest leaves the rate out
    other = trainer(bundled, optimizer="momentum", lr=0.05)
    other.restore(tmp_path / "donor")
    assert other.state_digests()[0] == donor.state_digests()[0]
    assert other.optimizers.steps == 0  # fresh slots for a different optimizer
    assert all(not v.numpy().any() for v in other.optimizers.optimizer.variables if "momentum" in v.path)


def test_state_digests_tell_one_changed_weight_step_or_slot(bundled, tmp_path):
    t = trainer(bundled, optimizer="adam", lr=1e-3)
    t.check()
    t.save(tmp_path / "saved")
    state, slots = t.state_digests()
    copy = trainer(bundled, optimizer="adam", lr=1e-3)
    copy.restore(tmp_path / "saved")
    assert copy.state_digests() == (state, slots)
    copy.model.variables[0].assign_add(np.full(copy.model.variables[0].shape, 1e-6, np.float32))
    assert copy.state_digests()[0] != state
    copy.restore(tmp_path / "saved")
    copy.optimizers.optimizer.variables[-1].assign_add(
        np.ones(copy.optimizers.optimizer.variables[-1].shape, np.float32)
    )
    assert copy.state_digests() == (state, copy.state_digests()[1]) and copy.state_digests()[1] != slots
    copy.restore(tmp_path / "saved")
    copy.progress.step += 1
    assert copy.state_digests()[0] != state


def test_switching_optimizers_reuses_traced_calls(bundled):
    t = trainer(bundled, optimizer="adam", lr=1e-3)
    t.check()
    t.optimizers.switch("gd", 0.1)
    t.check()
    t.optimizers.switch("adam", 1e-3)
    # Fresh slots on switching back: every variable as a newly built Adam's (not only its step counter),
    # and the digest the exploit audit compares with.
    built = make_optimizer("adam", 1e-3)
    built.build(t.model.trainable_variables)
    live = t.optimizers.optimizer
    assert all(
        np.array_equal(a.numpy(), b.numpy()) for a, b in zip(live.variables, built.variables, strict=True)
    )
    fresh = new_slots_digest("adam", t.model.trainable_variables)  # built apart, as the audit builds it
    assert t.state_digests()[1] == fresh == slots_digest(built)
    t.check()
    assert t.state_digests()[1] != fresh  # trained slots are not fresh
    assert t.optimizers.tracing_count == 2 and t.optimizers.name == "adam" and t.progress.step == 60


def test_corrupt_checkpoint_is_a_clear_error(bundled, tmp_path):
    t = trainer(bundled)
    t.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "trainer.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt is missing or corrupt"):
        t.restore(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "adma"], "unknown optimizer 'adma'"),
        (["--lr", "0"], "train.lr must be a positive number"),
        (["--lr=-1e-3"], "train.lr must be a positive number"),
        (["--lr", "nan"], "train.lr must be a positive number"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--target", "1.5"], r"train.target must be in \(0, 1\]"),
        (["--target", "0"], r"train.target must be in \(0, 1\]"),
        (["--scale", "0"], "model.scale must be a positive number"),
        (["--max-steps", "0"], "train.max_steps must be a positive integer"),
        (["--data", "/nonexistent/mnist.npz"], "data file /nonexistent/mnist.npz does not exist"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--data", "bundled", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_cli_prints_progress_then_json(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pbt_lab.train",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--scale",
            "0.25",
            "--data",
            "bundled",
            "--max-steps",
            "100",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.splitlines()
    result = json.loads(out[-1])
    assert result["status"] in ("reached", "capped") and result["steps"] <= 100
    for key in ("steps_to_target", "seconds_to_target", "train_seconds", "final_train_acc", "final_val_acc"):
        assert key in result
    assert sum(line.startswith("step ") for line in out) == 2  # a progress line per 50-step check


def test_reset_trains_exactly_like_a_new_trainer(bundled):
    reused = trainer(bundled, optimizer="gd", lr=0.1, seed=1)
    reused.check()
    assert reused.reset(TrainConfig(optimizer="adam", lr=1e-3, seed=2, steps_per_check=20))
    reused.check()
    fresh = trainer(bundled, optimizer="adam", lr=1e-3, seed=2)
    fresh.check()
    assert (
        reused.progress.step == fresh.progress.step == 20
        and reused.progress.train_seconds < fresh.progress.train_seconds + 5
    )
    for a, b in zip(weights(reused), weights(fresh)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Back to a seed this trainer has started from before: its initial weights come from its cache.
    assert reused.reset(TrainConfig(optimizer="gd", lr=0.1, seed=1, steps_per_check=20))
    reused.check()
    first = trainer(bundled, optimizer="gd", lr=0.1, seed=1)
    first.check()
    for a, b in zip(weights(reused), weights(first)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not reused.reset(TrainConfig(jit_compile=True))  # baked into the traced call: needs a new Trainer
    assert reused.reset(TrainConfig(batch_size=50)) and reused.optimizers.tracing_count == 2  # no retrace


def test_in_flight_hyperparameters_act_at_once_and_retrace_nothing(bundled):
    t = trainer(bundled, optimizer="gd", lr=0.1, steps_per_check=1)
    plain = trainer(bundled, optimizer="gd", lr=0.1, steps_per_check=1)
    traces = t.optimizers.tracing_count
    t.set_recipe(replace(t.cfg, weight_decay=0.01))

    def trained(t):
        return [v.numpy() for v in t.model.trainable_variables]

    start = trained(t)
    row, plain_row = t.check(), plain.check()
    # Decoupled decay: the same gradient step, and every weight shrunk by lr × decay of itself.
    for w0, a, b in zip(start, trained(t), trained(plain)):
        np.testing.assert_allclose(a - b, -0.1 * 0.01 * w0, atol=1e-6)
    assert row["weight_decay_used"] == pytest.approx(0.01) and plain_row["weight_decay_used"] == 0.0
    t.set_recipe(replace(t.cfg, weight_decay=0.0, clip_norm=1e-6, label_smoothing=0.1, batch_size=50))
    start, row = trained(t), t.check()
    assert max(np.abs(a - b).max() for a, b in zip(trained(t), start)) < 1e-6  # a gradient of norm 1e-6
    assert (row["clip_norm_used"], row["batch_size_used"]) == (pytest.approx(1e-6), 50)
    assert row["label_smoothing_used"] == pytest.approx(0.1) and row["examples"] == 100 + 50
    t.set_recipe(replace(t.cfg, optimizer="momentum", momentum=0.9, clip_norm=None))
    row = t.check()
    assert row["momentum_used"] == pytest.approx(0.9) and row["clip_norm_used"] is None
    t.set_recipe(replace(t.cfg, momentum=0.5))
    assert t.check()["momentum_used"] == pytest.approx(0.5)
    t.set_recipe(replace(t.cfg, optimizer="adam", lr=1e-3, beta_1=0.8))
    row = t.check()
    assert (row["beta_1_used"], row["beta_2_used"]) == (pytest.approx(0.8), pytest.approx(0.999))
    assert "momentum_used" not in row  # Adam reads no momentum
    assert t.optimizers.tracing_count == traces + 2  # one trace per new optimizer, none per value


def test_the_momentum_optimizer_with_a_variable_momentum_updates_as_keras_sgd(bundled):
    # The subclass that reads momentum in flight does Keras's arithmetic: same weights as Keras's own SGD.
    from pbt_lab.training.optimizers import MomentumSGD

    variables = [keras.Variable(np.arange(4.0, dtype="float32"))]
    ours, keras_sgd = MomentumSGD(0.1, momentum=0.5), keras.optimizers.SGD(0.1, momentum=0.5)
    theirs = [keras.Variable(np.arange(4.0, dtype="float32"))]
    for _ in range(3):
        ours.apply([keras.ops.ones(4)], variables)
        keras_sgd.apply([keras.ops.ones(4)], theirs)
    np.testing.assert_array_equal(variables[0].numpy(), theirs[0].numpy())


def test_ranking_validates_one_seeded_subset_and_the_last_check_the_whole_split(bundled):
    """``train.rank_examples`` (PBT's ``pbt.rank_examples``): every member ranks on the same images; the
    run's last validation is of the whole split, as the winner's figure must be."""
    a = trainer(bundled, rank_examples=100, val_every=1, max_steps=40, stop_at_target=False)
    b = trainer(bundled, rank_examples=100, val_every=1, max_steps=40, stop_at_target=False, seed=7)
    (xa, ya), (_, yb) = a._ranking_split(), b._ranking_split()
    assert len(ya) == 100 and np.array_equal(ya.numpy(), yb.numpy())
    first = a.check()
    assert not a.done and first["val_acc"] == pytest.approx(a.evaluate(xa, ya)[0])
    last = a.check()
    assert a.done and last["val_acc"] == pytest.approx(a.evaluate()[0])
    with pytest.raises(UserError, match=r"train\.rank_examples"):
        TrainConfig(rank_examples=0)
