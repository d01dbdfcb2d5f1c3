"""Spares load COLD models' weights ahead; a load then skips llama.cpp's model load.

The Preloader tests drive the real class with the real llama.cpp loader on the shipped
SmolLM2 file; only the timing of a load is held back, by a gate, where a test needs a
load in flight.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import openai
import psutil
import pytest

from model_service import heap
from model_service.backends.llama_cpp import ContextShape, Preloaded, open_model
from model_service.model_files import package_file
from model_service.preload import Preloader
from tests.conftest import SMOLLM2_FILE, ManagerFactory, model_entry, pid_alive, wait_for

VOCAB_SIZE = 49152  # SmolLM2's


def _spare_holds(manager: Any, path: str) -> bool:
    """Whether a worker process of this manager maps `path` (a spare holding it ahead)."""
    assert manager.process is not None
    for child in psutil.Process(manager.process.pid).children():
        with contextlib.suppress(psutil.Error):
            if any(m.path == path for m in child.memory_maps()):
                return True
    return False


def _health(manager: Any) -> dict[str, Any]:
    reply = manager.request("GET", "/health")
    reply.raise_for_status()
    health: dict[str, Any] = reply.json()
    return health


def test_a_cold_model_loads_from_weights_a_spare_loaded_ahead(
    start_manager: ManagerFactory, model_copy: str
) -> None:
    other = model_entry("other:1", model_path=model_copy, weights="as_stored")
    del other["package_file"]
    manager = start_manager(models=[model_entry("m:1"), other])
    # The first load makes the widened Q8_0 copy if this session has none yet; only
    # files that exist are loaded ahead.
    manager.load("m:1")
    manager.request("POST", "/models/m:1/unload").raise_for_status()
    manager.wait_state("m:1", "COLD")
    wait_for(
        lambda: set(_health(manager)["preloaded_models"]) == {"m:1", "other:1"},
        60,
        message="the spare to load the models' weights ahead",
    )

    assert manager.model("m:1")["weights_loaded_ahead"] is True
    model = manager.load("m:1")
    assert model["weights_preloaded"] is True and model["weights_loaded_ahead"] is False
    # m:1, the most recently used, came first in the spare's list: its context too.
    assert model["context_preloaded"] is True
    # Taken, not loaded: well under the ~80 ms llama.cpp's load of this file takes.
    assert model["load_breakdown_ms"]["load_model"] < 20, model["load_breakdown_ms"]
    client = openai.OpenAI(base_url=f"{manager.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="m:1",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    # A HOT model is not loaded ahead; the other one, still COLD, is once a new spare is up.
    wait_for(
        lambda: _health(manager)["preloaded_models"] == ["other:1"],
        60,
        message="the new spare to load only the COLD model",
    )
    # A model taken out of the registry is not kept ahead.
    assert _spare_holds(manager, model_copy)
    manager.request("DELETE", "/models/other:1").raise_for_status()
    wait_for(
        lambda: not _spare_holds(manager, model_copy),
        30,
        message="the spare to free the deleted model's weights",
    )


def test_unload_and_load_in_quick_succession_find_weights_and_context_ahead_each_time(
    start_manager: ManagerFactory,
) -> None:
    """Each unload hands the worker back to the spares beside another spare, both then
    holding the model's weights: the plan keeps them in one, the other frees its copy.
    A load must take the one that keeps them (the benchmark's cold starts found the
    other's stale report, and loaded the weights and made the context anew)."""
    manager = start_manager(models=[model_entry("m:1")], config={"spare_preload": 1})
    manager.load("m:1")
    for cycle in range(6):
        manager.request("POST", "/models/m:1/unload").raise_for_status()
        manager.wait_state("m:1", "COLD")
        wait_for(
            lambda: "m:1" in _health(manager)["preloaded_models"],
            60,
            message="a spare to hold m:1's weights",
        )
        model = manager.load("m:1")
        taken = (model["weights_preloaded"], model["context_preloaded"])
        assert taken == (True, True), (cycle, model["load_breakdown_ms"])


def test_a_spare_taken_by_a_load_is_replaced_after_the_first_request(
    start_manager: ManagerFactory,
) -> None:
    """The replacement starts once the model's first request ended (not after its drain
    or TTL), so cold starts of different models a second apart each find a spare; it
    imports at low priority, beside the model's next requests. Workers stay in the
    manager's session (one scheduling group, so that low priority counts against them),
    each in a process group of its own (a Ctrl-C in the manager's terminal reaches the
    manager alone) and without the terminal."""
    manager = start_manager(models=[model_entry("a:1"), model_entry("b:1")])
    wait_for(lambda: _health(manager)["spare_workers"] == 1, 60, message="the first spare")
    a = manager.load("a:1")
    chat = manager.request(
        "POST",
        "/v1/chat/completions",
        json={"model": "a:1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    assert chat.status_code == 200, chat.text
    wait_for(lambda: _health(manager)["spare_workers"] == 1, 60, message="a replacement")
    children = manager.worker_children()
    assert len(children - {a["pid"]}) == 1, "one spare beside a:1's worker"
    for pid in children:
        assert os.getsid(pid) == os.getsid(manager.process.pid), "the manager's session"
        assert os.getpgid(pid) == pid, "a process group of its own"
        assert _terminal(pid) == 0, "no controlling terminal"
    b = manager.load("b:1")
    assert b["pid"] in children, "b:1 took the spare that replaced a:1's"


def _terminal(pid: int) -> int:
    """The controlling terminal's device number of `pid` (0: none), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[4])  # tty_nr: the 7th field, the 5th after the name


def test_an_evicted_worker_goes_back_to_the_spares_with_its_weights(
    start_manager: ManagerFactory, model_copy: str
) -> None:
    """Evicted for another model, a worker does not exit: it frees its model's context,
    keeps the weights and waits as a spare; loading that model again takes that very
    process, the weights already loaded. No process is started for either load."""
    other = model_entry("b:1", model_path=model_copy, weights="as_stored")
    del other["package_file"]
    manager = start_manager(config={"max_concurrent_models": 1}, models=[model_entry("a:1"), other])
    first = manager.load("a:1")
    chat_reply = httpx.post(
        f"{first['endpoint']}/v1/chat/completions",
        json={"model": "a:1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert chat_reply.status_code == 200, chat_reply.text
    # a:1's first request ended: the spare that replaces the one it took starts, and
    # loads b:1 ahead (b:1 then takes it, and a:1's old worker stays a spare).
    wait_for(
        lambda: "b:1" in _health(manager)["preloaded_models"],
        30,
        message="b:1's weights loaded ahead in the new spare",
    )
    second_model = manager.load("b:1")  # a:1 evicted: its worker goes back to the spares
    assert manager.model("a:1")["state"] == "COLD" and pid_alive(first["pid"])
    children = manager.worker_children()
    assert first["pid"] in children, "the evicted worker is a spare now"
    wait_for(
        lambda: "a:1" in _health(manager)["preloaded_models"],
        30,
        message="a:1's weights listed as loaded ahead in a spare",
    )
    again = manager.load("a:1")  # b:1 evicted in turn
    assert again["pid"] == first["pid"], "a:1's old process serves it again"
    assert again["weights_preloaded"] is True
    assert again["load_breakdown_ms"]["load_model"] < 20, again["load_breakdown_ms"]
    assert pid_alive(second_model["pid"]), "b:1's worker went back to the spares too"
    reply = httpx.post(
        f"{again['endpoint']}/v1/chat/completions",
        json={"model": "a:1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert "worker died" not in manager.log()
    ports = manager.port_range[1] - manager.port_range[0] + 1
    assert _health(manager)["available_ports"] == ports - 1, "every other port given back"


def test_spare_preload_zero_frees_what_spares_hold_and_loads_nothing_ahead(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(models=[model_entry("m:1")])
    manager.load("m:1")  # makes the widened copy if this session has none yet
    manager.request("POST", "/models/m:1/unload").raise_for_status()
    manager.wait_state("m:1", "COLD")
    wait_for(lambda: _health(manager)["preloaded_models"] == ["m:1"], 60, message="weights ahead")

    manager.request("PATCH", "/config", json={"spare_preload": 0}).raise_for_status()
    wait_for(
        lambda: _health(manager)["preloaded_models"] == [],
        30,
        message="the spare to free the weights",
    )
    assert manager.model("m:1")["weights_loaded_ahead"] is False
    model = manager.load("m:1")
    assert model["weights_preloaded"] is False and model["context_preloaded"] is False
    assert model["load_breakdown_ms"]["load_model"] > 0


# --- the Preloader itself -------------------------------------------------------------------


class _Closes:
    """The real close, noting which models it freed."""

    def __init__(self) -> None:
        self.closed: list[Any] = []

    def __call__(self, model: Any) -> None:
        self.closed.append(model)
        model.close()


@pytest.fixture
def model_copy(tmp_path: Path) -> str:
    target = tmp_path / "smollm2.gguf"
    shutil.copyfile(package_file(SMOLLM2_FILE), target)
    return str(target)


@pytest.fixture
def second(model_copy: str, tmp_path: Path) -> str:
    """Another file with the same model in it."""
    target = tmp_path / "second.gguf"
    shutil.copyfile(model_copy, target)
    return str(target)


def _vocab_size(model: Any) -> int:
    return int(llama_cpp.llama_vocab_n_tokens(model.vocab))


def test_preloader_hands_over_the_wanted_model_and_frees_the_rest(
    model_copy: str, second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(heap, "release_unused", lambda: trims.append(1))
    closes = _Closes()
    reports: list[list[str]] = []
    preloader = Preloader(open_model, closes, on_change=reports.append, free_delay=0.0)
    preloader.want([model_copy, second])
    preloader.start()
    wait_for(lambda: len(preloader.loaded()) == 2, 30, message="both files loaded")
    assert reports[-1] == [model_copy, second]

    model = preloader.take(second)
    assert model is not None and _vocab_size(model) == VOCAB_SIZE
    wait_for(lambda: len(closes.closed) == 1, 30, message="the other model to be freed")
    assert closes.closed[0] is not model and preloader.loaded() == []
    # Its memory goes back to the system (it sat below the served model's in the heap).
    wait_for(lambda: trims == [1], 30, message="the heap trimmed after the free")
    model.close()


def test_finish_frees_the_rest_at_once_not_after_the_delay(
    model_copy: str, second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker handed back to the spares: what its old preloader still holds is freed
    then, not free_delay later, during its next model's first request; it stays mapped,
    as heap for the next model's buffers (no trim)."""
    trims: list[int] = []
    monkeypatch.setattr(heap, "release_unused", lambda: trims.append(1))
    closes = _Closes()
    preloader = Preloader(open_model, closes, free_delay=3600.0)
    preloader.want([model_copy, second])
    preloader.start()
    wait_for(lambda: len(preloader.loaded()) == 2, 30, message="both files loaded")
    model = preloader.take(model_copy)
    assert model is not None
    preloader.finish(timeout=30)
    assert len(closes.closed) == 1 and closes.closed[0] is not model
    assert trims == []
    model.close()


def test_preloader_frees_what_is_no_longer_wanted(model_copy: str) -> None:
    closes = _Closes()
    preloader = Preloader(open_model, closes)
    preloader.start()
    preloader.want([model_copy])
    wait_for(lambda: preloader.loaded() == [model_copy], 30, message="the file loaded")
    preloader.want([])
    wait_for(lambda: preloader.loaded() == [] and closes.closed, 30, message="it to be freed")
    assert preloader.take(model_copy) is None


def test_preloader_does_not_hand_over_weights_of_a_replaced_file(model_copy: str) -> None:
    closes = _Closes()
    preloader = Preloader(open_model, closes)
    preloader.want([model_copy])
    preloader.start()
    wait_for(lambda: preloader.loaded() == [model_copy], 30, message="the file loaded")
    stat = os.stat(model_copy)
    os.utime(model_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert preloader.take(model_copy) is None
    assert len(closes.closed) == 1, "the stale model is freed"


def _gated_open(gate: threading.Event, started: threading.Event) -> Any:
    def gated_open(path: str) -> Any:
        started.set()
        assert gate.wait(30)
        return open_model(path)

    return gated_open


def test_take_waits_for_the_model_being_loaded(model_copy: str) -> None:
    gate, started = threading.Event(), threading.Event()
    preloader = Preloader(_gated_open(gate, started), _Closes(), inflight_wait=30.0)
    preloader.want([model_copy])
    preloader.start()
    assert started.wait(30)
    taken: list[Any] = []
    taker = threading.Thread(target=lambda: taken.append(preloader.take(model_copy)))
    taker.start()
    taker.join(0.2)  # a short look: take must still be waiting for the load
    assert taker.is_alive() and not taken
    gate.set()
    taker.join(30)
    assert taken and taken[0] is not None and _vocab_size(taken[0]) == VOCAB_SIZE
    taken[0].close()


def test_take_gives_up_on_a_slow_load_which_is_then_freed(model_copy: str) -> None:
    gate, started = threading.Event(), threading.Event()
    closes = _Closes()
    preloader = Preloader(_gated_open(gate, started), closes, free_delay=0.0, inflight_wait=0.2)
    preloader.want([model_copy])
    preloader.start()
    assert started.wait(30)
    assert preloader.take(model_copy) is None  # the load is still held at the gate
    gate.set()
    wait_for(lambda: closes.closed, 30, message="the late model to be freed")
    assert preloader.loaded() == []


def test_a_file_that_fails_to_load_is_skipped_and_not_retried(
    model_copy: str, tmp_path: Path
) -> None:
    broken = str(tmp_path / "broken.gguf")
    Path(broken).write_bytes(b"GGUF" + b"\0" * 64)
    attempts: list[str] = []

    def counting_open(path: str) -> Any:
        attempts.append(path)
        return open_model(path)

    preloader = Preloader(counting_open, _Closes())
    preloader.start()
    preloader.want([broken])
    wait_for(lambda: attempts, 30, message="a load attempt")
    # Asked again, first in line: the same broken file is skipped, the next one loads.
    preloader.want([broken, model_copy])
    wait_for(lambda: preloader.loaded() == [model_copy], 30, message="the good file loaded")
    assert attempts == [broken, model_copy]
    assert preloader.take(broken) is None


# --- a context made ahead for the likeliest model -------------------------------------------

SMALL = ContextShape(n_ctx=256, slots=2, n_batch=64)


class _Fits:
    """The real Preloaded.fit, noting which file's model got which shape."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.calls: list[tuple[str, ContextShape | None]] = []

    def open(self, path: str) -> Preloaded:
        item = Preloaded.open(path)
        self.paths[id(item)] = path
        return item

    def __call__(self, item: Preloaded, shape: ContextShape | None) -> None:
        item.fit(shape)
        self.calls.append((self.paths[id(item)], shape))


def test_the_likeliest_model_gets_its_context_made_ahead_and_handed_over(
    model_copy: str, second: str
) -> None:
    fits = _Fits()
    preloader = Preloader(fits.open, Preloaded.close, free_delay=0.0, fit_model=fits)
    preloader.want([model_copy, second], SMALL)
    preloader.start()
    wait_for(lambda: len(preloader.loaded()) == 2, 30, message="both files ready")
    assert fits.calls == [(model_copy, SMALL)], "only the first file's model gets a context"

    item = preloader.take(model_copy)
    assert isinstance(item, Preloaded)
    context = item.take_context(SMALL)
    assert context is not None
    assert llama_cpp.llama_n_ctx(context) == SMALL.n_ctx * SMALL.slots
    assert llama_cpp.llama_n_seq_max(context) == SMALL.slots
    memory = llama_cpp.llama_get_memory(context)
    assert [llama_cpp.llama_memory_seq_pos_max(memory, s) for s in range(SMALL.slots)] == [
        -1
    ] * SMALL.slots
    assert item.take_context(SMALL) is None, "handed over once"
    llama_cpp.llama_free(context)
    item.close()


def test_taking_another_model_frees_the_likeliest_models_context_at_once(
    model_copy: str, second: str
) -> None:
    """The served model makes its context from that memory: freed with the weights,
    free_delay later, it would leave the new context to fresh pages."""
    fits = _Fits()
    preloader = Preloader(fits.open, Preloaded.close, free_delay=3600.0, fit_model=fits)
    preloader.want([model_copy, second], SMALL)
    preloader.start()
    wait_for(lambda: len(preloader.loaded()) == 2, 30, message="both files ready")
    assert fits.calls == [(model_copy, SMALL)]

    item = preloader.take(second)
    assert isinstance(item, Preloaded)
    assert fits.calls == [(model_copy, SMALL), (model_copy, None)], "freed before take returns"
    assert item.take_context(SMALL) is None, "the taken model had no context made ahead"
    preloader.finish(timeout=30)
    item.close()


@pytest.mark.parametrize(("idle", "warmed"), [(0.0, False), (64.0, True)])
def test_a_context_made_ahead_is_warmed_only_on_idle_cores(
    model_copy: str, monkeypatch: pytest.MonkeyPatch, idle: float, warmed: bool
) -> None:
    """Beside busy workers the warming decode crawls at nice 19; on idle cores it is what
    makes the next cold start fast."""
    from model_service.backends import llama_cpp as backend

    decodes: list[int] = []
    real_first_decode = backend._first_decode

    def first_decode(ctx: Any, slots: int) -> None:
        decodes.append(slots)
        real_first_decode(ctx, slots)

    monkeypatch.setattr(backend, "idle_cores", lambda: idle)
    monkeypatch.setattr(backend, "_first_decode", first_decode)
    item = Preloaded.open(model_copy)
    try:
        item.fit(SMALL)
        assert decodes == ([SMALL.slots] if warmed else []), "warmed with the context if idle"
        assert item.warm() is warmed
        assert item.warm() is warmed, "warm once, then nothing is left to do"
        assert len(decodes) == (1 if warmed else 0)
        context = item.take_context(SMALL)
        assert context is not None
        # The warming decode is forgotten: every slot is empty.
        memory = llama_cpp.llama_get_memory(context)
        assert [llama_cpp.llama_memory_seq_pos_max(memory, s) for s in range(SMALL.slots)] == [
            -1
        ] * SMALL.slots
        llama_cpp.llama_free(context)
    finally:
        item.close()


def test_the_preloader_warms_on_idle_time_and_a_take_does_not_wait_for_it(
    model_copy: str,
) -> None:
    """The warming runs when nothing else is to do, is tried again while the cores are
    busy, and a `take` gets the model at once even while a warming decode is under way."""
    fits = _Fits()
    tries: list[int] = []
    busy_until = threading.Event()  # set: the cores are idle
    warming = threading.Event()
    release = threading.Event()

    def warm(item: Preloaded) -> bool:
        tries.append(1)
        if not busy_until.is_set():
            return False
        warming.set()
        release.wait(60)
        return True

    preloader = Preloader(
        fits.open,
        Preloaded.close,
        free_delay=0.0,
        fit_model=fits,
        warm_model=warm,
        inflight_wait=60.0,
    )
    preloader.want([model_copy], SMALL)
    preloader.start()
    wait_for(lambda: len(tries) >= 2, 30, message="tried again while the cores are busy")
    assert preloader.loaded() == [model_copy], "ready to take before it is warm"
    busy_until.set()
    wait_for(warming.is_set, 30, message="a warming decode under way")
    taken: list[Any] = []
    taker = threading.Thread(target=lambda: taken.append(preloader.take(model_copy)))
    taker.start()
    try:
        wait_for(lambda: bool(taken), 10, message="take did not wait for the warming")
    finally:
        release.set()
        taker.join(30)
    item = taken[0]
    assert isinstance(item, Preloaded)
    item.close()


def test_idle_cores_counts_cores_busy_with_other_processes_as_not_idle() -> None:
    from model_service.cpus import idle_cores, usable_cores

    cores = usable_cores()
    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        wait_for(
            lambda: all(psutil.Process(p.pid).cpu_times().user > 0.1 for p in spinners),
            10,
            message="the spinners spin",
        )
        busy = idle_cores(0.2)
    finally:
        for process in spinners:
            process.kill()
            process.wait()
    assert 0.0 <= busy <= 0.5, f"{busy:.2f} of {cores} cores idle while all spin"
    assert 0.0 <= idle_cores() <= cores


def test_a_context_of_another_shape_is_freed_not_handed_over(model_copy: str) -> None:
    preloader = Preloader(Preloaded.open, Preloaded.close, fit_model=Preloaded.fit)
    preloader.want([model_copy], SMALL)
    preloader.start()
    wait_for(lambda: preloader.loaded() == [model_copy], 30, message="the file ready")
    item = preloader.take(model_copy)
    assert isinstance(item, Preloaded)
    assert item.take_context(ContextShape(n_ctx=512, slots=2, n_batch=64)) is None
    assert item.take_context(SMALL) is None, "the mismatched context was freed"
    item.close()


def test_the_context_moves_when_another_model_becomes_the_likeliest(
    model_copy: str, second: str
) -> None:
    fits = _Fits()
    preloader = Preloader(fits.open, Preloaded.close, fit_model=fits)
    preloader.want([model_copy, second], SMALL)
    preloader.start()
    wait_for(lambda: len(preloader.loaded()) == 2, 30, message="both files ready")

    preloader.want([second, model_copy], SMALL)
    wait_for(lambda: len(fits.calls) == 3, 30, message="the context to move")
    # Freed from the old first before it is made for the new one: its memory is reused.
    assert fits.calls[1:] == [(model_copy, None), (second, SMALL)]
    item = preloader.take(second)
    assert isinstance(item, Preloaded)
    context = item.take_context(SMALL)
    assert context is not None
    llama_cpp.llama_free(context)
    item.close()
