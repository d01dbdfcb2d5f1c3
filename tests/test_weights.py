"""Weights served in a form llama.cpp's CPU kernels run fast (model_service/weights.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from model_service.gguf import read_metadata
from model_service.model_files import package_file
from model_service.weights import ensure_served, needs_widening, served_path, widened_path
from tests.conftest import SMOLLM2_FILE, Manager, ManagerFactory, model_entry

Q8_0 = 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


def _chat(manager: Manager, model_id: str) -> str:
    reply = manager.request(
        "POST",
        "/v1/chat/completions",
        json={
            "model": model_id,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def test_q4_1_is_widened_to_q8_0_once_and_a_changed_source_gets_a_new_copy(
    tmp_path: Path,
) -> None:
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


def test_manager_serves_the_widened_copy_and_as_stored_on_request(
    start_manager: ManagerFactory, tmp_path: Path
) -> None:
    cache = tmp_path / "weights"
    manager = start_manager(
        config={"weights_cache_dir": str(cache)},
        models=[model_entry("fast:1"), model_entry("stored:1", weights="as_stored")],
    )
    manager.load("stored:1")
    assert _chat(manager, "stored:1")
    assert not cache.exists(), "as_stored never writes a copy"
    manager.load("fast:1")
    assert _chat(manager, "fast:1")
    assert [p.suffixes[-2:] for p in cache.iterdir()] == [[".q8_0", ".gguf"]]


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
