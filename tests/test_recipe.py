"""PBT over a whole recipe, end to end: the shipped ``pbt-recipe-quick.yaml`` (optimizer, rate, weight
decay, dropout, batch size) ranked by validation loss, its audit, lineage and replay; and LabPBT on a
plain Ray function trainable, run from the README's own example."""

import itertools
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import CONFIGS, SERIAL, finish, run_pbt
from test_pbt import replay_matches

from pbt_lab.names import LR, OPTIMIZER, RECIPE
from pbt_lab.results import read_tables
from pbt_lab.results.__main__ import main as results_main
from pbt_lab.results.audit import audit_digests
from pbt_lab.results.ray_files import read_progress, read_reports

KEYS = (OPTIMIZER, LR, "weight_decay", "model.options.dropout", "batch_size")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """The recipe's quick run, serial (its lineage a function of its seed), ranked by validation loss."""
    storage = tmp_path_factory.mktemp("runs")
    recipe = ("--config", str(CONFIGS / "pbt-recipe-quick.yaml"), "--set", "pbt.metric=val_loss")
    finish(run_pbt(storage, "recipe", *recipe, *SERIAL), storage, "recipe")
    return storage / "recipe"


@pytest.mark.slow
def test_every_key_of_the_recipe_is_mutated_and_every_restore_verified(recipe_run):
    lineage = pd.read_parquet(recipe_run / "lineage.parquet")
    _, history, summary = read_tables(recipe_run)
    for key in KEYS:
        assert (lineage[f"donor_{key}"] != lineage[f"new_{key}"]).any(), key  # explore moved it
        assert summary["exploits"]["changed"][key] > 0
    assert summary["restores"]["count"] > len(lineage) > 0
    assert summary["restores"]["verified"] == summary["restores"]["count"]
    # The traced call read what each exploit decided: the batch size and weight decay it trained with.
    first = history.loc[
        history["exploit_decision"].notna() & (history["segment_from"] != history["trial_id"])
    ]
    for _, row in first.iterrows():
        decided = lineage.set_index("decision").loc[row["exploit_decision"]]
        assert row["batch_size_used"] == decided["new_batch_size"]
        assert row["weight_decay_used"] == pytest.approx(decided["new_weight_decay"], rel=1e-6)
        assert row["model.options.dropout_used"] == pytest.approx(decided["new_model.options.dropout"])
    assert (history["examples"].dropna() > 0).all()


@pytest.mark.slow
def test_ranked_by_validation_loss_the_winner_has_the_lowest(recipe_run):
    trials, _, summary = read_tables(recipe_run)
    assert summary["config"]["pbt"]["mode"] == "min" and summary["exploits"]["exploits"] > 0
    lowest = trials.sort_values(["final_val_loss", "trial_id"]).iloc[0]
    assert summary["winner"]["trial_id"] == lowest["trial_id"]
    assert summary["winner"]["test_acc"] is not None  # its test accuracy is still reported


@pytest.mark.slow
def test_the_winner_replays_across_batch_size_changes_and_dropout_rebuilds(recipe_run, tmp_path):
    ancestry = replay_matches(recipe_run, tmp_path)
    changed = {k for a, b in itertools.pairwise(ancestry) for k in KEYS if a[RECIPE][k] != b[RECIPE][k]}
    assert {"batch_size", "model.options.dropout"} <= changed


def readme_example() -> str:
    """The README's example of LabPBT on a plain Ray function trainable: its one python block."""
    section = README.read_text().split("### LabPBT on any Ray trainable", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_tunes_a_plain_ray_function_trainable(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme"})
    run = next(tmp_path.glob("runs/*/pbt_state.json")).parent
    decisions = json.loads((run / "pbt_state.json").read_text())["decisions"]
    exploits = [d for d in decisions if d["action"] == "exploit"]
    assert len(exploits) == 3  # synchronous: the bottom one of four at iterations 4, 8 and 12
    assert all(set(d["new"]) == {"lr", "opt.momentum", "act"} for d in exploits)
    assert (run / "pbt_global.txt").is_file() and list(run.glob("pbt_policy_*.txt"))  # Ray's own logs
    for d in exploits:
        assert 1e-4 <= d["new"]["lr"] <= 1e-1 and d["new"]["opt.momentum"] in (0.5, 0.8, 0.9, 0.99)
        assert d["operations"]["opt.momentum"] in ("up one", "down one", "resample")
    # Its restores, audited from the records it reports: every one verified, the exploits decided.
    assert results_main([str(run)]) == 0
    restores = audit_digests(read_reports(run, {}), decisions, read_progress(run))
    assert len(restores) > len(exploits) and (restores["verdict"] == "verified").all()
    assert restores["matched"].all() and (restores["kind"] == "exploit").sum() == len(exploits)
    assert all(d["carried_out"] for d in exploits)  # what each loaded, as its first report said
