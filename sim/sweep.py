"""``simulate sweep``: evaluate many plans of one scenario, in parallel, into one CSV.

    simulate sweep SCENARIO [--grid KEY=V1,V2,... ...] [--auto] [--set KEY=VALUE ...] [--jobs N]
                            [--out CSV] [--resume] [--top K] [--scheduler tcp://HOST:PORT]

The plans are a ``--grid`` cartesian product of overrides, or with ``--auto`` every valid plan of
the scenario's GPU count (:mod:`sim.plan_space`; grid keys then fix those dimensions or, for other
keys, multiply the space). Each plan is validated in this process (cheap); an invalid ``--auto``
combination is not a plan and is skipped, an invalid ``--grid`` combination is a row with status
``error``. Workers build each plan's scenario from the file parsed once per worker, compute its
memory (analytic), and run the step simulation only when it fits: a plan that does not fit is a
row with status ``does_not_fit``, its reason and empty timing columns.

CSV: one row per plan, flushed as it completes (the order of the file follows completion):
``plan_id`` (a hash of the overrides, :func:`sim.plan_space.plan_id`), ``status`` (ok |
does_not_fit | error), ``reason``, one column per swept key (the value as given), then
:func:`sim.report.csv_row`'s columns (unit-suffixed). The header is fixed before the first row:
its output columns are those of a simulated row of the sweep's cheapest plan. ``--resume`` reads
an existing CSV with the same columns, keeps its complete rows and evaluates the missing plans.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sim.errors import ScenarioError
from sim.plan_space import AUTO_KEYS, auto_points, format_value, grid_points, override_strings, parse_grid, plan_id
from sim.units import GiB

STATUS_OK, STATUS_DOES_NOT_FIT, STATUS_ERROR = "ok", "does_not_fit", "error"
ID_COLUMNS = ("plan_id", "status", "reason")
RANK_COLUMN = "tokens_per_s"          # the throughput the top-K table sorts by


# ---- building and evaluating one plan ----------------------------------------------------------
class Evaluator:
    """Builds and evaluates the plans of one parsed scenario; one per worker process.

    ``data`` is the scenario mapping with the sweep's ``--set`` overrides already applied; a plan is
    a point of overrides on top of it. Clusters that plans share (the same ``cluster:`` section)
    are built once, so that their graph and route caches serve every plan of the worker.
    """

    def __init__(self, data: Any, file: str, base_dir: str | None):
        self.data, self.file = data, file
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self._clusters: dict[str, Any] = {}

    def scenario(self, point: dict[str, Any]):
        """The validated Scenario of a plan point (ScenarioError when the combination is invalid)."""
        from sim.scenario import apply_override, scenario_from_mapping
        data = self.data
        for assignment in override_strings(point):
            if not isinstance(data, dict):
                break
            data = apply_override(data, assignment, file=self.file)
        scenario = scenario_from_mapping(data, file=self.file, base_dir=self.base_dir)
        key = repr(data.get("cluster"))
        shared = self._clusters.setdefault(key, scenario.cluster)
        return scenario if shared is scenario.cluster else dataclasses.replace(scenario, cluster=shared)

    def evaluate(self, point: dict[str, Any], *, simulate_anyway: bool = False) -> dict[str, Any]:
        """``status``, ``reason`` and the csv_row columns of one plan (timing only when it fits)."""
        from sim.analysis import analyze
        from sim.report import csv_row
        try:
            scenario = self.scenario(point)
            memory = analyze(scenario, simulate_step=False)
            if not memory.fits and not simulate_anyway:
                return {"status": STATUS_DOES_NOT_FIT, "reason": does_not_fit_reason(memory), **csv_row(memory)}
            # memory again (milliseconds) and the step, extrapolated from two short replays when the plan
            # has many microbatches (exact in the steady state; sim.engine.extrapolation_points)
            analysis = memory.simulated(extrapolate=True)
            status = STATUS_OK if analysis.fits else STATUS_DOES_NOT_FIT
            reason = "" if analysis.fits else does_not_fit_reason(analysis)
            return {"status": status, "reason": reason, **csv_row(analysis)}
        except ScenarioError as exc:
            return {"status": STATUS_ERROR, "reason": str(exc)}
        except Exception as exc:     # an engine failure is a row of the sweep, not the end of it
            return {"status": STATUS_ERROR, "reason": " ".join(f"{type(exc).__name__}: {exc}".split())}


def does_not_fit_reason(analysis) -> str:
    """``does not fit: stage S needs X GiB of Y GiB`` for the stage that misses the most."""
    worst = max(analysis.stages, key=lambda d: (d.shortfall, -d.stage))
    if worst.shortfall <= 0 and not analysis.host_fits:
        host = analysis.scenario.cluster.recipe.host
        have = f"{host.memory_bytes / GiB:.1f} GiB" if host else "none (the node recipe has no host: section)"
        return (f"does not fit: the offloaded states need {analysis.host_bytes_per_node / GiB:.1f} GiB of host "
                f"memory per node, of {have}")
    return f"does not fit: stage {worst.stage} needs {worst.total / GiB:.1f} GiB of {worst.capacity / GiB:.1f} GiB"


# Worker-process state: one Evaluator per process (the scenario is parsed once per worker).
_WORKER: Evaluator | None = None


def _init_worker(data: Any, file: str, base_dir: str | None) -> None:
    global _WORKER
    _WORKER = Evaluator(data, file, base_dir)


def timed_evaluate(evaluator: Evaluator, pid: str, point: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    """(plan_id, result, seconds spent): the time goes to the caller's statistics, not to the CSV."""
    start = time.perf_counter()
    result = evaluator.evaluate(point)
    return pid, result, time.perf_counter() - start


def _evaluate_in_worker(item: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], float]:
    assert _WORKER is not None
    return timed_evaluate(_WORKER, *item)


# ---- the sweep -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Sweep:
    """What a sweep evaluates: its plans (valid ones), the grid combinations that are not plans, the header."""

    evaluator: Evaluator
    input_keys: list[str]
    plans: dict[str, dict[str, Any]]            # plan_id -> point, valid plans only
    invalid: dict[str, tuple[dict[str, Any], str]]   # plan_id -> (point, error): --grid rows with status error
    skipped: int                                # --auto combinations rejected by resolve_plan
    costs: dict[str, float]                     # plan_id -> estimated simulation cost (ops), for ordering


def estimated_cost(scenario) -> float:
    """A proxy of the engine's work for a plan: passes (microbatches x chunks) times layers per pass, per stage."""
    plan = scenario.plan
    return plan.microbatches * plan.virtual_stages * plan.pp * max(plan.chunk_layers) + plan.pp


def build_sweep(path: str, overrides: Sequence[str], grid_specs: Sequence[str], auto: bool) -> Sweep:
    """Enumerate and validate the plans; ScenarioError for bad input (before anything is written)."""
    from sim.scenario import apply_override, read_yaml
    data = read_yaml(path)
    for assignment in overrides:
        if not isinstance(data, dict):
            break
        data = apply_override(data, assignment, file=str(path))
    file = str(path)
    evaluator = Evaluator(data, file, str(Path(path).resolve().parent))
    grid = parse_grid(grid_specs)
    if not grid and not auto:
        raise ScenarioError("nothing to sweep; expected --grid KEY=V1,V2,... (repeatable) and/or --auto",
                            key="--grid")
    if auto:
        fixed = {k: v for k, v in grid.items() if k in AUTO_KEYS}
        variants = grid_points({k: v for k, v in grid.items() if k not in AUTO_KEYS}) or [{}]
        points = []
        for variant in variants:
            context = _variant_context(evaluator, variant)
            points += [{**variant, **p} for p in auto_points(**context, fixed=fixed)]
        input_keys = [k for k in grid if k not in AUTO_KEYS] + list(AUTO_KEYS)
        for p in points:   # keys that only some points carry (pins, resets of the base's settings)
            input_keys += [k for k in p if k not in input_keys]
    else:
        points = grid_points(grid)
        input_keys = list(grid)

    plans: dict[str, dict[str, Any]] = {}
    invalid: dict[str, tuple[dict[str, Any], str]] = {}
    errors: dict[str, list[ScenarioError]] = {}
    costs: dict[str, float] = {}
    for point in points:
        pid = plan_id(point, overrides)
        try:
            costs[pid] = estimated_cost(evaluator.scenario(point))
            plans[pid] = point
        except ScenarioError as exc:
            invalid[pid] = (point, str(exc))
            errors.setdefault(exc.key or "", []).append(exc)
    # A grid key whose every combination fails on that very key is one the scenario cannot take.
    for key in grid:
        with_key = sum(1 for p in points if key in p)
        if with_key and len(errors.get(key, ())) == with_key:
            raise errors[key][0]
    if not plans:
        first = next(iter(invalid.values()), None)
        why = f": every combination is invalid, e.g. {first[1]}" if first else ""
        raise ScenarioError(f"no valid plan to evaluate{why}", file=file, key="--auto" if auto else "--grid")
    skipped = len(invalid) if auto else 0
    return Sweep(evaluator=evaluator, input_keys=input_keys, plans=plans, invalid={} if auto else invalid,
                 skipped=skipped, costs=costs)


def _variant_context(evaluator: Evaluator, variant: dict[str, Any]) -> dict[str, Any]:
    """Model, training, parallelism section and GPU counts of one --auto variant (bad input raises)."""
    from sim.cluster import cluster_from_mapping
    from sim.model import load_model
    from sim.plan import ParallelismConfig, TrainingConfig
    from sim.scenario import apply_override, scenario_from_mapping
    from sim.schema import validate_section
    data, file = evaluator.data, evaluator.file
    for assignment in override_strings(variant):
        if not isinstance(data, dict):
            break
        data = apply_override(data, assignment, file=file)
    if not isinstance(data, dict) or not {"model", "cluster", "training"} <= set(data):
        scenario_from_mapping(data, file=file)       # raises the one-line error that says what is missing
    cluster = cluster_from_mapping(data["cluster"], file=file, base_dir=evaluator.base_dir)
    return {"model": load_model(data["model"], file=file, base_dir=evaluator.base_dir),
            "training": validate_section(TrainingConfig, data["training"], file=file, prefix="training"),
            "parallelism": validate_section(ParallelismConfig, data.get("parallelism"), file=file,
                                            prefix="parallelism"),
            "num_gpus": cluster.num_gpus, "gpus_per_node": cluster.gpus_per_node}


def header_columns(sweep: Sweep) -> tuple[list[str], str | None, dict[str, Any] | None]:
    """The CSV header: ids, swept keys, then the columns of a simulated row of the cheapest plan.

    Returns (header, probe plan id, probe row when that plan fits so its result can be kept)."""
    last: dict[str, Any] = {}
    for pid in sorted(sweep.plans, key=lambda p: (sweep.costs[p], p))[:5]:
        row = sweep.evaluator.evaluate(sweep.plans[pid], simulate_anyway=True)
        if row["status"] != STATUS_ERROR:
            outputs = [k for k in row if k not in ("status", "reason")]
            keep = row if row["status"] == STATUS_OK else None
            return [*ID_COLUMNS, *sweep.input_keys, *outputs], pid, keep
        last = row
    raise ScenarioError(f"cannot simulate the sweep's cheapest plans ({last.get('reason')}); expected a "
                        f"scenario the engine can run", file=sweep.evaluator.file)


def read_existing(path: Path, header: list[str]) -> set[str]:
    """plan_ids of the rows of a CSV being resumed, after checking its columns and cutting a torn last
    line (a sweep killed while writing a row)."""
    with path.open(newline="") as fh:
        existing = next(csv.reader(fh), None)
    if existing is None:
        return set()
    if existing != header:
        missing = [c for c in header if c not in existing]
        extra = [c for c in existing if c not in header]
        raise ScenarioError(f"{path} has other columns than this sweep writes (missing {missing[:3]}, "
                            f"extra {extra[:3]}); expected a CSV written by the same sweep", key="--resume")
    text = path.read_bytes()
    if not text.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(text.rfind(b"\n") + 1)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        return {row[0] for row in reader if len(row) == len(header)}


def evaluate_local(sweep: Sweep, items: list[tuple[str, dict[str, Any]]], jobs: int
                   ) -> Iterator[tuple[str, dict[str, Any], float]]:
    """(plan_id, result, seconds) as they complete, from ``jobs`` worker processes (in this process when
    jobs == 1)."""
    if jobs == 1 or len(items) <= 1:
        for pid, point in items:
            yield timed_evaluate(sweep.evaluator, pid, point)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    ev = sweep.evaluator
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), initializer=_init_worker,
                             initargs=(ev.data, ev.file, str(ev.base_dir) if ev.base_dir else None)) as pool:
        futures = [pool.submit(_evaluate_in_worker, item) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_sweep(sweep: Sweep, out: Path, *, jobs: int, resume: bool, scheduler: str | None = None,
              progress: Callable[[int], Any] | None = None,
              announce: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    """Evaluate the sweep into ``out``. ``announce(to_evaluate, already_done)`` is called once the
    output is checked, ``progress(total)`` then returns a callable(advance).

    Returns ``written`` and ``resumed`` row counts and ``eval_s``, the seconds each evaluated plan
    took in its worker (by plan_id), for benchmarks."""
    header, probe_id, probe_row = header_columns(sweep)
    done: set[str] = set()
    if out.exists() and out.stat().st_size > 0:
        if not resume:
            raise ScenarioError(f"{out} exists; expected --resume to continue that sweep, or a new --out path",
                                key="--out")
        done = read_existing(out, header)
    new_file = not (out.exists() and out.stat().st_size > 0)
    pending_invalid = [(pid, p, why) for pid, (p, why) in sweep.invalid.items() if pid not in done]
    todo = [pid for pid in sweep.plans if pid not in done]
    # longest first, so that the slowest plans do not finish last on an otherwise idle pool
    todo.sort(key=lambda pid: (-sweep.costs[pid], pid))
    counts: Counter[str] = Counter()
    eval_s: dict[str, float] = {}
    if announce:
        announce(len(todo) + len(pending_invalid), len(done))
    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="", extrasaction="raise")
        if new_file:
            writer.writeheader()
            fh.flush()

        def write(pid: str, point: dict[str, Any], result: dict[str, Any]) -> None:
            row = {"plan_id": pid, **{k: format_value(v) for k, v in point.items()}, **result}
            writer.writerow(row)
            fh.flush()
            counts[result["status"]] += 1

        advance = progress(len(todo) + len(pending_invalid)) if progress else (lambda n=1: None)
        for pid, point, why in pending_invalid:
            write(pid, point, {"status": STATUS_ERROR, "reason": why})
            advance(1)
        items = [(pid, sweep.plans[pid]) for pid in todo]
        if probe_row is not None and probe_id in todo:     # already simulated to fix the header
            write(probe_id, sweep.plans[probe_id], probe_row)
            advance(1)
            items = [it for it in items if it[0] != probe_id]
        if scheduler:
            from sim.sweep_dask import evaluate_on_dask
            results: Iterable[tuple[str, dict[str, Any], float]] = evaluate_on_dask(scheduler, sweep.evaluator, items)
        else:
            results = evaluate_local(sweep, items, jobs)
        for pid, result, seconds in results:
            write(pid, sweep.plans[pid], result)
            eval_s[pid] = seconds
            advance(1)
    return {"written": sum(counts.values()), "resumed": len(done), "eval_s": eval_s}


# ---- reading the result back -----------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def summary(rows: list[dict[str, str]], top: int) -> tuple[Counter[str], list[dict[str, str]]]:
    """Counts by status and the ``top`` fitting plans by throughput (ties by plan_id)."""
    counts = Counter(r["status"] for r in rows)
    ok = [r for r in rows if r["status"] == STATUS_OK and r.get(RANK_COLUMN)]
    ok.sort(key=lambda r: (-float(r[RANK_COLUMN]), r["plan_id"]))
    return counts, ok[:top]


def _plan_label(r: dict[str, str]) -> str:
    sched = r.get("schedule", "")
    if r.get("virtual_stages") not in (None, "", "1"):
        sched += f" v{r['virtual_stages']}"
    sp = " SP" if r.get("sequence_parallel") == "True" else ""
    # swept keys that the layout does not show (the swept columns are the dotted ones), e.g. finetune.rank=16
    extra = "".join(f" {k}={v}" for k, v in r.items() if "." in k and k not in AUTO_KEYS and v != "")
    return (f"TP{r.get('tp')} PP{r.get('pp')} CP{r.get('cp')} DP{r.get('dp')} ZeRO-{r.get('zero')}{sp} "
            f"{r.get('recompute')} {sched} mbs {r.get('micro_batch_size')}{extra}")


def print_report(rows: list[dict[str, str]], top: int, *, enumerated: int, skipped: int, wall_s: float,
                 out: Path, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(file=file or sys.stdout, width=160)
    counts, best = summary(rows, top)
    table = Table(title=f"Top {len(best)} plans by throughput (of {counts[STATUS_OK]} that fit)")
    for col in ("#", "plan_id", "plan", "tokens/s", "step (s)", "MFU", "peak (GiB)"):
        table.add_column(col, justify="left" if col in ("plan_id", "plan") else "right")
    for i, r in enumerate(best, 1):
        table.add_row(str(i), r["plan_id"], _plan_label(r), f"{float(r['tokens_per_s']):,.0f}",
                      f"{float(r['step_time_s']):.3f}", f"{float(r['mfu']):.1%}",
                      f"{float(r['peak_memory_bytes']) / GiB:.1f}")
    if best:
        console.print(table)
    skipped_text = f" ({skipped} invalid combinations skipped)" if skipped else ""
    console.print(f"{enumerated} plans enumerated{skipped_text}: "
                  f"{counts[STATUS_OK]} fit, {counts[STATUS_DOES_NOT_FIT]} do not fit, {counts[STATUS_ERROR]} errors; "
                  f"wall time {wall_s:.3g} s; rows in {out}")


# ---- CLI -----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simulate sweep", description="Evaluate many parallel plans of a scenario "
                                "into one CSV (one row per plan), in parallel, resumable.")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep a key over values (repeatable; the cartesian product of all --grid keys)")
    p.add_argument("--auto", action="store_true", help="every valid plan for the scenario's GPU count "
                   "(tp, pp, cp, dp, ZeRO, recompute, micro-batch, schedule); --grid keys fix dimensions")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key for every plan (repeatable)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--out", type=Path, help="CSV to write (default sweep_<scenario name>.csv here)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: keep the rows of --out, "
                   "evaluate the plans it lacks")
    p.add_argument("--top", type=int, default=10, help="how many of the fastest fitting plans to print")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="evaluate on a Dask distributed cluster")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        raise ScenarioError(f"expected at least 1 worker, got {args.jobs}", key="--jobs")
    if args.top < 0:
        raise ScenarioError(f"expected a count >= 0, got {args.top}", key="--top")
    if args.scheduler:
        from sim.sweep_dask import check_scheduler
        check_scheduler(args.scheduler)
    start = time.perf_counter()
    sweep = build_sweep(args.scenario, args.overrides, args.grid, args.auto)
    out = args.out
    if out is None:
        name = sweep.evaluator.scenario(next(iter(sweep.plans.values()))).name
        out = Path(f"sweep_{name}.csv")
    if not out.resolve().parent.is_dir():
        raise ScenarioError(f"directory {str(out.resolve().parent)!r} does not exist; expected a writable path",
                            key="--out")
    enumerated = len(sweep.plans) + len(sweep.invalid)

    def announce(todo: int, done: int) -> None:
        print(f"sweep {args.scenario}: {enumerated} plans"
              + (f" ({sweep.skipped} invalid combinations skipped)" if sweep.skipped else "")
              + (f", {done} already in {out}" if done else "") + f"; evaluating {todo} -> {out}", file=sys.stderr)
    with _progress_bar() as progress:
        run_sweep(sweep, out, jobs=args.jobs, resume=args.resume, scheduler=args.scheduler, progress=progress,
                  announce=announce)
    print_report(read_rows(out), args.top, enumerated=enumerated, skipped=sweep.skipped,
                 wall_s=time.perf_counter() - start, out=out)
    return 0


class _progress_bar:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise.

    Refreshed on each completed plan rather than by rich's refresh thread, so that no thread runs
    when the worker pool forks."""

    def __enter__(self):
        self._progress = None
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
        self._progress = progress = Progress("[progress.description]{task.description}", BarColumn(),
                                             MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                             console=Console(stderr=True), auto_refresh=False)
        progress.start()

        def start(total: int):
            task = progress.add_task("plans", total=total)
            progress.refresh()

            def advance(n: int = 1) -> None:
                progress.advance(task, n)
                progress.refresh()
            return advance
        return start

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
