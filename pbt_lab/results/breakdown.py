"""Where a run's slot-seconds went: the parts its actors measured (``training/clock.py``), summed
over every report, and the seconds its slots had no live actor, against wall time × slots.

    breakdown = time_breakdown(reports, started_at=…, wall_seconds=…, slots=2)
    breakdown["parts"]["train"] / breakdown["slot_seconds"]     # Tune efficiency
    check_breakdown(breakdown)                                    # [] or what does not add up

The parts are measured independently of the wall clock the slot-seconds come from: the actors'
clocks tile each actor's life from its process's start (or the run's, if later) to its last
report, and ``slot_idle`` is the time, per slot, with no actor in that span. So they add up to the
slot-seconds only if every second was counted once: more actors alive than slots, a part counted
twice or a report lost shows as a gap (``unaccounted``), which ``check_breakdown`` holds to 5 %.
Since the clocks tile each actor's life by construction, that check guards the reports' way to the
driver, not how the clock splits a second; the tests hold the split to independent timers (the
Trainer's own training seconds, Ray's time_this_iter_s).
"""

from __future__ import annotations

import pandas as pd

from pbt_lab.names import (
    ACTOR_BORN_AT,
    ACTOR_START,
    CHECK_STARTED_AT,
    COMPILE,
    DIVERGED_FLAG,
    NODE_ID,
    REPORTED_AT,
    SECONDS_BY_PART,
    SEGMENT_FROM,
    SEGMENT_STEP,
    SLOT_IDLE,
    TIME_PARTS,
    TRAIN_PART,
    TRIAL_ID,
    WORK_PARTS,
)

TOLERANCE = 0.05  # of the slot-seconds: what "adds up" allows for clocks read a few calls apart


def time_breakdown(
    reports: dict[str, list[dict]], *, started_at: float | None, wall_seconds: float | None, slots: int | None
) -> dict | None:
    """The run's breakdown (None for a run that did not record its session, or reported no parts).

    Counts the reports made since ``started_at`` (a resumed run: its last session), repeats included:
    a check re-run after a restart was paid for twice."""
    if not (started_at and wall_seconds and slots):
        return None
    ended_at = started_at + wall_seconds
    rows = [
        r
        for trial in reports.values()
        for r in trial
        if r.get(SECONDS_BY_PART) and r[REPORTED_AT] >= started_at
    ]
    if not rows:
        return None
    parts = dict.fromkeys(TIME_PARTS, 0.0)
    members: dict[str, dict[str, float]] = {}
    born, last, first_member = {}, {}, {}  # per actor
    for r in rows:
        member = members.setdefault(r[TRIAL_ID], dict.fromkeys(TIME_PARTS, 0.0))
        for name, seconds in r[SECONDS_BY_PART].items():
            parts[name] += seconds
            member[name] += seconds
        actor = (r[NODE_ID], r["pid"])  # a worker: its node, and its process (Ray adds pid to every report)
        born[actor] = r[ACTOR_BORN_AT]
        last[actor] = max(last.get(actor, 0.0), r[REPORTED_AT])
        first_member.setdefault(actor, r[TRIAL_ID])
    for actor, birth in born.items():
        if birth < started_at:
            # A process Ray started before the run (its worker pool): its time until then is not the run's.
            parts[ACTOR_START] -= started_at - birth
            members[first_member[actor]][ACTOR_START] -= started_at - birth
    lives = [(max(birth, started_at), last[actor]) for actor, birth in born.items()]
    parts[SLOT_IDLE] = idle_slot_seconds(lives, started_at, ended_at, slots)
    slot_seconds = wall_seconds * slots
    measured = sum(parts.values())
    work = sum(parts[name] for name in WORK_PARTS)
    return {
        "slots": slots,
        "wall_seconds": wall_seconds,
        "slot_seconds": slot_seconds,
        "parts": parts,
        "shares": {name: seconds / slot_seconds for name, seconds in parts.items()},
        "unaccounted": slot_seconds - measured,
        "efficiency": parts[TRAIN_PART] / slot_seconds,
        # What the run is for (training, compiling its calls, validating and testing) against the rest.
        "work_share": work / slot_seconds,
        "overhead_share": 1 - work / slot_seconds,
        "fixed_seconds": fixed_seconds(rows, started_at),
        **turn_seconds(pd.DataFrame(rows)),
        "check_overhead_seconds_median": check_overhead_seconds(rows),
        "actors": len(lives),
        "members": members,
    }


def fixed_seconds(rows: list[dict], started_at: float) -> float:
    """What a run pays once per worker whatever its length: each worker's start (its process,
    TensorFlow's import, the model's build) and the compiles of its first report."""
    first: dict = {}
    for r in sorted(rows, key=lambda r: r[REPORTED_AT]):
        first.setdefault((r[NODE_ID], r["pid"]), r)
    return sum(
        r[SECONDS_BY_PART].get(ACTOR_START, 0.0)
        - max(0.0, started_at - r[ACTOR_BORN_AT])  # (a process Ray started before the run)
        + r[SECONDS_BY_PART].get(COMPILE, 0.0)
        for r in first.values()
    )


def worker_gaps(rows: pd.DataFrame) -> pd.DataFrame:
    """Per check: the seconds its worker sat between its previous report (any trial) and this
    check's start: Tune's share of the slot (and the compiling of an optimizer the worker meets
    for the first time). NaN for a worker's first check. ``own``: the check resumes its own trial."""
    h = rows.dropna(subset=[CHECK_STARTED_AT]).sort_values(CHECK_STARTED_AT).copy()
    worker = [NODE_ID, "pid"] if NODE_ID in h else ["pid"]
    h["gap"] = h[CHECK_STARTED_AT] - h.groupby(worker)[REPORTED_AT].shift()
    h["own"] = h[SEGMENT_FROM] == h[TRIAL_ID]
    return h


def turn_seconds(rows: pd.DataFrame) -> dict:
    """The median hand-over on a worker: from a report to the next check that resumes a member from a
    checkpoint (PBT's turns, its own or, for an exploit, a donor's), in seconds; NaN-free medians or
    None where the run had none."""
    if not {CHECK_STARTED_AT, SEGMENT_FROM, SEGMENT_STEP} <= set(rows.columns):
        return {"turns": 0, "turn_seconds_median": None, "exploit_gap_seconds_median": None}
    h = worker_gaps(rows)
    resumed = h["gap"].notna() & (h[SEGMENT_STEP] > 0)
    turns, exploits = h.loc[resumed & h["own"], "gap"], h.loc[resumed & ~h["own"], "gap"]
    return {
        "turns": int(resumed.sum()),
        "turn_seconds_median": float(turns.median()) if len(turns) else None,
        "exploit_gap_seconds_median": float(exploits.median()) if len(exploits) else None,
    }


def check_overhead_seconds(rows: list[dict]) -> float | None:
    """The median seconds outside work of an ordinary check (no restore before it on its worker): Ray's
    calls around it and the digests of its report. A PBT member pays it every check, a turn only at
    the end of an interval (``overhead_forecast``)."""
    spent = [
        sum(s for name, s in r[SECONDS_BY_PART].items() if name not in WORK_PARTS)
        for r in rows
        if r.get(SEGMENT_FROM) is None and not r.get(DIVERGED_FLAG)  # (a diverged member waits: no check)
    ]
    return float(pd.Series(spent).median()) if spent else None


def overhead_forecast(
    turn_seconds: float, check_seconds: float, steps_per_check: int, interval_steps: int, step_seconds: float
) -> float:
    """The overhead share of a PBT member's interval where members outnumber slots, so that every interval
    ends in a turn: the turn and each check's overhead against the interval's training (validation,
    PBT's own work, left out)."""
    overhead = turn_seconds + interval_steps / steps_per_check * check_seconds
    return overhead / (interval_steps * step_seconds + overhead)


FORECAST_INTERVALS = (50, 100, 200, 500, 1000)  # steps between PBT's decisions
FORECAST_STEP_MS = (1, 5, 20)  # a small CNN's step on a modern GPU, a T4, a K80


def forecast_table(turn_seconds: float | None, check_seconds: float | None, steps_per_check: int) -> dict:
    """``overhead_forecast`` for each interval (steps) and step time (ms): {interval: {ms: share}}
    (empty where the run measured no turn or check)."""
    if not all(isinstance(v, int | float) for v in (turn_seconds, check_seconds)):
        return {}  # none measured (or repeats that disagreed on whether there was one)
    return {
        interval: {
            ms: overhead_forecast(turn_seconds, check_seconds, steps_per_check, interval, ms / 1e3)
            for ms in FORECAST_STEP_MS
        }
        for interval in FORECAST_INTERVALS
    }


def forecast_lines(table: dict) -> list[str]:
    """The forecast as the console prints it: a row per interval, a column per step time."""
    if not table:
        return []
    lines = ["overhead forecast: interval (steps) " + "".join(f"{ms:>9} ms" for ms in FORECAST_STEP_MS)]
    for interval, shares in table.items():
        lines.append(f"{interval:>34,} " + "".join(f"{shares[ms]:>12.1%}" for ms in FORECAST_STEP_MS))
    return lines


def idle_slot_seconds(
    lives: list[tuple[float, float]], started_at: float, ended_at: float, slots: int
) -> float:
    """∫ max(0, slots − actors alive) dt over the run: slot time with no live actor."""
    edges = sorted(
        [(max(a, started_at), 1) for a, b in lives if b > a]
        + [(min(b, ended_at), -1) for a, b in lives if b > a]
        + [(started_at, 0), (ended_at, 0)]
    )
    idle, alive, last = 0.0, 0, started_at
    for t, change in edges:
        idle += max(0, slots - alive) * max(0.0, t - last)
        alive, last = alive + change, max(last, t)
    return idle


def check_breakdown(breakdown: dict) -> list[str]:
    """What does not add up: the parts against the slot-seconds (within 5 %), and no part negative."""
    problems = []
    gap = breakdown["unaccounted"] / breakdown["slot_seconds"]
    if abs(gap) > TOLERANCE:
        problems.append(
            f"the parts add up to {1 - gap:.1%} of the slot-seconds ({breakdown['slot_seconds']:.1f} s): "
            + (
                "a part counted twice, or more actors alive than slots"
                if gap < 0
                else "seconds went uncounted"
            )
        )
    problems += [
        f"part {name} is negative ({s:.2f} s)" for name, s in breakdown["parts"].items() if s < -0.01
    ]
    return problems


def breakdown_table(breakdown: dict) -> list[tuple[str, float, float]]:
    """(part, seconds, share of the slot-seconds) rows, largest first, for the console."""
    rows = sorted(breakdown["parts"].items(), key=lambda kv: -kv[1])
    return [(name, s, s / breakdown["slot_seconds"]) for name, s in rows] + [
        ("unaccounted", breakdown["unaccounted"], breakdown["unaccounted"] / breakdown["slot_seconds"])
    ]
