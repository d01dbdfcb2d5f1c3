"""Cluster mode: the pool's workers on the nodes of a Ray cluster (docs/SCALING.md).

The manager stays the control plane and the front door; only where a worker process runs
changes. Each worker gets a `WorkerHost` actor, which Ray places on a node that has the
resources the model asks for (`memory`: the pool's own estimate of what the model holds,
plus the registry's `placement.resources`). The actor starts the very worker process a
local pool starts (`python -m model_service.spare`) on its node, binds the worker's port
there and relays the control socket: commands from the manager are actor calls, events
come back through `events()`. Requests go straight to the worker's port on the node.

Why actors and not Serve deployments: the pool already owns what Serve would (states,
TTL, LRU, drain, admission, the HTTP relay with its retries), and a worker is one process
with a life of its own (spare, assigned, drained, recycled); an actor is exactly one
process placed by resources, whose death (its node's included) Ray reports.

A node that dies takes its actors with it: awaiting one raises RayActorError, which the
manager reads as the worker's exit (code -9, the node named in the reason), as it reads a
local worker killed; the pool then loads the model again, and Ray places it on a node
that is left. Requests that had not started are sent again (gateway.py).

Ray is an optional dependency (`pip install .[cluster]`): nothing here imports it until a
config asks for a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

from model_service.contract import LoadCommand, ModelSettings
from pool_manager.config import ClusterConfig, ModelSpec
from pool_manager.ports import listen_on_first_free
from pool_manager.worker_process import (
    ActivityCallback,
    SpareOptions,
    WorkerProcess,
    spawn_spare,
)

log = logging.getLogger(__name__)

# What a worker on another node gets of the manager's environment: the pool's own
# settings (the client key the workers check, POOL_LOG_LEVEL...), not the manager's PATH
# or HOME; never what worker_environment leaves out.
FORWARDED_ENV_PREFIX = "POOL_"
EXIT_NODE_LOST = -signal.SIGKILL
NODE_POLL_SECONDS = 2.0


class WorkerHost:
    """The actor (one per worker, on the node Ray chose): starts the worker process there
    and relays its control socket. Runs on the actor's event loop."""

    def __init__(self, options: SpareOptions, env: dict[str, str], ports: tuple[int, int]):
        self._options = options
        self._env = env
        self._ports = ports
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._events: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> dict[str, Any]:
        """Start the worker process; where it runs (pid, node id, address, host name)."""
        import ray

        from pool_manager.worker_process import worker_environment

        env = {**worker_environment(), **self._env}
        self._process, self._control = await spawn_spare(self._options, env)
        self._events, self._writer = await asyncio.open_unix_connection(sock=self._control.dup())
        return {
            "pid": self._process.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
        }

    async def events(self) -> list[bytes]:
        """The worker's next event lines; [] once it closed the socket (it exited)."""
        assert self._events is not None
        line = await self._events.readline()
        return [line] if line else []

    def command(self, line: bytes) -> None:
        assert self._control is not None
        with contextlib.suppress(OSError):  # a worker that is gone needs no command
            self._control.sendall(line)

    def load(self, line: bytes) -> int:
        """Bind the worker's port on this node (the first free one of the range) and send
        the load command with it, as the manager does for a local worker; the port."""
        assert self._control is not None
        host = _node_address()
        listener = listen_on_first_free(host, *self._ports)
        try:
            socket.send_fds(self._control, [line], [listener.fileno()])
            port: int = listener.getsockname()[1]
            return port
        finally:
            listener.close()

    def signal(self, signum: int) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

    async def wait(self) -> int:
        assert self._process is not None
        return await self._process.wait()


def _node_address() -> str:
    import ray

    address: str = ray.util.get_node_ip_address()
    return address


def _cause(error: Exception) -> str:
    """What went wrong in an actor's method, without Ray's traceback and colours."""
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, Exception) else str(error)


def _node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class _RemoteProcess:
    """A worker process on a node, as WorkerProcess sees a process (ProcessHandle)."""

    def __init__(self, actor: Any, pid: int, node_id: str) -> None:
        self._actor = actor
        self._pid = pid
        self._node_id = node_id
        self._returncode: int | None = None
        self.node_lost = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        import ray
        from ray.exceptions import RayActorError

        try:
            code: int = await self._actor.wait.remote()
        except RayActorError:
            # Its actor died with it: its node's death, or the actor's alone (crash, OOM).
            code = EXIT_NODE_LOST
            self.node_lost = not await asyncio.to_thread(_node_alive, self._node_id)
        else:
            ray.kill(self._actor, no_restart=True)  # the host has nothing left to do
        self._returncode = code
        return code

    def send_signal(self, signum: int) -> None:
        self._actor.signal.remote(signum)


class _RemoteControl:
    """Commands to a node's worker, as actor calls (in order: one caller, one actor)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def send(self, data: bytes, /) -> int:
        self._actor.command.remote(data)
        return len(data)

    def close(self) -> None:
        pass


class ClusterWorker(WorkerProcess):
    """A WorkerProcess whose process runs on a cluster node, through its WorkerHost."""

    actor: Any = None
    memory_bytes = 0  # of the node's `memory` resource, held for it

    @property
    def node_lost(self) -> bool:
        """Its node died (or its actor did): nothing the model did."""
        process = self._process
        return isinstance(process, _RemoteProcess) and process.node_lost

    @property
    def recyclable(self) -> bool:
        return False  # spares are not kept on nodes (yet): it exits when unloaded

    async def assign_on_node(self, settings: ModelSettings, on_activity: ActivityCallback) -> None:
        """Hand the worker its model; the node's host binds its port. Raises OSError."""
        from ray.exceptions import RayError

        self.model_id = settings.model_id
        self._on_activity = on_activity
        try:
            self.port = await self.actor.load.remote(LoadCommand(settings=settings).encode())
        except RayError as exc:
            raise OSError(f"the worker's node did not take the model: {_cause(exc)}") from exc


class ClusterPlacement:
    """Owns the connection to the Ray cluster and starts workers on its nodes."""

    def __init__(self, config: ClusterConfig, port_range: tuple[int, int]) -> None:
        self.config = config
        self._ports = port_range
        self._host_class: Any = None
        self._nodes: dict[str, dict[str, Any]] = {}  # node id: what we last saw of it
        self._workers: set[ClusterWorker] = set()  # started here and not exited yet
        self._watch: asyncio.Task[None] | None = None

    async def connect(self, on_node_change: Any = None) -> None:
        """Join the cluster as a driver (blocking: on a thread). Raises RuntimeError."""
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError(
                "cluster mode needs Ray: pip install '.[cluster]' (or pip install ray)"
            ) from exc

        def join() -> None:
            ray.init(
                address=self.config.address,
                namespace=self.config.namespace,
                log_to_driver=True,
                logging_level=logging.WARNING,
                configure_logging=False,
            )

        try:
            await asyncio.to_thread(join)
        except Exception as exc:  # ConnectionError, or whatever Ray says is wrong
            raise RuntimeError(
                f"cannot join the Ray cluster at {self.config.address!r}: {exc}"
            ) from exc
        self._host_class = ray.remote(WorkerHost)
        self._nodes = {n["node_id"]: n for n in self.nodes()}
        self._watch = asyncio.create_task(self._watch_nodes(on_node_change), name="ray-nodes")
        log.info(
            "joined the Ray cluster",
            extra={"address": self.config.address, "nodes": len(self._nodes)},
        )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        import ray

        await asyncio.to_thread(ray.shutdown)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node Ray knows: id, address, alive, and its memory resource (bytes)."""
        import ray

        return [
            {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "hostname": n.get("NodeManagerHostname", ""),
                "alive": bool(n["Alive"]),
                "memory_bytes": int(n.get("Resources", {}).get("memory", 0)),
                "cpus": int(n.get("Resources", {}).get("CPU", 0)),
            }
            for n in ray.nodes()
        ]

    def node_cores(self, node_id: str) -> int:
        """The cores a node offers (Ray's CPU resource: its cores unless its operator
        said otherwise, as a test cluster of several nodes on one machine does), at
        least 1; 1 for a node not seen yet."""
        node = self._nodes.get(node_id)
        return max(1, int(node["cpus"])) if node is not None else 1

    def largest_free_memory(self) -> int:
        """The most `memory` resource one live node has left (what a worker can get): its
        total less what the workers started here hold on it. Ray's own per-node count is
        a private API; the pool's workers are what uses this resource on its nodes."""
        held: dict[str, int] = {}
        for worker in self._workers:
            if worker.node is not None:
                node_id = worker.node["node_id"]
                held[node_id] = held.get(node_id, 0) + worker.memory_bytes
        free = [
            node["memory_bytes"] - held.get(node_id, 0)
            for node_id, node in self._nodes.items()
            if node["alive"]
        ]
        return max(0, max(free, default=0))

    async def _watch_nodes(self, on_change: Any) -> None:
        """Log (and tell `on_change`) when a node joins or dies: Ray notices a dead node
        within its health check period; the workers there are reported by their actors."""
        while True:
            await asyncio.sleep(NODE_POLL_SECONDS)
            try:
                seen = {n["node_id"]: n for n in await asyncio.to_thread(self.nodes)}
            except Exception as exc:  # the GCS may be restarting: try again next time
                log.warning("cannot list the cluster's nodes", extra={"reason": repr(exc)})
                continue
            for node_id, node in seen.items():
                before = self._nodes.get(node_id)
                if before is None or before["alive"] != node["alive"]:
                    change = "joined" if node["alive"] else "lost"
                    log.warning(
                        f"cluster node {change}",
                        extra={"node": node_id, "address": node["address"]},
                    )
                    if on_change is not None:
                        on_change(change, node)
            self._nodes = seen

    async def start_worker(
        self, spec: ModelSpec, options: SpareOptions, memory_bytes: int, timeout: float
    ) -> ClusterWorker:
        """A worker process on a node with `memory_bytes` of Ray's `memory` resource free
        (and the model's `placement.resources`). Raises OSError when no node takes it
        within `timeout` seconds (the actor is then given up)."""
        import ray
        from ray.exceptions import RayError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement = spec.placement
        # A model's replicas on different nodes where they can be (Ray spreads them).
        strategy: Any = "SPREAD" if spec.most_replicas > 1 else "DEFAULT"
        if placement is not None and placement.node:
            strategy = NodeAffinitySchedulingStrategy(self._node_id(placement.node), soft=True)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
        actor = self._host_class.options(
            num_cpus=0,  # the pool shares a node's cores among its workers itself
            memory=max(1, memory_bytes),
            resources=dict(placement.resources) if placement is not None else {},
            scheduling_strategy=strategy,
            max_restarts=0,
            max_concurrency=64,  # events() waits while commands come in
        ).remote(options, env, self._ports)
        try:
            where = await asyncio.wait_for(actor.start.remote(), timeout)
        except (TimeoutError, RayError) as exc:
            ray.kill(actor)
            reason = "no node has room for it" if isinstance(exc, TimeoutError) else _cause(exc)
            raise OSError(f"could not place the worker on the cluster: {reason}") from exc
        process = _RemoteProcess(actor, int(where["pid"]), str(where["node_id"]))
        worker = ClusterWorker(process, _RemoteControl(actor))
        worker.actor = actor
        worker.memory_bytes = max(1, memory_bytes)
        self._workers.add(worker)
        worker.on_exit(lambda: self._workers.discard(worker))
        worker.host = str(where["address"])
        worker.node = {k: str(where[k]) for k in ("node_id", "address", "hostname")}
        events = asyncio.StreamReader()
        worker._events_task = asyncio.create_task(
            _pump_events(actor, events, worker._read_events(events)), name=f"events:{actor}"
        )
        return worker

    def _node_id(self, wanted: str) -> str:
        """A node given by id, address or host name, as its id (unknown: as given)."""
        for node in self._nodes.values():
            if wanted in (node["node_id"], node["address"], node["hostname"]):
                return str(node["node_id"])
        return wanted


async def _pump_events(actor: Any, into: asyncio.StreamReader, reading: Any) -> None:
    """Feed the actor's event lines to the reader WorkerProcess reads (`reading`)."""
    from ray.exceptions import RayError

    reader = asyncio.create_task(reading)
    try:
        while lines := await actor.events.remote():
            for line in lines:
                into.feed_data(line)
    except RayError:
        pass  # the actor (or its node) is gone: the worker's exit says the rest
    finally:
        into.feed_eof()
        await reader
