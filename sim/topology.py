"""Node recipes and clusters: the hardware as a ``networkx`` graph, and routes through it.

A *node recipe* (``topologies/<name>.yaml``; schema in ``topologies/t4.yaml``) lists the vertices of
one server (GPUs, NVSwitch, PCIe switches, NICs, CPUs) and its links. A :class:`Cluster` is
``nodes`` copies of a recipe whose NICs join a rail-optimized leaf/spine fabric (DGX SuperPOD
style [hardware.md 4.1, S14e]): the nodes form groups of ``nodes_per_leaf_group`` (32, one scalable
unit); NIC rail ``r`` of every node of group ``g`` connects to leaf ``leaf{g}.r{r}``; every leaf
connects to every spine of its pod. Optionally ``pod_nodes`` splits the nodes into pods with their
own spines, joined by core switches with ``core_oversubscription`` (Meta's Llama 3 clusters:
3,072-GPU pods at full bisection, 1:7 above them [hardware.md 4.2, S18]).

Graph: every link is two directed edges with ``bandwidth_bytes_per_s`` (per direction),
``latency_s``, ``kind`` and ``link`` (catalog key). Vertices carry ``kind`` (gpu | nvswitch |
pcie_switch | nic | cpu | leaf | spine | core), ``node`` (None in the fabric), ``index`` (local
index) and ``rail`` (NICs, leaves, and GPUs: the rail of the GPU's NIC); fabric vertices ``pod``.
Names: ``n3.gpu5``, ``n3.nvswitch``, ``n3.pcie2``, ``n3.nic5``, ``n3.cpu1``, ``leaf0.r5``,
``spine7``, ``core2``. GPU ranks are node-major: rank = node * gpus_per_node + local index.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, NamedTuple

import networkx as nx
import yaml
from pydantic import Field

from sim.errors import ScenarioError, did_you_mean
from sim.hardware import GPUSpec, LinkSpec, data_dir, get_gpu, get_link
from sim.schema import Section, validate_section

NODES_PER_LEAF_GROUP = 32
"""DGX SuperPOD scalable unit: 32 rail-aligned nodes, one leaf per rail [S14e, S14g]."""
TRANSIT_KINDS = frozenset({"nvswitch", "pcie_switch", "cpu"})
"""Vertex kinds a route inside a node may pass through (never a GPU or a NIC)."""


# ---------------------------------------------------------------------------------------------
# YAML schema of a node recipe and of the scenario's `cluster:` section

class _VertexEntry(Section):
    name: str
    kind: Literal["nvswitch", "pcie_switch", "cpu"]
    count: int = Field(1, ge=1, strict=True)


class _NicsEntry(Section):
    count: int = Field(ge=0, strict=True)
    link: Any                                   # link catalog key or inline mapping (the fabric port)


class _LinkEntry(Section):
    ends: list[str] = Field(min_length=2, max_length=2)
    link: Any
    count: int = Field(1, ge=1, strict=True)


class _RecipeEntry(Section):
    name: str | None = None
    description: str = ""
    sources: list[str] = []
    gpu: Any
    gpus_per_node: int = Field(ge=1, strict=True)
    vertices: list[_VertexEntry] = []
    nics: _NicsEntry | None = None
    gpu_nic: str | None = None
    links: list[_LinkEntry] = Field(min_length=1)


class _ClusterEntry(Section):
    topology: Any                               # recipe name, path to a .yaml, or inline recipe mapping
    gpu: Any = None                             # replaces the recipe's GPU (catalog name or mapping)
    nodes: int = Field(1, ge=1, strict=True)
    nodes_per_leaf_group: int = Field(NODES_PER_LEAF_GROUP, ge=1, strict=True)
    oversubscription: float = Field(1.0, ge=1, strict=True)
    pod_nodes: int | None = Field(None, ge=1, strict=True)
    core_oversubscription: float = Field(1.0, ge=1, strict=True)
    price_per_gpu_hour: float | None = Field(None, ge=0, strict=True)


def _join(prefix: str | None, *parts: object) -> str:
    return ".".join(str(p) for p in (prefix, *parts) if p not in (None, ""))


def _validate(cls, data, file, prefix):
    try:
        return validate_section(cls, data, file=file, prefix=prefix)
    except ScenarioError as err:      # an empty prefix leaves a leading dot on the key
        raise ScenarioError(err.message, file=err.file, key=(err.key or "").lstrip(".") or None) from None


# ---------------------------------------------------------------------------------------------
# Templates: "pcie{i//2}" with i = 0 .. count-1

_TEMPLATE = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _eval(node: ast.AST, i: int) -> int:
    if isinstance(node, ast.Expression):
        return _eval(node.body, i)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id == "i":
        return i
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, i), _eval(node.right, i))
    raise ValueError("only i, integers and + - * // % are allowed")


def expand(template: str, i: int, *, file: str | None = None, key: str | None = None) -> str:
    """``template`` with every ``{expr}`` replaced by the integer expression ``expr`` of ``i``."""
    try:
        return _TEMPLATE.sub(lambda m: str(_eval(ast.parse(m.group(1), mode="eval"), i)), template)
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        raise ScenarioError(f"cannot expand {template!r} for i={i}: {exc}", file=file, key=key) from None


# ---------------------------------------------------------------------------------------------
# Node recipes

class Vertex(NamedTuple):
    """A vertex of a node recipe; in the cluster graph its name gets the prefix ``n{node}.``."""
    name: str
    kind: str
    index: int
    rail: int | None


class NodeLink(NamedTuple):
    """A bidirectional link between two vertices of a node."""
    a: str
    b: str
    link: LinkSpec


@dataclass(frozen=True, slots=True, eq=False)
class NodeRecipe:
    """One server design: its GPU, vertices, links, NICs (rails) and routes between its vertices."""

    name: str                                   # recipe name ("dgx-h100") or file stem
    description: str                            # one line for reports
    gpu: GPUSpec
    gpus_per_node: int
    vertices: tuple[Vertex, ...]                # gpu0.., then the declared vertices, then nic0..
    links: tuple[NodeLink, ...]
    nic_links: tuple[LinkSpec, ...]             # fabric port of NIC r (= rail r)
    gpu_rails: tuple[int | None, ...]           # NIC / rail used by GPU i; None without NICs
    sources: tuple[str, ...] = ()
    file: str | None = None                     # YAML it came from (None when inline)
    routes: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict, repr=False)
    # ^ local vertex paths GPU/CPU <-> GPU/CPU and GPU <-> its NIC

    @property
    def num_rails(self) -> int:
        """Number of NICs (one rail each)."""
        return len(self.nic_links)

    @property
    def scale_up(self) -> str:
        """"NVSwitch" when GPUs share a switch vertex, else "PCIe"."""
        return "NVSwitch" if any(v.kind == "nvswitch" for v in self.vertices) else "PCIe"


def available_topologies() -> list[str]:
    """Names of the packaged node recipes."""
    return sorted(p.name[:-5] for p in data_dir().iterdir() if p.name.endswith(".yaml"))


def _read(resource: Any) -> dict:
    try:
        data = yaml.safe_load(resource.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"invalid YAML: {' '.join(str(exc).split())}", file=str(resource)) from None
    if not isinstance(data, dict):
        raise ScenarioError("expected a node recipe mapping", file=str(resource))
    return data


def _recipe_path(ref: str | Path, base_dir: str | Path | None, file: str | None, key: str) -> Path:
    path = Path(base_dir or ".") / ref
    if not path.is_file():
        raise ScenarioError(f"no such topology file {str(path)!r}", file=file, key=key)
    return path.resolve()


def _is_path(ref: Any) -> bool:
    return isinstance(ref, (str, Path)) and str(ref).endswith((".yaml", ".yml"))


def _raw_recipe(ref: Any, base_dir: str | Path | None, file: str | None, key: str,
                depth: int = 0) -> tuple[dict, str | None, str, str]:
    """(raw mapping with its `base` merged in, its file, its name, key prefix) of a name, path or mapping."""
    if isinstance(ref, Mapping):
        raw, src, name = dict(ref), file, str(ref.get("name", "inline"))
    elif _is_path(ref):
        path = _recipe_path(ref, base_dir, file, key)
        raw, src, name, key, base_dir = _read(path), str(path), path.stem, "", path.parent
    elif isinstance(ref, str) and ref.lower() in available_topologies():
        resource = data_dir() / f"{ref.lower()}.yaml"
        raw, src, name, key = _read(resource), str(resource), ref.lower(), ""
    elif isinstance(ref, str):
        known = available_topologies()
        raise ScenarioError(f"unknown topology {ref!r}{did_you_mean(ref.lower(), known)}; known: "
                            f"{', '.join(known)} (or a path ending in .yaml)", file=file, key=key)
    else:
        raise ScenarioError(f"expected a topology name, a .yaml path or a mapping, got {ref!r}", file=file, key=key)
    if "base" in raw:
        if depth > 8:
            raise ScenarioError("`base` recipes nest too deeply (a cycle?)", file=src, key=_join(key, "base"))
        base, *_ = _raw_recipe(raw.pop("base"), base_dir, src, _join(key, "base"), depth + 1)
        raw = {**{k: v for k, v in base.items() if k != "name"}, **raw}
    return raw, src, name, key


def load_node_recipe(name_or_path: str | Path | Mapping, *, base_dir: str | Path | None = None,
                     file: str | None = None, key: str = "cluster.topology") -> NodeRecipe:
    """A node recipe from a packaged name, a ``.yaml``/``.yml`` path (relative to ``base_dir``) or a mapping.

    ``file`` and ``key`` locate the reference in the user's YAML for errors (unknown name: did-you-mean).
    Named and file recipes are cached.
    """
    if isinstance(name_or_path, NodeRecipe):
        return name_or_path
    if _is_path(name_or_path):
        return _cached_recipe(str(_recipe_path(name_or_path, base_dir, file, key)))
    if isinstance(name_or_path, str) and name_or_path.lower() in available_topologies():
        return _cached_recipe(name_or_path.lower())
    return _build_recipe(*_raw_recipe(name_or_path, base_dir, file, key))   # a mapping, or the error


@functools.cache
def _cached_recipe(ref: str) -> NodeRecipe:
    return _build_recipe(*_raw_recipe(ref, None, None, ""))


def _build_recipe(raw: dict, file: str | None, name: str, prefix: str) -> NodeRecipe:
    """Validate a raw recipe mapping, expand its templates and check that every GPU is reachable."""
    e = _validate(_RecipeEntry, raw, file, prefix)
    gpu = get_gpu(e.gpu, file=file, key=_join(prefix, "gpu"))
    nic_count = e.nics.count if e.nics else 0
    nic_link = get_link(e.nics.link, file=file, key=_join(prefix, "nics.link")) if nic_count else None
    names = [f"gpu{i}" for i in range(e.gpus_per_node)] + [f"nic{r}" for r in range(nic_count)]
    declared: list[Vertex] = []
    for n, ve in enumerate(e.vertices):
        key = _join(prefix, "vertices", n, "name")
        if ve.count > 1 and "{" not in ve.name:
            raise ScenarioError(f"count {ve.count} needs a template such as 'pcie{{i}}'", file=file, key=key)
        for i in range(ve.count):
            vname = expand(ve.name, i, file=file, key=key)
            if not _NAME.match(vname) or vname in names or re.fullmatch(r"(gpu|nic)\d+", vname):
                raise ScenarioError(f"bad or duplicate vertex name {vname!r} (gpu<i> and nic<r> are implicit)",
                                    file=file, key=key)
            digits = re.search(r"(\d+)\Z", vname)
            index = i if "{" in ve.name else int(digits.group(1)) if digits else 0
            names.append(vname)
            declared.append(Vertex(vname, ve.kind, index, None))

    nic_tpl = e.gpu_nic or ("nic{i}" if nic_count == e.gpus_per_node else "nic0" if nic_count == 1 else None)
    if nic_count and nic_tpl is None:
        raise ScenarioError(f"{nic_count} NICs for {e.gpus_per_node} GPUs: say which NIC each GPU uses, "
                            "e.g. gpu_nic: 'nic{i//2}'", file=file, key=_join(prefix, "gpu_nic"))
    rails: list[int | None] = []
    for i in range(e.gpus_per_node):
        if not nic_count:
            rails.append(None)
            continue
        nic = expand(nic_tpl, i, file=file, key=_join(prefix, "gpu_nic"))
        if not re.fullmatch(r"nic\d+", nic) or int(nic[3:]) >= nic_count:
            raise ScenarioError(f"GPU {i} would use {nic!r}, but the NICs are nic0..nic{nic_count - 1}",
                                file=file, key=_join(prefix, "gpu_nic"))
        rails.append(int(nic[3:]))
    vertices = ([Vertex(f"gpu{i}", "gpu", i, rails[i]) for i in range(e.gpus_per_node)] + declared
                + [Vertex(f"nic{r}", "nic", r, r) for r in range(nic_count)])

    links: list[NodeLink] = []
    seen: set[frozenset] = set()
    for n, le in enumerate(e.links):
        key = _join(prefix, "links", n)
        spec = get_link(le.link, file=file, key=_join(key, "link"))
        for i in range(le.count):
            a, b = (expand(end, i, file=file, key=_join(key, "ends")) for end in le.ends)
            for end in (a, b):
                if end not in names:
                    raise ScenarioError(f"unknown vertex {end!r}{did_you_mean(end, names)}",
                                        file=file, key=_join(key, "ends"))
            if a == b or frozenset((a, b)) in seen:
                raise ScenarioError(f"link {a} - {b} is a loop or a duplicate", file=file, key=_join(key, "ends"))
            seen.add(frozenset((a, b)))
            links.append(NodeLink(a, b, spec))
    routes = _local_routes(vertices, links, file, _join(prefix, "links"))
    return NodeRecipe(name=e.name or name, description=e.description, gpu=gpu, gpus_per_node=e.gpus_per_node,
                      vertices=tuple(vertices), links=tuple(links),
                      nic_links=tuple(nic_link for _ in range(nic_count)), gpu_rails=tuple(rails),
                      sources=tuple(e.sources), file=file, routes=MappingProxyType(routes))


def _local_routes(vertices: list[Vertex], links: list[NodeLink], file: str | None, key: str) -> dict:
    """Vertex paths inside a node: fewest hops, then widest bottleneck, then least latency, then by name.

    Only switches and CPUs are transited. Raises ScenarioError when a GPU cannot reach another GPU,
    a CPU or its own NIC that way.
    """
    g = nx.Graph()
    g.add_nodes_from(v.name for v in vertices)
    for a, b, spec in links:
        g.add_edge(a, b, bw=spec.bandwidth_bytes_per_s, lat=spec.latency_s)
    transit = {v.name for v in vertices if v.kind in TRANSIT_KINDS}
    ends = [v.name for v in vertices if v.kind in ("gpu", "cpu")]
    pairs = [(s, t) for s in ends for t in ends if s != t]
    for v in vertices:
        if v.kind == "gpu" and v.rail is not None:
            pairs += [(v.name, f"nic{v.rail}"), (f"nic{v.rail}", v.name)]

    def rank(path: list[str]) -> tuple:
        hops = list(zip(path, path[1:]))
        return (-min(g.edges[h]["bw"] for h in hops), sum(g.edges[h]["lat"] for h in hops), path)

    routes = {}
    for s, t in pairs:
        try:
            paths = nx.all_shortest_paths(g.subgraph(transit | {s, t}), s, t)
            routes[(s, t)] = tuple(min(paths, key=rank))
        except nx.NetworkXNoPath:
            raise ScenarioError(f"{t} cannot be reached from {s} through switches or CPUs only",
                                file=file, key=key) from None
    return routes


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
        """GPUs in the cluster."""
        return self.nodes * self.recipe.gpus_per_node

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
        head = f"{self.nodes} x {self.recipe.name} = {self.num_gpus} x {self.gpu.name}"
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

        def attrs(spec: LinkSpec, bandwidth: float | None = None) -> dict:
            return {"bandwidth_bytes_per_s": spec.bandwidth_bytes_per_s if bandwidth is None else bandwidth,
                    "latency_s": spec.latency_s, "kind": spec.kind, "link": spec.key}

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
    e = _validate(_ClusterEntry, dict(mapping) if isinstance(mapping, Mapping) else mapping, file, "cluster")
    recipe = load_node_recipe(e.topology, base_dir=base_dir, file=file, key="cluster.topology")
    if e.gpu is not None:
        recipe = replace(recipe, gpu=get_gpu(e.gpu, file=file, key="cluster.gpu"))
    try:
        return Cluster(recipe, nodes=e.nodes, nodes_per_leaf_group=e.nodes_per_leaf_group,
                       oversubscription=e.oversubscription, pod_nodes=e.pod_nodes,
                       core_oversubscription=e.core_oversubscription, price_per_gpu_hour=e.price_per_gpu_hour)
    except ScenarioError as err:
        raise err.with_context(file=file) from None
