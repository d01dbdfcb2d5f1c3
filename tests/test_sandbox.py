"""Sandboxed workers (model_service/sandbox.py): no network for a local model's worker,
no_new_privs, limits on open files and core dumps, and a memory ceiling per model, past
which the worker fails alone and its model says "out of memory"."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_service.sandbox import OPEN_FILES, MemoryCgroups, out_of_memory_reason
from tests.conftest import DEFAULT_MODEL, ManagerFactory, model_entry, pid_alive, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ADMIN_KEY = "admin-key-sandbox"
CLIENT_KEY = "client-key-sandbox"


def chat(url: str, model: str, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=120,
    )


def limits(pid: int) -> dict[str, list[str]]:
    """/proc/PID/limits: name -> [soft, hard, (units)]."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): line[26:].split() for line in lines}


def net_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_a_local_worker_has_no_network_and_runs_limited(start_manager: ManagerFactory) -> None:
    manager = start_manager(env={"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY})
    pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    assert manager.process is not None

    # The worker serves (on the socket the manager bound) but has a network namespace of
    # its own, with no interface but a loopback that is down and no route at all.
    assert chat(manager.url, DEFAULT_MODEL, CLIENT_KEY).status_code == 200
    assert net_namespace(pid) != net_namespace(manager.process.pid)
    threads = {os.readlink(task / "ns/net") for task in Path(f"/proc/{pid}/task").iterdir()}
    assert threads == {net_namespace(pid)}, "every thread of the worker is in it"
    devices = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    interfaces = [line.split(":")[0].strip() for line in devices]
    assert interfaces == ["lo"]
    assert Path(f"/proc/{pid}/net/route").read_text().count("\n") <= 1  # the header only

    # A server here is reachable from the test's namespace, not from the worker's.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        if os.geteuid() == 0 and shutil.which("nsenter"):
            connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=10)"
            inside = subprocess.run(
                ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", connect],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert inside.returncode != 0 and "Network is unreachable" in inside.stderr

    status = Path(f"/proc/{pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    worker_limits = limits(pid)
    assert worker_limits["Max open files"][:2] == [str(OPEN_FILES)] * 2
    assert worker_limits["Max core file size"][:2] == ["0", "0"]

    # What the sandbox has on this machine: for admins only.
    sandbox = manager.request("GET", "/health").json()["sandbox"]
    assert sandbox["enabled"] is True
    mechanisms = sandbox["mechanisms"]
    assert mechanisms["network_namespace"]["available"] is True
    assert mechanisms["no_new_privs"]["available"] is True
    if not mechanisms["memory_cgroup"]["available"]:
        # The fallback ceiling: the address space the worker had when handed the model,
        # plus the budget (here the default, from the model's memory estimate).
        assert worker_limits["Max address space"][0] != "unlimited"
    client_view = httpx.get(
        f"{manager.url}/health", headers={"X-API-Key": CLIENT_KEY}, timeout=30
    ).json()
    assert "sandbox" not in client_view


def test_a_worker_past_its_memory_ceiling_fails_alone(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        # No spare loads `greedy`'s weights ahead: its load must map them under the ceiling.
        config={"spare_preload": 0},
        models=[
            model_entry("steady", warmup=True),
            model_entry("greedy", memory_max_mb=1),
        ],
    )
    steady = manager.wait_state("steady", "HOT")

    reply = manager.request("POST", "/models/greedy/load")
    assert reply.status_code >= 500, reply.text
    assert "out of memory" in reply.json()["error"]["message"]
    greedy = manager.wait_state("greedy", "COLD", "FAILED")
    assert "out of memory" in greedy["last_error"] and greedy["pid"] is None

    # Nothing else was disturbed: the other model's worker is the same and answers.
    answer = chat(manager.url, "steady")
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    after = manager.model("steady")
    assert after["state"] == "HOT" and after["pid"] == steady["pid"]
    health = manager.request("GET", "/health").json()
    assert health["status"] == "healthy" and health["models_by_state"]["HOT"] == 1


def test_a_worker_pushed_past_its_ceiling_while_serving_dies_alone(
    start_manager: ManagerFactory,
) -> None:
    """360 MB of address space is room for the model (the load, its compute buffer and
    its threads added 262-291 MB, measured; a thread's heap arena may map 64 MB more) but
    not for the embeddings context a first /v1/embeddings request makes (~136 MB with its
    margin; 69-98 MB were left): that worker answers 503 out_of_memory and exits; its
    model goes COLD saying so; nothing else is touched. At 400 MB, 144-146 MB were left
    under a busy machine and the context sometimes fit."""
    manager = start_manager(
        config={"spare_preload": 0},
        models=[model_entry("steady", warmup=True), model_entry("tight", memory_max_mb=360)],
    )
    steady = manager.wait_state("steady", "HOT")
    tight = manager.load("tight")
    reply = httpx.post(
        f"{manager.url}/v1/embeddings", json={"model": "tight", "input": "hello"}, timeout=60
    )
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "out_of_memory"
    wait_for(lambda: not pid_alive(tight["pid"]), 30, message="the worker to exit")
    after = manager.wait_state("tight", "COLD", "FAILED")
    assert "out of memory" in after["last_error"]
    answer = chat(manager.url, "steady")
    assert answer.status_code == 200
    assert manager.model("steady")["pid"] == steady["pid"]


class FakeOpenAI(BaseHTTPRequestHandler):
    """Just enough of an OpenAI server: its model list and a canned chat reply."""

    def do_GET(self) -> None:
        self._reply({"object": "list", "data": [{"id": "echo", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "echo",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "from afar"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        )

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openai() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_remote_models_worker_keeps_the_network(
    start_manager: ManagerFactory, fake_openai: str
) -> None:
    manager = start_manager(
        models=[{"model_id": "far", "backend": "openai", "base_url": fake_openai}]
    )
    reply = chat(manager.url, "far")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "from afar"
    pid = manager.model("far")["pid"]
    assert manager.process is not None
    assert net_namespace(pid) == net_namespace(manager.process.pid)
    assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()  # the rest still holds


def test_memory_cgroups_give_each_worker_its_own_memory_max(tmp_path: Path) -> None:
    """cgroup v2 is not delegated on every machine: the files it writes, in a folder."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("\n")
    cgroups, detail = MemoryCgroups.delegated(tmp_path, is_root=False)
    assert cgroups is not None, detail
    # The manager moved itself into a leaf, so its cgroup can hand memory to children.
    assert (tmp_path / "manager" / "cgroup.procs").read_text() == str(os.getpid())
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"

    group = cgroups.attach(4242, 300 * 2**20)
    assert (group / "memory.max").read_text() == str(300 * 2**20)
    assert (group / "cgroup.procs").read_text() == "4242"
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert not MemoryCgroups.oom_killed(group)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert MemoryCgroups.oom_killed(group)

    (tmp_path / "cgroup.controllers").write_text("cpu pids\n")
    none, why = MemoryCgroups.delegated(tmp_path, is_root=False)
    assert none is None and "not delegated" in why


def test_which_load_failures_count_as_out_of_memory() -> None:
    ceiling = {"bytes": 64 * 2**20, "need": 300 * 2**20, "by": "address_space"}
    assert "out of memory" in (out_of_memory_reason(MemoryError(), ceiling) or "")
    # No address-space limit in force here: llama.cpp's own failure keeps its reason.
    assert out_of_memory_reason(RuntimeError("unknown model architecture"), ceiling) is None
    assert out_of_memory_reason(RuntimeError("unknown model architecture"), None) is None
