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

That accounting is of fused layer implementations (Megatron-LM, Transformer Engine). Layers written
as eager PyTorch modules save more (:func:`eager_layer_parts`, ``training.implementation``): what
autograd keeps for each op, read off the op's backward formula, for plain PyTorch modules and for
Hugging Face transformers' Llama layers with PEFT LoRA adapters.
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
                           flash_attention: bool = True, dtype_bytes: int = 2,
                           gathered_inputs: bool = False) -> dict[str, float]:
    """Bytes one TP rank keeps for one layer and one microbatch, by tensor group. ``gathered_inputs``:
    the QKV and first MLP GEMMs save their all-gathered inputs (PyTorch DTensor TP, ``tp_impl``)."""
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
        "block_inputs": 2 * e * sbh / (1 if gathered_inputs else rep),
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


def eager_layer_parts(model: ModelSpec, *, seq_len: int, micro_batch: int, tp: int = 1, cp: int = 1,
                      impl: str = "torch", trainable: bool = True, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one layer of an eager PyTorch implementation keeps for one microbatch (no recomputation),
    by tensor group; each tensor is counted once however many ops save it, and a view keeps its whole
    base tensor alive. ``trainable=False``: frozen 16-bit linear and norm weights (LoRA), whose ops keep
    no input, since the backward needs the input only for the weight's gradient.

    ``torch`` (plain modules: ``nn.RMSNorm``, one QKV ``nn.Linear``, RoPE as ``x * cos +
    rotate_half(x) * sin``, ``F.scaled_dot_product_attention``, gate and up in one ``nn.Linear``,
    ``F.silu(gate) * up``): the norms' inputs (the fused RMSNorm saves its input and an fp32 rstd);
    the QKV output, which V's view keeps whole; RoPE's new Q and K (with RoPE); SDPA's output and
    log-sum-exp; the
    contiguous copy of the attention output that the output projection saves; the gate|up output
    (kept whole by its views), SiLU's output and the product that the down projection saves.

    ``huggingface`` (transformers' ``LlamaDecoderLayer`` with SDPA): ``LlamaRMSNorm`` upcasts its input
    to fp32, which ``pow`` and the multiply by rstd save (4 bytes per value), plus the 16-bit normalized
    value when the norm's weight trains; Q, K, V come from separate GEMMs and RoPE makes new Q and K, so
    SDPA keeps RoPE's Q and K and the V output; the MLP keeps gate, SiLU(gate) and up, and the product
    when the down projection trains. Adapters: :func:`sim.memory.adapter_activation_bytes`.
    """
    if impl not in ("torch", "huggingface"):
        raise ValueError(f"eager_layer_parts: impl {impl!r} is not one of torch, huggingface")
    sb = seq_len / cp * micro_batch
    e, h = dtype_bytes, model.hidden
    q, kv = model.q_width / tp, kv_heads_per_rank(model, tp) * model.d_head
    f = model.ffn_hidden / tp
    branches = 2 if model.ffn_kind == "swiglu" else 1
    parts: dict[str, float] = {}
    if impl == "torch":
        parts["norm_inputs"] = 2 * e * sb * h
        parts["qkv"] = e * sb * (q + 2 * kv)                 # the fused QKV output, whole
        if model.position == "rope":
            parts["rope_outputs"] = e * sb * (q + kv)
    else:
        parts["norm_inputs"] = 2 * 4 * sb * h                # fp32 copies
        if trainable:
            parts["norm_outputs"] = 2 * e * sb * h           # saved by weight * x for the weight's gradient
        parts["qkv"] = e * sb * (q + 2 * kv)                 # RoPE's Q and K, and V
    if trainable:
        parts["block_inputs"] = 2 * e * sb * h               # inputs of the QKV and first MLP GEMMs
        parts["projection_inputs"] = e * sb * (q + f)        # contiguous attention output; MLP product
    parts["attention_output"] = e * sb * q
    parts["softmax_lse"] = LSE_BYTES * model.heads / tp * sb
    # SwiGLU: gate and up outputs and SiLU(gate); GeLU: the activation's input (its output is the
    # second GEMM's input, counted above when that GEMM trains)
    parts["mlp"] = e * sb * f * (2 * branches - 1)
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
                            sequence_parallel: bool = False, cp: int = 1, dtype_bytes: int = 2,
                            gathered_inputs: bool = False) -> float:
    """Last stage, per microbatch: final-norm input, output-GEMM input (all-gathered with
    ``gathered_inputs``) and float32 logits (vocab split by tp)."""
    rep = tp if sequence_parallel else 1
    sb = (seq_len / cp) * micro_batch
    gemm_input = dtype_bytes * sb * model.hidden / (1 if gathered_inputs else rep)
    return dtype_bytes * sb * model.hidden / rep + gemm_input + LOGITS_BYTES * sb * model.vocab / tp
