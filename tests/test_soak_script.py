"""The soak's verdicts on single replies (scripts/soak.py): what counts as complete, as
cut, as an error event, and which failures a fault explains. No manager is started."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))  # soak.py imports bench_common as a sibling
    try:
        import soak as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def sse(*events: object) -> list[str]:
    lines = []
    for event in events:
        lines += [f"data: {event if isinstance(event, str) else json.dumps(event)}", ""]
    return lines


def chunk(content: str = "", finish: str | None = None, usage: object = None) -> dict:
    body: dict = {
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_a_complete_stream_passes(soak: ModuleType) -> None:
    read = soak.read_sse(
        sse(chunk("Hi"), chunk(" there", "length"), chunk(usage=USAGE), "[DONE]"), "m", 8
    )
    assert read.problem is None and read.content and read.error is None


def test_a_stream_ending_in_an_error_event_says_so_and_whether_text_came(
    soak: ModuleType,
) -> None:
    error = {"error": {"message": "stopped", "code": "worker_failed"}}
    after = soak.read_sse(sse(chunk("Hi"), error), "m", 8)
    assert after.error == "worker_failed" and after.content
    before = soak.read_sse(sse(error), "m", 8)
    assert before.error == "worker_failed" and not before.content


def test_a_stream_cut_without_done_is_a_problem_not_an_error_event(soak: ModuleType) -> None:
    read = soak.read_sse(sse(chunk("Hi")), "m", 8)
    assert read.problem is not None and read.problem.startswith("truncated")
    assert read.error is None


def test_usage_beyond_max_tokens_is_a_problem(soak: ModuleType) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    read = soak.read_sse(sse(chunk("Hi", "length", usage), "[DONE]"), "m", 8)
    assert read.problem is not None and "usage" in read.problem


def test_ollama_stream_complete_errored_and_cut(soak: ModuleType) -> None:
    line = {"model": "m", "message": {"role": "assistant", "content": "Hi"}, "done": False}
    last = {
        "model": "m",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "eval_count": 4,
        "prompt_eval_count": 9,
    }
    assert soak.read_ndjson([json.dumps(line), json.dumps(last)], 4).problem is None
    errored = soak.read_ndjson([json.dumps(line), json.dumps({"error": "worker died"})], 4)
    assert errored.error == "worker died" and errored.content
    cut = soak.read_ndjson([json.dumps(line)], 4)
    assert cut.problem is not None and cut.problem.startswith("truncated") and cut.error is None
    assert soak.read_ndjson([json.dumps(line), json.dumps(last)], 3).problem is not None


def test_mes_reply(soak: ModuleType) -> None:
    good = {"success": True, "output": "Hi", "usage": USAGE, "model_id": "m", "error": None}
    assert soak.check_mes(good, "m", 8) is None
    assert soak.check_mes({**good, "success": False}, "m", 8) is not None
    assert soak.check_mes({**good, "model_id": "other"}, "m", 8) is not None


def test_a_failure_is_put_on_a_death_only_of_its_model_and_near_its_time(
    soak: ModuleType,
) -> None:
    slack = soak.DEATH_SLACK_S
    death = soak.Death("kill_hot", "a", 42, start=100.0, end=100.0)
    assert soak.overlaps(death, "a", 99.0, 101.0, now=200.0)
    assert soak.overlaps(death, "a", 100.0 + slack - 0.1, 105.0, now=200.0)
    assert not soak.overlaps(death, "b", 99.0, 101.0, now=200.0)
    assert not soak.overlaps(death, "a", 100.0 + slack + 1, 110.0, now=200.0)
    assert not soak.overlaps(death, "a", 80.0, 100.0 - slack - 1, now=200.0)
    stopped = soak.Death("sigstop_hang", "a", 43, start=100.0, end=None)  # not killed yet
    assert soak.overlaps(stopped, "a", 103.0, 104.0, now=104.0)


def test_restart_window_lasts_until_the_new_manager_answers_and_a_little_after(
    soak: ModuleType,
) -> None:
    windows: list[list[float | None]] = [[100.0, 104.0]]
    assert soak.in_window(windows, 102.0, now=300.0)
    assert soak.in_window(windows, 104.0 + soak.RESTART_SLACK_S - 0.1, now=300.0)
    assert not soak.in_window(windows, 104.0 + soak.RESTART_SLACK_S + 0.1, now=300.0)
    assert not soak.in_window(windows, 99.0, now=300.0)
    assert soak.in_window([[100.0, None]], 150.0, now=150.0)  # still down
