"""Achievable fractions of peak: one place, read from ``topologies/catalog/efficiency.yaml``.

A GPU's efficiencies come from its architecture's entry, falling back to ``default``; ``measured``
means "the GPU's own third-party measurement divided by its peak" (gpus.yaml). Values fitted by
``simulate calibrate`` on published training runs (``topologies/catalog/calibrated.yaml``) take
precedence: ``gemm`` for 16-bit GEMMs, ``gemm_fp8`` for fp8 GEMMs. Link efficiencies are per link kind.
A scenario's ``training.kernel_arch: ampere`` runs a Hopper GPU's GEMMs at Ampere's efficiency of the
share of its tensor peak that Ampere-built kernels can use, and ``attention_kernel_arch: ampere`` its
attention at the share of Ampere's that FlashAttention-2 keeps on Hopper; ``frameworks`` holds rates a framework's own
implementation sets (DeepSpeed 0.3's ZeRO-3 gathers); ``overlap_slowdown`` how much longer kernels take
beside a collective in flight.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import yaml

from sim.hardware import GPUSpec, data_dir
from sim.units import parse_quantity


@dataclass(frozen=True, slots=True)
class GPUEfficiency:
    """Fractions of peak one GPU reaches, and its fixed per-kernel cost."""

    gemm: float                 # dense GEMM FLOP/s / peak of the compute dtype
    attention: float            # flash-attention FLOP/s / peak
    memory: float               # memory-bound kernels: bytes/s / peak DRAM bandwidth
    kernel_launch_s: float      # fixed time per kernel
    gemm_tile: tuple[int, int] = (128, 256)   # output tile (M, N) of a GEMM kernel, for wave quantization
    gemm_k_half: float = 128.0  # K at which a tile spends as long in its fixed prologue/epilogue as in its K loop


_OVERRIDES: dict[str, dict[str, float]] | None = None   # arch -> {parameter: value}, set by the calibrator


@functools.cache
def _table() -> dict[str, Any]:
    return yaml.safe_load((data_dir() / "catalog" / "efficiency.yaml").read_text(encoding="utf-8"))


@functools.cache
def calibrated() -> dict[str, dict[str, float]]:
    """Fitted parameters per GPU architecture (empty when nothing was calibrated)."""
    path = data_dir() / "catalog" / "calibrated.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {arch: dict(values) for arch, values in (data.get("gpu_arch") or {}).items()}


def set_overrides(overrides: dict[str, dict[str, float]] | None) -> None:
    """Use these fitted parameters instead of calibrated.yaml (the calibrator tries candidates; the
    parameters it does not fit then keep their sourced values, not a previous fit's); None: the file."""
    global _OVERRIDES
    _OVERRIDES = None if overrides is None else {arch: dict(v) for arch, v in overrides.items()}


def _fitted(arch: str) -> dict[str, float]:
    return dict(calibrated().get(arch, {})) if _OVERRIDES is None else dict(_OVERRIDES.get(arch, {}))


def _arch_entry(arch: str) -> dict[str, Any]:
    """An architecture's sourced efficiencies, ``default`` filling what it leaves out."""
    table = _table()["gpu_arch"]
    return {**table["default"], **table.get(arch, {})}


def _measured_gemm(gpu: GPUSpec, dtype: str) -> float | None:
    rate = gpu.measured_gemm_flops_per_s.get(dtype)
    if rate is None and dtype in ("bf16", "fp16"):  # bf16 and fp16 share the tensor cores
        rate = gpu.measured_gemm_flops_per_s.get("fp16" if dtype == "bf16" else "bf16")
    return rate / gpu.peak_flops_per_s[dtype] if rate and dtype in gpu.peak_flops_per_s else None


def gpu_efficiency(gpu: GPUSpec, dtype: str, *, calibrated_values: bool = True,
                   kernel_arch: str = "native", attention_kernel_arch: str | None = None) -> GPUEfficiency:
    """Efficiencies of ``gpu`` computing in ``dtype`` (``calibrated_values=False``: the sourced ones only).

    ``kernel_arch="ampere"`` on a Hopper GPU: GEMMs built for Ampere (sm_80) reach Ampere's GEMM
    efficiency of the share of Hopper's tensor peak that mma.sync can use (``mma_sync_share``); Ampere-built
    attention kernels keep the share of Ampere's attention efficiency that FlashAttention-2 keeps on
    Hopper (its sourced Hopper efficiency over its sourced Ampere one). ``attention_kernel_arch``
    (default: ``kernel_arch``) sets the attention kernels' architecture apart.
    """
    entry = _arch_entry(gpu.arch)
    fitted = _fitted(gpu.arch) if calibrated_values else {}
    gemm = entry["gemm"]
    key = "gemm_fp8" if dtype == "fp8" else "gemm"
    if gemm == "measured":
        measured = _measured_gemm(gpu, dtype)
        gemm = measured or float(entry["gemm_fallback"])
        if measured and gpu.measured_gemm_mamf and key not in fitted and calibrated_values:
            # no fit for this architecture: train at the share of MAMF the fitted ones reach
            gemm *= float(_fitted("default").get("mamf_share", 1.0))
    if key in fitted:
        gemm = fitted[key]
    if "attention" in fitted:
        entry["attention"] = fitted["attention"]
    if gpu.arch == "hopper" and "ampere" in (kernel_arch, attention_kernel_arch or kernel_arch):
        ampere = _arch_entry("ampere")
        ampere_fit = _fitted("ampere") if calibrated_values else {}
        if kernel_arch == "ampere":
            # uncalibrated: Ampere's GEMM fallback (an A100's MAMF share is not this GPU's measurement)
            gemm = float(entry["mma_sync_share"]) * float(ampere_fit.get("gemm", ampere["gemm_fallback"]))
        if (attention_kernel_arch or kernel_arch) == "ampere":
            share = float(_arch_entry(gpu.arch)["attention"]) / float(ampere["attention"])
            entry["attention"] = share * float(ampere_fit.get("attention", ampere["attention"]))
    memory = entry["memory"]
    if memory == "measured":
        measured = gpu.measured_memory_bandwidth_bytes_per_s
        memory = measured / gpu.memory_bandwidth_bytes_per_s if measured else float(entry["memory_fallback"])
    return GPUEfficiency(gemm=float(gemm), attention=float(entry["attention"]), memory=float(memory),
                         kernel_launch_s=parse_quantity(entry["kernel_launch"], "s"),
                         gemm_tile=tuple(entry["gemm_tile"]), gemm_k_half=float(entry["gemm_k_half"]))


def link_efficiency(kind: str) -> float:
    """Achievable fraction of a link's per-direction rate for collective traffic."""
    return float(_table()["links"].get(kind, 1.0))


def framework_rate(name: str, key: str) -> float:
    """A rate (bytes/s) a framework's implementation sets (``frameworks`` in efficiency.yaml)."""
    return parse_quantity(_table()["frameworks"][name][key], "bytes/s")


def overlap_slowdown(transport: str) -> float:
    """Fraction by which kernels take longer while a collective of ``transport`` (nccl, userbuffers)
    is in flight on their GPU (``overlap_slowdown`` in efficiency.yaml)."""
    return float(_table()["overlap_slowdown"][transport])


def sourced_constants() -> list[tuple[str, str, str]]:
    """(section, key, value) of every constant in efficiency.yaml, as written there (each with its
    source in a comment beside it), for reports."""
    out = []
    for section, entries in _table().items():
        for name, value in entries.items():
            if isinstance(value, dict):
                out += [(f"{section}.{name}", key, str(v)) for key, v in value.items()]
            else:
                out.append((section, name, str(value)))
    return out
