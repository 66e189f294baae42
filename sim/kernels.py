"""What one GPU executes: the kernels of a layer pass, of the embedding, the logits and the optimizer.

Quantities are per TP rank and per microbatch (T = seq_len / cp x micro_batch tokens). GEMMs are
(m x k) @ (k x n) at 2mkn FLOP reading A and B and writing C; the attention core is a causal
flash-attention kernel (half of the s x s square; its backward re-computes the scores, 2.5x the
forward FLOPs, Dao 2023 §3.1.2); norms, activations, rotary embeddings and residual adds are
memory-bound kernels costed by the bytes they read and write. With sequence parallelism the
norms and residual adds work on T/tp tokens (Korthikanti et al. 2022 §4.2.2).

Fine-tuning (:mod:`sim.finetune`): with LoRA every targeted linear adds two adapter GEMMs (x A,
then (x A) B) and the scaled add of their output; frozen GEMMs (the base's, the output layer's)
have a backward of one input-gradient GEMM and no weight-gradient GEMM, and the frozen embedding
no backward at all; a quantized base weight is dequantized to 16-bit before each GEMM that uses it
(bitsandbytes: read the packed weight and its constants, write the 16-bit matrix).
"""
from __future__ import annotations

import functools
import math

from sim import finetune as ftm
from sim.activations import kv_heads_per_rank
from sim.compute import Kernel
from sim.flops import early_stop_skips
from sim.memory import fsdp_fp32_shard, master_bytes, padded_vocab, stored_bytes_per_param
from sim.model import ModelSpec
from sim.plan import DTYPE_BYTES, Plan

# the GEMMs of a block and the linear layers (sim.finetune.TARGET_MODULES) each one computes: fused
# (Megatron-LM, TE; plain PyTorch modules with one QKV and one gate|up Linear) and transformers' own
FUSED_LINEARS = {"qkv": ("q", "k", "v"), "out_proj": ("o",), "mlp_up": ("gate", "up"), "mlp_down": ("down",),
                 "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "gate_proj": ("gate",), "up_proj": ("up",)}

FLASH_BACKWARD_FLOP_FACTOR = 2.5   # FlashAttention backward = 5 matmuls vs 2 in the forward (Dao 2023)
FLASH_HEAD_DIM_STEP = 32           # head dims FlashAttention-2 compiles kernels for: 32, 64, ..., 256



def _gemm(name: str, m: float, k: float, n: float, e: float, w: float) -> Kernel:
    return Kernel(name, "gemm", 2.0 * m * k * n, m * k * e + k * n * w + m * n * e, shape=(m, n, k))


def _mem(name: str, nbytes: float) -> Kernel:
    return Kernel(name, "memory", 0.0, nbytes)


def _ops(name: str, nbytes: list[float]) -> list[Kernel]:
    """Eager elementwise ops, one kernel each (``name.0``, ``name.1``, ...), each moving its bytes."""
    return [_mem(f"{name}.{i}", b) for i, b in enumerate(nbytes)]


def _backward_of(k: Kernel, frozen: bool = False) -> tuple[Kernel, ...]:
    """dgrad and wgrad GEMMs (each the forward's FLOPs), only dgrad for a frozen weight; memory
    kernels move about twice the bytes."""
    if k.kind == "gemm":
        # forward C[m, n] = A[m, k] B[k, n]: dA[m, k] = dC B^T (K = n), dB[k, n] = A^T dC (K = m)
        d = w = None
        if k.shape is not None:
            m, n, kk = k.shape
            d, w = (m, kk, n), (kk, n, m)
        dgrad = Kernel(k.name + ".dgrad", "gemm", k.flop, k.bytes, k.dtype, d)
        return (dgrad,) if frozen else (dgrad, Kernel(k.name + ".wgrad", "gemm", k.flop, k.bytes, k.dtype, w))
    if k.kind == "attention":
        return (Kernel(k.name + ".bwd", "attention", FLASH_BACKWARD_FLOP_FACTOR * k.flop, 2.0 * k.bytes),)
    return (Kernel(k.name + ".bwd", "memory", 0.0, 2.0 * k.bytes),)


def _once(method):
    """Memoize a no-argument method per instance: one tuple per plan, shared by every op that runs it
    (the engine caches op durations per tuple)."""
    attr = "_once_" + method.__name__

    @functools.wraps(method)
    def wrapper(self):
        if attr not in self.__dict__:
            self.__dict__[attr] = method(self)
        return self.__dict__[attr]
    return wrapper


class LayerKernels:
    """Kernel lists of one transformer layer for a plan, computed once and shared by every op."""

    def __init__(self, model: ModelSpec, plan: Plan):
        self.model, self.plan = model, plan
        self.e = plan.tensor_bytes
        self.w = DTYPE_BYTES["fp8"] if plan.precision == "fp8" else self.e
        self.tokens = plan.seq_len / plan.cp * plan.micro_batch_size
        self.ft = plan.finetune
        self.dequant: dict[str, Kernel] = {}      # fused GEMM name -> its dequantization kernel
        self.forward = self._with_adapters(self._forward())
        self.attention_core = tuple(k for k in self.forward if k.kind == "attention"
                                    or k.name in ("attention_scores", "softmax", "attention_values"))
        self.backward = self._backward(self.forward)
        self.recompute_forward = self._recompute_forward()

    def _forward(self) -> tuple[Kernel, ...]:
        if self.plan.implementation != "fused":
            return self._eager_forward()
        m, p = self.model, self.plan
        e, w, T, tp, h = self.e, self.w, self.tokens, p.tp, m.hidden
        t_sp = T / tp if p.sequence_parallel else T          # tokens seen by norms and residual adds
        q = m.q_width / tp
        kv = kv_heads_per_rank(m, tp) * m.d_head
        f = m.ffn_hidden / tp
        up = 2 * f if m.ffn_kind == "swiglu" else f
        s_keys = p.seq_len                                   # each query attends to the whole (causal) sequence
        ks = [_mem("norm1", 2 * t_sp * h * e), _gemm("qkv", T, h, q + 2 * kv, e, w)]
        if m.position == "rope":
            ks.append(_mem("rope", 2 * T * (q + kv) * e))
        ks += self._attention(T, s_keys, q, kv)
        ks += [_gemm("out_proj", T, q, h, e, w),
               _mem("residual1", 3 * t_sp * h * e),
               _mem("norm2", 2 * t_sp * h * e),
               _gemm("mlp_up", T, h, up, e, w),
               _mem("activation", (up + f) * T * e),
               _gemm("mlp_down", T, f, h, e, w),
               _mem("residual2", 3 * t_sp * h * e)]
        return tuple(ks)

    def _eager_forward(self) -> tuple[Kernel, ...]:
        """A layer run as eager PyTorch ops, one kernel per op (``training.implementation``).

        ``torch``: ``nn.RMSNorm`` (one fused kernel), one QKV GEMM, RoPE as ``x * cos + cat(-x2, x1) * sin``
        on Q and K (a multiply, a negation, a concatenation, a multiply and an add: 10 bytes moved per
        16-bit value), flash attention, the contiguous copy of the attention output, the output GEMM,
        a residual add, gate|up in one GEMM, ``F.silu`` and the multiply as two kernels, the down GEMM
        and a residual add. ``huggingface`` (transformers' ``LlamaRMSNorm``, ``LlamaAttention``,
        ``LlamaMLP``): each norm upcasts to fp32 and runs ``pow``, ``mean``, ``+ eps``, ``rsqrt``, a
        multiply, the downcast and the weight's multiply as eight kernels; Q, K, V, gate and up are
        GEMMs of their own."""
        m, p = self.model, self.plan
        e, w, T, tp, h = self.e, self.w, self.tokens, p.tp, m.hidden
        q = m.q_width / tp
        kv = kv_heads_per_rank(m, tp) * m.d_head
        f = m.ffn_hidden / tp
        hf = p.implementation == "huggingface"

        def norm(name: str) -> list[Kernel]:
            if not hf:
                return [_mem(name, 2 * T * h * e)]
            return _ops(name, [T * h * (e + 4), T * h * 8, T * h * 4, T * 8, T * 8, T * h * 8 + T * 4,
                               T * h * (4 + e), T * h * 2 * e])

        rope: list[Kernel] = []
        if m.position == "rope":
            for name, width in (("rope_q", q), ("rope_k", kv)):
                rope += _ops(name, [x * T * width * e for x in (2, 1, 2, 2, 3)])
        if hf:
            qkv = [_gemm("q_proj", T, h, q, e, w), _gemm("k_proj", T, h, kv, e, w), _gemm("v_proj", T, h, kv, e, w)]
        else:
            qkv = [_gemm("qkv", T, h, q + 2 * kv, e, w)]
        ks = norm("norm1") + qkv + rope + self._attention(T, p.seq_len, q, kv)
        ks += [_mem("attention_output_copy", 2 * T * q * e), _gemm("out_proj", T, q, h, e, w),
               _mem("residual1", 3 * T * h * e)]
        ks += norm("norm2")
        if m.ffn_kind != "swiglu":
            ks += [_gemm("mlp_up", T, h, f, e, w), _mem("activation", 2 * T * f * e)]
        elif hf:
            ks += [_gemm("gate_proj", T, h, f, e, w), _gemm("up_proj", T, h, f, e, w)]
        else:
            ks += [_gemm("mlp_up", T, h, 2 * f, e, w)]
        if m.ffn_kind == "swiglu":
            ks += [_mem("activation.silu", 2 * T * f * e), _mem("activation.mul", 3 * T * f * e)]
        ks += [_gemm("mlp_down", T, f, h, e, w), _mem("residual2", 3 * T * h * e)]
        return tuple(ks)

    def _adapter(self, target: str, i: float, o: float) -> list[Kernel]:
        """One LoRA adapter's forward: x A, then (x A) B, scaled and added to the base output. Eager
        PEFT (``peft.tuners.lora.Linear.forward``) casts x to the adapter dtype first, runs A and B in
        that dtype (fp32 adapters: on the CUDA cores, not the tensor cores), scales, adds the 16-bit
        base output into an adapter-dtype result and casts it back: one kernel per op."""
        T, e, r = self.tokens, self.e, self.ft.rank
        if self.plan.implementation == "fused":
            return [_gemm(f"lora_{target}.A", T, i, r, e, e), _gemm(f"lora_{target}.B", T, r, o, e, e),
                    _mem(f"lora_{target}.add", 3 * T * o * e)]
        dtype = self.ft.adapter_dtype
        a = DTYPE_BYTES[dtype]
        cast = a != e

        def gemm(name: str, m: float, k: float, n: float) -> Kernel:
            return Kernel(name, "gemm", 2.0 * m * k * n, (m * k + k * n + m * n) * a, dtype, (m, n, k))
        ks = [_mem(f"lora_{target}.cast", T * i * (e + a))] if cast else []
        ks += [gemm(f"lora_{target}.A", T, i, r), gemm(f"lora_{target}.B", T, r, o),
               _mem(f"lora_{target}.scale", 2 * T * o * a), _mem(f"lora_{target}.add", T * o * (e + 2 * a))]
        if cast:
            ks.append(_mem(f"lora_{target}.cast_back", T * o * (a + e)))
        return ks

    def _with_adapters(self, forward: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
        """LoRA / QLoRA: each fused GEMM preceded by the dequantization of its weights (quantized
        base) and followed by the adapters of its targeted linears."""
        ft = self.ft
        if not ft.adapters:
            return forward
        shapes = ftm.linear_shapes(self.model, self.plan.tp)
        e = self.e
        out: list[Kernel] = []
        for k in forward:
            linears = FUSED_LINEARS.get(k.name, ())
            if ft.quantized and linears:
                packed = sum(ftm.quantized_bytes(ft.base_dtype, shapes[m][0] * shapes[m][1], shapes[m][0],
                                                 double_quant=ft.double_quant) for m in linears if m in shapes)
                params = sum(shapes[m][0] * shapes[m][1] for m in linears if m in shapes)
                self.dequant[k.name] = _mem(k.name + ".dequant", packed + params * e)
                out.append(self.dequant[k.name])
            out.append(k)
            for m in linears:
                if m in ft.targets:
                    out += self._adapter(m, *shapes[m])
        return tuple(out)

    def _backward(self, forward: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
        """The backward of a layer: in reverse order; frozen GEMMs only compute input gradients, after
        dequantizing their weights again."""
        frozen = self.ft.adapters
        out: list[Kernel] = []
        for k in reversed(forward):
            if k.name.endswith(".dequant"):
                continue
            base = frozen and k.name in FUSED_LINEARS
            if base and k.name in self.dequant:
                out.append(self.dequant[k.name])
            out += _backward_of(k, frozen=base)
        return tuple(out)

    def _attention(self, T: float, s_keys: float, q: float, kv: float) -> list[Kernel]:
        """The attention core. Flash attention: one causal kernel (half the s x s square). Without it
        (Megatron-LM before 2022): two batched GEMMs over the full square (the mask is applied after)
        and memory-bound passes over the a/t x s x s scores: scale + mask + softmax (read, write) and
        dropout (read, write, 1-byte mask), as Korthikanti et al. 2022 §4.1 lists them."""
        e = self.e
        if self.plan.flash_attention:
            # flash-attention kernels are compiled for head dims in steps of 32 (FlashAttention-2's hdim
            # 32, 64, ..., 256; Triton kernels round up to a power of two, the same for every head dim
            # up to 128 but 96): another head dim runs the next kernel up, with its work (on an H100,
            # head dim 112 takes 1.04x as long as 128 in FlashAttention-2 and 0.94-0.99x in cuDNN,
            # validation/device/)
            d = self.model.d_head
            padded = math.ceil(d / FLASH_HEAD_DIM_STEP) * FLASH_HEAD_DIM_STEP
            return [Kernel("attention", "attention", 4.0 * T * s_keys * q / 2 * padded / d, T * (2 * q + 2 * kv) * e)]
        heads = q / self.model.d_head
        scores = heads * T * s_keys                      # elements of the score matrix on this rank
        passes = 2 * e + (2 * e + 1 if self.model.dropout else 0)
        d16 = "bf16" if self.plan.precision == "fp8" else ""      # attention GEMMs stay 16-bit in fp8 recipes
        return [Kernel("attention_scores", "gemm", 2.0 * T * s_keys * q, (T * q + s_keys * kv) * e + scores * e, d16),
                _mem("softmax", scores * passes),
                Kernel("attention_values", "gemm", 2.0 * T * s_keys * q, scores * e + s_keys * kv * e + T * q * e, d16)]

    def _recompute_forward(self) -> tuple[Kernel, ...]:
        """The forward a full recomputation re-runs: all of it, or with early stop (PyTorch >= 2.1
        non-reentrant checkpoint) everything before what :func:`sim.flops.early_stop_skips` leaves out:
        the down projection (with its dequantization), its adapters and the residual add; the adapter's B
        and the residual; or the residual only."""
        if not self.plan.recompute_early_stop:
            return self.forward
        first = {"down": "mlp_down", "lora_b": "lora_down.B", "residual": "residual2"}[
            early_stop_skips(self.model, self.ft)]
        cut = next(i for i, k in enumerate(self.forward) if k.name == first or k.name == first + ".dequant")
        return self.forward[:cut]

    def recompute(self) -> tuple[Kernel, ...]:
        """Forward work re-executed before a layer's backward."""
        if self.plan.recompute == "full":
            return self.recompute_forward
        if self.plan.recompute == "selective" and not self.plan.flash_attention:
            return self.attention_core
        return ()

    @_once
    def embedding_forward(self) -> tuple[Kernel, ...]:
        return (_mem("embedding", 2 * self.tokens * self.model.hidden * self.e),)

    @_once
    def embedding_backward(self) -> tuple[Kernel, ...]:
        # scatter-add of the output gradient into the (fp32) embedding gradient; none when frozen
        if self.ft.adapters:
            return ()
        return (_mem("embedding.bwd", self.tokens * self.model.hidden * (self.e + 2 * 4)),)

    @_once
    def logits_forward(self) -> tuple[Kernel, ...]:
        m, p, T = self.model, self.plan, self.tokens
        v = padded_vocab(m, p.tp) / p.tp
        t_sp = T / p.tp if p.sequence_parallel else T
        return (_mem("final_norm", 2 * t_sp * m.hidden * self.e),
                _gemm("logits", T, m.hidden, v, self.e, self.w),
                _mem("cross_entropy", T * v * (self.e + 4 + 4)))   # read logits, fp32 softmax out and back

    @_once
    def logits_backward(self) -> tuple[Kernel, ...]:
        fwd = self.logits_forward()
        return tuple(b for k in reversed(fwd) for b in _backward_of(k, frozen=self.ft.adapters))


def optimizer_kernels(params: float, plan: Plan) -> tuple[Kernel, ...]:
    """Gradient-norm pass plus the optimizer's passes over ``params`` trainable parameters (already
    divided by ZeRO): one fused pass, or one per elementwise op (``optimizer_impl: unfused``)."""
    weight, grad, states = stored_bytes_per_param(plan)
    master = 0 if fsdp_fp32_shard(plan) else master_bytes(plan)    # FSDP: the fp32 shard is the weight
    if plan.optimizer_impl == "fused":
        # a fused multi-tensor pass: read the gradient, read and write the states (fp32 master copy
        # included), and write the 16-bit weight -- or read and write the weight itself without a master
        per_param = grad + 2 * states + (weight if master else 2 * weight)
        return (_mem("grad_norm", params * grad), _mem("optimizer_step", params * per_param))
    # torch.optim's foreach / for-loop update (and Composer's DecoupledAdamW): every op a pass of its
    # own over the tensors it reads and writes. p: the updated (master or only) weight; s: one state
    p = master or weight
    s = (states - master) / {"adamw": 2, "sgd": 1, "sgd-no-momentum": 1}[plan.optimizer] if states > master else 0.0
    if plan.optimizer == "adamw":
        passes = ((2 * s + grad)                 # exp_avg.lerp_(grad)
                  + (2 * s) + (2 * s + grad)     # exp_avg_sq.mul_(beta2).addcmul_(grad, grad)
                  + 3 * (2 * s)                  # denom = (exp_avg_sq.sqrt() / bias_correction2).add_(eps)
                  + (2 * p + 2 * s)              # param.addcdiv_(exp_avg, denom)
                  + 2 * p)                       # param.mul_(1 - lr * weight_decay)
    elif plan.optimizer == "sgd":
        passes = (2 * s) + (2 * s + grad) + (2 * p + s)  # buf.mul_(momentum).add_(grad); param.add_(buf)
    else:
        passes = 2 * p + grad                    # param.add_(grad)
    cast = (p + weight) if master else 0.0       # the 16-bit copy of the updated master weight
    clip = 2 * grad                              # grad.mul_(clip coefficient), which a fused kernel folds in
    return (_mem("grad_norm", params * grad), _mem("grad_clip", params * clip),
            _mem("optimizer_step", params * (passes + cast)))
