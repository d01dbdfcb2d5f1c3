"""Memory: estimates before loading, eviction to make room, refusal when nothing fits."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from model_service.gguf import (
    GGML_Q4_1,
    estimate_memory,
    read_metadata,
    resident_weights_bytes,
    vocab_size,
)
from model_service.model_files import package_file
from model_service.weights import cache_dir, ensure_served, served_size, widened_path
from pool_manager.memory import (
    MB,
    SPARE_PROCESS_BYTES,
    SpareMemory,
    preload_budget,
    room_under_limit,
    spare_reserve_bytes,
    why_it_does_not_fit,
)
from tests.conftest import (
    SMOLLM2_FILE,
    Manager,
    ManagerFactory,
    model_entry,
    pid_alive,
    wait_for,
)


def _estimate_bytes(n_ctx: int, slots: int) -> int:
    """The manager's estimate for the shipped file, as served (model_service/weights.py)."""
    source = package_file(SMOLLM2_FILE)
    weights, repacked = served_size(source, "auto", cache_dir())
    return estimate_memory(source, n_ctx * slots, slots, weights, repacked).total


@pytest.fixture(scope="module")
def q8_0_copy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2 in the other weights form: the Q8_0 copy that `weights: auto` serves
    where llama.cpp has no fast Q4_1 kernel (mapped only; Q4_1 is also repacked)."""
    source = package_file(SMOLLM2_FILE)
    return str(ensure_served(source, widened_path(source, tmp_path_factory.mktemp("q8"))))


# (n_ctx, slots, weights): the default shape, more KV cells than weights, the other form.
SHAPES = {
    "2048x4-q4_1": (2048, 4, "q4_1"),
    "2048x8-q4_1": (2048, 8, "q4_1"),
    "2048x4-q8_0": (2048, 4, "q8_0"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_estimate_is_within_15_percent_of_measured_rss(
    start_manager: ManagerFactory, q8_0_copy: str, shape: str
) -> None:
    """The estimate against the worker's RSS once it has loaded (from a spare that loaded
    the weights ahead, as a cold start usually is) and served one short request."""
    n_ctx, slots, form = SHAPES[shape]
    files = {"q4_1": {}, "q8_0": {"package_file": None, "model_path": q8_0_copy}}[form]
    entry = {
        k: v
        for k, v in model_entry("m:1", n_ctx=n_ctx, max_concurrent=slots, **files).items()
        if v is not None
    }
    manager = start_manager(models=[entry])
    wait_for(
        lambda: manager.request("GET", "/health").json()["preloaded_models"] == ["m:1"],
        60,
        message="the spare to load the weights ahead",
    )
    model = manager.load("m:1")
    reply = httpx.post(
        f"{model['endpoint']}/v1/chat/completions",
        json={"model": "m:1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    estimate = model["memory_estimate_mb"]
    rss = _rss_mb(model["pid"])
    assert abs(estimate / rss - 1) <= 0.15, (shape, estimate, rss)
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
    per_model = _estimate_bytes(1024, 4) // 2**20
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
    loaded = {m["pid"] for m in manager.models().values() if m["pid"]}
    children = manager.worker_children()
    manager.seen_worker_pids.update(children)
    return [pid for pid in children if pid not in loaded]


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


# --- the admission rules, fed with numbers (pool_manager/memory.py) -----------------------

GB = 2**30


def spare(rss_mb: int, reserve_mb: int, file_mb: int = 0) -> SpareMemory:
    return SpareMemory(rss=rss_mb * MB, file_backed=file_mb * MB, reserve=reserve_mb * MB)


def fits(need_mb: int, **numbers: object) -> str | None:
    defaults: dict[str, object] = {
        "limit": 4 * GB,
        "models": 0,
        "spares": [],
        "available": 16 * GB,
        "reusable": 0,
    }
    return why_it_does_not_fit(need_mb * MB, **{**defaults, **numbers})  # type: ignore[arg-type]


def test_spares_count_against_the_limit() -> None:
    # 2 GB of models + a 1.5 GB model fit in 4 GB; not with a spare holding 600 MB.
    assert fits(1536, models=2 * GB) is None
    reason = fits(1536, models=2 * GB, spares=[spare(600, 500)])
    assert reason is not None and "spare workers 600 MB" in reason
    assert "memory_limit_mb=4096" in reason


def test_a_starting_spare_counts_its_process_and_the_reserve_it_is_about_to_map() -> None:
    starting = spare(rss_mb=20, reserve_mb=1000)
    assert starting.held == SPARE_PROCESS_BYTES + 1000 * MB
    # Its reserve is not mapped yet: the OS still counts it as available.
    assert starting.not_free == starting.held - 20 * MB
    assert spare(rss_mb=1500, reserve_mb=1000).held == 1500 * MB  # weights loaded ahead


def test_spares_count_against_free_memory_their_mapped_weights_included() -> None:
    assert fits(1000, available=1200 * MB) is None
    # The kernel counts a spare's mapped model files as available page cache.
    reason = fits(1000, available=1200 * MB, spares=[spare(400, 200, file_mb=300)])
    assert reason == "it needs about 1000 MB and only 900 MB are free"


def test_the_taken_spares_reserve_serves_the_model_only_as_far_as_it_needs() -> None:
    # The spare the load takes mapped 800 MB ahead: the model's buffers go there.
    assert fits(1000, available=300 * MB, reusable=800 * MB) is None
    # A reserve larger than the model's need frees nothing more for it.
    assert fits(1000, available=0, reusable=5000 * MB) is None
    assert fits(1000, available=100 * MB, reusable=800 * MB) is not None


def test_a_new_spares_reserve_stays_within_the_limit_and_a_quarter_of_free_memory() -> None:
    room = room_under_limit(4 * GB, 3 * GB, [spare(300, 200)])
    assert room == GB - 300 * MB
    assert spare_reserve_bytes(2 * GB, 16 * GB, room) == room - SPARE_PROCESS_BYTES
    assert spare_reserve_bytes(2 * GB, 4 * GB, 8 * GB) == GB  # a quarter of 4 GB free
    assert spare_reserve_bytes(500 * MB, 16 * GB, 8 * GB) == 500 * MB  # the largest need
    assert spare_reserve_bytes(2 * GB, 16 * GB, 0) == 0  # the models fill the limit


def test_weights_loaded_ahead_stay_within_half_the_free_memory_and_the_limit() -> None:
    assert preload_budget(available=4 * GB, room=8 * GB, spares=1) == 2 * GB
    assert preload_budget(available=16 * GB, room=GB, spares=2) == GB // 2  # each maps them
    assert preload_budget(available=16 * GB, room=0, spares=0) == 0


def test_resident_weights_count_the_repacked_matrices_twice() -> None:
    """llama.cpp's own count for SmolLM2's Q4_1 file: 92.10 MiB mapped (the file),
    63.28 MiB repacked (every Q4_1 matrix; the Q8_0 token embeddings are not)."""
    source = package_file(SMOLLM2_FILE)
    mapped = source.stat().st_size
    assert resident_weights_bytes(source, frozenset()) == mapped
    repacked = resident_weights_bytes(source, frozenset({GGML_Q4_1})) - mapped
    assert abs(repacked / MB - 63.28) < 0.01
    assert vocab_size(source) == 49152
