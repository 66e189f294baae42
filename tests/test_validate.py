"""The validation command on its fast subset (the full set runs in `simulate validate`)."""
import csv
import math

import pytest

from sim.cli import main
from sim.validate import kendall_tau

from conftest import ROOT


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_validation_set_covers_the_reference_rows():
    rows = list(csv.DictReader((ROOT / "validation" / "runs.csv").open()))
    simulated = [r for r in rows if r["scenario"]]
    assert len(simulated) >= 30
    assert len({r["source_id"].split("_")[0] for r in simulated}) >= 4
    assert {"v100-32gb", "a100-80gb", "h100-sxm"} <= {r["gpu"] for r in simulated}
    assert all(r["not_expressible"] for r in rows if not r["scenario"])   # skipped rows say why
    assert all((ROOT / "validation" / r["scenario"]).is_file() for r in simulated)


def test_validate_fast_subset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(["validate", "--fast", "--out", str(tmp_path), "--jobs", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "validation.md").is_file() and (tmp_path / "validation.png").is_file()
    report = (tmp_path / "validation.md").read_text()
    assert "## Fitted parameters" in report and "assumed where the source is silent" in report
    # the constants the fit leaves alone are stated too: one row each, e.g. the slowdown beside NCCL
    import yaml
    table = yaml.safe_load((ROOT / "topologies" / "catalog" / "efficiency.yaml").read_text())
    assert "## Sourced constants (not fitted)" in report
    assert f"| overlap_slowdown | nccl | {table['overlap_slowdown']['nccl']} |" in report
    assert f"| links | infiniband | {table['links']['infiniband']} |" in report
    rows = list(csv.DictReader((tmp_path / "validation.csv").open()))
    assert len(rows) >= 15 and not any(r["error"] for r in rows)
    errors = [abs(float(r["rel_error"])) for r in rows]
    assert all(math.isfinite(e) for e in errors)


def test_calibration_split_and_parameter_choice():
    from pathlib import Path

    from sim.calibrate import _parameter, is_training
    from sim.validate import load_rows
    rows = {r["row_id"]: r for r in load_rows(ROOT / "validation")}
    assert is_training(rows["T002"]) and not is_training(rows["T001"])
    base = Path(ROOT / "validation")
    assert _parameter(rows["T001"], base) == ("ampere", "gemm")            # GPT-1.7B, seq 2048, Megatron
    assert _parameter(rows["T190"], base) == ("ampere", "attention")       # MPT-125m at 65,536 tokens
    assert _parameter(rows["T313"], base) == ("hopper", "gemm_fp8")        # Llama 2 7B fp8 on H100


def test_calibrated_values_stay_within_their_sources():
    from sim.efficiency import calibrated, gpu_efficiency
    from sim.hardware import get_gpu
    for arch, key in (("ampere", "a100-80gb"), ("hopper", "h100-sxm")):
        sourced = gpu_efficiency(get_gpu(key), "bf16", calibrated_values=False)
        sourced_fp8 = gpu_efficiency(get_gpu(key), "fp8", calibrated_values=False) if arch == "hopper" else None
        for param, value in calibrated().get(arch, {}).items():
            ceiling = {"gemm": sourced.gemm, "attention": sourced.attention,
                       "gemm_fp8": sourced_fp8.gemm if sourced_fp8 else 1.0}[param]
            assert 0.2 <= value <= ceiling + 1e-9


def test_validate_report_carries_the_published_peak_memory_rows(tmp_path):
    """simulate validate adds the published peak-memory rows (fine-tuning, torchtitan) to its report."""
    from pathlib import Path
    from sim import validate
    memory = validate.memory_results(Path("validation"))
    ids = {r["row_id"] for r in memory}
    assert {"M032", "M033", "M044", "M058", "TT21"} <= ids  # memory.csv rows and torchtitan's of rows.yaml
    m032 = next(r for r in memory if r["row_id"] == "M032")
    # memory.csv M032: 7.8 "GB" peak (Unsloth, T4), read as reserved GiB (rows.yaml): 7.8 x 2^30 bytes
    assert m032["measured"] == "7.8 GiB"
    assert abs(m032["predicted"] / (7.8 * 2**30 / 1e9) - 1 - m032["error"]) < 1e-3
    validate.write_reports([], tmp_path, 0.06, all_rows=[], memory=memory)
    text = (tmp_path / "validation.md").read_text()
    assert "## Peak memory" in text and all(f"| {i} |" in text for i in ids)


def test_ampere_kernels_on_hopper_use_two_thirds_of_its_peak_at_amperes_efficiency():
    # "the older mma.sync instruction can only reach about 2/3 the peak throughput of Hopper Tensor
    # Cores" (arXiv:2402.13499 via the FlashAttention-3 post): GEMMs built for sm_80 on an H100 reach
    # Ampere's fraction of that share of the H100 peak. Ampere-built attention keeps the share of its
    # Ampere efficiency that FlashAttention-2 keeps on an H100: 35% of the H100 peak (FlashAttention-3
    # paper) against 60% of the A100's (FlashAttention-2 paper: 50-73%)
    from sim.efficiency import gpu_efficiency
    from sim.hardware import get_gpu
    h100, a100 = get_gpu("h100-sxm"), get_gpu("a100-80gb")
    old = gpu_efficiency(h100, "bf16", kernel_arch="ampere")
    amp = gpu_efficiency(a100, "bf16")
    assert old.gemm == pytest.approx(0.667 * amp.gemm) and old.attention == pytest.approx(0.35 / 0.60 * amp.attention)
    native = gpu_efficiency(h100, "bf16")
    assert old.memory == native.memory and old.gemm * h100.peak("bf16") > amp.gemm * a100.peak("bf16")
    # a CUDA 12 stack with 2023's attention kernels: native GEMMs, Ampere-built attention
    mixed = gpu_efficiency(h100, "bf16", attention_kernel_arch="ampere")
    assert mixed.gemm == native.gemm and mixed.attention == old.attention


def test_architectures_without_a_fit_train_at_the_fitted_share_of_their_mamf_rate():
    # the share is the median, over the fitted GEMM rates, of fitted / MAMF (gpus.yaml: A100 271.2 of
    # 312, H100 794.5 of 989 bf16 and 1402.6 of 1979 fp8 TFLOP/s); a B200 (no fit) then trains at that
    # share of its MAMF rate, 1745 of 2250 TFLOP/s
    import statistics
    from sim.efficiency import calibrated, gpu_efficiency
    from sim.hardware import get_gpu
    fit = calibrated()
    shares = [fit["ampere"]["gemm"] / (271.2 / 312), fit["hopper"]["gemm"] / (794.5 / 989),
              fit["hopper"]["gemm_fp8"] / (1402.6 / 1979)]
    assert fit["default"]["mamf_share"] == pytest.approx(statistics.median(shares), abs=1e-3)
    assert gpu_efficiency(get_gpu("b200"), "bf16").gemm == pytest.approx(fit["default"]["mamf_share"] * 1745 / 2250)
    # GPUs whose measurement is not a MAMF sweep keep it (V100: a cuBLAS report)
    assert gpu_efficiency(get_gpu("v100-32gb"), "fp16").gemm == pytest.approx(97 / 125)
