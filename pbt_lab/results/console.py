"""What a finished run prints, and the exit code it ends with."""

from __future__ import annotations

from pathlib import Path

from pbt_lab.names import (
    DIVERGED,
    ERROR,
    FIGURES,
    HISTORY,
    LR,
    OPTIMIZER,
    REACHED,
    SECONDS_TO_TARGET,
    STALLED,
    STATUS,
    STEPS_TO_TARGET,
    SUMMARY,
    TEST_ACC,
    TRAIN_SECONDS,
    TRIAL_ID,
    TRIALS,
)
from pbt_lab.results.breakdown import breakdown_table


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
        lines += [f"TIME: {problem}" for problem in breakdown["problems"]]
    best = s.get("best") or {}
    if best.get(TRIAL_ID):
        test = (
            f", test accuracy {best[TEST_ACC]:.4f} (held out, evaluated once)"
            if best.get(TEST_ACC) is not None
            else ""
        )
        lines.append(
            f"{'winner' if s.get('kind') == 'pbt' else 'best'} {best['trial_id']}: {best[OPTIMIZER]} at lr "
            f"{best[LR]:.3g}, validation accuracy {best['final_val_acc'] or float('nan'):.4f}{test}"
        )
    if "exploits" in s:
        e = s["exploits"]
        lines.append(
            f"exploits: {e['exploits']} carried out, {e['exploits_matched']} matched to a decision, "
            f"{e['exploits_verified']} verified, {e['exploits_mismatched']} mismatched, "
            f"{e['exploits_unverifiable']} unverifiable; checkpoints kept: {s['checkpoints']['count']} "
            f"({s['checkpoints']['bytes'] / 1e6:.1f} MB)"
        )
        for problem in e["problems"]:
            lines.append(f"AUDIT: an exploit's {problem}: see lineage.parquet (verdict, problem)")
    failed = tables["trials"][tables["trials"][STATUS] == ERROR]
    for _, t in failed.iterrows():
        lines.append(f"FAILED {t['trial_id']} ({t[OPTIMIZER]}, lr {t[LR]:.3g}): {t[ERROR]}")
    lines.append(f"tables:  {run_dir}/{{{TRIALS}, {HISTORY}, {SUMMARY}}}")
    lines.append(f"figures: {run_dir}/{FIGURES}/")
    lines.append(f"tensorboard --logdir {run_dir}")
    return "\n".join(lines)


def time_line(breakdown: dict) -> str:
    """The time breakdown in one line: each part's share of the slot-seconds, largest first."""
    shown = ", ".join(
        f"{name} {share:.1%}" for name, _, share in breakdown_table(breakdown) if abs(share) >= 0.001
    )
    return (
        f"time: {breakdown['slots']} slots × {breakdown['wall_seconds']:.0f} s wall = "
        f"{breakdown['slot_seconds']:.0f} slot-seconds: {shown}"
    )


def exit_status(tables: dict) -> int:
    """A run's exit code: 1 when a trial failed or an exploit failed the audit (the console names
    them), else 0."""
    audit = tables["summary"].get("exploits", {})
    return int(
        (tables["trials"][STATUS] == ERROR).any()
        or audit.get("exploits_mismatched", 0) > 0
        or audit.get("exploits_unmatched", 0) > 0
    )
