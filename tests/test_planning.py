"""Run planning (time to train, GPU-hours, cost, energy) and the "likely misconfigured" flag.

Expected values are derived by hand from the formulas and datasheet figures named in each test,
not copied from the simulator's output.
"""
import csv
import json
import math
import re

import pytest
import yaml

from sim.analysis import analyze
from sim.cli import main
from sim.planning import misconfiguration, run_plan
from sim.report import csv_row, to_dict, to_text
from sim.scenario import load_scenario, scenario_from_mapping

from conftest import SCENARIOS

H100_TDP_W = 700.0                    # H100 SXM5 board power [S6]
DGX_H100_MAX_W = 10_200.0             # DGX H100 "10.2 kW max" [S27]


def mapping(model, topology, nodes, training, parallelism, **cluster):
    return {"name": "t", "model": model, "cluster": {"topology": topology, "nodes": nodes, **cluster},
            "training": training, "parallelism": parallelism}


# 7B data-parallel on one DGX H100, priced; 1 T tokens
SMALL = mapping("llama2-7b", "dgx-h100", 1, {"seq_len": 4096, "global_batch_size": 64, "tokens": 1e12},
                {"dp": 8, "zero": 1}, price_per_gpu_hour=2.5)


@pytest.fixture(scope="module")
def small():
    return analyze(scenario_from_mapping(SMALL))


def number(text):
    return float(text.replace(",", ""))


def test_llama405b_time_to_train_printed_in_days_agrees_with_6PD(capsys):
    """Must-show: 15.6 T tokens on the llama405b scenario, printed in days, within 5% of 6 P D / (GPUs x achieved)."""
    assert main([str(SCENARIOS / "llama405b.yaml")]) == 0      # tokens: 15.6e12 in the scenario (Llama 3 paper)
    out = capsys.readouterr().out
    run = re.search(r"^Run +15\.6 T tokens in ([\d,]+) steps: ([\d,.]+) days on ([\d,]+) GPUs", out, re.M)
    step = re.search(r"^Step +\S+ s +\| +([\d,]+) tokens/s +\| +([\d.]+) TFLOP/s per GPU", out, re.M)
    assert run and step, out
    steps, days, gpus = number(run[1]), number(run[2]), number(run[3])
    tokens_per_s, model_flops_per_gpu = number(step[1]), number(step[2]) * 1e12
    D, G = 15.6e12, 16_384
    assert gpus == G
    assert steps == math.ceil(D / (2048 * 8192)) == 929_833      # 16,777,216 tokens per step
    P = load_scenario(SCENARIOS / "llama405b.yaml").model.total_params
    # the 6PD rule with the achieved FLOP/s counted the same way (6 P per token: EleutherAI's C = 6 P D)
    achieved_6p = 6 * P * tokens_per_s / G
    rule_days = 6 * P * D / (G * achieved_6p) / 86_400
    assert days == pytest.approx(rule_days, rel=0.05)
    # with the simulated model FLOP/s, which count attention over the full s x s square, the rule needs
    # the attention term: 6 P + 12 L h s per token (PaLM, Appendix B); at s = 8,192 that term is 7.8% of
    # 6 P, which is what separates the plain 6 P D rule from the time printed when both use model FLOP/s
    L, h, s = 126, 16_384, 8_192
    palm_days = (6 * P + 12 * L * h * s) * D / (G * model_flops_per_gpu) / 86_400
    assert days == pytest.approx(palm_days, rel=0.01)
    # Meta's plan (400 TFLOP/s per GPU measured) clears the 115-per-A100 bar scaled to H100 (364.5)
    assert "Flag " not in out


def test_steps_time_gpu_hours_and_cost_by_hand(small):
    run = run_plan(small)
    step_s = small.step_time_s
    steps = math.ceil(1e12 / (64 * 4096))                          # 3,814,698
    assert run.steps == steps == 3_814_698
    assert run.time_to_train_s == pytest.approx(steps * step_s, rel=1e-12)
    assert run.time_to_train_days == pytest.approx(steps * step_s / 86_400, rel=1e-12)
    assert run.gpu_hours == pytest.approx(steps * step_s * 8 / 3600, rel=1e-12)
    assert run.cost_usd == pytest.approx(steps * step_s * 8 / 3600 * 2.5, rel=1e-12)


def test_energy_by_hand_from_the_datasheets(small):
    run = run_plan(small, pue=1.2)
    dev = small.step.devices
    # kernels slowed by the collectives beside them still keep the GPU busy
    busy = sum((d.breakdown_s["compute"] + d.breakdown_s["overlap_slowdown"] + d.breakdown_s["optimizer"])
               / small.step_time_s for d in dev) / len(dev)
    idle_w = 0.2 * H100_TDP_W                                       # 140 W: the idle assumption [S29]
    host_w = DGX_H100_MAX_W - 8 * H100_TDP_W                        # 4.6 kW besides the GPUs
    gpu_w = idle_w + (H100_TDP_W - idle_w) * busy
    power_w = (8 * gpu_w + 1 * host_w) * 1.2
    assert run.gpu_busy_fraction == pytest.approx(busy, rel=1e-12) and 0 < busy <= 1
    assert run.node_host_power_w == pytest.approx(4600.0)
    assert run.avg_power_w == pytest.approx(power_w, rel=1e-12)
    assert run.energy_j == pytest.approx(power_w * run.time_to_train_s, rel=1e-12)
    assert run.energy_kwh == pytest.approx(run.energy_j / 3.6e6, rel=1e-12)
    # one node never draws more than its datasheet maximum, nor less than idle GPUs plus the host
    assert (8 * idle_w + host_w) * 1.2 < run.avg_power_w <= DGX_H100_MAX_W * 1.2
    assert run_plan(small, pue=1.0).energy_j == pytest.approx(run.energy_j / 1.2, rel=1e-12)


def test_no_price_means_no_cost_not_zero(small):
    data = {**SMALL, "cluster": {"topology": "dgx-h100", "nodes": 1}}
    a = analyze(scenario_from_mapping(data))
    run = run_plan(a)
    assert run.cost_usd is None and run.price_per_gpu_hour_usd is None and run.gpu_hours > 0
    assert to_dict(a)["run"]["cost_usd"] is None and csv_row(a)["cost_usd"] is None
    assert "$" not in to_text(a) and "$" in to_text(small)


def test_chinchilla_is_20_tokens_per_parameter(small):
    params = small.scenario.model.total_params
    run = run_plan(small, tokens="chinchilla")
    assert run.tokens == 20 * params and run.tokens_rule == "chinchilla"
    assert run.steps == math.ceil(20 * params / (64 * 4096))


def test_without_tokens_or_step_there_is_no_run(small):
    data = {**SMALL, "training": {"seq_len": 4096, "global_batch_size": 64}}
    a = analyze(scenario_from_mapping(data))
    assert run_plan(a) is None and "run" not in to_dict(a) and "Run " not in to_text(a)
    memory_only = analyze(scenario_from_mapping(SMALL), simulate_step=False)
    assert run_plan(memory_only) is None and misconfiguration(memory_only) is None
    assert "flag" not in to_dict(memory_only) and "the run plan needs the step simulation" in to_text(memory_only)


def test_json_run_object_has_unit_suffixed_keys(small):
    d = json.loads(json.dumps(to_dict(small)))
    run = d["run"]
    for key in ("tokens", "steps", "time_to_train_s", "time_to_train_days", "gpu_hours", "cost_usd", "energy_j",
                "energy_kwh", "avg_power_w", "gpu_power_w", "node_host_power_w", "pue"):
        assert key in run
    assert d["flag"]["likely_misconfigured"] is False
    assert set(d["flag"]["losses_s"]) == {"bubble", "exposed_comm", "overlap_slowdown", "memory_bound", "optimizer"}


def test_csv_column_set_is_fixed(small, tmp_path):
    no_tokens = analyze(scenario_from_mapping({**SMALL, "training": {"seq_len": 4096, "global_batch_size": 64}}))
    memory_only = analyze(scenario_from_mapping(SMALL), simulate_step=False)
    rows = [csv_row(small), csv_row(no_tokens), csv_row(memory_only)]
    assert list(rows[0]) == list(rows[1]) == list(rows[2])
    for col in ("tokens", "steps", "time_to_train_days", "gpu_hours", "cost_usd", "energy_kwh", "likely_misconfigured",
                "loss_bubble_s", "step_time_s"):
        assert col in rows[0]
    assert rows[0]["steps"] == 3_814_698 and rows[1]["steps"] is None and rows[2]["step_time_s"] is None
    assert rows[1]["likely_misconfigured"] is False and rows[2]["likely_misconfigured"] is None
    # one file, one header, rows of all three kinds
    path = tmp_path / "runs.csv"
    data = yaml.safe_dump({**SMALL, "cluster": dict(SMALL["cluster"])})
    (tmp_path / "s.yaml").write_text(data)
    for extra in ([], ["--memory-only"], ["--set", "training.tokens=chinchilla"]):
        assert main([str(tmp_path / "s.yaml"), "--csv", str(path), *extra]) == 0
    read = list(csv.DictReader(path.open()))
    assert len(read) == 3 and read[1]["steps"] == "" and read[1]["step_time_s"] == ""
    assert float(read[2]["tokens"]) == 20 * small.scenario.model.total_params


def test_cli_tokens_and_pue_options(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "training": {"seq_len": 4096, "global_batch_size": 64}}))
    assert main([str(path), "--tokens", "2e12", "--pue", "1.1", "--format", "json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["tokens"] == 2e12 and run["steps"] == math.ceil(2e12 / (64 * 4096)) and run["pue"] == 1.1
    assert main([str(path), "--tokens", "chinchilla"]) == 0
    assert re.search(r"^Run +135 B tokens \(chinchilla", capsys.readouterr().out, re.M)   # 20 x 6.738 B
    for bad, key in ((["--tokens", "lots"], "--tokens"), (["--tokens", "-5"], "--tokens"), (["--pue", "0.5"], "--pue"),
                     (["--tokens", "1e12", "--memory-only"], "--memory-only")):
        assert main([str(path), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key}: ") and err.count("\n") == 1, err


# ---- the flag ------------------------------------------------------------------------------------

def test_threshold_is_115_tflops_scaled_by_16bit_peak(small):
    flag = misconfiguration(small)
    assert flag.threshold_flops_per_s == pytest.approx(989e12 * 115 / 312, rel=1e-12)   # H100: 364.5 TFLOP/s
    assert flag.hardware_flops_per_gpu_per_s == pytest.approx(small.timing()["hfu"] * 989e12, rel=1e-12)


def test_good_plan_is_not_flagged(small):
    # 7B data-parallel on one DGX H100: no bubble, gradients reduced over NVLink
    flag = misconfiguration(small)
    assert flag.hardware_flops_per_gpu_per_s > flag.threshold_flops_per_s
    assert not flag.likely_misconfigured and flag.biggest_loss is None and "Flag " not in to_text(small)


def test_pipeline_bubble_plan_is_flagged_for_its_bubble():
    # the same plan with 12 microbatches on 12 stages: 1F1B bubble (p - 1) / m = 11/12 of the compute time
    a = analyze(load_scenario(SCENARIOS / "gpt3-175b-a100.yaml", ["training.global_batch_size=96"]))
    flag = misconfiguration(a)
    assert flag.threshold_flops_per_s == pytest.approx(115e12, rel=1e-12)           # A100: the rule itself
    assert flag.likely_misconfigured and flag.biggest_loss == "bubble"
    assert flag.hardware_flops_per_gpu_per_s < 115e12
    assert re.search(r"^Flag +likely misconfigured: .* biggest loss: pipeline bubble", to_text(a), re.M)
    assert to_dict(a)["flag"]["biggest_loss"] == "bubble" and csv_row(a)["likely_misconfigured"] is True


def test_data_parallel_over_slow_links_is_flagged_for_communication():
    # 7B, 32-way data parallel over 4 nodes, 1 sequence per GPU: ~27 GB of fp32 gradients all-reduced
    # over 400 Gb/s NICs per 2,048-token microbatch, which computes in ~0.1 s
    a = analyze(scenario_from_mapping(mapping("llama2-7b", "dgx-h100", 4, {"seq_len": 2048, "global_batch_size": 32},
                                              {"dp": 32})))
    flag = misconfiguration(a)
    assert flag.likely_misconfigured and flag.biggest_loss == "exposed_comm"


def test_small_layers_are_flagged_for_memory_bound_ops():
    # hidden 512 on one GPU: norms, residuals and activations move as many bytes as the GEMMs do math
    model = {"base": "gpt-1.7b", "hidden": 512, "heads": 8, "ffn_hidden": 2048, "layers": 4}
    a = analyze(scenario_from_mapping(mapping(model, "dgx-h100", 1, {"seq_len": 2048, "global_batch_size": 8},
                                              {"dp": 8})))
    flag = misconfiguration(a)
    assert flag.likely_misconfigured and flag.biggest_loss == "memory_bound"


def test_fp32_below_the_bar_at_peak_is_flagged_for_precision():
    # T4: 65 TFLOP/s fp16 -> bar 24 TFLOP/s; fp32 training peaks at 8.1 TFLOP/s [S9]
    flag = misconfiguration(analyze(load_scenario(SCENARIOS / "llama7b-t4.yaml")))
    assert flag.threshold_flops_per_s == pytest.approx(65e12 * 115 / 312, rel=1e-12)
    assert flag.likely_misconfigured and flag.biggest_loss == "precision"


def test_memory_bound_time_is_part_of_the_engine_compute_time(small):
    from sim.compute import kernel_time_s
    from sim.engine import Engine
    engine = Engine(small.scenario)
    ops = [op for op in engine.programs[small.step.devices[0].stage].ops
           if op.stream == "compute" and op.phase != "optimizer" and op.kernels]
    kernels = [k for op in ops for k in op.kernels]
    gpu, eff, dtype = small.scenario.cluster.gpu, engine.eff, engine.dtype
    total = sum(kernel_time_s(k, gpu, eff, dtype) for k in kernels)
    # a kernel is memory-bound when its bytes at the achievable DRAM bandwidth outlast its FLOPs at the achievable rate
    by_hand = sum(kernel_time_s(k, gpu, eff, dtype) for k in kernels
                  if k.kind == "memory" or k.flop == 0
                  or k.bytes / (gpu.memory_bandwidth_bytes_per_s * eff.memory) > kernel_time_s(k, gpu, eff, dtype)
                  - eff.kernel_launch_s - 1e-15)
    memory_bound = small.step.devices[0].memory_bound_s
    # kernel times of stage 0's compute ops add up to the engine's compute time (optimizer apart)
    assert total == pytest.approx(small.time_breakdown_s["compute"], rel=1e-9)
    assert memory_bound == pytest.approx(by_hand, rel=1e-9)
    assert 0 < memory_bound < total
    assert misconfiguration(small).losses_s["memory_bound"] == memory_bound


def test_a_job_on_part_of_a_node_pays_its_share_of_the_host():
    """One GPU of a DGX H100: host power (10.2 kW - 8 x 700 W = 4.6 kW) / 8 = 575 W besides the GPU."""
    a = analyze(load_scenario(SCENARIOS / "llama70b-qlora-h100.yaml", ["training.global_batch_size=2"]))
    run = run_plan(a, tokens=1e6)
    assert run.avg_power_w - run.gpu_power_w == pytest.approx(4600 / 8, rel=1e-12)


def test_a_cpu_optimizer_step_leaves_the_gpu_idle():
    """ZeRO-Offload: Adam runs on the CPU, so the GPUs are busy only while their compute stream runs."""
    from sim.planning import busy_fraction
    a = analyze(load_scenario(SCENARIOS / "llama7b-4xt4-zero3.yaml"))
    d = a.step.devices[0]
    assert d.cpu_optimizer_s > 0 and d.cpu_optimizer_s <= d.breakdown_s["optimizer"]
    gpu_optimizer = d.breakdown_s["optimizer"] - d.cpu_optimizer_s
    busy = d.breakdown_s["compute"] + d.breakdown_s["overlap_slowdown"] + gpu_optimizer
    assert busy_fraction(a) == pytest.approx(busy / a.step_time_s, rel=1e-12)
