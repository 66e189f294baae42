"""Activation memory stored for the backward pass, per layer, per microbatch, per TP rank.

Follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198) §4: with 16-bit activations a GPT layer stores ``sbh(34 + 5as/h)`` bytes —
attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh. The tensors are listed one by one so the
same accounting covers GQA (smaller K and V), SwiGLU (three ffn-wide tensors instead of two),
models without dropout (no 1-byte masks), flash attention (no s x s tensors; a float32
log-sum-exp per head and row instead), tensor parallelism t (the tensors inside the attention and
MLP blocks are split t ways; norms, block inputs and dropout masks only with sequence
parallelism), context parallelism (the sequence is split cp ways) and recomputation (selective
drops the s x s tensors; full keeps only each layer's input).
"""
from __future__ import annotations

import math

from sim.model import ModelSpec

MASK_BYTES = 1        # dropout masks are stored as uint8 / bool (Korthikanti §4.1)
LSE_BYTES = 4         # flash attention keeps a float32 log-sum-exp per head and query row
LOGITS_BYTES = 4      # cross-entropy works on float32 logits (Megatron vocab-parallel loss upcasts)


def kv_heads_per_rank(model: ModelSpec, tp: int) -> float:
    """KV heads held by one TP rank; they are replicated when tp exceeds kv_heads."""
    return model.n_kv_heads / tp if model.n_kv_heads >= tp else 1.0


def layer_activation_parts(model: ModelSpec, *, seq_len: int, micro_batch: int, tp: int = 1,
                           sequence_parallel: bool = False, cp: int = 1, recompute: str = "none",
                           flash_attention: bool = True, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one TP rank keeps for one layer and one microbatch, by tensor group."""
    s = seq_len / cp                      # tokens of the sequence on this rank
    b, h, e = micro_batch, model.hidden, dtype_bytes
    sbh = s * b * h
    rep = tp if sequence_parallel else 1  # divisor for tensors outside the TP-split blocks
    if recompute == "full":
        return {"layer_input": e * sbh / rep}
    heads_local = model.heads / tp
    parts: dict[str, float] = {
        # inputs of the two norms, of the QKV GEMM and of the first MLP GEMM
        "norm_inputs": 2 * e * sbh / rep,
        "block_inputs": 2 * e * sbh / rep,
        # Q, K, V and the attention output (input of the output projection)
        "qkv": e * s * b * (model.q_width / tp + 2 * kv_heads_per_rank(model, tp) * model.d_head),
        "attention_output": e * s * b * model.q_width / tp,
    }
    if model.ffn_kind == "swiglu":   # gate and up outputs, and their product (input of the down GEMM)
        parts["mlp"] = 3 * e * s * b * model.ffn_hidden / tp
    else:                            # GeLU input and output (input of the second GEMM)
        parts["mlp"] = 2 * e * s * b * model.ffn_hidden / tp
    if model.dropout:                # after the attention and after the MLP
        parts["dropout_masks"] = 2 * MASK_BYTES * sbh / rep
    if flash_attention:
        parts["softmax_lse"] = LSE_BYTES * heads_local * s * b
    elif recompute != "selective":   # softmax output (+ dropout mask and dropout output)
        per_score = e + (MASK_BYTES + e if model.dropout else 0)
        parts["attention_scores"] = per_score * heads_local * s * seq_len * b
    return parts


def layer_activation_bytes(model: ModelSpec, **kwargs) -> float:
    """Sum of :func:`layer_activation_parts`."""
    return math.fsum(layer_activation_parts(model, **kwargs).values())


def embedding_activation_bytes(model: ModelSpec, *, seq_len: int, micro_batch: int, tp: int = 1,
                               sequence_parallel: bool = False, cp: int = 1) -> float:
    """First stage, per microbatch: the embedding dropout mask (Korthikanti §4.3), if any."""
    if not model.dropout:
        return 0.0
    rep = tp if sequence_parallel else 1
    return MASK_BYTES * (seq_len / cp) * micro_batch * model.hidden / rep


def output_activation_bytes(model: ModelSpec, *, seq_len: int, micro_batch: int, tp: int = 1,
                            sequence_parallel: bool = False, cp: int = 1, dtype_bytes: int = 2) -> float:
    """Last stage, per microbatch: final-norm input, output-GEMM input and float32 logits (vocab split by tp)."""
    rep = tp if sequence_parallel else 1
    sb = (seq_len / cp) * micro_batch
    return 2 * dtype_bytes * sb * model.hidden / rep + LOGITS_BYTES * sb * model.vocab / tp
