"""Malformed scenarios: exit status 2, one readable line, never a traceback (also under random mutation)."""
import copy
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.errors import ScenarioError
from sim.scenario import scenario_from_mapping

VALID = {
    "name": "tiny",
    "model": "llama3-8b",
    "cluster": {"topology": "dgx-h100", "nodes": 2},
    "training": {"seq_len": 4096, "global_batch_size": 64, "micro_batch_size": 1, "precision": "bf16",
                 "optimizer": "adamw"},
    "parallelism": {"tp": 4, "pp": 2, "cp": 1, "zero": 1, "sequence_parallel": True, "recompute": "selective",
                    "schedule": "1f1b", "virtual_stages": 1},
}


def write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda d: d["parallelism"].update(tpp=2), "parallelism.tpp", "did you mean 'tp'"),
    (lambda d: d.update(trainig=d.pop("training")), "trainig", "did you mean 'training'"),
    (lambda d: d["training"].update(seq_len="long"), "training.seq_len", "expected an integer"),
    (lambda d: d["parallelism"].update(tp=3), "parallelism", "does not divide"),
    (lambda d: d["parallelism"].update(dp=5), "parallelism.dp", "!= 16 GPUs"),
    (lambda d: d["parallelism"].update(schedule="zigzag"), "parallelism.schedule", "expected one of"),
    (lambda d: d["cluster"].update(topology="dgx-h10"), "cluster.topology", "did you mean"),
    (lambda d: d.update(model="lama3-8b"), "model", "did you mean 'llama3-8b'"),
    (lambda d: d["training"].update(seq_len=True), "training.seq_len", "expected an integer"),
    (lambda d: d["parallelism"].update(sequence_parallel="maybe"), "parallelism.sequence_parallel", "true or false"),
    (lambda d: d.update(memory={"workspace_bytes": float("inf")}), "memory.workspace_bytes", "finite"),
    (lambda d: d["parallelism"].update(recompute_early_stop=True), "parallelism.recompute_early_stop",
     "expected recompute: full"),
    (lambda d: d["parallelism"].update(recompute_layers=4), "parallelism.recompute_layers", "expected recompute: full"),
    (lambda d: d["parallelism"].update(recompute="full", recompute_layers=0), "parallelism.recompute_layers",
     "greater than or equal to 1"),
    (lambda d: d["parallelism"].update(tp_impl="jax"), "parallelism.tp_impl", "megatron"),
    (lambda d: d["parallelism"].update(dp_shard=2), "parallelism.dp_shard", "expected zero: 3"),
    (lambda d: d["training"].update(precision="fp16", optimizer_dtype="bf16"), "training.optimizer_dtype",
     "expected fp32"),
    (lambda d: d["training"].update(optimizer="adamw-8bit", optimizer_dtype="bf16"), "training.optimizer_dtype",
     "expected fp32"),
    (lambda d: d["cluster"].update(topology="dgx-2") or d["training"].update(precision="fp16",
                                                                            attention_kernel_arch="ampere"),
     "training.attention_kernel_arch", "expected native"),
    (lambda d: d["training"].update(optimizer="adamw-8bit", optimizer_impl="unfused"), "training.optimizer_impl",
     "expected fused"),
    (lambda d: d["training"].update(implementation="huggingface") or d["parallelism"].update(recompute="selective"),
     "training.implementation", "expected fused"),
    (lambda d: d["training"].update(implementation="jax"), "training.implementation", "fused"),
    (lambda d: d["training"].update(implementation="torch") or d.update(finetune={"method": "qlora",
                                                                                  "base_weight_dtype": "nf4"})
     or d["parallelism"].update(sequence_parallel=False, recompute="none"),
     "training.implementation", "16-bit frozen base"),
])
def test_bad_scenarios_exit_2_with_one_line(tmp_path, capsys, mutate, key, fragment):
    data = copy.deepcopy(VALID)
    mutate(data)
    path = write(tmp_path, data)
    code, out, err = run_cli([path], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: {path}: {key}") and fragment in lines[0]


@pytest.mark.parametrize("flag, value, fragment", [("--plot", "step.bmp", "ending in .png"),
                                                   ("--trace", "/nonexistent/dir/t.json", "does not exist"),
                                                   ("--csv", "/nonexistent/dir/r.csv", "does not exist")])
def test_bad_output_paths_fail_before_simulating(tmp_path, capsys, flag, value, fragment):
    code, out, err = run_cli([write(tmp_path, VALID), flag, value], capsys)
    assert code == 2 and out == "" and fragment in err and len(err.strip().splitlines()) == 1


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli([str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml: no such file" in err and len(err.strip().splitlines()) == 1


def test_invalid_yaml(tmp_path, capsys):
    path = write(tmp_path, "model: [llama\ncluster: {")
    code, _, err = run_cli([path], capsys)
    assert code == 2 and "invalid YAML" in err and "line" in err


def test_bad_override(tmp_path, capsys):
    path = write(tmp_path, VALID)
    code, _, err = run_cli([path, "--set", "parallelism.tp"], capsys)
    assert code == 2 and "--set: expected KEY=VALUE" in err
    code, _, err = run_cli([path, "--set", "parallelism.pipeline=2"], capsys)
    assert code == 2 and "parallelism.pipeline: unknown key" in err


def test_console_script_has_no_traceback(tmp_path):
    data = copy.deepcopy(VALID)
    data["parallelism"]["tp"] = 5
    path = write(tmp_path, data)
    proc = subprocess.run([sys.executable, "-m", "sim.cli", path], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- property test: random mutations of a valid scenario never crash with anything but ScenarioError
def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(VALID))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                   st.sampled_from(["bf16", "fp16", "fp32", "fp8", "gpipe", "interleaved", "full", "t4",
                                    "dgx-a100", "llama2-7b", "gpt3-175b", "1 GB", "0"]))
MUTATION = st.tuples(st.sampled_from(["set", "delete", "rename"]), st.sampled_from(PATHS), VALUES,
                     st.text(min_size=1, max_size=6))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MUTATION, min_size=1, max_size=3))
def test_random_mutations_only_raise_scenario_error(mutations):
    data = copy.deepcopy(VALID)
    for op, path, value, newkey in mutations:
        node = data
        for k in path[:-1]:
            if not isinstance(node, dict) or k not in node:
                node = None
                break
            node = node[k]
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        if op == "set":
            node[path[-1]] = value
        elif op == "delete":
            del node[path[-1]]
        else:
            node[newkey] = node.pop(path[-1])
    try:
        scenario_from_mapping(data, file="m.yaml")
    except ScenarioError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("m.yaml")
