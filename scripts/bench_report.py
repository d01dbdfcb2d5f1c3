"""The benchmark's report (scripts/bench.py): the targets checked against a run's results,
the summary, docs/BENCHMARKS.md and its plot.

Everything here reads the results alone (the dict a run writes as JSON), so that
`--from-json` renders the page again from a committed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import doc_sections
from bench_harness import (
    COLD,
    REPO,
    WORKLOAD,
    dist,
    log,
    median,
    ratio,
    rounded,
)

DOCS_MD = REPO / "docs" / "BENCHMARKS.md"
DOCS_PNG = REPO / "docs" / "benchmarks.png"
DOCS_JSON = REPO / "docs" / "bench.json"  # the run BENCHMARKS.md is rendered from

SHARED_CORES = 0.25  # other work using more than this in a phase: the run was shared

# llama.cpp's llama-server in router mode (-np 8 -t 2), same model, this machine (SPEC §9).
ANCHOR = {
    "single_stream_tps": 101.0,
    "aggregate_8_tps": 157.0,
    "warm_ttft_ms": 23.0,
    "cold_start_ms": 546.0,
}


# --- targets, tables and docs --------------------------------------------------------------


def _get(results: dict[str, Any], *keys: str | int) -> Any:
    value: Any = results
    for key in keys:
        if isinstance(value, dict) and isinstance(key, str):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def level(results: dict[str, Any], streams: int) -> dict[str, Any] | None:
    for entry in results.get("concurrency") or ():
        if entry["streams"] == streams:
            found: dict[str, Any] = entry
            return found
    return None


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets from SPEC, each with the measured value and pass/fail (None: not measured)."""
    anchor = results.get("anchor") or ANCHOR  # as the run saw it
    single = _get(results, "single_stream", "decode_tps")
    inproc = _get(results, "inprocess", "decode_tps")
    eight = _get(level(results, 8) or {}, "aggregate_tps")
    cold = _get(results, "cold_start", "total_ms")
    cold_request = _get(results, "cold_start_request", "total_ms")
    reuse = _get(results, "system_prompt", "repeated_over_first")
    overhead = _get(results, "unified_endpoint", "overhead_ms")
    levels = results.get("concurrency") or []
    complete = all(x["all_complete"] for x in levels) if levels else None
    single_ratio = ratio(single, inproc)

    def check(name: str, value: Any, target: str, ok: bool | None) -> dict[str, Any]:
        return {"name": name, "value": value, "target": target, "pass": ok}

    router_single = 1.1 * anchor["single_stream_tps"]
    router_eight = 1.3 * anchor["aggregate_8_tps"]
    theirs = results.get("router") or {}
    their_single = _get(theirs, "single_stream", "decode_tps")
    their_eight = next(
        (x["aggregate_tps"] for x in theirs.get("concurrency") or () if x["streams"] == 8), None
    )
    same_run: list[dict[str, Any]] = []
    if their_single is not None or their_eight is not None:
        single_x, eight_x = ratio(single, their_single), ratio(eight, their_eight)
        same_run = [
            check(
                "single-stream decode vs llama-server, this run",
                rounded(single_x, 3),
                ">= 1.1x",
                None if single_x is None else single_x >= 1.1,
            ),
            check(
                "8-stream aggregate vs llama-server, this run",
                rounded(eight_x, 3),
                ">= 1.3x",
                None if eight_x is None else eight_x >= 1.3,
            ),
        ]
    return [
        *same_run,
        check(
            "single-stream decode vs router",
            single,
            f">= {router_single:.1f} tok/s (1.1x router)",
            None if single is None else single >= router_single,
        ),
        check(
            "single-stream decode vs in-process",
            rounded(single_ratio, 3),
            ">= 0.97x in-process",
            None if single_ratio is None else single_ratio >= 0.97,
        ),
        check(
            "8-stream aggregate",
            eight,
            f">= {router_eight:.1f} tok/s (1.3x router)",
            None if eight is None else eight >= router_eight,
        ),
        check("cold start (median)", cold, "<= 150 ms", None if cold is None else cold <= 150),
        check(
            "cold start, one request through the manager (median)",
            cold_request,
            "<= 150 ms",
            None if cold_request is None else cold_request <= 150,
        ),
        check(
            "repeated 1,000-token system prompt TTFT",
            reuse,
            "<= 0.2x the first",
            None if reuse is None else reuse <= 0.2,
        ),
        check(
            "unified endpoint overhead (p50)",
            overhead,
            "<= 1 ms",
            None if overhead is None else overhead <= 1.0,
        ),
        check("every stream complete", complete, "all", complete),
    ]


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**pass**" if ok else "**FAIL**")


COLD_KEYS = (
    "cold_start",
    "cold_start_request",
    "cold_start_spare_only",
    "cold_start_wrong_guess",
    "cold_start_uncached",
    "cold_start_no_spare",
    "cold_start_no_spare_uncached",
    "cold_start_rotation",
)


def h2h(results: dict[str, Any], phase: str, side: str, stat: str = "median") -> Any:
    """A side's figure from the head-to-head phases (decode tok/s for the single stream,
    aggregate tok/s for 8 streams): `stat` of its distribution."""
    entry = _get(results, "head_to_head", phase, side) or {}
    key = "decode_tps" if phase == "single_stream" else "aggregate_tps_dist"
    return _get(entry, key, stat)


def _router_cold(results: dict[str, Any], key: str) -> float | None:
    """llama-server's cold start in the same page-cache state as the pool's case."""
    dropped = _get(results, key, "case", "drop_cache")
    return _get(results, "router", "cold_start_uncached" if dropped else "cold_start", "total_ms")


def figures_rows(results: dict[str, Any]) -> list[list[str]]:
    """figure | ours | in-process | x in-process | router | x router | target | result."""
    anchor = results.get("anchor") or ANCHOR  # as the run saw it
    inproc = results.get("inprocess") or {}
    single = _get(results, "single_stream", "decode_tps")
    ttft = _get(results, "warm_ttft", "median_ms")
    sysp = results.get("system_prompt") or {}
    by_name = {c["name"]: c for c in results.get("checks") or checks(results)}
    rows: list[list[str]] = []

    def row(
        name: str,
        ours: float | None,
        ceiling: float | None,
        router: float | None,
        target: str,
        ok: bool | None,
        unit: str,
        measured: float | None = None,
    ) -> None:
        rows.append(
            [
                name,
                fmt(ours, 1, unit),
                fmt(ceiling, 1, unit),
                fmt(rounded(ratio(ours, ceiling), 2), 2, "x"),
                fmt(router, 0, unit),
                fmt(rounded(ratio(ours, router), 2), 2, "x"),
                fmt(measured, 1, unit),
                fmt(rounded(ratio(ours, measured), 2), 2, "x"),
                target,
                verdict(ok),
            ]
        )

    theirs = results.get("router") or {}
    their_levels = {x["streams"]: x["aggregate_tps"] for x in theirs.get("concurrency") or ()}

    single_checks = [
        by_name.get(n)
        for n in ("single-stream decode vs router", "single-stream decode vs in-process")
    ]
    single_ok = None
    if all(c is not None and c["pass"] is not None for c in single_checks):
        single_ok = all(c is not None and c["pass"] for c in single_checks)
    row(
        "single-stream decode",
        single,
        inproc.get("decode_tps"),
        anchor["single_stream_tps"],
        f">= {1.1 * anchor['single_stream_tps']:.1f} tok/s and >= 0.97x in-process",
        single_ok,
        " tok/s",
        _get(theirs, "single_stream", "decode_tps"),
    )
    for entry in results.get("concurrency") or ():
        n = entry["streams"]
        is_eight = n == 8
        row(
            f"aggregate, {n} stream{'s' if n > 1 else ''}",
            entry["aggregate_tps"],
            inproc.get("decode_tps"),
            anchor["aggregate_8_tps"]
            if is_eight
            else (anchor["single_stream_tps"] if n == 1 else None),
            f">= {1.3 * anchor['aggregate_8_tps']:.1f} tok/s (1.3x router)" if is_eight else "",
            by_name["8-stream aggregate"]["pass"] if is_eight else None,
            " tok/s",
            their_levels.get(n),
        )
    if h2h(results, "single_stream", "pool_worker_q8_0"):
        # Against llama-server on the same Q8_0 copy (stock kernels on both sides).
        row(
            "single-stream decode, the Q8_0 copy",
            h2h(results, "single_stream", "pool_worker_q8_0"),
            None,
            anchor["single_stream_tps"],
            "",
            None,
            " tok/s",
            h2h(results, "single_stream", "llama_server_q8_0"),
        )
        row(
            "aggregate, 8 streams, the Q8_0 copy",
            h2h(results, "aggregate_8", "pool_worker_q8_0"),
            None,
            anchor["aggregate_8_tps"],
            "",
            None,
            " tok/s",
            h2h(results, "aggregate_8", "llama_server_q8_0"),
        )
    row(
        "warm TTFT (median)",
        ttft,
        inproc.get("ttft_ms"),
        anchor["warm_ttft_ms"],
        "",
        None,
        " ms",
        theirs.get("warm_ttft_ms"),
    )
    cold_checks = {
        "cold_start": "cold start (median)",
        "cold_start_request": "cold start, one request through the manager (median)",
    }
    for key in COLD_KEYS:
        if key == "cold_start" or results.get(key):
            check_name = cold_checks.get(key)
            row(
                f"cold start: {_get(results, key, 'label') or key}",
                _get(results, key, "total_ms"),
                None,
                anchor["cold_start_ms"],
                "<= 150 ms" if check_name else "",
                by_name[check_name]["pass"] if check_name else None,
                " ms",
                _router_cold(results, key),
            )
    row(
        "~1,000-token system prompt, first TTFT",
        sysp.get("first_ttft_ms"),
        _get(inproc, "system_prompt", "first_ttft_ms"),
        None,
        "",
        None,
        " ms",
    )
    row(
        "same system prompt, repeated TTFT",
        sysp.get("repeated_ttft_ms"),
        _get(inproc, "system_prompt", "repeated_ttft_ms"),
        None,
        f"<= 0.2x first (is {fmt(sysp.get('repeated_over_first'), 3, 'x')})",
        by_name["repeated 1,000-token system prompt TTFT"]["pass"],
        " ms",
    )
    unified = results.get("unified_endpoint") or {}
    if unified.get("measured"):
        rows.append(
            [
                "unified endpoint overhead (TTFT via manager - direct)",
                fmt(unified.get("overhead_ms"), 2, " ms"),
                "",
                "",
                "",
                "",
                "",
                "",
                "<= 1 ms p50",
                verdict(by_name["unified endpoint overhead (p50)"]["pass"]),
            ]
        )
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


FIGURE_HEADER = [
    "figure",
    "pool worker (HTTP)",
    "in-process ceiling",
    "x in-process",
    "llama.cpp router (SPEC anchor)",
    "x anchor",
    "llama-server router, this run",
    "x this run",
    "target",
    "result",
]


def concurrency_table(results: dict[str, Any]) -> str:
    rows = []
    for entry in results.get("concurrency") or ():
        runs = entry["runs"]
        rows.append(
            [
                str(entry["streams"]),
                fmt(entry["aggregate_tps"], 1),
                ", ".join(fmt(r["aggregate_tps"], 1) for r in runs),
                fmt(entry["slowest_ttft_ms"], 0),
                fmt(median([r["median_ttft_ms"] for r in runs if r["median_ttft_ms"]]), 0),
                "yes" if entry["all_complete"] else f"NO ({sum(r['incomplete'] for r in runs)})",
                fmt(max((r.get("client_cores") or 0.0) for r in runs), 2),
            ]
        )
    header = [
        "streams",
        "aggregate tok/s (median)",
        "each run",
        "slowest TTFT ms",
        "median TTFT ms",
        "every stream complete",
        "bench client CPU (cores, max)",
    ]
    return md_table(header, rows)


def _breakdown_text(results: dict[str, Any], key: str) -> str:
    phases = _get(results, key, "breakdown_ms") or {}
    return (
        "Where a load's time went (medians, ms, from `load_breakdown_ms` of "
        "`POST /models/{id}/load`): "
        + (", ".join(f"{name} {fmt(value)}" for name, value in phases.items()) or "-")
        + "."
    )


def _ahead(cold_round: dict[str, Any]) -> str:
    """What the spare had ready for the round's load."""
    if cold_round.get("weights_preloaded") is None:
        return "-"
    if not cold_round["weights_preloaded"]:
        return "nothing"
    return "weights, context" if cold_round.get("context_preloaded") else "weights"


def _anchor_note(results: dict[str, Any]) -> list[str]:
    """Where llama-server ran beside the pool, how this machine compares with the
    anchor's: the absolute rows hold the pool to figures measured on another machine."""
    theirs = results.get("router") or {}
    single = _get(theirs, "single_stream", "decode_tps")
    levels = {x["streams"]: x["aggregate_tps"] for x in theirs.get("concurrency") or ()}
    eight = levels.get(8)
    if single is None or eight is None:
        return []
    return [
        "The absolute rows (tok/s against the anchor's 101 and 157) hold the pool to "
        "llama-server's figures from the machine SPEC §9 was measured on. On this machine "
        f"llama-server itself did {fmt(single)} tok/s single-stream and {fmt(eight)} tok/s "
        f"over 8 streams in this run ({single / ANCHOR['single_stream_tps']:.2f}x and "
        f"{eight / ANCHOR['aggregate_8_tps']:.2f}x the anchor's), so the rows against "
        "llama-server in this run are the like-for-like comparison."
    ]


def cold_table(results: dict[str, Any], key: str = "cold_start") -> str:
    cold = results.get(key) or {}
    rows = [
        [
            str(i + 1),
            f"`{r.get('model') or COLD}`",
            _ahead(r),
            fmt(r["load_call_ms"]),
            fmt(r["load_seconds_reported_ms"]),
            fmt(r["first_token_after_load_ms"]),
            fmt(r["total_ms"]),
            fmt(r.get("second_request_ttft_ms")),
            fmt(r["spare_wait_s"], 2),
        ]
        for i, r in enumerate(cold.get("rounds") or ())
    ]
    rows.append(
        [
            "**median**",
            "",
            "",
            fmt(cold.get("load_call_ms")),
            fmt(cold.get("load_seconds_reported_ms")),
            fmt(cold.get("first_token_after_load_ms")),
            f"**{fmt(cold.get('total_ms'))}**",
            fmt(cold.get("second_request_ttft_ms")),
            "",
        ]
    )
    header = [
        "round",
        "model",
        "loaded ahead",
        "POST load (ms)",
        "of which load_seconds (ms)",
        "first token after load (ms)",
        "total (ms)",
        "next request's TTFT (ms)",
        "wait for the spare before (s)",
    ]
    rounds = cold.get("rounds") or []
    if any(r.get("page_cache_after_drop") is not None for r in rounds):
        # The served file's share in the page cache before the drop and after it (mincore).
        header.append("file in the page cache: before, after the drop")
        for row, r in zip(rows, rounds, strict=False):
            before, after = r.get("page_cache_before"), r.get("page_cache_after_drop")
            row.append(f"{fmt(before, 2)}, {fmt(after, 2)}")
        rows[-1].append("")
    return md_table(header, rows)


def system_table(results: dict[str, Any]) -> str:
    rows = []
    for where, data in (
        ("pool worker", results.get("system_prompt") or {}),
        ("in-process", _get(results, "inprocess", "system_prompt") or {}),
    ):
        cached = data.get("cached_tokens_repeated") or []
        rows.append(
            [
                where,
                fmt(data.get("prompt_tokens")),
                fmt(data.get("first_ttft_ms")),
                fmt(data.get("repeated_ttft_ms")),
                fmt(data.get("repeated_over_first"), 3, "x"),
                ", ".join(str(c) for c in cached) if any(c is not None for c in cached) else "-",
            ]
        )
    header = [
        "",
        "prompt tokens",
        "first TTFT ms",
        "repeated TTFT ms (median)",
        "repeated / first",
        "cached_tokens (repeats)",
    ]
    return md_table(header, rows)


def memory_table(results: dict[str, Any]) -> str:
    mem = results.get("memory") or {}
    rows = [
        ["worker `bench:hot` (8 slots x 1024)", fmt(mem.get("worker_rss_mb"), 1, " MB")],
        [
            "  the same, as GET /models `memory_rss_mb`",
            fmt(mem.get("worker_rss_mb_reported"), 1, " MB"),
        ],
        [
            "  the pool's estimate (`memory_estimate_mb`)",
            fmt(mem.get("worker_estimate_mb"), 0, " MB"),
        ],
        [
            "worker `bench:cold` 6 s after its cold start",
            fmt(mem.get("cold_worker_rss_mb"), 1, " MB"),
        ],
        [
            "spare worker (imports done, heap reserve, weights and a context made ahead)",
            ", ".join(fmt(x, 1, " MB") for x in mem.get("spare_rss_mb") or []) or "-",
        ],
        ["manager", fmt(mem.get("manager_rss_mb"), 1, " MB")],
    ]
    their_rss = _get(results, "router", "rss_mb")
    if their_rss:
        rows.append(
            [
                "llama-server: router, then its model instances",
                ", ".join(fmt(x, 1, " MB") for x in their_rss),
            ]
        )
    return md_table(["process", "RSS"], rows)


def router_section(results: dict[str, Any]) -> list[str]:
    """How llama-server ran in this run, and its cold starts (nothing when it did not)."""
    theirs = results.get("router") or {}
    if not theirs:
        return []
    stock = results.get("router_stock") or {}
    kernels = theirs.get("kernels") or "unknown"
    built = (
        "built from the llama.cpp that llama-cpp-python vendors with this project's kernel "
        f"patches applied ({', '.join(theirs.get('patches') or ())}; "
        "`scripts/bench.py --build-router`)"
        if kernels == "patched"
        else "built from the llama.cpp that llama-cpp-python vendors, stock"
    )
    parts = [
        "### llama.cpp's router, side by side",
        f"`{theirs.get('version')}`, {built}, run as `llama-server "
        + " ".join(str(a) for a in theirs.get("args") or ())
        + "` on loopback (`MODELS_DIR` holds links to the Q4_1 file, its Q8_0 copy and a "
        "copy of the Q4_1 file no other process maps)."
        + (
            f" Beside it, stock llama-server (`{stock.get('version')}`, no patches, the same "
            "arguments) on the Q4_1 file, for the kernel's own gain."
            if stock
            else ""
        ),
    ]
    for key, what in (
        ("cold_start", "the file in the page cache (as the anchor)"),
        ("cold_start_uncached", "the file dropped from the page cache first"),
    ):
        cold = theirs.get(key) or {}
        if not cold:
            continue
        rows = [
            [str(i + 1), fmt(r["total_ms"]), fmt(r.get("second_request_ttft_ms"))]
            for i, r in enumerate(cold.get("rounds") or ())
        ]
        rows.append(["**median**", f"**{fmt(cold.get('total_ms'))}**", ""])
        parts += [
            f"Its cold start, {what}: `POST /models/unload`, wait until `GET /models` says "
            "`unloaded`"
            + (
                ", `posix_fadvise(DONTNEED)` on the file"
                if cold.get("file_dropped_from_page_cache")
                else ""
            )
            + ", then time a streamed request (`max_tokens` 1) up to its first token; the "
            "router starts a model instance and loads the file. Rounds (ms):",
            md_table(["round", "request -> first token", "next request's TTFT"], rows),
        ]
    return parts


def _spread(d: dict[str, Any] | None, digits: int = 1) -> str:
    """`median (p10-p90, n)` of a `dist`."""
    if not d or d.get("median") is None:
        return "-"
    return (
        f"{fmt(float(d['median']), digits)} ({fmt(float(d['p10']), digits)}-"
        f"{fmt(float(d['p90']), digits)}, n={d['n']})"
    )


def _x(ours: Any, theirs: Any) -> str:
    return fmt(rounded(ratio(ours, theirs), 2), 2, "x")


def head_to_head_section(results: dict[str, Any]) -> list[str]:
    """The interleaved single-stream and 8-stream rounds: every side, and the ratios."""
    phases = results.get("head_to_head") or {}
    single = phases.get("single_stream") or {}
    eight = phases.get("aggregate_8") or {}
    four = phases.get("aggregate_4") or {}  # older runs have none
    if not single:
        return []
    rows = []
    for key in phases.get("order") or single:
        one = single.get(key) or {}
        rows.append(
            [
                one.get("label") or key,
                _spread(one.get("decode_tps")),
                _spread(_get(one, "as_level", "aggregate_tps_dist")),
                _spread(one.get("ttft_ms")),
                *([_spread(_get(four, key, "aggregate_tps_dist"))] if four else []),
                _spread(_get(eight, key, "aggregate_tps_dist")),
            ]
        )
    table = md_table(
        [
            "side (same requests, interleaved)",
            "single-stream decode tok/s",
            "1 stream, aggregate tok/s",
            "1 stream, TTFT ms",
            *(["4 streams, aggregate tok/s"] if four else []),
            "8 streams, aggregate tok/s",
        ],
        rows,
    )
    ratios = []
    for ours, theirs, label in (
        ("pool_worker", "llama_server", "pool worker port / llama-server, same file"),
        ("pool_manager", "llama_server", "pool through the manager / llama-server, same file"),
        ("pool_worker_q8_0", "llama_server_q8_0", "pool / llama-server, both on the Q8_0 copy"),
        ("pool_worker", "bare_loop", "pool worker port / llama.cpp's bare loop, same file"),
        ("llama_server", "bare_loop", "llama-server / llama.cpp's bare loop, same file"),
        ("pool_worker_q8_0", "bare_loop_q8_0", "pool / llama.cpp's bare loop, the Q8_0 copy"),
        ("llama_server_q8_0", "bare_loop_q8_0", "llama-server / the bare loop, the Q8_0 copy"),
    ):
        if ours in single and theirs in single:
            ratios.append(
                [
                    label,
                    _x(h2h(results, "single_stream", ours), h2h(results, "single_stream", theirs)),
                    *(
                        [_x(h2h(results, "aggregate_4", ours), h2h(results, "aggregate_4", theirs))]
                        if four
                        else []
                    ),
                    _x(h2h(results, "aggregate_8", ours), h2h(results, "aggregate_8", theirs)),
                ]
            )
    plan = (results.get("config") or {}).get("plan") or {}
    kernels = _get(results, "router", "kernels")
    text = (
        "Every side gets the same requests (the same story prompt, seed and `max_tokens` "
        f"{_setting(results, 'max_tokens')}), interleaved: each round sends one request "
        f"(single stream) or one run of {'8 (then 4)' if four else '8'} concurrent streams "
        "to every side in turn, the order rotating by one side each round so that none "
        "always goes first, so drift on the machine hits every side alike "
        f"({plan.get('decode_runs', '-')} single-stream rounds, {plan.get('eight_runs', '-')} "
        f"rounds of {'each number of streams' if four else '8 streams'}). Each cell: median "
        "(p10-p90 of the "
        "rounds, n rounds). The pool is measured on its worker port and through the "
        "manager's `/v1/chat/completions` (what clients are told to use, port 8050 in a "
        "normal install; here a free loopback port). The HTTP client is the same for every "
        "side: one httpx client, a new connection per request (no keep-alive: llama-server "
        "drops kept-alive connections after a streamed reply)."
    )
    if kernels:
        text += f" llama-server here runs {kernels} kernels" + (
            " (built with this project's patches/*.patch, as the pool's "
            "llama-cpp-python wheel), so the pool and llama-server run the same weights "
            "on the same kernels."
            if kernels == "patched"
            else ": it is not running the pool's Q4_1 kernel, so its ratio mixes the "
            "kernel into the pool's figures."
        )
    if "bare_loop" in single:
        text += (
            " llama.cpp's bare decode loop is its `llama-batched-bench` tool from the same "
            "build as llama-server, run in the same rotation on the same file and context "
            f"({_setting(results, 'slots')} x {_setting(results, 'n_ctx')} cells, "
            f"{_setting(results, 'threads')} threads) with each round's prompt size (the "
            "stories' median at 8 streams) and as many tokens, without a server, sampling or "
            "HTTP: the most any server on these kernels can deliver. Its time to first token "
            "is its prompt's decode, its decode rate its steps' (one step fewer, as a "
            "server's first token comes from the prompt); a side's ratio to it is the share "
            "of the kernels' speed that reaches the client."
        )
    if four:
        text += (
            " At 4 streams half the slots are busy: llama.cpp decodes each run of "
            "consecutive busy slots in a pass of its own (each slot has its own KV cache "
            "stream), so the slots a server puts concurrent requests in decide how many "
            "passes a step takes; the pool puts them side by side unless a cached prefix is "
            "worth more (`pick_slot`, model_service/backends/llama_cpp.py)."
        )
    parts = ["### Head to head (interleaved)", text, table]
    if ratios:
        header = ["ratio (medians)", "single-stream decode", "8 streams, aggregate"]
        if four:
            header.insert(2, "4 streams, aggregate")
        parts.append(md_table(header, ratios))
    ceiling = steps_only_ceiling(results)
    if ceiling:
        parts.append(ceiling)
    return parts


def steps_only_ceiling(results: dict[str, Any]) -> str:
    """What 1.1x llama-server at 8 streams would take, against the kernels' own ceiling:
    the bare loop's rounds with the prompts' time taken out (`slowest_ttft_ms` is its
    prompts' decode), as if a server had no prompt to decode at all."""
    eight = (results.get("head_to_head") or {}).get("aggregate_8") or {}
    lines = []
    for bare, theirs, label in (
        ("bare_loop_q8_0", "llama_server_q8_0", "the Q8_0 copy"),
        ("bare_loop", "llama_server", "the Q4_1 file"),
    ):
        if bare not in eight or theirs not in eight:
            continue
        steps = [
            r["tokens"] / (r["wall_s"] - r["slowest_ttft_ms"] / 1000) for r in eight[bare]["runs"]
        ]
        spread = dist(steps)
        target = 1.1 * eight[theirs]["aggregate_tps"]
        lines.append(
            f"on {label}, 1.1x llama-server at 8 streams is {target:.1f} tokens/s and the "
            f"bare loop's steps alone deliver {_spread(spread)}"
        )
    if not lines:
        return ""
    return (
        "The kernels' ceiling at 8 streams: the bare loop's rounds with its prompts' time "
        "taken out (each round's tokens over its decode steps alone), what a server with no "
        "prompt to decode and no cost of its own would deliver. A server passes the bare "
        "loop's aggregate only by decoding less of the prompts (the pool and llama-server "
        "both reuse the prefix the stories share); it passes the steps alone only by "
        "computing less per generated token. "
        + "; ".join(lines).capitalize()[:1]
        + "; ".join(lines)[1:]
        + "."
    )


def kernel_section(results: dict[str, Any]) -> list[str]:
    """What the Q4_1 kernel patch brings, apart from the pool."""
    rows = []
    for ours, theirs, label in (
        (
            "pool_worker",
            "pool_worker_q8_0",
            "the pool: the Q4_1 file on the patched kernel / its Q8_0 copy on stock kernels",
        ),
        (
            "llama_server",
            "llama_server_stock",
            "llama-server: patched / stock kernels, the same Q4_1 file",
        ),
    ):
        single_ours = h2h(results, "single_stream", ours)
        single_theirs = h2h(results, "single_stream", theirs)
        if single_ours is None or single_theirs is None:
            continue
        if ours == "llama_server" and _get(results, "router", "kernels") != "patched":
            continue
        rows.append(
            [
                label,
                _x(single_ours, single_theirs),
                _x(h2h(results, "aggregate_8", ours), h2h(results, "aggregate_8", theirs)),
            ]
        )
    if not rows:
        return []
    return [
        "### The kernel, not the pool",
        "This project's Q4_1 kernel patch (patches/) speeds up llama.cpp itself, whoever "
        "serves it. Its gain, measured in the same interleaved rounds (medians), is not the "
        "pool's: the pool's own gain is the head-to-head ratio on the same kernels above.",
        md_table(["the kernel's gain", "single-stream decode", "8 streams, aggregate"], rows),
    ]


def cold_matrix_table(results: dict[str, Any]) -> str:
    rows = []
    for key in COLD_KEYS:
        entry = results.get(key)
        if not entry:
            continue
        spread = entry.get("total_ms_dist") or dist([r["total_ms"] for r in entry["rounds"]])
        ahead = entry.get("rounds_weights_preloaded")
        rows.append(
            [
                entry.get("label") or key,
                f"{fmt(ahead)} of {len(entry['rounds'])}",
                fmt(spread.get("median")),
                fmt(spread.get("p10")),
                fmt(spread.get("p90")),
                fmt(spread.get("min")),
                fmt(spread.get("max")),
                fmt(_router_cold(results, key)),
            ]
        )
    header = [
        "case",
        "rounds whose load took weights loaded ahead",
        "median ms",
        "p10",
        "p90",
        "min",
        "max",
        "llama-server, same page-cache state (median ms)",
    ]
    return md_table(header, rows)


def _setting(results: dict[str, Any], name: str) -> Any:
    """A setting of the run, from its JSON (older files: this script's default)."""
    found = _get(results, "config", "bench", name)
    return found if found is not None else WORKLOAD.get(name)


def _threads_text(results: dict[str, Any]) -> str:
    threads = _setting(results, "threads")
    cpus = _get(results, "meta", "machine", "cpus")
    args = _get(results, "router", "args") or []
    return (
        f"Threads: {threads} for every side on {cpus} cores: the pool's workers and the "
        f"in-process ceiling with `n_threads` = `n_threads_batch` = {threads}; "
        + (f"llama-server with `{' '.join(str(a) for a in args[2:])}`." if args else "")
    )


def checks_table(results: dict[str, Any]) -> str:
    rows = [
        [
            c["name"],
            fmt(c["value"], 3 if isinstance(c["value"], float) and c["value"] < 10 else 1),
            c["target"],
            verdict(c["pass"]),
        ]
        for c in results.get("checks") or ()
    ]
    return md_table(["target", "measured", "needs", "result"], rows)


def shared_note(results: dict[str, Any]) -> str:
    """Whether other work shared the machine, from CPU use around and during the run."""
    meta = results["meta"]
    before = meta.get("busy_cores_before") or 0.0
    during = results.get("other_work_cores") or {}
    cpus = (meta.get("machine") or {}).get("cpus") or 1
    # Measured CPU use, not the load average: that lags by minutes behind other work.
    shared = max([before, *during.values()]) > SHARED_CORES
    state = (
        "**The machine was shared during this run**: other work used CPU before or during "
        "it, so the figures are lower and noisier than on an idle machine."
        if shared
        else "The machine was quiet during the run."
    )
    phases = ", ".join(f"{name} {fmt(cores, 2)}" for name, cores in during.items())
    return (
        f"{state} Load average (1, 5, 15 min) at the start: {meta.get('loadavg_start')}, at "
        f"the end: {meta.get('loadavg_end')} (the end includes the benchmark's own load). "
        f"Cores used by other work just before the run: {fmt(before, 2)} of {cpus}"
        + (f"; during each phase: {phases}" if phases else "")
        + f"; just after it: {fmt(meta.get('busy_cores_after'), 2)}."
    )


def summary_markdown(results: dict[str, Any]) -> str:
    """What the script prints: the figures, the targets, the concurrency sweep, problems."""
    parts = [
        "## Figures",
        shared_note(results),
        md_table(FIGURE_HEADER, figures_rows(results)),
        *head_to_head_section(results),
        *kernel_section(results),
        "## Targets",
        checks_table(results),
        "## Concurrency",
        concurrency_table(results),
        "## Cold-start matrix",
        cold_matrix_table(results),
    ]
    for key in COLD_KEYS:
        if results.get(key):
            parts += [
                f"## Cold start: {results[key].get('label') or key}",
                cold_table(results, key),
            ]
    parts += [
        *router_section(results),
        "## System prompt reuse",
        system_table(results),
        "## Memory",
        memory_table(results),
    ]
    problems = results.get("problems") or []
    parts += ["## Problems seen", "\n".join(f"- {p}" for p in problems) if problems else "none"]
    return "\n\n".join(parts) + "\n"


def _provenance(results: dict[str, Any]) -> str:
    """Which code made these figures: the commit, and whether the tree differed from it."""
    meta = results["meta"]
    commit = meta.get("git_commit") or "unknown"
    if not meta.get("git_dirty"):
        return f"- commit: `{commit}`, a clean working tree (no uncommitted changes)"
    files = ", ".join(f"`{f}`" for f in meta.get("git_dirty_files") or ()) or "some files"
    return (
        f"- commit: `{commit}`, **with uncommitted changes** in the working tree ({files}): "
        "these figures are not from the committed code alone"
    )


def docs_markdown(results: dict[str, Any], plot: bool) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    plan = results["config"]["plan"]
    problems = results.get("problems") or []
    gpu = "no GPU" if not machine.get("gpu") else "an NVIDIA GPU (not used by this model)"
    system_tokens = _get(results, "system_prompt", "rounds", 0, "system_prompt_tokens")
    prompt_tokens = _get(results, "system_prompt", "prompt_tokens")
    sampling = _setting(results, "sampling") or {}
    n_ctx, slots = _setting(results, "n_ctx"), _setting(results, "slots")
    max_tokens = _setting(results, "max_tokens")
    json_name = DOCS_JSON.relative_to(REPO)
    sections = [
        "# Benchmarks",
        "Generated by `scripts/bench.py --write-docs`; do not edit by hand. The script "
        "starts its own pool manager, measures the pool over HTTP (on a worker's port and "
        "through the manager's `/v1`), raw in-process llama-cpp-python, and llama.cpp's own "
        "`llama-server` in router mode (the anchor in SPEC §9) in the same run. "
        f"Every figure on this page comes from `{json_name}`, the JSON the run wrote: "
        f"`.venv/bin/python scripts/bench.py --from-json {json_name} --write-docs` renders "
        "this page (and the plot) again from that file alone.",
        "## The run",
        "\n".join(
            [
                f"- date: {meta['date']}" + (" (quick mode)" if meta.get("quick") else ""),
                _provenance(results),
                f"- figures: `{json_name}`"
                + (f"; command: `{meta['command']}`" if meta.get("command") else ""),
                f"- machine: {machine['cpus']} cores ({machine['cpu_model']}), "
                f"{machine['memory_gib']} GiB memory, {gpu}",
                f"- Python {meta.get('python')}, llama-cpp-python {meta.get('llama_cpp_python')}",
                f"- model: SmolLM2-135M-Instruct Q4_1 (`{_setting(results, 'package_file')}`), "
                f"served as `{meta.get('served_weights')}` (registry `weights: auto`: "
                + (
                    "the Q4_1 file on this project's repacked Q4_1 kernel, "
                    if meta.get("fast_q4_1_kernel")
                    else "its Q8_0 copy, for want of the patched Q4_1 kernel, "
                )
                + "see docs/OPERATIONS.md; the in-process ceiling loads that same file "
                "with the same llama-cpp-python), "
                f"`n_ctx` {n_ctx} per slot, {slots} slots (`max_concurrent`); sampling "
                f"temperature {sampling.get('temperature')}, top-p {sampling.get('top_p')}, "
                "top-k 40, min-p 0.05, a fixed seed per request",
                f"- {_threads_text(results)}",
                f"- HTTP client: {_get(results, 'config', 'bench', 'client') or 'httpx'}",
                f"- took {meta.get('duration_s')} s",
                f"- {shared_note(results)}",
            ]
        ),
        *head_to_head_section(results),
        *kernel_section(results),
        "## Figures",
        "Ratios: `x in-process` is the pool worker's figure over the in-process ceiling's "
        "(the aggregate rows divide by its single-stream decode rate, so they show the "
        "gain from batching); `x anchor` is over SPEC §9's figures (another day, stock "
        "llama-server); `x this run` is over llama-server in this run"
        + (f" ({_get(results, 'router', 'kernels')} kernels)" if results.get("router") else "")
        + ". The decode and 8-stream rows are the head-to-head medians above. For tokens/s "
        "higher is better, for milliseconds lower is better.",
        md_table(FIGURE_HEADER, figures_rows(results)),
        "### Targets (SPEC §9)",
        checks_table(results),
        *_anchor_note(results),
    ]
    if plot:
        sections += [
            "### Aggregate tokens/s against concurrent streams",
            "![aggregate tokens/s against concurrent streams](benchmarks.png)",
        ]
    sections += [
        "### Concurrent streams (the pool's worker port)",
        f"Each stream asks for a story with `max_tokens` {max_tokens}; all are sent at "
        "once. Aggregate = completion tokens of all streams / wall time from sending the "
        f"first to the end of the last; {plan['runs_per_level']} run(s) per level, median "
        "(1 and 8 streams: the head-to-head rounds). "
        f"With 16 streams on {slots} slots, 8 wait in the worker's queue, so their time "
        "to first token includes a whole generation.",
        concurrency_table(results),
        "### Cold-start matrix",
        "Each case: rounds of a COLD model to its first token, `POST /models/{id}/load` "
        "(it returns when the worker serves) then a streamed request (`max_tokens` 1) to "
        "the endpoint it returned, unless said otherwise. Before each round the model is "
        "unloaded and the bench waits until the spare worker (if any) is back and idle. "
        "The cases: the spare guessed right (it loaded the model's weights and made its "
        "context ahead: `spare_preload`, on by default; before each round the model is "
        "loaded, sent one-token requests until it is the model most in demand, and "
        "unloaded, so that it is the spare's first guess whatever ran before; GET /health "
        "lists it in `preloaded_models` before the load), the same with one request through the "
        "manager and no load call, a spare without weights (`spare_preload: 0`), the spare "
        "guessed wrong (`spare_preload: 1`, and another model on another copy of the file "
        "loaded, sent one-token requests until it is the model most in demand, and "
        "unloaded just before, so the spare loaded that one's weights ahead), "
        "the file not in the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)` on the served "
        "file before the load, with a spare without weights: a spare that loaded it ahead "
        "would hold it in the page cache; mincore(2) checks that the pages were dropped), "
        "no spare at all (`spare_workers: 0`: the load starts a new Python process), that "
        "with the file not in the page cache (the worst case), and four models on four "
        "distinct copies of the file cold-started in turn with `max_concurrent_models: 2` "
        "(`bench:hot`, pinned, and one more), so each load evicts the last, with "
        "`spare_preload` 4 (the default). Copies are byte-for-byte copies (their own "
        "inodes and page cache), registered with `POST /models/register`. llama-server's "
        "column: its cold start with the file in the page cache, or dropped as the case's.",
        cold_matrix_table(results),
    ]
    for key in COLD_KEYS:
        entry = results.get(key)
        if entry:
            sections += [
                f"#### {entry.get('label') or key}",
                cold_table(results, key),
                _breakdown_text(results, key),
            ]
    sections += [
        "`handoff`: the manager choosing a port and the spare, and the spare reading "
        "its command; `prepare_weights`: finding the file to serve; `load_model`: "
        "llama.cpp reading the GGUF (its 49,152-token vocabulary; repacking Q4_1), or "
        "taking the model the spare loaded ahead; `create_context`: the KV "
        "cache and compute buffers, in memory the spare mapped ahead "
        "(`spare_reserve_mb`), or taking the context the spare made ahead; "
        "`chat_template`: compiling the Jinja template (unless the spare did) and "
        "restoring the saved KV cache of the template's opening; "
        "`start_server`: building the app and accepting on the socket.",
        *router_section(results),
        "### System prompt reuse",
        f"A support-bot system prompt of {fmt(system_tokens)} tokens ({fmt(prompt_tokens)} "
        f"with the chat template and the question, in a {n_ctx:,}-token slot), new for each "
        "round (so nothing of it is cached the first time), sent once; then the same "
        "system prompt with other questions. `cached_tokens` is "
        "`usage.prompt_tokens_details.cached_tokens`: prompt tokens whose KV cache the "
        "worker reused. In-process llama-cpp-python also reuses the longest common prefix "
        "of its previous prompt.",
        system_table(results),
        "### Memory",
        memory_table(results),
    ]
    unified = results.get("unified_endpoint") or {}
    if unified.get("measured"):
        sections += [
            "### Unified endpoint",
            "The same short question (`max_tokens` 1) is sent in pairs, once through the "
            "manager's `/v1/chat/completions` and once straight to the worker, in "
            "alternating order. After the first request the worker's cache holds the "
            "whole prompt, so every request computes one token and both ways do the same "
            "work. Time to first token through the manager: "
            f"{fmt(unified.get('routed_ttft_ms'), 2)} ms, straight to the worker: "
            f"{fmt(unified.get('direct_ttft_ms'), 2)} ms (medians); the overhead, the "
            f"median of the {fmt(unified.get('pairs'), 0)} pairs' differences: "
            f"{fmt(unified.get('overhead_ms'), 2)} ms"
            + (
                f" (the differences' p10-p90: {fmt(spread['p10'], 1)} to "
                f"{fmt(spread['p90'], 1)} ms: each pair's two requests meet the machine's "
                "noise apart, which is why the pairs are many)."
                if (spread := unified.get("overhead_ms_dist"))
                else "."
            ),
        ]
    sections += [
        "## Problems seen during the run",
        "\n".join(f"- {p}" for p in problems) if problems else "None.",
        "## How each figure is measured (and how to reproduce it)",
        "Run `.venv/bin/python scripts/bench.py` from the repository root (`--quick` for "
        "a short run with fewer rounds and without the Q8_0 copy, `--json-out FILE` for "
        "every raw figure, `--write-docs` to rewrite this page, the plot and "
        f"`{json_name}`; `--from-json FILE --write-docs` renders them from a JSON file "
        "without a run). "
        "It needs nothing but the project's virtual environment (matplotlib for the plot). "
        "All traffic is on 127.0.0.1; the manager "
        "runs in a temporary folder on free ports and is stopped with SIGTERM at the end. "
        "`--build-router` also runs llama.cpp's `llama-server` in router mode side by "
        "side: it fetches llama-cpp-python's source distribution from the package index, "
        "applies this project's patches/*.patch (as the pool's wheel is built) and builds "
        "the `llama-server` target of its vendored llama.cpp with cmake, once (about 6 to "
        "10 minutes on 2 cores; cached in `~/.cache/model-pool/llama-server-VERSION+pool."
        "DIGEST`, nothing in the repository); `--router-stock` also runs a stock build "
        "(cached in `~/.cache/model-pool/llama-server-VERSION`) for the kernel's own gain; "
        "`--router PATH` uses a binary built before. CI "
        "(`.ci/run`) runs `--quick` after the tests, to keep the script working: it fails "
        "when the run itself breaks or any request errors, never on a figure.",
        "\n".join(
            [
                "- **Single-stream decode**: one streamed chat completion at a time, "
                f"`max_tokens` {max_tokens}, a story prompt; tokens after the first "
                "(`usage.completion_tokens` - 1) over the time from the first to the last "
                f"text chunk; {plan['decode_runs']} interleaved rounds (see head to head), "
                "median. The in-process ceiling runs the same prompt and seed in each "
                "round, first in even rounds and last in odd ones, counting streamed "
                "chunks as tokens.",
                "- **Aggregate tokens/s**: see above; every stream is checked for "
                f"`completion_tokens` == {max_tokens} or `finish_reason` `stop`, and "
                "`data: [DONE]`.",
                "- **Warm TTFT**: a short question (a different one each run, so only the "
                "chat template's fixed prefix can come from the cache), `max_tokens` 1, "
                "from sending the request to the first token; median of "
                f"{plan['ttft_runs']}, interleaved with the in-process runs (and "
                "llama-server's).",
                f"- **Cold start**: see the matrix; {plan['cold_rounds']} rounds for the "
                f"first three cases, {plan.get('matrix_rounds', '-')} for the others, "
                f"{plan.get('rotation_cycles', '-')} cycles of four for the rotation. The "
                "router's 546 ms is a request for an unloaded model until its first token.",
                "- **System prompt reuse**: "
                f"{plan['system_rounds']} round(s), each a new system prompt sent once and "
                f"then {plan['system_repeats']} more times with other questions.",
                "- **Memory**: resident set size (psutil) of the worker processes, the "
                "spare and the manager, after the runs above.",
                "- **llama.cpp router**: the anchor columns are SPEC §9's figures, measured "
                "with stock `llama-server` in router mode, `-np 8 -t 2`, the same model. "
                "With `--build-router` (or `--router PATH`), the benchmark also runs "
                "`llama-server` itself in the same run: the `this run` columns, whose ratios "
                "do not depend on how fast the machine was that day."
                + ("" if results.get("router") else " This run did not."),
            ]
        ),
    ]
    return "\n\n".join(sections) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Aggregate tokens/s against streams; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    levels = results.get("concurrency") or []
    if not levels:
        return False
    xs = [entry["streams"] for entry in levels]
    ys = [entry["aggregate_tps"] for entry in levels]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.plot(xs, ys, marker="o", label="pool worker (HTTP, continuous batching)")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center")
    ax.scatter(
        [1, 8],
        [ANCHOR["single_stream_tps"], ANCHOR["aggregate_8_tps"]],
        marker="s",
        color="tab:red",
        zorder=3,
        label="llama.cpp router (SPEC anchor)",
    )
    # The target is 1.3x the router: the one that ran beside the pool if it did.
    theirs = {
        x["streams"]: x["aggregate_tps"] for x in _get(results, "router", "concurrency") or ()
    }
    if theirs:
        ax.scatter(
            list(theirs),
            list(theirs.values()),
            marker="D",
            color="tab:purple",
            zorder=3,
            label=f"llama-server, this run ({_get(results, 'router', 'kernels')} kernels)",
        )
    routed = {
        1: h2h(results, "single_stream", "pool_manager")
        and _get(
            results, "head_to_head", "single_stream", "pool_manager", "as_level", "aggregate_tps"
        ),
        8: h2h(results, "aggregate_8", "pool_manager"),
    }
    if all(routed.values()):
        ax.scatter(
            list(routed),
            list(routed.values()),
            marker="^",
            color="tab:orange",
            zorder=3,
            label="pool, through the manager's /v1",
        )
    ax.scatter(
        [8],
        [1.3 * theirs.get(8, ANCHOR["aggregate_8_tps"])],
        marker="_",
        s=400,
        color="tab:green",
        zorder=3,
        label="target at 8 streams (1.3x "
        + ("llama-server, this run)" if 8 in theirs else "the anchor)"),
    )
    inproc = _get(results, "inprocess", "decode_tps")
    if inproc:
        ax.axhline(
            inproc,
            linestyle="--",
            color="gray",
            label=f"in-process llama-cpp-python, 1 stream ({inproc:.0f})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M Q4_1, 2 cores, 128 tokens per stream")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0.8, max(xs) * 1.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_docs(results: dict[str, Any], source: Path | None = None) -> None:
    """Rewrite docs/BENCHMARKS.md and the plot from `results`, and docs/bench.json with
    `results` themselves: the page shows nothing that file does not hold."""
    if source is None or source.resolve() != DOCS_JSON.resolve():
        DOCS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    plot = write_plot(results, DOCS_PNG)
    # Sections other benchmarks write (tool calls, embeddings) stay as they are.
    kept = doc_sections.kept_sections(DOCS_MD.read_text()) if DOCS_MD.exists() else ""
    DOCS_MD.write_text(docs_markdown(results, plot) + ("\n" + kept if kept else ""))
    log(
        f"wrote {DOCS_MD.relative_to(REPO)}, {DOCS_JSON.relative_to(REPO)}"
        + (f" and {DOCS_PNG.relative_to(REPO)}" if plot else "")
    )
