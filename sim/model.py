"""What is computed: a decoder-only transformer and its parameter counts.

A :class:`ModelSpec` comes from a preset name (``sim/presets/models.yaml``), a path to a Hugging
Face ``config.json`` (Llama / Mistral / GPT-2 style) or an inline mapping of the fields below
(optionally ``base: PRESET`` plus overrides). FLOPs live in :mod:`sim.flops`, activation bytes
in :mod:`sim.activations`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from sim.errors import ScenarioError, did_you_mean
from sim.schema import Section, validate_section


class ModelSpec(Section):
    """Shape of a decoder-only transformer (one optional preset ``source`` for provenance)."""

    name: str = "custom"
    layers: int = Field(ge=1, description="transformer blocks")
    hidden: int = Field(ge=1, description="model width h")
    heads: int = Field(ge=1, description="attention (query) heads a")
    kv_heads: int | None = Field(default=None, ge=1, description="key/value heads (GQA); = heads for MHA")
    head_dim: int | None = Field(default=None, ge=1, description="per-head width; hidden/heads by default")
    ffn_hidden: int = Field(ge=1, description="MLP inner width (per branch for SwiGLU)")
    ffn_kind: Literal["gelu", "swiglu"] = "gelu"
    vocab: int = Field(ge=1, description="vocabulary size V (as padded by the framework)")
    max_seq_len: int = Field(default=2048, ge=1, description="context length the model was built for")
    tied_embeddings: bool = False
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope", "alibi"] = "rope"
    bias: bool = False
    dropout: bool = False
    source: str = ""

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelSpec":
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) or head_dim given")
        return self

    # ---- derived shape -------------------------------------------------------------------
    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """Width of Q (and of the attention output): heads x head_dim."""
        return self.heads * self.d_head

    @property
    def kv_width(self) -> int:
        """Width of K (and of V): kv_heads x head_dim."""
        return self.n_kv_heads * self.d_head

    # ---- parameters ------------------------------------------------------------------------
    @property
    def attention_weight_params(self) -> int:
        """Q, K, V and output projections (GEMM weights only)."""
        h = self.hidden
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h

    @property
    def mlp_weight_params(self) -> int:
        """Up (and gate, for SwiGLU) and down projections."""
        branches = 3 if self.ffn_kind == "swiglu" else 2
        return branches * self.hidden * self.ffn_hidden

    @property
    def norm_params(self) -> int:
        """One norm: scale, plus shift for LayerNorm."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    @property
    def layer_bias_params(self) -> int:
        if not self.bias:
            return 0
        up = 2 * self.ffn_hidden if self.ffn_kind == "swiglu" else self.ffn_hidden
        return (self.q_width + 2 * self.kv_width + self.hidden) + (up + self.hidden)

    @property
    def matmul_params_per_layer(self) -> int:
        """Weights that take part in GEMMs: 2 FLOP per weight per token in the forward pass."""
        return self.attention_weight_params + self.mlp_weight_params

    @property
    def params_per_layer(self) -> int:
        return self.matmul_params_per_layer + self.layer_bias_params + 2 * self.norm_params

    @property
    def embedding_params(self) -> int:
        """Token embedding (plus learned position embedding)."""
        pos = self.max_seq_len * self.hidden if self.position == "learned" else 0
        return self.vocab * self.hidden + pos

    @property
    def output_params(self) -> int:
        """Final norm plus the output projection (zero when tied to the embedding)."""
        return self.norm_params + (0 if self.tied_embeddings else self.vocab * self.hidden)

    @property
    def total_params(self) -> int:
        return self.layers * self.params_per_layer + self.embedding_params + self.output_params

    def describe(self) -> str:
        attn = f"{self.heads} heads" + (f", {self.n_kv_heads} kv heads" if self.n_kv_heads != self.heads else "")
        return (f"{self.name}: {self.total_params / 1e9:.2f} B params, {self.layers} layers, hidden {self.hidden}, "
                f"{attn}, {self.ffn_kind} ffn {self.ffn_hidden}, vocab {self.vocab}")


# ---- loading -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _presets() -> dict[str, dict[str, Any]]:
    text = resources.files("sim.presets").joinpath("models.yaml").read_text()
    return yaml.safe_load(text)["models"]


def preset_names() -> list[str]:
    return sorted(_presets())


def _preset_mapping(name: str, *, file: str | None, key: str) -> dict[str, Any]:
    presets = _presets()
    norm = name.strip().lower()
    if norm not in presets:
        raise ScenarioError(f"unknown model preset {name!r}{did_you_mean(norm, presets)}; expected a preset "
                            f"({', '.join(sorted(presets))}), a path to a config.json, or a mapping",
                            file=file, key=key)
    return {"name": norm, **presets[norm]}


def _act_to_kind(act: str | None) -> str:
    act = (act or "").lower()
    return "swiglu" if act in ("silu", "swish", "swiglu") else "gelu"


def from_hf_config(cfg: dict[str, Any], *, name: str, file: str | None, key: str) -> dict[str, Any]:
    """Translate a Hugging Face config.json (Llama/Mistral/Qwen or GPT-2 style) into ModelSpec fields."""
    try:
        if "n_embd" in cfg or cfg.get("model_type") == "gpt2":
            hidden = int(cfg["n_embd"])
            return dict(
                name=name, layers=int(cfg["n_layer"]), hidden=hidden, heads=int(cfg["n_head"]),
                ffn_hidden=int(cfg.get("n_inner") or 4 * hidden), ffn_kind="gelu", vocab=int(cfg["vocab_size"]),
                max_seq_len=int(cfg.get("n_positions", 1024)), tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                norm="layernorm", position="learned", bias=True, dropout=float(cfg.get("resid_pdrop", 0.1)) > 0,
                source=f"Hugging Face config {file or ''}".strip())
        heads = int(cfg["num_attention_heads"])
        return dict(
            name=name, layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=cfg.get("head_dim"),
            ffn_hidden=int(cfg["intermediate_size"]), ffn_kind=_act_to_kind(cfg.get("hidden_act", "silu")),
            vocab=int(cfg["vocab_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norm="rmsnorm" if "rms_norm_eps" in cfg else "layernorm", position="rope",
            bias=bool(cfg.get("attention_bias", False)), dropout=float(cfg.get("attention_dropout", 0.0)) > 0,
            source=f"Hugging Face config {file or ''}".strip())
    except KeyError as exc:
        raise ScenarioError(f"Hugging Face config lacks {exc.args[0]!r} (expected Llama/Mistral keys "
                            "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size "
                            "or GPT-2 keys n_embd, n_layer, n_head)", file=file, key=key) from None
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"Hugging Face config has a malformed value: {exc}", file=file, key=key) from None


def load_model(spec: Any, *, file: str | None = None, base_dir: Path | None = None, key: str = "model") -> ModelSpec:
    """A ModelSpec from a preset name, a path to a config.json, or a mapping (``base:`` + overrides)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        looks_like_path = spec.endswith(".json") or "/" in spec
        if looks_like_path:
            path = Path(spec)
            if not path.is_absolute() and base_dir is not None and not path.exists():
                path = base_dir / path
            if not path.is_file():
                raise ScenarioError(f"no such config.json file {spec!r}", file=file, key=key)
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ScenarioError(f"cannot read {spec!r} as JSON: {exc}", file=file, key=key) from None
            if not isinstance(cfg, dict):
                raise ScenarioError(f"{spec!r} is not a JSON object", file=file, key=key)
            data = from_hf_config(cfg, name=path.parent.name or path.stem, file=str(path), key=key)
            return validate_section(ModelSpec, data, file=str(path), prefix=key)
        data = _preset_mapping(spec, file=file, key=key)
        return validate_section(ModelSpec, data, file=file, prefix=key)
    if isinstance(spec, dict):
        data = dict(spec)
        base = data.pop("base", None)
        if base is not None:
            if not isinstance(base, str):
                raise ScenarioError(f"expected a preset name, got {base!r}", file=file, key=f"{key}.base")
            data = {**load_model(base, file=file, base_dir=base_dir, key=f"{key}.base").model_dump(), **data}
        return validate_section(ModelSpec, data, file=file, prefix=key)
    raise ScenarioError(f"expected a preset name, a path to config.json or a mapping, got {spec!r}",
                        file=file, key=key)
