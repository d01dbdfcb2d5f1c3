"""Sections of docs/BENCHMARKS.md that other benchmarks than scripts/bench.py own.

Each lies between `<!-- section:NAME -->` and `<!-- /section:NAME -->`. A script writes
its own section (`write_section`); bench.py, which rewrites the rest of the file, keeps
them (`kept_sections`). `python scripts/doc_sections.py` renders the agent-protocol
sections from their committed JSON runs (docs/bench_tools.json,
docs/bench_embeddings.json), so every figure there comes from a run of committed code.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"
_SECTION = re.compile(r"<!-- section:([\w-]+) -->\n.*?<!-- /section:\1 -->\n", re.DOTALL)


def kept_sections(text: str) -> str:
    """Every marked section of `text`, in order, for a rewrite of the rest to keep."""
    return "".join(match.group(0) for match in _SECTION.finditer(text))


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `body` in section `name` of `path` (replaced in place, or added at the end)."""
    block = f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- /section:{name} -->\n"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"<!-- section:{name} -->\n.*?<!-- /section:{name} -->\n", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def _commit(commit: str | None, dirty: bool) -> str:
    short = (commit or "unknown")[:7]
    return f"{short} (uncommitted changes)" if dirty else short


def tools_section(run: dict[str, Any]) -> str:
    figures, ratios = run["figures"], run["ratios"]
    rows = [
        ("time per generated token, p50 (ms)", "per_token_ms_p50"),
        ("time per generated token, p90 (ms)", "per_token_ms_p90"),
        ("whole request, p50 (ms)", "request_ms_p50"),
        ("whole request, p90 (ms)", "request_ms_p90"),
        ("first generated text, p50 (ms)", "first_token_ms_p50"),
        ("tokens generated, p50", "tokens_p50"),
    ]
    target = run["target_per_token_ratio"]
    met = ratios["per_token_ms_p50"] <= target
    lines = [
        "## Tool calls: a constrained call against a plain reply",
        "",
        f"Run on commit {_commit(run['commit'], run['dirty'])}, {run['machine']['cpu']}, "
        f"{run['machine']['cores']} cores; {run['rounds']} interleaved rounds of two streamed "
        f"requests of up to {run['tokens']} tokens through 8050, the shipped SmolLM2 (Q4_1 on "
        "this project's kernel), temperature 0, prompts cached after the first round. "
        'Plain: `tool_choice: "none"`; tool call: `tool_choice` naming a function with '
        "two string arguments, so the grammar holds every token. From `docs/bench_tools.json`.",
        "",
        "| figure | plain | tool call | tool call / plain |",
        "| --- | --- | --- | --- |",
    ]
    for label, key in rows:
        plain, call = figures["plain"][key], figures["tool_call"][key]
        lines.append(f"| {label} | {plain:.2f} | {call:.2f} | {ratios[key]:.2f}x |")
    lines += [
        "",
        f"Target: a tool call's token costs at most {target}x a plain one (median): "
        f"**{'met' if met else 'not met'}** ({ratios['per_token_ms_p50']:.2f}x). What it "
        "costs: the grammar is asked about the one token sampled (a full pass over the "
        "vocabulary only when the 256 likeliest tokens hold none it allows), and the reply's "
        "JSON is read as it streams. `.venv/bin/python scripts/bench_tools.py --json "
        "docs/bench_tools.json` reproduces it (about 1 minute), then "
        "`.venv/bin/python scripts/doc_sections.py` writes this section.",
    ]
    if run["failures"]:
        lines += ["", "Checks that failed: " + "; ".join(run["failures"])]
    return "\n".join(lines)


def embeddings_section(run: dict[str, Any]) -> str:
    meta = run["meta"]
    sides = run["sides"]
    server = "llama-server"
    lines = [
        "## Embeddings: the pool against llama-server --embedding",
        "",
        f"Run on commit {_commit(meta['git_commit'], meta['git_dirty'])}, "
        f"{meta['machine']['cpu_model']}, {meta['machine']['cpus']} cores; {meta['rounds']} "
        f"interleaved rounds; both sides on one file ({meta['weights']}, stock kernels) with "
        f"{meta['threads']} threads. llama-server: `{' '.join(meta['llama_server']['args'])}`. "
        "The chat model's embeddings are its mean-pooled hidden states (no package ships a "
        "trained embedding GGUF); the embedding model is the same file as "
        '`model_type: "embedding"`. Figures are medians, in tokens/s; the ratio is '
        "against llama-server in the same round. From `docs/bench_embeddings.json`.",
        "",
        "| workload | " + " | ".join(sides) + " |",
        "| --- |" + " --- |" * len(sides),
    ]
    for workload, by_side in run["workloads"].items():
        reference = by_side.get(server, {}).get("tokens_per_s")
        cells = []
        for side in sides:
            value = by_side[side]["tokens_per_s"]
            ratio = f" ({value / reference:.2f}x)" if reference and side != server else ""
            cells.append(f"{value:,.0f}{ratio}")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    cosine = run["checks"]["min_cosine_vs_llama_server"]
    lines += [
        "",
        f"The pool's vectors against llama-server's for the same inputs: cosine similarity "
        f"at least {min(cosine.values()):.5f} ({run['checks']['dimensions']} dimensions). "
        "`.venv/bin/python scripts/bench_embeddings.py --json-out docs/bench_embeddings.json` "
        "reproduces it (about 2 minutes; it finds or builds llama-server as scripts/bench.py "
        "does), then `.venv/bin/python scripts/doc_sections.py`.",
    ]
    if run["problems"]:
        lines += ["", "Problems seen: " + "; ".join(map(str, run["problems"]))]
    return "\n".join(lines)


def main() -> int:
    docs = REPO / "docs"
    write_section("tools", tools_section(json.loads((docs / "bench_tools.json").read_text())))
    embeddings = json.loads((docs / "bench_embeddings.json").read_text())
    write_section("embeddings", embeddings_section(embeddings))
    print(f"wrote the tools and embeddings sections of {BENCHMARKS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
