"""The results of a scenario: FLOPs, per-stage memory (analytic) and, from the engine, time.

Renderers live in :mod:`sim.report`.
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.compute import compute_dtype
from sim.engine import StepResult, simulate
from sim.flops import StepFlops, model_flops_per_token, step_flops
from sim.memory import DeviceMemory, bytes_per_param, memory_report
from sim.scenario import Scenario


@dataclass(frozen=True)
class Analysis:
    """FLOPs, memory and (unless skipped) the simulated step of one scenario."""

    scenario: Scenario
    flops: StepFlops
    flops_per_token: float                 # model FLOP per trained token
    stages: tuple[DeviceMemory, ...]       # one representative GPU per pipeline stage
    state_bytes_per_param: tuple[int, int, int]   # (weights, gradients, optimizer) before sharding
    step: StepResult | None = None         # the engine's replay; None with --memory-only

    @property
    def peak(self) -> DeviceMemory:
        """The stage whose GPUs need the most memory (first one on ties)."""
        return max(self.stages, key=lambda d: (d.total, -d.stage))

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.stages)

    @property
    def model_state_bytes(self) -> float:
        """Weights + gradients + optimizer states of the whole model, before any sharding."""
        return self.scenario.model.total_params * sum(self.state_bytes_per_param)

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

    @property
    def time_breakdown_s(self) -> dict[str, float]:
        """Where the step went on the first stage's device (parts add up to the step time)."""
        assert self.step is not None
        return dict(self.step.devices[0].breakdown_s)


def analyze(scenario: Scenario, *, simulate_step: bool = True, full: bool | None = None) -> Analysis:
    model, plan = scenario.model, scenario.plan
    flops = step_flops(model, tokens=plan.tokens_per_step, seq_len=plan.seq_len, recompute=plan.recompute,
                       flash_attention=plan.flash_attention)
    stages = tuple(memory_report(model, plan, scenario.cluster.gpu, scenario.memory))
    step = simulate(scenario, full=full) if simulate_step else None
    return Analysis(scenario=scenario, flops=flops, flops_per_token=model_flops_per_token(model, plan.seq_len),
                    stages=stages, state_bytes_per_param=bytes_per_param(plan), step=step)
