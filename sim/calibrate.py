"""``simulate calibrate``: fit the GEMM efficiencies per GPU architecture on published runs.

The cost model has a handful of free constants; the ones that move step times most are the
achieved GEMM rates (16-bit, and fp8 on Hopper). They are fitted here on a *training* half of the
validation set (rows with an even number) and checked on the other half, which the fit never
sees. The fit is a fixed-point iteration per (architecture, parameter): efficiency x= the median
of predicted / measured step time over the training rows that parameter governs (16-bit rows for
``gemm``, fp8 rows for ``gemm_fp8``), which drives the median signed error to zero. Everything else
(attention, memory bandwidth, links) keeps its sourced value. The result goes to
``topologies/catalog/calibrated.yaml``, with the rows it was fitted on and the errors.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from sim.efficiency import calibrated, gpu_efficiency
from sim.hardware import data_dir, get_gpu
from sim.validate import RowResult, load_rows, run

BOUNDS = (0.2, 0.95)


def is_training(row: dict) -> bool:
    """The fitted half: rows whose number is even."""
    return int(row["row_id"].lstrip("T")) % 2 == 0


def _parameter(row: dict, validation_dir: Path) -> tuple[str, str]:
    """(architecture, parameter) a row's step time depends on most."""
    scenario = yaml.safe_load((validation_dir / row["scenario"]).read_text())
    arch = get_gpu(row["gpu"]).arch
    return arch, "gemm_fp8" if scenario["training"]["precision"] == "fp8" else "gemm"


def _start(arch: str, param: str, gpu_key: str) -> float:
    current = calibrated().get(arch, {}).get(param)
    if current is not None:
        return current
    return gpu_efficiency(get_gpu(gpu_key), "fp8" if param == "gemm_fp8" else "bf16").gemm


def median_abs(results: list[RowResult]) -> float:
    errs = [abs(r.rel_error) for r in results if not r.error]
    return statistics.median(errs) if errs else float("nan")


def fit(validation_dir: Path, *, iterations: int = 4, workers: int = 2, log=print) -> dict:
    rows = load_rows(validation_dir)
    train = [r for r in rows if is_training(r)]
    test = [r for r in rows if not is_training(r)]
    which = {r["row_id"]: _parameter(r, validation_dir) for r in rows}
    params: dict[str, dict[str, float]] = defaultdict(dict)
    for r in train:
        arch, p = which[r["row_id"]]
        params[arch].setdefault(p, _start(arch, p, r["gpu"]))
    for it in range(iterations):
        results = run(validation_dir, rows=train, workers=workers, overrides=params)
        ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
        for res in results:
            if not res.error:
                ratios[which[res.row_id]].append(res.predicted_step_s / res.measured_step_s)
        for (arch, p), rs in sorted(ratios.items()):
            new = min(max(params[arch][p] * statistics.median(rs), BOUNDS[0]), BOUNDS[1])
            params[arch][p] = round(new, 4)
        log(f"iteration {it + 1}: median |error| on fitted rows {median_abs(results):.1%}; "
            + ", ".join(f"{a}.{p}={v:.3f}" for a, ps in sorted(params.items()) for p, v in sorted(ps.items())))
    fitted = run(validation_dir, rows=train, workers=workers, overrides=params)
    held_out = run(validation_dir, rows=test, workers=workers, overrides=params)
    return {"params": {a: dict(sorted(p.items())) for a, p in sorted(params.items())},
            "fitted_rows": len(train), "held_out_rows": len(test),
            "fitted_median_abs_error": round(median_abs(fitted), 4),
            "held_out_median_abs_error": round(median_abs(held_out), 4)}


def write(result: dict, path: Path | None = None) -> Path:
    path = path or Path(data_dir()) / "catalog" / "calibrated.yaml"
    header = ("# Written by `simulate calibrate` (sim/calibrate.py): GEMM efficiencies per GPU architecture\n"
              "# fitted on the even-numbered rows of validation/runs.csv (published measured runs; sources in\n"
              "# validation/runs.csv and shared/reference/validation/SOURCES.md) and checked on the odd ones.\n"
              "# They replace the MAMF best-shape GEMM measurements of gpus.yaml, which real training GEMMs\n"
              "# (framework overheads, shapes, sustained clocks) do not reach.\n")
    body = {"gpu_arch": result["params"],
            "fit": {k: v for k, v in result.items() if k != "params"}}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path
