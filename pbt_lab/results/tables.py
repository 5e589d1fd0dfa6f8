"""Tidy tables from a Ray Tune run directory: the output contract of DESIGN §3.

    from pbt_lab.results import write_tables, read_tables
    write_tables("~/ray_results/grid-quick")      # (re)builds trials/history parquet + summary.json
    trials, history, summary = read_tables("~/ray_results/grid-quick")

Reads only what Ray and the trainable write as JSON (``params.json``, ``result.json``): no pickle.
Everything downstream (plots, report, notebooks) reads these tables and never imports Ray.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pbt_lab import UserError
from pbt_lab.config import STUDY_CNN, PBTConfig
from pbt_lab.config.loading import build
from pbt_lab.names import (
    BEST_VAL_ACC,
    BUILDER,
    ERROR,
    EXAMPLES,
    FIGURES,
    FINAL_VAL_ACC,
    FINAL_VAL_LOSS,
    HISTORY,
    LINEAGE,
    LR,
    NODE_ID,
    OPTIMIZER,
    PBT_STATE_FILE,
    RESTORES,
    RUNNING,
    SECONDS_TO_TARGET,
    SEED,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    SUMMARY,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRIAL_ID,
    TRIALS,
    VAL_ACC,
    VAL_LOSS,
    WEIGHTS,
    WINNER_BOARD,
)
from pbt_lab.results.analysis import scaling_summary
from pbt_lab.results.audit import audit, restore_counts, restore_rows, restore_table
from pbt_lab.results.breakdown import check_breakdown, time_breakdown
from pbt_lab.results.history import PER_TRIAL, read_history, read_saved_states, recipe_keys
from pbt_lab.results.lineage import member_schedule, pbt_summary, read_pbt_state
from pbt_lab.results.lineage import plain as _plain
from pbt_lab.results.ray_files import (
    REMOTE_SIZES,
    last_checkpoint,
    last_error,
    ray_trial_states,
    read_reports,
    tables_inputs,
    trial_dirs,
    trial_params,
    whole_checkpoint,
)
from pbt_lab.results.summary import (
    SESSION,
    best_trial,
    compute_totals,
    config_value,
    machine,
    per_optimizer,
    ranking_figures,
    versions,
)
from pbt_lab.storage import is_uri, replace_atomically, staged


def final_recipes(trials: pd.DataFrame, by_dir: dict) -> pd.DataFrame:
    """Each trial's searched keys beyond the optimizer and rate (history's recipe columns): initial_KEY
    from its first report, KEY from its last."""
    rows = []
    for trial_dir in trials["trial_dir"]:
        h = by_dir.get(trial_dir)
        keys = [] if h is None else [c for c in recipe_keys(h) if h[c].notna().any()]
        row = {}
        for key in keys:
            values = h[key].dropna()
            row |= {f"initial_{key}": values.iloc[0], key: values.iloc[-1]}
        rows.append(row)
    return pd.DataFrame(rows, index=trials.index)


def read_trials(
    run_dir: Path, history: pd.DataFrame, stopped_as: str | None = None, ray_states: dict | None = None
) -> pd.DataFrame:
    """One row per trial: its configuration, outcome and compute. ``stopped_as`` names the status of
    trials still running when the experiment stopped them (e.g. PBT's population stop)."""
    rows = []
    by_dir = dict(tuple(history.groupby("trial_dir")))
    ray_states = ray_trial_states(run_dir) if ray_states is None else ray_states
    for trial_dir in trial_dirs(run_dir):
        ray_state = ray_states.get(trial_dir.name, {})
        ray_status, failures = ray_state.get(STATUS), ray_state.get("failures", 0)
        params = trial_params(trial_dir, ray_state.get("config"))
        h = by_dir.get(trial_dir.name, history.iloc[:0])
        last = h.iloc[-1] if len(h) else pd.Series(dtype=object)
        # Ray rewrites params.json at every exploit: the first report says what the member started with.
        first = h.iloc[0] if len(h) else pd.Series(params)
        val = h[VAL_ACC].dropna()
        # Ray's own final status: a trial that failed and was restarted from a checkpoint recovered.
        errored = (
            (not len(h) and ray_status != "TERMINATED")  # stopped before its first report: not an error
            or ray_status == "ERROR"
            or (ray_status is None and (trial_dir / "error.txt").is_file())
        )
        rows.append(
            {
                # Final optimizer and rate (PBT changes them; a grid trial keeps its initial ones).
                TRIAL_ID: last.get(TRIAL_ID, trial_dir.name),
                OPTIMIZER: last.get(OPTIMIZER, params[OPTIMIZER]),
                LR: last.get(LR, params[LR]),
                "initial_optimizer": first[OPTIMIZER],
                "initial_lr": first[LR],
                BUILDER: params["model"].get(BUILDER, STUDY_CNN),
                "scale": params["model"]["scale"],
                WEIGHTS: last.get(WEIGHTS),  # as the trainable counted its built model
                SEED: params[SEED],
                STATUS: ERROR
                if errored
                else (stopped_as or RUNNING)
                if last.get(STATUS, RUNNING) == RUNNING
                else last[STATUS],
                STEPS_TO_TARGET: last.get(STEPS_TO_TARGET),
                SECONDS_TO_TARGET: last.get(SECONDS_TO_TARGET),
                "steps": last.get(STEP, 0),
                TRAIN_SECONDS: last.get(TRAIN_SECONDS, 0.0),
                "trial_seconds": last.get("trial_seconds", 0.0),
                "compute_train_seconds": last.get("compute_train_seconds", 0.0),
                "compute_trial_seconds": last.get("compute_trial_seconds", 0.0),
                "final_train_acc": last.get(TRAIN_ACC),
                "final_train_loss": last.get(TRAIN_LOSS),
                FINAL_VAL_ACC: val.iloc[-1] if len(val) else None,
                FINAL_VAL_LOSS: h[VAL_LOSS].dropna().iloc[-1] if h[VAL_LOSS].notna().any() else None,
                EXAMPLES: last.get(EXAMPLES),
                BEST_VAL_ACC: val.max() if len(val) else None,
                # Evaluated once, on the final state of a trial that ended on its own and learned (not
                # diverged or stalled); never used to choose.
                TEST_ACC: last.get(TEST_ACC),
                ERROR: last_error(trial_dir) if errored else None,
                "failures": failures,
                "iterations": len(h),
                "node_ip": last.get("node_ip"),
                NODE_ID: last.get(NODE_ID),
                "trial_dir": trial_dir.name,
                "checkpoint": last_checkpoint(run_dir, trial_dir),
            }
        )
    trials = pd.DataFrame(rows)
    trials = trials.join(final_recipes(trials, by_dir))
    return trials.astype(
        {
            STEPS_TO_TARGET: "Int64",
            WEIGHTS: "Int64",
            SECONDS_TO_TARGET: float,
            FINAL_VAL_ACC: float,
            BEST_VAL_ACC: float,
            "final_train_acc": float,
            "final_train_loss": float,
            FINAL_VAL_LOSS: float,
            TEST_ACC: float,
        }
    ).sort_values([OPTIMIZER, LR, SEED])


def write_tables(
    run_dir: str | Path,
    *,
    kind: str | None = None,
    config: dict | None = None,
    data: dict | None = None,
    session: dict | None = None,
    figures: bool = True,
    stopped_as: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Write trials.parquet, history.parquet, summary.json and figures/ into ``run_dir``.

    ``session``: the fit's ``started_at`` (epoch seconds), ``wall_seconds`` and trial ``slots``, for
    the compute totals and the time breakdown. Rebuildable: called on an existing run directory
    alone, it keeps what the last summary recorded (kind, config, data, session) and refreshes the
    tables from Ray's files.
    A URI run directory (``s3://…``) is read and written through pyarrow.fs.
    """
    if is_uri(run_dir):
        outputs = (TRIALS, HISTORY, LINEAGE, RESTORES, SUMMARY, FIGURES, WINNER_BOARD)
        with staged(str(run_dir), tables_inputs, upload=outputs) as (local, sizes):
            (local / REMOTE_SIZES).write_text(json.dumps(sizes))  # what stayed behind: checkpoints' arrays
            try:
                tables = write_tables(
                    local,
                    kind=kind,
                    config=config,
                    data=data,
                    session=session,
                    figures=figures,
                    stopped_as=stopped_as,
                    extra=extra,
                )
            except UserError as e:
                raise UserError(str(e).replace(str(local), str(run_dir))) from None
            summary = tables["summary"]
            summary["run_dir"] = str(run_dir)
            kept = sum(size for relative, size in sizes.items() if relative.split("/")[0] not in outputs)
            summary["disk_bytes"] = kept + sum(
                f.stat().st_size
                for name in outputs
                for f in [local / name, *(local / name).rglob("*")]
                if f.is_file()
            )
            if "checkpoints" in summary:  # only their metadata came down: count the bytes where they are
                summary["checkpoints"]["bytes"] = sum(
                    size for relative, size in sizes.items() if "/checkpoint_" in f"/{relative}"
                )
            write_json(local / SUMMARY, summary)
        return tables
    run_dir = Path(run_dir).expanduser()
    if not trial_dirs(run_dir):
        raise UserError(f"{run_dir} holds no Ray Tune trials")
    previous = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    stopped_as = stopped_as or previous.get("stopped_as")  # a rebuild keeps what the run said
    cut_short: list[str] = []
    ray_states = ray_trial_states(run_dir, cut_short)  # Ray's experiment state, parsed once for both tables
    reports = read_reports(run_dir, ray_states)
    history = read_history(reports)
    trials = read_trials(run_dir, history, stopped_as, ray_states)
    write_parquet(run_dir / HISTORY, history.drop(columns=PER_TRIAL))
    write_parquet(run_dir / TRIALS, trials)
    kind = kind or previous.get("kind") or ("pbt" if (run_dir / PBT_STATE_FILE).is_file() else None)
    # The lab's PBT records its decisions; other schedulers (Ray's PB2 in a comparison) keep none.
    pbt_state = read_pbt_state(run_dir) if kind == "pbt" else {}
    decisions = pbt_state.get("decisions", []) if kind == "pbt" else None
    restores = restore_rows(history)
    verdicts = audit(restores, read_saved_states(reports, pbt_state.get("registered_reports", [])), decisions)
    restored = restore_table(restores, verdicts)
    write_parquet(run_dir / RESTORES, restored)
    session = session or {k: previous.get("compute", {}).get(k) for k in SESSION}
    breakdown = time_breakdown(reports, **{k: session.get(k) for k in SESSION})
    if breakdown:
        breakdown["problems"] = check_breakdown(breakdown)
    summary = {
        "kind": kind,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "config": config if config is not None else previous.get("config"),
        "versions": versions(),
        "machine": machine(),  # the driver's: what the time breakdown's seconds mean on a local run
        "data": data if data is not None else previous.get("data"),
        "stopped_as": stopped_as,
        # Why the run stopped before its end (its storage full), if it did: --resume goes on.
        "stopped_for": session.get("stopped") if "stopped" in session else previous.get("stopped_for"),
        "best": best_trial(trials),
        "optimizers": per_optimizer(trials, config_value(config, previous, "train", "steps_per_check")),
        "compute": compute_totals(trials, session),
        "time_breakdown": breakdown,
        "incomplete": incomplete(run_dir, trials, ray_states, cut_short),
        "restores": {
            **restore_counts(verdicts),
            "allow_unverified": bool(config_value(config, previous, "run", "allow_unverified")),
        },
        **{k: previous[k] for k in ("replay_of", "trace_of") if k in previous},
        **(extra or {}),
    }
    tables = {"trials": trials, "history": history, "summary": summary, "restores": restored}
    if kind == "scaling":
        summary["scaling"] = scaling_summary(trials, summary["config"]["model"]["scale"])
    if kind == "pbt":
        pbt, tables["lineage"] = pbt_summary(
            run_dir, summary["config"], trials, history, decisions or [], verdicts
        )
        write_parquet(run_dir / LINEAGE, tables["lineage"])
        summary.update(pbt, ranking=ranking_figures(summary, trials))
        if pbt["winner"][TRIAL_ID]:
            summary["best"] = {
                **best_trial(trials[trials[TRIAL_ID] == pbt["winner"][TRIAL_ID]]),
                "schedule": pbt["winner"].get("schedule", []),
            }
    if kind in ("pbt", "replay") and summary["best"]:
        tables["winner_rows"] = member_schedule(history, summary["best"][TRIAL_ID])  # for the figure
        tables["searched"] = [LR, *recipe_keys(history)]  # a schedule panel per key
    if figures:
        from pbt_lab import plots

        made = plots.run_figures(kind, tables, run_dir / FIGURES)
        summary[FIGURES] = [str(p.relative_to(run_dir)) for p in made]
        if kind == "pbt" and summary["best"] and (summary["config"] or {}).get("pbt"):
            shutil.rmtree(run_dir / WINNER_BOARD, ignore_errors=True)  # (a rebuild writes it afresh)
            space = build(PBTConfig, summary["config"]["pbt"]).search_space
            plots.winner_board(
                run_dir / WINNER_BOARD, tables["winner_rows"], space, summary["best"][TRIAL_ID]
            )
    summary["disk_bytes"] = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    write_json(run_dir / SUMMARY, summary)
    return tables


def incomplete(run_dir: Path, trials: pd.DataFrame, ray_states: dict, cut_short: list[str]) -> str | None:
    """What a run cut short lacks, in one line (None: nothing): trials that did not end or never
    started, Ray's experiment snapshots cut short, checkpoints whose copy did not finish."""
    missing = []
    unfinished = int((trials[STATUS] == RUNNING).sum())
    unstarted = len(set(ray_states) - set(trials["trial_dir"]))  # Ray knows them; they never reported
    if unfinished or unstarted:
        missing.append(
            f"{unfinished + unstarted} of {len(trials) + unstarted} trials did not end"
            + (f" ({unstarted} never started)" if unstarted else "")
            + " (--resume goes on)"
        )
    if read_pbt_state(run_dir).get("cut_short"):
        cut_short = [*cut_short, f"{PBT_STATE_FILE} (no decisions to match the exploits with)"]
    if cut_short:
        missing.append(f"cut short: {'; '.join(cut_short)}")
    broken = [c for c in run_dir.glob("*/checkpoint_*") if c.is_dir() and not whole_checkpoint(c)]
    if broken:
        missing.append(f"{len(broken)} checkpoint(s) cut short mid-copy (never restored)")
    return "; ".join(missing) or None


def write_parquet(path: Path, table: pd.DataFrame) -> None:
    """A table, whole or not at all (a full disk leaves the one before)."""
    replace_atomically(path, lambda temporary: table.to_parquet(temporary, index=False))


def write_json(path: Path, value: dict) -> None:
    """A JSON file (the summary), whole or not at all."""
    replace_atomically(
        path, lambda temporary: temporary.write_text(json.dumps(value, indent=2, default=_plain))
    )


def read_tables(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(trials, history, summary) of a run directory written by ``write_tables`` (a path or URI)."""
    if is_uri(run_dir):
        with staged(str(run_dir), lambda relative: relative in (TRIALS, HISTORY, SUMMARY)) as (local, _):
            try:
                return read_tables(local)
            except UserError as e:
                raise UserError(str(e).replace(str(local), str(run_dir))) from None
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / SUMMARY).is_file():
        raise UserError(f"{run_dir} has no {SUMMARY}: run python -m pbt_lab.results {run_dir} to build it")
    return (
        pd.read_parquet(run_dir / TRIALS),
        pd.read_parquet(run_dir / HISTORY),
        json.loads((run_dir / SUMMARY).read_text()),
    )


def read_lineage_table(run_dir: str | Path) -> pd.DataFrame:
    """The exploits of a PBT run directory written by ``write_tables`` (``lineage.parquet``)."""
    path = Path(run_dir).expanduser() / LINEAGE
    if not path.is_file():
        raise UserError(f"{path.parent} has no {LINEAGE}: is it a PBT run?")
    return pd.read_parquet(path)
