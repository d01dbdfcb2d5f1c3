"""The control socket's contract (model_service/contract.py), without processes: every
message survives its JSON line, a bad line is refused, the defaults are the documented
ones, and what the manager sends for a registry entry is what a worker accepts."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, get_args

import pytest

from model_service.contract import (
    AbortCommand,
    BeatEvent,
    Command,
    DrainCommand,
    EndEvent,
    Event,
    FailedEvent,
    LoadCommand,
    MemoryCeiling,
    ModelSettings,
    PreloadCommand,
    PreloadedEvent,
    ReadyEvent,
    RecycleCommand,
    SpareEvent,
    StartEvent,
    ThreadsCommand,
    parse_command,
    parse_event,
)
from pool_manager.config import ModelSpec
from pool_manager.worker_process import WorkerProcess
from tests.conftest import make_pool, model_entry

SETTINGS = ModelSettings(
    model_id="smollm2:135m",
    aliases=["small"],
    model_path="/models/smollm2.gguf",
    served_model_path="/cache/smollm2.q8_0.gguf",
    n_ctx=1024,
    n_threads=2,
    defaults={"temperature": 0.2, "stop": ["\n"]},
    max_request_bytes=1 << 20,
    memory_ceiling=MemoryCeiling(bytes=1 << 30, need=200 << 20, by="cgroup"),
)

COMMANDS: list[Command] = [
    LoadCommand(settings=SETTINGS),
    PreloadCommand(paths=["/a.gguf", "/b.gguf"], first_settings=SETTINGS),
    PreloadCommand(),
    ThreadsCommand(n=3),
    DrainCommand(),
    AbortCommand(),
    RecycleCommand(),
]
EVENTS: list[Event] = [
    SpareEvent(pid=41),
    PreloadedEvent(paths=["/a.gguf"]),
    ReadyEvent(
        pid=41,
        port=8051,
        load_seconds=0.25,
        load_phases={"load_model": 0.2, "start_server": 0.05},
        weights_preloaded=True,
        context_preloaded=True,
    ),
    FailedEvent(reason="out of memory"),
    StartEvent(),
    EndEvent(),
    BeatEvent(step_seconds=1.5),
]


def members(union: Any) -> set[type]:
    """The classes of an Annotated discriminated union."""
    return set(get_args(get_args(union)[0]))


def test_the_round_trips_cover_every_message() -> None:
    assert {type(c) for c in COMMANDS} == members(Command)
    assert {type(e) for e in EVENTS} == members(Event)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_through_its_line(command: Command) -> None:
    line = command.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_command(line) == command


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_its_line(event: Event) -> None:
    line = event.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_event(line) == event


def test_the_wire_format_keeps_its_shape() -> None:
    assert json.loads(ThreadsCommand(n=2).encode()) == {"cmd": "threads", "n": 2}
    assert json.loads(DrainCommand().encode()) == {"cmd": "drain"}
    assert json.loads(BeatEvent(step_seconds=0.5).encode()) == {
        "event": "beat",
        "step_seconds": 0.5,
    }
    load = json.loads(LoadCommand(settings=SETTINGS).encode())
    assert load["cmd"] == "load" and load["settings"]["model_id"] == "smollm2:135m"
    assert load["settings"]["memory_ceiling"] == {
        "bytes": 1 << 30,
        "need": 200 << 20,
        "by": "cgroup",
    }
    # Lines written by hand, as the worker and manager wrote them before the contract.
    assert parse_event(b'{"event": "start"}') == StartEvent()
    assert parse_event(b'{"event":"spare","pid":7}') == SpareEvent(pid=7)
    assert parse_command(b'{"cmd": "preload", "paths": [], "first_settings": null}') == (
        PreloadCommand()
    )


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"pid": 7}',  # no event
        b'{"event": "exploded"}',  # no such event
        b'{"event": "ready", "pid": 7, "load_seconds": 1, "load_phases": {}}',  # no port
        b'{"event": "spare", "pid": "seven"}',
        b'{"event": "beat", "step_seconds": "slow"}',
        b'{"event": "preloaded", "paths": "/a.gguf"}',
        b'{"event": "end", "tokens": 5}',  # a field the contract does not have
        b'{"event": "end", "prompt_tokens": -1}',
    ],
)
def test_a_malformed_event_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_event(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"cmd": "threads", "n": 0}',
        b'{"cmd": "load"}',
        b'{"cmd": "load", "settings": {"model_id": "m"}}',  # no max_request_bytes
        b'{"cmd": "reboot"}',
        b'{"event": "spare", "pid": 7}',  # an event is no command
    ],
)
def test_a_malformed_command_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_command(line)


def test_defaults_are_the_documented_ones() -> None:
    settings = ModelSettings(model_id="m", max_request_bytes=1024)
    assert settings.model_type == "chat"
    assert settings.backend == "llama_cpp"
    assert settings.weights == "auto"
    assert settings.n_ctx == 2048
    assert settings.n_threads is None
    assert settings.n_batch == 512
    assert settings.flash_attn == "auto"
    assert settings.max_concurrent == 4
    assert settings.max_queue == 32
    assert settings.timeout_seconds == 30
    assert settings.aliases == [] and settings.defaults == {}
    assert settings.memory_ceiling is None
    assert MemoryCeiling(bytes=1, need=0).by == "address_space"
    assert BeatEvent().step_seconds == 0.0
    assert PreloadCommand().paths == [] and PreloadCommand().first_settings is None
    ready = ReadyEvent(pid=1, port=2, load_seconds=0.1, load_phases={})
    assert not ready.weights_preloaded and not ready.context_preloaded


def test_the_registry_and_the_contract_agree_on_defaults() -> None:
    shared = set(ModelSpec.model_fields) & set(ModelSettings.model_fields)
    assert {"n_ctx", "max_concurrent", "max_queue", "timeout_seconds", "weights"} <= shared
    for name in sorted(shared):
        spec_field, settings_field = ModelSpec.model_fields[name], ModelSettings.model_fields[name]
        assert spec_field.is_required() == settings_field.is_required(), name
        if not spec_field.is_required():
            assert spec_field.get_default(call_default_factory=True) == (
                settings_field.get_default(call_default_factory=True)
            ), name


def test_the_settings_the_manager_sends_are_what_a_worker_accepts(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(
        model_entry("smollm2:135m", max_concurrent=2, memory_max_mb=900, tags=["small"])
    )
    pool = make_pool(tmp_path, [spec])
    ceiling = MemoryCeiling(bytes=900 << 20, need=300 << 20)
    sent = LoadCommand(settings=pool._worker_settings(spec, ceiling)).encode()

    received = parse_command(sent)
    assert isinstance(received, LoadCommand)
    settings = received.settings
    assert settings.model_id == "smollm2:135m"
    assert settings.model_path is not None and Path(settings.model_path).is_file()
    assert settings.served_model_path is not None
    assert settings.weights_cache_dir is not None
    assert (settings.n_ctx, settings.n_threads, settings.max_concurrent) == (1024, 2, 2)
    assert settings.max_request_bytes == 2 << 20
    assert settings.allowed_hosts == ["pool.example"]
    assert settings.memory_ceiling == ceiling
    assert "tags" not in json.loads(sent)["settings"]  # the registry's own fields stay home


def test_a_remote_model_is_lent_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_SECRET_CONTRACT_TEST", "sk-contract")
    spec = ModelSpec(
        model_id="remote",
        backend="openai",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="POOL_SECRET_CONTRACT_TEST",
    )
    settings = make_pool(tmp_path, [spec])._worker_settings(spec)
    received = parse_command(LoadCommand(settings=settings).encode())
    assert isinstance(received, LoadCommand)
    assert received.settings.api_key == "sk-contract"
    assert received.settings.base_url == "http://127.0.0.1:9/v1"
    assert received.settings.model_path is None


class NeverExits:
    """Stands in for a worker's asyncio process, which WorkerProcess waits on."""

    pid = 0
    returncode = None

    async def wait(self) -> int:
        await asyncio.Event().wait()
        return 0


async def test_the_manager_skips_an_unreadable_event_and_reads_on() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    worker = WorkerProcess(NeverExits(), ours)  # type: ignore[arg-type]
    ready = ReadyEvent(pid=0, port=0, load_seconds=0.5, load_phases={"load_model": 0.5})
    reader = asyncio.StreamReader()
    for line in [b"not json\n", b'{"event": "ready", "pid": "x"}\n', ready.encode()]:
        reader.feed_data(line)
    reader.feed_eof()
    await worker._handle_events(reader)
    assert await worker.wait_ready(1.0) == ready
    worker._exit_task.cancel()
