"""The pool: the one owner of every model's state, worker process and port.

Every state change goes through `ModelPool._set_state`, which checks it against the
transition table in `states.py`. Everything runs on the manager's event loop, so state is
only ever touched from one thread; the awaits in between are where other requests run.

Background work, each a short named function:
- `_reap_idle_models`: HOT past its TTL -> COOLING; COOLING past its grace -> unload.
- `_watch_worker`: notices a worker that died (by waiting on its process) and frees it.
- `_load_warmup_models`: loads and pins the warmup models at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import tenacity

from model_service.backends.base import BackendError
from model_service.contract import EndEvent, MemoryCeiling, ModelSettings, ReadyEvent, StartEvent
from model_service.cpus import usable_cores
from model_service.gguf import PROCESS_OVERHEAD_BYTES, MemoryEstimate, estimate_memory
from model_service.model_files import resolve_model_file
from model_service.sandbox import OUT_OF_MEMORY, MemoryCgroups, Report, default_ceiling_bytes
from model_service.secrets import SecretError, read_api_key
from model_service.weights import cache_dir as weights_cache_dir
from model_service.weights import served_path, served_size
from pool_manager.admission import AdmissionQueue, QueueFull, rank_of
from pool_manager.cluster import ClusterPlacement, ClusterWorker
from pool_manager.config import (
    ConfigError,
    ConfigStore,
    ModelSpec,
    PoolConfig,
    effective_ttl_seconds,
    match_alias,
)
from pool_manager.fork_server import ForkServerKeeper
from pool_manager.gpu import GpuMonitor
from pool_manager.memory import (
    SpareMemory,
    preload_budget,
    room_under_limit,
    spare_reserve_bytes,
    why_it_does_not_fit,
)
from pool_manager.metrics import PoolMetrics
from pool_manager.policies import (
    ColdModel,
    CoreShare,
    Demand,
    Expiring,
    Resident,
    affinity_key,
    choose_preload,
    choose_replica,
    choose_victim,
    expire,
    reload_seconds,
    replicas_wanted,
)
from pool_manager.ports import NoFreePort, PortAllocator
from pool_manager.spares import SparePool
from pool_manager.states import (
    OCCUPYING,
    SERVING,
    TRANSITIONS,
    ModelState,
    check_transition,
)
from pool_manager.worker_process import (
    SpareOptions,
    WorkerProcess,
    WorkerStartError,
    probe_sandbox,
    worker_environment,
)

log = logging.getLogger(__name__)

S = ModelState
MB = 2**20
RETRY_AFTER_FULL_SECONDS = 5
LOAD_RETRY_BASE_SECONDS = 0.5  # a failed start is retried after 0.5 s, 1 s, 2 s, ...
LOAD_RETRY_MAX_SECONDS = 8.0
MAX_FAILURE_COOLDOWN_SECONDS = 3600.0
CRASH_WINDOW_SECONDS = 60.0  # max_load_failures crashes within this window mean FAILED
FILE_CHECK_SECONDS = 1.0
FORCED_STOP_SECONDS = 2.0
HANG_CHECK_SECONDS = 1.0
ADMISSION_RECHECK_SECONDS = 1.0  # how long a forced unload lets requests hear why they end


class PoolError(Exception):
    """A request the pool cannot honour; carries what the HTTP layer needs to say so."""

    status = 500
    code = "pool_error"
    error_type = "server_error"

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param
        self.headers: dict[str, str] = {}  # more for the reply (a rate limit's figures)


class ModelNotFound(PoolError):
    status, code, error_type = 404, "model_not_found", "invalid_request_error"


class ModelConflict(PoolError):
    status, code, error_type = 409, "conflict", "invalid_request_error"


class InvalidModel(PoolError):
    status, code, error_type = 400, "invalid_value", "invalid_request_error"


class PoolFull(PoolError):
    status, code, error_type = 503, "pool_full", "server_error"


class LoadFailed(PoolError):
    status, code, error_type = 503, "model_load_failed", "server_error"


class InsufficientMemory(PoolError):
    status, code, error_type = 503, "insufficient_memory", "server_error"


class ShuttingDown(PoolError):
    status, code, error_type = 503, "shutting_down", "server_error"


class NotSaved(PoolError):
    """A change whose file could not be written: refused whole, nothing changed."""

    status, code, error_type = 500, "not_saved", "server_error"


@dataclass
class ModelRecord:
    """Everything the pool knows about one registered model."""

    spec: ModelSpec
    state: ModelState = S.COLD
    worker: WorkerProcess | None = None
    in_flight: int = 0
    requests_total: int = 0
    last_used_at: float | None = None  # wall clock, for people
    last_used_mono: float = 0.0  # monotonic, for LRU
    ttl_deadline: float | None = None  # monotonic; None while pinned or not loaded
    cooling_deadline: float | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    # Where the last load's time went: the worker's steps plus `handoff` (the manager,
    # the control socket and the worker picking the command up), in seconds.
    load_phases: dict[str, float] = field(default_factory=dict)
    weights_preloaded: bool | None = None  # the last load found its weights in a spare
    context_preloaded: bool | None = None  # ...and its context made ahead
    memory_estimate: int = 0  # bytes, set when a load starts
    keep_alive: float | None = None  # seconds to keep after the running request, if asked
    consecutive_failures: int = 0
    failed_streak: int = 0  # times in a row the model went FAILED; grows the cooldown
    crashes: int = 0
    recent_crashes: deque[float] = field(default_factory=deque)  # monotonic times
    last_error: str | None = None
    retry_at: float | None = None  # monotonic; when a FAILED model may be retried
    load_task: asyncio.Task[None] | None = None
    unload_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None  # awaits its worker's exit
    # Being deleted: no load starts for it any more, and lookups say it is not there,
    # while its worker (listed, UNLOADING) drains.
    removed: bool = False
    # Gateway requests on their way to it (loading it, or being sent): it is not idle.
    reserved: int = 0
    load_callers: int = 0  # callers of `load` waiting for the load under way
    # Chosen to make room for a waiting load while busy: it takes no new gateway request
    # (they wait, `parked`) and is evicted once the requests it has end. Bounds how long
    # a load waits behind models that never go idle under traffic.
    evicting: bool = False
    parked: int = 0  # of `reserved`, the requests waiting for it to be evicted
    demand: Demand = field(default_factory=Demand)  # how often and lately it was asked for
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Replicas: workers serving the model besides `worker` (which drives its state), the
    # requests in flight on each worker, since when an extra one has had none (monotonic),
    # and whether one is being started.
    replicas: list[WorkerProcess] = field(default_factory=list)
    worker_load: dict[WorkerProcess, int] = field(default_factory=dict)
    idle_since: dict[WorkerProcess, float] = field(default_factory=dict)
    adding_replica: bool = False
    next_in_turn: int = 0  # round-robin routing's counter

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def unused(self) -> bool:
        """No request runs on it or is on its way to it (parked ones are not)."""
        return self.in_flight == 0 and self.reserved == self.parked

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every worker serving it: `worker` first, then the replicas."""
        return [self.worker, *self.replicas] if self.worker is not None else []


def _machine(worker: WorkerProcess) -> str | None:
    """Which machine's cores a worker uses: its cluster node's id, None for this one."""
    return worker.node["node_id"] if worker.node is not None else None


class ModelPool:
    def __init__(
        self,
        store: ConfigStore,
        config: PoolConfig,
        specs: Iterable[ModelSpec],
        metrics: PoolMetrics,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self._store = store
        # What the config file says, and this run's command-line overrides (never saved).
        self._saved_config = config
        self._overrides = overrides or {}
        config = config.model_copy(update=self._overrides)
        self.config = config
        self._records: dict[str, ModelRecord] = {s.model_id: ModelRecord(s) for s in specs}
        # Registering and deleting one model id take turns (one lock per id).
        self._id_locks: dict[str, asyncio.Lock] = {}
        self._ports = PortAllocator(config.host, config.port_range.start, config.port_range.end)
        self.metrics = metrics
        # Told of every request a worker finished, with its usage (pool_manager/usage.py).
        self.request_ended: Callable[[str, EndEvent], None] | None = None
        # Told of a serving worker that exited unasked (crash, kill, its node lost), before
        # its port is released: the gateway breaks its connections to it.
        self.worker_lost: Callable[[WorkerProcess], None] | None = None
        self._capacity_lock = asyncio.Lock()
        # Loads waiting for room, and the event that wakes them (replaced each time).
        self._admission = AdmissionQueue(config.admission_queue_max)
        self._capacity_event = asyncio.Event()
        self._reaper_wakeup = asyncio.Event()
        # Per machine (None: this one; else a cluster node's id): its cores are split
        # among the workers there.
        self._core_shares: dict[str | None, CoreShare] = {}
        self._share_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._files_seen = store.fingerprint()
        self.last_reload_error: str | None = None
        self.warmup_done = asyncio.Event()
        self.gpu = GpuMonitor()
        # Listeners for state changes (GET /events); each gets its own bounded queue.
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        # Cluster mode: workers on Ray's nodes, placed by resources (pool_manager/cluster.py);
        # no spares there (yet): each load starts its worker's process on its node.
        self._cluster = (
            ClusterPlacement(config.cluster, (config.port_range.start, config.port_range.end))
            if config.cluster is not None
            else None
        )
        self._spares = SparePool(self._spares_wanted, self._start_spare)
        self._fork_server = ForkServerKeeper(config.sandbox)  # spares fork from it
        self._preload_targets: dict[str, str] = {}  # model id -> file spares load ahead
        # Workers' sandbox (read at start): what this machine gives it, found by `start`.
        self._sandboxed = config.sandbox
        self.sandbox: dict[str, Any] = {"enabled": config.sandbox, "mechanisms": {}}
        self._cgroups: MemoryCgroups | None = None
        metrics.attach(self)

    @property
    def _spares_wanted(self) -> int:
        return 0 if self._cluster is not None else self.config.spare_workers

    # --- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loops; warmup models load in the background. Raises
        RuntimeError when cluster mode cannot join its cluster."""
        if self._cluster is not None:
            await self._cluster.connect(self._on_node_change)
        await self._probe_sandbox()
        self._fork_server.start(self._spares_wanted > 0, worker_environment())
        self._refresh_preload()
        self._spares.refill()
        self._spawn_background(self._reap_idle_models(), "reaper")
        self._spawn_background(self._kill_hung_workers(), "hang-watch")
        self._spawn_background(self._watch_files(), "file-watch")
        self._spawn_background(self._load_warmup_models(), "warmup")

    async def stop(self) -> None:
        """Drain and stop every worker (each within graceful_shutdown_seconds)."""
        self._closing = True
        if self._share_timer is not None:
            self._share_timer.cancel()
        for task in list(self._background):
            task.cancel()
        loading = [r.load_task for r in self._records.values() if r.load_task]
        if loading:
            await asyncio.wait(loading, timeout=self.config.load_timeout_seconds)
        occupied = [r for r in self._records.values() if r.state in OCCUPYING]
        await asyncio.gather(
            *(self._unload(r, "shutdown", force=False) for r in occupied),
            return_exceptions=True,
        )
        await self._spares.close()
        await self._fork_server.close()
        if self._cluster is not None:
            await self._cluster.close()

    async def _start_spare(self, network: bool = False, urgent: bool = False) -> WorkerProcess:
        """A new spare: forked from the fork server when it can (milliseconds), else a
        process of its own (seconds of imports). A remote model's has the network, which
        the fork server's sandbox has not."""
        options = SpareOptions(
            graceful_seconds=self.config.graceful_shutdown_seconds,
            log_level=self.config.log_level,
            reserve_mb=0 if network else await self._spare_reserve_mb(),
            sandbox=self._sandboxed,
            network=network,
            urgent=urgent,
        )
        forks = not (network and self._sandboxed)
        server = await self._fork_server.usable(urgent=urgent) if forks else None
        if server is not None:
            try:
                return await WorkerProcess.start_spare(options, server)
            except OSError as exc:
                log.warning("the fork server could not fork a spare", extra={"reason": str(exc)})
        return await WorkerProcess.start_spare(options)

    async def _probe_sandbox(self) -> None:
        """Find what the workers' sandbox gets here; warn about each mechanism it lacks."""
        if not self._sandboxed:
            log.warning("workers run without a sandbox (config: sandbox false)")
            return
        mechanisms: Report
        mechanisms, self._cgroups = await probe_sandbox()
        self.sandbox["mechanisms"] = mechanisms
        for name, mechanism in mechanisms.items():
            if not mechanism["available"]:
                log.warning(
                    "worker sandbox: mechanism unavailable; running without it",
                    extra={"mechanism": name, "reason": mechanism["detail"]},
                )

    async def _take_worker(self, record: ModelRecord, served: str | None) -> WorkerProcess:
        """A spare (one holding the `served` file's weights, if one does); but spares have
        no network, so a remote model gets a new process."""
        if self._sandboxed and not record.spec.is_local:
            return await self._start_spare(network=True, urgent=True)
        return await self._spares.take(served)

    def _memory_ceiling(self, record: ModelRecord) -> MemoryCeiling | None:
        """The memory the model's worker may add once handed it (model_service/sandbox.py),
        and what the model needs of that: the estimate less the process's own part."""
        if not self._sandboxed:
            return None
        spec = record.spec
        estimate = record.memory_estimate
        budget = spec.memory_max_mb * MB if spec.memory_max_mb else default_ceiling_bytes(estimate)
        return MemoryCeiling(bytes=budget, need=max(0, estimate - PROCESS_OVERHEAD_BYTES))

    async def _spare_reserve_mb(self) -> int:
        """spare_reserve_mb, or by default what the largest local model's load writes on
        the heap (its repacked weights and KV cache, MemoryEstimate.written_at_load): not
        the compute buffer, of which requests write only a part, so that a worker holds
        no more than it uses.

        Never more than a quarter of the free memory: an idle spare must not crowd out
        the models themselves; nor more than memory_limit_mb leaves (pool_manager.memory).
        """
        if self.config.spare_reserve_mb is not None:
            return self.config.spare_reserve_mb
        local = [r for r in self._records.values() if r.spec.is_local]
        written = [(await self._estimate_memory(r)).written_at_load for r in local]
        largest = max(written, default=0)
        room = room_under_limit(
            self.config.memory_limit_mb * MB, self._models_estimate(), self._spare_memory()
        )
        available = psutil.virtual_memory().available
        return spare_reserve_bytes(largest, available, room) // MB

    @property
    def _weights_folder(self) -> Path:
        """Where widened weights and saved openings go (the config may change it)."""
        return weights_cache_dir(self.config.weights_cache_dir)

    @property
    def spare_pids(self) -> list[int]:
        return self._spares.pids

    def _spare_memory(self, *, but_next: bool = False) -> list[SpareMemory]:
        """What the spares hold, and the fork server that makes them (SparePool.memory)."""
        return [*self._spares.memory(but_next=but_next), *self._fork_server.memory()]

    @property
    def fork_server_pid(self) -> int | None:
        return self._fork_server.pid

    @property
    def preloaded_model_ids(self) -> list[str]:
        """COLD models whose weights a spare has loaded ahead."""
        loaded = self._spares.preloaded
        return [model_id for model_id, path in self._preload_targets.items() if path in loaded]

    def weights_loaded_ahead(self, record: ModelRecord) -> bool:
        path = self._preload_targets.get(record.model_id)
        return path is not None and path in self._spares.preloaded

    def _refresh_preload(self) -> None:
        """Tell the spares which models to load ahead (called whenever the set may change)."""
        self._preload_targets = self._preload_files()
        first = next(iter(self._preload_targets), None)
        first_settings = None
        if first is not None:
            with contextlib.suppress(InvalidModel, BackendError, OSError):
                first_settings = self._worker_settings(self._records[first].spec)
        self._spares.preload(list(self._preload_targets.values()), first_settings)

    def _preload_files(self) -> dict[str, str]:
        """model id -> served file, for the spare_preload COLD local models likeliest to be
        loaded next (pool_manager.policies.choose_preload: the most in demand first). Only
        files that exist (a widened copy not made yet is made by the first load), and
        together no more than half the available memory, nor than memory_limit_mb leaves
        beside the models and the spares' reserves: a spare maps them whole."""
        now = time.monotonic()
        cold: list[ColdModel] = []
        for record in self._records.values():
            if not record.spec.is_local or record.state is not S.COLD:
                continue
            with contextlib.suppress(InvalidModel, BackendError, OSError):
                source = Path(self._model_file(record.spec))
                path = served_path(source, record.spec.weights, self._weights_folder)
                size = path.stat().st_size
                demand = record.demand.value(now)
                cold.append(
                    ColdModel(record.model_id, str(path), size, demand, record.last_used_mono)
                )
        # The spares' processes and reserves only: their weights are what this decides.
        reserves = [SpareMemory(0, 0, s.reserve) for s in self._spare_memory()]
        room = room_under_limit(self.config.memory_limit_mb * MB, self._models_estimate(), reserves)
        budget = preload_budget(psutil.virtual_memory().available, room, self._spares.size)
        return choose_preload(cold, self.config.spare_preload, budget)

    def _spawn_background(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- queries ----------------------------------------------------------------------------

    def get(self, model_id: str) -> ModelRecord:
        """Raises ModelNotFound (also for a model being deleted)."""
        record = self._records.get(model_id)
        if record is None or record.removed:
            raise ModelNotFound(f"model '{model_id}' is not registered")
        return record

    def resolve(self, name: str) -> ModelRecord:
        """The model a client named: by id, by an alias, or by an alias pattern such as
        `claude-*` (the most specific wins; see `match_alias`). Raises ModelNotFound."""
        record = self._records.get(name)
        if record is not None and not record.removed:
            return record
        spec = match_alias(name, (r.spec for r in self._records.values() if not r.removed))
        if spec is not None:
            return self._records[spec.model_id]
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def is_pinned(self, record: ModelRecord) -> bool:
        return record.spec.warmup or record.model_id in self.config.warmup_models

    def ttl_seconds(self, record: ModelRecord) -> float:
        return effective_ttl_seconds(self.config, record.spec)

    def ttl_remaining(self, record: ModelRecord) -> float | None:
        """Seconds until the model starts cooling; None when it never expires."""
        if record.state not in SERVING or self.is_pinned(record) or not self.config.auto_unload:
            return None
        if record.state is S.COOLING:
            return 0.0
        if record.in_flight or record.ttl_deadline is None:
            return self.ttl_seconds(record)  # TTL counts from the end of the last request
        return max(0.0, record.ttl_deadline - time.monotonic())

    def cooling_remaining(self, record: ModelRecord) -> float | None:
        if record.state is not S.COOLING or record.cooling_deadline is None:
            return None
        return max(0.0, record.cooling_deadline - time.monotonic())

    def retry_after(self, record: ModelRecord) -> float | None:
        if record.state is not S.FAILED or record.retry_at is None:
            return None
        return max(0.0, record.retry_at - time.monotonic())

    @staticmethod
    def memory_rss_bytes(record: ModelRecord) -> int | None:
        """The worker's resident memory; None without a worker or for one on a cluster
        node (its pid is that node's)."""
        if record.worker is None or record.worker.node is not None:
            return None
        try:
            return int(psutil.Process(record.worker.pid).memory_info().rss)
        except psutil.Error:
            return None

    def vram_bytes(self, record: ModelRecord) -> int | None:
        """GPU memory of the model's worker; None without a GPU or a worker."""
        if record.worker is None or record.worker.node is not None or not self.gpu.available:
            return None
        return self.gpu.vram_bytes_by_pid().get(record.worker.pid, 0)

    @property
    def cluster_nodes(self) -> list[dict[str, Any]] | None:
        """The Ray cluster's nodes in cluster mode (GET /health), else None."""
        return self._cluster.nodes() if self._cluster is not None else None

    def memory_summary(self) -> dict[str, Any]:
        gpu_free = self.gpu.free_bytes()
        return {
            "limit_mb": self.config.memory_limit_mb,
            "estimated_use_mb": self._models_estimate() // MB,
            # Counted against limit_mb too: what the spare workers hold (measured RSS).
            "spares_mb": sum(s.held for s in self._spare_memory()) // MB,
            "available_mb": psutil.virtual_memory().available // MB,
            "gpu_available": self.gpu.available,
            "gpu_free_mb": None if gpu_free is None else gpu_free // MB,
        }

    def admission_waiting(self) -> list[str]:
        """The models whose loads wait for room, first in line first."""
        return self._admission.waiting()

    def available_ports(self) -> int:
        return self._ports.available()

    # --- registry ---------------------------------------------------------------------------

    def _id_lock(self, model_id: str) -> asyncio.Lock:
        return self._id_locks.setdefault(model_id, asyncio.Lock())

    async def register(self, spec: ModelSpec, *, replace: bool = False) -> ModelRecord:
        """Add (or with `replace`, update) a model, saved to the registry file first.

        A loaded model keeps running with its old settings until it is next loaded. Waits
        for a delete of the same id to finish. Raises ModelConflict, InvalidModel, or
        NotSaved (nothing changed).
        """
        async with self._id_lock(spec.model_id):
            existing = self._records.get(spec.model_id)
            if existing is not None and not replace:
                raise ModelConflict(
                    f"model '{spec.model_id}' is already registered; send replace=true to update it"
                )
            if spec.is_local:
                self._model_file(spec)
            self._save_registry(self._registry_with(spec))
            if existing is not None:
                existing.spec = spec
                record = existing
            else:
                record = self._records[spec.model_id] = ModelRecord(spec)
            self._refresh_preload()
        log.info("model registered", extra={"model": spec.model_id, "replaced": bool(existing)})
        return record

    @property
    def registry_dir(self) -> Path:
        """The registry file's folder (relative paths in the config are from there)."""
        return self._store.registry_dir

    def _registry_with(self, spec: ModelSpec) -> list[ModelSpec]:
        """The registry with `spec` in place of the entry of its id (or added last).
        Models being deleted are out of it already."""
        specs = [r.spec for r in self._records.values() if not r.removed]
        ids = [s.model_id for s in specs]
        if spec.model_id in ids:
            specs[ids.index(spec.model_id)] = spec
        else:
            specs.append(spec)
        return specs

    async def delete(self, model_id: str) -> None:
        """Forget a model: saved to the registry file first, then its worker drains.

        Raises ModelNotFound, or NotSaved (nothing changed).
        """
        async with self._id_lock(model_id):
            record = self.get(model_id)
            kept = [r.spec for r in self._records.values() if r is not record and not r.removed]
            self._save_registry(kept)
            if model_id in self._saved_config.warmup_models:
                warmups = [m for m in self._saved_config.warmup_models if m != model_id]
                self.update_config({"warmup_models": warmups})
            await self._remove(record)
        log.info("model deleted", extra={"model": model_id})

    async def _remove(self, record: ModelRecord) -> None:
        """Drain and stop the model's worker, then forget it (its id's lock held)."""
        record.removed = True  # from here no load starts and lookups miss it
        try:
            await self._unload(record, "deleted", force=False)
        finally:
            if self._records.get(record.model_id) is record:
                del self._records[record.model_id]
            self._refresh_preload()

    async def _remove_locked(self, record: ModelRecord) -> None:
        async with self._id_lock(record.model_id):
            if self._records.get(record.model_id) is record:
                await self._remove(record)

    def _apply_config(self, saved: PoolConfig) -> None:
        self._saved_config = saved
        self.config = saved.model_copy(update=self._overrides)
        self._ports.set_range(self.config.port_range.start, self.config.port_range.end)
        self._spares.resize(self._spares_wanted)
        self._fork_server.want(self._spares_wanted > 0, worker_environment())
        self._admission.max_waiting = self.config.admission_queue_max
        self._refresh_preload()
        self._reaper_wakeup.set()

    def update_config(self, changes: dict[str, Any]) -> PoolConfig:
        """Validate, persist and apply a partial config. Raises ValueError if invalid.

        host and port take effect at the next start; everything else at once.
        """
        merged = _deep_merge(self._saved_config.model_dump(), changes)
        saved = PoolConfig.model_validate(merged)
        try:
            self._store.save_config(saved)
        except (OSError, ValueError, RecursionError) as exc:
            raise NotSaved(f"the config was not changed: {_why_not_saved(exc)}") from exc
        self._files_seen = self._store.fingerprint()
        self._apply_config(saved)
        return self.config

    def _save_registry(self, specs: list[ModelSpec]) -> None:
        """Write the registry as `specs`; raises NotSaved when the file cannot be written,
        before anything in memory changes (what the API shows is what a restart loads)."""
        try:
            self._store.save_registry(specs)
        except (OSError, ValueError, RecursionError) as exc:
            raise NotSaved(f"the registry was not changed: {_why_not_saved(exc)}") from exc
        self._files_seen = self._store.fingerprint()  # our own write is not an edit

    # --- hot reload -------------------------------------------------------------------------

    async def _watch_files(self) -> None:
        """Pick up hand edits of the config and registry files (checked every second)."""
        while True:
            await asyncio.sleep(FILE_CHECK_SECONDS)
            if self._store.fingerprint() != self._files_seen:
                await self.reload_files()

    async def reload_files(self) -> dict[str, Any]:
        """Re-read both files and apply them without touching models that stay.

        New models are added (warmup ones loaded), removed ones unloaded (drained) and
        forgotten, changed ones take their new settings at their next load. An invalid
        file changes nothing: the error is logged and kept in `last_reload_error`.
        """
        self._files_seen = self._store.fingerprint()
        try:
            config = self._store.load_config()
            specs = {spec.model_id: spec for spec in self._store.load_registry()}
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            log.error(
                "config or registry edit refused; the running one stays", extra={"reason": str(exc)}
            )
            return {"applied": False, "error": str(exc)}
        self.last_reload_error = None
        self._apply_config(config)
        added = [m for m in specs if m not in self._records]
        removed = [m for m in self._records if m not in specs]
        changed = [
            m for m, spec in specs.items() if m in self._records and self._records[m].spec != spec
        ]
        for model_id in changed:
            self._records[model_id].spec = specs[model_id]
        for model_id in added:
            self._records[model_id] = ModelRecord(specs[model_id])
            if self.is_pinned(self._records[model_id]):
                self._spawn_background(
                    self._reload_pinned(self._records[model_id]), f"warmup:{model_id}"
                )
        # All removed models drain at once: the reload takes one drain, not one per model.
        leaving = [self._records[model_id] for model_id in removed]
        await asyncio.gather(*(self._remove_locked(r) for r in leaving))
        summary = {"applied": True, "added": added, "removed": removed, "changed": changed}
        log.info("config and registry reloaded", extra=summary)
        return summary

    def _model_file(self, spec: ModelSpec) -> str:
        try:
            return str(
                resolve_model_file(spec.model_path, spec.package_file, self._store.registry_dir)
            )
        except BackendError as exc:
            raise InvalidModel(str(exc)) from exc

    # --- load -------------------------------------------------------------------------------

    async def load(self, model_id: str) -> ModelRecord:
        """Return once the model serves, loading it if needed.

        Concurrent callers share one load. A load still waiting for room when its last
        caller is cancelled (its client went away) is given up. Raises ModelNotFound,
        PoolFull (nothing can be evicted), LoadFailed, ShuttingDown.
        """
        return await self.load_record(self.get(model_id))

    async def load_record(self, record: ModelRecord) -> ModelRecord:
        """`load` for a record already looked up: ModelNotFound once it is deleted, even
        if its id was registered again meanwhile (that is another record, with its own
        worker; a request holding this one must not wait on a worker it never gets)."""
        model_id = record.model_id
        while True:
            if self._closing:
                raise ShuttingDown("the pool manager is shutting down")
            if record.removed:
                raise ModelNotFound(f"model '{model_id}' is not registered")
            if record.state in SERVING and not record.evicting:
                return record
            if record.evicting:
                await self._wait_evicted(record)
                continue
            if record.unload_task is not None:
                await asyncio.shield(record.unload_task)
                continue
            if record.state is S.FAILED and (self.retry_after(record) or 0) > 0:
                raise LoadFailed(
                    f"model '{model_id}' failed to load: {record.last_error}",
                    retry_after=self.retry_after(record),
                )
            if record.load_task is None:
                record.load_task = asyncio.create_task(self._load(record), name=f"load:{model_id}")
            load_task = record.load_task
            record.load_callers += 1
            try:
                await asyncio.shield(load_task)
            finally:
                record.load_callers -= 1
                if record.load_callers == 0 and record.state is S.COLD and not load_task.done():
                    # Nobody waits for it any more, and it is still waiting for room.
                    log.info("load given up: no caller left", extra={"model": model_id})
                    load_task.cancel()

    async def _wait_evicted(self, record: ModelRecord) -> None:
        """Wait until `record` is no longer being evicted (it was, or that was called
        off); meanwhile this caller's reservation does not keep it busy."""
        record.parked += 1
        try:
            if record.unused:
                self._capacity_changed()
            while record.evicting:
                await self._capacity_event.wait()
        finally:
            record.parked -= 1

    async def _load(self, record: ModelRecord) -> None:
        try:
            await self._admit(record)
            try:
                await self._start_with_retries(record)
            except WorkerStartError as exc:
                self._give_up_loading(record)
                raise LoadFailed(
                    f"model '{record.model_id}' failed to load: {exc}",
                    retry_after=self.retry_after(record),
                ) from exc
            except PoolFull:
                self._set_state(record, S.COLD, "no free port")
                raise
        finally:
            record.load_task = None

    async def _start_with_retries(self, record: ModelRecord) -> None:
        """Start the worker; retry failures that may pass (crash, timeout) with backoff.

        A worker that reports the model cannot load (bad file) is not retried.
        Raises WorkerStartError (the last failure) or PoolFull (no port).
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.config.max_load_failures),
            wait=tenacity.wait_exponential(
                multiplier=LOAD_RETRY_BASE_SECONDS, max=LOAD_RETRY_MAX_SECONDS
            ),
            retry=tenacity.retry_if_exception(
                lambda exc: isinstance(exc, WorkerStartError) and not exc.permanent
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._start_worker(record)

    def _allocate_port(self) -> socket.socket:
        try:
            return self._ports.allocate()
        except NoFreePort as exc:
            raise PoolFull(str(exc), retry_after=RETRY_AFTER_FULL_SECONDS) from exc

    async def _start_worker(self, record: ModelRecord) -> None:
        """One attempt: a port, a process, its ready report. Raises WorkerStartError."""
        if self._cluster is not None:
            return await self._start_worker_on_cluster(record, self._cluster)
        sock = self._allocate_port()
        port = sock.getsockname()[1]
        started = time.perf_counter()
        try:
            settings = self._worker_settings(record.spec, self._memory_ceiling(record))
            worker = await self._take_worker(record, settings.served_model_path)
        except (InvalidModel, OSError) as exc:
            sock.close()
            self._ports.release(port)
            self._count_load_failure(record, str(exc))
            raise WorkerStartError(str(exc), permanent=True) from exc
        record.worker = worker
        try:
            worker.assign(settings, sock, partial(self._on_activity, record), self._cgroups)
        except OSError as exc:  # the spare died meanwhile: worth another try
            worker.kill()
            await worker.wait_exit()
            self._ports.release(port)
            record.worker = None
            self._count_load_failure(record, f"spare worker gone: {exc}")
            raise WorkerStartError(str(exc)) from exc
        try:
            ready = await worker.wait_ready(self.config.load_timeout_seconds)
        except BaseException as exc:
            worker.kill()
            await worker.wait_exit()
            self._ports.release(port)
            record.worker = None
            self._count_load_failure(record, str(exc) or type(exc).__name__)
            raise
        self._loaded(record, worker, ready, started)

    async def _start_worker_on_cluster(
        self, record: ModelRecord, cluster: ClusterPlacement
    ) -> None:
        """One attempt in cluster mode: a worker process on a node with room for the model
        (Ray places it), its port bound there, its ready report. Raises WorkerStartError."""
        started = time.perf_counter()
        options = self._cluster_options(record)
        try:
            settings = self._worker_settings(record.spec)  # no ceiling: nodes differ
            worker = await cluster.start_worker(
                record.spec, options, record.memory_estimate, self.config.load_timeout_seconds
            )
        except (InvalidModel, OSError) as exc:
            self._count_load_failure(record, str(exc))
            raise WorkerStartError(str(exc), permanent=isinstance(exc, InvalidModel)) from exc
        record.worker = worker
        try:
            await worker.assign_on_node(settings, partial(self._on_activity, record))
            ready = await worker.wait_ready(self.config.load_timeout_seconds)
        except BaseException as exc:
            worker.kill()
            await worker.wait_exit()
            record.worker = None
            self._count_load_failure(record, str(exc) or type(exc).__name__)
            if isinstance(exc, OSError):
                raise WorkerStartError(str(exc)) from exc
            raise
        self._loaded(record, worker, ready, started)

    def _cluster_options(self, record: ModelRecord) -> SpareOptions:
        return SpareOptions(
            self.config.graceful_shutdown_seconds,
            self.config.log_level,
            sandbox=self._sandboxed,
            network=not record.spec.is_local,
        )

    def _loaded(
        self, record: ModelRecord, worker: WorkerProcess, ready: ReadyEvent, started: float
    ) -> None:
        """`record`'s worker serves: HOT, with its load's figures; watched from now on."""
        port = worker.port
        record.load_seconds = time.perf_counter() - started
        handoff = max(0.0, record.load_seconds - ready.load_seconds)
        record.load_phases = {"handoff": handoff, **ready.load_phases}
        record.weights_preloaded = ready.weights_preloaded
        record.context_preloaded = ready.context_preloaded
        record.loaded_at = time.time()
        record.consecutive_failures = 0
        record.last_error = None
        record.retry_at = None
        record.last_used_mono = time.monotonic()
        record.ttl_deadline = time.monotonic() + self.ttl_seconds(record)
        self._set_state(record, S.HOT)
        self.metrics.load_finished(record.model_id, "ok", record.load_seconds)
        log.info(
            "model loaded",
            extra={
                "model": record.model_id,
                "port": port,
                "pid": worker.pid,
                "load_seconds": round(record.load_seconds, 3),
                **({"node": worker.node["address"]} if worker.node else {}),
            },
        )
        record.watch_task = self._spawn_background(
            self._watch_worker(record, worker), f"watch:{record.model_id}"
        )
        self._scale_up_if_queued(record)  # to `replicas`, if more than one

    def _worker_settings(
        self, spec: ModelSpec, ceiling: MemoryCeiling | None = None
    ) -> ModelSettings:
        """The `load` settings of `spec`'s worker: the registry entry's fields a worker
        reads, the model's files or key, the pool's own limits and `ceiling`. Raises
        InvalidModel when its file or its key cannot be found."""
        settings = spec.model_dump(mode="json", include=set(ModelSettings.model_fields))
        if spec.is_local:
            source = Path(self._model_file(spec))
            settings["model_path"] = str(source)
            folder = self._weights_folder
            settings["weights_cache_dir"] = str(folder)
            # The header was read (and cached) for the memory estimate just before. A bad
            # file: the worker's load names what is wrong with it.
            with contextlib.suppress(BackendError):
                settings["served_model_path"] = str(served_path(source, spec.weights, folder))
        else:
            # Workers hold no secrets of their own: the manager lends this model its key.
            try:
                settings["api_key"] = read_api_key(spec.model_dump())
            except SecretError as exc:
                raise InvalidModel(str(exc)) from None
        settings["ollama_base_url"] = self.config.ollama_base_url
        settings["max_request_bytes"] = self.config.max_request_bytes
        settings["allowed_hosts"] = self.config.allowed_hosts
        settings["allowed_origins"] = self.config.allowed_origins
        return ModelSettings.model_validate({**settings, "memory_ceiling": ceiling})

    def _count_load_failure(self, record: ModelRecord, reason: str) -> None:
        self._spares.refill()
        record.consecutive_failures += 1
        record.last_error = reason
        self.metrics.load_finished(record.model_id, "failed", None)
        log.error(
            "model failed to load",
            extra={
                "model": record.model_id,
                "reason": reason,
                "failures": record.consecutive_failures,
            },
        )

    def _give_up_loading(self, record: ModelRecord) -> None:
        if record.consecutive_failures >= self.config.max_load_failures:
            self._enter_failed(record)
        else:
            self._set_state(record, S.COLD)

    def _enter_failed(self, record: ModelRecord) -> None:
        """FAILED, with a cooldown that doubles each time in a row (capped)."""
        cooldown = min(
            self.config.failure_cooldown_seconds * 2 ** min(record.failed_streak, 10),
            MAX_FAILURE_COOLDOWN_SECONDS,
        )
        record.failed_streak += 1
        record.retry_at = time.monotonic() + cooldown
        self._set_state(record, S.FAILED, f"retry in {cooldown:g} s")
        if self.is_pinned(record) and not self._closing:
            self._spawn_background(
                self._reload_pinned(record, delay=cooldown), f"retry:{record.model_id}"
            )

    async def _admit(self, record: ModelRecord) -> None:
        """Wait in the admission queue until `record` fits, then mark it WARMING.

        Waits up to admission_timeout_seconds for requests to end or models to unload
        (pool_manager/admission.py). Raises PoolFull or InsufficientMemory when the
        queue is full, the wait runs out, or waiting cannot help.
        """
        rank = rank_of(record.spec.priority, self.is_pinned(record))
        try:
            ticket = self._admission.enter(record.model_id, rank)
        except QueueFull as exc:
            raise PoolFull(
                f"cannot load '{record.model_id}': {exc} (admission_queue_max="
                f"{self.config.admission_queue_max})",
                retry_after=RETRY_AFTER_FULL_SECONDS,
            ) from None
        deadline = time.monotonic() + self.config.admission_timeout_seconds
        reason = "other loads are ahead of it in the admission queue"
        try:
            while True:
                changed = self._capacity_event  # taken first: a change meanwhile counts
                if self._admission.is_first(ticket):
                    async with self._capacity_lock:
                        reason = await self._make_room_for(record) or ""
                        if not reason:
                            self._set_state(record, S.WARMING)
                            return
                left = deadline - time.monotonic()
                if left <= 0:
                    error = PoolFull if "max_concurrent_models" in reason else InsufficientMemory
                    raise error(
                        f"cannot load '{record.model_id}': {reason}, and nothing freed room "
                        f"within admission_timeout_seconds="
                        f"{self.config.admission_timeout_seconds:g}",
                        retry_after=RETRY_AFTER_FULL_SECONDS,
                    )
                # Also every second: free memory changes with no event of ours.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left, ADMISSION_RECHECK_SECONDS))
        finally:
            self._admission.leave(ticket)
            if not len(self._admission):
                self._call_off_evictions()
            self._capacity_changed()  # the next in line tries

    @contextlib.contextmanager
    def reserve(self, record: ModelRecord) -> Iterator[None]:
        """Mark a request on its way to `record` (loading it, or being sent to its
        worker): the model is not evicted meanwhile, as if the request ran there."""
        record.reserved += 1
        try:
            yield
        finally:
            record.reserved -= 1
            if record.unused:
                self._capacity_changed()

    async def wait_released(
        self, record: ModelRecord, worker: WorkerProcess, timeout: float
    ) -> bool:
        """Wait up to `timeout` for the pool to free `worker` (it died, or was unloaded);
        False if it is still the model's worker then."""
        deadline = time.monotonic() + timeout
        while worker in record.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed = self._capacity_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return True

    def _capacity_changed(self) -> None:
        """Wake the loads waiting for room: something that may free some happened."""
        self._capacity_event.set()
        self._capacity_event = asyncio.Event()

    async def _make_room_for(self, record: ModelRecord) -> str | None:
        """Evict least-recently-used idle models until `record` fits; None when it does,
        else why it does not yet (every other model busy, memory short).

        Fits means: under max_concurrent_models, the sum of memory estimates within
        memory_limit_mb, and the estimate within the machine's available memory.
        Raises PoolFull or InsufficientMemory when waiting cannot help: the model is
        bigger than memory_limit_mb, or every loaded model is pinned.
        """
        need = record.memory_estimate = (await self._estimate_memory(record)).total
        limit = self.config.memory_limit_mb * MB
        if need > limit:
            raise InsufficientMemory(
                f"cannot load '{record.model_id}': it needs about {need // MB} MB, more than "
                f"memory_limit_mb={self.config.memory_limit_mb}"
            )
        while True:
            occupying = [
                r for r in self._records.values() if r.state in OCCUPYING and r is not record
            ]
            # A sandboxed remote model gets a new process, not a spare (_take_worker).
            takes_spare = record.spec.is_local or not self._sandboxed
            reason = self._why_it_does_not_fit(occupying, need, takes_spare)
            if reason is None:
                return None
            short_of_memory = "max_concurrent_models" not in reason
            victim = self._eviction_candidate(occupying, short_of_memory=short_of_memory)
            if victim is not None:
                log.info(
                    "evicting the idle model least worth keeping",
                    extra={
                        "model": victim.model_id,
                        "for_model": record.model_id,
                        "because": reason,
                        "demand": round(victim.demand.value(time.monotonic()), 2),
                    },
                )
                self.metrics.evicted(victim.model_id, "memory" if short_of_memory else "slots")
                # Short of slots, its worker goes back to the spares and serves the next
                # load; short of memory, it exits and frees what it held.
                await self._unload(victim, "evicted", force=False, keep_process=not short_of_memory)
                continue
            stopping = [r.unload_task for r in occupying if r.unload_task is not None]
            if stopping:
                await asyncio.wait(stopping, return_when=asyncio.FIRST_COMPLETED)
                continue
            if occupying and all(self.is_pinned(r) for r in occupying):
                error = PoolFull if "max_concurrent_models" in reason else InsufficientMemory
                raise error(
                    f"cannot load '{record.model_id}': {reason}, and every loaded model "
                    "is pinned (warmup)",
                    retry_after=RETRY_AFTER_FULL_SECONDS,
                )
            if not any(r.evicting for r in occupying):
                self._evict_when_done(occupying, record, short_of_memory=short_of_memory)
            return reason  # a busy model will be evictable once its requests end

    def _evict_when_done(
        self, occupying: list[ModelRecord], waiting: ModelRecord, *, short_of_memory: bool
    ) -> None:
        """Every loaded model is busy: mark the one least worth keeping (not pinned, not
        of a higher priority than `waiting`) to take no new requests, so that it is idle,
        and evicted, once the requests it has end. Under steady traffic a model may never
        be idle otherwise, and the waiting load would wait out its deadline."""
        now = time.monotonic()
        rank = rank_of(waiting.spec.priority, False)
        busy = [
            _resident(r, now)
            for r in occupying
            if r.state in SERVING
            and not self.is_pinned(r)
            and r.unload_task is None
            and rank_of(r.spec.priority, False) >= rank
        ]
        chosen = choose_victim(busy, short_of_memory=short_of_memory)
        if chosen is None:
            return
        victim = self._records[chosen.model_id]
        victim.evicting = True
        log.info(
            "the busy model least worth keeping takes no new requests until it is evicted",
            extra={
                "model": victim.model_id,
                "for_model": waiting.model_id,
                "in_flight": victim.in_flight,
            },
        )

    def _call_off_evictions(self) -> None:
        """No load waits for room any more: models marked to be evicted serve again."""
        for record in self._records.values():
            record.evicting = False

    def _models_estimate(self) -> int:
        """The estimates of the models holding a worker, in bytes."""
        return sum(
            r.memory_estimate * max(1, len(r.workers))
            for r in self._records.values()
            if r.state in OCCUPYING
        )

    def _why_it_does_not_fit(
        self,
        occupying: list[ModelRecord],
        need: int,
        takes_spare: bool = True,
        *,
        new_model: bool = True,
    ) -> str | None:
        """The rules are pool_manager.memory's; this gathers the numbers. The spare the
        load takes (`takes_spare`) is the model's worker-to-be: not counted apart, and the
        heap it mapped ahead serves the model's buffers. A replica of a loaded model
        (`new_model` false) takes no slot of max_concurrent_models."""
        if new_model and len(occupying) >= self.config.max_concurrent_models:
            return f"max_concurrent_models={self.config.max_concurrent_models} models are loaded"
        return why_it_does_not_fit(
            need,
            limit=self.config.memory_limit_mb * MB,
            models=sum(r.memory_estimate * max(1, len(r.workers)) for r in occupying),
            spares=self._spare_memory(but_next=takes_spare),
            # In cluster mode, what the roomiest node has left (Ray's `memory` resource).
            available=(
                self._cluster.largest_free_memory()
                if self._cluster is not None
                else psutil.virtual_memory().available
            ),
            reusable=self._spares.reserved_bytes if takes_spare else 0,
        )

    async def _estimate_memory(self, record: ModelRecord) -> MemoryEstimate:
        """What the model's worker will hold once loaded, by part: resident weights, KV
        cache, what requests write of the compute buffer, the process
        (model_service.gguf.estimate_memory)."""
        nothing_local = MemoryEstimate(weights=0, repacked=0, kv_cache=0, compute=0)
        if not record.spec.is_local:
            return nothing_local  # the weights live on another server
        try:
            spec = record.spec
            path = Path(self._model_file(spec))
            # Every slot (max_concurrent of them) has its own n_ctx of KV cache.
            cells = spec.n_ctx * spec.max_concurrent
            # As model_service.backends.llama_cpp.ContextShape sizes the batch.
            n_ubatch = min(512, max(spec.n_batch, spec.max_concurrent))
            folder = self._weights_folder
            weights, repacked = await asyncio.to_thread(served_size, path, spec.weights, folder)
            return await asyncio.to_thread(
                estimate_memory, path, cells, spec.max_concurrent, weights, repacked, n_ubatch
            )
        except (InvalidModel, BackendError):
            # The worker's load will report what is wrong with the file, clearly.
            return nothing_local

    def _eviction_candidate(
        self, occupying: list[ModelRecord], *, short_of_memory: bool
    ) -> ModelRecord | None:
        """The idle, unpinned model to evict (pool_manager.policies.choose_victim: weighs
        demand, reload cost and, when memory is short, size)."""
        now = time.monotonic()
        idle = [
            r
            for r in occupying
            if r.state in SERVING and r.unused and not self.is_pinned(r) and r.unload_task is None
        ]
        # One marked for a waiting load while it was busy goes first, now that it is idle.
        marked = next((r for r in idle if r.evicting), None)
        if marked is not None:
            return marked
        victim = choose_victim([_resident(r, now) for r in idle], short_of_memory=short_of_memory)
        return None if victim is None else self._records[victim.model_id]

    # --- unload -----------------------------------------------------------------------------

    async def unload(self, model_id: str, *, force: bool = False) -> ModelRecord:
        """Stop the model's worker: drain first unless `force`. Raises ModelNotFound."""
        record = self.get(model_id)
        if record.state is S.FAILED:
            # Unloading a FAILED model is how an operator clears its cooldown.
            record.consecutive_failures = 0
            record.failed_streak = 0
            record.retry_at = None
            self._set_state(record, S.COLD)
            return record
        await self._unload(
            record, "forced" if force else "requested", force=force, keep_process=not force
        )
        return record

    async def _unload(
        self, record: ModelRecord, reason: str, *, force: bool, keep_process: bool = False
    ) -> None:
        """Drain (or with `force`, abort) and stop the model's worker; waits for it.
        `keep_process`: a drained worker of a local chat model goes back to the spares
        (`_drain_and_stop`) instead of exiting."""
        if record.load_task is not None:
            # Let a load in progress finish first; its outcome does not matter here.
            with contextlib.suppress(PoolError):
                await asyncio.shield(record.load_task)
        if record.unload_task is None:
            if record.state not in SERVING:
                return
            record.unload_task = asyncio.create_task(
                self._drain_and_stop(record, reason, force, keep_process),
                name=f"unload:{record.model_id}",
            )
        elif force and record.worker is not None:
            # A forced unload overrides a drain in progress.
            self._spawn_background(record.worker.abort(FORCED_STOP_SECONDS), "abort")
        await asyncio.shield(record.unload_task)

    async def _drain_and_stop(
        self, record: ModelRecord, reason: str, force: bool, keep_process: bool
    ) -> None:
        worker = record.worker
        assert worker is not None
        try:
            self._set_state(record, S.UNLOADING, reason)
            grace = self.config.graceful_shutdown_seconds
            if force:
                # Running requests end with a clear error, not a cut connection.
                await worker.abort(timeout=FORCED_STOP_SECONDS)
            else:
                worker.begin_drain()
                # Drain: wait for in-flight requests (or for the worker to die meanwhile).
                waits = [
                    asyncio.ensure_future(record.idle.wait()),
                    asyncio.ensure_future(worker.wait_exit()),
                ]
                _, pending = await asyncio.wait(
                    waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                for waiting in pending:
                    waiting.cancel()
            replicas, record.replicas = record.replicas, []
            await asyncio.gather(
                *(self._stop_replica(record, replica, force=force) for replica in replicas)
            )
            recycled = False
            if self._recyclable(record, worker, keep_process):
                # Its process serves the next load: no new process, the weights still
                # loaded, its model's freed buffers mapped for the next one's.
                if record.watch_task is not None:
                    record.watch_task.cancel()  # its exit is no longer this model's
                recycled = await worker.recycle(timeout=grace)
            else:
                # SIGTERM: the worker stops accepting and finishes what raced in meanwhile.
                await worker.stop(timeout=grace)
            self._release_worker(record)
            record.failed_streak = 0  # it served until we stopped it: healthy
            self._set_state(record, S.COLD)
            if recycled:
                # After the state change: the list of models to load ahead has this one
                # (COLD now), so the spare keeps its weights rather than drop them first.
                self._spares.adopt(worker)
            self.metrics.unloaded(record.model_id, reason)
            log.info("model unloaded", extra={"model": record.model_id, "reason": reason})
        finally:
            record.unload_task = None

    def _recyclable(self, record: ModelRecord, worker: WorkerProcess, keep_process: bool) -> bool:
        """Whether a drained worker goes back to the spares: asked for, wanted there, a
        local chat model's (spares have no network; an embedding model keeps nothing a
        chat model's load could take), and nothing still in flight on it."""
        return (
            keep_process
            and self._spares.wants_workers_back
            and record.spec.is_local
            and record.spec.model_type != "embedding"
            and record.in_flight == 0
            and worker.recyclable
        )

    def _release_port(self, worker: WorkerProcess) -> None:
        if worker.node is None:  # a port of ours, not one of a cluster node's
            self._ports.release(worker.port)

    def _release_worker(self, record: ModelRecord) -> None:
        for worker in record.workers:
            self._release_port(worker)
        record.worker = None
        record.replicas = []
        record.worker_load.clear()
        record.idle_since.clear()
        record.in_flight = 0
        record.evicting = False
        record.idle.set()
        record.ttl_deadline = None
        record.cooling_deadline = None
        record.loaded_at = None

    # --- TTL --------------------------------------------------------------------------------

    def extend_ttl(self, model_id: str, minutes: float) -> ModelRecord:
        """Add `minutes` to a loaded model's remaining TTL (capped at max_ttl_minutes).

        A COOLING model goes back to HOT. Raises ModelNotFound, ModelConflict.
        """
        record = self.get(model_id)
        remaining = self.ttl_remaining(record) or 0.0
        return self.set_ttl_remaining(model_id, remaining + minutes * 60.0)

    def set_ttl_remaining(self, model_id: str, seconds: float) -> ModelRecord:
        """Make a loaded model expire `seconds` from now (capped at max_ttl_minutes).

        Shortens as well as lengthens (Ollama's keep_alive). A COOLING model goes back to
        HOT. Raises ModelNotFound, ModelConflict.
        """
        record = self.get(model_id)
        if record.state not in SERVING:
            raise ModelConflict(f"model '{model_id}' is {record.state}, not loaded")
        cap = self.config.max_ttl_minutes * 60.0
        seconds = max(0.0, min(seconds, cap))
        record.ttl_deadline = time.monotonic() + seconds
        if record.in_flight:
            record.keep_alive = seconds  # counted again from the end of what is running
        if record.state is S.COOLING:
            record.cooling_deadline = None
            self._set_state(record, S.HOT)
        self._reaper_wakeup.set()
        return record

    def _on_activity(
        self, record: ModelRecord, worker: WorkerProcess, event: StartEvent | EndEvent
    ) -> None:
        """A request started or ended on the model's worker (reported by the worker)."""
        if isinstance(event, EndEvent) and self.request_ended is not None:
            self.request_ended(record.model_id, event)  # its usage, even from a late report
        if worker not in record.workers:
            return  # a late report from a worker already released
        now = time.monotonic()
        record.last_used_mono = now
        record.last_used_at = time.time()
        load = record.worker_load.get(worker, 0) + (1 if isinstance(event, StartEvent) else -1)
        record.worker_load[worker] = max(0, load)
        if load <= 0:
            record.idle_since[worker] = now
        if isinstance(event, StartEvent):
            record.demand.add(now)
            record.in_flight += 1
            self._scale_up_if_queued(record)
            if record.in_flight == 1:
                self._share_cores()
            record.requests_total += 1
            record.idle.clear()
            self.metrics.request_started(record.model_id)
            if record.state is S.COOLING:
                record.cooling_deadline = None
                self._set_state(record, S.HOT)
        else:
            record.in_flight = max(0, record.in_flight - 1)
            if record.in_flight == 0:
                record.idle.set()
                self._share_cores()
                self._capacity_changed()  # it may be evicted for a waiting load now
            if record.keep_alive is not None:
                # A client asked for this much after its request (Ollama's keep_alive).
                record.ttl_deadline, record.keep_alive = now + record.keep_alive, None
            else:
                # TTL counts from the end of the last request; an extension stays.
                record.ttl_deadline = max(
                    record.ttl_deadline or 0.0, now + self.ttl_seconds(record)
                )
            self._reaper_wakeup.set()

    def _share_cores(self) -> None:
        """Split each machine's cores among the local workers there that are generating
        or loading (pool_manager.policies.CoreShare: by the most busy at once lately); a
        cluster node is a machine of its own, with the cores Ray says it has.

        llama.cpp's threads wait for each other by spinning: two workers with two threads
        each on a 2-core machine each got under 5 tokens/s (one thread each: 86 and 81).
        A load takes a core too (reading weights, zeroing a KV cache). So with k workers
        busy or loading each may use cores/k threads (at least 1, at most its
        `n_threads`); a worker alone gets them all back once the others stay quiet.
        """
        serving: dict[str | None, list[WorkerProcess]] = {}
        busy: dict[str | None, int] = {}
        for record in self._records.values():
            if not record.spec.is_local:
                continue
            if record.state in OCCUPYING:
                for worker in record.workers:
                    serving.setdefault(_machine(worker), []).append(worker)
            if record.in_flight or record.state is S.WARMING:
                # A request still on its way, or a load, counts on the model's first worker
                # (a load's process not started yet: here).
                working = [w for w in record.workers if record.worker_load.get(w)]
                for machine in [_machine(w) for w in working or record.workers[:1]] or [None]:
                    busy[machine] = busy.get(machine, 0) + 1
        now = time.monotonic()
        rechecks = []
        for machine in serving.keys() | busy.keys():
            cores = usable_cores() if machine is None else self._node_cores(machine)
            share = self._core_shares.setdefault(machine, CoreShare())
            threads, recheck = share.threads(busy.get(machine, 0), cores, now)
            for worker in serving.get(machine, []):
                worker.share_cores(threads)
            if recheck is not None:
                rechecks.append(recheck)
        if self._share_timer is not None:
            self._share_timer.cancel()
            self._share_timer = None
        if rechecks:
            loop = asyncio.get_running_loop()
            self._share_timer = loop.call_later(min(rechecks), self._share_cores)

    def _node_cores(self, node_id: str) -> int:
        return self._cluster.node_cores(node_id) if self._cluster is not None else usable_cores()

    async def _reap_idle_models(self) -> None:
        while True:
            self._reaper_wakeup.clear()
            next_due = min(self._expire_idle_models(), self._retire_idle_replicas())
            timeout = min(next_due, self.config.check_interval_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reaper_wakeup.wait(), timeout)

    def _expire_idle_models(self) -> float:
        """Move expired models along (pool_manager.policies.expire); return seconds until
        the next deadline."""
        if not self.config.auto_unload:
            return math.inf
        now = time.monotonic()
        expiring = [
            Expiring(r.model_id, r.state is S.COOLING, r.ttl_deadline, r.cooling_deadline)
            for r in self._records.values()
            if r.state in SERVING
            and not self.is_pinned(r)
            and not r.in_flight
            and r.unload_task is None
        ]
        grace = self.config.grace_period_seconds
        expiry = expire(expiring, now, grace)
        for model_id in expiry.cool:
            record = self._records[model_id]
            record.cooling_deadline = now + grace
            self._set_state(record, S.COOLING)
        for model_id in expiry.unload:
            record = self._records[model_id]
            unload = self._unload(record, "ttl", force=False, keep_process=True)
            self._spawn_background(unload, f"expire:{model_id}")
        return expiry.next_due

    # --- replicas ---------------------------------------------------------------------------

    def route(self, record: ModelRecord, body: bytes) -> WorkerProcess | None:
        """The worker a request (`body`) for `record` goes to: its only one, or the
        replica `choose_replica` names for the body's `affinity_key` (replica_routing
        "prefix"; the body is only read then), or the next in turn ("round_robin"). None
        with no worker."""
        workers = [w for w in record.workers if w.returncode is None] or record.workers
        if len(workers) <= 1:
            return workers[0] if workers else None
        if self.config.replica_routing == "round_robin":
            record.next_in_turn += 1
            return workers[record.next_in_turn % len(workers)]
        loads = [(f"{w.host}:{w.port}", record.worker_load.get(w, 0)) for w in workers]
        return workers[choose_replica(affinity_key(body), loads)]

    def _scale_up_if_queued(self, record: ModelRecord) -> None:
        """Start one more replica when `replicas_wanted` says so (one at a time)."""
        spec = record.spec
        if record.adding_replica or record.state is not S.HOT or record.evicting:
            return
        if self._closing or spec.most_replicas <= 1:
            return
        current = len(record.workers)
        wanted = replicas_wanted(
            current, spec.replicas, spec.most_replicas, record.in_flight, spec.max_concurrent
        )
        if wanted > current:
            record.adding_replica = True
            self._spawn_background(self._add_replica(record), f"replica:{record.model_id}")

    async def _add_replica(self, record: ModelRecord) -> None:
        try:
            reason = self._no_room_for_replica(record)
            if reason is not None:
                log.info(
                    "no room for another replica",
                    extra={"model": record.model_id, "reason": reason},
                )
                return
            try:
                worker = await self._launch_replica(record)
            except (WorkerStartError, PoolError, InvalidModel, OSError) as exc:
                log.warning(
                    "a replica did not start", extra={"model": record.model_id, "reason": str(exc)}
                )
                return
            if record.worker is None or record.state not in SERVING or record.unload_task:
                await worker.stop(self.config.graceful_shutdown_seconds)  # unloaded meanwhile
                self._release_port(worker)
                return
            record.replicas.append(worker)
            record.worker_load[worker] = 0
            record.idle_since[worker] = time.monotonic()
            self._spawn_background(self._watch_worker(record, worker), f"watch:{worker.pid}")
            log.info(
                "replica added",
                extra={
                    "model": record.model_id,
                    "pid": worker.pid,
                    "replicas": len(record.workers),
                },
            )
            self._share_cores()
            self._reaper_wakeup.set()  # its idle deadline
        finally:
            record.adding_replica = False
        self._scale_up_if_queued(record)  # still short: one more

    def _no_room_for_replica(self, record: ModelRecord) -> str | None:
        """Why another replica does not fit in memory now (replicas evict nothing)."""
        occupying = [r for r in self._records.values() if r.state in OCCUPYING]
        return self._why_it_does_not_fit(occupying, record.memory_estimate, new_model=False)

    async def _launch_replica(self, record: ModelRecord) -> WorkerProcess:
        """One more worker serving `record`'s model, ready. Raises WorkerStartError,
        PoolFull (no port), InvalidModel or OSError."""
        on_activity = partial(self._on_activity, record)
        timeout = self.config.load_timeout_seconds
        sock: socket.socket | None = None
        worker: WorkerProcess
        if self._cluster is not None:
            settings = self._worker_settings(record.spec)
            worker = await self._cluster.start_worker(
                record.spec, self._cluster_options(record), record.memory_estimate, timeout
            )
        else:
            settings = self._worker_settings(record.spec, self._memory_ceiling(record))
            sock = self._allocate_port()
            port = sock.getsockname()[1]
            try:
                worker = await self._take_worker(record, settings.served_model_path)
            except BaseException:
                sock.close()
                self._ports.release(port)
                raise
        try:
            if isinstance(worker, ClusterWorker):
                await worker.assign_on_node(settings, on_activity)
            else:
                assert sock is not None
                worker.assign(settings, sock, on_activity, self._cgroups)
            await worker.wait_ready(timeout)
        except BaseException:
            worker.kill()
            await worker.wait_exit()
            self._release_port(worker)
            raise
        return worker

    def _retire_idle_replicas(self) -> float:
        """Stop each replica beyond the model's `replicas` that has had no request for
        replica_idle_seconds; seconds until the next one may be due."""
        now = time.monotonic()
        idle_for = self.config.replica_idle_seconds
        next_due = math.inf
        for record in self._records.values():
            extra = len(record.workers) - record.spec.replicas
            for worker in list(record.replicas):
                if extra <= 0 or record.worker_load.get(worker, 0):
                    continue
                due = record.idle_since.get(worker, now) + idle_for
                if due > now:
                    next_due = min(next_due, due - now)
                    continue
                extra -= 1
                record.replicas.remove(worker)
                log.info(
                    "idle replica stopped", extra={"model": record.model_id, "pid": worker.pid}
                )
                self._spawn_background(
                    self._stop_replica(record, worker, force=False), f"retire:{worker.pid}"
                )
        return next_due

    async def _stop_replica(self, record: ModelRecord, worker: WorkerProcess, force: bool) -> None:
        """Stop a replica taken out of `record.replicas` (drained first unless `force`)."""
        if force:
            await worker.abort(FORCED_STOP_SECONDS)
        else:
            await worker.stop(self.config.graceful_shutdown_seconds)
        self._drop_replica(record, worker, "stopped")

    def _drop_replica(self, record: ModelRecord, worker: WorkerProcess, why: str) -> None:
        """Forget a worker of `record` that is gone or stopped, once: its place among the
        replicas, its port, its load (requests cut with it)."""
        if worker in record.replicas:
            record.replicas.remove(worker)
        log.info("replica gone", extra={"model": record.model_id, "pid": worker.pid, "why": why})
        self._release_port(worker)
        lost = record.worker_load.pop(worker, 0)
        record.idle_since.pop(worker, None)
        if lost:
            record.in_flight = max(0, record.in_flight - lost)
            if record.in_flight == 0:
                record.idle.set()
                self._capacity_changed()
        self._share_cores()

    # --- crashes ----------------------------------------------------------------------------

    async def _kill_hung_workers(self) -> None:
        """Kill serving workers that stopped heartbeating or sit in one decode step too
        long (SIGSTOP, a blocked event loop, a decode that never returns); `_watch_worker`
        then frees the model as after a crash, and its clients get a clean error."""
        while True:
            await asyncio.sleep(HANG_CHECK_SECONDS)
            for record in list(self._records.values()):
                if record.state is S.WARMING:
                    continue
                for worker in record.workers:
                    if worker.hung:
                        continue
                    reason = worker.hang(
                        self.config.hang_timeout_seconds, self.config.decode_stall_seconds
                    )
                    if reason is not None:
                        log.error(
                            "killing a hung worker",
                            extra={"model": record.model_id, "pid": worker.pid, "reason": reason},
                        )
                        worker.kill_as_hung(reason)

    async def _watch_worker(self, record: ModelRecord, worker: WorkerProcess) -> None:
        code = await worker.wait_exit()
        if not worker.left_on_request and self.worker_lost is not None:
            self.worker_lost(worker)
        if worker in record.replicas:
            self._drop_replica(record, worker, f"exited with code {code}")
            return
        if record.worker is not worker or record.state is S.UNLOADING:
            return  # an unload we asked for
        if record.replicas:
            # Another replica serves on: it becomes the model's worker, the state stays.
            self._drop_replica(record, worker, f"exited with code {code}")
            record.worker = record.replicas.pop(0)
            log.warning(
                "a replica takes over from the model's worker that died",
                extra={"model": record.model_id, "exit_code": code, "pid": record.worker.pid},
            )
            return
        now = time.monotonic()
        record.crashes += 1
        node_lost = isinstance(worker, ClusterWorker) and worker.node_lost
        if not node_lost:  # a node's death says nothing of the model: no crash loop
            record.recent_crashes.append(now)
        while record.recent_crashes and record.recent_crashes[0] < now - CRASH_WINDOW_SECONDS:
            record.recent_crashes.popleft()
        if node_lost and worker.node is not None:
            record.last_error = (
                f"the worker's cluster node was lost ({worker.node['address']}, node "
                f"{worker.node['node_id'][:12]}): loaded again on another node on demand"
            )
        elif worker.hung:
            record.last_error = worker.hung
        elif worker.out_of_memory:
            record.last_error = (
                f"{OUT_OF_MEMORY}: the worker passed its memory ceiling (exit code {code})"
            )
        else:
            record.last_error = f"worker exited unexpectedly with code {code}"
        log.error(
            "worker died", extra={"model": record.model_id, "exit_code": code, "pid": worker.pid}
        )
        self.metrics.crashed(record.model_id)
        self._release_worker(record)
        if len(record.recent_crashes) >= self.config.max_load_failures:
            record.recent_crashes.clear()
            self._enter_failed(record)  # a crash loop: back off instead of reloading at once
            return
        self._set_state(record, S.COLD, "node lost" if node_lost else None)
        if self.is_pinned(record) and not self._closing:
            # Warmup models are meant to stay loaded: bring them straight back.
            self._spawn_background(self._reload_pinned(record), f"reload:{record.model_id}")

    async def _reload_pinned(self, record: ModelRecord, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        # A timer may fire a hair before time.monotonic() says the cooldown is over
        # (uvloop's clock moves in milliseconds): wait out what is left of it.
        while (left := self.retry_after(record) or 0.0) > 0:
            await asyncio.sleep(left + 0.001)
        try:
            await self.load(record.model_id)
        except PoolError as exc:
            log.error(
                "warmup model did not come back",
                extra={"model": record.model_id, "reason": exc.message},
            )

    # --- warmup -----------------------------------------------------------------------------

    async def _load_warmup_models(self) -> None:
        pinned = [r for r in self._records.values() if self.is_pinned(r)]
        results = await asyncio.gather(
            *(self.load(r.model_id) for r in pinned), return_exceptions=True
        )
        for record, result in zip(pinned, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "warmup model failed to load",
                    extra={"model": record.model_id, "reason": str(result)},
                )
        self.warmup_done.set()

    # --- change notifications --------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every state change from now on; `unsubscribe` it after."""
        listener: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=256)
        self._listeners.add(listener)
        return listener

    def unsubscribe(self, listener: asyncio.Queue[dict[str, Any]]) -> None:
        self._listeners.discard(listener)

    def _on_node_change(self, change: str, node: dict[str, Any]) -> None:
        """A cluster node joined or was lost (GET /events: a `node` event)."""
        self._publish({"type": "node", "time": time.time(), "change": change, "node": node})
        self._capacity_changed()  # room on a new node, or less of it

    def _publish(self, event: dict[str, Any]) -> None:
        for listener in self._listeners:
            if listener.full():
                listener.get_nowait()  # a slow listener loses the oldest change, not us
            listener.put_nowait(event)

    # --- the one place state changes --------------------------------------------------------

    def _set_state(self, record: ModelRecord, new: ModelState, detail: str | None = None) -> None:
        check_transition(record.model_id, record.state, new)
        old, record.state = record.state, new
        fields = {
            "model": record.model_id,
            "from": str(old),
            "to": str(new),
            "reason": TRANSITIONS[(old, new)],
        }
        if detail:
            fields["detail"] = detail
        log.info("state change", extra=fields)
        self._publish({"type": "state", "time": time.time(), **fields})
        if S.WARMING in (old, new):
            self._share_cores()  # a load takes a core while it runs
        self._reaper_wakeup.set()
        self._capacity_changed()
        if new is not S.WARMING:
            # COLD models are the ones spares load ahead. Not yet when one starts loading:
            # the spare about to be handed it would drop its weights first.
            self._refresh_preload()


def _resident(record: ModelRecord, now: float) -> Resident:
    """A loaded model as the eviction policy sees it."""
    return Resident(
        record.model_id,
        record.demand.value(now),
        record.last_used_mono,
        reload_seconds(record.load_seconds, record.memory_estimate),
        record.memory_estimate,
    )


def _why_not_saved(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename or 'the file'}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
