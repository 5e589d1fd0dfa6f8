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

from pbt_lab import UserError

TRIALS, HISTORY, LINEAGE = "trials.parquet", "history.parquet", "lineage.parquet"
SUMMARY, FIGURES = "summary.json", "figures"
HISTORY_COLUMNS = ["trial_id", "iteration", "step", "train_seconds", "train_acc", "train_loss", "val_acc",
                   "val_loss", "optimizer", "lr", "status", "steps_to_target", "seconds_to_target", "check_seconds",
                   "score", "segment_from", "segment_step", "restored_sha256", "restored_lr", "restored_optimizer", "restored_optimizer_steps",
                   "trial_seconds",
                   "timestamp", "started_at", "reported_at", "node_ip", "node_id", "pid"]
ERROR = "error"
PER_TRIAL = ["trial_dir", "compute_train_seconds", "compute_trial_seconds"]  # carried to the trials table only


def trial_dirs(run_dir: Path) -> list[Path]:
    """The trial directories of a run: those holding Ray's ``params.json``."""
    return sorted(p.parent for p in Path(run_dir).glob("*/params.json"))


def read_history(run_dir: Path, ray_states: dict | None = None) -> pd.DataFrame:
    """One row per reported check of every trial, in the order reported.

    Rows that a trial re-ran after restarting from its own checkpoint (a resume, a worker
    restart) replace the ones they repeat; an exploit starts a new segment from the donor's
    state and keeps the recipient's earlier rows. ``check_seconds`` counts every row reported,
    repeats included: it is the compute really spent.
    """
    frames = []
    ray_states = ray_trial_states(run_dir) if ray_states is None else ray_states
    for trial_dir in trial_dirs(run_dir):
        result_file = trial_dir / "result.json"
        reports = _json_lines(result_file) if result_file.is_file() else []
        if not reports and ray_states.get(trial_dir.name, {}).get("last_result"):
            # A driver killed while copying the trial's files left them empty, but Ray's experiment
            # state kept the trial's last report: its outcome survives, its earlier rows do not.
            reports = [ray_states[trial_dir.name]["last_result"]]
        if not reports:
            continue
        # Compute really spent, repeats included (older runs lack check_seconds: their last train_seconds).
        spent = {"compute_train_seconds": sum(r.get("check_seconds") or 0.0 for r in reports)
                 or (reports[-1].get("train_seconds") or 0.0 if reports else 0.0),
                 "compute_trial_seconds": sum(r.get("time_this_iter_s") or 0.0 for r in reports)}
        kept: list[dict] = []
        for r in reports:
            row = {**{k: r.get(k) for k in HISTORY_COLUMNS}, "iteration": r["training_iteration"],
                   "trial_seconds": r.get("time_total_s"), "trial_dir": trial_dir.name, **spent}
            if row["segment_from"] == row["trial_id"] and row["segment_step"] is not None:
                kept = [k for k in kept if k["step"] <= row["segment_step"]]  # a restart repeats these
            kept.append(row)
        frames.append(pd.DataFrame(kept))
    history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    history = history.reindex(columns=[*HISTORY_COLUMNS, *PER_TRIAL])
    return history.astype({"val_acc": float, "val_loss": float, "train_acc": float, "train_loss": float,
                           "score": float, "restored_lr": float, "segment_step": "Int64"}).reset_index(drop=True)


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
            "error": _last_error(trial_dir) if errored else None, "failures": failures,
            "iterations": len(h), "node_ip": last.get("node_ip"), "node_id": last.get("node_id"), "trial_dir": trial_dir.name,
        })
    trials = pd.DataFrame(rows)
    return trials.astype({"steps_to_target": "Int64", "seconds_to_target": float, "final_val_acc": float,
                          "best_val_acc": float, "final_train_acc": float}).sort_values(["optimizer", "lr", "seed"])


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
                                        "seconds_to_target", "best_val_acc", "trial_dir")}


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


# --- PBT: lineage and schedules ------------------------------------------------------------


def read_lineage(history: pd.DataFrame) -> pd.DataFrame:
    """One row per exploit, from the trainable's own records: the first report after a restore from
    another member's checkpoint names that donor and the verified weights hash and rate."""
    rows = []
    for trial_id, h in history.groupby("trial_id", sort=False):
        previous = None
        for _, r in h.iterrows():
            if pd.notna(r["segment_from"]) and r["segment_from"] != trial_id:
                donor = history[(history["trial_id"] == r["segment_from"]) & (history["step"] == r["segment_step"])]
                donor_score = donor["score"].dropna()
                rows.append({
                    "step": int(r["segment_step"]), "recipient": trial_id, "donor": r["segment_from"],
                    "old_optimizer": previous["optimizer"] if previous is not None else None,
                    "old_lr": previous["lr"] if previous is not None else None,
                    "new_optimizer": r["optimizer"], "new_lr": r["lr"],
                    "recipient_score": previous["score"] if previous is not None else None,
                    "donor_score": donor_score.iloc[-1] if len(donor_score) else None,
                    "weights_sha256": r["restored_sha256"],
                    "lr_verified": bool(np.isclose(r["restored_lr"], r["lr"], rtol=1e-6)),
                    "donor_optimizer": r["restored_optimizer"],  # the optimizer the checkpoint was saved with
                    "optimizer_steps_after": r["restored_optimizer_steps"],
                    "timestamp": r["timestamp"], "recipient_iteration": r["iteration"],
                })
            previous = r
    columns = ["step", "recipient", "donor", "old_optimizer", "old_lr", "new_optimizer", "new_lr", "recipient_score",
               "donor_score", "weights_sha256", "lr_verified", "donor_optimizer", "optimizer_steps_after", "timestamp",
               "recipient_iteration"]
    return pd.DataFrame(rows, columns=columns).sort_values(["timestamp", "recipient"]).reset_index(drop=True)


def ray_policy_exploits(run_dir: Path, trials: pd.DataFrame) -> pd.DataFrame:
    """Ray's own record of exploits (``pbt_global.txt``) as recipient, donor and new config.

    Ray names trials there by their tag, which starts with the trial's index (``3_lr=…``, or
    ``3@perturbed[…]`` once a resumed run has exploited); the index is also the suffix of the
    trial id (``…_00003``).
    """
    log = Path(run_dir) / "pbt_global.txt"
    by_index = {int(t.rsplit("_", 1)[1]): t for t in trials["trial_id"]}
    rows = []
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                target, clone, _, _, _, new_config = json.loads(line)
                rows.append({"recipient": by_index.get(int(re.match(r"\d+", target).group())),
                             "donor": by_index.get(int(re.match(r"\d+", clone).group())),
                             "new_optimizer": new_config["optimizer"], "new_lr": new_config["lr"]})
    return pd.DataFrame(rows, columns=["recipient", "donor", "new_optimizer", "new_lr"])


def audit_exploits(lineage: pd.DataFrame, ray_log: pd.DataFrame) -> dict:
    """Match the exploits the trainables carried out against Ray's decisions, per recipient in order.

    Every carried-out exploit must be one of Ray's decisions. Ray may decide twice for a member
    before it runs again (it was still paused): the earlier decision is then superseded, never
    carried out, and counted as such.
    """
    def same(decision, e) -> bool:
        donor, optimizer, lr = decision
        return (donor, optimizer) == (e["donor"], e["new_optimizer"]) and np.isclose(lr, e["new_lr"], rtol=1e-9)

    unmatched = []
    for recipient, ours in lineage.groupby("recipient", sort=False):
        theirs = ray_log[ray_log["recipient"] == recipient][["donor", "new_optimizer", "new_lr"]].values.tolist()
        for _, e in ours.iterrows():
            match = next((i for i, decision in enumerate(theirs) if same(decision, e)), None)
            if match is None:
                # e.g. a resumed recipient restarting from the donor checkpoint of an exploit it had
                # carried out already: unmatched, and Ray's later decisions stay to be matched
                unmatched.append([recipient, e["donor"], e["new_optimizer"], int(e["step"])])
            else:
                theirs = theirs[match + 1:]  # the decisions before the match were superseded
    return {"verified": len(lineage), "in_ray_policy_log": len(ray_log),
            "superseded_in_ray_log": len(ray_log) - len(lineage) + len(unmatched), "unmatched": unmatched}


def member_schedule(history: pd.DataFrame, trial_id: str, before: float | None = None) -> pd.DataFrame:
    """The rows that made a member's final state, following its lineage back through its donors."""
    rows = history[history["trial_id"] == trial_id]
    if before is not None:
        rows = rows[rows["timestamp"] <= before]
    exploits = rows[rows["segment_from"].notna() & (rows["segment_from"] != trial_id)]
    if not len(exploits):
        return rows
    last = exploits.iloc[-1]
    head = member_schedule(history, last["segment_from"], before=last["timestamp"])
    return pd.concat([head[head["step"] <= last["segment_step"]], rows.loc[last.name:]])


def schedule_changes(rows: pd.DataFrame) -> list[dict]:
    """Where the (optimizer, rate) of a schedule changes: [{step, optimizer, lr}, …], from step 0.

    A change always comes with a restore, whose row names the step it started from; that step is
    used, not the previous row's (Ray does not log every result around a pause).
    """
    changes, current, start = [], None, 0
    for _, r in rows.iterrows():
        if pd.notna(r["segment_step"]):
            start = int(r["segment_step"])
        if (r["optimizer"], r["lr"]) != current:
            changes.append({"step": start, "optimizer": r["optimizer"], "lr": float(r["lr"])})
            current = (r["optimizer"], r["lr"])
        start = int(r["step"])
    return changes


def pbt_summary(run_dir: Path, trials: pd.DataFrame, history: pd.DataFrame, lineage: pd.DataFrame) -> dict:
    """The PBT-only parts of summary.json: the winner and its schedule, the first member to reach the
    target and the population compute spent until then, and the exploit audit against Ray's log."""
    ended = trials.dropna(subset=["final_val_acc"]).sort_values("final_val_acc", ascending=False)
    winner = ended.iloc[0]["trial_id"] if len(ended) else None
    reached = history[history["steps_to_target"].notna()].sort_values(["timestamp", "train_seconds"])
    first = None
    if len(reached):
        r = reached.iloc[0]
        first = {"trial_id": r["trial_id"], "steps_to_target": int(r["steps_to_target"]),
                 "seconds_to_target": float(r["seconds_to_target"]),
                 "population_train_seconds": float(history.loc[history["timestamp"] <= r["timestamp"], "check_seconds"].sum())}
    audit = audit_exploits(lineage, ray_policy_exploits(run_dir, trials))
    return {
        "winner": {"trial_id": winner, "final_val_acc": _plain(ended.iloc[0]["final_val_acc"]) if winner else None,
                   "schedule": schedule_changes(member_schedule(history, winner)) if winner else []},
        "first_to_target": first,
        "exploits": {**audit, "lr_verified": bool(lineage["lr_verified"].all()) if len(lineage) else True,
                     "optimizer_switches": int((lineage["donor_optimizer"] != lineage["new_optimizer"]).sum())},
    }


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
    Yields (local directory, bytes stored under the URI outside ``upload``)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    files = [f for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
             if f.type == fs.FileType.File]
    with tempfile.TemporaryDirectory(prefix="pbt_lab-") as tmp:
        local = Path(tmp)
        kept_bytes = 0
        for f in files:
            relative = f.path[len(root):].lstrip("/")
            if relative.split("/")[0] not in upload:
                kept_bytes += f.size
            if wanted(relative):
                (local / relative).parent.mkdir(parents=True, exist_ok=True)
                fs.copy_files(f.path, str(local / relative), source_filesystem=filesystem)
        yield local, kept_bytes
        for name in upload:
            if (local / name).is_dir():
                filesystem.create_dir(f"{root}/{name}")  # local and NFS targets need it; object stores ignore it
            if (local / name).exists():
                fs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=filesystem)


def _ray_json(relative: str) -> bool:
    """What the tables are built from: Ray's files at the run's top level and in each trial directory."""
    parts = relative.split("/")
    return (len(parts) == 1 and (parts[0] in ("pbt_global.txt", SUMMARY) or parts[0].startswith("experiment_state-"))) or \
        (len(parts) == 2 and parts[1] in ("params.json", "result.json", "error.txt"))


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
        with _staged(str(run_dir), _ray_json, upload=outputs) as (local, kept_bytes):
            try:
                tables = write_tables(local, kind=kind, config=config, data=data, wall_seconds=wall_seconds,
                                      figures=figures, stopped_as=stopped_as, extra=extra)
            except UserError as e:
                raise UserError(str(e).replace(str(local), str(run_dir))) from None
            summary = tables["summary"]
            summary["run_dir"] = str(run_dir)
            summary["disk_bytes"] = kept_bytes + sum(f.stat().st_size for name in outputs
                                                     for f in [local / name, *(local / name).rglob("*")] if f.is_file())
            (local / SUMMARY).write_text(json.dumps(summary, indent=2, default=_plain))
        return tables
    run_dir = Path(run_dir).expanduser()
    if not trial_dirs(run_dir):
        raise UserError(f"{run_dir} holds no Ray Tune trials")
    previous = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    ray_states = ray_trial_states(run_dir)  # Ray's experiment state, parsed once for both tables
    history = read_history(run_dir, ray_states)
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
        tables["lineage"] = lineage = read_lineage(history)
        lineage.to_parquet(run_dir / LINEAGE, index=False)
        summary.update(pbt_summary(run_dir, trials, history, lineage))
        if summary["winner"]["trial_id"]:
            summary["best"] = {**best_trial(trials[trials["trial_id"] == summary["winner"]["trial_id"]]),
                               "schedule": summary["winner"]["schedule"]}
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
    failed = tables["trials"][tables["trials"]["status"] == ERROR]
    for _, t in failed.iterrows():
        lines.append(f"FAILED {t['trial_id']} ({t['optimizer']}, lr {t['lr']:.3g}): {t['error']}")
    lines.append(f"tables:  {run_dir}/{{{TRIALS}, {HISTORY}, {SUMMARY}}}")
    lines.append(f"figures: {run_dir}/{FIGURES}/")
    lines.append(f"tensorboard --logdir {run_dir}")
    return "\n".join(lines)


def exit_status(tables: dict) -> int:
    """A run's exit code: 1 when a trial failed (the console names it and its error), else 0."""
    return int((tables["trials"]["status"] == ERROR).any())


def _plain(value):
    """JSON-ready Python values from NumPy/pandas scalars (NaN and NA become null)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


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
