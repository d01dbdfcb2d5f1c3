"""Sections of docs/BENCHMARKS.md that other benchmarks than scripts/bench.py own.

Each lies between `<!-- section:NAME -->` and `<!-- /section:NAME -->`. A script writes
its own section (`write_section`); bench.py, which rewrites the rest of the file, keeps
them (`kept_sections`). `python scripts/doc_sections.py` renders the agent-protocol
sections from their committed JSON runs (docs/bench_tools.json,
docs/bench_embeddings.json), the swap, tenancy and cluster sections from theirs
(docs/bench_swap.json, docs/bench_tenancy.json, docs/bench_cluster.json), so every
figure there comes from a run of committed code.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import Counter
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


def _cell(value: Any, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,}{suffix}"


SWAP_HEADING = "## Swapping: more models than slots, traffic that jumps between them"


def swap_section(
    run: dict[str, Any], heading: str = SWAP_HEADING, source: str = "docs/bench_swap.json"
) -> str:
    """A run of scripts/bench_swap.py (`source`, under `heading`) as a swap section."""
    work = run["workload"]
    swap, sides = run["swap"], list(run["swap"])
    labels = {
        "pool": "pool (through 8050)",
        "router_t1": "llama-server, 1 thread/instance",
        "router_t2": "llama-server, 2 threads/instance",
    }
    router = run.get("router") or {}
    lines = [
        heading,
        "",
        f"Run on commit {_commit(run['commit'], run['dirty'])}, {run['machine']['cpu']}, "
        f"{run['machine']['cores']} cores. {work['models']} models, each on its own copy of "
        f"SmolLM2's file, at most {work['slots']} loaded; {work['clients']} clients send "
        f"{work['requests']} streamed chat completions (`max_tokens` {work['max_tokens']}), "
        f"the model of each drawn from a Zipf popularity (s = {work['zipf_s']}; the same "
        f"seeded sequence on every side: {run['sequence_counts']}), each client sending its "
        "next request when its last one ended. "
        f"{work['rounds']} round(s), the sides interleaved in rotating order; figures are "
        "medians over rounds. Both sides hold "
        f"{work['sequences_per_model']} sequences of {work['n_ctx_per_sequence']:,} tokens "
        "per model. The pool: `max_concurrent_models` "
        f"{work['slots']}, {work['pool_threads_per_worker']} threads per worker (shared "
        "between busy workers), one spare worker, measured through the manager's "
        "`/v1/chat/completions`. llama-server: "
        + (
            f"{router.get('version', '')}, built with the same kernel patches "
            f"({', '.join(router.get('patches', [])) or 'none'}), router mode with "
            "`--models-max` as the pool's slots, one and two threads per instance."
            if router
            else "not run."
        ),
        "",
        "| | " + " | ".join(labels.get(k, k) for k in sides) + " |",
        "| --- |" + " --- |" * len(sides),
    ]
    rows = [
        ("completed requests / s", "completed_per_s", ""),
        ("wall time (s)", "wall_s", ""),
        ("latency p50 (ms)", "latency_p50_ms", ""),
        ("latency p95 (ms)", "latency_p95_ms", ""),
        ("latency p99 (ms)", "latency_p99_ms", ""),
        ("time to first token p50 (ms)", "ttft_p50_ms", ""),
        ("loads", "loads", ""),
        ("evictions", "evictions", ""),
        # The whole machine's CPU during the round (absent from runs made before it was).
        ("machine CPU busy (share of all cores)", "busy_share", ""),
        ("busy core-seconds per completed request", "busy_core_s_per_completed", ""),
        ("requests not completed", "failed", ""),
    ]
    for label, key, suffix in rows:
        if not all(key in swap[k] for k in sides):
            continue  # a run from before the figure was measured
        lines.append(
            f"| {label} | " + " | ".join(_cell(swap[k][key], suffix) for k in sides) + " |"
        )
    kinds = {k: Counter[str]() for k in sides}
    for key in sides:
        for one in swap[key]["runs"]:
            kinds[key].update(one["failed_by_kind"])
    if any(kinds.values()):
        lines.append(
            "| not completed, by kind | "
            + " | ".join(
                ", ".join(f"{n} {c}" for c, n in kinds[k].items()) or "none" for k in sides
            )
            + " |"
        )
    lines += _pool_wait_lines(swap.get("pool", {}).get("runs", []))
    succession = run["succession"]
    lines += [
        "",
        f"**Cold starts in succession**: every model COLD, then {work['succession']} requests "
        f"(`max_tokens` 1), each for another model, {work['succession_gap_s']:g} s apart, "
        "none waiting for the earlier ones; time to first token of each, ms (the pool "
        "with room for all of them, llama-server with `--models-max` as many):",
        "",
    ]
    for key, found in succession.items():
        each = "; ".join(", ".join(_cell(t) for t in r["ttft_ms"]) for r in found["runs"])
        lines.append(
            f"- {labels.get(key, key)}: median {_cell(found['ttft_ms_median'])} ms "
            f"(each round: {each}); not completed: {found['failed']}"
        )
    memory = run["memory"]
    lines += [
        "",
        f"**Memory** with {', '.join(memory['loaded'])} loaded and idle, one side at a time "
        "(PSS: shared pages split between the processes that map them; RSS beside it):",
        "",
        "| processes | PSS (MB) | RSS (MB) |",
        "| --- | --- | --- |",
        f"| pool: manager + {memory['workers']} workers"
        + (" + fork server" if memory.get("fork_server") else "")
        + f" | {memory['pool']['pss_mb']} | "
        f"{memory['pool']['rss_mb']} |",
        f"| pool's spare worker, no weights ahead | {memory['spares_no_weights_ahead']['pss_mb']} "
        f"| {memory['spares_no_weights_ahead']['rss_mb']} |",
        f"| pool's spare worker, weights of the likeliest COLD models ahead "
        f"| {memory['spares_with_weights_ahead']['pss_mb']} "
        f"| {memory['spares_with_weights_ahead']['rss_mb']} |",
    ]
    if "router" in memory:
        lines.append(
            f"| llama-server: router + {memory['instances']} instances | "
            f"{memory['router']['pss_mb']} | {memory['router']['rss_mb']} |"
        )
    lines += [
        "",
        "Against the targets of issue 16 (ratios to llama-server with one thread per instance):",
        "",
        "| check | value | target | |",
        "| --- | --- | --- | --- |",
    ]
    for check in run["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "not run"}[check["ok"]]
        lines.append(
            f"| {check['name']} | {_cell(check['value'])} | {check['target']} | {verdict} |"
        )
    lines += [
        "",
        "`.venv/bin/python scripts/bench_swap.py --build-router "
        + ("--write-docs" if source == "docs/bench_swap.json" else f"--json-out {source}")
        + "` reproduces it "
        "(it builds llama-server once, about 6 minutes; the run itself takes about "
        "10 minutes), and `.venv/bin/python scripts/doc_sections.py` renders this section "
        f"from `{source}` again.",
    ]
    if run["problems"]:
        lines += ["", "Problems seen: " + "; ".join(map(str, run["problems"]))]
    return "\n".join(lines)


def _pool_wait_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Where the pool's slowest requests spent their time (Server-Timing `pool-wait`:
    placing the model, i.e. queued for a slot, a busy model draining, the load), when
    the run kept it."""
    slowest = [s for r in runs for s in r.get("slowest", []) if s.get("pool_wait_ms") is not None]
    waits = [r["pool_wait_ms"] for r in runs if r.get("pool_wait_ms")]
    if not slowest or not waits:
        return []
    share = statistics.median(s["pool_wait_ms"] / s["latency_ms"] for s in slowest)
    p50s = ", ".join(_cell(w["p50"]) for w in waits)
    p99s = ", ".join(_cell(w["p99"]) for w in waits)
    return [
        "",
        "**Where the pool's time goes** (its replies' Server-Timing `pool-wait`: placing the "
        "model, i.e. queued for a slot, a busy model draining, the load): pool wait p50 "
        f"{p50s} ms and p99 {p99s} ms (each round); of each round's {len(runs[0]['slowest'])} "
        f"slowest requests, the median spent {share:.0%} of its time waiting for its model.",
    ]


def main() -> int:
    docs = REPO / "docs"
    write_section("tools", tools_section(json.loads((docs / "bench_tools.json").read_text())))
    embeddings = json.loads((docs / "bench_embeddings.json").read_text())
    write_section("embeddings", embeddings_section(embeddings))
    written = ["tools", "embeddings"]
    swap_json = docs / "bench_swap.json"
    if swap_json.exists():
        write_section("swap", swap_section(json.loads(swap_json.read_text())))
        written.append("swap")
    slow_json = docs / "bench_swap_slow_machine.json"
    if slow_json.exists():
        heading = (
            "### The same swap benchmark on a slower machine\n\n"
            "The same script on a slower machine of the same name (the tables above are "
            "of the faster one; only ratios measured in one run compare), run since new "
            "spares are forked from the fork server (the run above predates it; see "
            "ARCHITECTURE.md, Spare workers). The pool's memory line counts the fork "
            "server with the manager and workers: the workers share its pages, which PSS "
            "splits between them."
        )
        section = swap_section(
            json.loads(slow_json.read_text()), heading, "docs/bench_swap_slow_machine.json"
        )
        write_section("swap-slow-machine", section)
        written.append("swap-slow-machine")
    tenancy_json = docs / "bench_tenancy.json"
    if tenancy_json.exists():
        sys.path.insert(0, str(REPO))  # run as a script, only scripts/ is on the path
        from scripts.bench_tenancy import section as tenancy_section  # it imports this module

        write_section("tenancy", tenancy_section(json.loads(tenancy_json.read_text())))
        written.append("tenancy")
    cluster_json = docs / "bench_cluster.json"
    if cluster_json.exists():
        sys.path.insert(0, str(REPO))
        from scripts.bench_cluster import section as cluster_section  # it imports this module

        write_section("cluster", cluster_section(json.loads(cluster_json.read_text())))
        written.append("cluster")
    print(f"wrote the {', '.join(written)} sections of {BENCHMARKS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
