"""GPU and link specifications: the catalog in ``topologies/catalog/*.yaml`` and user-defined entries.

A :class:`GPUSpec` holds a GPU's dense peak rates per dtype, its memory and memory bandwidth; a
:class:`LinkSpec` one kind of link (NVLink generation, PCIe generation, InfiniBand / Ethernet port)
with its bandwidth *per direction* and a latency. Both are SI inside (FLOP/s, bytes, bytes/s, s, W);
the YAML may use human strings such as ``"989 TFLOPS"`` or ``"450 GB/s"`` (see :mod:`sim.units`).

:func:`get_gpu` and :func:`get_link` accept a catalog name (aliases, case-insensitive) or a mapping
in the catalog's schema, which is how a user defines their own hardware in a scenario::

    gpu: {base: h100-sxm, name: H100 at 500 W, peak: {bf16: 700 TFLOPS}, tdp: 500 W}
    gpu: {name: My GPU, peak: {bf16: 100 TFLOPS}, memory: 32 GiB, memory_bandwidth: 1 TB/s}

Every figure of the catalog cites its source (keys S1..S26 of ``shared/reference/hardware.md``).
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from sim.errors import ScenarioError, did_you_mean
from sim.schema import Section, validate_section
from sim.units import UnitError, parse_quantity

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")
"""Dtype keys of :attr:`GPUSpec.peak_flops_per_s` (int8 is in OP/s)."""

LinkKind = Literal["nvlink", "xgmi", "pcie", "infiniband", "ethernet", "host"]


# ---------------------------------------------------------------------------------------------
# YAML schema (pydantic; converted to the frozen dataclasses below)

def _quantity(dimension: str, example: str):
    """A pydantic validator reading a positive quantity of ``dimension`` (numbers are SI already)."""
    def convert(value: Any) -> Any:
        if value is None:
            return None
        try:
            number = parse_quantity(value, dimension)
        except UnitError:
            raise PydanticCustomError("quantity", f"expected a quantity in {dimension} such as {example!r}") from None
        if number <= 0:
            raise PydanticCustomError("quantity", f"expected a positive quantity in {dimension}")
        return number
    return BeforeValidator(convert)


def _rates(value: Any) -> Any:
    """``{dtype: rate}`` with known dtype keys; ``null`` rates (no hardware support) are dropped."""
    if not isinstance(value, dict):
        return value
    out = {}
    for dtype, rate in value.items():
        if dtype not in DTYPES:
            hint = did_you_mean(dtype, DTYPES)
            raise PydanticCustomError("dtype", f"unknown dtype {dtype!r}{hint}; expected some of {', '.join(DTYPES)}")
        if rate is not None:
            out[dtype] = _quantity("FLOP/s", "989 TFLOPS").func(rate)
    return out


Bytes = Annotated[float, _quantity("bytes", "80 GiB")]
BytesPerS = Annotated[float, _quantity("bytes/s", "450 GB/s")]
Seconds = Annotated[float, _quantity("s", "1.5 us")]
Watts = Annotated[float, _quantity("W", "700 W")]
Rates = Annotated[dict[str, float], BeforeValidator(_rates)]


class GPUEntry(Section):
    """One GPU in YAML: a catalog entry or a user's ``gpu:`` mapping."""

    key: str = "custom"
    name: str
    arch: str = "unknown"
    aliases: list[str] = []
    peak: Rates = Field(min_length=1)
    memory: Bytes
    usable_memory: Bytes | None = None
    memory_bandwidth: BytesPerS
    tdp: Watts | None = None
    measured_gemm: Rates = {}
    measured_gemm_mamf: bool = Field(default=False, strict=True, description="measured_gemm is a MAMF best-shape rate")
    measured_memory_bandwidth: BytesPerS | None = None
    sm_count: int | None = Field(default=None, ge=1, strict=True)
    sources: list[str] = []
    notes: str = ""


class LinkEntry(Section):
    """One link kind in YAML: a catalog entry or an inline ``link:`` mapping."""

    key: str = "custom"
    name: str = ""
    kind: LinkKind
    bandwidth: BytesPerS
    latency: Seconds
    sources: list[str] = []
    notes: str = ""


# ---------------------------------------------------------------------------------------------
# Specs

@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One GPU type. SI units; rates are dense (no 2:4 sparsity)."""

    key: str                                    # catalog key ("h100-sxm"), or the user's key / "custom"
    name: str                                   # marketing name, e.g. "NVIDIA H100 SXM5 80GB"
    arch: str                                   # "hopper", "ampere", ...
    peak_flops_per_s: Mapping[str, float]       # dtype -> dense peak FLOP/s (int8: OP/s); absent = no HW support
    memory_capacity_bytes: float                # physical memory (HBM sizes are binary: "80 GB" = 80 GiB)
    usable_memory_bytes: float                  # what a framework can allocate (ECC / driver reserve removed)
    memory_bandwidth_bytes_per_s: float         # peak DRAM bandwidth
    tdp_w: float | None = None                  # board power; None for a user GPU that does not say
    measured_gemm_flops_per_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # ^ best large-GEMM rate per dtype measured by third parties (calibration anchor; may be empty)
    measured_gemm_mamf: bool = False            # those rates are MAMF best-shape sweeps (Bekman's mamf-finder)
    measured_memory_bandwidth_bytes_per_s: float | None = None             # STREAM-like measurement by others
    sm_count: int | None = None                 # streaming multiprocessors (GEMM wave quantization); None = unknown
    sources: tuple[str, ...] = ()               # source keys of hardware.md ("S6", ...) or free text

    def __hash__(self) -> int:
        return hash((self.key, self.name, tuple(sorted(self.peak_flops_per_s.items())),
                     self.memory_capacity_bytes, self.memory_bandwidth_bytes_per_s))

    def supports(self, dtype: str) -> bool:
        """Whether the GPU has hardware support (a peak rate) for ``dtype``."""
        return dtype in self.peak_flops_per_s

    def peak(self, dtype: str, *, file: str | None = None, key: str | None = None) -> float:
        """Dense peak FLOP/s for ``dtype``; ScenarioError naming the supported dtypes otherwise."""
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        supported = ", ".join(d for d in DTYPES if d in self.peak_flops_per_s)
        hint = "" if dtype in DTYPES else did_you_mean(dtype, DTYPES)
        raise ScenarioError(f"{self.name} has no hardware support for {dtype!r}{hint}; it supports {supported}",
                            file=file, key=key)


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One link kind; a link in the graph is two directed edges, each with this bandwidth."""

    key: str                                    # catalog key ("nvlink4") or "custom"
    kind: str                                   # nvlink | xgmi | pcie | infiniband | ethernet | host
    bandwidth_bytes_per_s: float                # per direction
    latency_s: float                            # one-way latency added by one traversal of the link
    sources: tuple[str, ...] = ()
    name: str = ""                              # human description, e.g. "NVLink 4 (H100), 18 links"


# ---------------------------------------------------------------------------------------------
# Catalog files

def data_dir() -> Any:
    """The ``topologies/`` directory: the installed ``sim.topologies`` package or the source tree."""
    try:
        return importlib.resources.files("sim.topologies")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "topologies"


@functools.cache
def _raw_catalog(section: str) -> tuple[str, dict[str, dict]]:
    """(file name, raw entries) of ``catalog/<section>.yaml``."""
    resource = data_dir() / "catalog" / f"{section}.yaml"
    data = yaml.safe_load(resource.read_text(encoding="utf-8"))
    return str(resource), data[section]


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


@functools.cache
def _aliases(section: str) -> dict[str, str]:
    file, raw = _raw_catalog(section)
    table = {}
    for key, entry in raw.items():
        for name in [key, *entry.get("aliases", [])]:
            assert _normalise(name) not in table, f"{file}: duplicate name {name!r}"
            table[_normalise(name)] = key
    return table


def _lookup(section: str, what: str, name: Any, file: str | None, key: str | None) -> str:
    """Catalog key for ``name`` (alias, any case), or ScenarioError with a did-you-mean."""
    table = _aliases(section)
    found = table.get(_normalise(name)) if isinstance(name, str) else None
    if found is None:
        known = sorted(_raw_catalog(section)[1])
        raise ScenarioError(f"unknown {what} {name!r}{did_you_mean(_normalise(name), table)}; "
                            f"known: {', '.join(known)} (or a mapping defining one)", file=file, key=key)
    return found


def _merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``; nested mappings (``peak``) are merged one level deep."""
    out = {k: v for k, v in base.items() if k != "aliases"}
    for k, v in override.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_mapping(section: str, what: str, spec: dict, file: str | None, key: str | None) -> dict:
    """A user mapping with an optional ``base: <catalog name>`` merged over that entry."""
    if "base" not in spec:
        return spec
    base_key = _lookup(section, what, spec["base"], file, f"{key}.base" if key else "base")
    rest = {k: v for k, v in spec.items() if k != "base"}
    base = {**_raw_catalog(section)[1][base_key], "key": f"{base_key}-custom"}
    # third-party measurements of the catalog part no longer apply once its peaks are changed
    for changed, measured in (("peak", "measured_gemm"), ("memory_bandwidth", "measured_memory_bandwidth")):
        if changed in rest:
            base.pop(measured, None)
    return _merge(base, rest)


def _gpu_from_entry(e: GPUEntry) -> GPUSpec:
    return GPUSpec(key=e.key, name=e.name, arch=e.arch, peak_flops_per_s=MappingProxyType(dict(e.peak)),
                   memory_capacity_bytes=e.memory,
                   usable_memory_bytes=e.usable_memory if e.usable_memory is not None else e.memory,
                   memory_bandwidth_bytes_per_s=e.memory_bandwidth, tdp_w=e.tdp,
                   measured_gemm_flops_per_s=MappingProxyType(dict(e.measured_gemm)),
                   measured_gemm_mamf=e.measured_gemm_mamf and bool(e.measured_gemm),
                   measured_memory_bandwidth_bytes_per_s=e.measured_memory_bandwidth,
                   sm_count=e.sm_count, sources=tuple(e.sources))


def _link_from_entry(e: LinkEntry) -> LinkSpec:
    return LinkSpec(key=e.key, kind=e.kind, bandwidth_bytes_per_s=e.bandwidth, latency_s=e.latency,
                    sources=tuple(e.sources), name=e.name)


@functools.cache
def _catalog_gpu(catalog_key: str) -> GPUSpec:
    file, raw = _raw_catalog("gpus")
    entry = validate_section(GPUEntry, {"key": catalog_key, **raw[catalog_key]}, file=file, prefix=f"gpus.{catalog_key}")
    return _gpu_from_entry(entry)


@functools.cache
def _catalog_link(catalog_key: str) -> LinkSpec:
    file, raw = _raw_catalog("links")
    entry = validate_section(LinkEntry, {"key": catalog_key, **raw[catalog_key]}, file=file, prefix=f"links.{catalog_key}")
    return _link_from_entry(entry)


def gpu_names() -> list[str]:
    """Catalog keys of the known GPUs (aliases not included)."""
    return sorted(_raw_catalog("gpus")[1])


def link_names() -> list[str]:
    """Catalog keys of the known link kinds."""
    return sorted(_raw_catalog("links")[1])


def get_gpu(spec: str | Mapping | GPUSpec, *, file: str | None = None, key: str | None = None) -> GPUSpec:
    """A GPU from a catalog name / alias (case-insensitive) or a mapping in the catalog's schema.

    ``file`` and ``key`` (e.g. ``"cluster.gpu"``) locate ``spec`` in the user's YAML for errors.
    """
    if isinstance(spec, GPUSpec):
        return spec
    if isinstance(spec, Mapping):
        merged = _resolve_mapping("gpus", "GPU", dict(spec), file, key)
        return _gpu_from_entry(validate_section(GPUEntry, merged, file=file, prefix=key or "gpu"))
    return _catalog_gpu(_lookup("gpus", "GPU", spec, file, key))


def get_link(spec: str | Mapping | LinkSpec, *, file: str | None = None, key: str | None = None) -> LinkSpec:
    """A link kind from a catalog name (case-insensitive) or a mapping (kind, bandwidth, latency)."""
    if isinstance(spec, LinkSpec):
        return spec
    if isinstance(spec, Mapping):
        merged = _resolve_mapping("links", "link", dict(spec), file, key)
        return _link_from_entry(validate_section(LinkEntry, merged, file=file, prefix=key or "link"))
    return _catalog_link(_lookup("links", "link", spec, file, key))
