"""Compute cost: the time of one kernel from a roofline with achievable efficiencies.

    time = max(FLOP / (peak x efficiency), bytes / (DRAM bandwidth x memory efficiency)) + launch

(Williams et al. 2009, "Roofline"; ASTRA-sim and Calculon use the same min(bandwidth x
intensity, peak) form). Efficiencies are data (:mod:`sim.efficiency`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sim.efficiency import GPUEfficiency
from sim.hardware import GPUSpec

KernelKind = Literal["gemm", "attention", "memory"]


@dataclass(frozen=True, slots=True)
class Kernel:
    """One GPU kernel of the workload."""

    name: str
    kind: KernelKind          # gemm: tensor-core GEMM; attention: flash-attention core; memory: bandwidth-bound
    flop: float               # floating-point operations executed
    bytes: float              # DRAM bytes read + written
    dtype: str = ""           # the dtype it computes in, when not the plan's (attention stays 16-bit in fp8)


def compute_dtype(precision: str) -> str:
    """The dtype GEMMs run at: the training precision (fp8 GEMMs for fp8 recipes; plain fp32, not TF32,
    for fp32 training, as PyTorch's matmul default since 1.12)."""
    return precision


def kernel_time_s(kernel: Kernel, gpu: GPUSpec, eff: GPUEfficiency, dtype: str) -> float:
    """Roofline time of ``kernel`` on ``gpu`` computing in ``dtype``."""
    memory_s = kernel.bytes / (gpu.memory_bandwidth_bytes_per_s * eff.memory)
    if kernel.kind == "memory" or kernel.flop == 0:
        return memory_s + eff.kernel_launch_s
    if kernel.kind == "attention":
        # flash attention runs in 16-bit even in fp8 recipes (Transformer Engine default)
        peak = gpu.peak_flops_per_s.get("bf16") or gpu.peak_flops_per_s.get("fp16") or gpu.peak(dtype)
        peak = peak if dtype != "fp32" else gpu.peak("fp32")
        rate = peak * eff.attention
    else:
        rate = gpu.peak(kernel.dtype or dtype) * eff.gemm
    return max(kernel.flop / rate, memory_s) + eff.kernel_launch_s


def kernels_time_s(kernels: tuple[Kernel, ...], gpu: GPUSpec, eff: GPUEfficiency, dtype: str) -> float:
    """Kernels run back to back on one stream."""
    return sum(kernel_time_s(k, gpu, eff, dtype) for k in kernels)
