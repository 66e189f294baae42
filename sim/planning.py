"""Run planning: what a whole training run takes (time, GPU-hours, cost, energy), and whether its
plan is likely misconfigured.

From one simulated step (:class:`sim.analysis.Analysis`) and the run's token count D::

    steps          = ceil(D / tokens per step)
    time_to_train  = steps x step time
    gpu_hours      = time_to_train x GPUs / 3600
    cost           = gpu_hours x cluster.price_per_gpu_hour     (USD; None when no price is given)
    energy         = time_to_train x (GPUs x GPU power + GPUs / GPUs per node x host power) x PUE

``training.tokens: chinchilla`` means 20 tokens per parameter, the compute-optimal ratio of
Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv:2203.15556; 70 B
parameters on 1.4 T tokens), as EleutherAI's "Transformer Math 101" (Anthony, Biderman and
Schoelkopf 2023) states it: D = 20 P.

Power model (SI: W, J):

- GPU: ``P = P_idle + (TDP - P_idle) x u`` -- the linear power-versus-utilization shape of Fan,
  Weber and Barroso, "Power Provisioning for a Warehouse-sized Computer" (ISCA 2007). The
  utilization ``u`` is the fraction of the step the GPU's compute stream is busy (compute and
  optimizer kernels, from the engine's time breakdown, averaged over the simulated devices): LLM
  training draws about TDP while it computes and drops during communication phases and pipeline
  bubbles (Patel et al., "Characterizing Power Management Opportunities for LLMs in the Cloud",
  ASPLOS 2024, doi:10.1145/3620666.3651329). Memory-bound kernels are counted as busy at TDP.
- ``P_idle`` = 20% of TDP. ASSUMPTION: no datasheet gives the idle draw of a GPU that holds a
  training job's memory at full clocks; the figure follows nvidia-smi readings reported by users:
  H100 SXM 140-145 W of 700 W at 0-4% utilization with 72 GB allocated (wilicc/gpu-burn#114), V100
  SXM2 53 W of 300 W idle in P0 (zai-org/GLM-130B#32) [S29].
- Host: the rest of a node (CPUs, DRAM, NICs, NVSwitches, fans, power supplies) at the system's
  datasheet maximum minus its GPUs' TDPs (DGX H100: 10.2 kW - 8 x 700 W = 4.6 kW) [S27, S28], held
  constant: an upper estimate of the host part. Nodes without a datasheet figure get the DGX H100
  ratio of host power to GPU power (4.6 / 5.6). Fabric switches outside the nodes are not counted.
  For comparison, Newkirk et al. 2025 measured 8-GPU H100 nodes in compute-heavy training at 76% of
  their 10.2 kW rating (arXiv:2506.14551) [S30].
- PUE (power usage effectiveness, The Green Grid 2007: facility power / IT power) multiplies the
  whole; the default 1.0 gives the energy of the IT equipment alone.

The misconfiguration flag: "you should always be able to achieve approximately 120 TFLOP/s/A100;
if you are seeing below 115 TFLOP/s/A100 there is probably something wrong with your model or
hardware configuration" (Anthony, Biderman and Schoelkopf, "Transformer Math 101", EleutherAI blog,
2023, section "Compute Costs"; the figure comes from comparing tuned frameworks across hardware
configurations, Q. Anthony on the Latent Space podcast, 2023). Their TFLOP/s are GPT-NeoX's counter
(``megatron/logging.py`` ``get_flops``: a factor 4 instead of 3 with activation checkpointing), i.e.
hardware FLOPs, the HFU numerator. A100's dense 16-bit peak is 312 TFLOP/s, so the bar is 115/312 =
36.9% of a GPU's dense 16-bit (bf16, else fp16) peak; the rule was stated for mixed-precision 16-bit
training, so fp8 plans are held to the same 16-bit bar (lenient) and an fp32 plan whose own peak is
below the bar is flagged for its precision. A flagged plan names its biggest loss on stage 0's
device: pipeline bubble, exposed communication, kernels slowed by the communication beside them,
memory-bound ops or optimizer step.

"Memory-bound ops" are the kernels of stage 0's compute stream (optimizer excluded) whose roofline
time is set by DRAM traffic, not math (:func:`sim.compute.memory_bound_time_s`): norms, rotary,
residuals, activations, softmax, embedding, cross-entropy, and any GEMM or attention kernel too small
to be compute-bound. The engine's spans carry whole ops (a layer pass is one span), so the engine sums
the split over the kernels of each op it replays (``DeviceRun.memory_bound_s``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sim.analysis import Analysis
from sim.errors import ScenarioError

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
J_PER_KWH = 3.6e6

CHINCHILLA_TOKENS_PER_PARAM = 20.0     # Hoffmann et al. 2022 (see the module docstring)
DEFAULT_PUE = 1.0                      # IT equipment only
GPU_IDLE_FRACTION_OF_TDP = 0.20        # assumption, see the module docstring [S29]

# Node system power at its datasheet maximum and the GPUs inside: host power = max - GPUs x TDP.
NODE_POWER = {   # recipe name: (system max W, GPUs, GPU TDP W)
    "dgx-a100": (6500.0, 8, 400.0),         # DGX A100 "6.5 kW max" [S27, S24]; A100 SXM4 400 W [S5a]
    "dgx-a100-40gb": (6500.0, 8, 400.0),    # DGX A100 320 GB: same system [S27]
    "dgx-h100": (10200.0, 8, 700.0),        # DGX H100/H200 user guide "10.2 kW max" [S27]; H100 700 W [S6]
    "dgx-h200": (10200.0, 8, 700.0),        # same chassis and power supplies [S27]; H200 700 W [S12]
    "dgx-b200": (14300.0, 8, 1000.0),       # DGX B200 user guide "14.3 kW max" [S27]; B200 1000 W [S12]
    "dgx-2": (10000.0, 16, 350.0),          # DGX-2 10 kW [S28]; its V100 SXM3 at 350 W (unverified)
}
HOST_TO_GPU_POWER = (10200.0 - 8 * 700.0) / (8 * 700.0)    # DGX H100 ratio, for nodes without a figure

# Transformer Math 101: below 115 TFLOP/s per A100 something is probably wrong; A100 16-bit dense peak
RULE_TFLOPS_PER_A100 = 115e12
A100_16BIT_PEAK_FLOPS_PER_S = 312e12   # [S5a, S3]
RULE_FRACTION_OF_PEAK = RULE_TFLOPS_PER_A100 / A100_16BIT_PEAK_FLOPS_PER_S

LOSSES = ("bubble", "exposed_comm", "overlap_slowdown", "memory_bound", "optimizer")
LOSS_NAMES = {"bubble": "pipeline bubble", "exposed_comm": "exposed communication",
              "overlap_slowdown": "kernels slowed by the communication beside them",
              "memory_bound": "memory-bound ops", "optimizer": "optimizer step",
              "precision": "compute precision", "compute": "kernels below peak"}


# ---------------------------------------------------------------------------------------------
# Tokens

def parse_tokens(text: str, *, key: str = "--tokens") -> float | str:
    """A token count from the command line: a positive number (15.6e12) or 'chinchilla'."""
    if text.strip().lower() == "chinchilla":
        return "chinchilla"
    try:
        value = float(text)
    except ValueError:
        raise ScenarioError(f"expected a token count such as 15.6e12 or 'chinchilla', got {text!r}", key=key) from None
    if not (math.isfinite(value) and value > 0):
        raise ScenarioError(f"expected a positive, finite token count, got {text!r}", key=key)
    return value


def resolve_tokens(tokens: float | str, params: float) -> float:
    """Tokens of the run: a number, or 'chinchilla' = 20 per parameter."""
    return CHINCHILLA_TOKENS_PER_PARAM * params if tokens == "chinchilla" else float(tokens)


def check_pue(pue: float, *, key: str = "--pue") -> float:
    if not (math.isfinite(pue) and pue >= 1.0):
        raise ScenarioError(f"expected a power usage effectiveness >= 1.0 (facility / IT power), got {pue!r}", key=key)
    return pue


# ---------------------------------------------------------------------------------------------
# Power

def host_power_w(recipe_name: str, gpus_per_node: int, gpu_tdp_w: float) -> float:
    """Power of one node besides its GPUs (CPUs, DRAM, NICs, NVSwitches, fans), at the datasheet maximum."""
    if recipe_name in NODE_POWER:
        system_w, gpus, tdp_w = NODE_POWER[recipe_name]
        return system_w - gpus * tdp_w
    return HOST_TO_GPU_POWER * gpus_per_node * gpu_tdp_w


def gpu_power_w(tdp_w: float, busy_fraction: float) -> float:
    """Average power of one GPU that computes ``busy_fraction`` of the time and idles otherwise."""
    idle = GPU_IDLE_FRACTION_OF_TDP * tdp_w
    return idle + (tdp_w - idle) * busy_fraction


def busy_fraction(a: Analysis) -> float:
    """Fraction of the step the simulated devices' compute streams run kernels (mean over devices); an
    optimizer step run by the CPU (offload) leaves the GPU idle."""
    assert a.step is not None
    step = a.step.step_time_s
    fractions = [(d.breakdown_s["compute"] + d.breakdown_s["overlap_slowdown"] + d.breakdown_s["optimizer"]
                  - d.cpu_optimizer_s) / step
                 for d in a.step.devices]
    return sum(fractions) / len(fractions)


# ---------------------------------------------------------------------------------------------
# Run plan

@dataclass(frozen=True)
class RunPlan:
    """A whole training run of ``tokens`` tokens (SI units)."""

    tokens: float
    tokens_rule: str | None            # "chinchilla" when derived from the parameter count
    steps: int
    step_time_s: float
    gpus: int
    nodes: int
    time_to_train_s: float
    gpu_hours: float
    price_per_gpu_hour_usd: float | None
    cost_usd: float | None             # None without a price (not 0)
    gpu_busy_fraction: float
    gpu_power_w: float | None          # average per GPU; None when the GPU has no TDP
    node_host_power_w: float | None    # per node, besides the GPUs
    pue: float
    avg_power_w: float | None          # whole job: GPUs + hosts, times PUE
    energy_j: float | None
    # cross-check: 6 x params x tokens / (GPUs x achieved model FLOP/s per GPU); None for LoRA / QLoRA,
    # whose frozen base skips its weight gradients (about 4 P per token, not 6 P)
    rule_6pd_time_to_train_s: float | None

    @property
    def time_to_train_days(self) -> float:
        return self.time_to_train_s / SECONDS_PER_DAY

    @property
    def energy_kwh(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / J_PER_KWH

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_to_train_days"] = self.time_to_train_days
        d["energy_kwh"] = self.energy_kwh
        d["rule_6pd_time_to_train_days"] = (None if self.rule_6pd_time_to_train_s is None
                                            else self.rule_6pd_time_to_train_s / SECONDS_PER_DAY)
        order = ("tokens", "tokens_rule", "steps", "step_time_s", "time_to_train_s", "time_to_train_days",
                 "rule_6pd_time_to_train_s", "rule_6pd_time_to_train_days", "gpus",
                 "nodes", "gpu_hours", "price_per_gpu_hour_usd", "cost_usd", "gpu_busy_fraction", "gpu_power_w",
                 "node_host_power_w", "pue", "avg_power_w", "energy_j", "energy_kwh")
        return {k: d[k] for k in order}


def run_plan(a: Analysis, *, tokens: float | str | None = None, pue: float = DEFAULT_PUE) -> RunPlan | None:
    """The run of ``tokens`` (default: the scenario's ``training.tokens``); None without a token count
    or without a simulated step."""
    s = a.scenario
    tokens = s.training.tokens if tokens is None else tokens
    if tokens is None or a.step is None:
        return None
    check_pue(pue)
    count = resolve_tokens(tokens, s.model.total_params)
    plan, cluster = s.plan, s.cluster
    steps = math.ceil(count / plan.tokens_per_step)
    step_s = a.step.step_time_s
    time_s = steps * step_s
    gpu_hours = time_s * plan.gpus / SECONDS_PER_HOUR
    price = cluster.price_per_gpu_hour
    nodes = math.ceil(plan.gpus / cluster.gpus_per_node)
    busy = busy_fraction(a)
    tdp = cluster.gpu.tdp_w
    if tdp is None:
        gpu_w = host_w = avg_w = energy = None
    else:
        gpu_w = gpu_power_w(tdp, busy)
        host_w = host_power_w(cluster.recipe.name, cluster.gpus_per_node, tdp)
        # a job on part of a node is charged that part of the host (the rest serves other jobs)
        avg_w = (plan.gpus * gpu_w + plan.gpus / cluster.gpus_per_node * host_w) * pue
        energy = avg_w * time_s
    return RunPlan(tokens=count, tokens_rule="chinchilla" if tokens == "chinchilla" else None, steps=steps,
                   step_time_s=step_s, gpus=plan.gpus, nodes=nodes, time_to_train_s=time_s, gpu_hours=gpu_hours,
                   price_per_gpu_hour_usd=price, cost_usd=None if price is None else gpu_hours * price,
                   gpu_busy_fraction=busy, gpu_power_w=gpu_w, node_host_power_w=host_w, pue=pue,
                   avg_power_w=avg_w, energy_j=energy,
                   rule_6pd_time_to_train_s=None if plan.finetune.adapters else
                   6.0 * s.model.total_params * count / (a.flops.model_flop / step_s))


# ---------------------------------------------------------------------------------------------
# The "likely misconfigured" flag

@dataclass(frozen=True)
class Flag:
    """The 115-TFLOP/s-per-A100 rule applied to one simulated step."""

    likely_misconfigured: bool
    hardware_flops_per_gpu_per_s: float    # achieved: hardware FLOPs (recomputation included) / (step x GPUs)
    threshold_flops_per_s: float           # 115/312 of the GPU's dense 16-bit peak
    compute_peak_flops_per_s: float        # dense peak of the plan's compute dtype
    losses_s: dict[str, float]             # bubble, exposed_comm, overlap_slowdown, memory_bound, optimizer (stage 0)
    biggest_loss: str | None               # the cause named when flagged (None otherwise)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self, step_time_s: float) -> str:
        """One line for the text summary."""
        achieved, bar = self.hardware_flops_per_gpu_per_s / 1e12, self.threshold_flops_per_s / 1e12
        if not self.likely_misconfigured:
            return f"{achieved:.1f} TFLOP/s per GPU (hardware FLOPs) is at or above {bar:.1f} (115 TFLOP/s on A100, " \
                   f"scaled by 16-bit peak)"
        head = (f"likely misconfigured: {achieved:.1f} TFLOP/s per GPU (hardware FLOPs) is below {bar:.1f} "
                f"(115 TFLOP/s on A100, scaled by 16-bit peak)")
        if self.biggest_loss == "precision":
            return f"{head}; the compute dtype's peak, {self.compute_peak_flops_per_s / 1e12:.1f} TFLOP/s, is below it"
        if self.biggest_loss in self.losses_s:
            t = self.losses_s[self.biggest_loss]
            return (f"{head}; biggest loss: {LOSS_NAMES[self.biggest_loss]} {t:.4g} s "
                    f"({t / step_time_s:.0%} of the step)")
        return f"{head}; no bubble, communication or memory-bound time: the kernels run below peak"


def misconfiguration(a: Analysis) -> Flag | None:
    """The flag of a simulated step (None without one)."""
    if a.step is None:
        return None
    s = a.scenario
    peaks = s.cluster.gpu.peak_flops_per_s
    peak16 = peaks.get("bf16") or peaks.get("fp16") or a.peak_flops_per_s
    threshold = RULE_FRACTION_OF_PEAK * peak16
    achieved = a.flops.hardware_flop / (a.step.step_time_s * s.plan.gpus)
    parts = a.time_breakdown_s
    memory_bound = a.step.devices[0].memory_bound_s     # the engine's DRAM-bound kernel time on stage 0
    losses = {"bubble": parts["bubble"], "exposed_comm": parts["exposed_comm"],
              "overlap_slowdown": parts["overlap_slowdown"], "memory_bound": memory_bound,
              "optimizer": parts["optimizer"]}
    flagged = achieved < threshold
    cause = None
    if flagged:
        if a.peak_flops_per_s < threshold:
            cause = "precision"
        else:
            worst = max(LOSSES, key=lambda k: losses[k])
            cause = worst if losses[worst] > 0 else "compute"
    return Flag(likely_misconfigured=flagged, hardware_flops_per_gpu_per_s=achieved, threshold_flops_per_s=threshold,
                compute_peak_flops_per_s=a.peak_flops_per_s, losses_s=losses, biggest_loss=cause)
