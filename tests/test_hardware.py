"""GPU and link catalog against the figures of shared/reference/hardware.md (tables 1, 1b, 4.3)."""
from __future__ import annotations

import dataclasses

import pytest

from sim.errors import ScenarioError
from sim.hardware import DTYPES, get_gpu, get_link, gpu_names, link_names

GIB = 1024**3

# hardware.md table 1 (dense TFLOPS; int8 in TOPS), one row per (GPU, dtype) figure.
PEAKS = [
    ("t4", "fp16", 65), ("t4", "fp32", 8.1), ("t4", "int8", 130),
    ("v100-16gb", "fp16", 125), ("v100-32gb", "fp16", 125), ("v100-32gb", "fp32", 15.7),
    ("a100-40gb", "bf16", 312), ("a100-40gb", "tf32", 156), ("a100-80gb", "bf16", 312),
    ("a100-80gb", "fp32", 19.5), ("a100-80gb", "int8", 624),
    ("a100-pcie-40gb", "bf16", 312), ("a100-pcie-80gb", "fp16", 312),
    ("h100-sxm", "bf16", 989), ("h100-sxm", "fp16", 989), ("h100-sxm", "fp8", 1979),
    ("h100-sxm", "tf32", 494.7), ("h100-sxm", "fp32", 66.9),
    ("h100-pcie", "bf16", 756), ("h100-pcie", "fp8", 1513),
    ("h200", "bf16", 989), ("h200", "fp8", 1979),
    ("b200", "bf16", 2250), ("b200", "fp8", 4500),
    ("l4", "bf16", 121), ("l4", "fp8", 242.5), ("l40s", "bf16", 362), ("l40s", "fp8", 733),
    ("mi300x", "bf16", 1307.4), ("mi300x", "fp8", 2614.9),
]

# dtypes without hardware support (hardware.md table 1 "–" cells and notes).
UNSUPPORTED = [("t4", "bf16"), ("t4", "tf32"), ("t4", "fp8"), ("v100-32gb", "bf16"), ("v100-16gb", "tf32"),
               ("a100-80gb", "fp8"), ("a100-40gb", "fp8"), ("a100-pcie-80gb", "fp8")]

# hardware.md table 1: memory (GB, binary for HBM), bandwidth (GB/s), TDP (W).
MEMORY = [
    ("t4", 16, 320, 70), ("v100-16gb", 16, 900, 300), ("v100-32gb", 32, 900, 300),
    ("a100-40gb", 40, 1555, 400), ("a100-80gb", 80, 2039, 400), ("a100-pcie-40gb", 40, 1555, 250),
    ("a100-pcie-80gb", 80, 1935, 300), ("h100-sxm", 80, 3350, 700), ("h100-pcie", 80, 2000, 350),
    ("h200", 141, 4800, 700), ("b200", 180, 8000, 1000), ("l4", 24, 300, 72), ("l40s", 48, 864, 350),
    ("mi300x", 192, 5300, 750),
]

# Per-direction link bandwidths: vendor bidirectional / 2 (hardware.md 0, 1b), line rate / 8 for NICs.
LINKS = [
    ("nvlink2", "nvlink", 300e9 / 2), ("nvlink3", "nvlink", 600e9 / 2), ("nvlink4", "nvlink", 900e9 / 2),
    ("nvlink5", "nvlink", 1800e9 / 2), ("pcie3-x16", "pcie", 15.75e9), ("pcie4-x16", "pcie", 31.5e9),
    ("pcie5-x16", "pcie", 63e9), ("ib-edr-100g", "infiniband", 100e9 / 8),
    ("ib-hdr-200g", "infiniband", 200e9 / 8), ("ib-ndr-400g", "infiniband", 400e9 / 8),
    ("eth-50g", "ethernet", 50e9 / 8), ("eth-100g", "ethernet", 100e9 / 8), ("eth-400g", "ethernet", 400e9 / 8),
]


def test_catalog_has_the_required_entries():
    assert {"t4", "v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "a100-pcie-40gb", "a100-pcie-80gb",
            "h100-sxm", "h100-pcie", "h200", "b200", "l4", "l40s", "mi300x"} <= set(gpu_names())
    assert {name for name, _, _ in LINKS} <= set(link_names())


@pytest.mark.parametrize("gpu, dtype, tflops", PEAKS)
def test_peak_matches_reference_table(gpu, dtype, tflops):
    spec = get_gpu(gpu)
    assert spec.supports(dtype)
    assert spec.peak(dtype) == pytest.approx(tflops * 1e12, rel=1e-9)


@pytest.mark.parametrize("gpu, dtype", UNSUPPORTED)
def test_missing_hardware_support_is_an_error_naming_dtype_and_alternatives(gpu, dtype):
    spec = get_gpu(gpu)
    assert not spec.supports(dtype)
    with pytest.raises(ScenarioError) as info:
        spec.peak(dtype, key="training.precision")
    message = str(info.value)
    assert dtype in message and "training.precision" in message
    assert "fp16" in message  # every GPU here supports fp16: the message lists what is supported


@pytest.mark.parametrize("gpu, gib, gbs, watts", MEMORY)
def test_memory_bandwidth_and_power(gpu, gib, gbs, watts):
    spec = get_gpu(gpu)
    assert spec.memory_capacity_bytes == gib * GIB
    assert spec.memory_bandwidth_bytes_per_s == pytest.approx(gbs * 1e9)
    assert spec.tdp_w == watts


def test_usable_memory():
    # Colab's T4 exposes ~15 GB of its 16 (ECC reserve) [S22]; other GPUs default to capacity.
    assert get_gpu("t4").usable_memory_bytes == 15 * GIB
    h100 = get_gpu("h100-sxm")
    assert h100.usable_memory_bytes == h100.memory_capacity_bytes == 80 * GIB


def test_every_catalog_entry_cites_sources():
    for name in gpu_names():
        assert get_gpu(name).sources, name
    for name in link_names():
        assert get_link(name).sources, name


def test_peak_keys_are_known_dtypes():
    for name in gpu_names():
        assert set(get_gpu(name).peak_flops_per_s) <= set(DTYPES)


@pytest.mark.parametrize("alias, key", [("H100", "h100-sxm"), ("v100", "v100-32gb"), ("A100", "a100-80gb"),
                                        ("A100_80GB", "a100-80gb"), ("H100-SXM5", "h100-sxm"), ("T4", "t4")])
def test_aliases_are_case_insensitive(alias, key):
    assert get_gpu(alias).key == key


@pytest.mark.parametrize("name, kind, per_direction", LINKS)
def test_link_bandwidth_per_direction(name, kind, per_direction):
    link = get_link(name)
    assert link.kind == kind
    assert link.bandwidth_bytes_per_s == pytest.approx(per_direction)


def test_infiniband_latency_adds_up_to_end_to_end_figure():
    # NIC -> leaf -> NIC crosses two edges; hardware.md 4.3: EDR 0.5 us, HDR 0.6 us end to end [S3].
    assert 2 * get_link("ib-edr-100g").latency_s == pytest.approx(0.5e-6)
    assert 2 * get_link("ib-hdr-200g").latency_s == pytest.approx(0.6e-6)
    # NVLink: two edges GPU -> NVSwitch -> GPU = NCCL's 0.6 us NVLink LL step [S2].
    assert 2 * get_link("nvlink4").latency_s == pytest.approx(0.6e-6)


def test_specs_are_immutable_and_hashable():
    spec = get_gpu("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tdp_w = 1.0
    with pytest.raises(TypeError):
        spec.peak_flops_per_s["bf16"] = 1.0
    assert hash(spec) == hash(get_gpu("h100-sxm"))


def test_user_defined_gpu_mapping():
    spec = get_gpu({"name": "Lab GPU", "arch": "future", "peak": {"bf16": "100 TFLOPS", "fp32": 2e13},
                    "memory": "24 GiB", "memory_bandwidth": "1 TB/s", "tdp": "300 W"})
    assert spec.name == "Lab GPU" and spec.key == "custom"
    assert spec.peak("bf16") == 100e12 and spec.peak("fp32") == 2e13
    assert not spec.supports("fp8")
    assert spec.memory_capacity_bytes == 24 * GIB == spec.usable_memory_bytes
    assert spec.memory_bandwidth_bytes_per_s == 1e12
    assert spec.tdp_w == 300


def test_user_gpu_based_on_catalog_entry():
    spec = get_gpu({"base": "h100", "name": "H100 capped", "peak": {"bf16": "700 TFLOPS"}, "tdp": "500 W"})
    assert spec.peak("bf16") == 700e12
    assert spec.peak("fp8") == 1979e12          # other peaks kept from the base entry
    assert spec.memory_capacity_bytes == 80 * GIB
    assert spec.tdp_w == 500
    assert not spec.measured_gemm_flops_per_s   # measurements of the stock part no longer apply


def test_unknown_gpu_name_suggests_the_closest():
    with pytest.raises(ScenarioError) as info:
        get_gpu("h100-smx", file="s.yaml", key="cluster.gpu")
    assert str(info.value).startswith("s.yaml: cluster.gpu: ")
    assert "did you mean 'h100-sxm'" in str(info.value)


def test_unknown_link_name_suggests_the_closest():
    with pytest.raises(ScenarioError, match="did you mean 'nvlink4'"):
        get_link("nvlnk4", key="links.0.link")


USER = {"name": "X", "peak": {"bf16": "1 TFLOPS"}, "memory": "8 GiB", "memory_bandwidth": "1 TB/s"}


@pytest.mark.parametrize("change, key, words", [
    ({"memory": "80 GX"}, "cluster.gpu.memory", "bytes"),
    ({"memory": [80]}, "cluster.gpu.memory", "bytes"),
    ({"memory_bandwidth": "80 GiB"}, "cluster.gpu.memory_bandwidth", "bytes/s"),
    ({"memroy": "8 GiB"}, "cluster.gpu.memroy", "did you mean 'memory'"),
    ({"peak": {"bf17": "1 TFLOPS"}}, "cluster.gpu.peak", "did you mean 'bf16'"),
    ({"peak": {"bf16": "-1 TFLOPS"}}, "cluster.gpu.peak", "positive"),
    ({"name": None}, "cluster.gpu.name", "string"),
])
def test_malformed_gpu_mapping_names_the_key(change, key, words):
    with pytest.raises(ScenarioError) as info:
        get_gpu({**USER, **change}, file="s.yaml", key="cluster.gpu")
    assert str(info.value).startswith(f"s.yaml: {key}: ")
    assert words in str(info.value)


def test_missing_required_field():
    with pytest.raises(ScenarioError, match="cluster.gpu.memory_bandwidth: is required"):
        get_gpu({k: v for k, v in USER.items() if k != "memory_bandwidth"}, key="cluster.gpu")


def test_inline_link_mapping():
    link = get_link({"kind": "ethernet", "bandwidth": "200 Gb/s", "latency": "2 us"})
    assert link.bandwidth_bytes_per_s == 25e9 and link.latency_s == 2e-6
    with pytest.raises(ScenarioError, match="links.0.link.kind"):
        get_link({"kind": "carrier-pigeon", "bandwidth": "1 Gb/s", "latency": "1 s"}, key="links.0.link")
