"""Peak memory of each pipeline stage's GPUs: weights, gradients, optimizer states, activations, other.

Model states follow mixed-precision training as frameworks do it (Micikevicius et al. 2018;
Rajbhandari et al. 2020, "ZeRO", §3.1): 16-bit weights, gradients in ``grad_dtype``, an fp32
master copy plus the optimizer's moments; K = 12 bytes per parameter for mixed-precision Adam.
ZeRO stage 1 shards the optimizer states, 2 also the gradients, 3 also the weights, over the
dp x cp ranks that hold the same parameters. Activations follow :mod:`sim.activations`, times the
microbatches that the pipeline schedule keeps in flight on the stage.

All TP ranks of a stage and all of its DP / CP replicas hold the same amounts, so one device per
stage represents them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import Field, field_validator

from sim import activations as act
from sim.hardware import GPUSpec
from sim.model import ModelSpec
from sim.plan import DTYPE_BYTES, Plan
from sim.schedule import stage_schedule
from sim.schema import Section
from sim.units import MiB, parse_quantity

# Bytes of optimizer state per parameter besides the fp32 master copy.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,        # two fp32 moments (Loshchilov & Hutter 2019; ZeRO §3.1 K = 4 + 8)
    "adamw-8bit": 2,   # two 8-bit blockwise-quantized moments (Dettmers et al. 2022, bitsandbytes)
    "sgd": 4,          # fp32 momentum buffer (torch.optim.SGD with momentum)
}
MASTER_WEIGHT_BYTES = 4    # fp32 master copy kept by mixed-precision optimizers
VOCAB_PAD_MULTIPLE = 128   # Megatron-LM --make-vocab-size-divisible-by default; padded to 128 * tp


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

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def shortfall(self) -> float:
        """Bytes missing to fit (0 when it fits)."""
        return max(0.0, self.total - self.capacity)

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


def bytes_per_param(plan: Plan) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter before sharding."""
    weight = plan.tensor_bytes
    grad = DTYPE_BYTES[plan.grad_dtype]
    master = 0 if plan.precision == "fp32" else MASTER_WEIGHT_BYTES
    return weight, grad, master + OPTIMIZER_STATE_BYTES[plan.optimizer]


def model_state_bytes(params: float, plan: Plan) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for ``params`` parameters under the plan's ZeRO stage."""
    w, g, o = bytes_per_param(plan)
    shards = plan.dp * plan.cp
    return (params * w / (shards if plan.zero >= 3 else 1),
            params * g / (shards if plan.zero >= 2 else 1),
            params * o / (shards if plan.zero >= 1 else 1))


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


def layer_passes_in_flight(plan: Plan, stage: int) -> float:
    """Layer x microbatch activations held at the stage's peak: replays the schedule's order of
    forward and backward passes, each chunk with its own layer count (chunks may differ)."""
    if plan.virtual_stages == 1:
        return plan.stage_layers(stage) * microbatches_in_flight(plan, stage)
    live = peak = 0
    for phase, _, chunk in stage_schedule(plan.schedule, plan.pp, stage, plan.microbatches, plan.virtual_stages):
        layers = plan.chunk_layers[chunk * plan.pp + stage]
        live += layers if phase == "F" else -layers
        peak = max(peak, live)
    return float(peak)


def activation_bytes(model: ModelSpec, plan: Plan, stage: int) -> dict[str, float]:
    """Activation bytes of one GPU of ``stage`` at its peak, by part."""
    e = plan.tensor_bytes
    shape = dict(seq_len=plan.seq_len, micro_batch=plan.micro_batch_size, tp=plan.tp,
                 sequence_parallel=plan.sequence_parallel, cp=plan.cp)
    per_layer = act.layer_activation_bytes(model, **shape, recompute=plan.recompute,
                                           flash_attention=plan.flash_attention, dtype_bytes=e)
    in_flight = microbatches_in_flight(plan, stage)
    parts = {"layers": per_layer * layer_passes_in_flight(plan, stage)}
    if stage == 0:
        first_chunk = in_flight if plan.schedule == "gpipe" else min(in_flight * plan.virtual_stages, plan.microbatches)
        parts["embedding"] = act.embedding_activation_bytes(model, **shape) * first_chunk
    if stage == plan.pp - 1:
        # the last chunk runs each microbatch's backward right after its forward; GPipe keeps all
        logits = plan.microbatches if plan.schedule == "gpipe" else 1
        parts["logits"] = act.output_activation_bytes(model, **shape, dtype_bytes=e) * logits
    if plan.recompute != "none":
        # the backward of one layer rebuilds what recomputation dropped: one layer's tensors at a time
        full = act.layer_activation_bytes(model, **shape, recompute="none",
                                          flash_attention=plan.flash_attention, dtype_bytes=e)
        parts["recompute_workspace"] = full - per_layer
    return parts


def communicator_count(plan: Plan) -> int:
    """Process groups of size > 1 a rank belongs to (each holds NCCL buffers)."""
    return sum(1 for n in (plan.tp, plan.pp, plan.cp, plan.dp * plan.cp) if n > 1)


def zero3_gathered_bytes(model: ModelSpec, plan: Plan) -> float:
    """ZeRO-3 / FSDP working set: the layer being computed and the one prefetched, unsharded."""
    if plan.zero < 3 or plan.dp * plan.cp == 1:
        return 0.0
    return 2 * layer_params_per_rank(model, plan.tp) * bytes_per_param(plan)[0]


def stage_memory(model: ModelSpec, plan: Plan, gpu: GPUSpec, config: MemoryConfig, stage: int) -> DeviceMemory:
    params = stage_params(model, plan, stage)
    weights, grads, optim = model_state_bytes(params, plan)
    gathered = zero3_gathered_bytes(model, plan)
    acts = activation_bytes(model, plan, stage)
    other = {"cuda_context": config.cuda_context_bytes, "workspace": config.workspace_bytes,
             "nccl_buffers": config.nccl_buffer_bytes_per_group * communicator_count(plan)}
    subtotal = weights + gathered + grads + optim + math.fsum(acts.values()) + math.fsum(other.values())
    other["fragmentation"] = config.fragmentation * subtotal
    detail = {f"activations.{k}": v for k, v in acts.items()} | {f"other.{k}": v for k, v in other.items()}
    if gathered:
        detail["weights.zero3_gathered"] = gathered
    return DeviceMemory(stage=stage, layers=plan.stage_layers(stage), params=params, weights=weights + gathered,
                        gradients=grads, optimizer=optim, activations=math.fsum(acts.values()),
                        other=math.fsum(other.values()), capacity=gpu.usable_memory_bytes,
                        microbatches_in_flight=microbatches_in_flight(plan, stage), detail=detail)


def memory_report(model: ModelSpec, plan: Plan, gpu: GPUSpec, config: MemoryConfig) -> list[DeviceMemory]:
    """One :class:`DeviceMemory` per pipeline stage."""
    return [stage_memory(model, plan, gpu, config, s) for s in range(plan.pp)]
