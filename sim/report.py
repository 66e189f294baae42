"""Renderers: terminal summary, JSON object, CSV row (SI units; the unit is in every field name).

Glossary: ``*_bytes`` bytes; ``*_flop`` floating-point operations; ``params`` parameter count;
memory figures are per GPU at that GPU's peak; the text summary shows GiB (2**30 bytes). Run planning
(:mod:`sim.planning`): ``tokens`` and ``steps`` are counts, ``*_s`` seconds, ``*_days`` days,
``gpu_hours`` GPU-hours, ``*_usd`` US dollars, ``*_w`` watts, ``*_j`` joules, ``*_kwh`` kilowatt-hours.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sim.analysis import Analysis
from sim.memory import BNB_STATE_BLOCK, OPTIMIZER_STATE_BYTES
from sim.errors import ScenarioError
from sim.planning import DEFAULT_PUE, J_PER_KWH, LOSSES, SECONDS_PER_DAY, misconfiguration, run_plan
from sim.units import GB, GiB

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")
# CSV columns that every row carries, empty when their part was not computed (one header for a sweep)
TIMING_COLUMNS = ("step_time_s", "tokens_per_s", "mfu", "hfu", "tflops_per_gpu")     # Analysis.timing()
TIME_PARTS = ("compute", "overlap_slowdown", "exposed_comm", "bubble", "optimizer", "other")              # the engine's breakdown
RUN_COLUMNS = ("tokens", "tokens_rule", "steps", "time_to_train_s", "time_to_train_days",
               "rule_6pd_time_to_train_days", "nodes", "gpu_hours",
               "price_per_gpu_hour_usd", "cost_usd", "gpu_busy_fraction", "gpu_power_w", "node_host_power_w", "pue",
               "avg_power_w", "energy_j", "energy_kwh")                                # RunPlan.to_dict()
# fine-tuning and offload (Analysis.finetune_summary()); plain pre-training rows have method "full"
FINETUNE_COLUMNS = ("finetune_method", "trainable_params", "base_weight_dtype", "offload_optimizer", "offload_params",
                    "host_per_gpu_bytes", "host_memory_per_node_bytes", "host_fits", "paged_out_bytes")
FLAG_COLUMNS = ("likely_misconfigured", "hardware_flop_per_s_per_gpu", "misconfigured_threshold_flop_per_s",
                "biggest_loss", *(f"loss_{k}_s" for k in LOSSES))


def to_dict(a: Analysis, *, pue: float = DEFAULT_PUE) -> dict[str, Any]:
    """Everything in one JSON-ready mapping (SI units). ``run`` (time to train, GPU-hours, cost, energy)
    when the scenario gives ``training.tokens`` and a step was simulated; ``flag`` whenever a step was."""
    s, plan, peak = a.scenario, a.scenario.plan, a.peak
    run, flag = run_plan(a, pue=pue), misconfiguration(a)
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
                 "dp_shard": plan.dp_shard,
                 "zero3_impl": plan.zero3_impl, "kernel_arch": plan.kernel_arch,
                 "attention_kernel_arch": plan.attention_kernel_arch,
                 "sequence_parallel": plan.sequence_parallel, "tp_impl": plan.tp_impl,
                 "tp_comm_overlap": plan.tp_comm_overlap, "tp_backward_overlap": plan.tp_backward_overlap,
                 "recompute": plan.recompute, "recompute_layers": plan.recompute_layers,
                 "recompute_early_stop": plan.recompute_early_stop,
                 "schedule": plan.schedule, "virtual_stages": plan.virtual_stages,
                 "layers_per_stage": [plan.stage_layers(i) for i in range(plan.pp)],
                 "seq_len": plan.seq_len, "global_batch_size": plan.global_batch_size,
                 "micro_batch_size": plan.micro_batch_size, "microbatches": plan.microbatches,
                 "precision": plan.precision, "optimizer": plan.optimizer, "optimizer_impl": plan.optimizer_impl,
                 "implementation": plan.implementation, "grad_dtype": plan.grad_dtype,
                 "optimizer_dtype": plan.optimizer_dtype,
                 "flash_attention": plan.flash_attention, "offload_optimizer": plan.offload_optimizer,
                 "offload_params": plan.offload_params},
        "finetune": a.finetune_summary(),
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
        **({"run": run.to_dict()} if run is not None else {}),
        **({"flag": flag.to_dict()} if flag is not None else {}),
        "stages": [{"stage": d.stage, "layers": d.layers, "params": d.params,
                    "microbatches_in_flight": d.microbatches_in_flight, "total_bytes": d.total,
                    "fits": d.fits, "shortfall_bytes": d.shortfall, **{f"{k}_bytes": v for k, v in d.breakdown().items()},
                    "trainable_params": d.trainable_params, "host_bytes": d.host, "pageable_bytes": d.pageable,
                    "paged_out_bytes": d.paged_out, "detail_bytes": d.detail} for d in a.stages],
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


def to_json(a: Analysis, *, pue: float = DEFAULT_PUE) -> str:
    return json.dumps(to_dict(a, pue=pue), indent=2, sort_keys=False)


def csv_row(a: Analysis, *, pue: float = DEFAULT_PUE) -> dict[str, Any]:
    """One flat row; column names carry their unit. The column set is the same for every analysis
    (timing, run and flag columns are empty (None) when not computed), so rows share one header."""
    d, plan = to_dict(a, pue=pue), a.scenario.plan
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
    ft = d["finetune"]
    row.update({"finetune_method": ft["method"], "trainable_params": ft["trainable_params"],
                "base_weight_dtype": ft.get("base_weight_dtype"),
                "offload_optimizer": ft["offload_optimizer"], "offload_params": ft["offload_params"],
                "host_per_gpu_bytes": ft["host_bytes_per_gpu"], "host_memory_per_node_bytes": ft["host_memory_bytes_per_node"],
                "host_fits": ft["host_fits"], "paged_out_bytes": ft["paged_out_bytes"]})
    assert tuple(row)[-len(FINETUNE_COLUMNS):] == FINETUNE_COLUMNS
    timing = a.timing() if a.step is not None else {}
    parts = a.time_breakdown_s if a.step is not None else {}
    assert not timing or tuple(timing) == TIMING_COLUMNS, tuple(timing)
    assert not parts or tuple(parts) == TIME_PARTS, tuple(parts)
    row.update({k: timing.get(k) for k in TIMING_COLUMNS})
    row.update({f"time_{k}_s": parts.get(k) for k in TIME_PARTS})
    run, flag = d.get("run") or {}, d.get("flag")
    row.update({k: run.get(k) for k in RUN_COLUMNS})
    row.update(dict.fromkeys(FLAG_COLUMNS))
    if flag is not None:
        row.update({"likely_misconfigured": flag["likely_misconfigured"],
                    "hardware_flop_per_s_per_gpu": flag["hardware_flops_per_gpu_per_s"],
                    "misconfigured_threshold_flop_per_s": flag["threshold_flops_per_s"],
                    "biggest_loss": flag["biggest_loss"],
                    **{f"loss_{k}_s": flag["losses_s"][k] for k in LOSSES}})
    return row


def append_csv(a: Analysis, path: str | Path, *, pue: float = DEFAULT_PUE) -> None:
    """Append one row to ``path``, writing the header when the file is new or empty."""
    path = Path(path)
    row = csv_row(a, pue=pue)
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


def _num(x: float) -> str:
    """A bytes-per-parameter figure: an integer as such, else up to four significant digits."""
    return f"{x:g}" if float(x).is_integer() else f"{x:.4g}"


def _gib(x: float) -> str:
    return f"{x / GiB:11.2f}"


def _count(x: float) -> str:
    """15.6e12 -> '15.6 T' (decimal prefixes; plain with thousands separators below 10^6)."""
    for factor, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:,.0f}"


def _energy(joules: float) -> str:
    kwh = joules / J_PER_KWH
    for factor, unit in ((1e6, "GWh"), (1e3, "MWh")):
        if kwh >= factor:
            return f"{kwh / factor:,.3g} {unit}"
    return f"{kwh:,.3g} kWh"


def _power(watts: float) -> str:
    for factor, unit in ((1e6, "MW"), (1e3, "kW")):
        if watts >= factor:
            return f"{watts / factor:,.3g} {unit}"
    return f"{watts:,.3g} W"


def _run_line(a: Analysis, pue: float) -> str | None:
    """The "Run" line: tokens, steps, time to train, GPU-hours, cost, energy."""
    if a.scenario.training.tokens is None:
        return None
    run = run_plan(a, pue=pue)
    if run is None:
        return "Run        training.tokens is set, but the run plan needs the step simulation (drop --memory-only)"
    rule = " (chinchilla: 20 per parameter)" if run.tokens_rule else ""
    parts = [f"{_count(run.tokens)} tokens{rule} in {run.steps:,} steps: {run.time_to_train_days:,.1f} days on "
             f"{run.gpus:,} GPU{'s' if run.gpus != 1 else ''}", f"{_count(run.gpu_hours)} GPU-hours"]
    if run.cost_usd is not None:
        parts.append(f"${_count(run.cost_usd)} at ${run.price_per_gpu_hour_usd:g}/GPU-hour")
    if run.energy_j is not None:
        pue_note = f", PUE {run.pue:g}" if run.pue != 1.0 else ""
        parts.append(f"{_energy(run.energy_j)} (avg {_power(run.avg_power_w)}{pue_note})")
    else:
        parts.append("energy unknown (the GPU has no tdp)")
    if run.rule_6pd_time_to_train_s is None:      # LoRA / QLoRA: the 6 P rule does not apply
        return "Run        " + ", ".join(parts)
    achieved = a.flops.model_flop / (run.step_time_s * run.gpus)
    achieved_6p = 6.0 * a.scenario.model.total_params * a.scenario.plan.tokens_per_step / (run.step_time_s * run.gpus)
    six_pd_6p_days = 6.0 * a.scenario.model.total_params * run.tokens / (run.gpus * achieved_6p) / SECONDS_PER_DAY
    check = (f"Check      6*P*D / (GPUs x achieved FLOP/s): {six_pd_6p_days:,.1f} days at the achieved "
             f"{achieved_6p / 1e12:.1f} TFLOP/s per GPU counted as 6*P per token; "
             f"{run.rule_6pd_time_to_train_s / SECONDS_PER_DAY:,.1f} days at the {achieved / 1e12:.1f} TFLOP/s counted with the "
             f"attention core ({a.flops_per_token / (6.0 * a.scenario.model.total_params) - 1:+.1%} FLOPs per token at "
             f"{a.scenario.plan.seq_len:,}-token sequences, which 6*P*D leaves out)")
    return "Run        " + ", ".join(parts) + "\n" + check


def to_text(a: Analysis, *, pue: float = DEFAULT_PUE) -> str:
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
    recompute = "no recomputation" if plan.recompute == "none" else \
        f"{plan.recompute} recomputation" + (" (early stop)" if plan.recompute_early_stop else "")
    p(f"FLOPs      {a.flops.model_flop:.4g} model FLOP per step ({a.flops_per_token:.4g} per token, "
      f"{plan.tokens_per_step:,} tokens); {a.flops.hardware_flop:.4g} hardware FLOP with {recompute}")
    ft = a.finetune_summary()
    if plan.finetune.adapters:
        frozen = (f"{ft['base_linear_bytes_per_param']:.4g} B/param ({ft['frozen_weight_bytes_per_param']:.4g} B/param "
                  f"with the embedding, output layer and norms)")
        quant = " + double quant" if ft["double_quant"] and ft["base_weight_dtype"] in ("nf4", "fp4") else ""
        p(f"Trained    {ft['method']} r{ft['rank']} on {','.join(ft['target_modules'])}: "
          f"{ft['trainable_params'] / 1e9:.3g} B trainable params ({ft['trainable_fraction']:.2%}) at "
          f"{_num(w)}+{_num(g)}+{_num(o)} B/param; {s.model.total_params / 1e9:.2f} B frozen, linears "
          f"{ft['base_weight_dtype']}{quant} at {frozen}")
        p(f"State      {a.model_state_bytes / GB:,.1f} GB of model states before sharding")
    else:
        p(f"State      {_num(w + g + o)} bytes/param = {_num(w)} weights + {_num(g)} gradients + {_num(o)} optimizer -> "
          f"{a.model_state_bytes / GB:,.1f} GB for {s.model.total_params / 1e9:.2f} B params before sharding")
    if plan.optimizer.endswith("adamw-8bit"):
        master = o - OPTIMIZER_STATE_BYTES[plan.optimizer]
        lead = f"{_num(master)} fp32 master + " if master else ""
        p(f"           optimizer = {lead}1 + 1 byte moments + {8 / BNB_STATE_BLOCK:.4g} fp32 "
          f"absmax per {BNB_STATE_BLOCK} values (bitsandbytes block-wise 8-bit states)")
    if "adafactor_factored_state_bytes" in ft:
        p(f"Adafactor  factored second moments: {ft['adafactor_factored_state_bytes'] / GB:,.3g} GB in all")
    if ft["offload_optimizer"] or ft["offload_params"]:
        what = " + ".join(w for w, on in (("optimizer", ft["offload_optimizer"]), ("params", ft["offload_params"])) if on)
        cap = ft["host_capacity_bytes"]
        host_verdict = ("fits" if ft["host_fits"] else "does NOT fit") if cap is not None else "no host memory given"
        p(f"Offload    {what} on the CPU: {ft['host_bytes_per_gpu'] / GB:,.3g} GB per GPU, "
          f"{ft['host_memory_bytes_per_node'] / GB:,.3g} of "
          f"{'?' if cap is None else f'{cap / GB:,.3g}'} GB host memory per node -> {host_verdict}")
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
    shortfall = max(d.shortfall for d in a.stages)
    verdict = "fits" if a.fits else (f"does NOT fit: {shortfall / GiB:.2f} GiB missing" if shortfall > 0 else
                                     "GPU memory fits, but the offloaded states do NOT fit the host memory")
    if a.fits and ft["paged_out_bytes"] > 0:
        verdict = f"fits with {ft['paged_out_bytes'] / GiB:.2f} GiB of optimizer states paged to CPU memory"
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
        flag = misconfiguration(a)
        if flag is not None and flag.likely_misconfigured:
            p(f"Flag       {flag.describe(a.step_time_s)}")
    run_line = _run_line(a, pue)
    if run_line:
        p(run_line)
    return out.getvalue()
