"""Compute cost: the time of one kernel from a roofline with achievable efficiencies.

    time = max(FLOP / (peak x efficiency), bytes / (DRAM bandwidth x memory efficiency)) + launch

(Williams et al. 2009, "Roofline"; ASTRA-sim and Calculon use the same min(bandwidth x
intensity, peak) form). Efficiencies are data (:mod:`sim.efficiency`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    shape: tuple[float, float, float] | None = None   # GEMMs: (M, N, K) of C[M, N] = A[M, K] B[K, N]


def compute_dtype(precision: str) -> str:
    """The dtype GEMMs run at: the training precision (fp8 GEMMs for fp8 recipes; plain fp32, not TF32,
    for fp32 training, as PyTorch's matmul default since 1.12)."""
    return precision


def gemm_shape_factor(shape: tuple[float, float, float], sm_count: int | None, eff: GPUEfficiency,
                      rate_ratio: float = 1.0) -> float:
    """Fraction of the large-GEMM rate a GEMM of this shape reaches: wave quantization (output tiles
    are spread over the SMs in whole waves; the last wave may be partly idle) times the K-loop share
    of each tile's time (a fixed prologue/epilogue costs as much as ``gemm_k_half`` steps of K of a
    16-bit GEMM). ``rate_ratio``: the dtype's peak over the 16-bit peak; the fixed cost is a time, so
    it weighs that many times more K steps (fp8: 2x; fp32 on the CUDA cores: ~1/15). Large square
    GEMMs (the MAMF measurements the efficiencies come from) score about 0.98."""
    m, n, k = shape
    factor = k / (k + eff.gemm_k_half * rate_ratio)
    if sm_count:
        tiles = math.ceil(m / eff.gemm_tile[0]) * math.ceil(n / eff.gemm_tile[1])
        factor *= tiles / (math.ceil(tiles / sm_count) * sm_count)
    return factor


def _peak_16bit(gpu: GPUSpec, fallback: float) -> float:
    """The GPU's 16-bit tensor peak (bf16, else fp16), ``fallback`` when it has neither."""
    return gpu.peak_flops_per_s.get("bf16") or gpu.peak_flops_per_s.get("fp16") or fallback


def kernel_time_s(kernel: Kernel, gpu: GPUSpec, eff: GPUEfficiency, dtype: str) -> float:
    """Roofline time of ``kernel`` on ``gpu`` computing in ``dtype``."""
    memory_s = kernel.bytes / (gpu.memory_bandwidth_bytes_per_s * eff.memory)
    if kernel.kind == "memory" or kernel.flop == 0:
        return memory_s + eff.kernel_launch_s
    if kernel.kind == "attention":
        # flash attention runs in 16-bit even in fp8 recipes (Transformer Engine default)
        peak = gpu.peak("fp32") if dtype == "fp32" else _peak_16bit(gpu, gpu.peak(dtype))
        rate = peak * eff.attention
    else:
        peak = gpu.peak(kernel.dtype or dtype)
        rate = peak * eff.gemm
        if kernel.shape is not None:
            rate *= gemm_shape_factor(kernel.shape, gpu.sm_count, eff, peak / _peak_16bit(gpu, peak))
    return max(kernel.flop / rate, memory_s) + eff.kernel_launch_s


def kernels_time_s(kernels: tuple[Kernel, ...], gpu: GPUSpec, eff: GPUEfficiency, dtype: str) -> float:
    """Kernels run back to back on one stream."""
    return sum(kernel_time_s(k, gpu, eff, dtype) for k in kernels)


def memory_bound_time_s(kernels: tuple[Kernel, ...], gpu: GPUSpec, eff: GPUEfficiency, dtype: str) -> float:
    """The time of those ``kernels`` whose roofline is set by DRAM traffic, not math: memory kernels
    (norms, rotary, residuals, activations, softmax, embedding, cross-entropy) and any GEMM or attention
    kernel too small to be compute-bound."""
    total = 0.0
    for k in kernels:
        t = kernel_time_s(k, gpu, eff, dtype)
        if k.kind == "memory" or k.flop == 0 or t > kernel_time_s(replace(k, bytes=0.0), gpu, eff, dtype):
            total += t
    return total
