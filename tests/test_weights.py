"""Weights in a form llama.cpp runs fast, and the chat opening's saved KV cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from model_service import weights
from model_service.gguf import read_metadata
from model_service.model_files import package_file
from model_service.weights import ensure_served, needs_widening, served_path, widened_path
from tests.conftest import SMOLLM2_FILE, Manager, ManagerFactory, model_entry, wait_for

Q8_0 = 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


def _ask(manager: Manager, model_id: str, content: str, max_tokens: int) -> dict[str, Any]:
    reply = manager.request(
        "POST",
        "/v1/chat/completions",
        json={
            "model": model_id,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def _chat(manager: Manager, model_id: str) -> str:
    return str(_ask(manager, model_id, "Say hello.", 8)["choices"][0]["message"]["content"])


def test_without_the_q4_1_kernel_q4_1_is_widened_to_q8_0_once_and_a_changed_source_gets_a_new_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stock llama-cpp-python (or a CPU without AVX2): no fast kernel for Q4_1.
    monkeypatch.setattr(weights, "fast_q4_1", lambda: False)
    source = tmp_path / "model.gguf"
    shutil.copy(package_file(SMOLLM2_FILE), source)
    assert needs_widening(source, "auto") and not needs_widening(source, "as_stored")
    assert served_path(source, "as_stored", tmp_path / "cache") == source

    served = ensure_served(source, served_path(source, "auto", tmp_path / "cache"))
    assert served == widened_path(source, tmp_path / "cache") and served.exists()
    assert read_metadata(served)["general.file_type"] == Q8_0
    assert not needs_widening(served, "auto"), "Q8_0 is already fast"
    made = served.stat().st_mtime_ns
    assert ensure_served(source, served).stat().st_mtime_ns == made, "made once"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [served.name], "no temp left"

    os.utime(source, ns=(made + 10**9, made + 10**9))  # the source file was replaced
    assert widened_path(source, tmp_path / "cache") != served


def test_with_the_q4_1_kernel_q4_1_is_served_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "fast_q4_1", lambda: True)
    source = package_file(SMOLLM2_FILE)
    assert not needs_widening(source, "auto")
    assert served_path(source, "auto", tmp_path / "cache") == source


def test_manager_serves_the_fast_form_and_as_stored_on_request(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    cache = tmp_path / "weights"
    manager = start_manager(
        config={"weights_cache_dir": str(cache)},
        models=[model_entry("fast:1"), model_entry("stored:1", weights="as_stored")],
    )
    manager.load("stored:1")
    assert _chat(manager, "stored:1")
    assert not list(cache.glob("*.gguf")), "as_stored never writes a copy"
    manager.load("fast:1")
    assert _chat(manager, "fast:1")
    # With this project's llama.cpp (make install) Q4_1 runs as stored; a stock build
    # gets the Q8_0 copy.
    copies = [p.suffixes[-2:] for p in cache.glob("*.gguf")]
    assert copies == ([] if weights.fast_q4_1() else [[".q8_0", ".gguf"]])


def test_an_unwritable_cache_still_loads_the_model_as_stored(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("in the way")
    manager = start_manager(
        config={"weights_cache_dir": str(not_a_folder / "weights")},
        models=[model_entry("m:1")],
    )
    assert manager.load("m:1")["state"] == "HOT"
    assert _chat(manager, "m:1")


def _cached_tokens(manager: Manager, model_id: str) -> int:
    usage = _ask(manager, model_id, "Name a colour.", 1)["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_the_chat_openings_cache_is_saved_once_and_restored_by_later_workers(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    cache = tmp_path / "weights"
    manager = start_manager(config={"weights_cache_dir": str(cache)}, models=[model_entry("m:1")])
    first = manager.load("m:1")
    saved = wait_for(lambda: list(cache.glob("*.opening.*.kv")), 30, message="the saved opening")
    assert len(saved) == 1

    # Forced: the worker exits (a drained one would go back to the spares, context and all).
    assert manager.request("POST", "/models/m:1/unload", json={"force": True}).status_code == 200
    second = manager.load("m:1")
    assert second["pid"] != first["pid"], "a new worker process"
    # SmolLM2's template opens with a 24-token default system message: restored, not
    # computed, so even the new worker's first request finds it cached.
    assert _cached_tokens(manager, "m:1") >= 20

    garbage = b"not a llama.cpp state file"
    saved[0].write_bytes(garbage)
    assert manager.request("POST", "/models/m:1/unload").status_code == 200
    manager.load("m:1")
    assert _cached_tokens(manager, "m:1") >= 0, "a bad file does not break the worker"
    wait_for(lambda: saved[0].read_bytes() != garbage, 30, message="the bad file replaced")
    assert len(saved[0].read_bytes()) > 100_000, "24 tokens x 30 layers of K and V"
