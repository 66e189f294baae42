"""Parameter counts against published figures and independent formulas."""
import json

import pytest

from sim.errors import ScenarioError
from sim.model import load_model, preset_names

# Published totals: GPT-3 paper Table 2.1 (175.0 B; 174.6 B in Narayanan et al. 2021 Table 2);
# Llama 2 paper / HF model card 6.74 B; Llama 3 model cards 8.03 B and 70.6 B; Llama 3.1 405B
# model card 405.9 B (HF safetensors metadata 405,853,388,800); Mistral 7B 7.24 B (HF).
PUBLISHED = [
    ("gpt3-175b", 174.6e9),
    ("llama2-7b", 6.74e9),
    ("llama3-8b", 8.03e9),
    ("llama3-70b", 70.6e9),
    ("llama3.1-405b", 405.9e9),
    ("mistral-7b", 7.24e9),
    ("llama2-13b", 13.0e9),
    ("llama2-70b", 69.0e9),
]


@pytest.mark.parametrize("name, expected", PUBLISHED)
def test_published_parameter_counts(name, expected):
    assert load_model(name).total_params == pytest.approx(expected, rel=0.005)


# Narayanan et al. 2021 eq. (2): P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)), V = 51,200, s = 2,048;
# it leaves out the final LayerNorm (2h). Table 1 prints these sizes in billions.
MEGATRON_TABLE1 = [("gpt-1.7b", 1.7), ("gpt-3.6b", 3.6), ("gpt-7.5b", 7.5), ("gpt-18.4b", 18.4),
                   ("gpt-39.1b", 39.1), ("gpt-76.1b", 76.1), ("gpt-145.6b", 145.6), ("gpt-310.1b", 310.1),
                   ("gpt-529.6b", 529.6), ("gpt-1t", 1008.0)]


@pytest.mark.parametrize("name, billions", MEGATRON_TABLE1)
def test_megatron_scaling_table(name, billions):
    m = load_model(name)
    l, h, V, s = m.layers, m.hidden, 51200, 2048
    eq2 = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert m.total_params == pytest.approx(eq2 + 2 * h, rel=1e-9)
    assert m.total_params / 1e9 == pytest.approx(billions, rel=0.035)   # the table rounds to the paper's sizes


def test_per_layer_and_embedding_split():
    m = load_model("llama2-7b")
    # per layer: 4 h^2 attention + 3 h f SwiGLU MLP + 2 RMSNorm scales
    assert m.params_per_layer == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert m.embedding_params == 32000 * 4096
    assert m.output_params == 32000 * 4096 + 4096
    assert m.total_params == 32 * m.params_per_layer + m.embedding_params + m.output_params


def test_gqa_shrinks_kv_projections():
    m = load_model("llama3-8b")
    assert m.n_kv_heads == 8 and m.d_head == 128
    assert m.attention_weight_params == 2 * 4096 * 4096 + 2 * 4096 * 1024


def test_hf_llama_config(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": False}
    path = tmp_path / "llama" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.total_params == 6_738_415_616      # meta-llama/Llama-2-7b-hf
    assert m.ffn_kind == "swiglu" and m.norm == "rmsnorm"


def test_hf_gpt2_config(tmp_path):
    # GPT-2 small: 124,439,808 parameters (Hugging Face gpt2, tied embeddings, learned positions)
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
           "vocab_size": 50257, "n_positions": 1024, "activation_function": "gelu_new"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.total_params == 124_439_808
    assert m.tied_embeddings and m.position == "learned" and m.ffn_hidden == 3072


def test_inline_mapping_and_base():
    m = load_model({"base": "gpt3-175b", "vocab": 51200})
    assert m.vocab == 51200 and m.layers == 96
    m2 = load_model({"layers": 2, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 100})
    assert m2.total_params == 2 * (4 * 64 * 64 + 2 * 64 * 256 + 2 * 128) + 100 * 64 + 128 + 100 * 64


@pytest.mark.parametrize("spec, fragment", [
    ("llama2-7", "did you mean 'llama2-7b'"),
    ({"layers": 2, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 100, "hiden": 3}, "model.hiden"),
    ({"layers": "two", "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 100}, "model.layers"),
    ({"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 3, "ffn_hidden": 256, "vocab": 100}, "kv_heads"),
    ("missing/config.json", "no such config.json"),
])
def test_bad_models(spec, fragment):
    with pytest.raises(ScenarioError) as exc:
        load_model(spec, file="s.yaml")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_presets_cover_required():
    required = {"gpt3-175b", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b",
                "llama3.1-405b", "mistral-7b"}
    assert required <= set(preset_names())
