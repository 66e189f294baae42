"""Set the simulator's predictions beside what ``measure_h100.py`` measured on a real H100.

    python validation/device/compare.py [validation/device/h100-2026-11-25] [--out reports/device_h100.md]

Parts: the training runs (step time, and peak memory against PyTorch's peak allocated bytes plus the
CUDA context), GEMM rates across shapes relative to large GEMMs (the simulator's shape factor), the
flash-attention rate, DRAM bandwidth and the per-kernel gap. The simulator's inputs are its own data
(catalog, calibrated efficiencies), never these measurements, except where ``efficiency.yaml`` cites
them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from sim.analysis import analyze
from sim.compute import gemm_shape_factor
from sim.efficiency import gpu_efficiency
from sim.hardware import get_gpu
from sim.scenario import scenario_from_mapping

HERE = Path(__file__).resolve().parent
GiB = 2**30
CONTEXT = 400 * 2**20   # the CUDA context, which PyTorch's allocator statistics leave out (memory.cuda_context_bytes)


def scenario_of(run: dict) -> dict:
    """The scenario of one measured training run (measure_h100.py's Llama and its optimizer)."""
    return {
        "name": f"device {run['model']} seq {run['seq']} mbs {run['mbs']}" + (" recompute" if run["recompute"] else ""),
        "model": {"name": run["model"], "layers": run["layers"], "hidden": run["hidden"], "heads": run["heads"],
                  "kv_heads": run["heads"], "ffn_hidden": run["ffn"], "vocab": run["vocab"],
                  "max_seq_len": run["seq"], "ffn_kind": "swiglu", "norm": "rmsnorm", "position": "rope",
                  "bias": False, "dropout": False, "tied_embeddings": False},
        "cluster": {"topology": "dgx-h100", "nodes": 1, "gpus": 1},
        "training": {"seq_len": run["seq"], "global_batch_size": run["mbs"], "micro_batch_size": run["mbs"],
                     "precision": "bf16", "optimizer": "adamw", "optimizer_impl": "fused", "grad_dtype": "fp32",
                     "flash_attention": True, "implementation": "torch"},
        "parallelism": {"tp": 1, "pp": 1, "dp": 1, "zero": 0,
                        "recompute": "full" if run["recompute"] else "none",
                        # torch.utils.checkpoint(use_reentrant=False): early stop on by default since 2.1
                        "recompute_early_stop": bool(run["recompute"])},
        # F.cross_entropy on bf16 logits keeps its bf16 log-probabilities, and its backward their gradient
        # and the logits' gradient: 3 x 2 B per logit = 1.5 fp32 copies
        "memory": {"logits_copies": 1.5},
    }


HF_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}


def hf_scenario_of(run: dict) -> dict:
    """The scenario of one measured transformers + PEFT LoRA run (measure_hf.py)."""
    return {
        "name": f"device HF LoRA r{run['rank']} seq {run['seq']} mbs {run['mbs']}",
        "model": run["model"],
        "cluster": {"topology": "dgx-h100", "nodes": 1, "gpus": 1},
        "training": {"seq_len": run["seq"], "global_batch_size": run["mbs"], "micro_batch_size": run["mbs"],
                     "precision": "bf16", "optimizer": "adamw", "optimizer_impl": "unfused",
                     "implementation": "huggingface"},
        "parallelism": {"tp": 1, "pp": 1, "dp": 1, "zero": 0, "recompute": "full" if run["checkpointing"] else "none",
                        "recompute_early_stop": bool(run["checkpointing"])},
        "finetune": {"method": "lora", "rank": run["rank"], "alpha": 2 * run["rank"],
                     "target_modules": [HF_TARGETS[t] for t in run["targets"]], "base_weight_dtype": "bf16",
                     "adapter_dtype": "fp32"},
        # transformers 5's ForCausalLMLoss upcasts the logits (logits.float()) inside the loss; the
        # backward holds the saved fp32 log-probabilities, their gradient, the fp32 logits' gradient and
        # its bf16 cast: 4 + 4 + 4 + 2 B per logit = 3.5 fp32 copies (the model's bf16 logits are dropped
        # with the outputs, as Trainer.compute_loss does)
        "memory": {"logits_copies": 3.5},
    }


def hf_full_scenario_of(run: dict) -> dict:
    """A measured full fine-tuning run of transformers' LlamaForCausalLM (measure_hf.py --full): the
    plain-PyTorch run's scenario with transformers' layers and loss."""
    data = scenario_of({**run, "recompute": run["checkpointing"]})
    data["training"]["implementation"] = "huggingface"
    data["memory"] = {"logits_copies": 3.5}      # transformers 5's ForCausalLMLoss (hf_scenario_of)
    return data


def training_rows(runs: list[dict], make=scenario_of) -> list[dict]:
    """Each run with the simulator's step time, static peak (the report's) and the step replay's peak."""
    out = []
    for run in runs:
        if "error" in run:
            a = analyze(scenario_from_mapping(make(run)), simulate_step=False)
            out.append({"run": run, "fits": a.fits, "pred_peak": a.peak.total})
            continue
        a = analyze(scenario_from_mapping(make(run)))
        out.append({"run": run, "fits": a.fits, "pred_step": a.step_time_s, "pred_peak": a.peak.total,
                    "pred_replay_peak": max(d.peak_bytes for d in a.step.devices)})
    return out


def _section(title: str, intro: str, runs: list[dict], make, label) -> list[str]:
    """A report section: heading, what was run, and the runs (scenarios by ``make``) in a table."""
    return [f"## {title}", "", intro, ""] + _run_table(training_rows(runs, make), label)


def _run_table(rows: list[dict], label) -> list[str]:
    """The runs' table and a line of median and largest errors."""
    lines = ["| run | measured s | predicted s | error | measured peak GiB | predicted peak GiB | error "
             "| replay peak GiB | error | reserved GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    step_errs, mem_errs = [], []
    for r in rows:
        run = r["run"]
        if "error" in run:
            lines.append(f"| {label(run)} | OOM | - | - | - | {r['pred_peak'] / GiB:.1f} "
                         f"({'fits' if r['fits'] else 'does not fit'}) | - | - | - | - |")
            continue
        se = r["pred_step"] / run["step_s"] - 1
        measured_peak = run["peak_allocated_bytes"] + CONTEXT
        me = r["pred_peak"] / measured_peak - 1
        step_errs.append(abs(se))
        mem_errs.append(abs(me))
        lines.append(f"| {label(run)} | {run['step_s']:.3f} | {r['pred_step']:.3f} | {_pct(se)} | {measured_peak / GiB:.2f} "
                     f"| {r['pred_peak'] / GiB:.2f} | {_pct(me)} | {r['pred_replay_peak'] / GiB:.2f} "
                     f"| {_pct(r['pred_replay_peak'] / measured_peak - 1)} | {run['peak_reserved_bytes'] / GiB:.1f} |")
    return lines + ["", f"Median |error| over {len(step_errs)} runs: step time {100 * statistics.median(step_errs):.1f}% "
                    f"(max {100 * max(step_errs):.1f}%), peak memory {100 * statistics.median(mem_errs):.1f}% "
                    f"(max {100 * max(mem_errs):.1f}%).", ""]


def gemm_rows(gemm: list[dict]) -> tuple[float, list[dict]]:
    """Each bf16 GEMM's rate over the large-GEMM plateau, and the simulator's shape factor over its
    value for an 8192^3 GEMM."""
    gpu = get_gpu("h100-sxm")
    eff = gpu_efficiency(gpu, "bf16")
    ok = [r for r in gemm if "flop_per_s" in r and r["dtype"] == "bf16"]
    tiles = lambda r: math.ceil(r["m"] / 128) * math.ceil(r["n"] / 256)  # noqa: E731
    plateau = statistics.median(r["flop_per_s"] for r in ok if r["group"] != "square" and tiles(r) >= 2 * gpu.sm_count
                                and r["k"] >= 2048)
    ref = gemm_shape_factor((8192, 8192, 8192), gpu.sm_count, eff)
    out = []
    for r in ok:
        if r["group"] in ("square",):
            continue
        pred = gemm_shape_factor((r["m"], r["n"], r["k"]), gpu.sm_count, eff) / ref
        out.append({**r, "measured_share": r["flop_per_s"] / plateau, "predicted_share": pred})
    return plateau, out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def report(data_dir: Path) -> str:
    load = lambda name: json.loads((data_dir / f"{name}.json").read_text())  # noqa: E731
    env = load("env")
    lines = [f"# Simulator vs one real H100 ({env['gpu']}, {env['date_utc'][:10]})", "",
             f"Measured with `validation/device/measure_h100.py` (PyTorch {env['torch']}, CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}; {env['sm_count']} SMs); predictions by `validation/device/compare.py` from "
             "the simulator's own catalog and calibrated efficiencies. Raw figures: "
             f"`{data_dir.relative_to(HERE.parent.parent)}/`.", ""]
    # ---- training runs
    train, hf, full = load("training"), load("hf_lora"), load("hf_full")
    v = hf["versions"]
    lines += _section(
        "Training step on one H100, plain PyTorch",
        "Llama-style blocks (RMSNorm, RoPE, SwiGLU, no bias, untied, MHA) written as plain PyTorch modules, "
        "eager, bf16 weights with fp32 gradient buffers, fp32 master weights and torch's fused AdamW "
        "(Megatron-LM's scheme, 18 B per parameter), SDPA's FlashAttention-2 backend, "
        "`torch.utils.checkpoint(use_reentrant=False)` per block when recomputing; one microbatch per step. "
        "Scenarios: `training.implementation: torch`, `memory.logits_copies: 1.5`. Measured peak: PyTorch's peak allocated bytes plus the "
        "400 MiB CUDA context; the simulator's peak is the report's (a static sum), the replay peak the "
        "step replay's memory timeline.",
        train, scenario_of,
        lambda run: f"{run['model']} seq {run['seq']} mbs {run['mbs']}" + (" recompute" if run["recompute"] else ""))
    lines += _section(
        "LoRA fine-tuning of Llama-2-7B with Hugging Face transformers + PEFT",
        f"transformers {v['transformers']}, PEFT {v['peft']}, PyTorch {v['torch']}: `LlamaForCausalLM` "
        "(random bf16 weights), SDPA attention (PyTorch's default dispatch on this H100: "
        "cuDNN's flash kernels), PEFT LoRA with fp32 adapters, torch AdamW, gradient checkpointing "
        "(non-reentrant) on or off. Scenarios: `training.implementation: huggingface`, `memory.logits_copies: 3.5`.",
        hf["runs"], hf_scenario_of,
        lambda run: (f"seq {run['seq']} mbs {run['mbs']} r{run['rank']} on {len(run['targets'])} linears"
                     + (" checkpointed" if run["checkpointing"] else "")))
    lines += _section(
        "Full fine-tuning with Hugging Face transformers",
        "The plain-PyTorch runs' 1.4B model (h2048-L24) as transformers' `LlamaForCausalLM` (SDPA: cuDNN's "
        "kernels), with the same Megatron-style mixed precision, gradient checkpointing (non-reentrant) on "
        "or off. Scenarios: `training.implementation: huggingface`, `memory.logits_copies: 3.5`.",
        full["runs"], hf_full_scenario_of,
        lambda run: f"seq {run['seq']} mbs {run['mbs']}" + (" checkpointed" if run["checkpointing"] else ""))
    ratios: dict[bool, list[float]] = {False: [], True: []}
    for run in train + hf["runs"] + full["runs"]:
        if "error" not in run:
            ratios[bool(run.get("recompute", run.get("checkpointing")))].append(
                run["peak_reserved_bytes"] / run["peak_allocated_bytes"])
    lines += ["PyTorch's caching allocator at the peak, reserved over allocated bytes (what the simulator's "
              "`memory.fragmentation` would add): " + "; ".join(
                  f"{'with' if ck else 'without'} checkpointing median {statistics.median(v):.3f} "
                  f"({min(v):.3f}-{max(v):.3f}, {len(v)} runs)" for ck, v in ratios.items()) + ".", ""]
    # ---- profiles: where the device time of an eager step goes
    prof = [(f"plain PyTorch {r['model']} seq {r['seq']} mbs {r['mbs']}", r) for r in load("profile")] + \
        [(f"HF + PEFT LoRA r{r['rank']} seq {r['seq']} mbs {r['mbs']}" + (" checkpointed" if r["checkpointing"] else ""), r)
         for r in load("hf_lora_profile")["runs"]]
    lines += ["## One profiled step (torch.profiler, a later call)", "",
              "| run | kernels per step | kernel time s | step s (timed, unprofiled) | largest kernels |", "|---|---|---|---|---|"]
    for name, r in prof:
        p = r["profile"]
        top = "; ".join(f"{t['name'][:48]} x{t['count']} {1e3 * t['s']:.0f} ms" for t in p["top"][:4])
        lines.append(f"| {name} | {p['kernels']} | {p['kernel_s']:.3f} | {r['step_s']:.3f} | {top} |")
    lines += ["", "The device is busy for 83-99% of each step (little of it host-bound): the time is in "
              "kernels, among them eager elementwise ops and, with PEFT's fp32 adapters, dtype casts and fp32 "
              "GEMMs on the CUDA cores (`sm80_xmma_gemm_f32f32..._ffma`), which `training.implementation` "
              "lists op by op.", ""]
    # ---- GEMMs
    gemm = load("gemm")
    plateau, g = gemm_rows(gemm)
    errs = [abs(x["predicted_share"] / x["measured_share"] - 1) for x in g]
    train = [abs(x["predicted_share"] / x["measured_share"] - 1) for x in g if x["group"] == "training"]
    lines += ["## GEMM rate across shapes (bf16)", "",
              f"Large-GEMM plateau: {plateau / 1e12:.0f} TFLOP/s (median of GEMMs of at least two waves of "
              f"128x256 tiles and K >= 2048; {plateau / 989e12:.3f} of the 989 TFLOP/s peak). Each GEMM's rate "
              "over the plateau against the simulator's shape factor (relative to 8192^3): median |error| "
              f"{100 * statistics.median(errs):.1f}% over {len(errs)} shapes, {sum(e > 0.10 for e in errs)} beyond 10%; "
              f"training-layer GEMMs (Llama 2 7B to Llama 3 405B layers, TP 1-8, 2k-16k tokens, forward, "
              f"data gradient and weight gradient) {100 * statistics.median(train):.1f}% over {len(train)}.", "",
              "| group | M | N | K | measured TFLOP/s | measured share | predicted share |", "|---|---|---|---|---|---|---|"]
    for x in g:
        if x["group"] in ("k_sweep", "n_sweep", "m_sweep"):
            lines.append(f"| {x['group']} | {x['m']} | {x['n']} | {x['k']} | {x['flop_per_s'] / 1e12:.0f} "
                         f"| {x['measured_share']:.3f} | {x['predicted_share']:.3f} |")
    repeat = data_dir / "repeat" / "gemm.json"
    if repeat.is_file():   # the same shapes measured again in a later call (another machine start)
        repeated = json.loads(repeat.read_text())
        again = {(r["group"], r["m"], r["n"], r["k"], r["kind"]): r["flop_per_s"]
                 for r in repeated if "flop_per_s" in r and r["dtype"] == "bf16"}
        ratios = [again[(x["group"], x["m"], x["n"], x["k"], x["kind"])] / x["flop_per_s"] for x in g
                  if (x["group"], x["m"], x["n"], x["k"], x["kind"]) in again]
        spread = statistics.median(abs(r - 1) for r in ratios)
        lines += ["", f"Run to run: the same {len(ratios)} shapes measured again in a second call differ by "
                  f"{100 * spread:.1f}% (median |ratio - 1|); the repeat's plateau is "
                  f"{gemm_rows(repeated)[0] / 1e12:.0f} TFLOP/s."]
    fp8 = {r["k"]: r["flop_per_s"] for r in gemm if r["group"] == "k_sweep" and r["dtype"] == "fp8" and "flop_per_s" in r}
    sq = [r for r in gemm if r["group"] == "square" and "flop_per_s" in r]
    lines += ["", "Square GEMMs (measured first, on a cool GPU): " + ", ".join(
        f"{r['dtype']} {r['m']}^3 {r['flop_per_s'] / 1e12:.0f}" for r in sq) + " TFLOP/s.",
        "fp8 K sweep at M = N = 8192 (TFLOP/s): " + ", ".join(f"K {k}: {v / 1e12:.0f}" for k, v in sorted(fp8.items())) + ".", ""]
    # ---- attention
    att = [r for r in load("attention") if "error" not in r]
    lines += ["## Flash attention (causal, forward + backward, 3.5x the forward's 4·b·h·s²·d/2 FLOP)", "",
              "| backend | seq | head dim | heads | batch | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd / 989 peak |",
              "|---|---|---|---|---|---|---|---|"]
    for r in att:
        lines.append(f"| {r['backend']} | {r['seq']} | {r['head_dim']} | {r['heads']} | {r['batch']} | "
                     f"{r['fwd_flop_per_s'] / 1e12:.0f} | {r['fwd_bwd_flop_per_s'] / 1e12:.0f} | "
                     f"{r['fwd_bwd_flop_per_s'] / 989e12:.2f} |")
    eff = gpu_efficiency(get_gpu("h100-sxm"), "bf16")
    lines += ["", f"The simulator's Hopper attention efficiency: {eff.attention:.2f} of peak "
              "(FlashAttention-2 on H100, efficiency.yaml).", ""]
    hd = {(r["backend"], r["head_dim"], r["seq"]): r["fwd_bwd_s"] for r in load("head_dim") if "error" not in r}
    lines += ["Head dimension (64 heads, 16k tokens, forward + backward time over head dim 128's; FLOPs scale "
              "with the head dim): " + "; ".join(
                  f"{b} " + ", ".join(f"d {d}: " + "/".join(f"{hd[(b, d, s)] / hd[(b, 128, s)]:.2f}" for s in (2048, 4096, 8192))
                                      for d in (64, 96, 112))
                  for b in ("flash", "cudnn")) + " (at 2k/4k/8k tokens). FlashAttention-2 runs head dim 112 "
              "on its 128 kernel; the simulator pads head dims to the next multiple of 32 (sim/kernels.py).", ""]
    # ---- bandwidth and launches
    bw = load("bandwidth")
    lines += ["## DRAM bandwidth and per-kernel gaps", "",
              "| op | bytes moved | GB/s |", "|---|---|---|"]
    for r in bw:
        lines.append(f"| {r['op']} | {r['bytes_moved']:.3g} | {r['bytes_per_s'] / 1e9:.0f} |")
    gpu = get_gpu("h100-sxm")
    lines += ["", f"The simulator: {gpu.memory_bandwidth_bytes_per_s * eff.memory / 1e9:.0f} GB/s for memory-bound "
              f"kernels (measured_memory_bandwidth in gpus.yaml), {eff.kernel_launch_s * 1e6:.1f} us per kernel.", ""]
    for r in load("launch"):
        lines.append(f"- {r['what']}: {r['s_per_kernel'] * 1e6:.2f} us")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(HERE / "h100-2026-11-25"))
    ap.add_argument("--out", help="write the report here (Markdown); default: print it")
    args = ap.parse_args(argv)
    text = report(Path(args.data).resolve())
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
