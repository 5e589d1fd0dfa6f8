"""The studies on Ray Tune: the width study (contract, fits, best rate per width), the trace, the report."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pbt_lab import UserError, report, scaling, trace
from pbt_lab.config import ScalingExperiment, TraceExperiment, load_config
from pbt_lab.results import compute_curve, linear_fit, read_tables, scaling_summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- width study: pure functions ------------------------------------------------------------


def test_linear_fit_recovers_a_line_and_withholds_r2_below_three_points():
    fit = linear_fit([1e6, 2e6, 4e6], [12.0, 14.0, 18.0])
    assert (
        fit["c"] == pytest.approx(10.0)
        and fit["k"] == pytest.approx(2e-6)
        and fit["r2"] == pytest.approx(1.0)
    )
    assert linear_fit([1e6, 2e6], [1.0, 3.0])["r2"] is None
    assert linear_fit([1e6, 1e6], [1.0, 3.0]) is None
    assert linear_fit([1e6, 2e6, 3e6], [1.0, 3.0, 2.0])["r2"] == pytest.approx(0.25)


def _trials(rows):
    """A trials table from (scale, lr, steps_to_target or None)."""
    return pd.DataFrame(
        [
            {
                "optimizer": "adam",
                "lr": lr,
                "scale": scale,
                "weights": round(3_274_634 * scale),  # about the study CNN's, linear in scale
                "status": "reached" if steps else "capped",
                "steps_to_target": steps,
                "seconds_to_target": steps / 10 * scale if steps else None,
            }
            for scale, lr, steps in rows
        ]
    )


def test_scaling_summary_sees_the_best_rate_move():
    trials = _trials(
        [
            (0.25, 1e-3, 100),
            (0.25, 3e-4, 200),
            (0.5, 1e-3, 150),
            (0.5, 3e-4, 100),
            (1.0, 1e-3, None),
            (1.0, 3e-4, 100),
        ]
    )
    s = scaling_summary(trials, base_scale=0.25)
    rows = s["best_rates"]["adam"]
    assert [r["width"] for r in rows] == [1.0, 2.0, 4.0] and [r["best_lr"] for r in rows] == [
        1e-3,
        3e-4,
        3e-4,
    ]
    assert [r["base_best_lr_steps"] for r in rows] == [100, 150, None]  # 1×'s best got slower, then failed
    assert s["best_rate_moved"]["adam"] is True
    fits = {f["lr"]: f for f in s["fits"]}
    assert fits[3e-4]["widths"] == [1.0, 2.0, 4.0] and fits[3e-4]["seconds"]["r2"] is not None
    assert fits[1e-3]["widths"] == [1.0, 2.0] and fits[1e-3]["seconds"]["r2"] is None


def test_scaling_summary_counts_a_tie_as_not_moved():
    trials = _trials([(0.25, 1e-3, 100), (0.25, 3e-4, 150), (0.5, 1e-3, 100), (0.5, 3e-4, 100)])
    s = scaling_summary(trials, base_scale=0.25)
    assert s["best_rates"]["adam"][1]["tied_lrs"] == [3e-4, 1e-3]
    assert s["best_rate_moved"]["adam"] is False


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "scaling.widths=[]"], "scaling.widths must list at least one width multiplier"),
        (["--set", "scaling.widths=[1, 1]"], "scaling.widths must not repeat a width"),
        (["--set", "scaling.mode=sweep"], "scaling.mode must be one of fixed, resweep"),
        (["--set", "scaling.lrs={adma: [1.0e-3]}"], "unknown optimizer 'adma' (did you mean 'adam'?)"),
        (
            ["--set", "scaling.sweep_lrs={adam: [0.1, -1]}"],
            "scaling.sweep_lrs.adam must be a positive number",
        ),
    ],
)
def test_bad_scaling_config_is_one_line_before_ray(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        scaling.main(["--config", str(CONFIGS / "scaling-quick.yaml"), "--storage-path", str(tmp_path), *bad])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_shipped_scaling_configs_load():
    cpu = load_config(ScalingExperiment, CONFIGS / "scaling-cpu.yaml")
    assert cpu.model.scale == 0.25 and cpu.scaling.widths == [1.0, 2.0, 4.0] and cpu.scaling.mode == "resweep"
    assert len(cpu.scaling.rates()["adam"]) == 8
    study = load_config(ScalingExperiment, CONFIGS / "scaling.yaml")
    assert study.scaling.widths == [float(w) for w in range(1, 11)] and study.train.target == 0.96
    assert ScalingExperiment().train.target == 0.96


def test_a_config_section_keeps_the_experiments_own_defaults():
    assert load_config(ScalingExperiment, None, ["train.max_steps=100"]).train.target == 0.96
    assert load_config(ScalingExperiment, None, ["train.target=0.9"]).train.target == 0.9
    traced = load_config(TraceExperiment, CONFIGS / "trace-quick.yaml").train
    assert traced.val_every == 1 and not traced.stop_at_target and traced.max_steps == 300


# --- width study on Ray Tune --------------------------------------------------------------------


@pytest.mark.slow
def test_quick_scaling_writes_the_contract_and_the_fit(quick_scaling):
    trials, _history, summary = read_tables(quick_scaling)
    assert summary["kind"] == "scaling" and len(trials) == 3 * 2
    assert sorted(trials["scale"].unique()) == [0.25, 0.5, 0.75]
    assert (
        set(trials["status"]) <= {"reached", "capped", "diverged"}
        and (trials["status"] == "reached").sum() >= 4
    )
    weights = trials.groupby("scale")["weights"].first()
    assert weights.is_monotonic_increasing and weights[0.25] == 817_514
    s = summary["scaling"]
    assert s["base_scale"] == 0.25 and s["widths"] == [1.0, 2.0, 3.0]
    # The best rate per width is the reached trial with the fewest steps (then seconds) at that width.
    for row in s["best_rates"]["adam"]:
        at = trials[(trials["scale"] == row["scale"]) & (trials["status"] == "reached")]
        fastest = at.sort_values(["steps_to_target", "seconds_to_target"]).iloc[0]
        assert row["best_lr"] == fastest["lr"] and row["steps_to_target"] == fastest["steps_to_target"]
        assert row["weights"] == weights[row["scale"]]
    base = s["best_rates"]["adam"][0]["best_lr"]
    assert s["best_rate_moved"]["adam"] == any(base not in r["tied_lrs"] for r in s["best_rates"]["adam"])
    # The fit is least squares of seconds to target on weights over the rate's reached widths.
    for fit in s["fits"]:
        reached = trials[(trials["lr"] == fit["lr"]) & (trials["status"] == "reached")]
        k, c = np.polyfit(reached["weights"], reached["seconds_to_target"], 1)
        assert fit["seconds"]["k"] == pytest.approx(k) and fit["seconds"]["c"] == pytest.approx(c)
        assert fit["seconds"]["r2"] is None or fit["seconds"]["r2"] <= 1
    assert any(f["seconds"] and f["seconds"]["r2"] is not None for f in s["fits"])
    assert (trials["steps"] % 25 == 0).all()  # checks of 25 steps
    assert {p.name for p in (quick_scaling / "figures").iterdir()} == {
        "scaling_steps.png",
        "scaling_seconds.png",
        "best_rate_vs_width.png",
        "time_breakdown.png",
    }
    # Rebuilding the tables from Ray's files gives the same answers.
    from pbt_lab.results import write_tables

    assert write_tables(quick_scaling)["summary"]["scaling"] == json.loads(json.dumps(s))


# --- trace ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trace_runs_each_optimizer_at_its_grid_best(quick_grid, tmp_path):
    _, _, grid_summary = read_tables(quick_grid)
    best = {name: o["best_lr"] for name, o in grid_summary["optimizers"].items() if o["best_lr"] is not None}
    assert (
        trace.main(
            [
                "--grid",
                str(quick_grid),
                "--config",
                str(CONFIGS / "trace-quick.yaml"),
                "--storage-path",
                str(tmp_path),
                "--name",
                "trace",
                "--set",
                "train.max_steps=100",
            ]
        )
        == 0
    )
    trials, history, summary = read_tables(tmp_path / "trace")
    assert summary["kind"] == "trace" and summary["trace_of"] == str(quick_grid)
    assert dict(zip(trials["optimizer"], trials["lr"])) == pytest.approx(best)
    ran = trials[trials["status"] != "diverged"]
    assert len(ran) and (ran["steps"] == 100).all()  # no stop at the target: the whole budget
    assert (
        history.groupby("trial_id")["val_acc"].apply(lambda v: v.notna().all()).all()
    )  # validated every check
    assert {p.name for p in (tmp_path / "trace" / "figures").iterdir()} == {
        "trace_time.png",
        "trace_steps.png",
        "time_breakdown.png",
    }


def test_trace_from_a_directory_without_tables_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        trace.main(["--grid", str(tmp_path / "nothing"), "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "has no summary.json" in err and len(err.strip().splitlines()) == 1


# --- report ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_compares_grid_and_pbt_at_equal_compute(quick_grid, quick_pbt, tmp_path):
    assert report.main([str(quick_grid), str(quick_pbt), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    runs = report.load_runs([str(quick_grid), str(quick_pbt)])
    assert list(runs) == ["grid quick", "pbt quick"]  # both directories are named quick
    rows = {r["run"]: r for r in report.run_rows(runs)}
    for name, (trials, summary, curve) in runs.items():
        r = rows[name]
        assert f"| {name} | {summary['kind']} | {len(trials)} | {summary['compute']['steps']:,} |" in text
        assert r["best_val_acc"] == pytest.approx(trials["best_val_acc"].max())
        assert curve["cum_train_seconds"].iloc[-1] == pytest.approx(summary["compute"]["train_seconds"])
    # Every grid step is counted once in its compute curve (a PBT member's steps include its donors').
    assert runs["grid quick"][2]["cum_steps"].iloc[-1] == runs["grid quick"][1]["compute"]["steps"]
    for c in report.cross_rows(runs, list(rows.values())):
        _, _, curve = runs[c["run"]]
        if rows[c["run"]]["best_val_acc"] >= c["other_best"]:
            assert c["needed"]["train_seconds"] <= curve["cum_train_seconds"].iloc[-1]
            assert (
                f"| {c['run']} | {c['other']} | {c['other_best']:.2%} | {c['needed']['steps']:,} steps"
                in text
            )
        else:
            assert (
                c["needed"] is None
                and f"| {c['run']} | {c['other']} | {c['other_best']:.2%} | not reached |" in text
            )
    for name in ("best_vs_train_seconds.png", "best_vs_steps.png"):
        assert (tmp_path / "rep" / "figures" / name).stat().st_size > 0 and f"(figures/{name})" in text


def test_pbt_compute_curve_counts_steps_from_the_restored_checkpoint():
    history = pd.DataFrame(
        {
            "timestamp": [1, 2, 3, 4],
            "trial_id": ["a", "b", "a", "b"],
            "optimizer": "adam",
            "lr": 1e-3,
            "step": [50, 50, 100, 100],
            "val_acc": [0.5, 0.6, 0.7, 0.8],
            "steps_to_target": [None, None, None, 100],
            "check_seconds": [1.0, 1.0, 1.0, 1.0],
            # b copies a's checkpoint at step 50 and trains 50 steps from there
            "segment_step": pd.array([0, 0, None, 50], dtype="Int64"),
        }
    )
    curve = compute_curve(history)
    assert curve["cum_steps"].tolist() == [50, 100, 150, 200] and curve["best_val_acc"].tolist() == [
        0.5,
        0.6,
        0.7,
        0.8,
    ]


def test_report_of_a_directory_without_tables_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "has no summary.json" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        report.load_runs([str(tmp_path)])


def test_report_out_under_a_file_is_one_line(quick_grid, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit:
        report.main([str(quick_grid), "--out", str(tmp_path / "afile" / "rep")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--out " in err and "is a file, not a directory" in err
