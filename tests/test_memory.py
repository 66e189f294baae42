"""Model-state and activation memory against the ZeRO paper and hand calculations."""
import dataclasses

import pytest

from sim.memory import bytes_per_param, microbatches_in_flight, model_state_bytes
from sim.plan import Plan

BASE = Plan(tp=1, pp=1, cp=1, dp=64, zero=0, sequence_parallel=False, recompute="none", schedule="1f1b",
            virtual_stages=1, seq_len=2048, global_batch_size=64, micro_batch_size=1, precision="fp16",
            optimizer="adamw", grad_dtype="fp16", flash_attention=True, chunk_layers=(1,))


def plan(**kw) -> Plan:
    return dataclasses.replace(BASE, **kw)


# Rajbhandari et al. 2020 (ZeRO, arXiv:1910.02054) Figure 1: Psi = 7.5 B, K = 12, Nd = 64:
# baseline (2 + 2 + K) Psi = 120 GB; P_os 31.4 GB; P_os+g 16.6 GB; P_os+g+p 1.9 GB.
@pytest.mark.parametrize("zero, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example(zero, expected_gb):
    total = sum(model_state_bytes(7.5e9, plan(zero=zero, zero3_impl="deepspeed")))
    assert total / 1e9 == pytest.approx(expected_gb, rel=0.02)


# PyTorch FSDP with MixedPrecision(param_dtype=bf16, reduce_dtype=fp32) (Composer's amp_bf16, torchtitan):
# the rank's shard is the fp32 parameter the optimizer updates; only the gathered layer is bf16. The shard
# holds 4 (fp32 param) + 4 (fp32 grad) + 8 (two fp32 moments) = 16 B/param, where DeepSpeed ZeRO-3 with
# fp32 gradients holds 2 + 4 + (4 + 8) = 18. Llama 3.1 8B (8.03 B params) on 8 ranks: 16.06 vs 18.07 GB.
@pytest.mark.parametrize("impl, grad, expected_gb", [("fsdp", "fp32", 16.06), ("fsdp", "bf16", 16.06),
                                                     ("deepspeed", "fp32", 18.07), ("deepspeed", "bf16", 16.06)])
def test_fsdp_shard_is_the_fp32_master(impl, grad, expected_gb):
    states = model_state_bytes(8.03e9, plan(dp=8, zero=3, zero3_impl=impl, precision="bf16", grad_dtype=grad))
    assert sum(states) / 1e9 == pytest.approx(expected_gb, rel=1e-3)
    if impl == "fsdp":
        assert states == pytest.approx((8.03e9 * 4 / 8, 8.03e9 * 4 / 8, 8.03e9 * 8 / 8))


@pytest.mark.parametrize("precision, grad, optimizer, expected", [
    ("fp32", "fp32", "adamw", (4, 4, 8)),        # 16 B/param: fp32 weights, grads, two moments
    ("bf16", "fp32", "adamw", (2, 4, 12)),       # Megatron bf16 default: 18 B/param
    ("bf16", "bf16", "adamw", (2, 2, 12)),       # 16 B/param (ZeRO's 2 + 2 + 12)
    # master 4 + 1 + 1 byte moments + one fp32 absmax per 256-value block of each (bitsandbytes)
    ("fp16", "fp16", "adamw-8bit", (2, 2, 4 + 1 + 1 + 2 * 4 / 256)),
    ("fp32", "fp32", "sgd", (4, 4, 4)),          # momentum buffer
])
def test_bytes_per_param(precision, grad, optimizer, expected):
    assert bytes_per_param(plan(precision=precision, grad_dtype=grad, optimizer=optimizer)) == expected


def test_llama7b_fp32_adam_needs_108_gb():
    total = sum(model_state_bytes(6.74e9, plan(dp=1, precision="fp32", grad_dtype="fp32")))
    assert total / 1e9 == pytest.approx(16 * 6.74, rel=1e-9)


def test_in_flight_microbatches():
    p = plan(pp=4, dp=1, global_batch_size=8, chunk_layers=(1, 1, 1, 1))
    assert [microbatches_in_flight(p, i) for i in range(4)] == [4, 3, 2, 1]          # 1F1B: pp - stage
    g = dataclasses.replace(p, schedule="gpipe")
    assert [microbatches_in_flight(g, i) for i in range(4)] == [8, 8, 8, 8]          # GPipe: all m
    small = dataclasses.replace(p, global_batch_size=2)
    assert microbatches_in_flight(small, 0) == 2                                     # never more than m


def test_interleaved_first_stage_factor():
    # Korthikanti et al. 2022 §4.2.3: first stage holds p microbatches x (1 + (p-1)/(p v)) of its layers
    p_, v = 8, 3
    p = plan(pp=p_, dp=1, schedule="interleaved", virtual_stages=v, global_batch_size=64,
             chunk_layers=(1,) * (p_ * v))
    assert microbatches_in_flight(p, 0) == pytest.approx(p_ * (1 + (p_ - 1) / (p_ * v)), rel=1e-12)


@pytest.mark.parametrize("impl, expected", [
    # fused (apex / TE FusedAdam): read the fp32 grad (4), read + write master and moments (2 x 12),
    # write the fp16 weight (2); plus the grad-norm read (4)
    ("fused", 4 + 2 * 12 + 2 + 4),
    # unfused torch AdamW, every op a pass (4-byte states s, grads g, master p):
    # lerp m (2s + g) + mul v (2s) + addcmul v (2s + g) + sqrt, div, add eps (3 x 2s)
    # + addcdiv p (2p + 2s) + weight decay (2p) + fp16 copy (p + 2) + clip scale (2g) + norm read (g)
    ("unfused", (8 + 4) + 8 + (8 + 4) + 3 * 8 + (8 + 8) + 8 + (4 + 2) + 8 + 4),
])
def test_optimizer_step_dram_traffic_per_parameter(impl, expected):
    from sim.kernels import optimizer_kernels
    ks = optimizer_kernels(1e9, plan(optimizer_impl=impl, grad_dtype="fp32"))
    assert sum(k.bytes for k in ks) / 1e9 == pytest.approx(expected, rel=1e-12)


def test_partial_recompute_keeps_inputs_of_its_layers_and_everything_of_the_rest():
    from sim.memory import chunk_activation_bytes, layer_activation_total
    from sim.model import load_model
    m = load_model("llama3-8b")
    p = plan(dp=8, recompute="full", recompute_layers=10, seq_len=4096, chunk_layers=(32,), precision="bf16",
             grad_dtype="fp32")
    inputs = 4096 * m.hidden * 2                       # a recomputed layer keeps its 16-bit input
    assert layer_activation_total(m, p, "full") == pytest.approx(inputs, rel=1e-12)
    expected = 10 * inputs + 22 * layer_activation_total(m, p, "none")
    assert chunk_activation_bytes(m, p, 32) == pytest.approx(expected, rel=1e-12)
    assert chunk_activation_bytes(m, p, 6) == pytest.approx(6 * inputs, rel=1e-12)   # a short chunk: all of it



def test_pure_bf16_adamw_keeps_no_master_and_bf16_moments():
    # torch.optim.AdamW on a bf16 model: exp_avg / exp_avg_sq = zeros_like(param) in bf16, no fp32 copy:
    # 2 (weights) + 2 (bf16 grads) + 2 x 2 (moments) = 8 B/param, against 2 + 2 + 12 = 16 mixed
    assert bytes_per_param(plan(precision="bf16", grad_dtype="bf16", optimizer_dtype="bf16")) == (2, 2, 4)
    assert sum(model_state_bytes(6.74e9, plan(dp=1, precision="bf16", grad_dtype="bf16",
                                              optimizer_dtype="bf16"))) / 1e9 == pytest.approx(8 * 6.74, rel=1e-9)
    # under FSDP the shard is then the bf16 weight itself (no fp32 shard to serve as master)
    states = model_state_bytes(8e9, plan(dp=8, zero=3, precision="bf16", grad_dtype="bf16", optimizer_dtype="bf16"))
    assert states == pytest.approx((2e9, 2e9, 4e9))


def test_hybrid_sharding_shards_the_states_within_a_group():
    # HYBRID_SHARD over 64 ranks in groups of 8: every rank holds 1/8 of the states (FSDP: 16 B/param)
    full = model_state_bytes(8.03e9, plan(dp=64, zero=3, precision="bf16", grad_dtype="fp32"))
    hybrid = model_state_bytes(8.03e9, plan(dp=64, zero=3, dp_shard=8, precision="bf16", grad_dtype="fp32"))
    assert sum(full) == pytest.approx(8.03e9 * 16 / 64, rel=1e-12)
    assert sum(hybrid) == pytest.approx(8.03e9 * 16 / 8, rel=1e-12)

