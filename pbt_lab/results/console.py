"""What a finished run prints, and the exit code it ends with."""

from __future__ import annotations

from pathlib import Path

from pbt_lab.names import (
    DIVERGED,
    ERROR,
    FIGURES,
    HISTORY,
    LR,
    MODEL_OPTIONS,
    OPTIMIZER,
    REACHED,
    RECIPE,
    SECONDS_TO_TARGET,
    SLOT_IDLE,
    STALLED,
    STATUS,
    STEP,
    STEPS_TO_TARGET,
    SUMMARY,
    TEST_ACC,
    TRAIN_SECONDS,
    TRIAL_ID,
    TRIALS,
    VAL_LOSS,
    VERDICTS,
    VERIFIED,
)
from pbt_lab.results.audit import audit_failures
from pbt_lab.results.breakdown import breakdown_table
from pbt_lab.storage import join

# Of the slot-seconds: healthy runs leave 0.2–2 % idle (README), a population on one of two slots 50 %.
IDLE_WARNING = 0.10


def recipe_text(best: dict) -> str:
    """The searched keys beyond the optimizer and rate that the best trial ended with: `` (weight_decay
    2.1e-05, dropout 0.135, batch_size 127)``; empty where nothing else was searched."""
    recipe = ((best.get("schedule") or [{}])[-1].get(RECIPE)) or {}
    named = [
        f"{k.removeprefix(MODEL_OPTIONS + '.')} {v:.3g}"
        if isinstance(v, float)
        else f"{k.removeprefix(MODEL_OPTIONS + '.')} {v}"
        for k, v in recipe.items()
        if k not in (OPTIMIZER, LR)
    ]
    return f" ({', '.join(named)})" if named else ""


def console_summary(tables: dict, run_dir: Path) -> str:
    """The end-of-run table per optimizer, and where the files are."""
    s = tables["summary"]
    lines = [
        f"\n{OPTIMIZER:10} {'best rates (within a check)':28} {'steps':>6} {'seconds':>8}  "
        f"{'band (reached target)':22} {REACHED:>8} {DIVERGED:>8} {STALLED:>7}"
    ]
    for name, o in s["optimizers"].items():
        best, band = (
            (f"{o[key][0]:.3g} – {o[key][1]:.3g}" if o[key][0] != o[key][1] else f"{o[key][0]:.3g}")
            if o.get(key)
            else "none"
            for key in ("best_band", "band")
        )
        steps, seconds = (
            format(v, f) if v is not None else "–"
            for v, f in ((o[STEPS_TO_TARGET], "d"), (o[SECONDS_TO_TARGET], ".2f"))
        )
        lines.append(
            f"{name:10} {best:28} {steps:>6} {seconds:>8}  {band:22} "
            f"{o[REACHED]:>4}/{o['trials']:<3} {o[DIVERGED]:>8} {o.get(STALLED, 0):>7}"
        )
    c = s["compute"]
    lines.append(
        f"\n{c['trials']} trials, {c['steps']:,} steps, {c[TRAIN_SECONDS]:.0f} s training in "
        f"{c['trial_seconds']:.0f} trial-seconds"
        + (f", {c['wall_seconds']:.0f} s wall" if c["wall_seconds"] else "")
    )
    saved = [
        f"{c[f'{status}_trials']} {status} (about {c[f'{saving}_saved_train_seconds_estimate']:.0f} s saved)"
        for status, saving in ((DIVERGED, "divergence"), (STALLED, "stall"))
        if c.get(f"{status}_trials")
    ]
    if saved:
        lines.append("stopped early: " + ", ".join(saved))
    breakdown = s.get("time_breakdown")
    if breakdown:
        lines.append(time_line(breakdown))
        lines += [line for line in [overhead_line(breakdown)] if line]
        lines += [f"TIME: {problem}" for problem in breakdown["problems"]]
        lines += [line for line in [idle_line(breakdown)] if line]
    best = s.get("best") or {}
    if best.get(TRIAL_ID):
        test = (
            f", test accuracy {best[TEST_ACC]:.4f} (held out, evaluated once)"
            if best.get(TEST_ACC) is not None
            else ""
        )
        ranked = ((s.get("config") or {}).get("pbt") or {}).get("metric")
        loss = (s.get("winner") or {}).get(VAL_LOSS)
        by_loss = f", validation loss {loss:.4f}" if ranked == VAL_LOSS and loss is not None else ""
        lines.append(
            f"{'winner' if s.get('kind') == 'pbt' else 'best'} {best['trial_id']}: {best[OPTIMIZER]} at lr "
            f"{best[LR]:.3g}{recipe_text(best)}, "
            f"validation accuracy {best['final_val_acc'] or float('nan'):.4f}{by_loss}{test}"
        )
    if "exploits" in s:
        e = s["exploits"]
        lines.append(
            f"exploits: {e['exploits']} carried out of {e['exploits_decided']} decided, "
            f"{e['exploits_matched']} matched to a decision, {e['exploits_verified']} verified, "
            f"{e['exploits_mismatched']} mismatched, {e['exploits_unverifiable']} unverifiable; "
            f"checkpoints kept: {s['checkpoints']['count']} ({s['checkpoints']['bytes'] / 1e6:.1f} MB)"
        )
    if s.get("ranking"):
        lines.append(ranking_line(s["ranking"]))
    lines += restore_lines(s.get("restores"), tables.get("restores"))
    lines += [f"AUDIT: {line}" for line in audit_failures(s)]
    if s.get("incomplete"):
        lines.append(f"INCOMPLETE: {s['incomplete']}")
    failed = tables["trials"][tables["trials"][STATUS] == ERROR]
    for _, t in failed.iterrows():
        lines.append(f"FAILED {t['trial_id']} ({t[OPTIMIZER]}, lr {t[LR]:.3g}): {t[ERROR]}")
    lines.append(f"tables:  {join(run_dir, f'{{{TRIALS}, {HISTORY}, {SUMMARY}}}')}")
    lines.append(f"figures: {join(run_dir, FIGURES + '/')}")
    lines.append(f"tensorboard --logdir {run_dir}")
    return "\n".join(lines)


def restore_lines(counts: dict | None, restores) -> list[str]:
    """The restores by kind and verdict in one line, then each mismatched or unverifiable one named
    (the first few of each problem)."""
    if not counts or not counts["count"]:
        return []
    kinds = ", ".join(f"{sum(v.values())} {kind}" for kind, v in counts["by_kind"].items())
    verdicts = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    allowed = " (run.allow_unverified: unverifiable ones pass)" if counts["allow_unverified"] else ""
    lines = [f"restores: {counts['count']} ({kinds}): {verdicts}{allowed}"]
    failed = restores[restores["verdict"] != VERIFIED] if restores is not None else restores
    for (verdict, problem), group in [] if failed is None else failed.groupby(["verdict", "problem"]):
        named = ", ".join(f"{r[TRIAL_ID]} ({r['kind']}, step {r[STEP]})" for _, r in group.head(3).iterrows())
        more = f" and {len(group) - 3} more" if len(group) > 3 else ""
        lines.append(f"{verdict.upper()}: {problem}: {named}{more} (restores.parquet)")
    return lines


def _allowed(counts: dict) -> str:
    return (
        " (run.allow_unverified: unverifiable restores do not fail the run)"
        if counts["allow_unverified"]
        else ""
    )


def time_line(breakdown: dict) -> str:
    """The time breakdown in one line: each part's share of the slot-seconds, largest first."""
    shown = ", ".join(
        f"{name} {share:.1%}" for name, _, share in breakdown_table(breakdown) if abs(share) >= 0.001
    )
    return (
        f"time: {breakdown['slots']} slots × {breakdown['wall_seconds']:.0f} s wall = "
        f"{breakdown['slot_seconds']:.0f} slot-seconds: {shown}"
    )


def ranking_line(r: dict) -> str:
    """``ranking: on 1,000 validation examples (of 1,000): ± 0.35 pt at accuracy 0.988; validation 5.7 %
    of the slot-seconds`` (± one standard error)."""
    share = f"; validation {r['share']:.1%} of the slot-seconds" if r.get("share") is not None else ""
    return (
        f"ranking: on {r['examples']:,} validation examples (of {r['whole_split']:,}): "
        f"± {100 * r['standard_error']:.2f} pt at accuracy {r['accuracy']:.3f}{share}"
    )


def overhead_line(breakdown: dict) -> str | None:
    """Work (training, compiling, validating) against overhead, and the overhead's fixed and per-turn
    parts: ``overhead 15.7% (work 84.3%: …): fixed 12.3 s (…); a turn 77 ms, an exploit's 90 ms (…); a
    check's 12 ms`` (outside work, where no restore came before it)."""
    if "work_share" not in breakdown:  # a run written before these figures
        return None
    turn, exploit = breakdown["turn_seconds_median"], breakdown["exploit_gap_seconds_median"]
    turns = [f"a turn {turn * 1e3:.0f} ms"] if turn is not None else []
    turns += [f"an exploit's {exploit * 1e3:.0f} ms"] if exploit is not None else []
    per_turn = f"; {', '.join(turns)} (medians of {breakdown['turns']} turns)" if turns else ""
    check = breakdown.get("check_overhead_seconds_median")  # (a run written before it: none)
    per_turn += f"; a check's {check * 1e3:.0f} ms" if check is not None else ""
    return (
        f"overhead {breakdown['overhead_share']:.1%} (work {breakdown['work_share']:.1%}: train, compile, "
        f"validate): fixed {breakdown['fixed_seconds']:.1f} s (workers' start, first compiles){per_turn}"
    )


def idle_line(breakdown: dict) -> str | None:
    """One line when the slots had no live worker for more than ``IDLE_WARNING`` of the slot-seconds."""
    share = breakdown.get("shares", {}).get(SLOT_IDLE, 0.0)
    if share <= IDLE_WARNING:
        return None
    workers = breakdown["actors"]
    return (
        f"IDLE: the {breakdown['slots']} slots had no live worker for {share:.1%} of the slot-seconds; "
        f"{workers} worker{'s' if workers != 1 else ''} trained (summary.json: time_breakdown)"
    )


def exit_status(tables: dict) -> int:
    """A run's exit code: 1 when a trial failed or the restores failed the audit (the console names
    them: ``audit_failures``), else 0."""
    return int((tables["trials"][STATUS] == ERROR).any() or bool(audit_failures(tables["summary"])))
