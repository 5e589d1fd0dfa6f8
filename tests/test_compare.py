"""The searchers compared at equal compute: the budget each spent (counted, not assumed), the tables
agreeing with each other and with the runs they summarise, and the pure parts on hand-made inputs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pbt_lab.config import COMPARE_METHODS, CompareExperiment, load_config
from pbt_lab.results import read_comparison, read_tables
from pbt_lab.results.compare import compare_markdown, method_stats, steps_to_grid_best

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- pure parts ------------------------------------------------------------------------------------


def test_budget_stop_counts_what_was_trained_and_a_restore_retrains():
    from pbt_lab.names import SEGMENT_STEP, STEP
    from pbt_lab.tuning.callbacks import BudgetStop

    stop = BudgetStop(400)
    stop("a", {STEP: 100, SEGMENT_STEP: 0})
    stop("b", {STEP: 100, SEGMENT_STEP: 0})
    stop("a", {STEP: 200})
    assert stop.spent == 300 and not stop.stop_all()
    # b copies a's state at step 50... from its own step 100: it trains 50 → 150 again, 100 steps in all
    stop("b", {STEP: 150, SEGMENT_STEP: 50})
    assert stop.spent == 400 and stop.stop_all()


def test_pb2s_place_maps_onto_the_optimizers_range_in_log_space():
    from pbt_lab.config import ModelConfig, TrainConfig
    from pbt_lab.tuning.trial_config import train_config, trial_space

    space = trial_space(TrainConfig(), ModelConfig(), threads=1, optimizer="adam", lr=1.0, seed=0)
    ranges = {"adam": [1e-4, 1e-2]}
    for place, lr in ((0.0, 1e-4), (0.5, 1e-3), (1.0, 1e-2), (1.7, 1e-2)):
        assert train_config({**space, "lr_place": place, "lr_ranges": ranges}).lr == pytest.approx(lr)
    assert train_config(space).lr == 1.0  # without a place the rate is the config's


def made_up_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame(
        [
            {"method": "grid", "seed": 0, "steps": 600, "winner_val_acc": 0.95, "test_acc": 0.94},
            {"method": "grid", "seed": 1, "steps": 600, "winner_val_acc": 0.96, "test_acc": 0.95},
            {"method": "pbt", "seed": 0, "steps": 600, "winner_val_acc": 0.97, "test_acc": 0.96},
            {"method": "pbt", "seed": 1, "steps": 650, "winner_val_acc": 0.93, "test_acc": 0.92},
        ]
    )
    curves = pd.DataFrame(
        [
            ("grid", 0, 300, 0.90, "g0"),
            ("grid", 0, 600, 0.95, "g0"),
            ("grid", 1, 600, 0.96, "g1"),
            ("pbt", 0, 100, 0.949, "p0"),
            ("pbt", 0, 200, 0.97, "p0"),
            ("pbt", 1, 650, 0.93, "p1"),
        ],
        columns=["method", "seed", "cum_steps", "best_val_acc", "trial_id"],
    ).assign(cum_train_seconds=0.0, optimizer="adam", lr=1e-3)
    return frame, curves


def test_steps_to_the_grids_best_are_taken_at_the_same_seed():
    frame, curves = made_up_runs()
    # pbt seed 0 is within 0.2 pt of grid seed 0's 0.95 at 100 steps (0.949); seed 1 never gets to 0.958
    assert steps_to_grid_best(frame, curves, 0.002) == [600, 600, 100, None]
    assert steps_to_grid_best(frame, curves, 0.0) == [600, 600, 200, None]


def test_markdown_shows_each_methods_median_and_range():
    frame, curves = made_up_runs()
    frame["steps_to_grid_best"] = pd.array(steps_to_grid_best(frame, curves, 0.002), dtype="Int64")
    summary = {"near_best": 0.002, "methods": {m: method_stats(g) for m, g in frame.groupby("method")}}
    table = compare_markdown(summary)
    row = "| pbt | 2 | 625 [600 – 650] | 0.9500 [0.9300 – 0.9700] | 0.9400 [0.9200 – 0.9600] |"
    assert f"{row} 100 [100 – 100] (1/2) |" in table
    assert "steps to grid best − 0.2 pt" in table


@pytest.mark.parametrize(
    "sets, message",
    [
        (["compare.methods=[grid, hyperband]"], "compare.methods: unknown 'hyperband'"),
        (["pbt.population=7"], "must split into pbt.population=7 members of whole checks"),
        (["compare.seeds=[1, 1]"], "compare.seeds must not repeat a seed"),
        (["train.stop_at_target=true"], "train.stop_at_target=True: a comparison needs False"),
        (["train.max_seconds=60"], "train.max_seconds=60.0: a comparison needs None"),
        (["train.stall_checks=5"], "train.stall_checks=5: a comparison needs None"),
        (["compare.asha_grace_checks=5"], "compare.asha_grace_checks=5 exceeds a trial's 4 checks"),
    ],
)
def test_bad_comparisons_are_one_line(sets, message, tmp_path):
    from pbt_lab import UserError
    from pbt_lab.cli import Call
    from pbt_lab.experiments import compare

    with pytest.raises(UserError, match=re.escape(message)):
        compare.main(
            ["--config", str(CONFIGS / "compare-quick.yaml"), "--storage-path", str(tmp_path)]
            + [a for s in sets for a in ("--set", s)],
            Call(),
        )
    assert not list(tmp_path.iterdir())


def test_the_quick_config_is_what_the_docs_say():
    cfg = load_config(CompareExperiment, CONFIGS / "compare-quick.yaml")
    assert cfg.budget == 3 * 4 * 200 and cfg.compare.methods == list(COMPARE_METHODS)
    assert len(cfg.compare.seeds) >= 3 and not cfg.train.stop_at_target and not cfg.train.stop_on_divergence


# --- the small comparison, run once ------------------------------------------------------------------


def test_every_method_and_seed_spent_the_budget(quick_compare):
    compare, _, summary = read_comparison(quick_compare)
    budget = summary["budget_steps"]
    assert budget == 3 * 2 * 100
    assert sorted(compare.groupby("method").size().items()) == sorted((m, 2) for m in COMPARE_METHODS)
    steps_per_check = summary["config"]["train"]["steps_per_check"]
    for row in compare.itertuples():
        # Grid and random train exactly their trials' lengths; the others stop once the budget is
        # spent, over by at most one check per trial running at once (2 here).
        over = 0 if row.method in ("grid", "random") else 2 * steps_per_check
        assert budget <= row.steps <= budget + over, row
        assert row.errors == 0 and row.winner_val_acc is not None and row.test_acc is not None


def test_the_counted_steps_agree_with_each_runs_own_tables(quick_compare):
    compare, _, _ = read_comparison(quick_compare)
    for row in compare.itertuples():
        trials, _, summary = read_tables(row.run_dir)
        # Chosen on validation: the best final validation accuracy (PBT: its own winner), which the
        # test accuracy never decides (where the two disagree, the test's best is not the winner).
        ended = trials[trials["test_acc"].notna()]
        chosen = ended.loc[ended["final_val_acc"].idxmax()]
        if row.method != "pbt":
            assert row.winner == chosen["trial_id"] and row.winner_val_acc == chosen["final_val_acc"]
        winner = trials.set_index("trial_id").loc[row.winner]
        assert (winner["test_acc"], winner["optimizer"]) == (row.test_acc, row.optimizer)
        if row.method in ("grid", "random"):  # every trial ran its 100 steps, none restored
            assert trials["steps"].sum() == row.steps == len(trials) * 100
        if row.method == "pbt":
            assert summary["winner"]["trial_id"] == row.winner
            assert summary["exploits"]["exploits_verified"] == summary["exploits"]["exploits"]


def test_markdown_and_parquet_hold_the_same_numbers(quick_compare):
    compare, _, _ = read_comparison(quick_compare)
    lines = (quick_compare / "compare.md").read_text().splitlines()
    for method, g in compare.groupby("method"):
        line = next(line for line in lines if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        val = g["winner_val_acc"]
        assert cells[3] == f"{val.median():.4f} [{val.min():.4f} – {val.max():.4f}]"
        test = g["test_acc"]
        assert cells[4] == f"{test.median():.4f} [{test.min():.4f} – {test.max():.4f}]"
        steps = g["steps"]
        assert cells[2] == f"{steps.median():,.0f} [{steps.min():,.0f} – {steps.max():,.0f}]"
        assert cells[5].endswith(f"({g['steps_to_grid_best'].notna().sum()}/{len(g)})")
    assert (quick_compare / "figures" / "compare.png").stat().st_size > 10_000
    assert json.loads((quick_compare / "compare_summary.json").read_text())["kind"] == "compare"


def test_a_bad_comparison_from_the_command_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pbt_lab.compare",
            "--config",
            str(CONFIGS / "compare-quick.yaml"),
            "--set",
            "compare.methods=[grid, hyperband]",
            "--storage-path",
            str(tmp_path),
            "--name",
            "bad",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "compare.methods: unknown 'hyperband'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_every_searcher_draws_from_pbts_space_and_pb2_searches_its_real_ranges():
    from types import SimpleNamespace

    from pbt_lab.config import PBTConfig
    from pbt_lab.experiments.compare import method_setup

    space = {
        "weight_decay": {"log": [1e-5, 1e-2]},
        "model.options.dropout": {"linear": [0.1, 0.6]},
        "batch_size": {"log_int": [32, 256]},
    }
    cfg = CompareExperiment(pbt=PBTConfig(population=4, optimizers=["adam", "momentum"], space=space))
    run = SimpleNamespace(cfg=cfg)
    trials, arguments = method_setup(run, "random", cfg.budget)
    points = arguments["search_alg"]._points_to_evaluate
    assert all(1e-5 <= p["weight_decay"] <= 1e-2 and 32 <= p["batch_size"] <= 256 for p in points)
    assert all(0.1 <= p["model"]["options"]["dropout"] <= 0.6 for p in points)  # nested as Ray nests it
    assert trials["model"]["builder"] == cfg.model.builder  # the fixed model config kept beside the option
    _, arguments = method_setup(SimpleNamespace(cfg=cfg), "pb2", cfg.budget)
    bounds = arguments["scheduler"]._hyperparam_bounds
    assert bounds == {
        "lr_place": [0.0, 1.0],
        "weight_decay": [1e-5, 1e-2],
        "model": {"options": {"dropout": [0.1, 0.6]}},
    }
