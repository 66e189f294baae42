"""How the job is run: training settings, parallel layout and their validation.

:class:`TrainingConfig` and :class:`ParallelismConfig` are the ``training:`` and ``parallelism:``
sections of a scenario. :func:`resolve_plan` checks them against the model and the cluster and
returns a :class:`Plan` with every derived quantity (dp, microbatches, layers per stage, dtypes).
Vocabulary: *rank* = a position in the plan; *stage* = a pipeline stage; *chunk* = one of the
``virtual_stages`` model chunks a stage holds under the interleaved schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from sim.errors import ScenarioError
from sim.finetune import FULL, Finetune, FinetuneConfig, resolve_finetune
from sim.hardware import GPUSpec
from sim.model import ModelSpec
from sim.schema import Section

Precision = Literal["fp32", "fp16", "bf16", "fp8"]
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# adamw / adamw-8bit: torch.optim.AdamW / bitsandbytes AdamW8bit; paged-*: bitsandbytes paged optimizers
# (states in CUDA unified memory, evicted to CPU RAM under memory pressure); sgd: momentum buffer;
# adafactor: factored second moment, no first moment (memory.py has the bytes of each).
Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-no-momentum",
                    "adafactor"]
PAGED_OPTIMIZERS = ("paged-adamw", "paged-adamw-8bit")
GPU_ONLY_OPTIMIZERS = ("adamw-8bit", "paged-adamw", "paged-adamw-8bit")   # bitsandbytes CUDA kernels


class TrainingConfig(Section):
    """The ``training:`` section."""

    seq_len: int = Field(ge=1, strict=True, description="tokens per sequence")
    global_batch_size: int = Field(ge=1, strict=True, description="sequences per optimizer step")
    micro_batch_size: int = Field(default=1, ge=1, strict=True, description="sequences per microbatch per DP rank")
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    optimizer_impl: Literal["fused", "unfused"] = Field(
        default="fused", description="fused: one multi-tensor pass over the states per step (apex / Transformer "
                                     "Engine FusedAdam in Megatron-LM, NeMo and DeepSpeed; torch fused=True); "
                                     "unfused: one pass per elementwise op (torch.optim's foreach or for-loop "
                                     "AdamW and SGD, Composer's DecoupledAdamW)")
    implementation: Literal["fused", "torch", "huggingface"] = Field(
        default="fused", description="the layers' implementation: fused kernels (Megatron-LM, Transformer Engine and "
                                     "the frameworks built like them); plain PyTorch modules run eagerly (torch); "
                                     "Hugging Face transformers' Llama layers with PEFT adapters (huggingface). It "
                                     "sets which tensors are saved for the backward and which kernels run")
    grad_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        default=None, description="gradient / reduction dtype; Megatron-LM's default when absent")
    # the optimizer's states: "fp32" (mixed precision: an fp32 master copy beside the 16-bit weights,
    # fp32 moments; Micikevicius et al. 2018) or "bf16" (pure bf16: the bf16 weights updated in place,
    # bf16 moments -- torch.optim on a bf16 model, as the Hugging Face Trainer runs one loaded in bf16
    # without --bf16; NeMo's distributed_fused_adam with optim.dtype: bf16, store_params off)
    optimizer_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32", description="dtype of the optimizer's states: fp32 (with an fp32 master copy) or bf16 "
                                    "(pure bf16: no master copy, bf16 moments)")
    flash_attention: bool = Field(default=True, strict=True)
    kernel_arch: Literal["native", "ampere"] = Field(
        default="native", description="GPU architecture the framework's kernels were built for; 'ampere' on a "
                                      "Hopper GPU: a CUDA 11.7-era stack without sm_90 code (mma.sync tensor cores)")
    attention_kernel_arch: Literal["native", "ampere"] | None = Field(
        default=None, description="architecture the attention kernels were built for, when it differs from "
                                  "kernel_arch; 'ampere' on a Hopper GPU: the FlashAttention-1/2 or Triton kernels "
                                  "of 2023 (mma.sync, no wgmma) beside a CUDA 12 stack's Hopper-native GEMMs")
    tokens: float | Literal["chinchilla"] | None = Field(
        default=None, description="tokens of the whole run (a number such as 15.6e12, or 'chinchilla' = 20 per "
                                  "parameter, Hoffmann et al. 2022); gives time to train, GPU-hours, cost and energy")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: object) -> object:
        if isinstance(value, str) and value != "chinchilla":
            try:    # YAML 1.1 reads 15.6e12 (no sign in the exponent) as a string
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a token count such as 15.6e12 or 'chinchilla', got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            raise ValueError(f"expected a positive token count, got {value!r}")
        return value


class ParallelismConfig(Section):
    """The ``parallelism:`` section."""

    tp: int = Field(default=1, ge=1, strict=True)
    pp: int = Field(default=1, ge=1, strict=True)
    cp: int = Field(default=1, ge=1, strict=True)
    dp: int | None = Field(default=None, ge=1, strict=True, description="derived from the GPU count when absent")
    zero: int = Field(default=0, ge=0, le=3, strict=True, description="0 none, 1 optimizer, 2 +gradients, 3 +weights")
    sequence_parallel: bool = Field(default=False, strict=True)
    recompute: Literal["none", "selective", "full"] = "none"
    # full recomputation of only some layers (Megatron-LM --recompute-method block
    # --recompute-num-layers N, NeMo activations_checkpoint_num_layers: the first N layers of each
    # model chunk; torchtitan's "selective layer" checkpointing of every k-th block: layers / k);
    # the other layers keep all their activations. Default: every layer.
    recompute_layers: int | None = Field(default=None, ge=1, strict=True,
                                         description="layers of each model chunk recomputed in full "
                                                     "(default all; needs recompute: full)")
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    virtual_stages: int = Field(default=1, ge=1, strict=True)
    first_stage_layers: int | None = Field(default=None, ge=0, strict=True, description="layers of the first chunk (0: the embedding only)")
    last_stage_layers: int | None = Field(default=None, ge=0, strict=True, description="layers of the last chunk (0: the output layer and loss only)")
    tp_across_nodes: bool = Field(default=False, strict=True)
    # ZeRO-Offload (Ren et al. 2021, arXiv:2101.06840): optimizer states and fp32 master weights in CPU
    # memory, the optimizer step on the CPU; ZeRO-Infinity (arXiv:2104.07857) also offloads the
    # partitioned 16-bit parameters (needs zero: 3)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    # how ZeRO-3 holds and moves the weights: "fsdp" (PyTorch FSDP / FSDP2: layer gathers prefetched
    # on their own stream, gradients reduce-scattered on another, the recomputation reuses the
    # backward's gather; the fp32 shard is the master weight, sim.memory.fsdp_fp32_shard), "deepspeed"
    # (DeepSpeed >= 0.4.1: the same prefetched gathers, a 16-bit partition beside the optimizer's fp32
    # master) or "deepspeed-0.3" (DeepSpeed's first ZeRO-3, spring 2021: per-parameter gathers, each
    # after torch.cuda.synchronize(), so one is prefetched at a time, at a measured per-GPU rate;
    # gathers and gradient reduce-scatters queue on one process group, the latter in line; the
    # recomputation gathers again; sim/workload.py, efficiency.yaml `frameworks`)
    zero3_impl: Literal["fsdp", "deepspeed", "deepspeed-0.3"] = Field(
        default="fsdp", description="how ZeRO-3 holds and moves weights and gradients: fsdp (PyTorch FSDP), "
                                    "deepspeed (DeepSpeed >= 0.4.1), or DeepSpeed's first ZeRO-3 (deepspeed-0.3, 2021)")
    # Megatron-Core / Transformer Engine userbuffers (--tp-comm-overlap, NeMo ub_tp_comm_overlap): the
    # sequence-parallel all-gathers and reduce-scatters run beside the GEMMs that consume or produce
    # them instead of between them (sim/workload.py); needs sequence_parallel
    tp_comm_overlap: bool = Field(default=False, strict=True,
                                  description="overlap TP collectives with the layer's GEMMs (TE userbuffers)")
    # Megatron-LM (since 2021) and Transformer Engine launch the backward's TP collectives of the
    # column-parallel layers (QKV, MLP up) asynchronously: the gradient all-reduce (or, with sequence
    # parallelism, the re-gather of the input and the reduce-scatter of its gradient) runs beside the
    # dgrad / wgrad GEMMs; only the row-parallel layers' gradient all-gathers (SP) stay in line
    # (megatron/core/tensor_parallel/layers.py LinearWithGradAccumulationAndAsyncCommunication)
    tp_backward_overlap: bool = Field(default=True, strict=True,
                                      description="the backward's column-parallel TP collectives overlap the "
                                                  "gradient GEMMs (Megatron-LM since 2021, Transformer Engine)")
    # hybrid sharding (PyTorch FSDP HYBRID_SHARD, FSDP2 / torchtitan dp_shard with dp_replicate, DeepSpeed
    # MiCS): ZeRO-3 shards over groups of dp_shard data-parallel ranks (x cp) and replicates across the
    # groups; each layer's gathers and gradient reduce-scatters stay in the shard group, and the sharded
    # gradients are then all-reduced across the replicas. Default: one group of all dp ranks
    dp_shard: int | None = Field(default=None, ge=1, strict=True,
                                 description="ZeRO-3 shard group size in data-parallel ranks (hybrid sharding); "
                                             "default all of dp")
    # what a column-parallel GEMM saves of its input under sequence parallelism: "megatron" (Megatron-LM,
    # Transformer Engine: the sequence-sharded input, gathered again in the backward; Korthikanti et
    # al. 2022 §4.2.2) or "dtensor" (PyTorch DTensor's ColwiseParallel after SequenceParallel norms, as
    # torchtitan applies them: autograd saves the all-gathered input, the output layer's included, and
    # the backward's collectives run in line, none re-gathers: tp_backward_overlap does not apply)
    tp_impl: Literal["megatron", "dtensor"] = Field(
        default="megatron", description="what a column-parallel GEMM saves under sequence parallelism: the "
                                        "sharded input (megatron) or the all-gathered one (dtensor)")
    # PyTorch >= 2.1 non-reentrant torch.utils.checkpoint (FSDP / Composer, torchtitan) stops a layer's
    # recomputation as soon as the last tensor its backward needs is rebuilt ("early stop", on by
    # default): the input of the layer's last GEMM (the MLP down projection) is saved before that GEMM
    # runs, so it, its TP reduction and the residual add after it are not re-run (less with dropout
    # after the MLP or a LoRA adapter on the projection: sim.flops.early_stop_skips)
    recompute_early_stop: bool = Field(default=False, strict=True,
                                       description="full recomputation stops before each layer's last GEMM "
                                                   "(PyTorch >= 2.1 non-reentrant checkpoint)")


def weight_dtype(precision: str) -> str:
    """The dtype of weights and activations: fp32 for fp32 training, else the 16-bit dtype of the
    recipe (fp8 recipes keep 16-bit master-side weights and activations: bf16)."""
    if precision == "fp32":
        return "fp32"
    return precision if precision in ("fp16", "bf16") else "bf16"


def default_grad_dtype(precision: str) -> str:
    """Megatron-LM: bf16 runs accumulate and reduce gradients in fp32 (``accumulate_allreduce_grads_in_fp32``
    is forced on for bf16 in ``arguments.py``); fp16 runs keep fp16 gradients; fp32 runs fp32."""
    return "fp16" if precision == "fp16" else "fp32"


def split_layers(layers: int, chunks: int, first: int | None = None, last: int | None = None) -> tuple[int, ...]:
    """Layers per chunk, in pipeline order, as even as possible.

    ``first`` / ``last`` pin the first and the last chunk; 0 leaves a chunk with only the embedding
    (first) or only the output layer and loss (last). Llama 3 405B (arXiv:2407.21783 §3.3.2) takes
    one layer from the first and the last stage so that "the first model chunk on the first stage
    has only the embedding, and the last model chunk on the last stage has only output projection
    and loss calculation": 126 layers in 16 x 8 one-layer chunks, first = last = 0. Left-over layers go to the middle
    chunks first, then the first and the last, which carry the embedding and the logits.
    Returns an empty tuple when the split is impossible.
    """
    pinned: dict[int, int] = {}
    if first is not None:
        pinned[0] = first
    if last is not None:
        if pinned.get(chunks - 1, last) != last:
            return ()
        pinned[chunks - 1] = last
    free = [i for i in range(chunks) if i not in pinned]
    rest = layers - sum(pinned.values())
    if rest < len(free) or (not free and rest):
        return ()
    counts = dict(pinned)
    if free:
        base, extra = divmod(rest, len(free))
        order = [i for i in free if 0 < i < chunks - 1] + [i for i in free if i in (0, chunks - 1)]
        for i in free:
            counts[i] = base
        for i in order[:extra]:
            counts[i] += 1
    return tuple(counts[i] for i in range(chunks))


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated parallel plan with everything derived from it."""

    tp: int
    pp: int
    cp: int
    dp: int
    zero: int
    sequence_parallel: bool
    recompute: str
    schedule: str
    virtual_stages: int
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    precision: str
    optimizer: str
    grad_dtype: str
    flash_attention: bool
    chunk_layers: tuple[int, ...]   # layers of each chunk; chunk c sits on stage c % pp
    finetune: Finetune = FULL        # what is trained (full = every weight, as pre-training)
    offload_optimizer: bool = False  # optimizer states + master weights in CPU memory, step on the CPU
    offload_params: bool = False     # 16-bit weights in CPU memory, fetched layer by layer (ZeRO-3)
    zero3_impl: str = "fsdp"         # how ZeRO-3 moves weights and gradients (see ParallelismConfig)
    kernel_arch: str = "native"      # architecture the kernels were built for (see TrainingConfig)
    attention_kernel_arch: str = "native"   # the attention kernels' (see TrainingConfig)
    recompute_early_stop: bool = False       # full recomputation skips each layer's last GEMM (see ParallelismConfig)
    optimizer_impl: str = "fused"            # one pass or one per elementwise op (see TrainingConfig)
    optimizer_dtype: str = "fp32"            # fp32 (master copy + fp32 states) or bf16 (see TrainingConfig)
    implementation: str = "fused"            # fused | torch | huggingface layers (see TrainingConfig)
    tp_backward_overlap: bool = True         # backward TP collectives beside the gradient GEMMs (see ParallelismConfig)
    tp_comm_overlap: bool = False    # TP collectives overlap the layer's GEMMs (see ParallelismConfig)
    tp_impl: str = "megatron"        # what a column-parallel GEMM saves under SP (see ParallelismConfig)
    recompute_layers: int | None = None      # layers of each chunk recomputed in full (None: all; see ParallelismConfig)
    dp_shard: int | None = None      # ZeRO-3 shard group in dp ranks (None: all dp; see ParallelismConfig)

    @property
    def zero_shards(self) -> int:
        """Ranks that share one copy of the ZeRO-sharded states: dp x cp, or dp_shard x cp (hybrid)."""
        return (self.dp_shard or self.dp) * self.cp

    @property
    def replicas(self) -> int:
        """Copies of the ZeRO-sharded states across the data-parallel ranks (1 without hybrid sharding)."""
        return self.dp * self.cp // self.zero_shards

    def recomputed_layers(self, layers: int) -> int:
        """Layers of a chunk of ``layers`` whose activations the backward rebuilds (``recompute``)."""
        if self.recompute == "none":
            return 0
        return layers if self.recompute_layers is None else min(self.recompute_layers, layers)

    @property
    def recompute_fraction(self) -> float:
        """Share of the model's layers under the plan's recomputation (1 without ``recompute_layers``)."""
        total = sum(self.chunk_layers)
        return sum(self.recomputed_layers(n) for n in self.chunk_layers) / total if total else 0.0

    @property
    def gathered_inputs(self) -> bool:
        """Whether the column-parallel GEMMs save their all-gathered (full-sequence) inputs."""
        return self.sequence_parallel and self.tp > 1 and self.tp_impl == "dtensor"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def microbatches(self) -> int:
        """Microbatches per DP rank per step (= gradient-accumulation steps)."""
        return self.global_batch_size // (self.dp * self.micro_batch_size)

    @property
    def tensor_bytes(self) -> int:
        """Bytes per element of weights and activations: fp32 training keeps fp32; mixed precision
        (fp16, bf16, and fp8 recipes, whose master weights and activations are 16-bit) keeps 2."""
        return DTYPE_BYTES["fp32"] if self.precision == "fp32" else DTYPE_BYTES["bf16"]

    @property
    def weight_dtype(self) -> str:
        """The dtype weights and activations are held in (see :func:`weight_dtype`)."""
        return weight_dtype(self.precision)

    @property
    def paged_optimizer(self) -> bool:
        return self.optimizer in PAGED_OPTIMIZERS

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def stage_layers(self, stage: int) -> int:
        return sum(n for c, n in enumerate(self.chunk_layers) if c % self.pp == stage)

    def describe(self) -> str:
        extra = [(f"ZeRO-{self.zero}" + (f" ({self.zero3_impl})" if self.zero3_impl != "fsdp" else "")
                  + (f" hybrid: shards of {self.dp_shard} x {self.replicas} replicas" if self.dp_shard else ""))
                 if self.zero else "no ZeRO"]
        if self.kernel_arch != "native":
            extra.append(f"{self.kernel_arch}-built kernels")
        if self.attention_kernel_arch != self.kernel_arch:
            extra.append(f"{self.attention_kernel_arch}-built attention")
        if self.sequence_parallel:
            extra.append("SP" + (" (DTensor: gathered inputs saved)" if self.gathered_inputs else ""))
        if self.tp_comm_overlap and self.tp > 1:
            extra.append("TP-comm overlap")
        elif self.tp > 1 and not self.tp_backward_overlap:
            extra.append("no TP backward overlap")
        extra.append(f"recompute {self.recompute}"
                     + (f" ({self.recompute_layers} layers per chunk)" if self.recompute_layers is not None else "")
                     + (" (early stop)" if self.recompute_early_stop else ""))
        if self.implementation != "fused":
            extra.append(f"{self.implementation} layers")
        sched = self.schedule + (f" (v={self.virtual_stages})" if self.virtual_stages > 1 else "")
        if self.offload_optimizer or self.offload_params:
            extra.append("offload " + " + ".join(what for what, on in (("optimizer", self.offload_optimizer),
                                                                      ("params", self.offload_params)) if on)
                         + " to CPU")
        tail = f"; {self.finetune.describe()}" if self.finetune.adapters else ""
        grads = self.finetune.adapter_dtype if self.finetune.adapters else self.grad_dtype   # adapters: their dtype
        return (f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} ({self.gpus} GPUs), {', '.join(extra)}, "
                f"{sched}; seq {self.seq_len}, global batch {self.global_batch_size}, micro-batch "
                f"{self.micro_batch_size} -> {self.microbatches} microbatches; {self.precision}, "
                f"{self.optimizer}{' (unfused)' if self.optimizer_impl == 'unfused' else ''}"
                f"{' (bf16 states, no master)' if self.optimizer_dtype == 'bf16' else ''}, grads {grads}{tail}")


def resolve_plan(model: ModelSpec, training: TrainingConfig, par: ParallelismConfig, *, num_gpus: int,
                 gpus_per_node: int, gpu: GPUSpec, file: str | None = None,
                 finetune: FinetuneConfig | None = None) -> Plan:
    """Check the plan against the model and the cluster; every failure names its key."""
    def fail(key: str, msg: str) -> ScenarioError:
        return ScenarioError(msg, file=file, key=key)

    tp, pp, cp = par.tp, par.pp, par.cp
    if par.dp is None:
        if num_gpus % (tp * pp * cp):
            raise fail("parallelism", f"tp({tp}) * pp({pp}) * cp({cp}) = {tp * pp * cp} does not divide the "
                                      f"{num_gpus} GPUs of the cluster; expected a divisor so that dp is an integer")
        dp = num_gpus // (tp * pp * cp)
    else:
        dp = par.dp
        if tp * pp * cp * dp != num_gpus:
            raise fail("parallelism.dp", f"tp({tp}) * pp({pp}) * cp({cp}) * dp({dp}) = {tp * pp * cp * dp} != "
                                         f"{num_gpus} GPUs in the cluster; expected the product to equal the GPU count")
    if model.heads % tp:
        raise fail("parallelism.tp", f"tp={tp} does not divide the {model.heads} attention heads of {model.name}")
    kv = model.n_kv_heads
    if kv % tp and tp % kv:
        raise fail("parallelism.tp", f"tp={tp} neither divides nor is a multiple of the {kv} kv heads of {model.name}")
    if model.ffn_hidden % tp:
        raise fail("parallelism.tp", f"tp={tp} does not divide ffn_hidden={model.ffn_hidden} of {model.name}")
    if tp > gpus_per_node and not par.tp_across_nodes:
        raise fail("parallelism.tp", f"tp={tp} exceeds the {gpus_per_node} GPUs of one node; expected tp <= "
                                     f"{gpus_per_node} (set parallelism.tp_across_nodes: true to allow it)")
    v = par.virtual_stages
    if par.schedule == "interleaved" and (v < 2 or pp < 2):
        raise fail("parallelism.virtual_stages", f"the interleaved schedule needs pp >= 2 and virtual_stages >= 2, "
                                                 f"got pp={pp}, virtual_stages={v}")
    if par.schedule != "interleaved" and v != 1:
        raise fail("parallelism.virtual_stages", f"virtual_stages={v} needs schedule: interleaved "
                                                 f"(schedule is {par.schedule}); expected 1")
    chunks = split_layers(model.layers, pp * v, par.first_stage_layers, par.last_stage_layers)
    if not chunks:
        pinned = par.first_stage_layers is not None or par.last_stage_layers is not None
        raise fail("parallelism.first_stage_layers" if pinned else "parallelism.pp",
                   f"cannot split {model.layers} layers into pp({pp}) * virtual_stages({v}) = {pp * v} chunks "
                   f"with first_stage_layers={par.first_stage_layers}, last_stage_layers={par.last_stage_layers}; "
                   f"expected at least one layer in every chunk except a first or last one pinned to 0")
    if training.global_batch_size % (dp * training.micro_batch_size):
        raise fail("training.global_batch_size",
                   f"global_batch_size={training.global_batch_size} is not divisible by dp({dp}) * "
                   f"micro_batch_size({training.micro_batch_size}) = {dp * training.micro_batch_size}")
    microbatches = training.global_batch_size // (dp * training.micro_batch_size)
    if par.schedule == "interleaved" and microbatches % pp:
        raise fail("training.global_batch_size", f"the interleaved schedule needs the number of microbatches "
                                                 f"({microbatches}) to be a multiple of pp ({pp})")
    if training.seq_len % cp:
        raise fail("parallelism.cp", f"cp={cp} does not divide seq_len={training.seq_len}")
    if model.position == "learned" and training.seq_len > model.max_seq_len:
        raise fail("training.seq_len", f"seq_len={training.seq_len} exceeds the {model.max_seq_len} learned "
                                       f"positions of {model.name}")
    precision = training.precision
    if not gpu.supports(precision):
        hint = " (use precision: fp16)" if precision == "bf16" and gpu.supports("fp16") else ""
        raise fail("training.precision", f"{gpu.name} has no {precision} support{hint}")
    grad_dtype = training.grad_dtype or default_grad_dtype(precision)
    if grad_dtype == "bf16" and not gpu.supports("bf16"):
        raise fail("training.grad_dtype", f"{gpu.name} has no bf16 support; expected fp16 or fp32")
    if training.kernel_arch == "ampere" and (gpu.arch not in ("ampere", "hopper") or precision == "fp8"):
        raise fail("training.kernel_arch", f"kernel_arch: ampere models Ampere (sm_80) kernels, which run on "
                                           f"Ampere and Hopper GPUs in 16-bit; expected native for {gpu.name} "
                                           f"with precision {precision}")
    attention_arch = training.attention_kernel_arch or training.kernel_arch
    if attention_arch == "ampere" and gpu.arch not in ("ampere", "hopper"):
        raise fail("training.attention_kernel_arch", f"attention_kernel_arch: ampere models Ampere (sm_80) "
                                                     f"kernels, which run on Ampere and Hopper GPUs; expected "
                                                     f"native for {gpu.name}")
    if training.optimizer_impl == "unfused" and training.optimizer not in ("adamw", "sgd", "sgd-no-momentum"):
        raise fail("training.optimizer_impl", f"{training.optimizer} has one implementation here; unfused models "
                                              f"torch.optim's AdamW and SGD: expected fused")
    if training.optimizer_dtype == "bf16" and (precision not in ("bf16", "fp8") or training.optimizer not in
                                                ("adamw", "sgd", "sgd-no-momentum")):
        raise fail("training.optimizer_dtype", f"bf16 optimizer states update bf16 weights in place with torch.optim's "
                                               f"AdamW or SGD; expected fp32 with precision {precision} and "
                                               f"optimizer {training.optimizer}")
    if par.recompute_early_stop and par.recompute != "full":
        raise fail("parallelism.recompute_early_stop", f"early stop shortens a full recomputation; expected "
                                                       f"recompute: full, got recompute: {par.recompute}")
    if par.recompute_layers is not None and par.recompute != "full":
        raise fail("parallelism.recompute_layers", f"recompute_layers picks the layers of a full recomputation; "
                                                   f"expected recompute: full, got recompute: {par.recompute}")
    if par.recompute_layers is not None and par.zero3_impl == "deepspeed-0.3":
        raise fail("parallelism.recompute_layers", "DeepSpeed 0.3's ZeRO-3 is modelled with every layer "
                                                   "recomputed; expected no recompute_layers")
    if par.dp_shard is not None and (par.zero != 3 or par.zero3_impl != "fsdp" or dp % par.dp_shard
                                     or par.offload_optimizer != "none" or par.offload_params != "none"):
        raise fail("parallelism.dp_shard", f"hybrid sharding splits ZeRO-3 (zero3_impl fsdp, no offload) into "
                                           f"groups of dp_shard ranks; expected zero: 3 and a divisor of dp={dp}, "
                                           f"got zero={par.zero}, dp_shard={par.dp_shard}")
    if par.zero3_impl != "fsdp" and par.zero != 3:
        raise fail("parallelism.zero3_impl", f"zero3_impl={par.zero3_impl} describes ZeRO-3; expected zero: 3, "
                                             f"got zero={par.zero}")
    if par.tp_comm_overlap and tp > 1 and not par.sequence_parallel:
        raise fail("parallelism.tp_comm_overlap", "TP-communication overlap pipelines the all-gathers and "
                                                  "reduce-scatters of sequence parallelism (Megatron-LM: "
                                                  "--tp-comm-overlap needs --sequence-parallel); expected "
                                                  "sequence_parallel: true")
    if par.offload_params == "cpu" and par.zero != 3:
        raise fail("parallelism.offload_params", f"offloading parameters partitions them as ZeRO-3 does "
                                                 f"(DeepSpeed ZeRO-Infinity); expected zero: 3, got zero={par.zero}")
    if par.offload_optimizer == "cpu" and par.zero == 0 and dp * par.cp > 1:
        raise fail("parallelism.zero", f"ZeRO-Offload partitions the optimizer states over the data-parallel "
                                       f"ranks (DeepSpeed: offload_optimizer is an option of ZeRO stages 1-3); "
                                       f"expected zero: 1, 2 or 3 with dp x cp = {dp * par.cp}, got zero: 0")
    if par.offload_optimizer == "cpu" and training.optimizer in GPU_ONLY_OPTIMIZERS:
        raise fail("training.optimizer", f"{training.optimizer} runs bitsandbytes CUDA kernels on the GPU (paged "
                                         f"variants already spill to CPU memory); with offload_optimizer: cpu "
                                         f"expected adamw, sgd, sgd-no-momentum or adafactor")
    ft = resolve_finetune(finetune, model=model, compute_dtype=weight_dtype(precision), gpu=gpu, file=file)
    if ft.adapters and training.optimizer_dtype != "fp32":
        raise fail("training.optimizer_dtype", "the adapters' optimizer states take finetune.adapter_dtype; "
                                               "expected fp32 (the default) with LoRA / QLoRA")
    if training.implementation != "fused":
        if par.recompute == "selective" or not training.flash_attention or par.sequence_parallel:
            raise fail("training.implementation", f"{training.implementation} layers are modelled with "
                                                  "flash_attention: true, recompute none or full and no sequence "
                                                  "parallelism; expected fused for this plan")
        if ft.quantized:
            raise fail("training.implementation", f"{training.implementation} layers are modelled with a 16-bit "
                                                  "frozen base (a quantized base's GEMMs keep tensors and run "
                                                  f"kernels of their own); expected fused with base {ft.base_dtype}")
    return Plan(tp=tp, pp=pp, cp=cp, dp=dp, zero=par.zero, sequence_parallel=par.sequence_parallel,
                recompute=par.recompute, schedule=par.schedule, virtual_stages=v, seq_len=training.seq_len,
                global_batch_size=training.global_batch_size, micro_batch_size=training.micro_batch_size,
                precision=precision, optimizer=training.optimizer, grad_dtype=grad_dtype,
                flash_attention=training.flash_attention, chunk_layers=chunks, finetune=ft,
                offload_optimizer=par.offload_optimizer == "cpu", offload_params=par.offload_params == "cpu",
                zero3_impl=par.zero3_impl, kernel_arch=training.kernel_arch, attention_kernel_arch=attention_arch,
                recompute_early_stop=par.recompute_early_stop,
                # DTensor's backward collectives run in the autograd graph's order: no asynchronous
                # column-parallel collectives, and no re-gather of the saved inputs
                tp_backward_overlap=par.tp_backward_overlap and tp > 1 and par.tp_impl != "dtensor",
                optimizer_impl=training.optimizer_impl, implementation=training.implementation,
                optimizer_dtype=training.optimizer_dtype,
                tp_comm_overlap=par.tp_comm_overlap and tp > 1, tp_impl=par.tp_impl,
                recompute_layers=par.recompute_layers,
                dp_shard=par.dp_shard if par.dp_shard is not None and par.dp_shard < dp else None)
