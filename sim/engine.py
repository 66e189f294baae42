"""SimPy replay of one optimizer step: streams per device, collectives as flows on the topology.

Each simulated device runs its stage's :class:`~sim.workload.Program`. Every stream (compute, tp,
cp, dp, pp) is a SimPy process that takes its ops in program order, as a CUDA stream does; an op
starts when its dependencies (other ops of the device) and, for the first layer of a pipeline
pass, the data from the neighbouring stage have arrived. Compute ops take their roofline time,
longer while collectives are in flight on their GPU: each takes SMs and DRAM bandwidth, so kernels
run at 1 / (1 + the summed ``overlap_slowdown`` of efficiency.yaml) of their rate meanwhile (a
collective counts from the moment its GPU reaches it, as NCCL's kernels spin on their SMs while
peers arrive; the breakdown reports that time apart). Collectives become flows on the cluster graph
(:mod:`sim.collectives`) that share link bandwidth (:mod:`sim.network`). The pipeline bubble,
overlap and contention come out of this replay.

Copies between a GPU and its host (offload, paged optimizers) are flows on the PCIe route from the
GPU to its nearest CPU; the CPU optimizer step is an op of fixed duration on the device's ``cpu``
stream.

Symmetry (default): one device per pipeline stage (dp = cp = tp = 0) is simulated; the collectives
of its groups carry the traffic of the symmetric copies that share links with them (``peers``).
``full=True`` simulates every device; collectives then start when all members have reached them.
"""
from __future__ import annotations


import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import simpy

from sim.collectives import plan_collective
from sim.compute import compute_dtype, kernels_time_s, memory_bound_time_s
from sim.efficiency import gpu_efficiency, link_efficiency, overlap_slowdown
from sim.network import Network
from sim.offload import D2H, HOST_GROUP, host_copy_plan
from sim.scenario import Scenario
from sim.workload import Op, Program, lower

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")
BUSIEST_LINKS = 10               # links listed in a result, busiest first


@dataclass(frozen=True, slots=True)
class Span:
    """One executed op: what ran where and when (seconds since the step began)."""

    stream: str
    name: str
    phase: str
    start_s: float
    end_s: float


@dataclass
class DeviceRun:
    """What one simulated device did."""

    stage: int
    coord: tuple[int, int, int, int]          # (dp, pp, cp, tp)
    vertex: str
    spans: list[Span] = field(default_factory=list)
    memory_samples: list[tuple[float, float]] = field(default_factory=list)   # (time s, bytes)
    peak_bytes: float = 0.0
    peak_breakdown: dict[str, float] = field(default_factory=dict)
    breakdown_s: dict[str, float] = field(default_factory=dict)
    memory_bound_s: float = 0.0      # compute-stream kernels bound by DRAM traffic (optimizer excluded)
    slowed_s: dict[int, float] = field(default_factory=dict)   # op index -> time added by collectives beside it
    cpu_optimizer_s: float = 0.0     # the part of breakdown_s["optimizer"] that the CPU runs (offload)


@dataclass
class StepResult:
    """Outcome of the replay."""

    step_time_s: float
    devices: list[DeviceRun]
    link_busy: list[tuple[str, float]]          # busiest directed links: ("u->v", busy fraction)
    ops: int
    network_events: int
    full: bool
    extrapolated_from: tuple[int, int] | None = None   # microbatch counts replayed when extrapolated


def _coord_index(t: int, c: int, d: int, p: int, tp: int, cp: int, dp: int) -> int:
    """Global GPU rank of (tp, cp, dp, pp) ranks: tp innermost, then cp, dp, pp (Megatron-LM order)."""
    return t + tp * (c + cp * (d + dp * p))


class Engine:
    """Replays one step of ``scenario``."""

    def __init__(self, scenario: Scenario, *, full: bool = False, free_communication: bool = False,
                 busiest_links: int | None = BUSIEST_LINKS):
        self.s = scenario
        self.busiest_links = busiest_links     # how many links the result lists (None: every used link)
        self.free_communication = free_communication   # every collective and transfer takes no time
        self.plan = scenario.plan
        self.cluster = scenario.cluster
        self.full = full
        gpu = self.cluster.gpu
        self.dtype = compute_dtype(self.plan.precision)
        self.eff = gpu_efficiency(gpu, self.dtype, kernel_arch=self.plan.kernel_arch,
                                  attention_kernel_arch=self.plan.attention_kernel_arch)
        self.programs: list[Program] = lower(scenario.model, self.plan, scenario.memory, gpu,
                                             host=self.cluster.recipe.host,
                                             ranks_on_host=min(self.plan.gpus, self.cluster.gpus_per_node))
        # how much longer kernels take beside a collective in flight on their GPU, per transport
        self.slowdown = {} if free_communication else {t: overlap_slowdown(t) for t in ("nccl", "userbuffers")}
        self._durations: dict[int, float] = {}
        self._memory_bound: dict[int, float] = {}
        self._groups: dict[tuple, tuple[str, ...]] = {}
        self._peers: dict[tuple, tuple] = {}

    # ---- placement -------------------------------------------------------------------------------
    def vertex(self, t: int, c: int, d: int, p: int) -> str:
        pl = self.plan
        return self.cluster.gpu_vertex(_coord_index(t, c, d, p, pl.tp, pl.cp, pl.dp))

    def group(self, kind: str, t: int, c: int, d: int, p: int) -> tuple[str, ...]:
        """GPU vertices of the ``kind`` process group of rank (t, c, d, p), in ring order (cached)."""
        key = (kind, t, c, d, p)
        if key not in self._groups:
            self._groups[key] = self._group(kind, t, c, d, p)
        return self._groups[key]

    def _group(self, kind: str, t: int, c: int, d: int, p: int) -> tuple[str, ...]:
        pl = self.plan
        if kind == "tp":
            return tuple(self.vertex(x, c, d, p) for x in range(pl.tp))
        if kind == "cp":
            return tuple(self.vertex(t, x, d, p) for x in range(pl.cp))
        if kind == "dp":   # gradients are reduced over dp x cp (Megatron-LM's data-parallel-with-cp group)
            return tuple(self.vertex(t, x, y, p) for y in range(pl.dp) for x in range(pl.cp))
        if kind == "dp_shard":    # hybrid sharding: the dp_shard consecutive dp ranks (x cp) of rank d's group
            first = d - d % pl.dp_shard
            return tuple(self.vertex(t, x, y, p) for y in range(first, first + pl.dp_shard) for x in range(pl.cp))
        if kind == "dp_replica":  # the ranks holding the same shard in every shard group
            return tuple(self.vertex(t, c, y, p) for y in range(d % pl.dp_shard, pl.dp, pl.dp_shard))
        raise ValueError(kind)

    def peers(self, kind: str, p: int) -> tuple[tuple[str, ...], ...]:
        """Symmetric copies of the representative's group that share a node with it."""
        if self.full:
            return ()
        if (kind, p) not in self._peers:
            self._peers[(kind, p)] = self._find_peers(kind, p)
        return self._peers[(kind, p)]

    def _find_peers(self, kind: str, p: int) -> tuple[tuple[str, ...], ...]:
        pl = self.plan
        own = self.group(kind, 0, 0, 0, p)
        nodes = {v.split(".")[0] for v in own}
        if kind == "tp":
            keys = [(0, c, d) for d in range(pl.dp) for c in range(pl.cp)]
        elif kind == "cp":
            keys = [(t, 0, d) for d in range(pl.dp) for t in range(pl.tp)]
        elif kind == "dp_shard":
            keys = [(t, 0, d) for d in range(0, pl.dp, pl.dp_shard) for t in range(pl.tp)]
        elif kind == "dp_replica":
            keys = [(t, c, d) for d in range(pl.dp_shard) for c in range(pl.cp) for t in range(pl.tp)]
        else:
            keys = [(t, 0, 0) for t in range(pl.tp)]
        # only the copies on one of the representative's nodes can share a link with it: find them by
        # rank arithmetic before naming their vertices (16,384 GPUs: 2,048 TP copies per stage)
        per_node = self.cluster.gpus_per_node
        own_nodes = {self._rank(kind, x, 0, 0, 0, p) // per_node for x in range(len(own))}
        copies = [self.group(kind, t, c, d, p) for t, c, d in keys
                  if any(self._rank(kind, x, t, c, d, p) // per_node in own_nodes for x in range(len(own)))]
        own_edges = self._local_pattern(own) if self._rail_aligned(own) else None
        return tuple(g for g in copies if g != own and nodes & {v.split(".")[0] for v in g}
                     and (own_edges is None or own_edges & self._local_pattern(g)))

    def _rank(self, kind: str, x: int, t: int, c: int, d: int, p: int) -> int:
        """Global rank of member ``x`` of the ``kind`` group of rank (t, c, d, p), in :meth:`_group`'s order."""
        pl = self.plan
        if kind == "tp":
            t = x
        elif kind == "cp":
            c = x
        elif kind == "dp_shard":
            y, c = divmod(x, pl.cp)
            d = d - d % pl.dp_shard + y
        elif kind == "dp_replica":
            d = d % pl.dp_shard + x * pl.dp_shard
        else:
            d, c = divmod(x, pl.cp)
        return _coord_index(t, c, d, p, pl.tp, pl.cp, pl.dp)

    def _local_pattern(self, group: tuple[str, ...]) -> set:
        """:meth:`_local_edges` with node names dropped when the pattern repeats in every node (then
        two groups on the same nodes share an edge in one node exactly when they do in all)."""
        edges = self._local_edges(group)
        nodes = {v.partition(".")[0] for v in group}
        if len(nodes) > 1 and len({u.partition(".")[0] for u, _ in edges}) == 1:
            return {(u.partition(".")[2], v.partition(".")[2]) for u, v in edges}
        return edges

    def _rail_aligned(self, group: tuple[str, ...]) -> bool:
        """Whether every hop between nodes stays on one rail (then fabric links are per rail and
        groups on other rails share none of them; a cross-rail hop goes through a shared spine)."""
        rails = self.cluster.recipe.gpu_rails
        ring = list(zip(group, group[1:] + group[:1]))
        return all(a.partition(".")[0] == b.partition(".")[0]
                   or rails[int(a.partition(".")[2][3:])] == rails[int(b.partition(".")[2][3:])]
                   for a, b in ring)

    def _local_edges(self, group: tuple[str, ...]) -> set[tuple[str, str]]:
        """Node-local edges a group's traffic can use: each GPU to and from its NIC, and the routes
        between group members in the same node. Fabric links beyond a NIC are per rail, so groups that
        share none of these edges (and no NIC) cannot share any link. When every node holds the same
        local members, one node's edges stand for all (the pattern repeats): the result is that node's."""
        recipe, out = self.cluster.recipe, set()
        by_node: dict[str, list[str]] = defaultdict(list)
        for a in group:
            node, _, local = a.partition(".")
            by_node[node].append(local)
        patterns = {tuple(m) for m in by_node.values()}
        nodes = list(by_node.items())[:1] if len(patterns) == 1 else by_node.items()
        for node, members in nodes:
            for i, local in enumerate(members):
                rail = recipe.gpu_rails[int(local[3:])]
                ends = ([f"nic{rail}"] if rail is not None else []) + members[i + 1:]
                for end in ends:
                    for x, y in ((local, end), (end, local)):
                        path = recipe.routes.get((x, y), ())
                        out.update((f"{node}.{p}", f"{node}.{q}") for p, q in zip(path, path[1:]))
        return out

    def host_pair(self, vertex: str, kind: str) -> tuple[str, str]:
        """(source, destination) of a copy between GPU ``vertex`` and its nearest CPU."""
        node, _, local = vertex.partition(".")
        cpu = f"{node}.{self.cluster.recipe.gpu_cpus[int(local[3:])]}"
        return (vertex, cpu) if kind == D2H else (cpu, vertex)

    def host_peers(self, p: int, kind: str, own: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """Symmetric mode: the same copy by the other GPUs of stage ``p`` in the representative's node
        (they share PCIe switches and host links with it)."""
        if self.full:
            return ()
        pl, node = self.plan, own[0].partition(".")[0]
        vertices = {self.vertex(t, c, d, p) for d in range(pl.dp) for c in range(pl.cp) for t in range(pl.tp)}
        return tuple(self.host_pair(v, kind) for v in sorted(vertices)
                     if v.partition(".")[0] == node and self.host_pair(v, kind) != own)

    def p2p_peers(self, src_p: int, dst_p: int) -> tuple[tuple[str, str], ...]:
        if self.full:
            return ()
        own = (self.vertex(0, 0, 0, src_p), self.vertex(0, 0, 0, dst_p))
        own_edges = self._local_pattern(own) if self._rail_aligned(own) else None
        out = []
        for t in range(self.plan.tp):
            for c in range(self.plan.cp):
                pair = (self.vertex(t, c, 0, src_p), self.vertex(t, c, 0, dst_p))
                same_node = pair[0].partition(".")[0] == own[0].partition(".")[0]
                if (t, c) != (0, 0) and same_node and (own_edges is None or own_edges & self._local_pattern(pair)):
                    out.append(pair)
        return tuple(out)

    def _fold_remote_nodes(self, plan, sim_nodes: set[str]):
        """Symmetric mode: inside nodes that host no simulated device, a flow's edges repeat the same
        pattern node after node and carry only this flow (its peers are folded into the weights), so
        one such node stands for all: keep the edges of the first, of the simulated devices' nodes and
        of the fabric (shared between flows). The flow's rate, set by its bottleneck, is unchanged."""
        from sim.collectives import Flow
        cache = self.__dict__.setdefault("_folded", {})

        def fold_edges(edges):
            kept, pattern = [], {}
            for edge, w in edges:
                u, v = edge
                nu = u.split(".", 1)[0] if u[0] == "n" else ""
                nv = v.split(".", 1)[0] if v[0] == "n" else ""
                node = nu or nv
                if not node or node in sim_nodes or (nu and nv and nu != nv):
                    kept.append((edge, w))
                    continue
                key = (u[len(nu):] if nu else u[:4], v[len(nv):] if nv else v[:4], w)
                if pattern.setdefault(key, node) == node:
                    kept.append((edge, w))
            return tuple(kept)

        def fold(flow):
            if flow.edges not in cache:
                cache[flow.edges] = fold_edges(flow.edges)
            kept = cache[flow.edges]
            return flow if len(kept) == len(flow.edges) else Flow(flow.volume_bytes, kept, flow.latency_s)
        phases = tuple(tuple(fold(f) for f in phase) for phase in plan.phases)
        return replace(plan, phases=phases)

    # ---- run -------------------------------------------------------------------------------------
    def duration(self, op: Op) -> float:
        key = id(op.kernels)
        if key not in self._durations:
            self._durations[key] = kernels_time_s(op.kernels, self.cluster.gpu, self.eff, self.dtype)
        return self._durations[key]

    def memory_bound(self, op: Op) -> float:
        key = id(op.kernels)
        if key not in self._memory_bound:
            self._memory_bound[key] = memory_bound_time_s(op.kernels, self.cluster.gpu, self.eff, self.dtype)
        return self._memory_bound[key]

    def run(self) -> StepResult:
        env = simpy.Environment()
        net = Network(env, self.cluster.link_attrs, capacity_fraction=lambda u, v, a: link_efficiency(a["kind"]))
        pl = self.plan
        coords = [(d, p, c, t) for p in range(pl.pp) for d in range(pl.dp) for c in range(pl.cp)
                  for t in range(pl.tp)] if self.full else [(0, p, 0, 0) for p in range(pl.pp)]
        members_simulated = {"tp": pl.tp if self.full else 1, "cp": pl.cp if self.full else 1,
                             "dp": pl.dp * pl.cp if self.full else 1, HOST_GROUP: 1,
                             "dp_shard": pl.zero_shards if self.full else 1,
                             "dp_replica": pl.replicas if self.full else 1}
        sim_nodes = {self.vertex(t, c, d, p).partition(".")[0] for d, p, c, t in coords}
        keys: dict[tuple, simpy.Event] = {}
        key_time: dict[tuple, tuple[float, float]] = {}     # key -> (send start, arrival)
        rendezvous: dict[tuple, list] = {}
        plans_cache: dict[tuple, object] = {}
        plans_by_op: dict[tuple, tuple] = {}
        runs: list[DeviceRun] = []
        states: list[dict] = []        # per device: memory peak and the breakdown at it
        ops_count = 0

        def key_event(key: tuple) -> simpy.Event:
            if key not in keys:
                keys[key] = env.event()
            return keys[key]

        def collective_plan(op: Op, dev_coord):
            memo = (op.collective, op.peer_stage, dev_coord)
            if memo not in plans_by_op:
                plan, group = make_plan(op, dev_coord)
                plans_by_op[memo] = (plan.repeated(op.collective.count), group)
            return plans_by_op[memo]

        def make_plan(op: Op, dev_coord):
            d, p, c, t = dev_coord
            col = op.collective
            if col.group == "pp":
                dst = op.peer_stage
                group = (self.vertex(t, c, d, p), self.vertex(t, c, d, dst))
                peers = self.p2p_peers(p, dst)
            elif col.group == HOST_GROUP:
                group = self.host_pair(self.vertex(t, c, d, p), col.kind)
                peers = self.host_peers(p, col.kind, group)
            else:
                group = self.group(col.group, t, c, d, p)
                peers = self.peers(col.group, p)
            cache_key = (col.kind, col.size_bytes, group, peers)
            if cache_key not in plans_cache:
                plan = host_copy_plan(col.size_bytes, group, self.cluster, peers) if col.group == HOST_GROUP \
                    else plan_collective(col.kind, col.size_bytes, group, self.cluster, peers=peers)
                plans_cache[cache_key] = plan if self.full else self._fold_remote_nodes(plan, sim_nodes)
            return plans_cache[cache_key], group

        def run_collective(op: Op, dev_coord):
            if self.free_communication:
                return
            plan, group = collective_plan(op, dev_coord)
            start = env.now
            yield net.run_plan(plan, tag=op.name)
            rest = op.collective.floor_s * op.collective.count - (env.now - start)
            if rest > 0:   # the framework's own rate is the limit (efficiency.yaml `frameworks`)
                yield env.timeout(rest)

        for coord in coords:
            d, p, c, t = coord
            prog = self.programs[p]
            run = DeviceRun(stage=p, coord=coord, vertex=self.vertex(t, c, d, p))
            runs.append(run)
            # an event per op that an op of another stream waits for (a stream runs its ops in order,
            # so a dependency on the same stream is met already)
            awaited = {i for op in prog.ops for i in op.deps if prog.ops[i].stream != op.stream}
            done = [env.event() if i in awaited else None for i in range(len(prog.ops))]
            mem = defaultdict(float, prog.static_bytes)
            state = {"peak": sum(mem.values()), "peak_breakdown": dict(mem)}
            run.memory_samples.append((0.0, state["peak"]))
            by_stream: dict[str, list[Op]] = defaultdict(list)
            for op in prog.ops:
                by_stream[op.stream].append(op)
            dev_id = (d, c, t)
            # the collectives in flight on this GPU: their summed slowdown, and the process running kernels
            # (interrupted when the slowdown changes)
            beside = {"slowdown": 0.0, "running": None}

            def change(items, sign, mem=mem, state=state, run=run):
                for cat, nbytes in items:
                    mem[cat] += sign * nbytes
                total = sum(mem.values())
                run.memory_samples.append((env.now, total))
                if total > state["peak"] + 1e-6:
                    state["peak"] = total
                    state["peak_breakdown"] = dict(mem)

            def comm_in_flight(delta, beside=beside):
                beside["slowdown"] += delta
                if abs(beside["slowdown"]) < 1e-12:
                    beside["slowdown"] = 0.0
                if beside["running"] is not None:      # the kernels in flight re-time their remaining work
                    beside["running"].interrupt()
                    beside["running"] = None

            def run_kernels(op, beside=beside, run=run):
                """Run ``op``'s kernels: at full rate alone, 1 / (1 + slowdown) of it beside collectives
                (a change of the slowdown interrupts the wait; the abandoned timeout stays queued)."""
                base = work = self.duration(op)
                start = env.now
                while True:
                    rate = 1.0 / (1.0 + beside["slowdown"])
                    t0 = env.now
                    beside["running"] = env.active_process
                    try:
                        yield env.timeout(work / rate)
                    except simpy.Interrupt:
                        work = max(0.0, work - (env.now - t0) * rate)
                        continue
                    beside["running"] = None
                    break
                if env.now - start > base * (1 + 1e-12):
                    run.slowed_s[op.index] = env.now - start - base

            def stream(ops, coord=coord, done=done, run=run, dev_id=dev_id, change=change,
                       run_kernels=run_kernels, comm_in_flight=comm_in_flight):
                for op in ops:
                    # only the events not yet processed: waiting on done ones costs SimPy events for nothing
                    waits = [ev for ev in (done[i] for i in op.deps) if ev is not None and not ev.processed]
                    if op.wait is not None:
                        ev = key_event((dev_id, *op.wait))
                        if not ev.processed:
                            waits.append(ev)
                    if len(waits) == 1:
                        yield waits[0]
                    elif waits:
                        yield env.all_of(waits)
                    start = env.now
                    if op.alloc:
                        change(op.alloc, +1)
                    col = op.collective
                    slowdown = self.slowdown.get(col.transport, 0.0) if col is not None and col.group != HOST_GROUP \
                        else 0.0
                    if slowdown:
                        comm_in_flight(+slowdown)
                    if op.kernels:
                        if self.slowdown:
                            yield from run_kernels(op)
                        else:
                            yield env.timeout(self.duration(op))
                    elif op.duration_s is not None:
                        yield env.timeout(op.duration_s)
                    elif op.collective is not None and op.collective.group == "pp":
                        yield from run_collective(op, coord)
                        key = (dev_id, *op.signal)
                        key_time[key] = (start, env.now)
                        key_event(key).succeed()
                    elif op.collective is not None:
                        need = members_simulated[op.collective.group]
                        if need <= 1:
                            yield from run_collective(op, coord)
                        else:
                            _, group = collective_plan(op, coord)
                            rv = rendezvous.setdefault((group, op.name), [0, env.event()])
                            rv[0] += 1
                            if rv[0] == need:
                                def launch(op=op, coord=coord, ev=rv[1]):
                                    yield from run_collective(op, coord)
                                    ev.succeed()
                                env.process(launch())
                            yield rv[1]
                    if slowdown:
                        comm_in_flight(-slowdown)
                    if op.free:
                        change(op.free, -1)
                    run.spans.append(Span(op.stream, op.name, op.phase, start, env.now))
                    if done[op.index] is not None:
                        done[op.index].succeed()
            for name in sorted(by_stream):
                env.process(stream(by_stream[name]))
            ops_count += len(prog.ops)
            states.append(state)

        env.run()
        # the end of the last op (not env.now: a kernel run that a collective slowed leaves its first,
        # unslowed finish time behind in the event queue)
        step = max((x.end_s for run in runs for x in run.spans), default=0.0)
        for run, state in zip(runs, states):
            run.peak_bytes = state["peak"]
            run.peak_breakdown = state["peak_breakdown"]
            run.breakdown_s, run.cpu_optimizer_s = self._breakdown(run, step, key_time)
            run.memory_bound_s = sum(self.memory_bound(op) for op in self.programs[run.stage].ops
                                     if op.stream == "compute" and op.phase != "optimizer" and op.kernels)
        busy = net.top_links(step, self.busiest_links) if step > 0 else []
        link_busy = [(f"{u}->{v}", frac) for (u, v), frac in busy]
        return StepResult(step_time_s=step, devices=runs, link_busy=link_busy, ops=ops_count,
                          network_events=getattr(net, "events", 0), full=self.full)

    # ---- where the time went ------------------------------------------------------------------------
    def _breakdown(self, run: DeviceRun, step: float, key_time) -> tuple[dict[str, float], float]:
        """Split the step on this device's compute stream into named parts that add up to the step;
        and the CPU's share of the optimizer part (offload)."""
        prog = self.programs[run.stage]
        ends = {}
        spans = {s.name: s for s in run.spans}
        for op in prog.ops:
            ends[op.index] = spans[op.name].end_s
        out = dict.fromkeys(("compute", "overlap_slowdown", "exposed_comm", "bubble", "optimizer", "other"), 0.0)
        prev_end = 0.0
        d, p, c, t = run.coord
        for op in prog.ops:
            if op.stream != "compute":
                continue
            span = spans[op.name]
            gap = span.start_s - prev_end
            if gap > 0:
                dep_ready = max((ends[i] for i in op.deps), default=0.0)
                wait_ready, send_start = 0.0, 0.0
                if op.wait is not None:
                    send_start, wait_ready = key_time.get(((d, c, t), *op.wait), (0.0, 0.0))
                if wait_ready >= dep_ready and op.wait is not None:
                    comm = max(0.0, span.start_s - max(prev_end, send_start))
                    out["exposed_comm"] += comm
                    out["bubble"] += gap - comm
                else:
                    last = max(op.deps, key=lambda i: ends[i]) if op.deps else None
                    kind = prog.ops[last].stream if last is not None else "compute"
                    out["optimizer" if kind == "cpu" else "exposed_comm" if kind != "compute" else "other"] += gap
            slowed = run.slowed_s.get(op.index, 0.0)
            out["optimizer" if op.phase == "optimizer" else "compute"] += span.end_s - span.start_s - slowed
            out["overlap_slowdown"] += slowed
            prev_end = span.end_s
        last_activity = max((s.end_s for s in run.spans), default=0.0)
        # after the last GPU kernel: the CPU optimizer step (offload) and copies / collectives
        tail = max(0.0, last_activity - prev_end)
        cpu = sum(max(0.0, s.end_s - max(s.start_s, prev_end)) for s in run.spans if s.stream == "cpu")
        cpu_part = min(cpu, tail)
        out["optimizer"] += cpu_part
        out["exposed_comm"] += tail - cpu_part
        out["bubble"] += max(0.0, step - max(last_activity, prev_end))
        assert math.isclose(sum(out.values()), step, rel_tol=1e-9, abs_tol=1e-12), (out, step)
        return out, cpu_part


FULL_MODE_MAX_GPUS = 4096
STEADY_STATE_SHALLOW_PP = 16     # pipelines up to this depth reach their steady state within 2 pp microbatches


def symmetric_layout(scenario: Scenario) -> bool:
    """Whether every copy of a stage's groups sits on the nodes the same way, so that one device per
    stage stands for all: the TP x CP block and the whole stage each fill nodes evenly (a divisor or
    a multiple of the GPUs per node)."""
    pl, per_node = scenario.plan, scenario.cluster.gpus_per_node

    def even(n: int) -> bool:
        return per_node % n == 0 or n % per_node == 0
    return even(pl.tp) and even(pl.tp * pl.cp) and even(pl.tp * pl.cp * pl.dp)


def simulate(scenario: Scenario, *, full: bool | None = None, free_communication: bool = False,
             extrapolate: bool = False) -> StepResult:
    """Replay one step of ``scenario`` (optionally with communication made free, for what-ifs).

    ``full=None`` picks the mode: one device per stage when the layout is symmetric, every device
    otherwise (when the cluster is small enough to do so). ``extrapolate=True`` (sweeps) replays the
    step with two small microbatch counts and extrapolates to the plan's count (see
    :func:`extrapolation_points`); the spans and memory samples are then those of the larger replay."""
    if full is None:
        full = not symmetric_layout(scenario) and scenario.plan.gpus <= FULL_MODE_MAX_GPUS
    points = extrapolation_points(scenario.plan) if extrapolate else None
    if points is None:
        return Engine(scenario, full=full, free_communication=free_communication).run()
    m1, m2 = points
    # every used link of both replays: a link's busy time is affine in m, its rank among the links is not
    r1, r2 = (Engine(with_microbatches(scenario, m), full=full, free_communication=free_communication,
                     busiest_links=None).run() for m in points)
    return _extrapolated(r1, r2, m1, m2, scenario.plan.microbatches)


def extrapolation_points(plan) -> tuple[int, int] | None:
    """Two microbatch counts whose replays determine the step of ``plan`` by linear extrapolation, or
    None when the plan has too few microbatches for that to save time.

    In the steady state of a pipeline schedule one more microbatch adds the same work to every
    stream, so the step, its breakdown and the links' busy time are affine in m (warm-up, cool-down,
    the data-parallel reduction of the last backward and the optimizer do not depend on m). The
    steady state sets in only once the slowest stage paces the others, which takes a few pipeline
    lengths on deep pipelines. From m1 = 2 pp up to 16 stages (replays of 8B and 70B Llama plans on
    2-16 stages, 1F1B, interleaved and GPipe: within 1e-6 of the full replay), 4 pp beyond (70B on 32
    stages: the slope moves by 0.6% between 2-3 pp and 3-4 pp, and is stable after; on 64 stages it
    settles only past 4 pp); m2 = m1 + 1 for GPipe and 1F1B up to 16 stages, m1 + pp beyond and for
    the interleaved schedule (whose period is a round of pp microbatches, and which needs multiples of
    pp; on 32 stages a one-microbatch slope at 4 pp is still 0.2% off); 2 and 3 without a pipeline.
    Used when m >= m1 + m2 (cheaper than one replay of m); tests/test_engine.py checks it.
    """
    p, m = plan.pp, plan.microbatches
    k = 2 if p <= STEADY_STATE_SHALLOW_PP else 4
    if p == 1:
        m1, m2 = 2, 3
    elif plan.schedule == "interleaved" or p > STEADY_STATE_SHALLOW_PP:   # period: a round of pp microbatches
        m1, m2 = k * p, (k + 1) * p
    else:                                         # GPipe / 1F1B: one microbatch per period
        m1, m2 = k * p, k * p + 1
    return (m1, m2) if m >= m1 + m2 else None      # two replays of m1 + m2 microbatches instead of m


def with_microbatches(scenario: Scenario, microbatches: int) -> Scenario:
    """``scenario`` with the global batch changed so that each DP rank runs ``microbatches``."""
    plan = scenario.plan
    batch = microbatches * plan.dp * plan.micro_batch_size
    return replace(scenario, plan=replace(plan, global_batch_size=batch),
                               training=scenario.training.model_copy(update={"global_batch_size": batch}))


def _extrapolated(r1: StepResult, r2: StepResult, m1: int, m2: int, m: int) -> StepResult:
    """The step of m microbatches from the replays of m1 < m2 (every figure affine in m)."""
    k = (m - m2) / (m2 - m1)

    def ext(a: float, b: float) -> float:
        return b + k * (b - a)
    step = ext(r1.step_time_s, r2.step_time_s)
    devices = []
    for a, b in zip(r1.devices, r2.devices):
        assert a.vertex == b.vertex
        devices.append(replace(b, breakdown_s={key: max(0.0, ext(a.breakdown_s[key], v))
                                                         for key, v in b.breakdown_s.items()},
                               memory_bound_s=ext(a.memory_bound_s, b.memory_bound_s),
                               cpu_optimizer_s=ext(a.cpu_optimizer_s, b.cpu_optimizer_s)))
    busy1 = {name: f * r1.step_time_s for name, f in r1.link_busy}
    busy = sorted(((name, ext(busy1.get(name, 0.0), f * r2.step_time_s) / step) for name, f in r2.link_busy),
                  key=lambda kv: (-kv[1], kv[0]))[:BUSIEST_LINKS]
    return StepResult(step_time_s=step, devices=devices, link_busy=busy, ops=round(ext(r1.ops, r2.ops)),
                      network_events=round(ext(r1.network_events, r2.network_events)), full=r2.full,
                      extrapolated_from=(m1, m2))
