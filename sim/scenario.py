"""A scenario: one YAML file = model + cluster + training + parallel plan (+ fine-tuning, memory overheads).

``load_scenario(path, overrides)`` reads the file, applies ``--set key=value`` overrides, validates
every section and returns a :class:`Scenario` whose :attr:`~Scenario.plan` is already checked
against the model and the cluster. Every problem is a one-line :class:`ScenarioError`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sim.errors import ScenarioError, did_you_mean
from sim.finetune import FinetuneConfig
from sim.memory import MemoryConfig
from sim.model import ModelSpec, load_model
from sim.plan import ParallelismConfig, Plan, TrainingConfig, resolve_plan
from sim.schema import validate_section
from sim.cluster import Cluster, cluster_from_mapping

TOP_LEVEL_KEYS = ("name", "description", "model", "cluster", "training", "parallelism", "finetune", "memory")


@dataclass(frozen=True)
class Scenario:
    """Everything the simulator needs about one job."""

    name: str
    description: str
    file: str | None
    model: ModelSpec
    cluster: Cluster
    training: TrainingConfig
    parallelism: ParallelismConfig
    memory: MemoryConfig
    plan: Plan
    finetune: FinetuneConfig = FinetuneConfig()


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error becomes a one-line ScenarioError."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError("no such file; expected a path to a scenario YAML", file=str(path))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ScenarioError(f"{where}invalid YAML ({exc.problem})", file=str(path)) from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read YAML: {exc}", file=str(path)) from None


def apply_override(data: dict[str, Any], assignment: str, *, file: str | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a copy of ``data``."""
    if "=" not in assignment:
        raise ScenarioError(f"expected KEY=VALUE, got {assignment!r}", file=file, key="--set")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ScenarioError(f"expected a dotted key such as parallelism.tp, got {key!r}", file=file, key="--set")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    out = copy.deepcopy(data)
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if i == 0 and part == "model" and isinstance(child, str):
            child = {"base": child}      # --set model.vocab=... on a preset
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ScenarioError(f"cannot set {key!r}: {'.'.join(parts[:i + 1])} is not a mapping",
                                file=file, key="--set")
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def scenario_from_mapping(data: Any, *, file: str | None = None, base_dir: Path | None = None) -> Scenario:
    """Validate a scenario mapping (as read from YAML) into a :class:`Scenario`."""
    if not isinstance(data, dict):
        raise ScenarioError(f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(data).__name__}",
                            file=file)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ScenarioError(f"unknown key{did_you_mean(key, TOP_LEVEL_KEYS)}; expected one of "
                                f"{', '.join(TOP_LEVEL_KEYS)}", file=file, key=str(key))
    for key in ("model", "cluster", "training"):
        if key not in data:
            raise ScenarioError("is required", file=file, key=key)
    name = data.get("name") or (Path(file).stem if file else "scenario")
    if not isinstance(name, str):
        raise ScenarioError(f"expected a string, got {name!r}", file=file, key="name")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ScenarioError(f"expected a string, got {description!r}", file=file, key="description")
    model = load_model(data["model"], file=file, base_dir=base_dir)
    cluster_data = data["cluster"]
    if not isinstance(cluster_data, dict):
        raise ScenarioError(f"expected a mapping with topology and nodes, got {cluster_data!r}", file=file,
                            key="cluster")
    cluster = cluster_from_mapping(cluster_data, file=file, base_dir=base_dir)
    training = validate_section(TrainingConfig, data["training"], file=file, prefix="training")
    parallelism = validate_section(ParallelismConfig, data.get("parallelism"), file=file, prefix="parallelism")
    memory = validate_section(MemoryConfig, data.get("memory"), file=file, prefix="memory")
    finetune = validate_section(FinetuneConfig, data.get("finetune"), file=file, prefix="finetune")
    plan = resolve_plan(model, training, parallelism, num_gpus=cluster.num_gpus,
                        gpus_per_node=cluster.gpus_per_node, gpu=cluster.gpu, file=file, finetune=finetune)
    if (plan.offload_optimizer or plan.offload_params) and cluster.recipe.host is None:
        key = "parallelism.offload_optimizer" if plan.offload_optimizer else "parallelism.offload_params"
        raise ScenarioError(f"topology {cluster.recipe.name!r} has no host: section (CPU memory and memory "
                            f"bandwidth); expected a node recipe with one to offload to the CPU", file=file, key=key)
    return Scenario(name=name, description=description.strip(), file=file, model=model, cluster=cluster,
                    training=training, parallelism=parallelism, memory=memory, plan=plan, finetune=finetune)


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read, override and validate a scenario file."""
    file = str(path)
    data = read_yaml(path)
    for assignment in overrides:
        if not isinstance(data, dict):
            break
        data = apply_override(data, assignment, file=file)
    return scenario_from_mapping(data, file=file, base_dir=Path(path).resolve().parent)
