"""Peak memory of each pipeline stage's GPUs: weights, gradients, optimizer states, activations, other.

Model states follow mixed-precision training as frameworks do it (Micikevicius et al. 2018;
Rajbhandari et al. 2020, "ZeRO", §3.1): 16-bit weights, gradients in ``grad_dtype``, an fp32
master copy plus the optimizer's moments; K = 12 bytes per parameter for mixed-precision Adam.
ZeRO stage 1 shards the optimizer states, 2 also the gradients, 3 also the weights, over the
dp x cp ranks that hold the same parameters. Activations follow :mod:`sim.activations`, times the
microbatches that the pipeline schedule keeps in flight on the stage.

Fine-tuning (:mod:`sim.finetune`): with LoRA / QLoRA the base weights are frozen (no gradients, no
optimizer states; the block's linears possibly quantized) and only the adapters carry gradients
and optimizer states. Offload (:mod:`sim.offload`): optimizer states, fp32 master weights and an
fp32 gradient copy (and with ``offload_params`` the 16-bit weights) live in CPU memory
(:attr:`DeviceMemory.host`); paged optimizers may evict their states to CPU memory when the GPU is
full (:attr:`DeviceMemory.pageable`).

All TP ranks of a stage and all of its DP / CP replicas hold the same amounts, so one device per
stage represents them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import Field, field_validator

from sim import activations as act
from sim import finetune as ftm
from sim.hardware import GPUSpec
from sim.model import ModelSpec
from sim.plan import DTYPE_BYTES, Plan
from sim.schedule import stage_schedule
from sim.schema import Section
from sim.units import MiB, parse_quantity

# bitsandbytes 8-bit optimizers: blockwise quantization of each state with one fp32 absmax per block
# of 256 values (bitsandbytes optim/optimizer.py, Optimizer2State.init_state: blocks = n // 256;
# Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861 §2).
BNB_STATE_BLOCK = 256
_BNB_ADAM_8BIT = 2 + 2 * 4 / BNB_STATE_BLOCK     # two 1-byte moments + their fp32 block absmax

# Bytes of optimizer state per trainable parameter besides the fp32 master copy.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,                          # two fp32 moments (Loshchilov & Hutter 2019; ZeRO §3.1 K = 4 + 8)
    "adamw-8bit": _BNB_ADAM_8BIT,        # 1 + 1 byte moments + 8/256 B of block statistics (bitsandbytes)
    "paged-adamw": 8,                    # bitsandbytes PagedAdamW (32-bit states in unified memory)
    "paged-adamw-8bit": _BNB_ADAM_8BIT,  # bitsandbytes PagedAdamW8bit: the same bytes, pageable
    "sgd": 4,                            # fp32 momentum buffer (torch.optim.SGD with momentum)
    "sgd-no-momentum": 0,                # plain SGD keeps no state
    "adafactor": 0,                      # per matrix, not per parameter: see factored_state_bytes
}
# Optimizers whose states take the dtype of the parameter they update (torch.optim: ``zeros_like(p)``);
# in full mixed-precision training they update the fp32 master copy, so the table's fp32 bytes hold;
# with 16-bit LoRA adapters (no master copy) they are 16-bit. bitsandbytes' paged 32-bit AdamW allocates
# fp32 states whatever the parameter dtype (``get_state_buffer(p, dtype=torch.float32)``).
TORCH_OPTIMIZERS = ("adamw", "sgd")
# Adafactor (Shazeer & Stern 2018, arXiv:1804.04235 §3): the second moment of an n x m matrix is kept
# as fp32 row and column sums, n + m values; vectors keep the full second moment; no first moment
# (beta1 = None, the default of transformers' and torch's Adafactor).
ADAFACTOR_STAT_BYTES = 4
MASTER_WEIGHT_BYTES = 4    # fp32 master copy kept by mixed-precision optimizers
VOCAB_PAD_MULTIPLE = 128   # Megatron-LM --make-vocab-size-divisible-by default; padded to 128 * tp
# Offload: DeepSpeed's CPU optimizer updates an fp32 copy of the gradients in CPU memory
# (ZeRO-Offload, Ren et al. 2021 §4.1: fp32 gradients on the CPU); the GPU keeps one gradient bucket
# being filled and copied out (offload_bucket_params).
OFFLOAD_GRAD_COPY_BYTES = 4


class MemoryConfig(Section):
    """The ``memory:`` section: fixed per-GPU overheads counted as *other*."""

    # "The first CUDA operation will create the CUDA context which uses around 400MB if CUDA >= 11.7
    # is used and lazy module loading enabled" (ptrblck, pytorch/pytorch#109888; 287 MB measured in
    # pytorch/pytorch#86509).
    cuda_context_bytes: float = Field(default=400 * MiB, ge=0)
    # NCCL_BUFFSIZE defaults to 4 MiB per channel and direction (NCCL docs, env.rst): 16 ring
    # channels x send+recv x 4 MiB = 128 MiB for each communicator a rank belongs to.
    nccl_buffer_bytes_per_group: float = Field(default=128 * MiB, ge=0)
    # cuBLAS workspace: CUBLAS_WORKSPACE_CONFIG=:4096:8 (8 x 4 MiB) as PyTorch documents it.
    workspace_bytes: float = Field(default=32 * MiB, ge=0)
    # Caching-allocator fragmentation as a fraction of everything else (0 = report allocated bytes).
    fragmentation: float = Field(default=0.0, ge=0, le=1)
    # fp32 vocabulary-sized tensors alive at the loss's peak, per token. 1: a fused cross-entropy that
    # keeps one fp32 copy (Megatron-LM's vocab-parallel loss). Hugging Face transformers'
    # LlamaForCausalLM: `logits = logits.float()` is returned with the output (1), CrossEntropyLoss
    # saves its fp32 log-softmax (2), and the backward holds the fp32 gradients of both (3, 4): 4.
    logits_copies: float = Field(default=1.0, ge=1, le=16)

    @field_validator("cuda_context_bytes", "nccl_buffer_bytes_per_group", "workspace_bytes", mode="before")
    @classmethod
    def _quantity(cls, value: object) -> float:
        return parse_quantity(value, "bytes")


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """Memory of one GPU of a pipeline stage at its peak (bytes)."""

    stage: int
    layers: int
    params: float                 # parameters held (before ZeRO-3 sharding)
    weights: float
    gradients: float
    optimizer: float
    activations: float
    other: float
    capacity: float               # usable bytes of the GPU
    microbatches_in_flight: float
    detail: dict[str, float] = field(default_factory=dict)
    trainable_params: float = 0.0 # parameters with gradients and optimizer states (before sharding)
    host: float = 0.0             # bytes this GPU's rank keeps in CPU memory (offload)
    pageable: float = 0.0         # optimizer bytes a paged optimizer may evict to CPU memory

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other

    @property
    def paged_out(self) -> float:
        """Bytes a paged optimizer keeps in CPU memory at the peak (what exceeds the GPU, up to its states)."""
        return min(self.pageable, max(0.0, self.total - self.capacity))

    @property
    def fits(self) -> bool:
        return self.total - self.paged_out <= self.capacity

    @property
    def shortfall(self) -> float:
        """Bytes missing to fit (0 when it fits)."""
        return max(0.0, self.total - self.paged_out - self.capacity)

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "other": self.other}


def padded_vocab(model: ModelSpec, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-model.vocab // multiple) * multiple


def layer_params_per_rank(model: ModelSpec, tp: int) -> float:
    """Parameters of one layer on one TP rank: column- and row-parallel GEMMs split, K/V replicated
    when tp exceeds kv_heads, norms and row-parallel biases replicated (Megatron-LM layout)."""
    h = model.hidden
    kv_width = act.kv_heads_per_rank(model, tp) * model.d_head
    attn = 2 * h * model.q_width / tp + 2 * h * kv_width
    mlp = model.mlp_weight_params / tp
    bias = 0.0
    if model.bias:
        up = 2 * model.ffn_hidden if model.ffn_kind == "swiglu" else model.ffn_hidden
        bias = (model.q_width / tp + 2 * kv_width) + up / tp + 2 * h
    return attn + mlp + bias + 2 * model.norm_params


def stage_params(model: ModelSpec, plan: Plan, stage: int) -> float:
    """Parameters held by one GPU of ``stage`` (embedding on the first, norm and output on the last;
    a tied embedding is duplicated on the last stage when pp > 1, as Megatron-LM does)."""
    tp, last = plan.tp, plan.pp - 1
    n = plan.stage_layers(stage) * layer_params_per_rank(model, tp)
    word = padded_vocab(model, tp) * model.hidden / tp
    if stage == 0:
        n += word + (model.max_seq_len * model.hidden if model.position == "learned" else 0)
    if stage == last:
        n += model.norm_params
        if not model.tied_embeddings or plan.pp > 1:
            n += word
    return n


def master_bytes(plan: Plan) -> int:
    """Bytes per trainable parameter of the fp32 master copy: mixed-precision full training keeps one;
    LoRA adapters have none (fp32 adapters are their own master; 16-bit adapters are updated in place
    by the Hugging Face Trainer, as in the QLoRA script with --bf16), nor do bf16 optimizer states
    (``training.optimizer_dtype: bf16``: the bf16 weights are updated in place)."""
    if plan.finetune.adapters or plan.weight_dtype == "fp32" or plan.optimizer_dtype == "bf16":
        return 0
    return MASTER_WEIGHT_BYTES


def bytes_per_param(plan: Plan) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per *trainable* parameter before sharding: every weight
    in full training, the adapters with LoRA / QLoRA (gradients in the adapters' dtype). Adafactor's
    factored statistics are per matrix (:func:`factored_state_bytes`), not included."""
    ft = plan.finetune
    state = OPTIMIZER_STATE_BYTES[plan.optimizer]
    if ft.adapters:
        weight = grad = DTYPE_BYTES[ft.adapter_dtype]
        if plan.optimizer in TORCH_OPTIMIZERS:
            # torch.optim.AdamW / SGD create their states with zeros_like(param): in the adapters' dtype
            state *= DTYPE_BYTES[ft.adapter_dtype] / DTYPE_BYTES["fp32"]
    else:
        weight, grad = plan.tensor_bytes, DTYPE_BYTES[plan.grad_dtype]
        if plan.optimizer_dtype == "bf16":     # torch.optim's states take the bf16 parameter's dtype
            state *= DTYPE_BYTES["bf16"] / DTYPE_BYTES["fp32"]
    return weight, grad, master_bytes(plan) + state


def fsdp_fp32_shard(plan: Plan) -> bool:
    """Whether the sharded parameter is the fp32 master itself: PyTorch FSDP's mixed precision keeps
    each rank's shard in the parameter's fp32 and casts only the gathered layer to 16-bit (FSDP1
    ``MixedPrecision(param_dtype=bf16)``: the 16-bit ``_mp_shard`` is freed right after the all-gather;
    FSDP2 ``MixedPrecisionPolicy``: the sharded DTensor stays fp32), and the reduce-scattered gradient
    shard is cast back to the parameter's dtype (``_cast_grad_to_param_dtype``; FSDP2's
    ``foreach_reduce``) whatever ``reduce_dtype``. DeepSpeed's ZeRO-3 (``zero3_impl: deepspeed``) and
    Megatron keep a 16-bit partition beside the optimizer's fp32 master. ZeRO-Offload follows DeepSpeed."""
    return (plan.zero >= 3 and plan.zero3_impl == "fsdp" and not plan.finetune.adapters and master_bytes(plan) > 0
            and not plan.offload_optimizer and not plan.offload_params)


def stored_bytes_per_param(plan: Plan) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per trainable parameter as the GPU holds them between steps:
    :func:`bytes_per_param`, except that under PyTorch FSDP the fp32 shard is both the weight and the
    master (4 + 4 + moments; :func:`fsdp_fp32_shard`). The 16-bit bytes of :func:`bytes_per_param`
    remain what the gathers and the compute move."""
    weight, grad, optimizer = bytes_per_param(plan)
    if fsdp_fp32_shard(plan):
        return MASTER_WEIGHT_BYTES, MASTER_WEIGHT_BYTES, optimizer - MASTER_WEIGHT_BYTES
    return weight, grad, optimizer


def factored_state_bytes(matrices) -> float:
    """Adafactor's statistics of ``(rows, cols)`` matrices (a vector is ``(n, 1)``): rows + cols values
    per matrix, n per vector."""
    return ADAFACTOR_STAT_BYTES * sum(r + c if min(r, c) > 1 else r * c for r, c in matrices)


def _stage_matrices(model: ModelSpec, plan: Plan, stage: int) -> list[tuple[float, float]]:
    """(rows, cols) of the trainable matrices and vectors of one GPU of ``stage`` (Adafactor's shapes)."""
    tp, ft, layers = plan.tp, plan.finetune, plan.stage_layers(stage)
    if ft.adapters:
        return ftm.adapter_matrices_per_layer(model, ft, tp) * layers
    per_layer = [(o, i) for i, o in ftm.linear_shapes(model, tp).values()]
    rest = layer_params_per_rank(model, tp) - ftm.linear_params_per_layer(model, tp)
    per_layer.append((rest, 1))                                   # norms and biases: vectors
    out = per_layer * layers
    word = (padded_vocab(model, tp) / tp, model.hidden)
    if stage == 0:
        out.append(word)
        if model.position == "learned":
            out.append((model.max_seq_len, model.hidden))
    if stage == plan.pp - 1:
        out.append((model.norm_params, 1))
        if not model.tied_embeddings or plan.pp > 1:
            out.append(word)
    return out


def _unquantized_bytes(plan: Plan) -> int:
    """Bytes per frozen parameter that is not quantized (embedding, output layer, norms, biases)."""
    return ftm.FP32_BYTES if plan.finetune.upcast_unquantized else plan.tensor_bytes


def frozen_layer_bytes(model: ModelSpec, plan: Plan) -> float:
    """LoRA / QLoRA: one block's frozen weights on one TP rank: the linears in the base dtype (with the
    quantization constants), norms and biases unquantized."""
    tp = plan.tp
    rest = layer_params_per_rank(model, tp) - ftm.linear_params_per_layer(model, tp)
    return ftm.base_linear_bytes_per_layer(model, plan.finetune, tp) + rest * _unquantized_bytes(plan)


def frozen_weight_bytes(model: ModelSpec, plan: Plan, stage: int) -> float:
    """LoRA / QLoRA: bytes of the frozen base weights held by one GPU of ``stage``."""
    layers = plan.stage_layers(stage)
    outside = stage_params(model, plan, stage) - layers * layer_params_per_rank(model, plan.tp)
    return layers * frozen_layer_bytes(model, plan) + outside * _unquantized_bytes(plan)


@dataclass(frozen=True, slots=True)
class ModelStates:
    """Model-state bytes of one GPU of a stage: on the GPU (after ZeRO sharding and offload) and on the host."""

    params: float                 # parameters held (before ZeRO-3 sharding): base + adapters
    trainable_params: float
    weights: float
    gradients: float
    optimizer: float
    host: dict[str, float]        # bytes in CPU memory, by part (offload)
    pageable: float               # optimizer bytes a paged optimizer may evict


def model_states(model: ModelSpec, plan: Plan, stage: int) -> ModelStates:
    """Weights, gradients and optimizer states of one GPU of ``stage`` under the plan's ZeRO stage,
    fine-tuning method and offload settings."""
    ft = plan.finetune
    base = stage_params(model, plan, stage)
    w, g, o = stored_bytes_per_param(plan)
    if ft.adapters:
        trainable = plan.stage_layers(stage) * ftm.adapter_params_per_layer(model, ft, plan.tp)
        weights = frozen_weight_bytes(model, plan, stage) + trainable * w
        params = base + trainable
    else:
        trainable = params = base
        weights = base * w
    optimizer = trainable * o
    if plan.optimizer == "adafactor":
        optimizer += factored_state_bytes(_stage_matrices(model, plan, stage))
    weights, gradients, optimizer = _sharded(plan, weights, trainable * g, optimizer)
    host: dict[str, float] = {}
    if plan.offload_optimizer:
        host = {"optimizer": optimizer,
                "fp32_gradients": _sharded(plan, 0, 0, trainable * OFFLOAD_GRAD_COPY_BYTES)[2]}
        optimizer = 0.0
        gradients = min(gradients, offload_bucket_params(model) * g)   # one bucket in flight to the CPU
    if plan.offload_params:
        host["weights"] = weights
        weights = 0.0
    pageable = optimizer if plan.paged_optimizer else 0.0
    return ModelStates(params=params, trainable_params=trainable, weights=weights, gradients=gradients,
                       optimizer=optimizer, host=host, pageable=pageable)


def _sharded(plan: Plan, weights: float, gradients: float, optimizer: float) -> tuple[float, float, float]:
    """ZeRO: stage 1 shards the optimizer states, 2 also the gradients, 3 also the weights, over dp x cp
    (over dp_shard x cp with hybrid sharding)."""
    shards = plan.zero_shards
    return (weights / (shards if plan.zero >= 3 else 1), gradients / (shards if plan.zero >= 2 else 1),
            optimizer / (shards if plan.zero >= 1 else 1))


def offload_bucket_params(model: ModelSpec) -> float:
    """Gradients a ZeRO-Offload rank keeps on the GPU: one reduce bucket, hidden x hidden elements
    (transformers' DeepSpeed integration: reduce_bucket_size "auto")."""
    return float(model.hidden) ** 2


def model_state_bytes(params: float, plan: Plan) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for ``params`` trainable parameters under the plan's ZeRO stage."""
    w, g, o = stored_bytes_per_param(plan)
    return _sharded(plan, params * w, params * g, params * o)


def microbatches_in_flight(plan: Plan, stage: int) -> float:
    """Microbatches whose activations a stage holds at its peak, in units of the stage's full layer set.

    GPipe keeps all m; 1F1B keeps pp - stage (Narayanan et al. 2021 §2.2.1); interleaved 1F1B keeps
    2(pp - stage - 1) + (v - 1) pp + 1 chunk-microbatches (Megatron-LM's warm-up count), each
    1/v of the stage (Korthikanti et al. 2022 §4.2.3: a factor 1 + (pp - 1)/(pp v) on the first stage).
    """
    m, p, v = plan.microbatches, plan.pp, plan.virtual_stages
    if plan.schedule == "gpipe":
        return float(m)
    if plan.schedule == "interleaved":
        return min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v) / v
    return float(min(p - stage, m))


def chunk_activation_bytes(model: ModelSpec, plan: Plan, layers: int) -> float:
    """Bytes one microbatch's pass through a chunk of ``layers`` layers keeps: its recomputed layers
    (:meth:`Plan.recomputed_layers`) their inputs, the others all their tensors."""
    again = plan.recomputed_layers(layers)
    kept = layer_activation_total(model, plan, plan.recompute) * again
    if again < layers:
        kept += layer_activation_total(model, plan, "none") * (layers - again)
    return kept


def layer_bytes_in_flight(model: ModelSpec, plan: Plan, stage: int) -> float:
    """Layer activations held at the stage's peak: replays the schedule's order of forward and
    backward passes, each chunk with its own layer count (chunks may differ)."""
    if plan.virtual_stages == 1:
        return chunk_activation_bytes(model, plan, plan.stage_layers(stage)) * microbatches_in_flight(plan, stage)
    kept = {chunk: chunk_activation_bytes(model, plan, plan.chunk_layers[chunk * plan.pp + stage])
            for chunk in range(plan.virtual_stages)}
    live = peak = 0.0
    for phase, _, chunk in stage_schedule(plan.schedule, plan.pp, stage, plan.microbatches, plan.virtual_stages):
        live += kept[chunk] if phase == "F" else -kept[chunk]
        peak = max(peak, live)
    return peak


def adapter_activation_bytes(model: ModelSpec, plan: Plan) -> float:
    """LoRA, per layer and microbatch (lora_dropout 0 assumed).

    fused: the r-wide output x A of every adapter, kept for B's weight gradient (the input x is the
    base GEMM's input, already counted). Eager layers with PEFT adapters: the frozen base GEMM keeps
    no input, the adapter's A does: PEFT casts x to the adapter dtype first (``_cast_input_dtype``),
    a copy per adapted linear when the dtypes differ (fp32 adapters on 16-bit activations), else x
    itself, once per distinct input (q, k, v share one, gate and up another); and A's output, in the
    adapter dtype, for B."""
    ft = plan.finetune
    if not ft.adapters:
        return 0.0
    tokens = plan.seq_len / plan.cp * plan.micro_batch_size
    if plan.implementation == "fused":
        return len(ft.targets) * tokens * ft.rank * plan.tensor_bytes
    adapter = DTYPE_BYTES[ft.adapter_dtype]
    shapes = ftm.linear_shapes(model, plan.tp)
    if adapter != plan.tensor_bytes:
        inputs = math.fsum(shapes[t][0] * adapter for t in ft.targets)
    else:
        shared = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}
        distinct = {shared.get(t, t): shapes[t][0] for t in ft.targets}
        inputs = math.fsum(distinct.values()) * adapter
    return tokens * (inputs + len(ft.targets) * ft.rank * adapter)


def layer_activation_total(model: ModelSpec, plan: Plan, recompute: str) -> float:
    """Bytes one layer keeps for one microbatch under ``recompute`` (adapters' tensors included), with
    the tensors that the plan's layer implementation (``training.implementation``) saves."""
    shape = dict(seq_len=plan.seq_len, micro_batch=plan.micro_batch_size, tp=plan.tp, cp=plan.cp)
    if plan.implementation == "fused" or recompute == "full":
        stored = act.layer_activation_bytes(model, **shape, sequence_parallel=plan.sequence_parallel,
                                            recompute=recompute, flash_attention=plan.flash_attention,
                                            dtype_bytes=plan.tensor_bytes, gathered_inputs=plan.gathered_inputs)
    else:   # resolve_plan allows eager layers with flash attention and recompute none or full only
        stored = math.fsum(act.eager_layer_parts(model, **shape, impl=plan.implementation,
                                                 trainable=not plan.finetune.adapters,
                                                 dtype_bytes=plan.tensor_bytes).values())
    return stored + (adapter_activation_bytes(model, plan) if recompute != "full" else 0.0)


def extra_logits_bytes(model: ModelSpec, plan: Plan, config: "MemoryConfig") -> float:
    """Per microbatch on the last stage: the fp32 logits-sized tensors beyond the one that
    :func:`sim.activations.output_activation_bytes` counts (``memory.logits_copies`` - 1)."""
    tokens = plan.seq_len / plan.cp * plan.micro_batch_size
    return (config.logits_copies - 1) * act.LOGITS_BYTES * tokens * model.vocab / plan.tp


def activation_bytes(model: ModelSpec, plan: Plan, stage: int, config: "MemoryConfig | None" = None
                     ) -> dict[str, float]:
    """Activation bytes of one GPU of ``stage`` at its peak, by part."""
    config = config or MemoryConfig()
    e = plan.tensor_bytes
    shape = dict(seq_len=plan.seq_len, micro_batch=plan.micro_batch_size, tp=plan.tp,
                 sequence_parallel=plan.sequence_parallel, cp=plan.cp)
    in_flight = microbatches_in_flight(plan, stage)
    parts = {"layers": layer_bytes_in_flight(model, plan, stage)}
    if stage == 0:
        first_chunk = in_flight if plan.schedule == "gpipe" else min(in_flight * plan.virtual_stages, plan.microbatches)
        parts["embedding"] = act.embedding_activation_bytes(model, **shape) * first_chunk
    if stage == plan.pp - 1:
        # the last chunk runs each microbatch's backward right after its forward; GPipe keeps all
        logits = plan.microbatches if plan.schedule == "gpipe" else 1
        parts["logits"] = act.output_activation_bytes(model, **shape, dtype_bytes=e,
                                                      gathered_inputs=plan.gathered_inputs) * logits
        if config.logits_copies > 1:
            parts["logits_copies"] = extra_logits_bytes(model, plan, config) * logits
    if plan.recomputed_layers(plan.stage_layers(stage)):
        # the backward of one layer rebuilds what recomputation dropped: one layer's tensors at a time
        parts["recompute_workspace"] = (layer_activation_total(model, plan, "none")
                                        - layer_activation_total(model, plan, plan.recompute))
    return parts


def communicator_count(plan: Plan) -> int:
    """Process groups of size > 1 a rank belongs to (each holds NCCL buffers)."""
    return sum(1 for n in (plan.tp, plan.pp, plan.cp, plan.dp * plan.cp) if n > 1)


def layer_weight_bytes(model: ModelSpec, plan: Plan) -> float:
    """Bytes of one layer's weights on one TP rank, unsharded (what a ZeRO-3 gather brings in)."""
    ft = plan.finetune
    if not ft.adapters:
        return layer_params_per_rank(model, plan.tp) * bytes_per_param(plan)[0]
    return frozen_layer_bytes(model, plan) + ftm.adapter_params_per_layer(model, ft, plan.tp) * bytes_per_param(plan)[0]


def layerwise_weights(plan: Plan) -> bool:
    """Whether weights are brought in layer by layer: ZeRO-3 over several ranks, or from CPU memory."""
    return plan.zero >= 3 and (plan.dp * plan.cp > 1 or plan.offload_params)


def zero3_gathered_bytes(model: ModelSpec, plan: Plan) -> float:
    """ZeRO-3 / FSDP working set: the layer being computed and the one prefetched, unsharded."""
    if not layerwise_weights(plan):
        return 0.0
    return 2 * layer_weight_bytes(model, plan)


def stage_memory(model: ModelSpec, plan: Plan, gpu: GPUSpec, config: MemoryConfig, stage: int) -> DeviceMemory:
    states = model_states(model, plan, stage)
    gathered = zero3_gathered_bytes(model, plan) if plan.stage_layers(stage) else 0.0   # a layerless stage gathers none
    dequant = ftm.dequant_buffer_bytes(model, plan.finetune, plan.tp, plan.tensor_bytes)
    acts = activation_bytes(model, plan, stage, config)
    other = {"cuda_context": config.cuda_context_bytes, "workspace": config.workspace_bytes,
             "nccl_buffers": config.nccl_buffer_bytes_per_group * communicator_count(plan)}
    weights = states.weights + gathered + dequant
    subtotal = weights + states.gradients + states.optimizer + math.fsum(acts.values()) + math.fsum(other.values())
    other["fragmentation"] = config.fragmentation * subtotal
    detail = {f"activations.{k}": v for k, v in acts.items()} | {f"other.{k}": v for k, v in other.items()}
    if gathered:
        detail["weights.zero3_gathered"] = gathered
    if dequant:
        detail["weights.dequant_buffer"] = dequant
    detail |= {f"host.{k}": v for k, v in states.host.items()}
    return DeviceMemory(stage=stage, layers=plan.stage_layers(stage), params=states.params, weights=weights,
                        gradients=states.gradients, optimizer=states.optimizer, activations=math.fsum(acts.values()),
                        other=math.fsum(other.values()), capacity=gpu.usable_memory_bytes,
                        microbatches_in_flight=microbatches_in_flight(plan, stage), detail=detail,
                        trainable_params=states.trainable_params, host=math.fsum(states.host.values()),
                        pageable=states.pageable)


def memory_report(model: ModelSpec, plan: Plan, gpu: GPUSpec, config: MemoryConfig) -> list[DeviceMemory]:
    """One :class:`DeviceMemory` per pipeline stage."""
    return [stage_memory(model, plan, gpu, config, s) for s in range(plan.pp)]
