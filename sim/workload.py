"""Lowering: model x plan -> one op program per pipeline stage (data: printable, testable).

Every device of a stage runs the same program; only the process groups its collectives use differ
(the engine maps a program onto devices). Granularity: one compute op per (microbatch, model
chunk, pass) carrying the kernels of all its layers, and per layer where something happens between
layers (the last microbatch's backward, whose gradient buckets start reducing as layers finish;
context parallelism). The TP collectives of a pass are ops on the ``tp`` stream (Megatron-LM
runs the forward's on the critical path: with sequence parallelism 2 all-gathers + 2 reduce-scatters
of the [s, b, h] activation, without it 2 all-reduces; the backward launches the column-parallel
layers' (the input re-gathers and gradient reduce-scatters, or the gradient all-reduces) beside the
gradient GEMMs and only the row-parallel layers' gradient all-gathers in line; with TP-comm overlap
all run beside the pass's compute, :data:`TP_OVERLAP_SPLITS`); with context
parallelism the K/V ring exchange runs on the ``cp`` stream concurrently with the attention core;
the last microbatch's backward fills gradient buckets that are reduced on the ``dp`` stream as soon
as they are full (Megatron-LM DDP overlap_grad_reduce); activations go to the next stage on the
``pp`` stream.

Fine-tuning and offload (:mod:`sim.finetune`, :mod:`sim.offload`): only trainable parameters
(the adapters under LoRA) have gradients to reduce and an optimizer step; copies between a GPU and
its host run on the ``host`` stream, the CPU optimizer step on the ``cpu`` stream.
"""
from __future__ import annotations

from collections.abc import Iterable

from dataclasses import dataclass, field

from sim import finetune as ftm
from sim.activations import embedding_activation_bytes, kv_heads_per_rank, output_activation_bytes
from sim.compute import Kernel
from sim.efficiency import framework_rate
from sim.flops import early_stop_skips
from sim.kernels import LayerKernels, optimizer_kernels
from sim.memory import bytes_per_param, extra_logits_bytes, layer_activation_total, layer_params_per_rank, \
    layer_weight_bytes, layerwise_weights, stage_memory
from sim.model import ModelSpec
from sim.offload import D2H, H2D, HOST_GROUP, cpu_step_time_s
from sim.plan import Plan
from sim.schedule import stage_schedule

STREAMS = ("compute", "tp", "cp", "dp", "gather", "pp", "host", "cpu")
"""The streams of a device, in display order: GPU kernels, the collectives of each process group,
ZeRO-3 weight gathers, pipeline sends, GPU <-> CPU copies, and work on the host CPU."""

# TP-comm overlap (Transformer Engine userbuffers as NeMo configures it, NeMo-Framework-Launcher
# conf/training/tp_overlap/ub_cfg_h100_*.yaml): the all-gathers before the QKV and first MLP GEMMs are
# ring exchanges beside those GEMMs' chunks (the first chunk is the rank's own shard), the backward's
# collectives bulk overlaps beside the dgrad / wgrad GEMMs, and the forward's reduce-scatters after
# the output projection and the second MLP GEMM "pipeline" overlaps in num_splits = 4 chunks, whose
# last chunk's reduce-scatter can only start when the GEMM ends. The SMs the userbuffers kernels take
# from the GEMMs beside them: efficiency.yaml overlap_slowdown
TP_OVERLAP_SPLITS = 4

# Megatron-LM DDP: bucket_size = max(40,000,000, 1,000,000 x dp) parameters
# (megatron/core/distributed/distributed_data_parallel.py).
BUCKET_MIN_PARAMS = 40_000_000
BUCKET_PARAMS_PER_DP_RANK = 1_000_000


@dataclass(frozen=True, slots=True)
class Collective:
    """A collective on one of the device's process groups (size as nccl-tests counts it)."""

    kind: str                 # all_reduce | reduce_scatter | all_gather | p2p | d2h | h2d (host copies)
    group: str                # tp | cp | dp (data-parallel incl. cp) | pp (to the stage in ``peer_stage``) | host
    size_bytes: float
    count: int = 1            # back-to-back repetitions merged into this op
    floor_s: float = 0.0      # least time per repetition when the framework, not the network, is the limit
    transport: str = "nccl"   # what moves it: nccl, or userbuffers (TP-comm overlap); host copies use copy engines


@dataclass(frozen=True, slots=True)
class Op:
    """One node of a stage's op graph."""

    index: int
    stream: str                               # compute | tp | cp | dp | pp | gather (ZeRO-3 weights) | host | cpu
    name: str
    phase: str                                # forward | backward | recompute | optimizer | comm
    deps: tuple[int, ...] = ()                # ops of the same device that must finish first
    kernels: tuple[Kernel, ...] = ()
    collective: Collective | None = None
    peer_stage: int | None = None             # pp sends: destination stage
    signal: tuple | None = None               # pp sends: key set when the data has arrived
    wait: tuple | None = None                 # compute ops: key of the pp data they need
    alloc: tuple[tuple[str, float], ...] = ()  # (category, bytes) allocated when the op starts
    free: tuple[tuple[str, float], ...] = ()   # (category, bytes) freed when the op ends
    duration_s: float | None = None           # work off the GPU (the CPU optimizer step): its fixed time

    def __str__(self) -> str:
        what = f"{self.collective.kind}[{self.collective.group}] {self.collective.size_bytes:.3g} B" \
            f"{' x' + str(self.collective.count) if self.collective.count > 1 else ''}" if self.collective \
            else f"{self.duration_s:.3g} s on the host" if self.duration_s is not None \
            else f"{len(self.kernels)} kernels, {sum(k.flop for k in self.kernels):.3g} FLOP"
        extra = f" wait={self.wait}" if self.wait else ""
        return f"#{self.index:<5} {self.stream:<7} {self.name:<28} {what}  deps={list(self.deps)}{extra}"


@dataclass
class Program:
    """The ops of one pipeline stage, in program order (each stream runs its own ops in this order)."""

    stage: int
    ops: list[Op] = field(default_factory=list)
    static_bytes: dict[str, float] = field(default_factory=dict)   # weights, gradients, optimizer, other

    def add(self, stream: str, name: str, phase: str, deps=(), **kw) -> int:
        assert stream in STREAMS, stream
        op = Op(len(self.ops), stream, name, phase, tuple(d for d in deps if d is not None), **kw)
        self.ops.append(op)
        return op.index

    def dump(self) -> str:
        return "\n".join(str(op) for op in self.ops)


class _Lowering:
    """Builds the programs; holds the per-plan constants."""

    def __init__(self, model: ModelSpec, plan: Plan, memory_config, gpu, host=None, ranks_on_host: int = 1):
        self.model, self.plan, self.memory_config, self.gpu = model, plan, memory_config, gpu
        self.host, self.ranks_on_host = host, ranks_on_host     # the node's CPU side (offload)
        self.k = LayerKernels(model, plan)
        self.e = plan.tensor_bytes
        shape = dict(seq_len=plan.seq_len, micro_batch=plan.micro_batch_size, tp=plan.tp,
                     sequence_parallel=plan.sequence_parallel, cp=plan.cp)
        self.layer_act = layer_activation_total(model, plan, plan.recompute)     # a recomputed layer's
        self.layer_act_kept = layer_activation_total(model, plan, "none")         # a layer that is not
        self.recompute_ws = self.layer_act_kept - self.layer_act if plan.recompute != "none" else 0.0
        self.embed_act = embedding_activation_bytes(model, **shape)
        self.logits_act = output_activation_bytes(model, **shape, dtype_bytes=self.e,
                                                  gathered_inputs=plan.gathered_inputs) \
            + (extra_logits_bytes(model, plan, memory_config) if memory_config.logits_copies > 1 else 0.0)
        tokens = plan.seq_len / plan.cp * plan.micro_batch_size
        self.tokens = tokens
        # TP: 2 all-gathers + 2 reduce-scatters (SP) or 2 all-reduces of the full [s/cp, b, h] activation
        act_bytes = tokens * model.hidden * self.e
        if plan.tp > 1:
            self.tp_comm = (Collective("all_gather", "tp", act_bytes, 2), Collective("reduce_scatter", "tp", act_bytes, 2)) \
                if plan.sequence_parallel else (Collective("all_reduce", "tp", act_bytes, 2),)
        else:
            self.tp_comm = ()
        # the backward with async TP gradient collectives (Megatron-LM, TE): the row-parallel layers'
        # gradient all-gathers (SP) in line; the column-parallel layers' input re-gathers and gradient
        # reduce-scatters (SP) or gradient all-reduces beside the gradient GEMMs
        self.tp_comm_bwd_inline: tuple[Collective, ...] = ()
        self.tp_comm_bwd_beside: tuple[Collective, ...] = ()
        if plan.tp > 1 and plan.tp_backward_overlap:
            self.tp_comm_bwd_beside = self.tp_comm
            if plan.sequence_parallel:
                self.tp_comm_bwd_inline = (Collective("all_gather", "tp", act_bytes, 2),)
        # an early-stopped recomputation that skips the down projection skips its reduction too
        self.tp_comm_recompute = self.tp_comm
        if plan.recompute_early_stop and self.tp_comm and early_stop_skips(model, plan.finetune) == "down":
            last = self.tp_comm[-1]
            self.tp_comm_recompute = self.tp_comm[:-1] + (Collective(last.kind, last.group, last.size_bytes,
                                                                     last.count - 1),)
        # CP: every rank gathers the K and V of the other cp - 1 chunks (ring attention)
        kv = kv_heads_per_rank(model, plan.tp) * model.d_head
        self.cp_comm = Collective("all_gather", "cp", 2 * plan.seq_len * plan.micro_batch_size * kv * self.e) \
            if plan.cp > 1 else None
        # pipeline messages: the [s/tp, b, h] shard with sequence parallelism, else the whole [s, b, h]
        # (megatron-core sends the full tensor; the 2021 scatter-gather optimization is not modelled)
        self.p2p_bytes = tokens * model.hidden * self.e / (plan.tp if plan.sequence_parallel else 1)
        # trainable parameters of one layer: all of them, or the adapters' under LoRA
        self.layer_params = ftm.adapter_params_per_layer(model, plan.finetune, plan.tp) if plan.finetune.adapters \
            else layer_params_per_rank(model, plan.tp)
        self.weight_bytes, self.grad_bytes, _ = bytes_per_param(plan)          # of a trainable parameter
        self.bucket_params = max(BUCKET_MIN_PARAMS, BUCKET_PARAMS_PER_DP_RANK * plan.dp * plan.cp)
        self._repeats: dict[tuple, tuple] = {}
        self._cp_split: dict[int, tuple] = {}
        self.zero3 = layerwise_weights(plan)
        self.layer_weight_bytes = layer_weight_bytes(model, plan)              # one layer's gathered weights
        shards = plan.zero_shards
        # hybrid sharding: gathers and reduce-scatters in the shard group, an all-reduce across replicas
        self.shard_group = "dp_shard" if plan.dp_shard else "dp"
        # DeepSpeed 0.3's ZeRO-3: a rank gathers (and reduce-scatters) about a layer's full bytes at the
        # framework's measured per-GPU rate, gradients in line, and the recomputation gathers again
        self.zero3_rate = framework_rate("deepspeed-0.3", "zero3_bytes_per_s") \
            if self.zero3 and plan.zero3_impl == "deepspeed-0.3" else None
        self.param_gather = Collective("all_gather", self.shard_group, self.layer_weight_bytes,
                                       floor_s=self._floor(self.layer_weight_bytes)) if shards > 1 else None
        # ZeRO-Infinity: the rank's shard of the layer comes from CPU memory first
        self.param_fetch = Collective(H2D, HOST_GROUP, self.layer_weight_bytes / shards) \
            if plan.offload_params else None
        self.grad_ops: list[int] = []
        self.bucketing = False         # per-layer backward ops (the last microbatch's, for gradient buckets)

    # ---- pieces -------------------------------------------------------------------------------
    def kept_bytes(self, layers: int, recomputed: int) -> float:
        """Activations of ``layers`` layers of one microbatch, ``recomputed`` of them recomputed."""
        return self.layer_act * recomputed + self.layer_act_kept * (layers - recomputed)

    def _floor(self, size_bytes: float) -> float:
        """Least time of a ZeRO-3 weight or gradient collective when the framework sets the rate."""
        return size_bytes / self.zero3_rate if self.zero3_rate else 0.0

    def cp_split(self, kernels: tuple[Kernel, ...]) -> tuple[tuple[Kernel, ...], tuple[Kernel, ...], tuple[Kernel, ...]]:
        """A layer's forward (or recomputation) kernels before, in and after the attention core (one
        shared tuple each)."""
        if id(kernels) not in self._cp_split:
            k = self.k
            attn, n_core = kernels.index(k.attention_core[0]), len(k.attention_core)
            self._cp_split[id(kernels)] = (kernels[:attn], kernels[attn:attn + n_core], kernels[attn + n_core:])
        return self._cp_split[id(kernels)]

    def repeated(self, kernels: tuple[Kernel, ...], n: int) -> tuple[Kernel, ...]:
        """``kernels`` n times, as one shared tuple (op durations are cached per tuple)."""
        key = (id(kernels), n)
        if key not in self._repeats:
            self._repeats[key] = (kernels, kernels * n)
        return self._repeats[key][1]

    @staticmethod
    def _in_line(prog: Program, name: str, dep: int, comms: tuple[Collective, ...], layers: int) -> int:
        """``comms`` (each ``layers`` times) one after the other on the tp stream after op ``dep``."""
        for c in comms:
            col = Collective(c.kind, c.group, c.size_bytes, c.count * layers)
            dep = prog.add("tp", f"{name}.{c.kind}", "comm", (dep,), collective=col)
        return dep

    @staticmethod
    def _beside(prog: Program, name: str, start: Op, cols: list[Collective], suffix: str) -> int:
        """``cols`` one after the other on the tp stream, the first starting with the pass whose first
        compute op is ``start`` (its dependencies and wait), so beside its kernels; the last one's op."""
        deps, wait = start.deps, start.wait
        for col in cols:
            op = prog.add("tp", f"{name}.{col.kind}.{suffix}", "comm", deps, collective=col, wait=wait)
            deps, wait = (op,), None
        return op

    def tp_ops(self, prog: Program, name: str, dep: int, layers: int = 1, first: int | None = None) -> int:
        """The TP collectives of the pass whose (last) compute op is ``dep``: after it, on the critical
        path; with TP-comm overlap beside it from the start of its first op ``first``, with only the
        last split of the forward's pipelined reduce-scatters after it (:data:`TP_OVERLAP_SPLITS`); in a
        backward with asynchronous gradient collectives (``tp_backward_overlap``) the column-parallel
        layers' beside it and the row-parallel layers' gradient all-gathers (SP) after it. An
        early-stopped recomputation has one reduction less per layer. Returns the op the next compute
        waits for."""
        if not self.tp_comm:
            return dep
        phase = prog.ops[dep].phase
        comms = self.tp_comm_recompute if phase == "recompute" else self.tp_comm
        userbuffers = self.plan.tp_comm_overlap and self.plan.sequence_parallel
        start = prog.ops[dep if first is None else first]
        if not userbuffers and phase == "backward" and self.tp_comm_bwd_beside:
            beside = self._beside(prog, name, start, [Collective(c.kind, c.group, c.size_bytes, c.count * layers)
                                                      for c in self.tp_comm_bwd_beside], "async")
            if not self.tp_comm_bwd_inline:
                return prog.add("tp", f"{name}.tp_join", "comm", (dep, beside))
            # on the tp stream after (so also waiting for) the ones beside
            return self._in_line(prog, name, dep, self.tp_comm_bwd_inline, layers)
        if not userbuffers:
            return self._in_line(prog, name, dep, comms, layers)
        tail = 1.0 / TP_OVERLAP_SPLITS if start.phase != "backward" else 0.0
        beside = self._beside(prog, name, start, [
            Collective(c.kind, c.group, c.size_bytes * (1.0 - tail if c.kind == "reduce_scatter" else 1.0),
                       c.count * layers, transport="userbuffers") for c in comms], "overlap")
        rs = comms[-1]
        col = Collective(rs.kind, rs.group, rs.size_bytes * tail, rs.count * layers, transport="userbuffers") \
            if tail else None
        return prog.add("tp", f"{name}.tp_tail", "comm", (dep, beside), collective=col)

    def gather(self, prog: Program, name: str, dep) -> int | None:
        """ZeRO-3 / FSDP: all-gather one layer's 16-bit weights before it runs, prefetched one layer
        ahead (the caller makes the gather of layer l wait for the compute of layer l - 2 only, so it
        overlaps layer l - 1 and at most two layers are gathered at a time). Gathers have their own
        stream, as FSDP's all-gather stream, so they do not queue behind gradient reduce-scatters."""
        if not self.zero3:
            return None
        alloc = (("weights", self.layer_weight_bytes),)
        if self.param_fetch is not None:
            dep = prog.add("gather", name + ".fetch", "comm", (dep,), collective=self.param_fetch, alloc=alloc)
            alloc = ()
        if self.param_gather is None:
            return dep
        return prog.add("gather", name + ".gather", "comm", (dep,), collective=self.param_gather, alloc=alloc)

    def forward(self, prog: Program, name: str, phase: str, dep, layers: int, wait=None, alloc=(),
                after: int | None = None) -> int:
        """Forward (or full recompute) of ``layers`` layers: one op for all of them, or one per layer
        with context parallelism (its K/V exchange overlaps each layer's attention core) or ZeRO-3
        (each layer's weights are gathered first). ``after``: one more op the first layer waits for."""
        kernels = self.k.recompute_forward if phase == "recompute" else self.k.forward
        if layers == 0:   # a chunk with only the embedding or only the output layer (Llama 3's pipeline)
            return prog.add("compute", name, phase, (dep, after), kernels=(), wait=wait, alloc=alloc)
        if self.cp_comm is None and not self.zero3:
            op = prog.add("compute", name, phase, (dep, after), kernels=self.repeated(kernels, layers), wait=wait,
                          alloc=alloc)
            return self.tp_ops(prog, name, op, layers)
        issued = [dep, dep]            # compute ops of the layers run so far (gather prefetch distance)
        # gathered weights are released after the layer's forward (the backward gathers them again);
        # a recomputation runs on the weights its backward gathered (DeepSpeed 0.3: on its own gather)
        free = (("weights", self.layer_weight_bytes),) if self.zero3 and (phase != "recompute" or self.zero3_rate) \
            else ()
        for layer in range(layers):
            lname = f"{name}.L{layer}"
            gathered = self.gather(prog, lname, issued[-2]) if after is None else after
            after = None
            if self.cp_comm is None:
                op = prog.add("compute", lname, phase, (dep, gathered), kernels=kernels, wait=wait,
                              alloc=alloc, free=free)
                issued.append(op)
            else:
                pre_k, core_k, post_k = self.cp_split(kernels)
                pre = prog.add("compute", lname + ".pre", phase, (dep, gathered), kernels=pre_k,
                               wait=wait, alloc=alloc)
                issued.append(pre)
                kv = prog.add("cp", lname + ".kv", "comm", (pre,), collective=self.cp_comm)
                core = prog.add("compute", lname + ".attn", phase, (pre,), kernels=core_k)
                op = prog.add("compute", lname + ".post", phase, (core, kv), kernels=post_k, free=free)
            dep, wait, alloc = self.tp_ops(prog, lname, op, first=issued[-1]), None, ()
        return dep

    def backward(self, prog: Program, name: str, dep, layers: int, wait=None) -> tuple[int, list[int]]:
        """Recompute (if any) and backward of ``layers`` layers, freeing their activations. Returns the
        last op and the backward compute ops, one per layer when gradients are bucketed or reduced per
        layer (the last microbatch with DDP buckets, every microbatch with ZeRO-3) or with CP."""
        k, plan = self.k, self.plan
        if layers == 0:
            return prog.add("compute", name, "backward", (dep,), kernels=(), wait=wait), []
        per_layer = self.cp_comm is not None or self.bucketing or self.zero3
        n = 1 if per_layer else layers
        again = plan.recomputed_layers(layers)     # the chunk's first layers (Megatron's block method)
        ops: list[int] = []
        computes: list[int] = []       # recompute and backward ops in order (gather prefetch distance)
        regather = self.zero3_rate is not None and plan.recompute == "full"
        ahead = None                   # DeepSpeed 0.3: the next recomputation's gather, issued ahead
        start = dep
        for i in range(layers if per_layer else 1):
            lname = f"{name}.L{layers - 1 - i}" if per_layer else name     # the last layer first
            rname = lname.replace("B.", "R.", 1)                             # its recomputation
            r = (1 if layers - 1 - i < again else 0) if per_layer else again  # of the n layers, recomputed
            # recomputation rebuilds one layer at a time, even when n layers share an op
            ws = self.recompute_ws if r else 0.0
            alloc = (("activations", ws),) if ws else ()
            if regather:
                # DeepSpeed 0.3: the recomputation's forward hooks gather (and release) the weights, one
                # module prefetched as in the forward pass; the backward then gathers them again
                if ahead is None:   # the first layer: nothing ran before it to prefetch behind
                    ahead = self.gather(prog, rname, start)
                dep = self.forward(prog, rname, "recompute", dep, n, wait=wait, alloc=alloc, after=ahead)
                computes.append(dep)
                wait, alloc, ahead = None, (), None
                gathered = self.gather(prog, lname, computes[-2] if len(computes) >= 2 else start)
            else:
                gathered = self.gather(prog, lname, ops[-2] if len(ops) >= 2 else start)
            if plan.recompute == "full" and not regather and r:
                # n = 1 under ZeRO-3: the weights gathered for the backward serve the recomputation
                dep = self.forward(prog, rname, "recompute", dep, r, wait=wait, alloc=alloc, after=gathered)
                wait, alloc = None, ()
            elif plan.recompute != "full" and k.recompute():
                dep = prog.add("compute", rname, "recompute", (dep, gathered),
                               kernels=self.repeated(k.recompute(), n), wait=wait, alloc=alloc)
                wait, alloc = None, ()
            free = (("activations", self.kept_bytes(n, r) + ws),)
            if self.zero3:
                free += (("weights", self.layer_weight_bytes),)
            op = prog.add("compute", lname, "backward", (dep, gathered), kernels=self.repeated(k.backward, n),
                          wait=wait, alloc=alloc, free=free)
            ops.append(op)
            computes.append(op)
            if regather and i + 1 < layers:
                # the prefetch of the next recomputation's weights is issued during this backward, ahead
                # of this layer's gradient reduce-scatter on the same process group
                ahead = self.gather(prog, f"{name}.L{layers - 2 - i}".replace("B.", "R.", 1), computes[-2])
            if self.cp_comm is not None:   # ring attention's backward returns dK, dV to their owners
                self.grad_ops.append(prog.add("cp", lname + ".dkv", "comm", (op,), collective=Collective(
                    "reduce_scatter", "cp", self.cp_comm.size_bytes)))
            wait = None
            dep = self.tp_ops(prog, lname, op, n)
            if self.zero3:   # FSDP reduce-scatters each layer's gradients as soon as they exist
                # DeepSpeed 0.3 reduce-scatters in line (overlap_comm off): after the layer's TP
                # collective, and the next layer waits for it
                grads = self.grad_sync(prog, lname + ".grads", self.layer_params, dep if self.zero3_rate else op)
                self.grad_ops.append(grads)
                if self.zero3_rate and grads is not None:
                    dep = grads
        return dep, ops

    def grad_sync(self, prog: Program, name: str, params: float, dep: int) -> int | None:
        """Reduce ``params`` gradients over the data-parallel group (nothing to do without one)."""
        if self.plan.dp * self.plan.cp == 1:
            return None
        kind = "all_reduce" if self.plan.zero == 0 else "reduce_scatter"
        size = params * self.grad_bytes
        # DeepSpeed 0.3 gathers and reduce-scatters on one process group: one NCCL queue, in issue order
        stream = "gather" if self.zero3_rate else "dp"
        op = prog.add(stream, name, "comm", (dep,), collective=Collective(kind, self.shard_group, size,
                                                                          floor_s=self._floor(size)))
        if self.plan.dp_shard:   # hybrid sharding: the reduced shard is then all-reduced across replicas
            op = prog.add(stream, name + ".replicas", "comm", (op,),
                          collective=Collective("all_reduce", "dp_replica", size / self.plan.zero_shards))
        return op

    def host_copy(self, prog: Program, name: str, kind: str, size_bytes: float, deps) -> int:
        """A copy between the GPU and its host (PCIe), on the ``host`` stream."""
        return prog.add("host", name, "comm", deps, collective=Collective(kind, HOST_GROUP, size_bytes))

    # ---- a stage --------------------------------------------------------------------------------
    def program(self, stage: int) -> Program:
        plan, k = self.plan, self.k
        pp, v, m = plan.pp, plan.virtual_stages, plan.microbatches
        last_chunk = pp * v - 1
        mem = stage_memory(self.model, plan, self.gpu, self.memory_config, stage)
        # ZeRO-3's gathered layers are allocated and freed by the ops that gather and use them
        static_weights = mem.weights - mem.detail.get("weights.zero3_gathered", 0.0)
        prog = Program(stage, static_bytes={"weights": static_weights, "gradients": mem.gradients,
                                            "optimizer": mem.optimizer, "other": mem.other})
        prev = None                    # the last op of the compute chain
        grad_ops = self.grad_ops = []
        bucket = 0.0
        dp_sharded = plan.dp * plan.cp > 1
        shards = plan.zero_shards
        trainable = mem.trainable_params
        if mem.paged_out:   # paged optimizer: the states that do not fit are evicted as activations grow
            prev = self.host_copy(prog, "optimizer.page_out", D2H, mem.paged_out, ())
        for phase, mb, c in stage_schedule(plan.schedule, pp, stage, m, v):
            g = c * pp + stage
            layers = plan.chunk_layers[g]
            tag = f"mb{mb}.c{g}"
            if phase == "F":
                wait = ("act", mb, g) if g > 0 else None
                if g == 0:
                    prev = prog.add("compute", f"F.{tag}.embed", "forward", (prev,), kernels=k.embedding_forward(),
                                    wait=wait, alloc=(("activations", self.embed_act),))
                    wait = None
                prev = self.forward(prog, f"F.{tag}", "forward", prev, layers, wait=wait,
                                    alloc=(("activations", self.kept_bytes(layers, plan.recomputed_layers(layers))),))
                if g == last_chunk:
                    prev = prog.add("compute", f"F.{tag}.logits", "forward", (prev,), kernels=k.logits_forward(),
                                    alloc=(("activations", self.logits_act),))
                else:
                    prog.add("pp", f"send.act.{tag}", "comm", (prev,), peer_stage=(g + 1) % pp,
                             signal=("act", mb, g + 1), collective=Collective("p2p", "pp", self.p2p_bytes))
                continue
            wait = ("grad", mb, g) if g < last_chunk else None
            if g == last_chunk:
                prev = prog.add("compute", f"B.{tag}.logits", "backward", (prev,), kernels=k.logits_backward(),
                                wait=wait, free=(("activations", self.logits_act),))
                wait = None
            self.bucketing = mb == m - 1 and dp_sharded and not self.zero3
            prev, bwd_ops = self.backward(prog, f"B.{tag}", prev, layers, wait=wait)
            wait = None
            if self.bucketing:   # Megatron-LM DDP: a bucket is reduced once all its gradients exist
                for op in bwd_ops:
                    bucket += self.layer_params
                    if bucket >= self.bucket_params:
                        grad_ops.append(self.grad_sync(prog, f"dp.grads.{len(grad_ops)}", bucket, op))
                        bucket = 0.0
            if g == 0:
                prev = prog.add("compute", f"B.{tag}.embed", "backward", (prev,), kernels=k.embedding_backward(),
                                free=(("activations", self.embed_act),))
            else:
                prog.add("pp", f"send.grad.{tag}", "comm", (prev,), peer_stage=(g - 1) % pp,
                         signal=("grad", mb, g - 1), collective=Collective("p2p", "pp", self.p2p_bytes))
            if plan.offload_optimizer and c == 0:   # ZeRO-Offload: this microbatch's gradients to the CPU
                own = trainable / (shards if plan.zero >= 2 else 1)
                grad_ops.append(self.host_copy(prog, f"d2h.grads.mb{mb}", D2H, own * self.grad_bytes, (prev,)))
        if dp_sharded:   # the last bucket: what is left, with the embedding, output layer and final norm
            bucket += trainable - plan.stage_layers(stage) * self.layer_params
            grad_ops.append(self.grad_sync(prog, f"dp.grads.{len(grad_ops)}", bucket, prev))
        shard = shards if plan.zero >= 1 else 1
        if plan.offload_optimizer:
            # the CPU updates the rank's shard, then the 16-bit weights go back (unless they live on the CPU)
            seconds = cpu_step_time_s(trainable / shard, self.ranks_on_host, plan, self.host)
            opt = prog.add("cpu", "optimizer", "optimizer", (prev, *grad_ops), duration_s=seconds)
            if not plan.offload_params:
                opt = self.host_copy(prog, "h2d.params", H2D, trainable / shard * self.weight_bytes, (opt,))
        else:
            deps = (prev, *grad_ops)
            if mem.paged_out:
                deps = (self.host_copy(prog, "optimizer.page_in", H2D, mem.paged_out, deps),)
            opt = prog.add("compute", "optimizer", "optimizer", deps, kernels=optimizer_kernels(trainable / shard, plan))
        if plan.zero in (1, 2) and dp_sharded:   # distributed optimizer: gather the updated 16-bit weights
            prog.add("dp", "dp.params.all_gather", "comm", (opt,),
                     collective=Collective("all_gather", "dp", trainable * self.weight_bytes))
        return prog


def lower(model: ModelSpec, plan: Plan, memory_config, gpu, host=None, ranks_on_host: int = 1,
          stages: Iterable[int] | None = None) -> list[Program]:
    """One program per pipeline stage (or per stage of ``stages``). ``host`` (a
    :class:`~sim.topology.HostSpec`) and the number of ranks sharing it time the CPU optimizer step of
    offloaded plans."""
    if plan.offload_optimizer and host is None:
        raise ValueError("offload_optimizer needs the node's host spec")
    low = _Lowering(model, plan, memory_config, gpu, host, ranks_on_host)
    return [low.program(s) for s in (range(plan.pp) if stages is None else stages)]
