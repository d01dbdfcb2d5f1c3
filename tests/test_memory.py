"""Memory: estimates before loading, eviction to make room, refusal when nothing fits."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from model_service.gguf import estimate_memory_bytes, read_metadata
from model_service.model_files import package_file
from model_service.weights import cache_dir, served_size
from tests.conftest import (
    SMOLLM2_FILE,
    Manager,
    ManagerFactory,
    model_entry,
    pid_alive,
    wait_for,
)


def _estimate_bytes(cells: int) -> int:
    """The manager's estimate for the shipped file, as served (model_service/weights.py)."""
    source = package_file(SMOLLM2_FILE)
    return estimate_memory_bytes(source, cells, served_size(source, "auto", cache_dir()))


def test_estimate_is_close_to_measured_rss(start_manager: ManagerFactory) -> None:
    manager = start_manager(models=[model_entry("m:1", n_ctx=2048, max_concurrent=2)])
    # Each of the max_concurrent slots has n_ctx cells of KV cache. Taken before the load,
    # like the manager's: until the first load has widened the weights it counts the
    # largest size a Q8_0 copy can have.
    estimate = _estimate_bytes(2048 * 2) / 2**20
    model = manager.load("m:1")
    assert model["memory_estimate_mb"] == round(estimate)
    rss = wait_for(lambda: manager.model("m:1")["memory_rss_mb"], 30, message="an RSS reading")
    assert 0.6 * estimate < rss < 1.4 * estimate, (estimate, rss)
    assert model["vram_mb"] is None, "no GPU on this machine"
    memory = manager.request("GET", "/health").json()["memory"]
    assert memory["gpu_available"] is False and memory["gpu_free_mb"] is None
    assert abs(memory["estimated_use_mb"] - estimate) <= 1


def test_model_bigger_than_the_limit_is_refused_without_starting(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(config={"memory_limit_mb": 100}, models=[model_entry("m:1")])
    reply = manager.request("POST", "/models/m:1/load")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "insufficient_memory" and "memory_limit_mb=100" in error["message"]
    assert manager.model("m:1")["state"] == "COLD" and manager.model("m:1")["pid"] is None


def test_memory_limit_evicts_least_recently_used(start_manager: ManagerFactory) -> None:
    per_model = _estimate_bytes(1024 * 4) // 2**20
    manager = start_manager(
        config={"memory_limit_mb": int(per_model * 2.5), "max_concurrent_models": 5},
        models=[model_entry("a:1"), model_entry("b:1"), model_entry("c:1")],
    )
    a = manager.load("a:1")
    manager.load("b:1")
    manager.load("c:1")  # a third does not fit in 2.5 models' worth: a (LRU) goes
    models = manager.models()
    assert [models[m]["state"] for m in ("a:1", "b:1", "c:1")] == ["COLD", "HOT", "HOT"]
    wait_for(lambda: not pid_alive(a["pid"]), 10, message="the evicted worker to exit")


def test_truncated_or_foreign_files_fail_with_a_clear_reason(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    real = package_file(SMOLLM2_FILE).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(real[:5000])
    (tmp_path / "text.gguf").write_text("this is not a model\n")
    manager = start_manager(
        models=[
            {"model_id": "cut:1", "model_path": str(tmp_path / "cut.gguf")},
            {"model_id": "text:1", "model_path": str(tmp_path / "text.gguf")},
        ]
    )
    for model_id, words in [("cut:1", "truncated"), ("text:1", "not a GGUF file")]:
        reply = manager.request("POST", f"/models/{model_id}/load")
        assert reply.status_code == 503
        assert words in reply.json()["error"]["message"], reply.text
        assert words in manager.model(model_id)["last_error"]
    assert manager.request("GET", "/health").status_code == 200


def test_header_reader_reads_the_real_model() -> None:
    metadata = read_metadata(package_file(SMOLLM2_FILE))
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 30
    assert metadata["llama.context_length"] == 8192


def _spare_pids(manager: Manager) -> list[int]:
    assert manager.process is not None
    loaded = {m["pid"] for m in manager.models().values() if m["pid"]}
    children = psutil.Process(manager.process.pid).children()
    manager.seen_worker_pids.update(c.pid for c in children)
    return [c.pid for c in children if c.pid not in loaded]


def _settled(pid: int) -> bool:
    """The process used no CPU over a 0.3 s window: a spare that finished starting."""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(0.3)  # the measuring window, not a wait for something to happen
    return sum(process.cpu_times()[:2]) - before < 0.01


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss / 2**20)


def test_spare_maps_its_reserve_ahead_and_the_loaded_worker_gives_back_the_rest(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(config={"spare_reserve_mb": 700}, models=[model_entry("m:1")])
    spare = wait_for(lambda: _spare_pids(manager), 30, message="a spare worker")[0]
    # The spare says it is ready only after mapping its reserve.
    wait_for(lambda: _rss_mb(spare) > 700, 30, message="the spare's reserve to be mapped")
    model = manager.load("m:1")
    assert model["pid"] == spare, "the load used the spare"
    # This model needs far less than 700 MB: the rest went back once it was loaded.
    assert _rss_mb(spare) < 0.8 * 700 < model["memory_estimate_mb"] + 700
    phases = model["load_breakdown_ms"]
    assert {"handoff", "load_model", "create_context", "start_server"} <= set(phases)
    assert abs(sum(phases.values()) - model["load_seconds"] * 1000) < 5


def test_no_reserve_when_turned_off(start_manager: ManagerFactory) -> None:
    manager = start_manager(config={"spare_reserve_mb": 0}, models=[model_entry("m:1")])
    spare = wait_for(lambda: _spare_pids(manager), 30, message="a spare worker")[0]
    wait_for(lambda: _settled(spare), 30, message="the spare to finish starting")
    assert _rss_mb(spare) < 300
