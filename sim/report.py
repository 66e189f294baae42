"""Renderers: terminal summary, JSON object, CSV row (SI units; the unit is in every field name).

Glossary: ``*_bytes`` bytes; ``*_flop`` floating-point operations; ``params`` parameter count;
memory figures are per GPU at that GPU's peak; the text summary shows GiB (2**30 bytes).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sim.analysis import Analysis
from sim.errors import ScenarioError
from sim.units import GB, GiB

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")


def to_dict(a: Analysis) -> dict[str, Any]:
    """Everything in one JSON-ready mapping (SI units)."""
    s, plan, peak = a.scenario, a.scenario.plan, a.peak
    w, g, o = a.state_bytes_per_param
    return {
        "name": s.name,
        "scenario_file": s.file,
        "model": s.model.name,
        "params": s.model.total_params,
        "gpu": s.cluster.gpu.name,
        "gpus": plan.gpus,
        "cluster": s.cluster.describe(),
        "plan": {"tp": plan.tp, "pp": plan.pp, "cp": plan.cp, "dp": plan.dp, "zero": plan.zero,
                 "sequence_parallel": plan.sequence_parallel, "recompute": plan.recompute,
                 "schedule": plan.schedule, "virtual_stages": plan.virtual_stages,
                 "layers_per_stage": [plan.stage_layers(i) for i in range(plan.pp)],
                 "seq_len": plan.seq_len, "global_batch_size": plan.global_batch_size,
                 "micro_batch_size": plan.micro_batch_size, "microbatches": plan.microbatches,
                 "precision": plan.precision, "optimizer": plan.optimizer, "grad_dtype": plan.grad_dtype,
                 "flash_attention": plan.flash_attention},
        "tokens_per_step": plan.tokens_per_step,
        "flops_per_step": a.flops.model_flop,
        "hardware_flops_per_step": a.flops.hardware_flop,
        "flops_per_token": a.flops_per_token,
        "model_state_bytes_per_param": {"weights": w, "gradients": g, "optimizer": o, "total": w + g + o},
        "model_state_bytes": a.model_state_bytes,
        "fits": a.fits,
        "peak_memory_bytes": peak.total,
        "capacity_bytes": peak.capacity,
        "shortfall_bytes": max(d.shortfall for d in a.stages),
        "peak_stage": peak.stage,
        "memory_breakdown_bytes": peak.breakdown(),
        **(_timing_dict(a) if a.step is not None else {}),
        "stages": [{"stage": d.stage, "layers": d.layers, "params": d.params,
                    "microbatches_in_flight": d.microbatches_in_flight, "total_bytes": d.total,
                    "fits": d.fits, "shortfall_bytes": d.shortfall, **{f"{k}_bytes": v for k, v in d.breakdown().items()},
                    "detail_bytes": d.detail} for d in a.stages],
    }


def _timing_dict(a: Analysis) -> dict[str, Any]:
    step = a.step
    assert step is not None
    return {
        **a.timing(),
        "time_breakdown_s": a.time_breakdown_s,
        "busiest_links": [{"link": name, "busy_fraction": frac} for name, frac in step.link_busy],
        "simulated_devices": len(step.devices),
        "simulation_mode": "full" if step.full else "symmetric",
        "device_peaks_bytes": [{"device": r.vertex, "stage": r.stage, "peak_bytes": r.peak_bytes,
                                "breakdown_bytes": r.peak_breakdown} for r in step.devices],
    }


def to_json(a: Analysis) -> str:
    return json.dumps(to_dict(a), indent=2, sort_keys=False)


def csv_row(a: Analysis) -> dict[str, Any]:
    """One flat row; column names carry their unit."""
    d, plan = to_dict(a), a.scenario.plan
    row = {"name": d["name"], "scenario_file": d["scenario_file"], "model": d["model"], "params": d["params"],
           "gpu": d["gpu"], "gpus": d["gpus"]}
    row.update({k: d["plan"][k] for k in ("tp", "pp", "cp", "dp", "zero", "sequence_parallel", "recompute",
                                          "schedule", "virtual_stages", "seq_len", "global_batch_size",
                                          "micro_batch_size", "precision", "optimizer", "grad_dtype")})
    row.update({"tokens_per_step": plan.tokens_per_step, "model_flop_per_step": d["flops_per_step"],
                "hardware_flop_per_step": d["hardware_flops_per_step"], "model_flop_per_token": d["flops_per_token"],
                "fits": d["fits"], "peak_memory_bytes": d["peak_memory_bytes"], "capacity_bytes": d["capacity_bytes"],
                "shortfall_bytes": d["shortfall_bytes"], "peak_stage": d["peak_stage"]})
    row.update({f"peak_{k}_bytes": v for k, v in d["memory_breakdown_bytes"].items()})
    if a.step is not None:
        row.update(a.timing())
        row.update({f"time_{k}_s": v for k, v in a.time_breakdown_s.items()})
    return row


def append_csv(a: Analysis, path: str | Path) -> None:
    """Append one row to ``path``, writing the header when the file is new or empty."""
    path = Path(path)
    row = csv_row(a)
    header = list(row)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as fh:
            existing = next(csv.reader(fh), [])
        if existing != header:
            raise ScenarioError(f"{path} has other columns than this simulator writes; expected a new file or one "
                                f"written by the same version", key="--csv")
        write_header = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_header = True
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        if write_header:
            writer.writeheader()
        writer.writerow(row)


def _gib(x: float) -> str:
    return f"{x / GiB:11.2f}"


def to_text(a: Analysis) -> str:
    """The terminal summary."""
    s, plan, peak = a.scenario, a.scenario.plan, a.peak
    w, g, o = a.state_bytes_per_param
    out = io.StringIO()
    p = lambda line="": print(line, file=out)  # noqa: E731
    p(f"clustersim: {s.name}" + (f"  ({s.file})" if s.file else ""))
    if s.description:
        p(f"  {s.description.splitlines()[0]}")
    p(f"Model      {s.model.describe()}")
    p(f"Cluster    {s.cluster.describe()}")
    p(f"Plan       {plan.describe()}")
    recompute = "no recomputation" if plan.recompute == "none" else f"{plan.recompute} recomputation"
    p(f"FLOPs      {a.flops.model_flop:.4g} model FLOP per step ({a.flops_per_token:.4g} per token, "
      f"{plan.tokens_per_step:,} tokens); {a.flops.hardware_flop:.4g} hardware FLOP with {recompute}")
    p(f"State      {w + g + o} bytes/param = {w} weights + {g} gradients + {o} optimizer -> "
      f"{a.model_state_bytes / GB:,.1f} GB for {s.model.total_params / 1e9:.2f} B params before sharding")
    p()
    p(f"Memory per GPU (GiB), one GPU per pipeline stage; usable capacity {peak.capacity / GiB:.2f} GiB")
    p(f"{'stage':>5} {'layers':>6} {'mb':>5} " + " ".join(f"{c:>11}" for c in CATEGORIES)
      + f" {'total':>11} {'headroom':>9}  fits")
    shown = a.stages if len(a.stages) <= 12 else a.stages[:5] + a.stages[-5:]
    for i, d in enumerate(shown):
        if len(a.stages) > 12 and i == 5:
            p(f"{'...':>5}")
        p(f"{d.stage:>5} {d.layers:>6} {d.microbatches_in_flight:>5.4g} "
          + " ".join(_gib(v) for v in d.breakdown().values())
          + f" {_gib(d.total)} {(d.capacity - d.total) / GiB:9.2f}  {'yes' if d.fits else 'NO'}")
    p()
    verdict = "fits" if a.fits else f"does NOT fit: {max(d.shortfall for d in a.stages) / GiB:.2f} GiB missing"
    p(f"Peak       stage {peak.stage}: {peak.total / GiB:.2f} GiB of {peak.capacity / GiB:.2f} GiB "
      f"({peak.total / peak.capacity:.0%}) -> {verdict}")
    if a.step is not None:
        t = a.timing()
        p()
        p(f"Step       {t['step_time_s']:.4g} s  |  {t['tokens_per_s']:,.0f} tokens/s  |  "
          f"{t['tflops_per_gpu']:.1f} TFLOP/s per GPU  |  MFU {t['mfu']:.1%}  HFU {t['hfu']:.1%}")
        parts = a.time_breakdown_s
        p("Breakdown  " + ", ".join(f"{k.replace('_', ' ')} {v:.4g} s ({v / t['step_time_s']:.0%})"
                                    for k, v in parts.items()) + "  (stage 0)")
        if a.step.link_busy:
            p("Busiest    " + ", ".join(f"{n} {f:.0%}" for n, f in a.step.link_busy[:4]))
        mode = "every device" if a.step.full else "one device per stage, the others by symmetry"
        p(f"Engine     {a.step.ops:,} ops, {len(a.step.devices)} devices simulated ({mode})")
    return out.getvalue()
