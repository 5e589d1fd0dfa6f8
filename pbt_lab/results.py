"""Tidy tables from a Ray Tune run directory: the output contract of DESIGN §3.

    from pbt_lab.results import write_tables, read_tables
    write_tables("~/ray_results/grid-quick")      # (re)builds trials/history parquet + summary.json
    trials, history, summary = read_tables("~/ray_results/grid-quick")

Reads only what Ray and the trainable write as JSON (``params.json``, ``result.json``): no pickle.
Everything downstream (plots, report, notebooks) reads these tables and never imports Ray.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from pbt_lab import UserError, lineage
from pbt_lab.lineage import plain as _plain
from pbt_lab.names import (
    ANCESTRY, DIVERGED_FLAG, ERROR, EXPLOIT, EXPLOITED, LR, OPTIMIZER, OPTIMIZER_STEPS, PBT_STATE_FILE, RESTORED_ID, RESTORED_LR,
    RESTORED_OPTIMIZER, RESTORED_OPTIMIZER_STEPS, RESTORED_SHA256, RESTORED_SLOTS_SHA256, SCORE, SEGMENT_FROM,
    SEGMENT_STEP, SLOTS_SHA256, STATE_ID, STATE_SHA256, STEP, TEST_ACC,
)

TRIALS, HISTORY, LINEAGE = "trials.parquet", "history.parquet", "lineage.parquet"
SUMMARY, FIGURES = "summary.json", "figures"
HISTORY_COLUMNS = ["trial_id", "iteration", "step", "train_seconds", "train_acc", "train_loss", "val_acc",
                   "val_loss", TEST_ACC, "optimizer", "lr", "status", "steps_to_target", "seconds_to_target",
                   "check_seconds", SCORE, DIVERGED_FLAG, SEGMENT_FROM, SEGMENT_STEP, EXPLOIT, RESTORED_ID,
                   RESTORED_SHA256, RESTORED_SLOTS_SHA256, RESTORED_OPTIMIZER_STEPS, RESTORED_OPTIMIZER, RESTORED_LR,
                   STATE_ID, STATE_SHA256, SLOTS_SHA256, OPTIMIZER_STEPS, "trial_seconds",
                   "timestamp", "started_at", "reported_at", "node_ip", "node_id", "pid"]
SAVED_STATE_COLUMNS = ["trial_id", STEP, OPTIMIZER, STATE_ID, STATE_SHA256, SLOTS_SHA256, OPTIMIZER_STEPS]
PER_TRIAL = ["trial_dir", "compute_train_seconds", "compute_trial_seconds"]  # carried to the trials table only


def trial_dirs(run_dir: Path) -> list[Path]:
    """The trial directories of a run: those holding Ray's ``params.json``."""
    return sorted(p.parent for p in Path(run_dir).glob("*/params.json"))


def read_reports(run_dir: Path, ray_states: dict) -> dict[str, list[dict]]:
    """Trial dir name → every report the trial made, in order (Ray's ``result.json``), read once."""
    found = {}
    for trial_dir in trial_dirs(run_dir):
        result_file = trial_dir / "result.json"
        reports = _json_lines(result_file) if result_file.is_file() else []
        if not reports and ray_states.get(trial_dir.name, {}).get("last_result"):
            # A driver killed while copying the trial's files left them empty, but Ray's experiment
            # state kept the trial's last report: its outcome survives, its earlier rows do not.
            reports = [ray_states[trial_dir.name]["last_result"]]
        if reports:
            found[trial_dir.name] = reports
    return found


def read_history(reports: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per reported check of every trial, in the order reported.

    Rows that a trial re-ran after restarting from its own checkpoint (a resume, a worker
    restart: what followed the report of the restored state) replace the ones they repeat, and
    so does an exploit carried out again (a resumed
    recipient restarting from the donor's checkpoint: same decision); an exploit starts a new
    segment from the donor's state and keeps the recipient's earlier rows. ``check_seconds``
    counts every row reported, repeats included: it is the compute really spent.
    """
    frames = []
    for trial_dir, trial_reports in reports.items():
        # Compute really spent, repeats included (older runs lack check_seconds: their last train_seconds).
        spent = {"compute_train_seconds": sum(r.get("check_seconds") or 0.0 for r in trial_reports)
                 or (trial_reports[-1].get("train_seconds") or 0.0),
                 "compute_trial_seconds": sum(r.get("time_this_iter_s") or 0.0 for r in trial_reports)}
        kept: list[dict] = []
        for r in trial_reports:
            row = {**{k: r.get(k) for k in HISTORY_COLUMNS}, "iteration": r["training_iteration"],
                   "trial_seconds": r.get("time_total_s"), "trial_dir": trial_dir, **spent}
            if row[SEGMENT_FROM] == row["trial_id"] and row[SEGMENT_STEP] is not None:
                # A restart from its own checkpoint repeats what came after the report of the state
                # it restored (an exploit can move a trial's step back, so steps alone can mislead).
                at = next((i for i in range(len(kept) - 1, -1, -1)
                           if row[RESTORED_ID] and kept[i][STATE_ID] == row[RESTORED_ID]), None)
                kept = kept[:at + 1] if at is not None else [k for k in kept if k["step"] <= row[SEGMENT_STEP]]
            elif row[EXPLOIT] is not None:
                again = next((i for i, k in enumerate(kept) if k[EXPLOIT] == row[EXPLOIT]), None)
                kept = kept if again is None else kept[:again]
            kept.append(row)
        frames.append(pd.DataFrame(kept))
    history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    history = history.reindex(columns=[*HISTORY_COLUMNS, *PER_TRIAL])
    return history.astype({"val_acc": float, "val_loss": float, "train_acc": float, "train_loss": float,
                           TEST_ACC: float, SCORE: float, RESTORED_LR: float, SEGMENT_STEP: "Int64",
                           EXPLOIT: "Int64"}).reset_index(drop=True)


def read_saved_states(reports: dict[str, list[dict]]) -> pd.DataFrame:
    """Every state a trial described as one a checkpoint might be taken of (its digests), from all
    its reports: a row a later restart re-ran still describes a checkpoint someone may have copied."""
    rows = [{k: r.get(k) for k in SAVED_STATE_COLUMNS}
            for trial_reports in reports.values() for r in trial_reports if r.get(STATE_ID)]
    return pd.DataFrame(rows, columns=SAVED_STATE_COLUMNS)


def _json_lines(path: Path) -> list[dict]:
    """A JSON-lines file; a last line cut short (its writer was killed mid-write) is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    reports = []
    for i, line in enumerate(lines):
        try:
            reports.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is not JSON: the file is corrupt") from None
    return reports


def weight_count(model: dict) -> int:
    """Trainable weights of the study's CNN for a model config (as ``build_cnn(...).count_params()``,
    without TensorFlow): conv 5×5 → conv 5×5 → dense on the 7×7 map → dense 10."""
    def width(n: int) -> int:
        return max(1, round(n * model["scale"]))

    c1, c2 = width(32), width(64)
    dense = width(model["dense_units"]) if model.get("scale_dense") else model["dense_units"]
    return (25 * c1 + c1) + (25 * c1 * c2 + c2) + (49 * c2 * dense + dense) + (dense * 10 + 10)


def read_trials(run_dir: Path, history: pd.DataFrame, stopped_as: str | None = None,
                ray_states: dict | None = None) -> pd.DataFrame:
    """One row per trial: its configuration, outcome and compute. ``stopped_as`` names the status of
    trials still running when the experiment stopped them (e.g. PBT's population stop)."""
    rows = []
    by_dir = dict(tuple(history.groupby("trial_dir")))
    ray_states = ray_trial_states(run_dir) if ray_states is None else ray_states
    for trial_dir in trial_dirs(run_dir):
        ray_state = ray_states.get(trial_dir.name, {})
        ray_status, failures = ray_state.get("status"), ray_state.get("failures", 0)
        params = _trial_params(trial_dir, ray_state.get("config"))
        h = by_dir.get(trial_dir.name, history.iloc[:0])
        last = h.iloc[-1] if len(h) else pd.Series(dtype=object)
        val = h["val_acc"].dropna()
        # Ray's own final status: a trial that failed and was restarted from a checkpoint recovered.
        errored = not len(h) or ray_status == "ERROR" or (ray_status is None and (trial_dir / "error.txt").is_file())
        rows.append({
            # Final optimizer and rate (PBT changes them; a grid trial keeps its initial ones).
            "trial_id": last.get("trial_id", trial_dir.name), "optimizer": last.get("optimizer", params["optimizer"]),
            "lr": last.get("lr", params["lr"]), "initial_optimizer": params["optimizer"], "initial_lr": params["lr"],
            "scale": params["model"]["scale"], "weights": weight_count(params["model"]), "seed": params["seed"],
            "status": ERROR if errored else (stopped_as or "running") if last["status"] == "running" else last["status"],
            "steps_to_target": last.get("steps_to_target"), "seconds_to_target": last.get("seconds_to_target"),
            "steps": last.get("step", 0), "train_seconds": last.get("train_seconds", 0.0),
            "trial_seconds": last.get("trial_seconds", 0.0),
            "compute_train_seconds": last.get("compute_train_seconds", 0.0),
            "compute_trial_seconds": last.get("compute_trial_seconds", 0.0),
            "final_train_acc": last.get("train_acc"),
            "final_val_acc": val.iloc[-1] if len(val) else None, "best_val_acc": val.max() if len(val) else None,
            # Evaluated once, on the final state of a trial that ended on its own; never used to choose.
            TEST_ACC: last.get(TEST_ACC),
            "error": _last_error(trial_dir) if errored else None, "failures": failures,
            "iterations": len(h), "node_ip": last.get("node_ip"), "node_id": last.get("node_id"), "trial_dir": trial_dir.name,
            "checkpoint": last_checkpoint(run_dir, trial_dir),
        })
    trials = pd.DataFrame(rows)
    return trials.astype({"steps_to_target": "Int64", "seconds_to_target": float, "final_val_acc": float,
                          "best_val_acc": float, "final_train_acc": float, TEST_ACC: float}).sort_values(
        ["optimizer", "lr", "seed"])


def last_checkpoint(run_dir: Path, trial_dir: Path) -> str | None:
    """A trial's newest checkpoint, relative to the run directory (a finished PBT member's: its state
    at the end, ancestry included)."""
    found = sorted(trial_dir.glob("checkpoint_*/trainer.json"))
    return str(found[-1].parent.relative_to(run_dir)) if found else None


def _trial_params(trial_dir: Path, ray_config: dict | None) -> dict:
    """A trial's config: its ``params.json``, else (cut short by a killed driver) Ray's experiment state."""
    try:
        return json.loads((trial_dir / "params.json").read_text())
    except ValueError:
        if ray_config is None:
            raise UserError(f"{trial_dir / 'params.json'} is corrupt and Ray's experiment state lacks the trial") from None
        return ray_config


def ray_trial_states(run_dir: Path) -> dict[str, dict]:
    """Trial dir → Ray's view of the trial (status, failures so far, config, last report), from its
    latest experiment state (JSON)."""
    states = sorted(Path(run_dir).glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    if not states:
        return {}
    found = {}
    for state, run_metadata in json.loads(states[-1].read_text())["trial_data"]:
        state, run_metadata = json.loads(state), json.loads(run_metadata)
        found[state["relative_logdir"]] = {"status": state["status"], "failures": int(run_metadata.get("num_failures") or 0),
                                           "config": state["config"], "last_result": run_metadata.get("last_result")}
    return found


def _last_error(trial_dir: Path) -> str:
    """The exception line Ray wrote last into a failed trial's ``error.txt``."""
    error = trial_dir / "error.txt"
    lines = [line.strip() for line in error.read_text().splitlines() if line.strip()] if error.is_file() else []
    return lines[-1] if lines else "no result was reported"


def per_optimizer(trials: pd.DataFrame) -> dict:
    """Per optimizer: best rate (fastest to target), its steps and seconds, the band of rates that reached."""
    out = {}
    for name, t in trials.groupby("optimizer"):
        reached = t[t["status"] == "reached"].sort_values(["seconds_to_target", "steps_to_target"])
        best = reached.iloc[0] if len(reached) else None
        out[name] = {
            "best_lr": float(best["lr"]) if best is not None else None,
            "steps_to_target": int(best["steps_to_target"]) if best is not None else None,
            "seconds_to_target": float(best["seconds_to_target"]) if best is not None else None,
            "band": [float(reached["lr"].min()), float(reached["lr"].max())] if len(reached) else None,
            "reached_lrs": sorted(float(x) for x in reached["lr"].unique()),
            "trials": len(t), "reached": len(reached),
            "diverged": int((t["status"] == "diverged").sum()), "capped": int((t["status"] == "capped").sum()),
            "errors": int((t["status"] == ERROR).sum()),
        }
    return out


def best_trial(trials: pd.DataFrame) -> dict | None:
    """The fastest trial to the target; if none reached it, the best validation accuracy."""
    reached = trials[trials["status"] == "reached"].sort_values(["seconds_to_target", "steps_to_target"])
    pool = reached if len(reached) else trials.sort_values("best_val_acc", ascending=False)
    if not len(pool):
        return None
    row = pool.iloc[0]
    return {k: _plain(row[k]) for k in ("trial_id", "optimizer", "lr", "seed", "scale", "status", "steps_to_target",
                                        "seconds_to_target", "best_val_acc", "final_val_acc", TEST_ACC, "trial_dir")}


def compute_totals(trials: pd.DataFrame, wall_seconds: float | None) -> dict:
    """Compute spent, and what stopping divergent trials early saved (estimated: each diverged trial
    would otherwise have run as long as the median trial that ran to its budget)."""
    diverged = trials[trials["status"] == "diverged"]
    capped = trials[trials["status"] == "capped"]
    full_run = float(capped["train_seconds"].median()) if len(capped) else None
    return {
        "trials": len(trials), "steps": int(trials["steps"].sum()),
        "train_seconds": float(trials["compute_train_seconds"].sum()),
        "trial_seconds": float(trials["compute_trial_seconds"].sum()),
        "wall_seconds": wall_seconds,
        "diverged_trials": len(diverged),
        "diverged_train_seconds": float(diverged["train_seconds"].sum()),
        "divergence_saved_train_seconds_estimate":
            float((full_run - diverged["train_seconds"]).clip(lower=0).sum()) if full_run else 0.0,
    }


# --- PBT: lineage, the audit, the winner -----------------------------------------------------


def member_schedule(history: pd.DataFrame, trial_id: str, before: float | None = None) -> pd.DataFrame:
    """The history rows along a member's lineage, followed back through its donors: what the
    schedule figures draw (the schedule itself is read from the member's last checkpoint)."""
    rows = history[history["trial_id"] == trial_id]
    if before is not None:
        rows = rows[rows["timestamp"] <= before]
    exploits = lineage.exploit_rows(rows)
    if not len(exploits):
        return rows
    last = exploits.iloc[-1]
    head = member_schedule(history, last[SEGMENT_FROM], before=last["timestamp"])
    return pd.concat([head[head["step"] <= last[SEGMENT_STEP]], rows.loc[last.name:]])


def schedule_changes(rows: pd.DataFrame) -> list[dict]:
    """Where the (optimizer, rate) of a run of rows changes: [{step, optimizer, lr}, …], from step 0.

    A change always comes with a restore (or a replay's switch), whose row names the step it
    started from; that step is used, not the previous row's.
    """
    changes, current, start = [], None, 0
    for _, r in rows.iterrows():
        if pd.notna(r[SEGMENT_STEP]):
            start = int(r[SEGMENT_STEP])
        if (r["optimizer"], r["lr"]) != current:
            changes.append({"step": start, "optimizer": r["optimizer"], "lr": float(r["lr"])})
            current = (r["optimizer"], r["lr"])
        start = int(r["step"])
    return changes


def read_checkpoint_meta(run_dir: str | Path, checkpoint: str) -> dict:
    """The metadata (``trainer.json``) of a run's checkpoint, named by its path in the run directory."""
    if is_uri(run_dir):
        with _staged(str(run_dir), lambda relative: relative == f"{checkpoint}/trainer.json") as (local, _):
            return read_checkpoint_meta(local, checkpoint)
    path = Path(run_dir).expanduser() / checkpoint / "trainer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: was the run's checkpoint deleted?")
    return json.loads(path.read_text())


def pbt_summary(run_dir: Path, config: dict, trials: pd.DataFrame, history: pd.DataFrame,
                saves: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The PBT parts of summary.json, and the lineage table: the winner (chosen on validation,
    reported on test, its ancestry read from its last checkpoint), the first member to reach the
    target, the decisions' quantile sizes, the exploit audit, the checkpoints left on disk."""
    state = lineage.read_pbt_state(run_dir)
    decisions = state.get("decisions", [])
    p = config["pbt"]
    winner_id = lineage.choose_winner(trials, history, p["stop_at_target"])
    winner = {"trial_id": winner_id}
    if winner_id:
        row = trials.set_index("trial_id").loc[winner_id]
        winner.update({"val_acc": _plain(row["final_val_acc"]), TEST_ACC: _plain(row[TEST_ACC]),
                       "status": row["status"], "steps": int(row["steps"])})
        if row["checkpoint"]:
            ancestry = read_checkpoint_meta(run_dir, row["checkpoint"]).get(ANCESTRY, [])
            winner.update(checkpoint=row["checkpoint"], ancestry=ancestry, schedule=lineage.schedule(ancestry))
    exploits = lineage.exploit_rows(history)
    verdicts = lineage.audit(exploits, saves, decisions)
    table = lineage.lineage_table(exploits, verdicts, decisions, winner.get("ancestry"))
    reached = history[history["steps_to_target"].notna()].sort_values(["timestamp", "train_seconds"])
    first = None
    if len(reached):
        r = reached.iloc[0]
        first = {"trial_id": r["trial_id"], "steps_to_target": int(r["steps_to_target"]),
                 "seconds_to_target": float(r["seconds_to_target"]),
                 "population_train_seconds": float(history.loc[history["timestamp"] <= r["timestamp"], "check_seconds"].sum())}
    checkpoints = [d for d in run_dir.glob("*/checkpoint_*") if d.is_dir()]
    per_member = pd.Series([d.parent.name for d in checkpoints]).value_counts()
    return {
        "winner": winner,
        "first_to_target": first,
        "decisions": {"count": len(decisions), "exploits_decided": sum(d.get("action") == EXPLOITED for d in decisions),
                      "quantile_fraction": p["quantile_fraction"],
                      "quantile_sizes": lineage.quantile_sizes(decisions, p["quantile_fraction"])},
        "exploits": {**lineage.audit_counts(verdicts, decisions, exploits),
                     "optimizer_switches": int((table["restored_optimizer"] != table["new_optimizer"]).sum())},
        "checkpoints": {"count": len(checkpoints), "bytes": sum(f.stat().st_size for d in checkpoints for f in d.rglob("*")
                                                                  if f.is_file()),
                        "most_per_member": int(per_member.max()) if len(per_member) else 0},
    }, table


# --- width scaling -------------------------------------------------------------------------


def linear_fit(x, y) -> dict | None:
    """Least squares y = c + k·x with R² (null below 3 points: two points fit any line exactly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    k, c = np.polyfit(x, y, 1)
    residual = float(((y - (c + k * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = (1 - residual / total if total > 0 else 1.0) if len(x) >= 3 else None
    return {"c": float(c), "k": float(k), "r2": r2, "points": len(x)}


def scaling_summary(trials: pd.DataFrame, base_scale: float) -> dict:
    """The width study's answers: per optimizer the best rate at each width (fewest steps to the
    target, then fewest seconds; rates within the check resolution of it are tied) and whether it
    moved from the narrowest width's; per rate the fits steps, seconds = c + k·n over widths
    (n = weights, reached trials only)."""
    t = trials.assign(width=(trials["scale"] / base_scale).round(6))
    base_width = float(t["width"].min())
    best_rates, moved, fits = {}, {}, []
    for optimizer, o in t.groupby("optimizer"):
        rows = []
        for width, w in o.groupby("width"):
            reached = w[w["status"] == "reached"].sort_values(["steps_to_target", "seconds_to_target"])
            best = reached.iloc[0] if len(reached) else None
            rows.append({"width": float(width), "scale": float(w["scale"].iloc[0]), "weights": int(w["weights"].iloc[0]),
                         "best_lr": float(best["lr"]) if best is not None else None,
                         "steps_to_target": int(best["steps_to_target"]) if best is not None else None,
                         "seconds_to_target": float(best["seconds_to_target"]) if best is not None else None,
                         "tied_lrs": sorted(float(x) for x in reached.loc[
                             reached["steps_to_target"] == reached["steps_to_target"].min(), "lr"]),
                         "reached": len(reached), "trials": len(w)})
        base = rows[0]["best_lr"]
        for row in rows:  # how the narrowest width's best rate does at this width
            at = o[(o["width"] == row["width"]) & np.isclose(o["lr"], base or np.nan) & (o["status"] == "reached")]
            row["base_best_lr_steps"] = int(at["steps_to_target"].min()) if len(at) else None
        best_rates[optimizer] = rows
        # Moved: at some width the narrowest width's best rate is not among the fastest (or failed).
        moved[optimizer] = None if base is None else any(r["best_lr"] is not None and base not in r["tied_lrs"]
                                                         for r in rows)
        for lr, g in o[o["status"] == "reached"].groupby("lr"):
            fits.append({"optimizer": optimizer, "lr": float(lr), "widths": sorted(float(w) for w in g["width"]),
                         "seconds": linear_fit(g["weights"], g["seconds_to_target"]),
                         "steps": linear_fit(g["weights"], g["steps_to_target"].astype(float))})
    return {"base_scale": base_scale, "base_width": base_width, "widths": sorted(float(w) for w in t["width"].unique()),
            "best_rates": best_rates, "best_rate_moved": moved, "fits": fits}


# --- compute: comparing runs at equal compute ------------------------------------------------


def compute_curve(history: pd.DataFrame) -> pd.DataFrame:
    """A run's checks in the order they happened, with the compute spent so far (training seconds,
    steps) and the best validation accuracy seen so far: how far the run had got for its compute."""
    h = history.sort_values(["timestamp", "trial_id"]).copy()
    previous = h.groupby("trial_id")["step"].shift().fillna(0)
    # A check after a restore trained from the checkpoint's step, not from the row before.
    start = h["segment_step"].astype(float).where(h["segment_step"].notna(), previous)
    h["check_steps"] = (h["step"] - start).clip(lower=0)
    h["cum_steps"] = h["check_steps"].cumsum()
    h["cum_train_seconds"] = h["check_seconds"].fillna(0).cumsum()
    h["best_val_acc"] = h["val_acc"].cummax().ffill()
    h["reached_target"] = h["steps_to_target"].notna()
    return h[["timestamp", "trial_id", "optimizer", "lr", "step", "val_acc", "best_val_acc", "reached_target",
              "cum_steps", "cum_train_seconds"]].reset_index(drop=True)


def compute_until(curve: pd.DataFrame, mask: pd.Series) -> dict | None:
    """The compute a run had spent at its first check where ``mask`` holds (None if it never did)."""
    hit = curve[mask]
    if not len(hit):
        return None
    row = hit.iloc[0]
    return {"steps": int(row["cum_steps"]), "train_seconds": float(row["cum_train_seconds"]),
            "trial_id": row["trial_id"], "optimizer": row["optimizer"], "lr": float(row["lr"])}


def versions() -> dict:
    names = ("pbt_lab", "ray", "tensorflow", "keras", "numpy", "pandas", "pyarrow")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), **found}


# --- run directories behind a URI (s3://, gs://, file://): pyarrow.fs, as Ray's own storage uses ----


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, no credentials, bucket not found…
        raise UserError(f"storage {uri}: {str(e).splitlines()[0]}") from None


def uri_exists(uri: str) -> bool:
    """Whether anything is stored under ``uri`` (a run directory behind a URI)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    try:
        return any(filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)))
    except OSError as e:
        raise UserError(f"storage {uri}: {str(e).splitlines()[0]}") from None


@contextmanager
def _staged(uri: str, wanted, upload: tuple[str, ...] = ()):
    """A run directory behind a URI as a local one: the files ``wanted(relative_path)`` picks come
    down (checkpoints and event files stay where they are); the ``upload`` names go back up.
    Yields (local directory, {relative path: bytes} of everything stored under the URI)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    files = [f for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
             if f.type == fs.FileType.File]
    with tempfile.TemporaryDirectory(prefix="pbt_lab-") as tmp:
        local = Path(tmp)
        sizes = {}
        for f in files:
            relative = f.path[len(root):].lstrip("/")
            sizes[relative] = f.size
            if wanted(relative):
                (local / relative).parent.mkdir(parents=True, exist_ok=True)
                fs.copy_files(f.path, str(local / relative), source_filesystem=filesystem)
        yield local, sizes
        for name in upload:
            if (local / name).is_dir():
                filesystem.create_dir(f"{root}/{name}")  # local and NFS targets need it; object stores ignore it
            if (local / name).exists():
                fs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=filesystem)


def _ray_json(relative: str) -> bool:
    """What the tables are built from: Ray's files at the run's top level and in each trial directory."""
    parts = relative.split("/")
    return (len(parts) == 1 and (parts[0] in (PBT_STATE_FILE, SUMMARY) or parts[0].startswith("experiment_state-"))) or \
        (len(parts) == 2 and parts[1] in ("params.json", "result.json", "error.txt")) or \
        (len(parts) == 3 and parts[1].startswith("checkpoint_") and parts[2] == "trainer.json")  # ancestry


def write_tables(run_dir: str | Path, *, kind: str | None = None, config: dict | None = None, data: dict | None = None,
                 wall_seconds: float | None = None, figures: bool = True, stopped_as: str | None = None,
                 extra: dict | None = None) -> dict:
    """Write trials.parquet, history.parquet, summary.json and figures/ into ``run_dir``.

    Rebuildable: called on an existing run directory alone, it keeps what the last summary
    recorded (kind, config, data, wall time) and refreshes the tables from Ray's files.
    A URI run directory (``s3://…``) is read and written through pyarrow.fs.
    """
    if is_uri(run_dir):
        outputs = (TRIALS, HISTORY, LINEAGE, SUMMARY, FIGURES)
        with _staged(str(run_dir), _ray_json, upload=outputs) as (local, sizes):
            try:
                tables = write_tables(local, kind=kind, config=config, data=data, wall_seconds=wall_seconds,
                                      figures=figures, stopped_as=stopped_as, extra=extra)
            except UserError as e:
                raise UserError(str(e).replace(str(local), str(run_dir))) from None
            summary = tables["summary"]
            summary["run_dir"] = str(run_dir)
            kept = sum(size for relative, size in sizes.items() if relative.split("/")[0] not in outputs)
            summary["disk_bytes"] = kept + sum(f.stat().st_size for name in outputs
                                               for f in [local / name, *(local / name).rglob("*")] if f.is_file())
            if "checkpoints" in summary:  # only their metadata came down: count the bytes where they are
                summary["checkpoints"]["bytes"] = sum(size for relative, size in sizes.items()
                                                      if "/checkpoint_" in f"/{relative}")
            (local / SUMMARY).write_text(json.dumps(summary, indent=2, default=_plain))
        return tables
    run_dir = Path(run_dir).expanduser()
    if not trial_dirs(run_dir):
        raise UserError(f"{run_dir} holds no Ray Tune trials")
    previous = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    stopped_as = stopped_as or previous.get("stopped_as")  # a rebuild keeps what the run said
    ray_states = ray_trial_states(run_dir)  # Ray's experiment state, parsed once for both tables
    reports = read_reports(run_dir, ray_states)
    history = read_history(reports)
    trials = read_trials(run_dir, history, stopped_as, ray_states)
    history.drop(columns=PER_TRIAL).to_parquet(run_dir / HISTORY, index=False)
    trials.to_parquet(run_dir / TRIALS, index=False)
    kind = kind or previous.get("kind")
    summary = {
        "kind": kind,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "config": config if config is not None else previous.get("config"),
        "versions": versions(),
        "data": data if data is not None else previous.get("data"),
        "stopped_as": stopped_as,
        "best": best_trial(trials),
        "optimizers": per_optimizer(trials),
        "compute": compute_totals(trials, wall_seconds if wall_seconds is not None else
                                  previous.get("compute", {}).get("wall_seconds")),
        **{k: previous[k] for k in ("replay_of", "trace_of") if k in previous},
        **(extra or {}),
    }
    tables = {"trials": trials, "history": history, "summary": summary}
    if kind == "scaling":
        summary["scaling"] = scaling_summary(trials, summary["config"]["model"]["scale"])
    if kind == "pbt":
        pbt, tables["lineage"] = pbt_summary(run_dir, summary["config"], trials, history, read_saved_states(reports))
        tables["lineage"].to_parquet(run_dir / LINEAGE, index=False)
        summary.update(pbt)
        if pbt["winner"]["trial_id"]:
            summary["best"] = {**best_trial(trials[trials["trial_id"] == pbt["winner"]["trial_id"]]),
                               "schedule": pbt["winner"].get("schedule", [])}
    if figures:
        from pbt_lab import plots

        made = plots.run_figures(kind, tables, run_dir / FIGURES)
        summary["figures"] = [str(p.relative_to(run_dir)) for p in made]
    summary["disk_bytes"] = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=_plain))
    return tables


def read_tables(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(trials, history, summary) of a run directory written by ``write_tables`` (a path or URI)."""
    if is_uri(run_dir):
        with _staged(str(run_dir), lambda relative: relative in (TRIALS, HISTORY, SUMMARY)) as (local, _):
            try:
                return read_tables(local)
            except UserError as e:
                raise UserError(str(e).replace(str(local), str(run_dir))) from None
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / SUMMARY).is_file():
        raise UserError(f"{run_dir} has no {SUMMARY}: run python -m pbt_lab.results {run_dir} to build it")
    return (pd.read_parquet(run_dir / TRIALS), pd.read_parquet(run_dir / HISTORY),
            json.loads((run_dir / SUMMARY).read_text()))


def read_lineage_table(run_dir: str | Path) -> pd.DataFrame:
    """The exploits of a PBT run directory written by ``write_tables`` (``lineage.parquet``)."""
    path = Path(run_dir).expanduser() / LINEAGE
    if not path.is_file():
        raise UserError(f"{path.parent} has no {LINEAGE}: is it a PBT run?")
    return pd.read_parquet(path)


def console_summary(tables: dict, run_dir: Path) -> str:
    """The end-of-run table per optimizer, and where the files are."""
    s = tables["summary"]
    lines = [f"\n{'optimizer':10} {'best lr':>10} {'steps':>7} {'seconds':>8}  {'band (reached target)':24} {'reached':>8} {'diverged':>8}"]
    for name, o in s["optimizers"].items():
        band = f"{o['band'][0]:.3g} – {o['band'][1]:.3g}" if o["band"] else "none"
        best = [format(v, f) if v is not None else "–"
                for v, f in ((o["best_lr"], ".3g"), (o["steps_to_target"], "d"), (o["seconds_to_target"], ".2f"))]
        lines.append(f"{name:10} {best[0]:>10} {best[1]:>7} {best[2]:>8}  {band:24} "
                     f"{o['reached']:>4}/{o['trials']:<3} {o['diverged']:>8}")
    c = s["compute"]
    lines.append(f"\n{c['trials']} trials, {c['steps']:,} steps, {c['train_seconds']:.0f} s training in "
                 f"{c['trial_seconds']:.0f} trial-seconds" + (f", {c['wall_seconds']:.0f} s wall" if c["wall_seconds"] else ""))
    best = s.get("best") or {}
    if best.get("trial_id"):
        test = f", test accuracy {best[TEST_ACC]:.4f} (held out, evaluated once)" if best.get(TEST_ACC) is not None else ""
        lines.append(f"{'winner' if s.get('kind') == 'pbt' else 'best'} {best['trial_id']}: {best['optimizer']} at lr "
                     f"{best['lr']:.3g}, validation accuracy {best['final_val_acc'] or float('nan'):.4f}{test}")
    if "exploits" in s:
        e = s["exploits"]
        lines.append(f"exploits: {e['exploits']} carried out, {e['exploits_matched']} matched to a decision, "
                     f"{e['exploits_verified']} verified, {e['exploits_mismatched']} mismatched, "
                     f"{e['exploits_unverifiable']} unverifiable; checkpoints kept: {s['checkpoints']['count']} "
                     f"({s['checkpoints']['bytes'] / 1e6:.1f} MB)")
        for problem in e["problems"]:
            lines.append(f"AUDIT: an exploit's {problem}: see lineage.parquet (verdict, problem)")
    failed = tables["trials"][tables["trials"]["status"] == ERROR]
    for _, t in failed.iterrows():
        lines.append(f"FAILED {t['trial_id']} ({t['optimizer']}, lr {t['lr']:.3g}): {t['error']}")
    lines.append(f"tables:  {run_dir}/{{{TRIALS}, {HISTORY}, {SUMMARY}}}")
    lines.append(f"figures: {run_dir}/{FIGURES}/")
    lines.append(f"tensorboard --logdir {run_dir}")
    return "\n".join(lines)


def exit_status(tables: dict) -> int:
    """A run's exit code: 1 when a trial failed or an exploit failed the audit (the console names
    them), else 0."""
    audit = tables["summary"].get("exploits", {})
    return int((tables["trials"]["status"] == ERROR).any() or audit.get("exploits_mismatched", 0) > 0
               or audit.get("exploits_unmatched", 0) > 0)


def main(argv: list[str] | None = None) -> int:
    from pbt_lab.config import OneLineParser

    parser = OneLineParser(prog="python -m pbt_lab.results", description="Rebuild a run directory's tables and figures.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        tables = write_tables(args.run_dir)
    except UserError as e:
        parser.error(str(e))
    print(console_summary(tables, args.run_dir if is_uri(args.run_dir) else Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
