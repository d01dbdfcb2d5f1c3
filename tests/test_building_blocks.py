"""The small pieces on their own: state table, stop sequences, ports, config files."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from model_service.backends.base import BackendError
from model_service.backends.llama_cpp import (
    ContextShape,
    LlamaCppBackend,
    create_context,
    open_model,
)
from model_service.cpus import at_low_priority
from model_service.engine import StopMatcher
from model_service.model_files import package_file
from pool_manager.config import (
    ConfigError,
    ConfigStore,
    ModelSpec,
    PoolConfig,
    atomic_write_json,
    effective_ttl_seconds,
)
from pool_manager.ports import NoFreePort, PortAllocator
from pool_manager.states import (
    TRANSITIONS,
    InvalidTransition,
    ModelState,
    check_transition,
    mermaid_diagram,
)
from tests.conftest import REPO, SMOLLM2_FILE, free_port_range

S = ModelState


def test_every_state_is_reachable_and_can_get_back_to_cold() -> None:
    sources = {a for a, _ in TRANSITIONS}
    targets = {b for _, b in TRANSITIONS}
    assert set(ModelState) == sources == targets | {S.COLD}


@pytest.mark.parametrize(
    ("old", "new"),
    [(S.COLD, S.HOT), (S.COLD, S.COOLING), (S.UNLOADING, S.HOT), (S.HOT, S.WARMING)],
)
def test_transitions_outside_the_table_are_refused(old: ModelState, new: ModelState) -> None:
    with pytest.raises(InvalidTransition):
        check_transition("m", old, new)


def test_architecture_doc_carries_the_generated_diagram() -> None:
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", doc, flags=re.S)
    assert mermaid_diagram().strip() in [b.strip() for b in blocks], (
        "docs/ARCHITECTURE.md's state diagram differs from pool_manager.states.TRANSITIONS; "
        "paste the output of mermaid_diagram()"
    )


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "hit"),
    [
        ([], ["a", "b"], "ab", None),
        (["END"], ["hello E", "N", "D tail"], "hello ", "END"),
        (["END"], ["hello E", "NX"], "hello ENX", None),
        (["\n\n", "###"], ["one\n", "two##", "#"], "one\ntwo", "###"),
        (["ab"], ["xa", "a", "b"], "xa", "ab"),
    ],
)
def test_stop_matcher(stops: list[str], pieces: list[str], emitted: str, hit: str | None) -> None:
    matcher = StopMatcher(stops)
    out, stopped = "", None
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == (emitted, hit)


def test_port_allocator_skips_busy_ports_and_reuses_released_ones() -> None:
    start, end = free_port_range(3)
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind(("127.0.0.1", start + 1))
    busy.listen()
    allocator = PortAllocator("127.0.0.1", start, end)
    try:
        first = allocator.allocate()
        second = allocator.allocate()
        assert [first.getsockname()[1], second.getsockname()[1]] == [start, start + 2]
        with pytest.raises(NoFreePort):
            allocator.allocate()
        first.close()
        allocator.release(start)
        third = allocator.allocate()
        assert third.getsockname()[1] == start
        third.close()
        second.close()
    finally:
        busy.close()


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    atomic_write_json(target, {"models": [1]})
    atomic_write_json(target, {"models": [1, 2]})
    assert json.loads(target.read_text()) == {"models": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]


def test_atomic_write_keeps_old_file_when_serialising_fails(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_store_reports_broken_files_clearly(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "c.json", tmp_path / "r.json")
    assert store.load_config() == PoolConfig()  # missing file: defaults
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        store.load_config()
    entry = {"model_id": "m:1", "model_path": "x.gguf"}
    (tmp_path / "r.json").write_text(json.dumps({"models": [entry, entry]}))
    with pytest.raises(ConfigError, match="listed twice"):
        store.load_registry()


def test_shipped_files_are_valid_and_point_at_the_embedded_model() -> None:
    store = ConfigStore(
        REPO / "configs" / "model_pool_config.json", REPO / "configs" / "model_pool_registry.json"
    )
    config = store.load_config()
    models = {m.model_id: m for m in store.load_registry()}
    assert config.port == 8050 and config.port_range.start == 8051
    assert config.port_range.end == 8099
    assert models["smollm2:135m"].warmup
    assert any(not m.warmup for m in models.values()), "a non-warmup model shows swapping"
    assert config.default_ttl_minutes == 15 and config.max_concurrent_models == 5


@pytest.mark.parametrize(
    ("ttl", "expected_minutes"), [(None, 15), (0, 15), (2, 5), (30, 30), (500, 60)]
)
def test_effective_ttl_is_clamped(ttl: float | None, expected_minutes: float) -> None:
    spec = ModelSpec(model_id="m", model_path="x.gguf", ttl_minutes=ttl)
    assert effective_ttl_seconds(PoolConfig(), spec) == expected_minutes * 60


@pytest.mark.parametrize("model_id", ["a", "qwen2.5-coder:7b", "org/name:tag", "x@y+z"])
def test_valid_model_ids(model_id: str) -> None:
    assert ModelSpec(model_id=model_id, model_path="f.gguf").model_id == model_id


@pytest.mark.parametrize("model_id", ["", "has space", "../etc", "a" * 200, "m/load", ":x"])
def test_invalid_model_ids(model_id: str) -> None:
    with pytest.raises(ValueError):
        ModelSpec(model_id=model_id, model_path="f.gguf")


def _backend_with_caches(caches: dict[int, list[int]]) -> LlamaCppBackend:
    backend = LlamaCppBackend({"model_path": "unused.gguf", "max_concurrent": 8})
    for slot, tokens in caches.items():
        backend._sequences[slot].cached = list(tokens)
    return backend


def test_slot_choice_prefers_the_cached_prefix() -> None:
    backend = _backend_with_caches({6: [1, 2, 3, 4, 5]})
    # Nothing busy; slot 6 holds the prompt's first four tokens.
    assert backend.pick_slot(list(range(8)), [1, 2, 3, 4, 9], 128) == 6


def test_slot_choice_keeps_concurrent_requests_side_by_side() -> None:
    """Busy slots 0-3 decode in one pass; a request in slot 6 would add a pass a step
    for its whole reply, more than a short cached prefix saves."""
    backend = _backend_with_caches({6: [1, 2, 3, 4, 5]})
    assert backend.pick_slot([4, 5, 6, 7], [1, 2, 3, 4, 9], 128) == 4
    # A slot that joins two runs saves a pass: of 10 slots, busy 0-2 and 4-7; slot 3
    # joins them, 8 extends one, 9 would start a third (and was used least recently).
    wide = LlamaCppBackend({"model_path": "unused.gguf", "max_concurrent": 10})
    wide._sequences[3].last_used = wide._sequences[8].last_used = 1
    assert wide.pick_slot([3, 8, 9], [1, 2], 128) == 3
    assert wide.pick_slot([8, 9], [1, 2], 128) == 8


def test_slot_choice_keeps_a_long_cached_prefix_apart() -> None:
    """A cached prefix worth more than the extra passes keeps its slot: a 1,000-token
    conversation against 16 steps beside the busy slots (96 token-equivalents)."""
    conversation = list(range(1, 1001))
    backend = _backend_with_caches({6: conversation})
    assert backend.pick_slot([4, 5, 6, 7], [*conversation, 7, 8], 16) == 6
    # The same prefix against a long time beside them: the extra passes cost more.
    assert backend.pick_slot([4, 5, 6, 7], [*conversation, 7, 8], 512) == 4


def test_slot_choice_keeps_another_conversation_for_a_short_shared_prefix() -> None:
    """Two conversations that share only the template's first tokens take turns: each
    keeps its own slot (and cache) instead of overwriting the other's."""
    opening = [1, 2, 3]
    first, second = [*opening, 10, 11, 12, 13, 14], [*opening, 20, 21, 22, 23, 24]
    backend = _backend_with_caches({0: first})
    backend._sequences[0].last_used = 1
    slot = backend.pick_slot(list(range(8)), second, 128)
    assert slot != 0
    backend._sequences[slot].cached = list(second)
    assert backend.pick_slot(list(range(8)), first, 128) == 0
    assert backend.pick_slot(list(range(8)), second, 128) == slot


def test_slot_choice_keeps_busy_slots_together_on_a_tie() -> None:
    backend = _backend_with_caches({})
    # Nothing cached anywhere: the slot next to the busy run 0-3, not the one used least.
    backend._sequences[4].last_used = 5
    assert backend.pick_slot([4, 5, 6, 7], [1, 2, 3], 128) == 4
    # Nothing busy: the least recently used slot, so recent caches survive.
    backend._sequences[0].last_used = 9
    assert backend.pick_slot(list(range(8)), [1, 2, 3], 128) == 1


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_usable_cores_follow_the_affinity_limit() -> None:
    code = "from model_service.cpus import usable_cores; print(usable_cores())"
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert pinned.stdout.strip() == "1"


def test_low_priority_work_runs_on_an_idle_thread_and_leaves_the_caller_as_it_was() -> None:
    """The spare's import and preparation: SCHED_IDLE on their own thread (a nice-19
    thread keeps its core when a serving thread wakes), the caller's policy untouched,
    the result returned and an error raised on the caller's thread."""
    before = os.sched_getscheduler(0)
    assert at_low_priority(lambda: os.sched_getscheduler(0), "t") == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before != os.SCHED_IDLE

    def fail() -> None:
        raise LookupError("raised on the thread")

    with pytest.raises(LookupError, match="raised on the thread"):
        at_low_priority(fail, "t")


def test_an_urgent_spare_runs_its_low_priority_work_at_normal_priority() -> None:
    """`--urgent` (a load waits for the process): nothing at SCHED_IDLE."""
    code = (
        "import os\n"
        "from model_service import cpus\n"
        "cpus.run_everything_now()\n"
        "print(cpus.at_low_priority(lambda: os.sched_getscheduler(0), 't') == os.SCHED_IDLE)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_spare_leaves_the_terminal_and_the_process_group_but_not_the_session() -> None:
    """Started from a terminal's session (a pty here), `leave_the_terminal` drops the
    controlling terminal (a worker cannot write into the operator's input) and the
    process group (a Ctrl-C reaches the manager alone), and keeps the session."""
    inner = (
        "import os\n"
        "from model_service.spare import leave_the_terminal\n"
        "def tty(): return int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[4])\n"
        "sid, before = os.getsid(0), tty()\n"
        "leave_the_terminal()\n"
        "print('result', before != 0, tty(), os.getpgid(0) == os.getpid(), os.getsid(0) == sid)\n"
    )
    outer = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {inner!r}]))"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session leader with the pty as its terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-c", outer])
    output = b""
    with contextlib.suppress(OSError):  # EIO once the child side closes
        while chunk := os.read(terminal, 4096):
            output += chunk
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"result True 0 True True" in output, output


def test_a_spare_warms_up_the_streaming_path_with_one_in_process_request() -> None:
    """The warm-up's canned request goes through the worker app's real middleware and
    route and gets a whole SSE stream back; it leaves the first-use imports done."""
    code = (
        "import sys\n"
        "from model_service.warmup import warm_up_serving\n"
        "assert 'anyio.streams.memory' not in sys.modules\n"
        "print(warm_up_serving(), 'anyio.streams.memory' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_the_flash_attn_setting_reaches_llama_cpp() -> None:
    """Off twice gives the same logits to the bit; on computes attention another way, so
    they differ a little, with the same top token."""
    model = open_model(str(package_file(SMOLLM2_FILE)))
    tokens = model.tokenize(b"The capital of France is", add_bos=True, special=False)

    def last_logits(flash_attn: str) -> np.ndarray:
        ctx = create_context(model, ContextShape(256, 1, 64, flash_attn), 2)
        batch = llama_cpp.llama_batch_init(64, 0, 1)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        assert llama_cpp.llama_decode(ctx, batch) == 0
        size = llama_cpp.llama_vocab_n_tokens(model.vocab)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(size,))
        copied = logits.copy()
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        return copied

    off, off_again, on = last_logits("off"), last_logits("off"), last_logits("on")
    model.close()
    assert np.array_equal(off, off_again)
    assert not np.array_equal(off, on)
    assert off.argmax() == on.argmax() and np.abs(off - on).max() < 2.0
    with pytest.raises(BackendError, match="flash_attn"):
        ContextShape.from_settings({"flash_attn": "sometimes"})
