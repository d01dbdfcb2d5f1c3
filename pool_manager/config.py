"""The pool's two JSON files: its configuration and its model registry.

`ConfigStore` is the only code that reads or writes them. Writes are atomic (a temporary
file in the same folder, fsync, rename, fsync of the folder), so a crash mid-write leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model_service.backends.kinds import KINDS, kind_of
from model_service.limits import depth_exceeds
from model_service.secrets import check_secret_env_name, check_secret_file_name

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
# Suffixes the manager's routes use after a model id; an id ending in one would be ambiguous.
_RESERVED_SUFFIXES = ("/load", "/unload", "/extend-ttl", "/health")
# An alias with one of these is an fnmatch pattern (`claude-*`, `*haiku*`).
_PATTERN_CHARS = frozenset("*?[")
_BRACKET_CLASS = re.compile(r"\[!?\]?[^\]]*\]")
MAX_N_BATCH = 65_536
# The config and registry files: larger or deeper is no hand-written file (see _read).
MAX_FILE_BYTES = 64 * 2**20
MAX_FILE_DEPTH = 64
MAX_DEFAULTS_DEPTH = 8
MAX_DEFAULTS_BYTES = 64 * 1024


class PortRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = Field(default=8051, ge=1, le=65535)
    end: int = Field(default=8099, ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.start > self.end:
            raise ValueError("port_range.start must not be above port_range.end")
        return self


class Limits(BaseModel):
    """What one caller may use; null: no limit. `models` adds limits for one model (both
    apply: the caller's and, for that model, its own)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_hour: int | None = Field(default=None, ge=0, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=1_000_000_000)
    concurrent_requests: int | None = Field(default=None, ge=0, le=100_000)
    models: dict[str, Limits] = Field(default_factory=dict, max_length=1000)

    def for_model(self, model_id: str) -> Limits | None:
        return self.models.get(model_id)


class ClusterConfig(BaseModel):
    """Cluster mode (pool_manager/cluster.py, docs/SCALING.md): workers on Ray's nodes."""

    model_config = ConfigDict(extra="forbid")

    # The Ray cluster to join: "host:port" of its head (GCS), or "auto" (RAY_ADDRESS, or
    # the cluster `ray start` made on this machine).
    address: str = Field(default="auto", min_length=1, max_length=512)
    namespace: str = Field(default="model-pool", min_length=1, max_length=64)


class Placement(BaseModel):
    """Where a model's worker may run in cluster mode (ignored on one machine)."""

    model_config = ConfigDict(extra="forbid")

    # Ray resources its node must have free besides the memory the pool estimates, e.g.
    # {"GPU": 1} or a custom label a node was started with.
    resources: dict[str, float] = Field(default_factory=dict, max_length=32)
    # A node preferred (its id, address or host name); another one when it has no room.
    node: str | None = Field(default=None, max_length=256)


class PoolConfig(BaseModel):
    """`configs/model_pool_config.json`. Unknown keys are refused (typos are bugs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(default=8050, ge=1, le=65535)
    default_ttl_minutes: float = Field(default=15, gt=0)
    min_ttl_minutes: float = Field(default=5, ge=0)
    max_ttl_minutes: float = Field(default=60, gt=0)
    check_interval_seconds: float = Field(default=30, ge=0.05, le=3600)
    grace_period_seconds: float = Field(default=120, ge=0)
    warmup_models: list[str] = Field(default_factory=list)
    port_range: PortRange = Field(default_factory=PortRange)
    max_concurrent_models: int = Field(default=5, ge=1)
    memory_limit_mb: int = Field(default=32000, ge=1)
    auto_unload: bool = True
    graceful_shutdown_seconds: float = Field(default=30, ge=0)
    load_timeout_seconds: float = Field(default=120, gt=0)
    # A serving worker sends a heartbeat each second from its event loop. One silent for
    # hang_timeout_seconds (stopped, or its loop blocked), or with one decode step running
    # for decode_stall_seconds, is killed; its model is freed as after a crash.
    hang_timeout_seconds: float = Field(default=15, ge=2, le=3600)
    # A load that finds no room (every loaded model busy, memory short) waits up to this
    # long for a request to end or a model to unload, in a queue of at most
    # admission_queue_max loads; past either it is refused with 503 and Retry-After.
    admission_timeout_seconds: float = Field(default=60, ge=0, le=3600)
    admission_queue_max: int = Field(default=64, ge=0, le=100_000)
    decode_stall_seconds: float = Field(default=300, ge=2, le=86400)
    max_load_failures: int = Field(default=3, ge=1)
    failure_cooldown_seconds: float = Field(default=60, ge=0)
    ollama_base_url: str = "http://localhost:11434"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_request_bytes: int = Field(default=8 * 2**20, ge=1024)
    # Worker processes kept started ahead (imports done, no model) for fast cold starts.
    spare_workers: int = Field(default=1, ge=0, le=8)
    # Heap a spare maps ahead for the model's buffers (KV cache, repacked weights), so
    # a cold start skips ~100 ms of page faults; null: as much as the largest local
    # model needs, 0: none. The spare holds it while idle; a loaded worker keeps only
    # what its model uses.
    spare_reserve_mb: int | None = Field(default=None, ge=0, le=1_048_576)
    # How many COLD local models each spare loads the weights of ahead (most recently
    # used first), so that loading one skips llama.cpp's model load; 0: none. Costs the
    # spare the models' vocabularies (~16 MB for SmolLM2) besides the shared page cache.
    spare_preload: int = Field(default=4, ge=0, le=64)
    # Workers run sandboxed (model_service/sandbox.py): no network for local models,
    # no_new_privs, limits on open files and core dumps, a memory ceiling per model.
    # false: none of it (read at start).
    sandbox: bool = True
    # Where widened copies of slow-on-CPU weights go (see model_service/weights.py);
    # default $POOL_WEIGHTS_CACHE, else ~/.cache/model-pool/weights.
    weights_cache_dir: str | None = None
    # Responses kept for `previous_response_id` and GET /v1/responses/{id} (in memory,
    # least recently used dropped first): at most this many, and this much JSON.
    # Browsers: host names the manager answers to besides IP addresses and localhost, and
    # web origins allowed to call it besides its own (/ui). Others get 403 (read at start).
    allowed_hosts: list[str] = Field(default_factory=list, max_length=64)
    allowed_origins: list[str] = Field(default_factory=list, max_length=64)
    # Limits of a named key made without its own, and of every JWT user (seed 003: 100
    # requests an hour). The operator's POOL_API_KEY / POOL_ADMIN_KEY have none.
    default_limits: Limits = Field(default_factory=lambda: Limits(requests_per_hour=100))
    # The usage ledger and named keys: this SQLite file (relative: to the registry's
    # folder), unless DATABASE_URL names a PostgreSQL database (read at start).
    usage_db: str = "usage.db"
    # The L1 response cache's size; 0: no cache. The L2 (semantic) cache's entries.
    response_cache_mb: int = Field(default=64, ge=0, le=65_536)
    semantic_cache_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    responses_max_stored: int = Field(default=1000, ge=0, le=1_000_000)
    responses_max_stored_mb: int = Field(default=256, ge=0, le=65_536)
    # An extra replica of a model (above its `replicas`) with no request for this long
    # is stopped; how the gateway picks a model's replica for a request: "prefix"
    # (requests sharing a prompt prefix to the same one, within a bound on its load) or
    # "round_robin" (for comparison).
    replica_idle_seconds: float = Field(default=60, ge=0.1, le=86_400)
    replica_routing: Literal["prefix", "round_robin"] = "prefix"
    # Workers on the nodes of a Ray cluster instead of this machine (read at start);
    # null: this machine only.
    cluster: ClusterConfig | None = None

    @model_validator(mode="after")
    def _ttl_bounds(self) -> PoolConfig:
        if not self.min_ttl_minutes <= self.max_ttl_minutes:
            raise ValueError("min_ttl_minutes must not be above max_ttl_minutes")
        return self


class SemanticCacheSpec(BaseModel):
    """A model's L2 cache: `embedding_model` (a model of this pool) embeds each prompt;
    a cosine similarity of at least `threshold` to a kept prompt replays its answer."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str
    threshold: float = Field(default=0.95, gt=0, le=1)
    ttl_seconds: float = Field(default=3600, gt=0, le=30 * 86400)


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_id: str
    display_name: str | None = None
    model_type: str = "chat"
    warmup: bool = False
    ttl_minutes: float | None = Field(default=None, ge=0)
    priority: Literal["low", "normal", "high"] = "normal"
    tags: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    # Models that serve a request when this one cannot (fails to load, FAILED, full, 5xx).
    fallbacks: list[str] = Field(default_factory=list)
    # A kind from model_service/backends/kinds.py: llama_cpp, openai or ollama.
    backend: str = "llama_cpp"
    # Remote backends: the server's base URL (ollama defaults to the config's
    # ollama_base_url), the model's name there (default: model_id), and where to find the
    # API key's source: a POOL_SECRET_* environment variable or a file in the secrets
    # folder (never the key itself; see model_service/secrets.py).
    base_url: str | None = Field(default=None, max_length=2048)
    remote_model: str | None = Field(default=None, max_length=256)
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Where the weights are: a path (relative paths are relative to the registry file),
    # or "package/file" inside an installed Python package.
    model_path: str | None = None
    package_file: str | None = None
    # "auto": Q4_1 weights run on this project's Q4_1 kernel, or without it from a Q8_0
    # copy, which stock llama.cpp's CPU kernels run faster; "as_stored": the file as it is.
    weights: Literal["auto", "as_stored"] = "auto"
    n_ctx: int = Field(default=2048, ge=64, le=1_048_576)
    n_threads: int | None = Field(default=None, ge=1)
    # Tokens decoded per step at most. llama.cpp's batch arrays are sized by it (20
    # million took 1.3 GB), and a step never needs more than n_ctx: larger values are
    # lowered to n_ctx, values above MAX_N_BATCH refused.
    n_batch: int = Field(default=512, ge=1, le=MAX_N_BATCH)
    # llama.cpp's flash attention. "auto" (llama.cpp's default: on, on CPU) is faster for
    # new prompts and short contexts; "off" for many sequences at long contexts and small
    # additions to a long cached prompt (docs/OPERATIONS.md has the figures).
    flash_attn: Literal["auto", "on", "off"] = "auto"
    chat_format: str | None = None
    # A Jinja chat template in place of the GGUF's own (as llama.cpp's --chat-template):
    # one that knows tools in the <tool_call> format makes tool calls native.
    chat_template: str | None = Field(default=None, min_length=1, max_length=65_536)
    # Embeddings: how token states become one vector. Default: the GGUF's own
    # `pooling_type`, else mean. `model_type: "embedding"` makes a model embeddings-only
    # (chat and completions answer 400); any other type also serves pooled embeddings.
    pooling: Literal["mean", "cls", "last"] | None = None
    max_concurrent: int = Field(default=4, ge=1)
    max_queue: int = Field(default=32, ge=0)
    # The L1 response cache (pool_manager/response_cache.py): deterministic requests'
    # answers kept this long; null: only requests that ask (x-pool-cache-ttl).
    cache_ttl_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    # The L2 semantic cache: a single-turn question close enough to one answered before
    # gets that answer (it may be stale or subtly wrong for the new question: opt-in).
    semantic_cache: SemanticCacheSpec | None = None
    # The memory the model's worker may add once it is handed the model, in MB (its
    # cgroup's memory.max, or RLIMIT_AS over the address space it had then; see
    # model_service/sandbox.py). Past it the worker fails or is killed alone, "out of
    # memory". Default: twice the pool's memory estimate for the model plus 512 MB.
    memory_max_mb: int | None = Field(default=None, ge=1, le=16_777_216)
    timeout_seconds: float = Field(default=30, gt=0)
    defaults: dict[str, Any] = Field(default_factory=dict)
    # Cluster mode only: the Ray resources and node the worker's placement asks for.
    placement: Placement | None = None
    # Workers serving the model once it is loaded (replicas), and the most it may get:
    # one more each time requests queue (more in flight than the replicas have slots),
    # one less each time an extra one idles for replica_idle_seconds. The gateway sends
    # requests that share a prompt prefix to the same replica while its load allows.
    replicas: int = Field(default=1, ge=1, le=16)
    max_replicas: int | None = Field(default=None, ge=1, le=16)

    @field_validator("model_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not MODEL_ID_PATTERN.match(value) or ".." in value or value.endswith(_RESERVED_SUFFIXES):
            raise ValueError(
                "model_id must be 1-128 characters of letters, digits and . _ : / @ + -, "
                "start with a letter or digit, and not contain '..'"
            )
        return value

    @field_validator("aliases")
    @classmethod
    def _valid_aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not alias or alias != alias.strip() or len(alias) > 256:
                raise ValueError(f"alias {alias!r}: 1-256 characters, no surrounding spaces")
            if "[" in _BRACKET_CLASS.sub("", alias):
                raise ValueError(f"alias {alias!r}: a '[' without its closing ']'")
        return value

    @field_validator("defaults")
    @classmethod
    def _shallow_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Sampling settings nest two levels at most (logit_bias, a stop list); a deep one
        # would be listed and then break every save of the registry.
        if _depth(value) > MAX_DEFAULTS_DEPTH:
            raise ValueError(f"defaults may nest at most {MAX_DEFAULTS_DEPTH} levels deep")
        if len(json.dumps(value)) > MAX_DEFAULTS_BYTES:
            raise ValueError(f"defaults may take at most {MAX_DEFAULTS_BYTES} bytes as JSON")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _named_secret(cls, value: str | None) -> str | None:
        return None if value is None else check_secret_env_name(value)

    @field_validator("api_key_file")
    @classmethod
    def _secret_file(cls, value: str | None) -> str | None:
        return None if value is None else check_secret_file_name(value)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("base_url must be an http:// or https:// URL")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        kind_of(value)  # raises ValueError naming the kinds there are
        return value

    @model_validator(mode="after")
    def _replicas_within_maximum(self) -> ModelSpec:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError("max_replicas must not be below replicas")
        return self

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.replicas

    @model_validator(mode="after")
    def _batch_within_context(self) -> ModelSpec:
        if self.n_batch > self.n_ctx:
            self.n_batch = self.n_ctx  # a step holds at most n_ctx tokens of a prompt
        return self

    @model_validator(mode="after")
    def _has_what_its_backend_needs(self) -> ModelSpec:
        KINDS[self.backend].check(self.__dict__)
        return self

    @property
    def is_local(self) -> bool:
        """Runs in its worker's own process (weights in memory), not on another server."""
        return KINDS[self.backend].local


def _depth(value: Any) -> int:
    """How deep JSON-like `value` nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, level + 1)
        if deepest > 64:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def is_alias_pattern(alias: str) -> bool:
    return not _PATTERN_CHARS.isdisjoint(alias)


def alias_specificity(pattern: str) -> int:
    """How specific a pattern is: its characters other than `*`."""
    return len(pattern) - pattern.count("*")


def match_alias(name: str, specs: Iterable[ModelSpec]) -> ModelSpec | None:
    """The model `name` is an alias of, or None.

    An exact alias first (registry order); else the model with the most specific pattern
    that matches (fnmatch, case-sensitive; see `alias_specificity`), the first in registry
    order on a tie. So `claude-*haiku*` beats `claude-*` for `claude-3-5-haiku-latest`.
    """
    specs = list(specs)
    for spec in specs:
        if name in spec.aliases:
            return spec
    best: ModelSpec | None = None
    best_specificity = -1
    for spec in specs:
        for alias in spec.aliases:
            if is_alias_pattern(alias) and fnmatchcase(name, alias):
                specificity = alias_specificity(alias)
                if specificity > best_specificity:
                    best, best_specificity = spec, specificity
    return best


class Registry(BaseModel):
    models: list[ModelSpec] = Field(default_factory=list)


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConfigError(Exception):
    """A config or registry file that cannot be used, with a readable reason."""


class ConfigStore:
    """Reads and atomically writes the config and registry files."""

    def __init__(self, config_path: Path, registry_path: Path) -> None:
        self.config_path = config_path
        self.registry_path = registry_path

    def fingerprint(self) -> tuple[tuple[int, int], ...]:
        """(mtime, size) of both files: changes when either is written."""
        marks = []
        for path in (self.config_path, self.registry_path):
            try:
                stat = path.stat()
                marks.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                marks.append((0, 0))
        return tuple(marks)

    @property
    def registry_dir(self) -> Path:
        return self.registry_path.parent

    def load_config(self) -> PoolConfig:
        """Raises ConfigError. A missing file means all defaults."""
        raw = self._read(self.config_path, default={})
        try:
            return PoolConfig.model_validate(raw)
        except ValueError as exc:
            raise ConfigError(f"{self.config_path}: {exc}") from exc

    def load_registry(self) -> list[ModelSpec]:
        """Raises ConfigError (also for a model id listed twice)."""
        raw = self._read(self.registry_path, default={"models": []})
        try:
            models = Registry.model_validate(raw).models
        except ValueError as exc:
            raise ConfigError(f"{self.registry_path}: {exc}") from exc
        seen: set[str] = set()
        for spec in models:
            if spec.model_id in seen:
                raise ConfigError(f"{self.registry_path}: model {spec.model_id!r} listed twice")
            seen.add(spec.model_id)
        return models

    def save_config(self, config: PoolConfig) -> None:
        atomic_write_json(self.config_path, config.model_dump(mode="json"))

    def save_registry(self, models: list[ModelSpec]) -> None:
        entries = [m.model_dump(mode="json", exclude_none=True) for m in models]
        atomic_write_json(self.registry_path, {"models": entries})

    @staticmethod
    def _read(path: Path, default: Any) -> Any:
        """The file's JSON, `default` if it does not exist. Raises ConfigError, with one
        line saying what is wrong, for anything else that is not a usable JSON file."""
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return default
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory, not a JSON file") from None
        except OSError as exc:
            raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path} is not valid UTF-8 (byte {exc.start}: {data[exc.start]:#04x})"
            ) from None
        if depth_exceeds(data, MAX_FILE_DEPTH):
            raise ConfigError(f"{path} nests JSON more than {MAX_FILE_DEPTH} levels deep")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path} nests JSON too deeply") from None


def effective_ttl_seconds(config: PoolConfig, spec: ModelSpec) -> float:
    """The model's TTL: its own if set (0 means the default), clamped to the pool's bounds."""
    minutes = spec.ttl_minutes or config.default_ttl_minutes
    minutes = min(max(minutes, config.min_ttl_minutes), config.max_ttl_minutes)
    return minutes * 60.0
