"""The plans a sweep evaluates: a ``--grid`` cartesian product, or every valid plan of a scenario (``--auto``).

A *plan point* is a mapping ``{dotted key: value}`` of scenario overrides, applied exactly as
``--set KEY=VALUE`` is (:func:`sim.scenario.apply_override`; :func:`override_strings` writes the
``key=value`` strings). Its :func:`plan_id` is a hash of those strings, stable across runs and
across the order in which ``--grid`` flags are given.

``--auto`` (:func:`auto_points`) enumerates, for the scenario's GPU count N, model and training
settings, the layouts below. The hard rules are those of :func:`sim.plan.resolve_plan` (every
candidate is validated again by it; this module only avoids building the invalid ones); the
*bounds* (marked so) keep the space small and are applied only to dimensions that ``--grid`` does
not fix (a grid value for an auto dimension replaces the enumeration of that dimension and is
subject to the hard rules only).

- tp: divisors of N dividing the attention heads and ffn_hidden, dividing or a multiple of the KV
  heads, at most the GPUs of one node unless ``parallelism.tp_across_nodes`` is true.
- pp: divisors of N / tp; bound: dividing the layer count, as Megatron-LM requires unless uneven
  first / last stages are configured ("number of layers should be divisible by the pipeline
  parallel size", megatron/training/arguments.py; NeMo and DeepSpeed's pipeline check the same). A
  ``--grid parallelism.pp=...`` value may still split the layers unevenly (resolve_plan accepts it).
- cp: divisors of N / (tp pp) dividing seq_len; bound: a CP rank keeps at least
  :data:`MIN_CP_TOKENS` tokens. CP is a long-context technique: NeMo's long-context recipes use it
  from 16k-token sequences (NeMo Framework user guide, "Long Context Recipes"), Llama 3 used CP16
  on 131,072 tokens = 8,192 per rank (Llama 3 paper §3.3.2); shorter chunks leave too little
  attention work to hide the K/V all-gather behind.
- dp = N / (tp pp cp), dividing the global batch.
- micro_batch_size: powers of two dividing the per-DP batch; bound: at most
  :data:`MAX_MICRO_BATCH`, and with pp > 1 at least pp microbatches (fewer leaves the pipeline
  idle more than half the step: bubble (pp-1)/(m+pp-1) >= 1/2 when m < pp).
- zero: 0-3; only 0 when dp x cp = 1 (ZeRO shards over dp x cp: nothing to shard, the same plan);
  bound: 0 or 1 with pp > 1. ZeRO-2/3 shard the gradients, which every microbatch's backward would
  then have to reduce-scatter: DeepSpeed's PipelineEngine refuses them ("ZeRO-2 and ZeRO-3 are
  incompatible with pipeline parallelism", deepspeed/runtime/pipe/engine.py), and Megatron-LM's
  recipes pair PP with its distributed optimizer (ZeRO-1).
- recompute: none, selective, full; without selective when flash attention is on: flash attention
  never stores the attention scores that selective recomputation drops, so the two are the same
  plan (same memory, :mod:`sim.activations`; same FLOPs, :func:`sim.flops.step_flops`).
- sequence_parallel: on when tp > 1 (Korthikanti et al. 2022: less activation memory, the same
  traffic), off at tp = 1 where it means nothing.
- schedule: pp = 1 -> 1f1b (a single stage has no pipeline schedule); pp > 1 -> 1f1b, and
  interleaved with virtual_stages v >= 2 where v divides layers / pp (an integral number of layers
  per chunk) and the microbatches are a multiple of pp (Megatron-LM's rule); bound: at most
  :data:`MAX_VIRTUAL_STAGES` virtual stages: the bubble shrinks as 1/v (Narayanan et al. 2021,
  §2.2.2), so v > 4 removes at most another 1/8 of the 1F1B bubble while the point-to-point
  traffic keeps growing with v (and the engine's op count with it). gpipe only when
  ``--grid parallelism.schedule=...`` names it.

For Llama 3 70B on 64 H100 (seq 4096, global batch 512) this gives 664 plans.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from sim.errors import ScenarioError
from sim.model import ModelSpec
from sim.plan import ParallelismConfig, TrainingConfig

MIN_CP_TOKENS = 4096       # bound: tokens of the sequence per CP rank (cp > 1 only)
MAX_MICRO_BATCH = 8        # bound: sequences per microbatch
MAX_VIRTUAL_STAGES = 4     # bound: model chunks per pipeline stage under the interleaved schedule
MAX_ZERO_WITH_PP = 1       # bound: ZeRO stage with pipeline parallelism
RECOMPUTE = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)

# The dimensions --auto enumerates, in the order of a point's keys (and of the CSV's input columns).
AUTO_KEYS = ("parallelism.tp", "parallelism.pp", "parallelism.cp", "parallelism.dp", "parallelism.zero",
             "parallelism.sequence_parallel", "parallelism.recompute", "parallelism.schedule",
             "parallelism.virtual_stages", "training.micro_batch_size")
_PINNED_LAYERS = ("first_stage_layers", "last_stage_layers")


# ---- values and identities -------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as ``--set`` takes it (YAML scalar): true/false, null, numbers, bare strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def override_strings(point: Mapping[str, Any]) -> list[str]:
    """``["key=value", ...]`` in the point's key order, for :func:`sim.scenario.load_scenario`."""
    return [f"{k}={format_value(v)}" for k, v in point.items()]


def plan_id(point: Mapping[str, Any], base_overrides: Sequence[str] = ()) -> str:
    """A 12-hex-digit id of the overrides: ``--set`` ones in their order, then the point's sorted by key."""
    text = "\n".join([*base_overrides, "--", *sorted(override_strings(point))])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- --grid ----------------------------------------------------------------------------------
def parse_grid(specs: Iterable[str]) -> dict[str, list[Any]]:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": [1, 2], "c": ["x"]}`` (values parsed as YAML, as --set does)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScenarioError(f"expected KEY=V1,V2,..., got {spec!r}", key="--grid")
        parts = key.split(".")
        if not all(parts):
            raise ScenarioError(f"expected a dotted key such as parallelism.tp, got {key!r}", key="--grid")
        if key in grid:
            raise ScenarioError(f"{key} is given twice; expected each key once with all its values", key="--grid")
        items = [item.strip() for item in raw.split(",")]
        if not raw.strip() or not all(items):
            raise ScenarioError(f"{key}: empty value in {raw!r}; expected a comma-separated list such as "
                                f"{key}=1,2,4", key="--grid")
        values = []
        for item in items:
            try:
                value = yaml.safe_load(item)
            except yaml.YAMLError:
                value = item
            if value in values:
                raise ScenarioError(f"{key}: value {item!r} is given twice", key="--grid")
            values.append(value)
        grid[key] = values
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, first key slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# ---- --auto ----------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_dividing(n: int, cap: int) -> list[int]:
    out, m = [], 1
    while m <= cap and n % m == 0:
        out.append(m)
        m *= 2
    return out


def auto_points(model: ModelSpec, training: TrainingConfig, parallelism: ParallelismConfig, *, num_gpus: int,
                gpus_per_node: int, fixed: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """Every plan of the space described in the module docstring, as override points (AUTO_KEYS order).

    ``fixed`` maps some AUTO_KEYS to the values to use instead of enumerating them (``--grid``).
    ``parallelism`` (the scenario's section) contributes tp_across_nodes and pinned first / last
    stage layers: the pins are dropped (set to null) since they were chosen for one pp.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(AUTO_KEYS)
    assert not unknown, unknown

    def options(key: str, default: Iterable[Any]) -> list[Any]:
        return list(fixed[key]) if key in fixed else list(default)

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    n, seq, batch, layers = num_gpus, training.seq_len, training.global_batch_size, model.layers
    kv = model.n_kv_heads
    recompute_default = tuple(r for r in RECOMPUTE if not (r == "selective" and training.flash_attention))
    pins = {f"parallelism.{k}": None for k in _PINNED_LAYERS if getattr(parallelism, k) is not None}
    points: list[dict[str, Any]] = []

    def tp_ok(tp: int) -> bool:
        return (n % tp == 0 and model.heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
                and model.ffn_hidden % tp == 0 and (tp <= gpus_per_node or parallelism.tp_across_nodes))

    for tp in options("parallelism.tp", divisors(n)):
        if not is_int(tp) or not tp_ok(tp):
            continue
        for pp in options("parallelism.pp", [d for d in divisors(n // tp) if layers % d == 0]):
            if not is_int(pp) or (n // tp) % pp or pp > layers:
                continue
            rest = n // (tp * pp)
            cp_default = [c for c in divisors(rest) if c == 1 or seq // c >= MIN_CP_TOKENS]
            for cp in options("parallelism.cp", cp_default):
                if not is_int(cp) or rest % cp or seq % cp:
                    continue
                dp = rest // cp
                if batch % dp or ("parallelism.dp" in fixed and dp not in fixed["parallelism.dp"]):
                    continue
                per_dp = batch // dp
                mbs_default = [m for m in _powers_of_two_dividing(per_dp, MAX_MICRO_BATCH)
                               if pp == 1 or per_dp // m >= pp]
                for mbs in options("training.micro_batch_size", mbs_default):
                    if not is_int(mbs) or per_dp % mbs:
                        continue
                    micro = per_dp // mbs
                    for schedule, v in _schedules(pp, layers, micro, fixed):
                        zero_default = ZERO_STAGES if dp * cp > 1 else (0,)
                        if pp > 1:
                            zero_default = tuple(z for z in zero_default if z <= MAX_ZERO_WITH_PP)
                        for zero in options("parallelism.zero", zero_default):
                            for recompute in options("parallelism.recompute", recompute_default):
                                for sp in options("parallelism.sequence_parallel", (tp > 1,)):
                                    points.append({
                                        "parallelism.tp": tp, "parallelism.pp": pp, "parallelism.cp": cp,
                                        "parallelism.dp": dp, "parallelism.zero": zero,
                                        "parallelism.sequence_parallel": sp, "parallelism.recompute": recompute,
                                        "parallelism.schedule": schedule, "parallelism.virtual_stages": v,
                                        "training.micro_batch_size": mbs, **pins,
                                        # a base ZeRO-3 implementation does not apply to other stages
                                        **({"parallelism.zero3_impl": "fsdp"}
                                           if zero != 3 and parallelism.zero3_impl != "fsdp" else {}),
                                        # nor a base TP-comm overlap to points without sequence parallelism
                                        **({"parallelism.tp_comm_overlap": False}
                                           if parallelism.tp_comm_overlap and not sp else {}),
                                        # nor a base early-stopped recomputation to other recompute modes
                                        **({"parallelism.recompute_early_stop": False}
                                           if parallelism.recompute_early_stop and recompute != "full" else {}),
                                        # nor a base partial recomputation
                                        **({"parallelism.recompute_layers": None}
                                           if parallelism.recompute_layers is not None and recompute != "full"
                                           else {}),
                                        # nor a base hybrid sharding to other ZeRO stages or dp degrees
                                        **({"parallelism.dp_shard": None}
                                           if parallelism.dp_shard is not None
                                           and (zero != 3 or dp % parallelism.dp_shard) else {})})
    return points


def _schedules(pp: int, layers: int, microbatches: int, fixed: Mapping[str, Sequence[Any]]) -> list[tuple[str, int]]:
    """(schedule, virtual_stages) pairs for one pipeline depth."""
    default = ("1f1b",) if pp == 1 else ("1f1b", "interleaved")
    out = []
    for schedule in fixed.get("parallelism.schedule", default):
        if schedule != "interleaved":
            vs = [1] if "parallelism.virtual_stages" not in fixed else [v for v in fixed["parallelism.virtual_stages"]
                                                                        if v == 1]
            out += [(schedule, v) for v in vs]
            continue
        if pp < 2 or microbatches % pp:
            continue
        if "parallelism.virtual_stages" in fixed:
            vs = [v for v in fixed["parallelism.virtual_stages"]
                  if isinstance(v, int) and not isinstance(v, bool) and v >= 2 and pp * v <= layers]
        else:
            vs = [v for v in range(2, MAX_VIRTUAL_STAGES + 1) if layers % pp == 0 and (layers // pp) % v == 0]
        out += [(schedule, v) for v in vs]
    return out
