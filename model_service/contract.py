"""What the manager and a worker say to each other on the control socket: one JSON object
a line, commands to the worker keyed by `cmd`, events from it keyed by `event`.

Both sides build these models and validate what they receive once, here; the settings'
defaults live here too (the worker reads typed fields, not `x or 4`). The manager
depends on this module, never the reverse: a worker imports no `pool_manager`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Contract(BaseModel):
    # Both ends run the same code: a field the other side does not know is a bug.
    model_config = ConfigDict(extra="forbid")


class _JsonLine(_Contract):
    def encode(self) -> bytes:
        """The message as it goes on the socket: one line of JSON."""
        return self.model_dump_json().encode() + b"\n"


class MemoryCeiling(_Contract):
    """The memory a worker may add once handed its model (model_service/sandbox.py)."""

    bytes: int
    need: int  # what the model needs of it: the manager's estimate less the process's part
    # Who enforces it: the manager's cgroup, or the worker itself as RLIMIT_AS.
    by: Literal["cgroup", "address_space"] = "address_space"


class ModelSettings(_Contract):
    """A model as its worker runs it: the registry entry's fields a worker reads
    (pool_manager.config.ModelSpec has the same defaults, which a test checks), and what
    the manager adds. Also what a worker started on its own runs with."""

    model_id: str
    model_type: str = "chat"  # "embedding": embeddings only
    backend: str = "llama_cpp"  # a kind of model_service/backends/kinds.py
    aliases: list[str] = Field(default_factory=list)
    # Local models: the file (resolved by the manager), the one served from it (the
    # widened copy of `weights: auto`, where one is planned) and where such copies go.
    model_path: str | None = None
    served_model_path: str | None = None
    weights_cache_dir: str | None = None
    weights: Literal["auto", "as_stored"] = "auto"
    n_ctx: int = 2048
    n_threads: int | None = None  # None: every usable core
    n_batch: int = 512
    flash_attn: Literal["auto", "on", "off"] = "auto"
    chat_template: str | None = None
    pooling: Literal["mean", "cls", "last"] | None = None  # None: the GGUF's own
    max_concurrent: int = 4
    max_queue: int = 32
    timeout_seconds: float = 30
    defaults: dict[str, Any] = Field(default_factory=dict)  # sampling, per request
    # Remote models: the server, the name there, and the key the manager lends the worker.
    base_url: str | None = None
    remote_model: str | None = None
    api_key: str | None = None
    ollama_base_url: str | None = None
    # The pool's own settings, which each worker applies too.
    max_request_bytes: int  # always given (standalone: model_service.limits' default)
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    memory_ceiling: MemoryCeiling | None = None  # None: no sandbox, no ceiling


# --- commands, manager to worker -------------------------------------------------------------


class LoadCommand(_JsonLine):
    """Serve this model, on the listening socket attached to the line (SCM_RIGHTS)."""

    cmd: Literal["load"] = "load"
    settings: ModelSettings


class PreloadCommand(_JsonLine):
    """A spare: keep these files' weights loaded ahead, likeliest first, and make the
    first one's context ahead from its model's settings."""

    cmd: Literal["preload"] = "preload"
    paths: list[str] = Field(default_factory=list)
    first_settings: ModelSettings | None = None


class ThreadsCommand(_JsonLine):
    """Compute with `n` threads from the next step: the worker's share of the cores."""

    cmd: Literal["threads"] = "threads"
    n: int = Field(ge=1)


class DrainCommand(_JsonLine):
    """Refuse new inference requests (503) while the accepted ones finish."""

    cmd: Literal["drain"] = "drain"


class AbortCommand(_JsonLine):
    """A forced unload: fail what runs, then exit."""

    cmd: Literal["abort"] = "abort"


class RecycleCommand(_JsonLine):
    """A drained worker goes back to the spares instead of exiting: it stops serving,
    frees its model's context, keeps the weights loaded ahead and says `spare` again (a
    worker that cannot exits instead)."""

    cmd: Literal["recycle"] = "recycle"


Command = Annotated[
    LoadCommand | PreloadCommand | ThreadsCommand | DrainCommand | AbortCommand | RecycleCommand,
    Field(discriminator="cmd"),
]


# --- events, worker to manager ---------------------------------------------------------------


class SpareEvent(_JsonLine):
    """Imports done (or, after `recycle`, the model let go of); waiting for `load`."""

    event: Literal["spare"] = "spare"
    pid: int


class PreloadedEvent(_JsonLine):
    """A spare's files whose models are ready to take changed."""

    event: Literal["preloaded"] = "preloaded"
    paths: list[str]


class ReadyEvent(_JsonLine):
    """The model is loaded and its HTTP server accepts connections."""

    event: Literal["ready"] = "ready"
    pid: int
    port: int
    load_seconds: float
    load_phases: dict[str, float]  # the worker's own steps, seconds each
    weights_preloaded: bool = False  # the spare had loaded the weights ahead
    context_preloaded: bool = False  # ...and made the context ahead


class FailedEvent(_JsonLine):
    """The model could not be loaded (or a command could not be read); the worker exits."""

    event: Literal["failed"] = "failed"
    reason: str


class StartEvent(_JsonLine):
    """An inference request began (also one sent straight to the worker's port)."""

    event: Literal["start"] = "start"


class EndEvent(_JsonLine):
    """That request ended, its last byte sent: how, and what it used."""

    event: Literal["end"] = "end"
    ticket: str | None = None  # the manager's x-pool-ticket; None: sent to the port
    status: int = 0  # the HTTP status answered (0: none was)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)


class BeatEvent(_JsonLine):
    """Each second from a serving worker's event loop."""

    event: Literal["beat"] = "beat"
    step_seconds: float = 0.0  # how long the engine's step now running has taken


Event = Annotated[
    SpareEvent | PreloadedEvent | ReadyEvent | FailedEvent | StartEvent | EndEvent | BeatEvent,
    Field(discriminator="event"),
]

# --- the fork server (model_service/fork_server.py) ------------------------------------------


class ForkCommand(_JsonLine):
    """Fork a spare: the worker's arguments (the fork server adds `--control-fd` for the
    spare's control socket, attached to the line), the environment it runs with, and
    whether a load waits for it (model_service/spare.py's `--urgent`)."""

    cmd: Literal["fork"] = "fork"
    args: list[str]
    env: dict[str, str]
    urgent: bool = False


class ForkServerReadyEvent(_JsonLine):
    """The fork server's imports are done: it forks from now on."""

    event: Literal["fork_server_ready"] = "fork_server_ready"
    pid: int


class ForkedEvent(_JsonLine):
    """A spare was forked; it is the manager's child now (model_service/fork_server.py)."""

    event: Literal["forked"] = "forked"
    pid: int


ForkServerEvent = Annotated[
    ForkServerReadyEvent | ForkedEvent | FailedEvent, Field(discriminator="event")
]

_COMMANDS: TypeAdapter[Command] = TypeAdapter(Command)
_EVENTS: TypeAdapter[Event] = TypeAdapter(Event)
_FORK_SERVER_EVENTS: TypeAdapter[ForkServerEvent] = TypeAdapter(ForkServerEvent)


def parse_command(line: bytes) -> Command:
    """One line from the manager. Raises ValueError (a ValidationError) if it is none."""
    return _COMMANDS.validate_json(line)


def parse_event(line: bytes) -> Event:
    """One line from a worker. Raises ValueError (a ValidationError) if it is none."""
    return _EVENTS.validate_json(line)


def parse_fork_command(line: bytes) -> ForkCommand:
    """One line from the manager to the fork server. Raises ValueError if it is none."""
    return ForkCommand.model_validate_json(line)


def parse_fork_server_event(line: bytes) -> ForkServerEvent:
    """One line from the fork server. Raises ValueError (a ValidationError) if it is none."""
    return _FORK_SERVER_EVENTS.validate_json(line)
