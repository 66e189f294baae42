"""FLOPs of a training step (GEMMs and attention; norms and elementwise ops are not counted).

Convention (Narayanan et al. 2021 §5.1, eq. 2-3; PaLM Appendix B): a GEMM of an (m x k) by a
(k x n) matrix costs 2mkn FLOP; the backward pass costs twice the forward pass; attention scores
and the weighted sum over values are counted over the full (non-causal) s x s square, as the
papers that report MFU do. ``causal=True`` halves the attention term (what a causal flash-attention
kernel really executes), for the cost model of the engine.

Fine-tuning with frozen weights (LoRA / QLoRA, :mod:`sim.finetune`): the backward of a frozen GEMM
is its input-gradient GEMM only (1x its forward instead of 2x; the logits GEMM too); the attention
core's backward is still 2x its forward; the adapters (2 r (in + out) FLOP per token per targeted
linear) have the full 2x backward. A LoRA step is then about 2x the forward instead of 3x.

*Model FLOPs* = forward + backward (3 passes) and do not depend on recomputation (MFU).
*Hardware FLOPs* add what recomputation executes again (HFU): the whole layer forward for full
recomputation, the attention core (QK^T, softmax, AV) for selective recomputation (Korthikanti et
al. 2022 §5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sim.finetune import FULL, Finetune, adapter_params_per_layer, linear_shapes
from sim.model import ModelSpec

Recompute = Literal["none", "selective", "full"]


def attention_core_forward_flops_per_token(model: ModelSpec, seq_len: int, *, causal: bool = False) -> float:
    """QK^T and AV of one layer for one token: 2 GEMMs x 2 x seq_len x heads x head_dim."""
    flop = 4.0 * seq_len * model.q_width
    return flop / 2 if causal else flop


def layer_forward_flops_per_token(model: ModelSpec, seq_len: int, *, causal: bool = False) -> float:
    """One transformer layer, forward, one token: 2 FLOP per GEMM weight plus the attention core."""
    return 2.0 * model.matmul_params_per_layer + attention_core_forward_flops_per_token(model, seq_len, causal=causal)


def logits_forward_flops_per_token(model: ModelSpec) -> float:
    """Output projection onto the vocabulary, forward, one token: 2 h V."""
    return 2.0 * model.hidden * model.vocab


@dataclass(frozen=True, slots=True)
class StepFlops:
    """FLOPs of one optimizer step over all GPUs (FLOP)."""

    forward_flop: float      # one forward pass of every token through all layers and the logits
    backward_flop: float     # gradients w.r.t. activations and trained weights: 2x forward in full training
    recompute_flop: float    # forward work executed again in the backward pass

    @property
    def model_flop(self) -> float:
        """Forward + backward: the numerator of MFU."""
        return self.forward_flop + self.backward_flop

    @property
    def hardware_flop(self) -> float:
        """Model FLOPs plus recomputation: the numerator of HFU."""
        return self.model_flop + self.recompute_flop


def adapter_forward_flops_per_token(model: ModelSpec, finetune: Finetune) -> float:
    """LoRA adapters of all layers, forward, one token: 2 FLOP per adapter weight (x A, then (x A) B)."""
    return 2.0 * model.layers * adapter_params_per_layer(model, finetune, 1) if finetune.adapters else 0.0


def early_stop_skips(model: ModelSpec, finetune: Finetune = FULL) -> str:
    """What an early-stopped full recomputation of a layer leaves out (PyTorch >= 2.1 non-reentrant
    checkpoint stops as soon as the last tensor the backward needs is saved; an op saves its inputs
    before it runs, its outputs after): ``down`` -- the MLP down projection, its TP reduction and the
    residual add (the projection's input is the last tensor saved); ``lora_b`` -- with a LoRA adapter
    on the down projection, whose base GEMM and A run first (PEFT), only B, the add and the residual;
    ``residual`` -- with dropout after the MLP, whose mask is saved after the down projection ran,
    only the residual add."""
    if model.dropout:
        return "residual"
    if finetune.adapters and "down" in finetune.targets:
        return "lora_b"
    return "down"


def step_flops(model: ModelSpec, *, tokens: float, seq_len: int, recompute: Recompute = "none",
               causal: bool = False, flash_attention: bool = False, finetune: Finetune = FULL,
               early_stop: bool = False, recompute_fraction: float = 1.0) -> StepFlops:
    """FLOPs of one step processing ``tokens`` tokens in sequences of ``seq_len``. With flash attention
    selective recomputation has nothing to recompute (the scores are never stored); ``early_stop``: a
    full recomputation leaves out what :func:`early_stop_skips` says; ``recompute_fraction``: the
    share of the layers recomputed (``parallelism.recompute_layers``)."""
    layers_fwd = model.layers * layer_forward_flops_per_token(model, seq_len, causal=causal) * tokens
    logits_fwd = logits_forward_flops_per_token(model) * tokens
    adapters_fwd = adapter_forward_flops_per_token(model, finetune) * tokens
    forward = layers_fwd + logits_fwd + adapters_fwd
    if finetune.adapters:   # frozen GEMMs: input gradients only; attention core and adapters: 2x
        attention_fwd = model.layers * attention_core_forward_flops_per_token(model, seq_len, causal=causal) * tokens
        backward = (layers_fwd - attention_fwd) + logits_fwd + 2.0 * (attention_fwd + adapters_fwd)
    else:
        backward = 2.0 * forward
    if recompute == "full":
        again = layers_fwd + adapters_fwd
        skipped = early_stop_skips(model, finetune) if early_stop else None
        down_in, down_out = linear_shapes(model, 1)["down"]
        if skipped == "down":
            again -= model.layers * tokens * 2.0 * down_in * down_out
        elif skipped == "lora_b":       # B: rank -> the down projection's outputs
            again -= model.layers * tokens * 2.0 * finetune.rank * down_out
        again *= recompute_fraction
    elif recompute == "selective" and not flash_attention:
        again = model.layers * attention_core_forward_flops_per_token(model, seq_len, causal=causal) * tokens
    else:
        again = 0.0
    return StepFlops(forward_flop=forward, backward_flop=backward, recompute_flop=again)


def model_flops_per_token(model: ModelSpec, seq_len: int, finetune: Finetune = FULL) -> float:
    """Model FLOPs (forward + backward) per trained token."""
    return step_flops(model, tokens=1.0, seq_len=seq_len, finetune=finetune).model_flop
