"""The results of a scenario: FLOPs, per-stage memory (analytic) and, from the engine, time.

Renderers live in :mod:`sim.report`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from sim import finetune as ftm
from sim.compute import compute_dtype
from sim.engine import StepResult, simulate
from sim.flops import StepFlops, model_flops_per_token, step_flops
from sim.memory import DeviceMemory, memory_report, model_states, stored_bytes_per_param
from sim.scenario import Scenario


@dataclass(frozen=True)
class Analysis:
    """FLOPs, memory and (unless skipped) the simulated step of one scenario."""

    scenario: Scenario
    flops: StepFlops
    flops_per_token: float                 # model FLOP per trained token
    stages: tuple[DeviceMemory, ...]       # one representative GPU per pipeline stage
    state_bytes_per_param: tuple[float, float, float]   # (weights, gradients, optimizer) of a trainable param
    step: StepResult | None = None         # the engine's replay; None with --memory-only

    @property
    def peak(self) -> DeviceMemory:
        """The stage whose GPUs need the most memory (first one on ties)."""
        return max(self.stages, key=lambda d: (d.total, -d.stage))

    @property
    def fits(self) -> bool:
        """Every stage fits its GPUs, and the states offloaded or paged to CPU memory fit the hosts."""
        return all(d.fits for d in self.stages) and self.host_fits

    @property
    def host_fits(self) -> bool:
        host = self.scenario.cluster.recipe.host
        need = self.host_bytes_per_node
        return need <= host.memory_bytes if host else need == 0

    @property
    def model_state_bytes(self) -> float:
        """Weights + gradients + optimizer states of the whole model, before any sharding or offload
        (frozen base weights included under LoRA / QLoRA)."""
        s = self.scenario
        if not s.plan.finetune.adapters and s.plan.optimizer != "adafactor":
            return s.model.total_params * sum(self.state_bytes_per_param)
        whole = self._whole_model
        return whole.weights + whole.gradients + whole.optimizer

    @functools.cached_property
    def _whole_model(self):
        """Model states of the whole model on one GPU without ZeRO or offload."""
        plan = dataclasses.replace(self.scenario.plan, tp=1, pp=1, cp=1, dp=1, zero=0, virtual_stages=1,
                                   chunk_layers=(self.scenario.model.layers,), offload_optimizer=False,
                                   offload_params=False)
        return model_states(self.scenario.model, plan, 0)

    # ---- fine-tuning, offload ------------------------------------------------------------------
    def finetune_summary(self) -> dict[str, object]:
        """What is trained and where the states live (SI units; parameter counts are plain numbers)."""
        s = self.scenario
        ft, model = s.plan.finetune, s.model
        whole = self._whole_model
        trainable = whole.trainable_params if ft.adapters else model.total_params
        frozen = model.total_params if ft.adapters else 0
        out: dict[str, object] = {
            "method": ft.method,
            "trainable_params": trainable,
            "frozen_params": frozen,
            "trainable_fraction": trainable / model.total_params,
            "optimizer": s.plan.optimizer,
            "trainable_state_bytes_per_param": dict(zip(("weights", "gradients", "optimizer"),
                                                        self.state_bytes_per_param)),
        }
        if s.plan.optimizer == "adafactor":
            out["adafactor_factored_state_bytes"] = whole.optimizer - whole.trainable_params * self.state_bytes_per_param[2]
        if ft.adapters:
            linear = ftm.linear_params_per_layer(model, 1)
            out.update({
                "rank": ft.rank, "alpha": ft.alpha, "target_modules": list(ft.targets),
                "base_weight_dtype": ft.base_dtype, "double_quant": ft.double_quant,
                "adapter_dtype": ft.adapter_dtype, "upcast_unquantized": ft.upcast_unquantized,
                # the blocks' linears in the base dtype, quantization constants included
                "base_linear_bytes_per_param": ftm.base_linear_bytes_per_layer(model, ft, 1) / linear,
                # all frozen weights (embedding, output layer and norms in the compute dtype) per base parameter
                "frozen_weight_bytes_per_param": (whole.weights - whole.trainable_params * self.state_bytes_per_param[0])
                / model.total_params,
            })
        peak = self.peak
        out.update({"offload_optimizer": s.plan.offload_optimizer, "offload_params": s.plan.offload_params,
                    "host_bytes_per_gpu": max(d.host for d in self.stages),
                    "host_detail_bytes": {k[5:]: v for k, v in peak.detail.items() if k.startswith("host.")},
                    "paged_optimizer": s.plan.paged_optimizer,
                    "paged_out_bytes": max(d.paged_out for d in self.stages)})
        host = s.cluster.recipe.host
        need = self.host_bytes_per_node
        out.update({"host_memory_bytes_per_node": need,
                    "host_capacity_bytes": host.memory_bytes if host else None,
                    "host_fits": self.host_fits})
        return out

    @property
    def host_bytes_per_node(self) -> float:
        """CPU memory the offloaded (and paged-out) states of one node's GPUs need together (the fullest node)."""
        s = self.scenario
        per_stage = [d.host + d.paged_out for d in self.stages]
        if not any(per_stage):
            return 0.0
        pl, g = s.plan, s.cluster.gpus_per_node
        ranks_per_stage = pl.tp * pl.cp * pl.dp
        return max(sum(per_stage[r // ranks_per_stage] for r in range(n * g, min((n + 1) * g, pl.gpus)))
                   for n in range(-(-pl.gpus // g)))

    # ---- timing (engine) ---------------------------------------------------------------------
    @property
    def step_time_s(self) -> float:
        assert self.step is not None
        return self.step.step_time_s

    @property
    def peak_flops_per_s(self) -> float:
        """Dense peak of one GPU in the plan's compute dtype (the denominator of MFU / HFU)."""
        return self.scenario.cluster.gpu.peak(compute_dtype(self.scenario.plan.precision))

    def timing(self) -> dict[str, float]:
        """Throughput figures of the simulated step (SI units)."""
        step, gpus = self.step_time_s, self.scenario.plan.gpus
        return {
            "step_time_s": step,
            "tokens_per_s": self.scenario.plan.tokens_per_step / step,
            "mfu": self.flops.model_flop / (step * gpus * self.peak_flops_per_s),
            "hfu": self.flops.hardware_flop / (step * gpus * self.peak_flops_per_s),
            "tflops_per_gpu": self.flops.model_flop / (step * gpus) / 1e12,
        }

    def simulated(self, *, full: bool | None = None, extrapolate: bool = False) -> "Analysis":
        """This analysis with the step replayed (FLOPs and memory are not computed again)."""
        return dataclasses.replace(self, step=simulate(self.scenario, full=full, extrapolate=extrapolate))

    @property
    def time_breakdown_s(self) -> dict[str, float]:
        """Where the step went on the first stage's device (parts add up to the step time)."""
        assert self.step is not None
        return dict(self.step.devices[0].breakdown_s)


def analyze(scenario: Scenario, *, simulate_step: bool = True, full: bool | None = None,
            extrapolate: bool = False) -> Analysis:
    """FLOPs, memory and (unless ``simulate_step`` is False) the replayed step; ``extrapolate`` replays
    two small microbatch counts and extrapolates the step (sweeps; :func:`sim.engine.extrapolation_points`)."""
    model, plan = scenario.model, scenario.plan
    flops = step_flops(model, tokens=plan.tokens_per_step, seq_len=plan.seq_len, recompute=plan.recompute,
                       flash_attention=plan.flash_attention, finetune=plan.finetune,
                       early_stop=plan.recompute_early_stop, recompute_fraction=plan.recompute_fraction)
    stages = tuple(memory_report(model, plan, scenario.cluster.gpu, scenario.memory))
    a = Analysis(scenario=scenario, flops=flops,
                 flops_per_token=model_flops_per_token(model, plan.seq_len, plan.finetune),
                 stages=stages, state_bytes_per_param=stored_bytes_per_param(plan))
    return a.simulated(full=full, extrapolate=extrapolate) if simulate_step else a
