"""Activation memory against Korthikanti et al. 2022 (arXiv:2205.05198) Table 2, GPT-3 175B shapes."""
import pytest

from sim.activations import layer_activation_bytes
from sim.model import load_model

M = load_model("gpt3-175b")
s, b, h, a, t = 2048, 1, 12288, 96, 8
sbh = s * b * h


def per_layer(**kw):
    return layer_activation_bytes(M, seq_len=s, micro_batch=b, **kw)


def test_no_parallelism_stores_softmax():
    assert per_layer(flash_attention=False) == pytest.approx(sbh * (34 + 5 * a * s / h), rel=1e-12)


def test_tensor_parallel_without_sp():
    assert per_layer(tp=t, flash_attention=False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-12)


def test_tensor_and_sequence_parallel():
    got = per_layer(tp=t, sequence_parallel=True, flash_attention=False)
    assert got == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)), rel=1e-12)


def test_selective_recompute_with_sp():
    got = per_layer(tp=t, sequence_parallel=True, recompute="selective", flash_attention=False)
    assert got == pytest.approx(34 * sbh / t, rel=1e-12)


def test_full_recompute_keeps_layer_input():
    assert per_layer(recompute="full", flash_attention=False) == pytest.approx(2 * sbh, rel=1e-12)
    assert per_layer(tp=t, recompute="full") == pytest.approx(2 * sbh, rel=1e-12)


def test_flash_attention_drops_the_quadratic_term():
    # 34 sbh plus FlashAttention's float32 log-sum-exp (4 a s b bytes, 0.09% here)
    assert per_layer(flash_attention=True) == pytest.approx(34 * sbh, rel=2e-3)
    assert per_layer(tp=t, sequence_parallel=True, flash_attention=True) == pytest.approx(34 * sbh / t, rel=2e-3)


def test_context_parallel_splits_sequence():
    full = per_layer(tp=t, sequence_parallel=True)
    assert per_layer(tp=t, sequence_parallel=True, cp=2) == pytest.approx(full / 2, rel=1e-12)


def test_llama_gqa_swiglu_no_dropout():
    m = load_model("llama3-70b")
    s2, hd = 4096, m.hidden
    got = layer_activation_bytes(m, seq_len=s2, micro_batch=1)
    # 2 norm inputs + QKV and MLP inputs (4 sbh x 2 B) + Q, O (2 x 2 sbh) + K, V (2 x 2 sbh x 8/64)
    # + 3 SwiGLU tensors of width f (3 x 2 s f) + float32 LSE (4 a s)
    expected = s2 * (8 * hd + 4 * hd + 4 * hd * 8 / 64 + 6 * m.ffn_hidden + 4 * m.heads)
    assert got == pytest.approx(expected, rel=1e-12)


def test_dtensor_tp_saves_the_gathered_gemm_inputs():
    # Korthikanti's 34 sbh / t with SP counts the QKV and first-MLP GEMM inputs (2 x 2 sbh) sharded;
    # PyTorch DTensor's ColwiseParallel saves them all-gathered: 4 sbh whole, 30 sbh / t for the rest
    got = per_layer(tp=t, sequence_parallel=True, gathered_inputs=True, flash_attention=False)
    assert got == pytest.approx(sbh * (4 + 30 / t + 5 * a * s / (h * t)), rel=1e-12)
    # without sequence parallelism the inputs are whole either way
    assert per_layer(tp=t, gathered_inputs=True, flash_attention=False) == per_layer(tp=t, flash_attention=False)


def test_dtensor_output_gemm_input_is_gathered():
    from sim.activations import output_activation_bytes
    kw = dict(seq_len=s, micro_batch=b, tp=t, sequence_parallel=True, dtype_bytes=2)
    logits = 4 * s * b * M.vocab / t
    assert output_activation_bytes(M, **kw) == pytest.approx(2 * 2 * sbh / t + logits, rel=1e-12)
    assert output_activation_bytes(M, **kw, gathered_inputs=True) == pytest.approx(2 * sbh / t + 2 * sbh + logits,
                                                                                   rel=1e-12)
