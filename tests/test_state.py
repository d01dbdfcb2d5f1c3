"""State that stays true (issue 14, point 7): admin actions racing on one model, and
changes whose file cannot be written.

Concurrent load, unload, register, delete and chat on the same ids must never answer
500, never leave two workers for one model, and never leave a worker that /models does
not list. A change the registry file cannot take is refused whole: what the API shows is
always what a restart loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from pool_manager.config import ModelSpec
from pool_manager.pool import ModelNotFound
from tests.conftest import (
    DEFAULT_MODEL,
    Manager,
    ManagerFactory,
    make_pool,
    model_entry,
    wait_for,
)

IDS = ("race:a", "race:b")


def _worker_pids(manager: Manager) -> set[int]:
    """The manager's live worker processes (spares included; not the fork server)."""
    assert manager.process is not None
    children = psutil.Process(manager.process.pid).children(recursive=True)
    fork_server = manager.request("GET", "/health").json()["fork_server_pid"]
    pids = set()
    for child in children:
        if child.pid == fork_server:
            continue
        with contextlib.suppress(psutil.Error):
            is_worker = any(arg.startswith("model_service") for arg in child.cmdline())
            if is_worker and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
    return pids


def _unaccounted(manager: Manager) -> str:
    """What is wrong with the workers: "" when every live one is a listed model's (one
    per model) or a spare."""
    models = manager.models()
    listed = {m["model_id"]: m["pid"] for m in models.values() if m["pid"]}
    spares = manager.request("GET", "/health").json()["spare_workers"]
    live = _worker_pids(manager)
    pids = list(listed.values())
    if len(pids) != len(set(pids)) or not live >= set(pids) or len(live) != len(pids) + spares:
        return f"live workers {sorted(live)}, listed {listed}, {spares} spares"
    return ""


def _accounted_for(manager: Manager, timeout: float) -> None:
    try:
        wait_for(lambda: not _unaccounted(manager), timeout, message="no orphan worker")
    except AssertionError:
        raise AssertionError(f"{_unaccounted(manager)}\n{manager.log()}") from None


def test_deletes_racing_a_load_never_orphan_a_worker(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(IDS[0])], config={"spare_workers": 0})
    for _round in range(3):
        manager.load(IDS[0])
        calls = [
            ("DELETE", f"/models/{IDS[0]}"),
            ("DELETE", f"/models/{IDS[0]}"),
            ("POST", f"/models/{IDS[0]}/load"),
        ]
        statuses: list[int] = []

        def call(method: str, path: str, into: list[int] = statuses) -> None:
            into.append(manager.request(method, path).status_code)

        threads = [threading.Thread(target=call, args=pair) for pair in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(statuses).count(200) >= 1 and all(s in (200, 404) for s in statuses), statuses
        assert IDS[0] not in manager.models()
        _accounted_for(manager, 30)
        reply = manager.request("POST", "/models/register", json=model_entry(IDS[0]))
        assert reply.status_code == 201, reply.text


def test_concurrent_admin_actions_keep_one_listed_worker_per_model(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(
        models=[model_entry(DEFAULT_MODEL), *(model_entry(i) for i in IDS)],
        config={"max_concurrent_models": 2, "spare_workers": 1},
    )
    stop = time.monotonic() + 45
    statuses: list[tuple[str, int]] = []
    rng = random.Random(14)

    def actor(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            model_id = local.choice(IDS)
            action = local.choice(["load", "unload", "delete", "register", "chat", "chat"])
            try:
                if action == "load":
                    reply = manager.request("POST", f"/models/{model_id}/load", timeout=90)
                elif action == "unload":
                    reply = manager.request("POST", f"/models/{model_id}/unload", timeout=90)
                elif action == "delete":
                    reply = manager.request("DELETE", f"/models/{model_id}", timeout=90)
                elif action == "register":
                    reply = manager.request(
                        "POST",
                        "/models/register?replace=true",
                        json=model_entry(model_id),
                        timeout=90,
                    )
                else:
                    reply = httpx.post(
                        f"{manager.url}/v1/chat/completions",
                        json={
                            "model": model_id,
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 2,
                        },
                        timeout=90,
                    )
            except httpx.HTTPError as exc:
                statuses.append((action, -1))
                print(action, model_id, repr(exc))
                continue
            statuses.append((action, reply.status_code))
            if reply.status_code >= 500 and reply.status_code != 503:
                print(action, model_id, reply.status_code, reply.text)

    threads = [threading.Thread(target=actor, args=(rng.random(),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    samples = 0
    while any(t.is_alive() for t in threads):
        models = manager.models()
        listed = [m["pid"] for m in models.values() if m["pid"]]
        assert len(listed) == len(set(listed)), "two models listed with one worker"
        samples += 1
        time.sleep(0.5)
    for thread in threads:
        thread.join()
    bad = [(action, status) for action, status in statuses if status >= 500 and status != 503]
    assert not bad, f"server errors: {bad}"
    assert not [s for s in statuses if s[1] == -1], "a request broke off"
    assert len(statuses) > 40 and samples > 10
    _accounted_for(manager, 60)
    on_file = {m["model_id"] for m in json.loads(manager.registry_path.read_text())["models"]}
    assert on_file == set(manager.models()), "the API shows what a restart would load"


@contextlib.contextmanager
def _unwritable(folder: Path) -> Iterator[None]:
    """`folder` refuses new files: immutable for root (who ignores modes), else 0500."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
    try:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            raise AssertionError(f"could not make {folder} unwritable on this machine")
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o700)


def test_a_change_the_file_cannot_take_is_refused_whole(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL), model_entry(IDS[0])])
    before = manager.registry_path.read_text()
    with _unwritable(manager.folder):
        reply = manager.request("POST", "/models/register", json=model_entry(IDS[1]))
        assert reply.status_code == 500, reply.text
        error = reply.json()["error"]
        assert error["code"] == "not_saved" and "registry was not changed" in error["message"]
        deleted = manager.request("DELETE", f"/models/{IDS[0]}")
        assert deleted.status_code == 500 and deleted.json()["error"]["code"] == "not_saved"
        patched = manager.request("PATCH", "/config", json={"default_ttl_minutes": 7})
        assert patched.status_code == 500 and patched.json()["error"]["code"] == "not_saved"
        assert set(manager.models()) == {DEFAULT_MODEL, IDS[0]}
        assert manager.request("GET", "/config").json()["default_ttl_minutes"] != 7
    assert manager.registry_path.read_text() == before
    # A registration whose defaults nest deeper than any sampling setting does is refused
    # before anything is listed or written, and later saves still work.
    deep: dict[str, object] = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    nested = manager.request(
        "POST", "/models/register", json=model_entry(IDS[1], defaults={"deep": deep})
    )
    assert nested.status_code == 400, nested.text
    assert IDS[1] not in manager.models()
    assert manager.request("POST", "/models/register", json=model_entry(IDS[1])).status_code == 201
    manager.stop()
    restarted = manager.start()
    assert set(restarted.models()) == {DEFAULT_MODEL, *IDS}


async def test_a_request_for_a_deleted_model_is_not_served_by_its_successor(
    tmp_path: Path,
) -> None:
    """A request holding a model deleted and registered again meanwhile gets a clear
    404, not a worker that never comes (CI once saw three 502s in the race above: the
    gateway waited on the old record while the load went to the new one)."""
    spec = ModelSpec.model_validate(model_entry("race:a"))
    pool = make_pool(tmp_path, [spec])
    held = pool.get("race:a")
    await pool.delete("race:a")
    successor = await pool.register(spec)
    assert successor is not held and pool.get("race:a") is successor
    with pytest.raises(ModelNotFound, match="race:a"):
        await pool.load_record(held)
