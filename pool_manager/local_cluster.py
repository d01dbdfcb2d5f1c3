"""A real multi-node Ray cluster on loopback, for the tests and the cluster benchmark
(scripts/bench_cluster.py), or to try cluster mode on one machine: `ray.cluster_utils.Cluster`, a
head node and worker nodes as separate raylets (their own processes), each on a loopback
address of its own (127.0.0.2, 127.0.0.3...), with a label resource of its own
(`node_a`, `node_b`, ...) and a `memory` resource of its own.

Ray notices a dead node by its GCS health checks; these are made fast (half a second,
three misses) so that a test that kills a node sees it within seconds, not ~30 s.

    with LocalRayCluster.start(nodes=2) as cluster:
        cluster.address            # what the manager's config "cluster.address" takes
        cluster.node_ids["node_b"]  # the node started with the label `node_b`
        cluster.kill("node_b")      # SIGKILL of its raylet and the processes it runs
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator
from typing import Any

NODE_MEMORY_BYTES = 3 * 2**30  # each node's `memory` resource: room for a few SmolLM2s
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def node_address(index: int) -> str:
    """Node `index`'s own loopback address: 127.0.0.2, 127.0.0.3... (Ray takes
    127.0.0.1 for "this machine" and connects to its outside address instead)."""
    return f"127.0.0.{2 + index}"


class LocalRayCluster:
    def __init__(self, cluster: Any, nodes: dict[str, Any]) -> None:
        self._cluster = cluster
        self._nodes = nodes  # label: ray._private.node.Node

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    @property
    def node_ids(self) -> dict[str, str]:
        return {label: node.node_id for label, node in self._nodes.items()}

    def kill(self, label: str) -> None:
        """The node's death, as a crash: its raylet and workers SIGKILLed at once."""
        self._cluster.remove_node(self._nodes.pop(label), allow_graceful=False)

    @classmethod
    @contextlib.contextmanager
    def start(cls, nodes: int = 2) -> Iterator[LocalRayCluster]:
        """Start it (Ray must be installed: `pip install '.[cluster]'`); shut down after."""
        from ray.cluster_utils import Cluster

        labels = [f"node_{letter}" for letter in string.ascii_lowercase[:nodes]]
        common: dict[str, Any] = {
            "num_cpus": 1,
            "memory": NODE_MEMORY_BYTES,
            "object_store_memory": 80 * 2**20,
        }
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **common,
                "resources": {labels[0]: 1},
                "include_dashboard": False,
                "node_ip_address": node_address(0),
                "_system_config": HEALTH_CHECKS,
            },
        )
        started = {labels[0]: cluster.head_node}
        try:
            for index, label in enumerate(labels[1:], start=1):
                started[label] = cluster.add_node(
                    **common, resources={label: 1}, node_ip_address=node_address(index)
                )
            cluster.wait_for_nodes()
            yield cls(cluster, started)
        finally:
            cluster.shutdown()
