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
        cluster.freeze("node_b")    # SIGSTOP of the same: a host that hangs or is cut off
        cluster.revive("node_b")    # a new node in its place (same label, a new node id)
"""

from __future__ import annotations

import contextlib
import os
import signal
import string
from collections.abc import Iterator
from typing import Any

import psutil

NODE_MEMORY_BYTES = 3 * 2**30  # each node's `memory` resource: room for a few SmolLM2s
NODE_RESOURCES: dict[str, Any] = {
    "memory": NODE_MEMORY_BYTES,
    "object_store_memory": 80 * 2**20,
}
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
    def __init__(self, cluster: Any, nodes: dict[str, Any], labels: list[str], cores: int) -> None:
        self._cluster = cluster
        self._cores = cores  # each node's CPU resource: the pool shares that many
        self._nodes = nodes  # label: ray._private.node.Node
        self._labels = labels  # every label, in order: a label's index is its address's
        self._frozen: list[int] = []  # pids stopped by `freeze`, killed at shutdown

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    @property
    def node_ids(self) -> dict[str, str]:
        return {label: node.node_id for label, node in self._nodes.items()}

    def kill(self, label: str) -> None:
        """The node's death, as a crash: its raylet and workers SIGKILLed at once."""
        self._cluster.remove_node(self._nodes.pop(label), allow_graceful=False)

    def freeze(self, label: str) -> None:
        """The node stops, as a host that hangs or loses its network: its raylet and every
        process under it (actors, the pool's workers) SIGSTOPped. Connections to it stay
        open and silent; Ray declares it dead when its health checks fail. Its processes
        are killed at shutdown."""
        node = self._nodes.pop(label)
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        stopped = [raylet, *raylet.children(recursive=True)]
        for process in stopped:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGSTOP)
        self._frozen.extend(p.pid for p in stopped)
        # Out of the Cluster's own list, or it would wait for this node in wait_for_nodes.
        self._cluster.worker_nodes.discard(node)

    def revive(self, label: str) -> None:
        """A new node in the place of `label`'s (after `kill` or `freeze`): same label
        resource and address, a new node id."""
        if label in self._nodes:
            return
        index = self._labels.index(label)
        self._nodes[label] = self._cluster.add_node(
            **NODE_RESOURCES,
            num_cpus=self._cores,
            resources={label: 1},
            node_ip_address=node_address(index),
        )
        self._cluster.wait_for_nodes()

    def kill_frozen(self) -> None:
        """SIGKILL what `freeze` stopped (a stopped process acts on no other signal)."""
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._frozen.clear()

    @classmethod
    @contextlib.contextmanager
    def start(cls, nodes: int = 2, cores_per_node: int = 1) -> Iterator[LocalRayCluster]:
        """Start it (Ray must be installed: `pip install '.[cluster]'`); shut down after.

        `cores_per_node`: the CPU resource each node declares, which the pool splits
        among that node's busy workers. The nodes all run on this machine: 1 (the
        default) keeps several busy workers from spinning on the same cores; the
        machine's own count suits one worker at a time."""
        from ray.cluster_utils import Cluster

        labels = [f"node_{letter}" for letter in string.ascii_lowercase[:nodes]]
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **NODE_RESOURCES,
                "num_cpus": cores_per_node,
                "resources": {labels[0]: 1},
                "include_dashboard": False,
                "node_ip_address": node_address(0),
                "_system_config": HEALTH_CHECKS,
            },
        )
        local = cls(cluster, {labels[0]: cluster.head_node}, labels, cores_per_node)
        try:
            for label in labels[1:]:
                local.revive(label)
            yield local
        finally:
            local.kill_frozen()
            cluster.shutdown()
