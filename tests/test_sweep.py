"""`simulate sweep`: grid products, --auto enumeration, infeasible plans, resume, CSV columns, Dask, bad input."""
import csv
import re
from pathlib import Path

import pytest

from sim.analysis import analyze
from sim.cli import main
from sim.plan_space import MAX_MICRO_BATCH, MAX_VIRTUAL_STAGES, MIN_CP_TOKENS, auto_points, plan_id
from sim.report import csv_row
from sim.scenario import load_scenario
from sim.sweep import Evaluator, build_sweep, summary
from sim.units import GiB

from conftest import SCENARIOS

# GPT 1.7B (24 layers, 24 heads, ffn 9216) on one DGX H100: every plan fits, simulations are quick.
SMALL = """name: gpt-small
model: gpt-1.7b
cluster: {topology: dgx-h100, nodes: NODES}
training: {seq_len: 2048, global_batch_size: 16, micro_batch_size: 1, precision: bf16}
parallelism: {tp: 1, pp: 1, zero: 0, recompute: none}
"""


def scenario_file(tmp_path: Path, text: str = SMALL, nodes: int = 1, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("NODES", str(nodes)))
    return path


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def row_set(rows: list[dict[str, str]]) -> set[tuple]:
    return {tuple(sorted(r.items())) for r in rows}


def sweep(path: Path, out: Path, *args: str) -> int:
    return main(["sweep", str(path), "--out", str(out), "--jobs", "1", *args])


# ---- grid ------------------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_and_ids_ignore_flag_order(tmp_path):
    path = scenario_file(tmp_path)
    flags = ["parallelism.tp=1,2,4", "training.micro_batch_size=1,2", "parallelism.zero=0,1"]
    s = build_sweep(str(path), [], flags, auto=False)
    assert len(s.plans) == 3 * 2 * 2 and not s.invalid
    combos = {(p["parallelism.tp"], p["training.micro_batch_size"], p["parallelism.zero"]) for p in s.plans.values()}
    assert combos == {(t, m, z) for t in (1, 2, 4) for m in (1, 2) for z in (0, 1)}
    reordered = build_sweep(str(path), [], flags[::-1], auto=False)
    assert set(reordered.plans) == set(s.plans)
    # --set overrides are part of a plan's identity
    assert set(build_sweep(str(path), ["training.seq_len=1024"], flags, auto=False).plans).isdisjoint(s.plans)


def test_grid_run_writes_one_row_per_plan_and_marks_invalid_combinations(tmp_path, capsys):
    path, out = scenario_file(tmp_path), tmp_path / "out.csv"
    # tp=5 does not divide the 24 heads: a grid combination that is not a plan -> a row with status error
    assert sweep(path, out, "--grid", "parallelism.tp=1,5", "--grid", "training.micro_batch_size=1,2") == 0
    header, rows = read(out)
    assert header[:5] == ["plan_id", "status", "reason", "parallelism.tp", "training.micro_batch_size"]
    assert len(rows) == 4 and len({r["plan_id"] for r in rows}) == 4
    for r in rows:
        if r["parallelism.tp"] == "5":
            assert r["status"] == "error" and "parallelism" in r["reason"] and r["step_time_s"] == ""
        else:
            assert r["status"] == "ok" and r["tp"] == "1" and r["micro_batch_size"] == r["training.micro_batch_size"]
            # throughput = tokens of the global batch / step time
            assert float(r["tokens_per_s"]) == pytest.approx(16 * 2048 / float(r["step_time_s"]), rel=1e-9)
    text = capsys.readouterr().out
    assert "4 plans enumerated" in text and "2 fit, 0 do not fit, 2 errors" in text


# ---- --auto ----------------------------------------------------------------------------------------
LLAMA8B_16 = """name: llama3-8b-16
model: llama3-8b
cluster: {topology: dgx-h100, nodes: 2}
training: {seq_len: 8192, global_batch_size: 32, micro_batch_size: 1, precision: bf16}
parallelism: {tp: 8, pp: 1, zero: 1, sequence_parallel: true, recompute: selective}
"""


def test_auto_enumerates_exactly_the_valid_factorizations(tmp_path):
    path = scenario_file(tmp_path, LLAMA8B_16)
    base = load_scenario(path)
    points = auto_points(base.model, base.training, base.parallelism, num_gpus=16, gpus_per_node=8)
    # independent enumeration: Llama 3 8B has 32 heads, 8 KV heads, ffn 14336, 32 layers
    n, layers, seq, batch = 16, 32, 8192, 32
    expected, count = set(), 0
    for tp in (d for d in range(1, n + 1) if n % d == 0):
        if 32 % tp or (8 % tp and tp % 8) or 14336 % tp or tp > 8:
            continue
        for pp in (d for d in range(1, n // tp + 1) if (n // tp) % d == 0 and layers % d == 0):
            for cp in (d for d in range(1, n // (tp * pp) + 1) if (n // (tp * pp)) % d == 0):
                if seq % cp or (cp > 1 and seq // cp < MIN_CP_TOKENS):
                    continue
                dp = n // (tp * pp * cp)
                if batch % dp:
                    continue
                expected.add((tp, pp, cp, dp))
                per_dp = batch // dp
                mbs = [m for m in (1, 2, 4, 8, 16, 32) if m <= MAX_MICRO_BATCH and per_dp % m == 0
                       and (pp == 1 or per_dp // m >= pp)]
                for m in mbs:
                    scheds = 1
                    if pp > 1 and (per_dp // m) % pp == 0 and layers % pp == 0:
                        scheds += sum(1 for v in range(2, MAX_VIRTUAL_STAGES + 1) if (layers // pp) % v == 0)
                    zeros = 1 if dp * cp == 1 else (2 if pp > 1 else 4)
                    count += scheds * zeros * 2        # recompute none / full (selective = none with flash)
    got = {(p["parallelism.tp"], p["parallelism.pp"], p["parallelism.cp"], p["parallelism.dp"]) for p in points}
    assert got == expected and len(points) == count
    assert any(cp > 1 for _, _, cp, _ in got)          # seq 8192 allows CP2
    ids = [plan_id(p) for p in points]
    assert len(set(ids)) == len(ids)
    for p in points:
        assert p["parallelism.sequence_parallel"] == (p["parallelism.tp"] > 1)
        assert p["parallelism.recompute"] in ("none", "full")
        if p["parallelism.schedule"] == "interleaved":
            assert (layers // p["parallelism.pp"]) % p["parallelism.virtual_stages"] == 0
    # every enumerated point is a valid plan for resolve_plan
    s = build_sweep(str(path), [], [], auto=True)
    assert len(s.plans) == len(points) and s.skipped == 0


def test_auto_grid_keys_fix_dimensions_and_gpipe_only_when_asked(tmp_path):
    path = scenario_file(tmp_path, LLAMA8B_16)
    s = build_sweep(str(path), [], ["parallelism.tp=8", "parallelism.schedule=gpipe,1f1b"], auto=True)
    assert {p["parallelism.tp"] for p in s.plans.values()} == {8}
    assert {p["parallelism.schedule"] for p in s.plans.values()} == {"gpipe", "1f1b"}
    assert "gpipe" not in {p["parallelism.schedule"] for p in build_sweep(str(path), [], [], True).plans.values()}


def test_auto_70b_on_64_h100_has_at_least_200_plans():
    base = load_scenario(SCENARIOS / "llama3-70b-64xh100.yaml")
    points = auto_points(base.model, base.training, base.parallelism, num_gpus=base.cluster.num_gpus,
                         gpus_per_node=base.cluster.gpus_per_node)
    assert len(points) >= 200
    # the scenario's own plan is among them (selective recompute is the same plan as none with flash attention)
    assert {"parallelism.tp": 8, "parallelism.pp": 1, "parallelism.cp": 1, "parallelism.dp": 8, "parallelism.zero": 1,
            "parallelism.sequence_parallel": True, "parallelism.recompute": "none", "parallelism.schedule": "1f1b",
            "parallelism.virtual_stages": 1, "training.micro_batch_size": 1} in points


# ---- infeasible plans ------------------------------------------------------------------------------
LLAMA8B_8 = LLAMA8B_16.replace("nodes: 2", "nodes: 1").replace("seq_len: 8192", "seq_len: 2048") \
    .replace("global_batch_size: 32", "global_batch_size: 16")


def test_a_plan_that_does_not_fit_is_a_row_with_its_reason(tmp_path, capsys):
    path, out = scenario_file(tmp_path, LLAMA8B_8), tmp_path / "out.csv"
    assert sweep(path, out, "--grid", "parallelism.tp=1", "--grid", "parallelism.zero=0,3",
                 "--set", "parallelism.sequence_parallel=false", "--set", "parallelism.recompute=none") == 0
    _, rows = read(out)
    by_zero = {r["parallelism.zero"]: r for r in rows}
    # no ZeRO, no TP/PP: 2 (bf16 weights) + 4 (fp32 grads) + 12 (fp32 master + Adam) = 18 B/param x 8.03e9
    # = 135 GiB on every GPU, more than the 80 GB of an H100
    nofit = by_zero["0"]
    assert nofit["status"] == "does_not_fit" and nofit["fits"] == "False"
    m = re.fullmatch(r"does not fit: stage (\d+) needs ([\d.]+) GiB of ([\d.]+) GiB", nofit["reason"])
    assert m and m.group(1) == "0"
    assert float(m.group(2)) > 18 * 8.03e9 / GiB > float(m.group(3))
    assert nofit["step_time_s"] == nofit["tokens_per_s"] == ""          # not simulated
    assert float(nofit["peak_memory_bytes"]) > 18 * 8.03e9
    # ZeRO-3 over 8 ranks: 18 / 8 = 2.25 B/param = 18 GB of model states
    assert by_zero["3"]["status"] == "ok" and float(by_zero["3"]["step_time_s"]) > 0
    text = capsys.readouterr().out
    assert "1 fit, 1 do not fit, 0 errors" in text and by_zero["3"]["plan_id"] in text


def test_top_plans_are_sorted_by_throughput():
    rows = [{"plan_id": "b", "status": "ok", "tokens_per_s": "10"}, {"plan_id": "a", "status": "ok", "tokens_per_s": "30"},
            {"plan_id": "c", "status": "does_not_fit", "tokens_per_s": ""},
            {"plan_id": "d", "status": "ok", "tokens_per_s": "30"}]
    counts, best = summary(rows, 2)
    assert [r["plan_id"] for r in best] == ["a", "d"] and counts == {"ok": 3, "does_not_fit": 1}


# ---- resume ----------------------------------------------------------------------------------------
GRID = ["--grid", "parallelism.tp=1,2", "--grid", "parallelism.zero=0,1", "--grid", "training.micro_batch_size=1,2"]


def test_an_interrupted_sweep_resumed_gives_the_same_rows(tmp_path):
    path = scenario_file(tmp_path)
    full = tmp_path / "full.csv"
    assert sweep(path, full, *GRID) == 0
    header, rows = read(full)
    assert len(rows) == 8
    # killed after three rows, in the middle of the fourth
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.csv"
    cut.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    assert sweep(path, cut, *GRID, "--resume") == 0
    header2, resumed = read(cut)
    assert header2 == header and len(resumed) == 8 and row_set(resumed) == row_set(rows)
    # killed inside the last field of a row: the torn row has every field but must not count as done
    cut.write_text("".join(lines[:4]) + lines[4].rstrip("\r\n")[:-2])
    assert sweep(path, cut, *GRID, "--resume") == 0
    assert row_set(read(cut)[1]) == row_set(rows)
    # a sweep of a subset, then resumed with the whole grid
    part = tmp_path / "part.csv"
    assert sweep(path, part, "--grid", "parallelism.tp=1", *GRID[2:]) == 0
    assert len(read(part)[1]) == 4
    assert sweep(path, part, *GRID, "--resume") == 0
    assert row_set(read(part)[1]) == row_set(rows)


def test_same_rows_with_worker_processes_and_shared_clusters(tmp_path):
    path = scenario_file(tmp_path, nodes=2)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    grid = ["--grid", "parallelism.tp=2,4", "--grid", "parallelism.pp=1,2"]
    assert sweep(path, one, *grid) == 0
    assert main(["sweep", str(path), "--out", str(two), "--jobs", "2", *grid]) == 0
    assert row_set(read(one)[1]) == row_set(read(two)[1])
    # an Evaluator reuses one Cluster across plans; the rows equal those of independent loads
    ev = Evaluator(load_yaml(path), str(path), str(path.parent))
    for point in ({"parallelism.tp": 2, "parallelism.pp": 2}, {"parallelism.tp": 1, "parallelism.pp": 2}):
        row = ev.evaluate(point)
        fresh = csv_row(analyze(load_scenario(path, [f"{k}={v}" for k, v in point.items()])))
        assert row.pop("status") == "ok" and row.pop("reason") == "" and row == fresh


def load_yaml(path: Path):
    from sim.scenario import read_yaml
    return read_yaml(path)


# ---- CSV columns -----------------------------------------------------------------------------------
UNIT_SUFFIXES = ("_bytes", "_s", "_flop", "_w", "_j", "_usd", "_kwh", "_days", "_flop_per_step", "_flop_per_token",
                 "_per_s_per_gpu")
# counts, labels, flags and fractions (no unit), and rates whose unit is their name (tokens/s, TFLOP/s per GPU)
UNITLESS = {"plan_id", "status", "reason", "name", "scenario_file", "model", "params", "gpu", "gpus", "tp", "pp", "cp",
            "dp", "zero", "sequence_parallel", "recompute", "schedule", "virtual_stages", "seq_len",
            "global_batch_size", "micro_batch_size", "precision", "optimizer", "grad_dtype", "tokens_per_step", "fits",
            "peak_stage", "tokens_per_s", "mfu", "hfu", "tflops_per_gpu", "tokens", "tokens_rule", "steps", "nodes",
            "gpu_hours", "gpu_busy_fraction", "pue", "likely_misconfigured", "biggest_loss", "finetune_method",
            "trainable_params", "base_weight_dtype", "offload_optimizer", "offload_params", "host_fits"}


def test_csv_columns_carry_units_and_follow_csv_row(tmp_path):
    path, out = scenario_file(tmp_path), tmp_path / "out.csv"
    assert sweep(path, out, "--grid", "parallelism.tp=1,2") == 0
    header, rows = read(out)
    outputs = list(csv_row(analyze(load_scenario(path))))
    assert header == ["plan_id", "status", "reason", "parallelism.tp", *outputs]
    bad = [c for c in outputs if c not in UNITLESS and not c.endswith(UNIT_SUFFIXES)]
    assert not bad, f"columns without a unit suffix: {bad}"


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    ([], "--grid"),                                                   # nothing to sweep
    (["--grid", "parallelism.foo=1,2"], "parallelism.foo"),           # unknown key
    (["--grid", "parallelism.tp="], "empty"),                         # empty value list
    (["--grid", "parallelism.tp=1,,2"], "empty"),
    (["--grid", "parallelism.tp=5,7"], "tp(5)"),                      # no value the scenario can take
    (["--grid", "parallelism.tp=a,b"], "expected an integer"),
    (["--grid", "parallelism.tp=1", "--grid", "parallelism.tp=2"], "twice"),
    (["--grid", "tp"], "KEY=V1,V2"),
    (["--auto", "--grid", "parallelism.zero=7"], "parallelism.zero"),
    (["--auto", "--jobs", "0"], "--jobs"),
    (["--auto", "--scheduler", "localhost"], "--scheduler"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, needle):
    path, out = scenario_file(tmp_path), tmp_path / "out.csv"
    assert sweep(path, out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not out.exists()


def test_resume_needs_the_same_columns_and_an_existing_csv_needs_resume(tmp_path, capsys):
    path, out = scenario_file(tmp_path), tmp_path / "out.csv"
    out.write_text("a,b\n1,2\n")
    assert sweep(path, out, "--grid", "parallelism.tp=1,2", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "other columns" in err
    assert sweep(path, out, "--grid", "parallelism.tp=1,2") == 2
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"


# ---- Dask ------------------------------------------------------------------------------------------
def test_dask_cluster_gives_the_local_rows(tmp_path):
    distributed = pytest.importorskip("distributed")
    path = scenario_file(tmp_path)
    local, remote = tmp_path / "local.csv", tmp_path / "dask.csv"
    grid = ["--grid", "parallelism.tp=1,2", "--grid", "parallelism.zero=0,1"]
    assert sweep(path, local, *grid) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert main(["sweep", str(path), "--out", str(remote), "--scheduler", cluster.scheduler_address, *grid]) == 0
    (h1, r1), (h2, r2) = read(local), read(remote)
    assert h1 == h2 and len(r2) == 4 and row_set(r1) == row_set(r2)      # rows hold no wall-clock fields


def test_auto_70b_on_64_h100_enumerates_hundreds_of_launchable_plans():
    """Issue 5: >= 200 plans for Llama 3 70B on 64 H100; pp divides the 80 layers (Megatron-LM's rule)."""
    sweep = build_sweep(str(SCENARIOS / "llama3-70b-64xh100.yaml"), [], [], True)
    assert len(sweep.plans) >= 200
    pps = {p["parallelism.pp"] for p in sweep.plans.values()}
    assert pps == {1, 2, 4, 8, 16}                  # divisors of 64 / tp that divide 80 (not 32, 64)


def test_auto_sweep_of_an_overlapped_base_drops_the_overlap_without_sequence_parallelism(tmp_path):
    # TP-comm overlap needs sequence parallelism: points without it must not inherit the base's overlap
    path = scenario_file(tmp_path, LLAMA8B_16.replace("sequence_parallel: true", "sequence_parallel: true, "
                                                                                  "tp_comm_overlap: true"))
    grid = ["parallelism.tp=8", "parallelism.sequence_parallel=true,false", "parallelism.pp=1", "parallelism.cp=1",
            "parallelism.zero=1", "parallelism.recompute=none", "training.micro_batch_size=1"]
    s = build_sweep(str(path), [], grid, auto=True)
    no_sp = [p for p in s.plans.values() if not p["parallelism.sequence_parallel"]]
    assert no_sp and all(p.get("parallelism.tp_comm_overlap") is False for p in no_sp)
    assert all("parallelism.tp_comm_overlap" not in p for p in s.plans.values() if p["parallelism.sequence_parallel"])
    # the key only some points carry is a column of the CSV (it was not: the writer raised)
    out = tmp_path / "out.csv"
    assert sweep(path, out, "--auto", *[a for g in grid for a in ("--grid", g)]) == 0
    header, rows = read(out)
    assert "parallelism.tp_comm_overlap" in header and len(rows) == 2 and all(r["status"] == "ok" for r in rows)
