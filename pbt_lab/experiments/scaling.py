"""The width study: steps and seconds to the target as the network widens, and whether the best rate moves.

    python -m pbt_lab.scaling --config configs/scaling-quick.yaml
    python -m pbt_lab.scaling --config configs/scaling.yaml --set scaling.mode=resweep

Trains every width × optimizer × rate (a grid over ``model.scale`` × rate; ``model.scale`` is the
1× width). ``scaling.mode: fixed`` runs the study's few rates at every width; ``resweep`` re-runs
a learning-rate grid at every width, to answer "does the best rate at 1× still win at 10×?"
(μP predicts it shifts under standard parameterisation; the study saw it hold). ``summary.json``
gains ``scaling``: the best rate per width and whether it moved, and per rate the fits
steps, seconds = c + k·n (n = weights) with R².
"""

from __future__ import annotations

from ray import tune

from pbt_lab import cli
from pbt_lab.config import ScalingExperiment
from pbt_lab.names import LR, OPTIMIZER, SECONDS_TO_TARGET, STEPS_TO_TARGET
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.trial_config import trial_space


def main(argv: list[str] | None = None, call: cli.Call | None = None) -> int:
    run = cli.parse("scaling", ScalingExperiment, __doc__, argv, call=call)
    cfg = run.cfg
    pairs = [(optimizer, lr) for optimizer, lrs in cfg.scaling.rates().items() for lr in lrs]
    # Rates differ per optimizer, so the grid runs over (optimizer, rate) pairs by index.
    space = trial_space(
        cfg.train,
        cfg.model,
        threads=cfg.resources.threads,
        seed=cfg.train.seed,
        pair=tune.grid_search(list(range(len(pairs)))),
        optimizer=tune.sample_from(lambda spec: pairs[spec.config.pair][0]),
        lr=tune.sample_from(lambda spec: pairs[spec.config.pair][1]),
    )
    space["model"]["scale"] = tune.grid_search([cfg.model.scale * w for w in cfg.scaling.widths])
    with cli.one_line_errors(run):
        fit(run, space)
    return cli.finish(run, describe=lambda tables: scaling_table(tables["summary"]["scaling"]))


def scaling_table(scaling: dict) -> str:
    """The best rate per width and optimizer, and each rate's fit of seconds to target against weights."""
    lines = [
        f"\n{OPTIMIZER:10} {'width':>6} {'weights':>10} {'best lr':>10} {'steps':>6} {'seconds':>8}"
        "  tied rates"
    ]
    for optimizer, rows in scaling["best_rates"].items():
        for r in rows:
            best = "–" if r["best_lr"] is None else f"{r['best_lr']:.3g}"
            steps = "–" if r[STEPS_TO_TARGET] is None else str(r[STEPS_TO_TARGET])
            seconds = "–" if r[SECONDS_TO_TARGET] is None else f"{r[SECONDS_TO_TARGET]:.2f}"
            lines.append(
                f"{optimizer:10} {r['width']:>5g}× {r['weights']:>10,} {best:>10} {steps:>6} {seconds:>8}  "
                + ", ".join(f"{lr:.3g}" for lr in r["tied_lrs"])
            )
        moved = scaling["best_rate_moved"][optimizer]
        lines.append(
            f"{optimizer}: best rate moved with width: "
            f"{'unknown' if moved is None else 'yes' if moved else 'no'}"
        )
    lines.append(f"\n{OPTIMIZER:10} {LR:>10}  seconds = c + k·n{'':14} R²")
    for f in scaling["fits"]:
        s = f["seconds"]
        fit = f"{s['c']:8.2f} + {s['k'] * 1e6:8.3f}·n/1e6" if s else "(one width reached)"
        r2 = f"{s['r2']:.3f}" if s and s["r2"] is not None else "–"
        lines.append(f"{f[OPTIMIZER]:10} {f[LR]:>10.3g}  {fit:30} {r2}")
    return "\n".join(lines)
