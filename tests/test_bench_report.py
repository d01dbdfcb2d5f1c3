"""The benchmark report's arithmetic on a run's JSON (scripts/bench_report.py): the kernels'
ceiling beside 1.1x llama-server, and the head to head's 4-stream column. No run."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def report() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))  # bench_report imports its siblings by name
    try:
        import bench_report as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def side(tps: list[float], **extra: Any) -> dict[str, Any]:
    runs = [{"aggregate_tps": x, **extra} for x in tps]
    ordered = sorted(tps)
    middle = ordered[len(ordered) // 2]
    return {"label": "x", "runs": runs, "aggregate_tps": middle, "aggregate_tps_dist": {
        "n": len(tps), "median": middle, "p10": ordered[0], "p90": ordered[-1],
        "min": ordered[0], "max": ordered[-1]}}  # fmt: skip


def test_the_ceiling_is_the_bare_loops_steps_without_its_prompts(report: ModuleType) -> None:
    # 1,024 tokens in 3.4 s of which 0.4 s of prompts: 1,024 / 3.0 = 341.3 tokens/s.
    bare = side([300.0, 301.0, 302.0], tokens=1024, wall_s=3.4, slowest_ttft_ms=400.0)
    results = {
        "head_to_head": {
            "aggregate_8": {"bare_loop_q8_0": bare, "llama_server_q8_0": side([300.0])}
        }
    }
    text = report.steps_only_ceiling(results)
    assert "1.1x llama-server at 8 streams is 330.0 tokens/s" in text
    assert "deliver 341.3 (341.3-341.3, n=3)" in text
    # Without the bare loop there is nothing to say.
    del results["head_to_head"]["aggregate_8"]["bare_loop_q8_0"]
    assert report.steps_only_ceiling(results) == ""


def test_the_head_to_head_shows_4_streams_only_when_measured(report: ModuleType) -> None:
    single = {
        key: {"label": key, "decode_tps": {"median": 100.0, "p10": 90.0, "p90": 110.0, "n": 3}}
        for key in ("pool_worker", "llama_server")
    }
    results: dict[str, Any] = {
        "head_to_head": {
            "single_stream": single,
            "aggregate_8": {"pool_worker": side([400.0]), "llama_server": side([380.0])},
        }
    }
    without = "\n".join(report.head_to_head_section(results))
    assert "4 streams, aggregate" not in without
    results["head_to_head"]["aggregate_4"] = {
        "pool_worker": side([300.0]),
        "llama_server": side([150.0]),
    }
    with_four = "\n".join(report.head_to_head_section(results))
    assert "| 4 streams, aggregate |" in with_four
    ratio_row = next(x for x in with_four.splitlines() if x.startswith("| pool worker port /"))
    assert ratio_row.split("|")[2:5] == [" 1.00x ", " 2.00x ", " 1.05x "]
    assert "a pass of its own" in with_four
