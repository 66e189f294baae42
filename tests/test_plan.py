"""Plan validation: every infeasible plan is a one-line error naming its key."""
import pytest

from sim.errors import ScenarioError
from sim.plan import split_layers
from sim.scenario import scenario_from_mapping


def test_llama3_405b_split():
    # Llama 3 paper §3.3.2: one layer fewer on the first and the last of 16 stages: 7 + 14 x 8 + 7 = 126
    assert split_layers(126, 16, 7, 7) == (7,) + (8,) * 14 + (7,)
    assert split_layers(126, 16) == (7,) + (8,) * 14 + (7,)
    # §3.3.2 with one-layer chunks: an embedding-only first chunk and an output-only last chunk, V = 8
    assert split_layers(126, 128, 0, 0) == (0,) + (1,) * 126 + (0,)
    assert split_layers(3, 1, 0, 0) == ()


def test_even_split_and_impossible():
    assert split_layers(32, 4) == (8, 8, 8, 8)
    assert split_layers(10, 4) == (2, 3, 3, 2)
    assert sum(split_layers(80, 24)) == 80 and max(split_layers(80, 24)) - min(split_layers(80, 24)) <= 1
    assert split_layers(3, 4) == ()
    assert split_layers(10, 2, first=4, last=5) == ()


def mapping(**sections):
    base = {
        "model": "llama3-8b",
        "cluster": {"topology": "dgx-h100", "nodes": 2},
        "training": {"seq_len": 4096, "global_batch_size": 64, "micro_batch_size": 1, "precision": "bf16"},
        "parallelism": {"tp": 4, "pp": 2, "cp": 1},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(base[key], dict) and isinstance(value, dict) else value
    return base


def test_dp_is_derived():
    s = scenario_from_mapping(mapping())
    assert s.plan.dp == 2 and s.plan.gpus == 16 and s.plan.microbatches == 32


@pytest.mark.parametrize("change, key, fragment", [
    ({"parallelism": {"dp": 4}}, "parallelism.dp", "tp(4) * pp(2) * cp(1) * dp(4) = 32 != 16"),
    ({"parallelism": {"tp": 3}}, "parallelism", "does not divide the 16 GPUs"),
    ({"model": "gpt-1.7b", "training": {"seq_len": 2048}, "parallelism": {"tp": 16, "pp": 1, "tp_across_nodes": True}},
     "parallelism.tp", "does not divide the 24 attention heads"),
    ({"cluster": {"topology": "dgx-h100", "nodes": 4}, "parallelism": {"tp": 16, "pp": 2}}, "parallelism.tp",
     "exceeds the 8 GPUs of one node"),
    ({"training": {"global_batch_size": 63}}, "training.global_batch_size", "not divisible by dp(2)"),
    ({"parallelism": {"pp": 2, "virtual_stages": 2}}, "parallelism.virtual_stages", "needs schedule: interleaved"),
    ({"parallelism": {"zero": 2, "zero3_impl": "deepspeed-0.3"}}, "parallelism.zero3_impl", "expected zero: 3"),
    ({"training": {"precision": "fp8", "kernel_arch": "ampere"}}, "training.kernel_arch", "expected native"),
    ({"parallelism": {"sequence_parallel": False, "tp_comm_overlap": True}}, "parallelism.tp_comm_overlap",
     "expected sequence_parallel: true"),
    ({"training": {"seq_len": 4097}, "parallelism": {"cp": 2, "pp": 1}}, "parallelism.cp", "does not divide seq_len"),
    ({"model": "gpt-1.7b", "training": {"seq_len": 4096}}, "training.seq_len", "exceeds the 2048 learned positions"),
])
def test_invalid_plans(change, key, fragment):
    with pytest.raises(ScenarioError) as exc:
        scenario_from_mapping(mapping(**change), file="x.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"x.yaml: {key}: ") and fragment in msg and "\n" not in msg


def test_too_many_stages():
    data = mapping(model="llama2-7b", parallelism={"tp": 1, "pp": 16},
                   training={"global_batch_size": 16})
    data["cluster"] = {"topology": "dgx-h100", "nodes": 4}
    s = scenario_from_mapping(data)
    assert s.plan.chunk_layers == (2,) * 16
    data["parallelism"] = {"tp": 1, "pp": 8, "schedule": "interleaved", "virtual_stages": 8}
    with pytest.raises(ScenarioError, match="cannot split 32 layers"):
        scenario_from_mapping(data)


def test_bf16_on_t4_suggests_fp16():
    data = {"model": "llama2-7b", "cluster": {"topology": "t4"},
            "training": {"seq_len": 512, "global_batch_size": 1, "precision": "bf16"}}
    with pytest.raises(ScenarioError) as exc:
        scenario_from_mapping(data, file="t4.yaml")
    assert "training.precision" in str(exc.value) and "use precision: fp16" in str(exc.value)


def test_kv_heads_replicated_when_tp_exceeds_them():
    data = mapping(model="llama3-70b", parallelism={"tp": 16, "pp": 1, "tp_across_nodes": True})
    s = scenario_from_mapping(data)
    assert s.plan.tp == 16   # 8 kv heads, each held by 2 ranks


def test_grad_dtype_defaults_like_megatron():
    assert scenario_from_mapping(mapping()).plan.grad_dtype == "fp32"
    assert scenario_from_mapping(mapping(training={"precision": "fp16"})).plan.grad_dtype == "fp16"


def test_dtensor_tp_runs_its_backward_collectives_in_line():
    from sim.scenario import scenario_from_mapping
    data = {"model": "llama3-8b", "cluster": {"topology": "dgx-h100", "nodes": 1},
            "training": {"seq_len": 4096, "global_batch_size": 8},
            "parallelism": {"tp": 8, "sequence_parallel": True}}
    megatron = scenario_from_mapping(data).plan
    dtensor = scenario_from_mapping({**data, "parallelism": {**data["parallelism"], "tp_impl": "dtensor"}}).plan
    assert megatron.tp_backward_overlap and not megatron.gathered_inputs
    assert not dtensor.tp_backward_overlap and dtensor.gathered_inputs
