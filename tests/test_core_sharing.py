"""How the pool splits cores among its workers: per machine, the cluster's nodes each
counted on their own. Stand-in workers and cluster (the pool is not started), so the
split itself is what is asserted; tests/test_pool_lifecycle.py and the benchmarks cover
real workers acting on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_service.cpus import usable_cores
from pool_manager.config import ModelSpec
from pool_manager.states import ModelState as S
from tests.conftest import make_pool, model_entry


class StandInWorker:
    def __init__(self, node_id: str | None) -> None:
        self.node = {"node_id": node_id} if node_id is not None else None
        self.threads: int | None = None

    def share_cores(self, threads: int) -> None:
        self.threads = threads


class StandInCluster:
    def __init__(self, cores: dict[str, int]) -> None:
        self.cores = cores

    def node_cores(self, node_id: str) -> int:
        return self.cores[node_id]


def _serving(pool: Any, model_id: str, *nodes: str | None, busy: bool) -> list[StandInWorker]:
    """Make `model_id` HOT with one worker on each of `nodes` (the first is its worker,
    the others replicas), each with a request when `busy`."""
    record = pool._records[model_id]
    workers = [StandInWorker(node) for node in nodes]
    record.state = S.HOT
    record.worker, record.replicas = workers[0], workers[1:]
    if busy:
        record.in_flight = len(workers)
        record.worker_load = {w: 1 for w in workers}
    return workers


async def test_each_cluster_node_s_cores_are_split_among_its_own_busy_workers(
    tmp_path: Path,
) -> None:
    specs = [ModelSpec.model_validate(model_entry(m)) for m in ("a:1", "b:1", "c:1", "d:1")]
    pool = make_pool(tmp_path, specs)
    pool._cluster = StandInCluster({"n1": 4, "n2": 4})
    a = _serving(pool, "a:1", "n1", busy=True)
    b = _serving(pool, "b:1", "n1", busy=True)
    c = _serving(pool, "c:1", "n2", "n1", busy=True)  # a replica on each node
    d = _serving(pool, "d:1", "n2", busy=False)
    pool._share_cores()
    # n1: a, b and c's replica busy (4 // 3); n2: c alone busy (d idle shares the split).
    assert [w.threads for w in (a[0], b[0], c[1])] == [1, 1, 1]
    assert [c[0].threads, d[0].threads] == [4, 4]


async def test_workers_on_this_machine_are_not_counted_with_a_node_s(tmp_path: Path) -> None:
    specs = [ModelSpec.model_validate(model_entry(m)) for m in ("a:1", "b:1")]
    pool = make_pool(tmp_path, specs)
    pool._cluster = StandInCluster({"n1": 1})
    here = _serving(pool, "a:1", None, busy=True)
    there = _serving(pool, "b:1", "n1", busy=True)
    pool._share_cores()
    assert here[0].threads == usable_cores() and there[0].threads == 1
