"""``simulate calibrate``: fit the GEMM and attention efficiencies per GPU architecture on published runs.

The cost model has a handful of free constants; the ones that move step times most are the
achieved GEMM rates (16-bit, and fp8 on Hopper) and, for long sequences, the flash-attention rate. They are fitted here on a *training* half of the
validation set (rows with an even number) and checked on the other half, which the fit never
sees. The fit is a fixed-point iteration per (architecture, parameter): efficiency x= the geometric
mean, over the sources, of each source's median predicted / measured step time on the training
rows that parameter governs (rows whose layer time is mostly attention for ``attention``; else
16-bit rows for ``gemm``, fp8 rows for ``gemm_fp8``; rows run with Ampere-built kernels on Hopper
inform Ampere's parameters). Each independent source weighs the same: one source with many rows of
one software stack does not set a GPU's rate alone, and another stack's runs on the same GPU are not
left far off. A parameter
is fitted only when at least ``MIN_ROWS`` training rows depend on it, and never above the best-shape
GEMM rate measured for that GPU (MAMF, gpus.yaml): a fit cannot make a GPU faster than its own
measured peak GEMM. Everything else (memory bandwidth, links, unfitted parameters) keeps its sourced value. The result goes to
``topologies/catalog/calibrated.yaml``, with the rows it was fitted on and the errors.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from sim.compute import compute_dtype, kernels_time_s
from sim.efficiency import gpu_efficiency
from sim.hardware import data_dir, get_gpu
from sim.kernels import LayerKernels
from sim.scenario import load_scenario
from sim.validate import RowResult, load_rows, run

LOWEST = 0.2            # no fitted efficiency goes below this
MIN_ROWS = 5            # a parameter with fewer training rows keeps its sourced value


def is_training(row: dict) -> bool:
    """The fitted half: rows whose number is even."""
    return int(row["row_id"].lstrip("T")) % 2 == 0


def _parameter(row: dict, validation_dir: Path) -> tuple[str, str]:
    """(architecture, parameter) a row's step time depends on most: ``attention`` when the attention
    core takes most of a layer's compute time (long sequences), else the GEMM rate of its dtype."""
    scenario = load_scenario(validation_dir / row["scenario"])
    gpu = scenario.cluster.gpu
    dtype = compute_dtype(scenario.plan.precision)
    plan = scenario.plan
    eff = gpu_efficiency(gpu, dtype, calibrated_values=False, kernel_arch=plan.kernel_arch,
                         attention_kernel_arch=plan.attention_kernel_arch)
    kernels = LayerKernels(scenario.model, plan)
    # Ampere-built kernels on a Hopper GPU run at Ampere's (fitted) efficiencies: their rows inform those
    attention = kernels_time_s(kernels.attention_core, gpu, eff, dtype)
    if attention > 0.5 * kernels_time_s(kernels.forward, gpu, eff, dtype):
        return ("ampere" if plan.attention_kernel_arch == "ampere" else gpu.arch), "attention"
    return ("ampere" if plan.kernel_arch == "ampere" else gpu.arch), "gemm_fp8" if dtype == "fp8" else "gemm"


def _measured_best(param: str, gpu_key: str) -> float:
    """The sourced efficiency (MAMF best-shape GEMM, published flash-attention rate): the start of
    the fit and its upper bound."""
    gpu = get_gpu(gpu_key)
    dtype = "fp8" if param == "gemm_fp8" else ("bf16" if gpu.supports("bf16") else "fp16")
    eff = gpu_efficiency(gpu, dtype, calibrated_values=False)
    return eff.attention if param == "attention" else eff.gemm


def median_abs(results: list[RowResult]) -> float:
    errs = [abs(r.rel_error) for r in results if not r.error]
    return statistics.median(errs) if errs else float("nan")


def fit(validation_dir: Path, *, iterations: int = 4, workers: int = 2, log=print) -> dict:
    rows = load_rows(validation_dir)
    train = [r for r in rows if is_training(r)]
    test = [r for r in rows if not is_training(r)]
    which = {r["row_id"]: _parameter(r, validation_dir) for r in rows}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in train:
        counts[which[r["row_id"]]] += 1
    params: dict[str, dict[str, float]] = defaultdict(dict)
    ceiling: dict[tuple[str, str], float] = {}
    for r in train:
        arch, p = which[r["row_id"]]
        # the start and the ceiling come from a GPU of the parameter's own architecture
        if counts[(arch, p)] >= MIN_ROWS and p not in params[arch] and get_gpu(r["gpu"]).arch == arch:
            params[arch][p] = ceiling[(arch, p)] = _measured_best(p, r["gpu"])
    unanchored = sorted(k for k, n in counts.items() if n >= MIN_ROWS and k[1] not in params[k[0]])
    if unanchored:
        log("not fitted (no training row on a GPU of that architecture): "
            + ", ".join(f"{a}.{p}" for a, p in unanchored))
    skipped = sorted(k for k, n in counts.items() if n < MIN_ROWS)
    if skipped:
        log("not fitted (fewer than %d training rows): %s" % (MIN_ROWS, ", ".join(f"{a}.{p}" for a, p in skipped)))
    for it in range(iterations):
        results = run(validation_dir, rows=train, workers=workers, overrides=params)
        ratios: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for res in results:
            if not res.error:
                ratios[which[res.row_id]][res.source_id].append(res.predicted_step_s / res.measured_step_s)
        for (arch, p), by_source in sorted(ratios.items()):
            if p in params.get(arch, {}):
                step = statistics.geometric_mean([statistics.median(rs) for rs in by_source.values()])
                new = min(max(params[arch][p] * step, LOWEST), ceiling[(arch, p)])
                params[arch][p] = round(new, 4)
        log(f"iteration {it + 1}: median |error| on fitted rows {median_abs(results):.1%}; "
            + ", ".join(f"{a}.{p}={v:.3f}" for a, ps in sorted(params.items()) for p, v in sorted(ps.items())))
    # what the fitted GEMM rates are as a share of their GPUs' MAMF best-shape rates: architectures
    # without a fit of their own (Blackwell, CDNA3) train at this share of their MAMF measurements
    shares = [v / ceiling[(a, p)] for a, ps in params.items() for p, v in ps.items() if p in ("gemm", "gemm_fp8")
              and ceiling.get((a, p))]
    if shares:
        params["default"] = {"mamf_share": round(statistics.median(shares), 4)}
    fitted = run(validation_dir, rows=train, workers=workers, overrides=params)
    held_out = run(validation_dir, rows=test, workers=workers, overrides=params)
    return {"params": {a: dict(sorted(p.items())) for a, p in sorted(params.items()) if p},
            "fitted_rows": len(train), "held_out_rows": len(test),
            "fitted_median_abs_error": round(median_abs(fitted), 4),
            "held_out_median_abs_error": round(median_abs(held_out), 4)}


def write(result: dict, path: Path | None = None) -> Path:
    path = path or Path(data_dir()) / "catalog" / "calibrated.yaml"
    header = ("# Written by `simulate calibrate` (sim/calibrate.py): GEMM and flash-attention efficiencies per\n"
              "# GPU architecture, fitted on the even-numbered rows of validation/runs.csv (published measured\n"
              "# runs; sources in validation/runs.csv, shared/reference/validation/SOURCES.md and\n"
              "# validation/EXTRA_SOURCES.md), each source weighing the same, and checked on the odd ones.\n"
              "# They replace the MAMF best-shape GEMM measurements of gpus.yaml and the published kernel\n"
              "# rates of efficiency.yaml, which real training (framework overheads, shapes, sustained clocks,\n"
              "# the software stack of each source) does not reach.\n")
    body = {"gpu_arch": result["params"],
            "fit": {k: v for k, v in result.items() if k != "params"}}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path
