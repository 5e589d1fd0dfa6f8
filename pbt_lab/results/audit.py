"""Every restore audited: what a trial loaded against what its saver reported, whoever the saver was.

Pure pandas on the history table and the scheduler's decisions: no Ray, no TensorFlow, so every
check here is unit-tested on hand-made rows, wrong ones included.

A restore is audited from independent records:

- the saver's report of the state it was in when the checkpoint was taken (its digests: weights with
  step and data order; the optimizer's slots and step counter), under the state id the checkpoint
  carries;
- the restoring trial's first report after the restore: the id and digests of what it loaded, read
  from the live objects, the digest of a newly built optimizer where it switched, and the rate and
  every other searched key its first check's traced call read (a rebuilt model: its options);
- for an exploit, the scheduler's decision: recipient, donor, the donor state it meant to copy, the
  new hyperparameters, and whether the member's next report carried it out.

The audit fails closed: a restore whose saver never reported the state (``unverifiable``) or an exploit
decided and never carried out fails the run unless the run's end explains it or the user allowed
unverified restores (``run.allow_unverified``).
"""

from __future__ import annotations

import math

import pandas as pd

from pbt_lab.config.space import IN_FLIGHT_OPTIMIZER_ARGS, OPTIMIZER_ARGS
from pbt_lab.names import (
    CAPPED,
    EXPLOIT,
    EXPLOIT_RESTORE,
    EXPLOITED,
    FRESH_SLOTS_DIGEST,
    LEGACY_DIGEST_LENGTH,
    LEGACY_RESTORED_LR,
    LR,
    LR_USED,
    MISMATCHED,
    NODE_ID,
    OPTIMIZER,
    OPTIMIZER_STEPS,
    REACHED,
    REPORTED_AT,
    RESTORE_KIND,
    RESTORED_DIGEST,
    RESTORED_ID,
    RESTORED_OPTIMIZER,
    RESTORED_OPTIMIZER_STEPS,
    RESTORED_SLOTS_DIGEST,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOTS_DIGEST,
    STATE_DIGEST,
    STATE_ID,
    STEP,
    STOPPED,
    TRIAL_ID,
    UNVERIFIABLE,
    USED,
    VERDICTS,
    VERIFIED,
)
from pbt_lab.results.ray_files import todays_names

OWN_RESTORE = "own"  # a restore of the trial's own checkpoint in a run from before restore kinds were named
VERDICT_COLUMNS = ["kind", "matched", "verdict", "problem"]


def restore_rows(history: pd.DataFrame) -> pd.DataFrame:
    """The first report after each restore, of any checkpoint (the rows that say what was loaded)."""
    if RESTORED_DIGEST not in history:
        return history.iloc[:0]
    return history[history[RESTORED_DIGEST].notna()]


def exploit_rows(history: pd.DataFrame) -> pd.DataFrame:
    """The first report after each restore of another member's checkpoint: one per exploit."""
    return history[history[SEGMENT_FROM].notna() & (history[SEGMENT_FROM] != history[TRIAL_ID])]


def _same_lr(a, b) -> bool:
    known = all(v is not None and not pd.isna(v) for v in (a, b))
    return known and math.isclose(a, b, rel_tol=1e-6)


def _same_value(used, expected) -> bool:
    """A value the traced call read (float32 for reals) against the config's."""
    if used is None or expected is None or pd.isna(used):
        return used is expected or (expected is None and pd.isna(used))
    if isinstance(expected, str) or isinstance(used, str):
        return used == expected
    return math.isclose(float(used), float(expected), rel_tol=1e-6)


def _used_keys(d: dict | None, r: pd.Series) -> list[tuple[str, object]]:
    """The searched keys beyond the optimizer and rate an exploit set, with their new values, that the
    recipient's live objects read: its optimizer's own arguments only where the new optimizer has them."""
    if d is None:
        return []
    new = d.get("new") or {}
    reads = OPTIMIZER_ARGS.get(new.get(OPTIMIZER, r[OPTIMIZER]), ())
    return [
        (key, value)
        for key, value in new.items()
        if key not in (OPTIMIZER, LR) and (key not in IN_FLIGHT_OPTIMIZER_ARGS or key in reads)
    ]


def _legacy(digest) -> bool:
    """Whether a digest is an older run's SHA-256 (64 hex digits; today's xxh3_128 has 32)."""
    return isinstance(digest, str) and len(digest) == LEGACY_DIGEST_LENGTH


def restore_kind(row: pd.Series) -> str:
    """Why the row's restore happened (the driver's name for it; inferred for older runs)."""
    kind = row.get(RESTORE_KIND)
    if isinstance(kind, str):
        return kind
    return EXPLOIT_RESTORE if row[SEGMENT_FROM] != row[TRIAL_ID] else OWN_RESTORE


def exploited_decisions(decisions: list[dict]) -> dict[int, dict]:
    return {d["decision"]: d for d in decisions if d.get("action") == EXPLOITED}


def audit(restores: pd.DataFrame, saves: pd.DataFrame, decisions: list[dict] | None) -> pd.DataFrame:
    """One verdict per restore (index of ``restores``): its ``kind``, ``matched`` (an exploit: the
    scheduler decided it, this recipient, this donor's checkpoint, this new optimizer and rate (and every
    other searched key live: ``_used_keys``); a
    restore of one's own checkpoint needs no decision, nor an exploit where the scheduler keeps no
    record, ``decisions`` None: Ray's PB2), and ``verdict``: verified, mismatched (with the
    ``problem``) or unverifiable (the saver never reported the state, or an exploit's first check
    did not report the rate it used).

    Verified means: the state loaded is the one the decision meant (an exploit: same state id), its
    digest equals the saver's report of that state, the rate the first check used is the config's
    (where it trained), and the optimizer's slots and step counter are the saver's (same optimizer)
    or a newly built optimizer's (an exploit that switched). A decision that recorded no donor state
    meant none.
    """
    decided = exploited_decisions(decisions or [])
    reported = saves.drop_duplicates(STATE_ID).set_index(STATE_ID) if len(saves) else pd.DataFrame()
    rows = []
    for index, r in restores.iterrows():
        kind = restore_kind(r)
        exploit = r[SEGMENT_FROM] != r[TRIAL_ID]
        d = decided.get(int(r[EXPLOIT])) if exploit and pd.notna(r[EXPLOIT]) else None
        matched = (
            not exploit
            or decisions is None
            or (
                d is not None
                and d["member"] == r[TRIAL_ID]
                and d["donor"] == r[SEGMENT_FROM]
                and d["new"][OPTIMIZER] == r[OPTIMIZER]
                and _same_lr(d["new"][LR], r[LR])
            )
        )
        saved = reported.loc[r[RESTORED_ID]] if r[RESTORED_ID] in reported.index else None
        # Runs before lr_used reported the rate a restore had assigned (read back; weaker, but theirs).
        legacy = pd.isna(r.get(LR_USED))
        rate = r.get(LEGACY_RESTORED_LR) if legacy else r.get(LR_USED)
        trained = pd.notna(rate)
        if saved is None:
            verdict, problem = UNVERIFIABLE, "its saver never reported the state"
        elif _legacy(saved[STATE_DIGEST]) != _legacy(r[RESTORED_DIGEST]):  # a run resumed across the change
            verdict, problem = UNVERIFIABLE, "saved and loaded under different digests"
        elif exploit and not trained:
            verdict, problem = UNVERIFIABLE, "its first check did not report the rate it used"
        else:
            problem = _problem(r, saved, d, exploit, rate if trained else None, legacy)
            verdict = MISMATCHED if problem else VERIFIED
        rows.append(
            {"index": index, "kind": kind, "matched": matched, "verdict": verdict, "problem": problem}
        )
    return pd.DataFrame(rows, columns=["index", *VERDICT_COLUMNS]).set_index("index")


def _problem(
    r: pd.Series, saved: pd.Series, d: dict | None, exploit: bool, rate: float | None, legacy: bool
) -> str | None:
    """The first way a restore's report differs from its saver's (None: none). ``rate``: the rate its
    first check used (None: it trained nothing); ``legacy``: a row of a run from before lr_used."""
    whose = "the donor" if exploit else "the member"
    same_optimizer = r[RESTORED_OPTIMIZER] == r[OPTIMIZER]
    # Same optimizer: the saver's slots; switched (an exploit): a newly built optimizer's, which the
    # recipient's own optimizer may have moved from before the exploit. Runs from before those digests
    # were reported lack one: their switches keep the step-counter check alone (a run of today's
    # that lacks it fails the check).
    slots = saved[SLOTS_DIGEST] if same_optimizer else r[FRESH_SLOTS_DIGEST]
    if legacy and not same_optimizer and pd.isna(slots):
        slots = r[RESTORED_SLOTS_DIGEST]
    checks = [
        (
            not exploit or d is None or d.get("donor_state_id") == r[RESTORED_ID],
            "not the state the decision meant",
        ),
        (exploit or same_optimizer, "its checkpoint holds another optimizer than its own"),
        (saved[STATE_DIGEST] == r[RESTORED_DIGEST], f"weights differ from what {whose} saved"),
        (
            rate is None or _same_lr(rate, r[LR]),
            "live rate is not the new config's" if exploit else "live rate is not its config's",
        ),
        *(
            (rate is None or _same_value(r.get(key + USED), value), f"live {key} is not the new config's")
            for key, value in _used_keys(d, r)
        ),
        (
            r[RESTORED_SLOTS_DIGEST] == slots,
            f"optimizer slots differ from what {whose} saved"
            if same_optimizer
            else "optimizer slots are not fresh",
        ),
        (
            r[RESTORED_OPTIMIZER_STEPS] == (saved[OPTIMIZER_STEPS] if same_optimizer else 0),
            f"optimizer step counter is neither {whose}'s nor fresh",
        ),
    ]
    return next((why for ok, why in checks if not ok), None)


RESTORE_COLUMNS = [TRIAL_ID, "kind", STEP, "source", RESTORED_ID, "decision", "matched", "verdict", "problem"]


def restore_table(restores: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """``restores.parquet``: one row per restore, in the order reported: who restored whose checkpoint
    (``source``) of which step, why (``kind``), and the audit's verdict."""
    table = pd.DataFrame(
        {
            TRIAL_ID: restores[TRIAL_ID],
            STEP: restores[SEGMENT_STEP],
            "source": restores[SEGMENT_FROM],
            RESTORED_ID: restores[RESTORED_ID],
            "decision": restores[EXPLOIT],
            **{c: restores[c] for c in ("iteration", REPORTED_AT, NODE_ID, "pid")},
        }
    ).join(verdicts)
    return table[[*RESTORE_COLUMNS, "iteration", REPORTED_AT, NODE_ID, "pid"]].reset_index(drop=True)


def undone_exploits(decisions: list[dict], exploits: pd.DataFrame, statuses: dict[str, str]) -> list[dict]:
    """Exploits decided and never carried out, each with why and whether the run's end explains it:
    the population was stopped (or the member's budget ended) before the member trained again, or the
    run was killed and resumed from a snapshot of its trials from before the decision. A
    member that reported again without carrying out its exploit (the scheduler records it), or a run
    that ended otherwise (interrupted, failed), leaves it unexplained."""
    carried = set(exploits[EXPLOIT].dropna().astype(int)) if len(exploits) else set()
    undone = []
    for number, d in exploited_decisions(decisions).items():
        if number in carried:
            continue
        status = statuses.get(d["member"])
        if d.get("interrupted"):
            why, explained = "the run was killed before the snapshot it resumed from held it", True
        elif d.get("carried_out") is False:
            why, explained = "its member reported again without carrying it out", False
        elif status == STOPPED:
            why, explained = "the population was stopped first", True
        elif status in (REACHED, CAPPED):
            why, explained = "its member's budget ended first", True
        else:
            why, explained = f"the run ended first, its member {status}", False
        undone.append({"decision": number, "member": d["member"], "why": why, "explained": explained})
    return undone


def restore_counts(verdicts: pd.DataFrame) -> dict:
    """Restores by kind, each kind's verdicts counted, and the problems found."""
    by_kind = {
        kind: {v: int((group["verdict"] == v).sum()) for v in VERDICTS}
        for kind, group in verdicts.groupby("kind", sort=True)
    }
    return {
        "count": len(verdicts),
        "by_kind": by_kind,
        **{v: int((verdicts["verdict"] == v).sum()) for v in VERDICTS},
        "unmatched": int((~verdicts["matched"].astype(bool)).sum()),
        "problems": sorted({p for p in verdicts["problem"].dropna()}),
    }


def exploit_counts(verdicts: pd.DataFrame, decisions: list[dict], undone: list[dict]) -> dict:
    """What summary.json reports of the exploits (``verdicts`` of the exploit restores only): the counts
    add up to ``exploits`` twice (matched + unmatched, and verified + mismatched + unverifiable), and
    decided = carried out + not carried out."""
    return {
        "exploits": len(verdicts),
        "exploits_matched": int(verdicts["matched"].sum()),
        "exploits_unmatched": int((~verdicts["matched"].astype(bool)).sum()),
        **{f"exploits_{v}": int((verdicts["verdict"] == v).sum()) for v in VERDICTS},
        "exploits_decided": len(exploited_decisions(decisions)),
        "exploits_not_carried_out": len(undone),
        "not_carried_out": undone,
        "problems": sorted({p for p in verdicts["problem"].dropna()}),
    }


def audit_failures(summary: dict) -> list[str]:
    """Why a run fails its audit, one line each (none: it passes). Mismatched or unmatched restores
    always fail it; unverifiable ones and exploits left undone without an explanation fail it unless
    the run allowed unverified restores."""
    restores, exploits = summary.get("restores") or {}, summary.get("exploits") or {}
    allowed = bool(restores.get("allow_unverified"))
    lines = []
    for kind, counts in sorted((restores.get("by_kind") or {}).items()):
        for verdict in (MISMATCHED, UNVERIFIABLE):
            if counts.get(verdict) and (verdict == MISMATCHED or not allowed):
                lines.append(f"{counts[verdict]} {kind} restore(s) {verdict}")
    if restores.get("unmatched"):
        lines.append(f"{restores['unmatched']} exploit(s) that no decision explains")
    if not allowed:
        lines += [
            f"exploit decision {u['decision']} ({u['member']}) never carried out: {u['why']}"
            for u in exploits.get("not_carried_out", [])
            if not u["explained"]
        ]
    return lines


def audit_digests(
    reports: dict[str, list[dict]], decisions: list[dict], more_reports: dict[str, list[dict]] | None = None
) -> pd.DataFrame:
    """Every restore of a run of another trainable that reports ``tuning/audited.py``'s records (its first
    report after a restore carries ``restored_id``): one row with the trial, the saver, ``kind`` (exploit:
    another trial's checkpoint), ``matched`` (an exploit: LabPBT decided this member copies this donor's
    state, read from the decision number its config carries) and ``verdict``: verified when the digest of
    what it loaded equals what the saver reported under that state id, mismatched when it differs,
    unverifiable when no saver reported the id. ``more_reports``: other records of the savers' reports
    (Ray's ``progress.csv``, which keeps rows a function trainable's ``result.json`` can lose). An exploit
    whose first report LabPBT kept (its decision's ``restored``) is audited from there where the trial's
    reports lack it; one whose member loaded another state than decided fails (``matched`` false)."""
    rows = [r for trial in reports.values() for r in trial]
    saves = rows + [r for trial in (more_reports or {}).values() for r in trial]
    saved = {r[STATE_ID]: r.get(STATE_DIGEST) for r in saves if r.get(STATE_ID)}
    decided = exploited_decisions(decisions)
    out, seen = [], set()

    def restore_row(trial, restored: dict, iteration, d: dict | None, exploit: bool) -> dict:
        expected = saved.get(restored.get(RESTORED_ID))
        verdict = (
            UNVERIFIABLE
            if expected is None
            else VERIFIED
            if expected == restored[RESTORED_DIGEST]
            else MISMATCHED
        )
        source = restored.get(SEGMENT_FROM)
        matched = not exploit or (
            d is not None
            and d["member"] == trial
            and d["donor"] == source
            and d.get("donor_state_id") in (None, restored.get(RESTORED_ID))
        )
        return {
            TRIAL_ID: trial,
            "source": source,
            RESTORED_ID: restored.get(RESTORED_ID),
            "iteration": int(iteration) if iteration is not None else None,
            "kind": EXPLOIT_RESTORE if exploit else OWN_RESTORE,
            "matched": matched,
            "verdict": verdict,
        }

    restores = [r for r in rows if r.get(RESTORED_DIGEST) is not None]
    iterations = {(r.get(TRIAL_ID), r.get(RESTORED_ID)): r.get("training_iteration") for r in restores}
    for d in decided.values():  # the scheduler's copy of each exploit's first report: never lost
        restored = todays_names(d.get("restored") or {})  # (an older pbt_state.json: restored_sha256)
        if restored.get(RESTORED_DIGEST):
            key = (d["member"], restored.get(RESTORED_ID))
            seen.add(key)
            out.append(restore_row(d["member"], restored, iterations.get(key), d, exploit=True))
    for r in restores:
        trial, source = r.get(TRIAL_ID), r.get(SEGMENT_FROM)
        if (trial, r.get(RESTORED_ID)) in seen:
            continue
        exploit = source is not None and source != trial
        number = (r.get("config") or {}).get(EXPLOIT)
        d = decided.get(int(number)) if exploit and number is not None else None
        out.append(restore_row(trial, r, r.get("training_iteration"), d, exploit))
    return pd.DataFrame(
        out, columns=[TRIAL_ID, "source", RESTORED_ID, "iteration", "kind", "matched", "verdict"]
    )


def digest_audit_lines(restores: pd.DataFrame) -> tuple[list[str], bool]:
    """The console's lines for ``audit_digests``' table, and whether every restore passed (verified, and
    every exploit matched to a decision)."""
    kinds = ", ".join(f"{n} {k}" for k, n in restores["kind"].value_counts().sort_index().items())
    verdicts = ", ".join(f"{n} {v}" for v, n in restores["verdict"].value_counts().sort_index().items())
    lines = [f"restores: {len(restores)} ({kinds or 'none'}): {verdicts or 'none to audit'}"]
    failed = restores[(restores["verdict"] != VERIFIED) | ~restores["matched"].astype(bool)]
    for _, r in failed.iterrows():
        why = r["verdict"] if r["verdict"] != VERIFIED else "not the state a LabPBT decision meant"
        lines.append(
            f"{r['verdict'].upper()}: {r[TRIAL_ID]} at iteration {r['iteration']} restored {r['source']}'s "
            f"state {r[RESTORED_ID]}: {why}"
        )
    return lines, failed.empty
