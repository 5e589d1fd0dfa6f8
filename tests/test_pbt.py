"""PBT end to end on Ray Tune, as DESIGN §7 promises it: exact truncation, explore inside each
optimizer's range, reproducible from a seed, every exploit audited, ancestry carried in the
checkpoint and replayed, the winner reported on the test split, bounded disk, resume keeps PBT's
state, synchronous PBT."""

import json
import os
import re
import signal
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SERIAL, checkpoints_per_member, finish, run_pbt

from pbt_lab import pbt
from pbt_lab.names import EXPLOIT, LINEAGE, RESTORES
from pbt_lab.results import lineage, member_schedule, read_checkpoint_meta, read_tables, write_tables

LINEAGE_KEY = ["step", "recipient", "donor", "new_optimizer", "new_lr"]


def lineage_by_member(run: Path) -> pd.DataFrame:
    """The lineage with trials named by their member number (trial ids differ between runs)."""
    table = pd.read_parquet(run / LINEAGE)[LINEAGE_KEY]
    for column in ("recipient", "donor"):
        table[column] = table[column].str.rsplit("_", n=1).str[1]
    return table.sort_values(["step", "recipient"]).reset_index(drop=True)


@pytest.mark.slow
def test_every_exploit_is_decided_matched_and_verified(quick_pbt):
    _, _, summary = read_tables(quick_pbt)
    e = summary["exploits"]
    assert e["exploits"] >= 3, "too few exploits for the quick run to show anything"
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"]
    assert e["exploits_mismatched"] == e["exploits_unmatched"] == e["exploits_unverifiable"] == 0
    # An exploit is left undone only when its recipient's last report ended the member: no later
    # decision of that member (read from the decisions, not from the counts they add up to).
    state = json.loads((quick_pbt / "pbt_state.json").read_text())
    done = set(read_tables(quick_pbt)[1][EXPLOIT].dropna().astype(int))
    undone = [d for d in state["decisions"] if d["action"] == "exploit" and d["decision"] not in done]
    assert len(undone) <= summary["config"]["pbt"]["population"]
    for d in undone:
        assert not any(
            o["member"] == d["member"] and o["decision"] > d["decision"] for o in state["decisions"]
        )
    lineage = pd.read_parquet(quick_pbt / LINEAGE)
    assert (lineage["verdict"] == "verified").all() and lineage["matched"].all()
    assert (lineage["donor"] == lineage["source"]).all()  # each copy came from the donor the decision named


@pytest.mark.slow
def test_every_restore_is_verified_and_counted_by_kind(quick_pbt):
    _, _, summary = read_tables(quick_pbt)
    restores = pd.read_parquet(quick_pbt / RESTORES)
    counts = summary["restores"]
    assert counts["count"] == len(restores) == counts["verified"] and counts["unmatched"] == 0
    assert set(counts["by_kind"]) == {"exploit", "pause"}  # serial: every turn is a pause and a restore
    assert counts["by_kind"]["exploit"]["verified"] == summary["exploits"]["exploits"]
    assert counts["by_kind"]["pause"]["verified"] >= 10
    own = restores[restores["kind"] == "pause"]
    assert (own["source"] == own["trial_id"]).all() and (restores["verdict"] == "verified").all()


def scale_every_checkpoint(run: Path, stop: threading.Event, factor=1.001) -> None:
    """The issue's watcher: every checkpoint written to the run, one weight array × 1.001 once it is
    whole (the file still loads), swapped in atomically."""
    done = set()
    while not stop.is_set():
        for arrays in run.glob("*/checkpoint_*/trainer.npz"):
            if arrays in done:
                continue
            try:
                with np.load(arrays) as f:
                    loaded = dict(f)
            except Exception:  # still being written (a zip without its end yet, or no file at all)
                continue
            loaded["model/0"] = loaded["model/0"] * np.float32(factor)
            tampered = arrays.with_suffix(".tmp.npz")
            np.savez(tampered, **loaded)
            os.replace(tampered, arrays)
            done.add(arrays)
        time.sleep(0.01)


@pytest.mark.slow
def test_own_checkpoints_tampered_after_their_save_fail_the_run_and_are_named(tmp_path):
    stop = threading.Event()
    watcher = threading.Thread(target=scale_every_checkpoint, args=(tmp_path / "tampered", stop), daemon=True)
    watcher.start()
    driver = run_pbt(tmp_path, "tampered", "--set", "train.max_steps=300")
    driver.wait(timeout=900)
    stop.set()
    log = (tmp_path / "tampered.log").read_text()
    assert driver.returncode == 1, log[-3000:]
    _, _, summary = read_tables(tmp_path / "tampered")
    pause = summary["restores"]["by_kind"]["pause"]
    assert pause["mismatched"] >= 1 and pause["verified"] == 0
    assert re.search(
        r"MISMATCHED: weights differ from what the member saved: \w+_\d+ \(pause, step \d+\)", log
    )
    assert "AUDIT: " in log and "pause restore(s) mismatched" in log


@pytest.mark.slow
def test_each_decision_replaces_exactly_floor_of_20_percent_of_the_fresh_scores(quick_pbt):
    _, _, summary = read_tables(quick_pbt)
    sizes = summary["decisions"]["quantile_sizes"]
    assert sizes[-1]["ranked"] <= 5 and sum(row["decisions"] for row in sizes) >= 10
    for row in sizes:  # nobody diverged here: replaced and donors are exactly floor(0.2 × ranked)
        assert row["population"] == 5
        assert row["replaced"] == row["donors"] == [row["expected"]] == [int(0.2 * row["ranked"])]
    state = json.loads((quick_pbt / "pbt_state.json").read_text())
    exploits = [d for d in state["decisions"] if d["action"] == "exploit"]
    assert all(d["score"] <= d["donor_score"] for d in exploits)
    # One copy in flight at a time: while a recipient has not reported, nobody else is replaced.
    ranked = [d for d in state["decisions"] if d["ranked"] >= 2]
    assert len(exploits) <= 0.3 * len(ranked), f"{len(exploits)} exploits in {len(ranked)} decisions"


@pytest.mark.slow
def test_new_rates_stay_in_their_optimizers_range_never_repeat_the_donors_and_rarely_sit_on_an_end(quick_pbt):
    _, _, summary = read_tables(quick_pbt)
    ranges = summary["config"]["pbt"]["lr_ranges"]
    state = json.loads((quick_pbt / "pbt_state.json").read_text())
    exploits = [d for d in state["decisions"] if d["action"] == "exploit"]
    on_an_end = 0
    for d in exploits:
        low, high = ranges[d["new"]["optimizer"]]
        assert low <= d["new"]["lr"] <= high
        assert d["new"] != d["donor_config"]
        on_an_end += bool(np.isclose(d["new"]["lr"], [low, high], rtol=1e-9).any())
    assert on_an_end <= len(exploits) / 5


@pytest.mark.slow
def test_optimizer_switch_gets_fresh_slots_and_same_optimizer_keeps_them(quick_pbt):
    lineage = pd.read_parquet(quick_pbt / LINEAGE)
    switched = lineage[lineage["new_optimizer"] != lineage["restored_optimizer"]]
    kept = lineage[lineage["new_optimizer"] == lineage["restored_optimizer"]]
    assert len(switched) >= 1, "the quick config switches optimizers often enough to see one"
    assert (switched["restored_optimizer_steps"] == 0).all()
    assert (kept["restored_optimizer_steps"] > 0).all()


@pytest.mark.slow
def test_the_winner_is_chosen_on_validation_and_reported_on_test(quick_pbt):
    trials, _, summary = read_tables(quick_pbt)
    winner = summary["winner"]
    assert winner["val_acc"] == pytest.approx(trials["final_val_acc"].max())
    assert 0.9 < winner["test_acc"] <= 1 and summary["best"]["test_acc"] == winner["test_acc"]
    assert trials["test_acc"].notna().all()  # each member evaluated once, at its end
    assert set(trials["status"]) <= {"reached", "capped"}
    ancestry = winner["ancestry"]
    assert ancestry[0]["step"] == 0 and ancestry[-1]["trial"] == winner["trial_id"]
    assert [s["step"] for s in ancestry] == sorted(s["step"] for s in ancestry)
    figures = {p.name for p in (quick_pbt / "figures").iterdir()}
    assert {"population.png", "lr_schedules.png", "lineage.png", "winner_schedule.png"} <= figures


@pytest.mark.slow
def test_checkpoints_stay_bounded_and_the_summary_counts_them(quick_pbt):
    observed = json.loads((quick_pbt.parent / "observed.json").read_text())
    # pbt.max_checkpoints_per_member (3): its latest, the stored snapshot's and the one being written
    assert 1 <= observed["most_checkpoints_per_member"] <= 3
    _, _, summary = read_tables(quick_pbt)
    on_disk = [d for d in quick_pbt.glob("*/checkpoint_*")]
    assert summary["checkpoints"]["count"] == len(on_disk) <= 3 * 5
    assert summary["checkpoints"]["bytes"] == sum(
        f.stat().st_size for d in on_disk for f in d.rglob("*") if f.is_file()
    )


@pytest.mark.slow
def test_ten_members_on_one_slot_never_hold_more_than_three_checkpoints_each(tmp_path):
    # One slot: every member pauses at every check while nine wait, recipients wait long for their
    # turn (their donors save again and again meanwhile), and snapshots name older checkpoints.
    driver = run_pbt(tmp_path, "ten", *SERIAL, "--set", "pbt.population=10", "--set", "train.max_steps=250")
    most = 0
    while driver.poll() is None:
        most = max(most, checkpoints_per_member(tmp_path / "ten"))
        time.sleep(0.01)
    finish(driver, tmp_path, "ten")
    assert 2 <= most <= 3
    _, _, summary = read_tables(tmp_path / "ten")
    assert (
        summary["exploits"]["exploits"] >= 3
        and summary["restores"]["count"] == summary["restores"]["verified"]
    )


@pytest.mark.slow
def test_one_seed_gives_one_lineage_and_another_seed_another(quick_pbt, tmp_path):
    same = run_pbt(tmp_path, "same", *SERIAL)
    other = run_pbt(tmp_path, "other", *SERIAL, "--set", "pbt.seed=1")
    finish(same, tmp_path, "same"), finish(other, tmp_path, "other")
    first = lineage_by_member(quick_pbt)
    pd.testing.assert_frame_equal(lineage_by_member(tmp_path / "same"), first)
    assert not lineage_by_member(tmp_path / "other").equals(first)


def replay_matches(run: Path, storage: Path, member: str | None = None) -> list[dict]:
    """Replay ``run``'s winner (or ``member``) from its last checkpoint's ancestry: the replayed train
    accuracy must follow the one recorded along the member's lineage (its donors' checks up to each
    copy, then its own) within 0.5 points at every shared check, after its last exploit included.
    Returns the ancestry."""
    trials, source_history, source = read_tables(run)
    member = member or source["winner"]["trial_id"]
    argv = [
        "--replay",
        str(run),
        "--storage-path",
        str(storage),
        "--name",
        "replay",
        "--set",
        "resources.gpu=0",
    ]
    assert pbt.main([*argv, *(["--member", member] if member else [])]) == 0
    replay_trials, history, summary = read_tables(storage / "replay")
    ancestry = read_checkpoint_meta(run, trials.set_index("trial_id").loc[member, "checkpoint"])["ancestry"]
    assert len(replay_trials) == 1 and summary["replay_of"]["schedule"] == lineage.schedule(ancestry)
    # The checkpoint's ancestry against the reports along the member's lineage: two records of one schedule.
    recorded_schedule = lineage.schedule_changes(member_schedule(source_history, member))
    assert lineage.schedule(ancestry) == recorded_schedule
    recorded = member_schedule(source_history, member).drop_duplicates("step", keep="last").set_index("step")
    replayed = history.set_index("step")["train_acc"]
    shared = recorded.index.intersection(replayed.index)
    assert len(shared) >= 10 and (shared > ancestry[-1]["step"]).any()
    assert (recorded.loc[shared, "train_acc"] - replayed[shared]).abs().max() <= 0.005
    return ancestry


@pytest.mark.slow
def test_replay_follows_a_member_exploited_more_than_once(ray_session, quick_pbt, tmp_path):
    trials, _, summary = read_tables(quick_pbt)
    ancestries = {
        t: read_checkpoint_meta(quick_pbt, c)["ancestry"]
        for t, c in trials[["trial_id", "checkpoint"]].values
    }
    member = max(ancestries, key=lambda t: len(ancestries[t]))
    assert len(ancestries[member]) >= 3, "no member of the quick run was copied into twice"
    assert replay_matches(quick_pbt, tmp_path, member) == ancestries[member]
    assert summary["winner"]["ancestry"] == ancestries[summary["winner"]["trial_id"]]


def _carried_out(run: Path) -> int:
    """Exploits carried out so far: reports that restored another member's checkpoint."""
    count = 0
    for result in run.glob("*/result.json"):
        for line in result.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # being written right now
                continue
            count += r.get("segment_from") not in (None, r.get("trial_id"))
    return count


def _saved_decisions(run: Path) -> list[dict]:
    try:
        return json.loads((run / "pbt_state.json").read_text())["decisions"]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_a_sigkilled_population_resumes_with_its_pbt_state(ray_session, tmp_path):
    run, args = tmp_path / "cut", ("--set", "pbt.perturbation_interval=2", "--set", "train.max_steps=1200")
    driver = run_pbt(tmp_path, "cut", *args)
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and driver.poll() is None
        and not (_carried_out(run) >= 1 and any(d["action"] == "exploit" for d in _saved_decisions(run)))
    ):
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray: no clean-up at all
    driver.wait(timeout=60)
    before = _saved_decisions(run)  # the scheduler's state in the last snapshot Ray saved
    assert before and any(d["action"] == "exploit" for d in before), "the kill should land after an exploit"

    resumed_at = time.time()
    assert (
        pbt.main(
            [
                "--config",
                str(Path(__file__).parents[1] / "configs" / "pbt-quick.yaml"),
                "--storage-path",
                str(tmp_path),
                "--name",
                "cut",
                *args,
                "--resume",
            ]
        )
        == 0
    )
    trials, _history, summary = read_tables(run)
    after = json.loads((run / "pbt_state.json").read_text())["decisions"]
    assert after[: len(before)] == before  # what PBT had decided is still its record
    assert [d["decision"] for d in after] == list(range(len(after)))  # its count went on
    assert len(after) > len(before)
    # Its clocks went on too: a member restarts from its last decision, so it is ranked again only at
    # multiples of the interval (restarted clocks rank at the first report after the resume).
    assert all(d["iteration"] % 2 == 0 for d in after)
    assert (trials["steps"] == 1200).all() and len(trials) == 5
    e = summary["exploits"]
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"] and e["exploits_mismatched"] == 0
    assert (pd.read_parquet(run / LINEAGE)["timestamp"] >= resumed_at - 1).any(), (
        "PBT exploits after a resume"
    )
    replay_matches(run, tmp_path / "replays")


@pytest.mark.slow
def test_synchronous_pbt_ranks_the_whole_population_at_every_sync_point(tmp_path):
    finish(
        run_pbt(
            tmp_path,
            "sync",
            "--set",
            "pbt.synch=true",
            "--set",
            "pbt.perturbation_interval=2",
            "--set",
            "train.max_steps=400",
        ),
        tmp_path,
        "sync",
    )
    decisions = json.loads((tmp_path / "sync" / "pbt_state.json").read_text())["decisions"]
    points = sorted({d["iteration"] for d in decisions})
    assert points == [2, 4, 6]  # 400 steps: 8 checks, the last one ends every member
    for point in points:
        at = [d for d in decisions if d["iteration"] == point]
        assert sorted(d["member"] for d in at) == sorted({d["member"] for d in decisions})  # all five, once
        assert {d["ranked"] for d in at} == {5} and sum(d["action"] == "exploit" for d in at) == 1
    _, _, summary = read_tables(tmp_path / "sync")
    assert summary["exploits"]["exploits"] == summary["exploits"]["exploits_verified"] == 3


@pytest.mark.slow
def test_a_population_stopped_at_the_target_says_so_and_its_first_member_there_wins(tmp_path):
    finish(
        run_pbt(tmp_path, "stop", "--set", "pbt.stop_at_target=true", "--set", "train.target=0.9"),
        tmp_path,
        "stop",
    )
    trials, _, summary = read_tables(tmp_path / "stop")
    winner = trials.set_index("trial_id").loc[summary["winner"]["trial_id"]]
    assert summary["winner"]["trial_id"] == summary["first_to_target"]["trial_id"]
    assert winner["status"] == "reached" and 0.8 < winner["test_acc"] <= 1  # it ended on its own: evaluated
    others = trials[trials["trial_id"] != summary["winner"]["trial_id"]]
    assert set(others["status"]) <= {"stopped", "reached"} and (others["status"] == "stopped").any()
    # the configuration that ran: members stop at the target only with the population
    assert (
        summary["config"]["train"]["stop_at_target"] is True and summary["config"]["train"]["val_every"] == 1
    )
    rebuilt = write_tables(tmp_path / "stop", figures=False)["trials"]  # python -m pbt_lab.results RUN_DIR
    assert rebuilt.set_index("trial_id")["status"].equals(trials.set_index("trial_id")["status"])


def test_a_comparisons_pbt_run_replays_from_the_sections_a_pbt_run_reads(tmp_path):
    from types import SimpleNamespace

    from pbt_lab.config import CompareExperiment, PBTExperiment, load_config
    from pbt_lab.experiments.replay import source_config

    config = asdict(CompareExperiment())  # what a comparison's PBT run records: every section
    summary = {
        "kind": "pbt",
        "config": config,
        "winner": {"trial_id": "t", "checkpoint": "t/checkpoint_000001"},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for table in ("trials.parquet", "history.parquet"):
        pd.DataFrame({"trial_id": ["t"]}).to_parquet(tmp_path / table)
    base = source_config(SimpleNamespace(replay=str(tmp_path)))
    assert set(base) == {f.name for f in fields(PBTExperiment)} and "compare" not in base
    assert load_config(PBTExperiment, base=base).train.max_steps == config["train"]["max_steps"]
