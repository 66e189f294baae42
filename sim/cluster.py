"""Clusters: ``nodes`` copies of a node recipe on a rail-optimized leaf/spine(/core) fabric.

The nodes' NICs join a DGX SuperPOD-style fabric [hardware.md 4.1, S14e]: the nodes form groups of
``nodes_per_leaf_group`` (32, one scalable unit); NIC rail ``r`` of every node of group ``g``
connects to leaf ``leaf{g}.r{r}``; every leaf connects to every spine of its pod. Optionally
``pod_nodes`` splits the nodes into pods with their own spines, joined by core switches with
``core_oversubscription`` (Meta's Llama 3 clusters: 3,072-GPU pods at full bisection, 1:7 above
them [hardware.md 4.2, S18]).

Graph: every link is two directed edges with ``bandwidth_bytes_per_s`` (per direction),
``latency_s``, ``kind`` and ``link`` (catalog key). Vertices carry ``kind`` (gpu | nvswitch |
pcie_switch | nic | cpu | leaf | spine | core), ``node`` (None in the fabric), ``index`` (local
index) and ``rail`` (NICs, leaves, and GPUs: the rail of the GPU's NIC); fabric vertices ``pod``.
Names: ``n3.gpu5``, ``n3.nvswitch``, ``n3.pcie2``, ``n3.nic5``, ``n3.cpu1``, ``leaf0.r5``,
``spine7``, ``core2``. GPU ranks are node-major: rank = node * gpus_per_node + local index.
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import networkx as nx
from pydantic import Field

from sim.errors import ScenarioError
from sim.hardware import GPUSpec, LinkSpec, get_gpu
from sim.schema import Section, validate_section
from sim.topology import NodeRecipe, load_node_recipe

NODES_PER_LEAF_GROUP = 32
"""DGX SuperPOD scalable unit: 32 rail-aligned nodes, one leaf per rail [S14e, S14g]."""


class _ClusterEntry(Section):
    topology: Any                               # recipe name, path to a .yaml, or inline recipe mapping
    gpu: Any = None                             # replaces the recipe's GPU (catalog name or mapping)
    nodes: int = Field(1, ge=1, strict=True)
    gpus: int | None = Field(None, ge=1, strict=True)   # GPUs the job uses, when fewer than nodes x per node
    nodes_per_leaf_group: int = Field(NODES_PER_LEAF_GROUP, ge=1, strict=True)
    oversubscription: float = Field(1.0, ge=1, strict=True)
    pod_nodes: int | None = Field(None, ge=1, strict=True)
    core_oversubscription: float = Field(1.0, ge=1, strict=True)
    price_per_gpu_hour: float | None = Field(None, ge=0, strict=True)


# ---------------------------------------------------------------------------------------------
# Clusters

class Fabric(NamedTuple):
    """Switch counts and per-edge capacities of a cluster's fabric (see :class:`Cluster`)."""
    groups: int                 # leaf groups (scalable units)
    group_nodes: int            # nodes per group that the leaves are cabled for
    pods: int                   # 1 = two tiers
    groups_per_pod: int
    spines_per_pod: int         # 0 when one leaf serves everything
    cores: int                  # 0 without pods
    leaf_spine_bytes_per_s: tuple[float, ...]   # per rail: one leaf -> one spine edge
    spine_core_bytes_per_s: float


def _edge_attrs(spec: LinkSpec, bandwidth: float | None = None) -> dict:
    """Attributes of one directed edge of ``spec`` (``bandwidth`` overrides its rate, for uplinks)."""
    return {"bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s if bandwidth is None else bandwidth,
            "latency_s": spec.latency_s, "kind": spec.kind, "link": spec.key}


def _ratio(x: float) -> str:
    return f"{x:g}:1"


@dataclass(frozen=True, eq=False)
class Cluster:
    """``nodes`` copies of ``recipe`` on a rail-optimized leaf/spine(/core) fabric.

    Leaf uplink capacity = the leaf's downlink capacity / ``oversubscription``, spread evenly over
    the spines of its pod; a partial last group or pod is cabled like a full one. Spines per pod =
    half the pod's leaves (DGX H100 SuperPOD: 8 leaves -> 4 spines, 32 -> 16 [S14e]) but no more than
    a leaf has uplink ports (one per node of its group / oversubscription), so that no leaf -> spine
    edge is slower than a NIC. Core switches: half the spines, capped the same way.
    """

    recipe: NodeRecipe
    nodes: int = 1
    nodes_per_leaf_group: int = NODES_PER_LEAF_GROUP
    oversubscription: float = 1.0               # leaf downlink : uplink (1.0 = non-blocking)
    pod_nodes: int | None = None                # nodes per pod with full bisection; None = two tiers
    core_oversubscription: float = 1.0          # spine downlink : uplink to the core (with pod_nodes)
    price_per_gpu_hour: float | None = None     # currency units per GPU-hour, for cost reports
    gpus: int | None = None                     # GPUs the job uses (the first ranks); None = all of them
    _routes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> ScenarioError:
            return ScenarioError(message, key=f"cluster.{key}")
        if self.nodes < 1:
            raise bad("nodes", f"expected at least 1 node, got {self.nodes}")
        if self.nodes > 1 and self.recipe.num_rails == 0:
            raise bad("nodes", f"topology {self.recipe.name!r} has no NIC, so it runs on 1 node only, got {self.nodes}")
        if self.nodes_per_leaf_group < 1:
            raise bad("nodes_per_leaf_group", f"expected at least 1, got {self.nodes_per_leaf_group}")
        if self.oversubscription < 1 or self.core_oversubscription < 1:
            raise bad("oversubscription", "oversubscription ratios must be >= 1")
        if self.pod_nodes is not None and (self.pod_nodes < 1 or self.pod_nodes % self.nodes_per_leaf_group):
            raise bad("pod_nodes", f"pod_nodes ({self.pod_nodes}) must be a multiple of "
                                   f"nodes_per_leaf_group ({self.nodes_per_leaf_group})")
        total = self.nodes * self.recipe.gpus_per_node
        if self.gpus is not None and not (total - self.recipe.gpus_per_node < self.gpus <= total):
            raise bad("gpus", f"expected between {total - self.recipe.gpus_per_node + 1} and {total} GPUs for "
                              f"{self.nodes} node(s) of {self.recipe.gpus_per_node}, got {self.gpus}")
        if self.core_oversubscription != 1 and self.pod_nodes is None:
            raise bad("core_oversubscription", "core_oversubscription needs pod_nodes")

    @property
    def gpu(self) -> GPUSpec:
        """The GPU type of every node."""
        return self.recipe.gpu

    @property
    def gpus_per_node(self) -> int:
        """GPUs in one node."""
        return self.recipe.gpus_per_node

    @property
    def num_gpus(self) -> int:
        """GPUs the job runs on: all of the cluster's, or the first ``gpus`` of them."""
        return self.gpus if self.gpus is not None else self.nodes * self.recipe.gpus_per_node

    def gpu_vertices(self) -> list[str]:
        """GPU vertex names in global rank order (node-major)."""
        return [f"n{n}.gpu{i}" for n in range(self.nodes) for i in range(self.gpus_per_node)]

    def gpu_vertex(self, rank: int) -> str:
        """Vertex name of global GPU ``rank``."""
        return f"n{rank // self.gpus_per_node}.gpu{rank % self.gpus_per_node}"

    @functools.cached_property
    def fabric(self) -> Fabric | None:
        """Sizes of the switch fabric (no graph needed); None for a single node."""
        if self.nodes == 1:
            return None
        rails, npg = self.recipe.num_rails, self.nodes_per_leaf_group
        group_nodes, groups = min(npg, self.nodes), math.ceil(self.nodes / npg)
        pods = math.ceil(self.nodes / self.pod_nodes) if self.pod_nodes else 1
        groups_per_pod = self.pod_nodes // npg if pods > 1 else groups
        leaf_up = [group_nodes * spec.bandwidth_bytes_per_s / self.oversubscription for spec in self.recipe.nic_links]
        spines = 0
        if pods > 1 or groups * rails > 1:
            spines = max(1, min(math.ceil(groups_per_pod * rails / 2), math.floor(group_nodes / self.oversubscription)))
        cores, spine_core = 0, 0.0
        if pods > 1:
            spine_up = groups_per_pod * sum(leaf_up) / spines / self.core_oversubscription
            fastest_nic = max(spec.bandwidth_bytes_per_s for spec in self.recipe.nic_links)
            cores = max(1, min(math.ceil(pods * spines / 2), math.floor(spine_up / fastest_nic)))
            spine_core = spine_up / cores
        return Fabric(groups, group_nodes, pods, groups_per_pod, spines, cores,
                       tuple(u / spines if spines else 0.0 for u in leaf_up), spine_core)

    def describe(self) -> str:
        """One line, e.g. ``2048 x dgx-h100 = 16384 x NVIDIA H100 SXM5 80GB; rail-optimized leaf/spine, 1:1``."""
        head = f"{self.nodes} x {self.recipe.name} = {self.nodes * self.gpus_per_node} x {self.gpu.name}"
        if self.num_gpus != self.nodes * self.gpus_per_node:
            head += f" ({self.num_gpus} used)"
        f = self.fabric
        if f is None:
            return f"{head}; single node ({self.recipe.scale_up})"
        if f.spines_per_pod == 0:
            return f"{head}; one leaf switch"
        line = f"{head}; rail-optimized leaf/spine, {_ratio(self.oversubscription)}"
        if f.pods > 1:
            line += f"; {f.pods} pods of {self.pod_nodes} nodes, core {_ratio(self.core_oversubscription)}"
        return line

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """The whole cluster as a directed graph (built on first use, then cached)."""
        r, f = self.recipe, self.fabric
        vertices, edges = [], []

        attrs = _edge_attrs

        def link(a: str, b: str, data: dict) -> None:
            edges.append((a, b, data))
            edges.append((b, a, data))

        node_links = [(a, b, attrs(spec)) for a, b, spec in r.links]
        for n in range(self.nodes):
            p = f"n{n}."
            vertices.extend((p + v.name, {"kind": v.kind, "node": n, "index": v.index, "rail": v.rail})
                            for v in r.vertices)
            for a, b, data in node_links:
                link(p + a, p + b, data)
        if f is not None:
            for g in range(f.groups):
                pod = g // f.groups_per_pod
                for rail, spec in enumerate(r.nic_links):
                    leaf = f"leaf{g}.r{rail}"
                    vertices.append((leaf, {"kind": "leaf", "node": None, "index": g, "rail": rail, "pod": pod}))
                    nic_attrs = attrs(spec)
                    for n in range(g * self.nodes_per_leaf_group, min((g + 1) * self.nodes_per_leaf_group, self.nodes)):
                        link(f"n{n}.nic{rail}", leaf, nic_attrs)
                    up = attrs(spec, f.leaf_spine_bytes_per_s[rail])
                    for k in range(pod * f.spines_per_pod, (pod + 1) * f.spines_per_pod):
                        link(leaf, f"spine{k}", up)
            core_attrs = attrs(r.nic_links[0], f.spine_core_bytes_per_s)
            for k in range(f.pods * f.spines_per_pod if f.spines_per_pod else 0):
                vertices.append((f"spine{k}", {"kind": "spine", "node": None, "index": k, "rail": None,
                                               "pod": k // f.spines_per_pod}))
                for c in range(f.cores):
                    link(f"spine{k}", f"core{c}", core_attrs)
            vertices.extend((f"core{c}", {"kind": "core", "node": None, "index": c, "rail": None, "pod": None})
                            for c in range(f.cores))
        graph = nx.DiGraph()
        graph.add_nodes_from(vertices)
        graph.add_edges_from(edges)
        return graph

    @functools.cached_property
    def _local_links(self) -> dict[tuple[str, str], LinkSpec]:
        out = {}
        for a, b, spec in self.recipe.links:
            out[(a, b)] = out[(b, a)] = spec
        return out

    def link_attrs(self, u: str, v: str) -> dict:
        """Attributes of the directed edge u -> v, as in :attr:`graph`, without building the graph
        (the engine needs only the edges its flows use). Do not modify the returned mapping."""
        cache = self.__dict__.setdefault("_attrs_cache", {})

        def attrs(spec: LinkSpec, bandwidth: float | None = None) -> dict:
            key = (spec.key, spec.bandwidth_bytes_per_s, spec.latency_s, spec.kind, bandwidth)
            if key not in cache:
                cache[key] = _edge_attrs(spec, bandwidth)
            return cache[key]
        nu, _, lu = u.partition(".") if u.startswith("n") else ("", "", u)
        nv, _, lv = v.partition(".") if v.startswith("n") else ("", "", v)
        if nu and nv:
            if nu != nv or (lu, lv) not in self._local_links:
                raise KeyError((u, v))
            return attrs(self._local_links[(lu, lv)])
        f = self.fabric
        if f is None:
            raise KeyError((u, v))
        a, b = (lu, v) if nu else (lv, u)          # a: node-local end (if any), b: fabric end
        if nu or nv:                               # NIC <-> leaf
            if not (a.startswith("nic") and b.startswith("leaf")):
                raise KeyError((u, v))
            return attrs(self.recipe.nic_links[int(a[3:])])
        leaf, other = (u, v) if u.startswith("leaf") else (v, u)
        if leaf.startswith("leaf") and other.startswith("spine"):
            rail = int(leaf.rpartition(".r")[2])
            return attrs(self.recipe.nic_links[rail], f.leaf_spine_bytes_per_s[rail])
        if {u[:4], v[:4]} == {"spin", "core"}:
            return attrs(self.recipe.nic_links[0], f.spine_core_bytes_per_s)
        raise KeyError((u, v))

    def stats(self) -> dict[str, int]:
        """Counts: ``vertices``, ``edges`` (directed) and vertices per kind (``gpu``, ``leaf``, ...)."""
        g = self.graph
        kinds = Counter(kind for _, kind in g.nodes(data="kind"))
        return {"vertices": g.number_of_nodes(), "edges": g.number_of_edges(), **dict(sorted(kinds.items()))}

    def _split(self, vertex: str) -> tuple[int, str]:
        m = re.fullmatch(r"n(\d+)\.(\w+)", vertex)
        if not m or int(m.group(1)) >= self.nodes:
            raise ValueError(f"{vertex!r} is not a vertex of a node of this cluster")
        return int(m.group(1)), m.group(2)

    def route(self, src: str, dst: str) -> list[tuple[str, str]]:
        """Directed edges from ``src`` to ``dst`` (GPU vertices; inside a node also CPUs), cached.

        Inside a node: the recipe's local route. Between nodes: GPU -> its NIC -> leaf -> (spine ->
        (core -> spine ->)) leaf -> NIC -> GPU; the spine and core are picked by a CRC32 hash of the
        endpoint names (ECMP), so different pairs spread over the spines deterministically.
        """
        cached = self._routes.get((src, dst))
        if cached is None:
            cached = self._routes[(src, dst)] = tuple(self._compute_route(src, dst))
        return list(cached)

    def _compute_route(self, src: str, dst: str) -> list[tuple[str, str]]:
        (na, a), (nb, b) = self._split(src), self._split(dst)
        local = self.recipe.routes
        if src == dst:
            return []
        if na == nb:
            if (a, b) not in local:
                raise ValueError(f"no route from {src} to {dst} (endpoints are GPUs or CPUs)")
            path = [f"n{na}.{v}" for v in local[(a, b)]]
        else:
            if not (a.startswith("gpu") and b.startswith("gpu")):
                raise ValueError(f"routes between nodes join GPUs, got {src} -> {dst}")
            f, ia, ib = self.fabric, int(a[3:]), int(b[3:])
            ra, rb = self.recipe.gpu_rails[ia], self.recipe.gpu_rails[ib]
            ga, gb = na // self.nodes_per_leaf_group, nb // self.nodes_per_leaf_group
            middle = [f"leaf{ga}.r{ra}", f"leaf{gb}.r{rb}"]
            if middle[0] == middle[1]:
                middle = middle[:1]
            else:
                h, s = zlib.crc32(f"{src}>{dst}".encode()), f.spines_per_pod
                pa, pb = ga // f.groups_per_pod, gb // f.groups_per_pod
                if pa == pb:
                    middle[1:1] = [f"spine{pa * s + h % s}"]
                else:
                    c = f.cores
                    middle[1:1] = [f"spine{pa * s + h % s}", f"core{h // s % c}", f"spine{pb * s + h // (s * c) % s}"]
            path = ([f"n{na}.{v}" for v in local[(a, f"nic{ra}")]] + middle
                    + [f"n{nb}.{v}" for v in local[(f"nic{rb}", b)]])
        return list(zip(path, path[1:]))

    def route_latency_s(self, edges: list[tuple[str, str]]) -> float:
        """Sum of the edge latencies of a route."""
        return sum(self.graph.edges[e]["latency_s"] for e in edges)

    def route_bandwidth_bytes_per_s(self, edges: list[tuple[str, str]]) -> float:
        """Bottleneck bandwidth of a route (inf for an empty route)."""
        return min((self.graph.edges[e]["bandwidth_bytes_per_s"] for e in edges), default=math.inf)


def cluster_from_mapping(mapping: Mapping | None, *, file: str | None = None,
                         base_dir: str | Path | None = None) -> Cluster:
    """The scenario's ``cluster:`` section as a :class:`Cluster`; ScenarioError names ``cluster.<key>``."""
    e = validate_section(_ClusterEntry, dict(mapping) if isinstance(mapping, Mapping) else mapping,
                         file=file, prefix="cluster")
    recipe = load_node_recipe(e.topology, base_dir=base_dir, file=file, key="cluster.topology")
    if e.gpu is not None:
        recipe = replace(recipe, gpu=get_gpu(e.gpu, file=file, key="cluster.gpu"))
    try:
        return Cluster(recipe, nodes=e.nodes, nodes_per_leaf_group=e.nodes_per_leaf_group,
                       oversubscription=e.oversubscription, pod_nodes=e.pod_nodes,
                       core_oversubscription=e.core_oversubscription, price_per_gpu_hour=e.price_per_gpu_hour,
                       gpus=e.gpus)
    except ScenarioError as err:
        raise err.with_context(file=file) from None
