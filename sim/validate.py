"""``simulate validate``: predicted vs measured on the published training runs of ``validation/``.

Each row of ``validation/runs.csv`` names a scenario and a measured figure: a step time (compared
directly) or TFLOP/s per GPU counted the source's way (model FLOPs, or hardware FLOPs including
recomputation). The error of a row is predicted / measured - 1 on the step time (a TFLOP/s figure
is turned into the equivalent step time first). Writes ``reports/validation.{md,csv,png}`` and
fails (exit 1) when the median absolute error exceeds the threshold in ``validation/threshold.yaml``.
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import yaml

from sim.analysis import analyze
from sim.efficiency import set_overrides
from sim.errors import ScenarioError
from sim.scenario import load_scenario


@dataclass(frozen=True)
class RowResult:
    """One validation row: what was measured, what the simulator predicts."""

    row_id: str
    source_id: str
    model: str
    gpu: str
    gpus: int
    metric: str                    # step_time_s | tflops_per_gpu
    measured: float
    predicted: float               # same metric as measured
    measured_step_s: float         # the measured figure as a step time
    predicted_step_s: float
    error: str = ""                # why the row could not be simulated

    @property
    def rel_error(self) -> float:
        """predicted / measured - 1 on the step time (positive: the simulator is slower)."""
        return self.predicted_step_s / self.measured_step_s - 1


def _simulate_row(args: tuple[dict, str, dict | None]) -> RowResult:
    row, base, overrides = args
    set_overrides(overrides)
    common = dict(row_id=row["row_id"], source_id=row["source_id"], model=row["model"], gpu=row["gpu"],
                  gpus=int(row["gpus"]), metric=row["metric"], measured=float(row["measured"]))
    try:
        a = analyze(load_scenario(Path(base) / row["scenario"]))
    except ScenarioError as exc:
        return RowResult(**common, predicted=math.nan, measured_step_s=math.nan, predicted_step_s=math.nan,
                         error=str(exc))
    step = a.step_time_s
    if row["metric"] == "step_time_s":
        return RowResult(**common, predicted=step, measured_step_s=common["measured"], predicted_step_s=step)
    flop = a.flops.hardware_flop if row["flop_convention"] == "hardware" else a.flops.model_flop
    per_gpu = flop / a.scenario.plan.gpus
    predicted = per_gpu / step / 1e12
    return RowResult(**common, predicted=predicted, measured_step_s=per_gpu / (common["measured"] * 1e12),
                     predicted_step_s=step)


def load_rows(validation_dir: Path, only: set[str] | None = None, fast: bool = False) -> list[dict]:
    rows = [r for r in csv.DictReader((validation_dir / "runs.csv").open()) if r["scenario"]]
    if only:
        rows = [r for r in rows if r["row_id"] in only]
    if fast:   # a CI subset: the two smallest runs of every source
        by_source: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_source[r["source_id"]].append(r)
        rows = [r for group in by_source.values() for r in sorted(group, key=lambda r: (int(r["gpus"]), r["row_id"]))[:2]]
    return rows


def run(validation_dir: Path, *, only: set[str] | None = None, fast: bool = False, workers: int = 2,
        rows: list[dict] | None = None, overrides: dict | None = None) -> list[RowResult]:
    """Simulate the rows (all, ``only`` these ids, the ``fast`` subset, or the given ``rows``)."""
    rows = load_rows(validation_dir, only, fast) if rows is None else rows
    jobs = [(r, str(validation_dir), overrides) for r in rows]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_simulate_row, jobs, chunksize=1))
    return [_simulate_row(j) for j in jobs]


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-a between two orderings (1 = same order)."""
    pairs = list(combinations(range(len(xs)), 2))
    if not pairs:
        return math.nan
    score = sum(math.copysign(1, (xs[i] - xs[j]) * (ys[i] - ys[j])) if (xs[i] - xs[j]) * (ys[i] - ys[j]) else 0
                for i, j in pairs)
    return score / len(pairs)


def ranking_groups(results: list[RowResult]) -> list[tuple[str, int, float]]:
    """Kendall's tau of predicted vs measured step time per (source, model, GPU, GPU count) group."""
    groups: dict[tuple, list[RowResult]] = defaultdict(list)
    for r in results:
        if not r.error:
            groups[(r.source_id, r.model, r.gpu, r.gpus)].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        if len(rs) >= 2:
            tau = kendall_tau([r.measured_step_s for r in rs], [r.predicted_step_s for r in rs])
            out.append((" / ".join(map(str, key)), len(rs), tau))
    return out


def summary(results: list[RowResult]) -> dict:
    ok = [r for r in results if not r.error]
    errs = [abs(r.rel_error) for r in ok]
    by: dict[str, list[float]] = defaultdict(list)
    for r in ok:
        by[r.source_id].append(abs(r.rel_error))
        by[r.gpu].append(abs(r.rel_error))
    return {"rows": len(results), "simulated": len(ok), "failed": len(results) - len(ok),
            "median_abs_error": statistics.median(errs) if errs else math.nan,
            "max_abs_error": max(errs) if errs else math.nan,
            "within_10": sum(e <= 0.10 for e in errs), "within_25": sum(e <= 0.25 for e in errs),
            "by_group": {k: (len(v), statistics.median(v)) for k, v in sorted(by.items())}}


def memory_results(validation_dir: Path) -> list[dict]:
    """Predicted vs measured peak memory of the runs of ``validation/memory/`` (the fine-tuning peaks of
    the reference data and torchtitan's pre-training peaks); [] when that set is absent. The rows,
    their assumptions and the predictor live in ``validation/memory/make_finetune_report.py`` (one
    place for both reports)."""
    import importlib.util

    script = validation_dir / "memory" / "make_finetune_report.py"
    if not script.is_file():
        return []
    spec = importlib.util.spec_from_file_location("_finetune_memory_rows", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults, rows = module.load_rows()
    return [module.predict(row, defaults) for row in rows]


def _memory_lines(memory: list[dict]) -> list[str]:
    errs = [abs(r["error"]) for r in memory if r["comparable"] and isinstance(r["error"], float)]
    verdicts = [r for r in memory if r["comparable"]]
    lines = ["", "## Peak memory (runs of validation/memory/)", "",
             f"- comparable rows: {len(verdicts)}, passing: {sum(r['passed'] for r in verdicts)}; median absolute "
             f"peak error {statistics.median(errs):.1%} over the {len(errs)} with a measured figure, worst "
             f"{max(errs):.1%}; within 10%: {sum(e <= 0.10 for e in errs)}" if errs else "- no comparable row",
             "- kinds: peak = measured peak per GPU (GB or GiB as published; the predicted peak x 1.10 where the "
             "source reports reserved bytes, validation/memory/rows.yaml); capacity = the predicted peak at the "
             "published longest sequence vs "
             "the GPU's memory; oom / fits = the verdict must match. Rows marked not comparable depend on a "
             "setting the source does not state or on a framework mechanism not modelled (reason given).", "",
             "| row | kind | measured | predicted (GB) | error | verdict | comparable | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in memory:
        err = f"{r['error']:+.1%}" if isinstance(r["error"], float) else "-"
        lines.append(f"| {r['row_id']} | {r['kind']} | {r['measured']} | {r['predicted']} | {err} | "
                     f"{'pass' if r['passed'] else 'FAIL'} | {'yes' if r['comparable'] else 'no'} | {r['reason']} |")
    return lines


def write_reports(results: list[RowResult], out_dir: Path, threshold: float, *, all_rows: list[dict],
                  memory: list[dict] = ()) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary(results)
    with (out_dir / "validation.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row_id", "source_id", "model", "gpu", "gpus", "metric", "measured", "predicted",
                    "measured_step_s", "predicted_step_s", "rel_error", "error"])
        for r in results:
            w.writerow([r.row_id, r.source_id, r.model, r.gpu, r.gpus, r.metric, r.measured, f"{r.predicted:.6g}",
                        f"{r.measured_step_s:.6g}", f"{r.predicted_step_s:.6g}",
                        "" if r.error else f"{r.rel_error:.4f}", r.error])
    _scatter(results, out_dir / "validation.png")
    lines = ["# Validation against published training measurements", "",
             "Generated by `simulate validate`; every figure below is measured by running the simulator on "
             "the scenarios in `validation/scenarios/` (built by `validation/build_runs.py` from the reference "
             "data and from the published runs added in `validation/extra_throughput.csv`, sources in "
             "`validation/EXTRA_SOURCES.md`; assumptions per row below and in `validation/runs.csv`).", "",
             f"- rows simulated: {s['simulated']} of {s['rows']} ({s['failed']} could not be simulated)",
             f"- median absolute step-time error: {s['median_abs_error']:.1%} (threshold {threshold:.0%})",
             f"- worst row: {s['max_abs_error']:.1%}; within 10%: {s['within_10']}; within 25%: {s['within_25']}",
             "", "## Error by source and by GPU", "", "| group | rows | median abs error |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {m:.1%} |" for k, (n, m) in s["by_group"].items()]
    lines += _fit_lines(results)
    lines += ["", "## Ranking of plans (Kendall's tau, predicted vs measured step time)", "",
              "| source / model / GPU / GPUs | plans | tau |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {t:.2f} |" for k, n, t in ranking_groups(results)]
    assumed = {row["row_id"]: row.get("assumptions", "") for row in all_rows}
    lines += ["", "## Rows", "", "| row | source | model | GPUs | metric | measured | predicted | step error | "
              "assumed where the source is silent |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        err = f"failed: {r.error}" if r.error else f"{r.rel_error:+.1%}"
        lines.append(f"| {r.row_id} | {r.source_id} | {r.model} | {r.gpus} x {r.gpu} | {r.metric} | "
                     f"{r.measured:.4g} | {r.predicted:.4g} | {err} | {assumed.get(r.row_id, '').replace('|', '/')} |")
    skipped = [row for row in all_rows if not row["scenario"]]
    if skipped:
        lines += ["", "## Published runs the simulator cannot express yet", ""]
        lines += [f"- {row['row_id']} {row['model']}: {row['not_expressible']}" for row in skipped]
    if memory:
        lines += _memory_lines(list(memory))
    (out_dir / "validation.md").write_text("\n".join(lines) + "\n")
    return s


def _fit_lines(results: list[RowResult]) -> list[str]:
    """The fitted efficiencies in use and the error on the rows they were fitted on and on the others."""
    from sim.calibrate import is_training
    from sim.efficiency import calibrated, sourced_constants

    params = calibrated()
    if not params:
        return []
    ok = [r for r in results if not r.error]
    fitted = [abs(r.rel_error) for r in ok if is_training({"row_id": r.row_id})]
    held = [abs(r.rel_error) for r in ok if not is_training({"row_id": r.row_id})]
    lines = ["", "## Fitted parameters (`simulate calibrate`, topologies/catalog/calibrated.yaml)", "",
             "Fitted on the even-numbered rows, each source weighing the same; every other constant keeps its "
             "sourced value (topologies/catalog/efficiency.yaml). Values are fractions of the GPU's peak; "
             "`default / mamf_share` is the share of the MAMF best-shape GEMM rate that the fitted GEMM rates "
             "reach, used for architectures without a fit of their own.", "",
             "| architecture | parameter | value |", "|---|---|---|"]
    lines += [f"| {arch} | {name} | {value:.4f} |" for arch, ps in sorted(params.items())
              for name, value in sorted(ps.items())]
    if fitted and held:
        lines += ["", f"- median absolute error on the fitted rows: {statistics.median(fitted):.1%} "
                      f"({len(fitted)} rows); on the held-out rows: {statistics.median(held):.1%} ({len(held)} rows)"]
    lines += ["", "## Sourced constants (not fitted)", "",
              "Every other constant of the cost model, as topologies/catalog/efficiency.yaml holds it with its source "
              "beside it (`measured`: the GPU's own measurement in gpus.yaml; fitted values above replace the "
              "architecture's gemm / attention).", "", "| section | key | value |", "|---|---|---|"]
    lines += [f"| {section} | {key} | {value} |" for section, key, value in sourced_constants()]
    return lines


def _scatter(results: list[RowResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.error]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    gpus = sorted({r.gpu for r in ok})
    for i, gpu in enumerate(gpus):
        pts = [r for r in ok if r.gpu == gpu]
        ax.scatter([r.measured_step_s for r in pts], [r.predicted_step_s for r in pts], s=14, label=gpu,
                   color=plt.cm.tab10(i))
    if ok:
        lo = min(min(r.measured_step_s, r.predicted_step_s) for r in ok) * 0.8
        hi = max(max(r.measured_step_s, r.predicted_step_s) for r in ok) * 1.25
        xs = [lo, hi]
        ax.plot(xs, xs, color="black", linewidth=1)
        for f in (0.9, 1.1):
            ax.plot(xs, [x * f for x in xs], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title("clustersim vs published runs (dashed: ±10%)")
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def threshold(validation_dir: Path, *, fast: bool = False) -> float:
    """The committed limit on the median absolute error (of the --fast subset or of the whole set)."""
    data = yaml.safe_load((validation_dir / "threshold.yaml").read_text())
    return float(data["fast_median_abs_error" if fast else "median_abs_error"])
