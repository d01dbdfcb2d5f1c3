"""ClusterPlacement's own bookkeeping, without a cluster: the free memory admission reads
(each live node's `memory` resource less what the pool's workers hold there) and the
cores a node offers. tests/test_cluster.py runs the real thing on a Ray cluster."""

from __future__ import annotations

from typing import Any

from pool_manager.cluster import ClusterPlacement, ClusterWorker
from pool_manager.config import ClusterConfig

GIB = 2**30


def _node(node_id: str, memory_gib: int, alive: bool = True, cpus: int = 4) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "address": "10.0.0.1",
        "hostname": node_id,
        "alive": alive,
        "memory_bytes": memory_gib * GIB,
        "cpus": cpus,
    }


def _worker(node_id: str, memory_gib: float) -> Any:
    worker = ClusterWorker.__new__(ClusterWorker)  # no process: only what placement reads
    worker.node = {"node_id": node_id, "address": "10.0.0.1", "hostname": node_id}
    worker.memory_bytes = int(memory_gib * GIB)
    return worker


def test_free_memory_is_the_roomiest_live_node_s_less_the_pool_s_workers() -> None:
    placement = ClusterPlacement(ClusterConfig(address="auto"), (8051, 8060))
    placement._nodes = {
        "a": _node("a", 8),
        "b": _node("b", 6),
        "dead": _node("dead", 64, alive=False),
    }
    assert placement.largest_free_memory() == 8 * GIB
    placement._workers = {_worker("a", 3), _worker("a", 1.5)}
    assert placement.largest_free_memory() == 6 * GIB, "b is the roomiest now"
    placement._workers.add(_worker("b", 5.5))
    assert placement.largest_free_memory() == int(3.5 * GIB)


def test_a_node_s_cores_are_ray_s_cpu_count() -> None:
    placement = ClusterPlacement(ClusterConfig(address="auto"), (8051, 8060))
    placement._nodes = {"a": _node("a", 8, cpus=16), "z": _node("z", 8, cpus=0)}
    assert placement.node_cores("a") == 16
    assert placement.node_cores("z") == 1, "at least one"
    assert placement.node_cores("unseen") == 1
