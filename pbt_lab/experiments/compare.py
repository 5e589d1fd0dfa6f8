"""Grid, random search, ASHA, PBT and PB2 side by side, at the grid's compute, over seeds.

    python -m pbt_lab.compare --config configs/compare-quick.yaml

The budget is the grid's: optimizers × rates × ``train.max_steps`` training steps, and every method
spends it at every seed (``compare.seeds``; a seed sets the data order, the initial weights and the
searcher's choices):

- grid: every optimizer × rate of ``grid``, one seed;
- random: as many trials, each a point drawn from PBT's search space (``pbt.space``; by default a
  random optimizer of ``pbt.optimizers`` at a log-uniform rate in its ``pbt.lr_ranges`` range): the
  prior PBT, ASHA and PB2 are given too;
- asha: such random trials under Ray's ASHAScheduler, sampled until the budget is spent;
- pbt: the lab's PBT, ``pbt.population`` members of budget / population steps each;
- pb2: Ray's PB2 with as many members; it searches the rate's place in its optimizer's range (log
  space) and every other real-valued range of the space (linearly, as PB2 does); a member's
  optimizer, ints and choices are drawn at random and change only when it copies a donor.
- the grid stays optimizers × rates: the space's other keys keep their ``train`` / ``model`` values.

Every trial trains its whole length (no stop at the target or at divergence) and validates at every
check. ASHA, PBT and PB2 stop when the steps their trials took (a member that copies a donor
re-trains from the donor's step: counted) reach the budget. Each run's winner is its trial with the
best final validation accuracy (PBT: its own winner); the test accuracy reported is that state's,
taken when the trial ended (under ASHA, PBT and PB2, whose trials may be stopped from outside, at
every check; never read to choose). Each method × seed is a run directory of its own inside this
one; the comparison writes ``compare.parquet`` (one row per method × seed), ``compare_curves.parquet``,
``compare_summary.json``, ``compare.md`` and ``figures/compare.png``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, replace

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.pb2 import PB2
from ray.tune.search import BasicVariantGenerator

from pbt_lab import StorageFull, UserError, cli, results
from pbt_lab.config import CompareExperiment
from pbt_lab.config.space import nested, set_path
from pbt_lab.experiments.pbt import population_setup, random_configs
from pbt_lab.names import LR, LR_PLACE, LR_RANGES, OPTIMIZER, SCORE, STOPPED, TEST_EVERY_CHECK, VAL_ACC
from pbt_lab.storage import is_uri
from pbt_lab.tuning.callbacks import BudgetStop
from pbt_lab.tuning.launch import fit
from pbt_lab.tuning.trial_config import points_space, trial_space

ASHA_SAMPLES = 20  # ASHA draws up to this many times the grid's trials: the budget stops it first


def seeded(run: cli.Run, method: str, seed: int) -> cli.Run:
    """The run of one method at one seed: a directory inside the comparison's, the seed everywhere."""
    cfg = run.cfg
    cfg = replace(cfg, train=replace(cfg.train, seed=seed), pbt=replace(cfg.pbt, seed=seed))
    return replace(
        run,
        cfg=cfg,
        name=f"{method}-seed{seed}",
        storage_path=str(run.run_dir),
        resume=False,
        tables=None,
        session=cli.Session(),  # its own fit's
    )


def sampler(run: cli.Run, method: str, n: int) -> list[dict]:
    """Random starting points for ``method`` at this run's seed (its own stream per method)."""
    p, seed = run.cfg.pbt, run.cfg.train.seed
    rng = np.random.default_rng([seed, ["random", "asha", "pb2"].index(method)])
    return random_configs(p.search_space, n, rng, seed)


def method_setup(run: cli.Run, method: str, budget: int) -> tuple[dict, dict]:
    """``method``'s trial space and ``fit`` arguments, to spend ``budget`` training steps."""
    cfg = run.cfg
    n_grid = len(cfg.grid.optimizers) * len(cfg.grid.lrs)
    space = lambda **searched: trial_space(  # noqa: E731  (run.cfg: pb2 sets its members' length)
        run.cfg.train, cfg.model, threads=cfg.resources.threads, **searched
    )
    scored = {"metric": VAL_ACC, "rescue_checks": 0}  # members report SCORE for a scheduler to rank
    if method == "grid":
        lrs, optimizers = tune.grid_search(cfg.grid.lrs), tune.grid_search(cfg.grid.optimizers)
        return space(optimizer=optimizers, lr=lrs, seed=cfg.train.seed), {}
    stop = {"stop": BudgetStop(budget)}  # a restored member re-trains: PBT's steps are counted
    if method == "pbt":
        population = replace(cfg.pbt, stop_at_target=False)
        steps = budget // population.population
        run.cfg = replace(cfg, pbt=population, train=replace(cfg.train, max_steps=steps))
        trials, arguments = population_setup(run)
        return {**trials, TEST_EVERY_CHECK: True}, {**arguments, **stop}
    samples = {"random": n_grid, "asha": n_grid * ASHA_SAMPLES, "pb2": cfg.pbt.population}[method]
    points = sampler(run, method, samples)
    searcher = BasicVariantGenerator(
        points_to_evaluate=[nested(x) for x in points], random_state=cfg.train.seed
    )
    if method == "random":
        return space(**points_space(points)), {
            "search_alg": searcher,
            "num_samples": len(points),
        }
    if method == "asha":
        asha = ASHAScheduler(
            time_attr="training_iteration",
            metric=SCORE,
            mode="max",
            max_t=cfg.train.max_steps // cfg.train.steps_per_check,
            grace_period=cfg.compare.asha_grace_checks,
            reduction_factor=cfg.compare.asha_reduction_factor,
        )
        return {**space(**points_space(points)), "population": scored, TEST_EVERY_CHECK: True}, {
            "scheduler": asha,
            "search_alg": searcher,
            "num_samples": len(points),
            **stop,
        }
    # pb2: the rate as its place in the optimizer's range, a number PB2's Gaussian process can bound
    p = cfg.pbt
    members = points[: p.population]
    for m in members:
        low, high = p.search_space[LR].range_for(m[OPTIMIZER])
        m[LR_PLACE] = float(np.log(m[LR] / low) / np.log(high / low))
    # PB2's Gaussian process bounds real numbers: the rate as its place, every other real range as is
    # (linear, as Ray's PB2 searches); choices and ints keep each member's drawn value.
    bounds = {LR_PLACE: [0.0, 1.0]}
    for h in p.search_space.params:
        if h.continuous and h.key != LR:
            bounds = set_path(bounds, h.key, list(h.bounds))
    run.cfg = replace(cfg, train=replace(cfg.train, max_steps=budget // p.population))
    trials = space(**points_space(members))
    pb2 = PB2(
        time_attr="training_iteration",
        metric=SCORE,
        mode="max",
        perturbation_interval=p.perturbation_interval,
        hyperparam_bounds=bounds,
        quantile_fraction=p.quantile_fraction,
    )
    ranges = {o: list(p.search_space[LR].range_for(o)) for o in p.search_space[OPTIMIZER].values}
    return {**trials, LR_RANGES: ranges, "population": scored, TEST_EVERY_CHECK: True}, {
        "scheduler": pb2,
        "search_alg": BasicVariantGenerator(
            points_to_evaluate=[nested(m) for m in members], random_state=cfg.train.seed
        ),
        "num_samples": p.population,
        "checkpoint_every": p.perturbation_interval,
        **stop,
    }


def run_method(parent: cli.Run, method: str, seed: int) -> dict:
    """One method at one seed, on the parent's Ray: its run directory, tables and a progress line."""
    run = seeded(parent, method, seed)
    space, arguments = method_setup(run, method, parent.cfg.budget)
    start = time.perf_counter()
    with cli.one_line_errors(run):
        fit(run, space, console=False, **arguments)
    if run.session.stopped:  # its storage filled up: the methods after it would find it full too
        raise StorageFull(run.session.stopped)
    tables = results.write_tables(
        run.run_dir,
        kind=method,
        config=run.config_dict(),
        data=run.data.identity(),
        session=asdict(run.session),
        figures=False,
        stopped_as=STOPPED if method in ("asha", "pb2", "pbt") else None,
    )
    curve = results.compute_curve(tables["history"]).assign(method=method, seed=seed)
    row = results.compare_row(method, seed, tables, curve)
    print(results.compare_line(row, time.perf_counter() - start), flush=True)
    return {"row": row, "curve": curve, "exit": results.exit_status(tables)}  # failed trials, audit


def validate(run: cli.Run) -> None:
    if run.resume:
        raise UserError("--resume: a comparison starts afresh (each method × seed is a run of its own)")
    if is_uri(run.storage_path):
        raise UserError(
            f"--storage-path {run.storage_path}: a comparison is written to a local or shared path"
        )
    cfg = run.cfg
    if cfg.train.max_steps is None:
        raise UserError("train.max_steps must be set: it is each grid trial's share of the budget")
    if cfg.budget % (cfg.pbt.population * cfg.train.steps_per_check):
        raise UserError(
            f"the budget ({cfg.budget:,} steps: grid trials × train.max_steps) must split into "
            f"pbt.population={cfg.pbt.population} members of whole checks ({cfg.train.steps_per_check} steps)"
        )
    t = cfg.train
    for name, value, equal in (
        ("train.stop_at_target", t.stop_at_target, False),
        ("train.stop_on_divergence", t.stop_on_divergence, False),
        ("train.max_seconds", t.max_seconds, None),
        ("train.stall_checks", t.stall_checks, None),
    ):
        if value != equal:
            raise UserError(
                f"{name}={value}: a comparison needs {equal} (every trial trains its whole length, so "
                f"every method spends the same steps)"
            )
    checks = t.max_steps // t.steps_per_check
    if cfg.compare.asha_grace_checks > checks:
        raise UserError(
            f"compare.asha_grace_checks={cfg.compare.asha_grace_checks} exceeds a trial's {checks} checks"
        )


def main(argv: list[str] | None = None, call: cli.Call | None = None) -> int:
    run = cli.parse("compare", CompareExperiment, __doc__, argv, validate=validate, call=call)
    # PB2's Gaussian process warns at every fit whose kernel sits at a bound: not the user's to act on.
    warnings.filterwarnings("ignore", module="sklearn.gaussian_process")
    cfg = run.cfg
    print(
        f"comparing {', '.join(cfg.compare.methods)} over seeds {cfg.compare.seeds}: "
        f"{cfg.budget:,} training steps each (the grid's {len(cfg.grid.optimizers)} optimizers × "
        f"{len(cfg.grid.lrs)} rates × {cfg.train.max_steps} steps)",
        flush=True,
    )
    start = time.perf_counter()
    try:
        done = [run_method(run, m, s) for m in cfg.compare.methods for s in cfg.compare.seeds]
    except StorageFull as e:
        print(f"STOPPED: {e}; free space, then run the comparison again")
        return 1
    run.session.wall_seconds = time.perf_counter() - start
    tables = results.write_comparison(
        run.run_dir,
        [d["row"] for d in done],
        [d["curve"] for d in done],
        config=asdict(cfg),
        data=run.data.identity(),
        budget=cfg.budget,
        near_best=cfg.compare.near_best,
        wall_seconds=run.session.wall_seconds,
    )
    run.tables = tables
    print(tables["markdown"])
    print(f"tables:  {run.run_dir}/{{compare.parquet, compare_summary.json, compare.md}}")
    return int(any(d["exit"] for d in done))
