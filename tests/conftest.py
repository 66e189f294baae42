"""Shared fixtures: paths and small helpers."""
from __future__ import annotations

from pathlib import Path

import pytest

from sim.cluster import Cluster, cluster_from_mapping

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


@pytest.fixture
def scenarios_dir() -> Path:
    return SCENARIOS


def cluster(topology: str, nodes: int = 1) -> Cluster:
    """A cluster of ``nodes`` nodes of a packaged topology."""
    return cluster_from_mapping({"topology": topology, "nodes": nodes})


def node_gpus(node: int, n: int = 8) -> tuple[str, ...]:
    """GPU vertex names of one node."""
    return tuple(f"n{node}.gpu{i}" for i in range(n))


@pytest.fixture(scope="session")
def h100() -> Cluster:
    return cluster("dgx-h100", 1)
