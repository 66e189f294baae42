"""FLOP counts against Narayanan et al. 2021 eq. (3) and the PaLM/Llama MFU convention."""
import pytest

from sim.flops import model_flops_per_token, step_flops
from sim.model import load_model


def test_gpt3_model_flops_match_narayanan():
    m = load_model({"base": "gpt3-175b", "vocab": 51200})
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    model = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    hardware_full = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    f = step_flops(m, tokens=B * s, seq_len=s, recompute="full")
    assert f.model_flop == pytest.approx(model, rel=0.01)
    assert f.hardware_flop == pytest.approx(hardware_full, rel=0.01)
    assert step_flops(m, tokens=B * s, seq_len=s, recompute="none").hardware_flop == pytest.approx(model, rel=0.01)


def test_early_stopped_full_recompute_skips_the_mlp_down_projection():
    # PyTorch >= 2.1 non-reentrant checkpoint stops once the down projection's input is rebuilt: per
    # token and layer the recomputation is the forward (24 h^2 + 4 s h) less that GEMM's 2 x 4h x h,
    # i.e. 16 h^2 + 4 s h, so hardware FLOPs = Narayanan's model FLOPs + 16 B s l h^2 (1 + s / (4 h))
    m = load_model({"base": "gpt3-175b", "vocab": 51200, "dropout": False})
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    model = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    f = step_flops(m, tokens=B * s, seq_len=s, recompute="full", early_stop=True)
    assert f.model_flop == pytest.approx(model, rel=0.01)
    assert f.hardware_flop == pytest.approx(model + 16 * B * s * l * h**2 * (1 + s / (4 * h)), rel=0.01)
    # with dropout after the MLP its mask, saved after the down projection ran, is the last tensor:
    # the recomputation skips only the residual add, so the full forward is re-run
    d = load_model({"base": "gpt3-175b", "vocab": 51200, "dropout": True})
    full = step_flops(d, tokens=B * s, seq_len=s, recompute="full")
    assert step_flops(d, tokens=B * s, seq_len=s, recompute="full", early_stop=True).hardware_flop == full.hardware_flop


def test_selective_recompute_adds_attention_core_only():
    # Korthikanti et al. 2022 §5: selective recompute re-runs QK^T and AV: 4 s h FLOP/token/layer forward
    m = load_model("gpt3-175b")
    s, tokens = 2048, 2048
    none = step_flops(m, tokens=tokens, seq_len=s, recompute="none")
    sel = step_flops(m, tokens=tokens, seq_len=s, recompute="selective")
    assert sel.recompute_flop == pytest.approx(m.layers * 4 * s * m.hidden * tokens, rel=1e-12)
    assert sel.model_flop == none.model_flop


def test_llama_flops_per_token_palm_convention():
    # PaLM Appendix B / Llama 3: 6 N + 12 L H Q T per token, with N the non-embedding params + output layer
    m = load_model("llama3.1-405b")
    T = 8192
    n = m.total_params - m.embedding_params
    expected = 6 * n + 12 * m.layers * m.heads * m.d_head * T
    assert model_flops_per_token(m, T) == pytest.approx(expected, rel=0.002)


def test_causal_halves_attention():
    m = load_model("llama3-8b")
    full = step_flops(m, tokens=1, seq_len=8192)
    causal = step_flops(m, tokens=1, seq_len=8192, causal=True)
    attn = 3 * m.layers * 4 * 8192 * m.q_width
    assert full.model_flop - causal.model_flop == pytest.approx(attn / 2, rel=1e-12)


def test_selective_recompute_with_flash_attention_recomputes_nothing():
    m = load_model("gpt3-175b")
    f = step_flops(m, tokens=2048, seq_len=2048, recompute="selective", flash_attention=True)
    assert f.recompute_flop == 0 and f.hardware_flop == f.model_flop


def test_partial_recompute_rebuilds_its_share_of_the_layers():
    # Megatron's block method with N of L layers: the recomputation is N / L of a full one
    m = load_model("llama3-8b")
    full = step_flops(m, tokens=8192, seq_len=8192, recompute="full")
    part = step_flops(m, tokens=8192, seq_len=8192, recompute="full", recompute_fraction=12 / 32)
    assert part.recompute_flop == pytest.approx(full.recompute_flop * 12 / 32, rel=1e-12)
    assert part.model_flop == full.model_flop
