"""A node lost mid-run: on a two-node ``ray.cluster_utils.Cluster``, the second node's raylet is killed
(no graceful drain) while its members train. They restart on the head from their last checkpoints
(``run.max_failures``), the run finishes, no history row or PBT decision is lost or duplicated, every
restore is audited, and the console names each restart in one line."""

import json
import re
import time

import pandas as pd
import pytest
from conftest import CONFIGS, two_nodes

from pbt_lab.names import (
    ERROR,
    NODE_ID,
    REPORTED_AT,
    RESTART_RESTORE,
    RESTORE_KIND,
    SEGMENT_STEP,
    STATE_ID,
    STATUS,
    STEP,
    TRIAL_ID,
    VERIFIED,
)
from pbt_lab.results import read_tables

RESTART_LINE = re.compile(
    r"^(MOVED|RESTARTED): (\S+) failed(?: on node (\w+))?; it continues on node (\w+) from (its checkpoint)?",
    re.M,
)


def lose_the_second_node(env: dict, tmp_path, command: str, steps: int, *sets: str):
    """The quick ``command`` (``--set`` ``sets`` too) on two nodes, half a fake GPU per trial, ``steps``
    per trial, the second node lost once 2 checkpoints are of trials training there; checks what any run
    may cost (``assert_recovered``) and returns its directory, tables and restart lines."""
    run = tmp_path / "runs" / "lost"
    env, started = {**env, "LOSE_RUN": f"file://{run}", "LOSE_AFTER": "2"}, time.perf_counter()
    argv = [
        *("--config", str(CONFIGS / f"{command}-quick.yaml"), "--storage-path", str(tmp_path / "runs")),
        *("--name", "lost", "--set", "resources.gpu=0.5", "--set", f"train.max_steps={steps}"),
        *("--set", "run.max_failures=3", *(a for kv in sets for a in ("--set", kv))),
    ]
    done, (head, second) = two_nodes(env, tmp_path, command, *argv)
    lost_at = float(re.search(r"^LOST (\S+)$", done.stdout, re.M)[1])
    trials, history, summary = read_tables(run)
    restores = pd.read_parquet(run / "restores.parquet")
    lines = RESTART_LINE.findall(done.stdout)
    print(f"lost node, {command}: {time.perf_counter() - started:.0f} s, restarts {[ln[:2] for ln in lines]}")
    assert_recovered(trials, history, restores, lines, (head, lost_at), max_steps=steps)
    return run, trials, summary, [(kind, before) for kind, _, before, _, _ in lines], second


def assert_recovered(trials, history, restores, lines, nodes, max_steps: int) -> None:
    """What a lost node may cost, for any run: one restart line per failure, each of a member that was
    on the lost node and goes on on the head; every member finished; one history row per check."""
    head, lost_at = nodes
    assert lines, "nobody was on the lost node"
    # (Ray counts each failed call of a lost worker: its training call and the save or restore after it)
    failed = trials.set_index(TRIAL_ID)["failures"]
    assert sorted(line[1] for line in lines) == sorted(failed[failed > 0].index), "one line per restart"
    assert all(after == head[:8] for _, _, _, after, _ in lines)
    assert (trials[STATUS] != ERROR).all() and (trials["steps"] == max_steps).all()
    late = history[pd.to_numeric(history[REPORTED_AT]) > lost_at + 5]
    assert (late[NODE_ID] == head).all(), "the lost node reported no more"
    assert history[STATE_ID].dropna().is_unique, "a report twice"
    for _, rows in history.sort_values(REPORTED_AT).groupby(TRIAL_ID):  # and none lost: each report is
        # one check (50 steps) past the one before, or past the checkpoint it restored
        before = rows[STEP].shift(1).where(rows[RESTORE_KIND].isna(), rows[SEGMENT_STEP]).fillna(0)
        assert (rows[STEP] - before == 50).all(), rows[[STEP, RESTORE_KIND, SEGMENT_STEP]]
    assert (restores["verdict"] == VERIFIED).all()  # a restart from a checkpoint is a restore
    assert (restores["kind"] == RESTART_RESTORE).sum() == sum(bool(line[-1]) for line in lines) >= 1


@pytest.mark.slow
def test_pbt_goes_on_when_a_node_is_lost(isolated_ray, tmp_path):
    # (A PBT member takes turns on both nodes: one lost as it started there, having last trained on the
    # head, is RESTARTED, not MOVED; 1 run in 3 lost only such members)
    run, _, summary, _, _ = lose_the_second_node(isolated_ray, tmp_path, "pbt", 400)
    decisions = json.loads((run / "pbt_state.json").read_text())["decisions"]
    assert [d["decision"] for d in decisions] == list(range(len(decisions)))  # none lost, none twice
    e = summary["exploits"]
    assert e["exploits"] == e["exploits_matched"] == e["exploits_verified"] >= 1


@pytest.mark.slow
def test_the_grid_goes_on_when_a_node_is_lost(isolated_ray, tmp_path):
    sets = ("grid.optimizers=[adam,rmsprop]", "grid.lrs=[0.001,0.003]", "train.stop_at_target=false")
    _, trials, _, moves, second = lose_the_second_node(
        isolated_ray, tmp_path, "grid", 300, *sets, "run.checkpoint_every=2"
    )
    assert len(trials) == 4 and ("MOVED", second[:8]) in moves  # a grid trial trains on one worker
