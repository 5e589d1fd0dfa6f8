"""Ray's files in a run directory, read as JSON only (no pickle): the trials' reports
(``result.json``), their configs (``params.json``), Ray's experiment state, errors, checkpoints'
metadata.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from pbt_lab import UserError
from pbt_lab.names import CHECKPOINT_ARRAYS, CHECKPOINT_META, LEGACY_DIGEST_NAMES, PBT_STATE_FILE, SUMMARY
from pbt_lab.storage import is_uri, staged


def trial_dirs(run_dir: Path) -> list[Path]:
    """The trial directories of a run: those holding Ray's ``params.json``."""
    return sorted(p.parent for p in Path(run_dir).glob("*/params.json"))


def read_reports(run_dir: Path, ray_states: dict) -> dict[str, list[dict]]:
    """Trial dir name → every report the trial made, in order (Ray's ``result.json``), read once."""
    found = {}
    for trial_dir in trial_dirs(run_dir):
        result_file = trial_dir / "result.json"
        reports = _json_lines(result_file) if result_file.is_file() else []
        last = ray_states.get(trial_dir.name, {}).get("last_result") or {}
        if not reports and "training_iteration" in last:
            # A driver killed while copying the trial's files left them empty, but Ray's experiment
            # state kept the trial's last report: its outcome survives, its earlier rows do not. (A
            # trial that never reported has a last result of Ray's own fields only.)
            reports = [last]
        if reports:
            found[trial_dir.name] = [todays_names(r) for r in reports]
    return found


def todays_names(record: dict) -> dict:
    """A report (or a record of one) with an older run's names read as today's."""
    return {LEGACY_DIGEST_NAMES.get(k, k): v for k, v in record.items()}


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


def ray_trial_states(run_dir: Path, cut_short: list[str] | None = None) -> dict[str, dict]:
    """Trial dir → Ray's view of the trial (status, failures so far, config, last report), from its
    latest experiment state (JSON) that is whole: one cut short (a full disk, a killed driver) is
    passed over, and named in ``cut_short``."""
    states = sorted(Path(run_dir).glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    for path in reversed(states):
        try:
            return _trial_states(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            if cut_short is not None:
                cut_short.append(f"Ray's experiment state {path.name} (the one before it was read)")
    return {}


def _trial_states(experiment_state: dict) -> dict[str, dict]:
    found = {}
    for state, run_metadata in experiment_state["trial_data"]:
        state, run_metadata = json.loads(state), json.loads(run_metadata)
        found[state["relative_logdir"]] = {  # Ray's own keys and statuses (RUNNING, TERMINATED, ERROR…)
            "status": state["status"],
            "failures": int(run_metadata.get("num_failures") or 0),
            "config": state["config"],
            "last_result": run_metadata.get("last_result"),
        }
    return found


def read_progress(run_dir: Path) -> dict[str, list[dict]]:
    """Trial dir name → every report in Ray's ``progress.csv`` (null for an empty cell; ``config/KEY``
    columns back under ``config``; only the keys of each trial's first report: Ray's header). A function
    trainable's ``result.json`` can lack rows before a pause that this file keeps (Ray 2.60: four rows of
    a trial, the state it then restored included)."""
    import pandas as pd  # results' own dependency; read here only for another trainable's runs

    found = {}
    for trial_dir in trial_dirs(run_dir):
        path = trial_dir / "progress.csv"
        if not path.is_file() or not path.stat().st_size:
            continue
        rows = pd.read_csv(path, dtype=object).astype(object).where(lambda f: f.notna(), None)
        reports = []
        for row in rows.to_dict("records"):
            config = {k.removeprefix("config/"): v for k, v in row.items() if k.startswith("config/")}
            reports.append(
                {**{k: v for k, v in row.items() if not k.startswith("config/")}, "config": config}
            )
        found[trial_dir.name] = [todays_names(r) for r in reports]
    return found


def _is_lab_config(params) -> bool:
    """A trial config of the lab's trainable: its model section (builder, scale, options)."""
    return isinstance(params, dict) and isinstance(params.get("model"), dict) and "scale" in params["model"]


def another_trainables_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a Ray run whose trials are not the lab's trainable's (their params.json
    has no model section)."""
    for trial_dir in trial_dirs(run_dir):
        try:
            return not _is_lab_config(json.loads((trial_dir / "params.json").read_text()))
        except ValueError:
            continue
    return False


def trial_params(trial_dir: Path, ray_config: dict | None) -> dict:
    """A trial's config: its ``params.json``, else (cut short by a killed driver) Ray's experiment state."""
    try:
        params = json.loads((trial_dir / "params.json").read_text())
    except ValueError:
        if ray_config is None:
            raise UserError(
                f"{trial_dir / 'params.json'} is corrupt and Ray's experiment state lacks the trial"
            ) from None
        params = ray_config
    if not _is_lab_config(params):
        raise UserError(
            f"{trial_dir.parent} is a Ray Tune run of another trainable (its trials' configs have no "
            f"model section): pbt_lab's tables read its own trainable's runs; LabPBT's decisions are in "
            f"its pbt_state.json"
        )
    return params


def last_error(trial_dir: Path) -> str:
    """The exception line Ray wrote last into a failed trial's ``error.txt``."""
    error = trial_dir / "error.txt"
    lines = (
        [line.strip() for line in error.read_text().splitlines() if line.strip()] if error.is_file() else []
    )
    return lines[-1] if lines else "no result was reported"


def last_checkpoint(run_dir: Path, trial_dir: Path) -> str | None:
    """A trial's newest whole checkpoint, relative to the run directory (a finished PBT member's: its
    state at the end, ancestry included)."""
    # Ray's own, numbered in order (not a checkpoint a recipient's copy was moved into).
    numbered = sorted(c for c in trial_dir.glob("checkpoint_*") if re.fullmatch(r"checkpoint_\d+", c.name))
    found = [c for c in numbered if whole_checkpoint(c)]
    return str(found[-1].relative_to(run_dir)) if found else None


REMOTE_SIZES = ".remote_sizes.json"  # a staged run directory's record of the sizes its URI holds


def whole_checkpoint(directory: Path) -> bool:
    """A checkpoint directory whose copy to storage finished: its metadata reads and its arrays are
    a whole zip (a save cut short by a full disk leaves files empty, cut or missing). Staged from a
    URI, where only the metadata came down, the arrays must be there with some size."""
    try:
        json.loads((directory / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return False
    arrays = directory / CHECKPOINT_ARRAYS
    if arrays.is_file():
        return zipfile.is_zipfile(arrays)  # a zip's directory is written last: a cut copy has none
    remote = directory.parent.parent / REMOTE_SIZES
    sizes = json.loads(remote.read_text()) if remote.is_file() else {}
    relative = f"{directory.parent.name}/{directory.name}/{CHECKPOINT_ARRAYS}"
    return sizes.get(relative, 0) > 0


def read_checkpoint_meta(run_dir: str | Path, checkpoint: str) -> dict:
    """The metadata (``trainer.json``) of a run's checkpoint, named by its path in the run directory."""
    if is_uri(run_dir):
        with staged(str(run_dir), lambda relative: relative == f"{checkpoint}/trainer.json") as (local, _):
            return read_checkpoint_meta(local, checkpoint)
    path = Path(run_dir).expanduser() / checkpoint / CHECKPOINT_META
    if not path.is_file():
        raise UserError(f"{path} is missing: was the run's checkpoint deleted?")
    return json.loads(path.read_text())


def tables_inputs(relative: str) -> bool:
    """What the tables are built from: Ray's files at the run's top level and in each trial directory."""
    parts = relative.split("/")
    return (
        (
            len(parts) == 1
            and (parts[0] in (PBT_STATE_FILE, SUMMARY) or parts[0].startswith("experiment_state-"))
        )
        or (len(parts) == 2 and parts[1] in ("params.json", "result.json", "error.txt"))
        or (len(parts) == 3 and parts[1].startswith("checkpoint_") and parts[2] == CHECKPOINT_META)
    )  # ancestry


def remove_cut_short_checkpoints(run_dir: Path) -> int:
    """Delete the checkpoint directories whose copy to storage did not finish (a full disk): nothing
    registered them, nothing restores them, and they hold the space the tables need. Returns how many."""
    broken = [c for c in Path(run_dir).glob("*/checkpoint_*") if c.is_dir() and not whole_checkpoint(c)]
    for directory in broken:
        shutil.rmtree(directory, ignore_errors=True)
    return len(broken)
