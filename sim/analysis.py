"""The analytic results of a scenario: FLOPs per step and per-stage memory (no time yet).

The step-time engine adds timing to the same :class:`Analysis`; renderers live in :mod:`sim.report`.
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.flops import StepFlops, model_flops_per_token, step_flops
from sim.memory import DeviceMemory, bytes_per_param, memory_report
from sim.scenario import Scenario


@dataclass(frozen=True)
class Analysis:
    """FLOPs and memory of one scenario."""

    scenario: Scenario
    flops: StepFlops
    flops_per_token: float                 # model FLOP per trained token
    stages: tuple[DeviceMemory, ...]       # one representative GPU per pipeline stage
    state_bytes_per_param: tuple[int, int, int]   # (weights, gradients, optimizer) before sharding

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


def analyze(scenario: Scenario) -> Analysis:
    model, plan = scenario.model, scenario.plan
    flops = step_flops(model, tokens=plan.tokens_per_step, seq_len=plan.seq_len, recompute=plan.recompute)
    stages = tuple(memory_report(model, plan, scenario.cluster.gpu, scenario.memory))
    return Analysis(scenario=scenario, flops=flops, flops_per_token=model_flops_per_token(model, plan.seq_len),
                    stages=stages, state_bytes_per_param=bytes_per_param(plan))
