#!/usr/bin/env python3
"""Benchmark: the pool against llama.cpp's router and in-process llama-cpp-python.

A benchmark, not a test: it measures and reports; it fails (exit 1) when the run itself
broke (the manager would not start, a process was left behind) or any request it sent
ended in an error, never on a figure.

It starts its own pool manager (`python -m pool_manager --config X --registry Y`) in a
temporary folder, on a free loopback port, with workers on a free port range away from
8050-8099, `spare_workers: 1`, and models on the embedded SmolLM2-135M Q4_1 GGUF:
`bench:hot` (warmup, `n_ctx` 1024 per slot, `max_concurrent` 8: 8 slots, as llama-server
`-np 8 -c 8192`), `bench:cold` (the same file, not warmup, for cold starts), `bench:q8_0`
(its Q8_0 copy, served as stored) and, for the cold-start matrix, `bench:copy1..4` on four
byte-for-byte copies of the file. Requests are streamed (SSE, `stream_options.
include_usage`) and read by one httpx client, a new connection per request, whoever serves
them (no keep-alive anywhere: llama-server drops kept-alive connections after a stream).
With `--build-router`, llama.cpp's `llama-server` in router mode runs beside the pool,
built WITH this project's kernel patches (scripts/llama_router.py), so the comparison is
the same weights on the same kernels, and llama.cpp's bare decode loop (its
`llama-batched-bench` tool from the same build: no server, no sampling) joins the head to
head on both files, the most any server on these kernels can deliver; `--router-stock`
adds a stock build, for the kernel's own gain. Every side runs 2 threads (`n_threads` =
`n_threads_batch`, `-t 2 -tb 2`).

1. head to head, single stream: rounds of one story (`max_tokens` 128, the same seed) to
   every side in turn, the order rotating each round (interleaved, so drift hits all
   alike): the pool's worker port, the pool through the manager's /v1/chat/completions,
   llama-server, stock llama-server, and (full runs) the pool and llama-server on the Q8_0
   copy; the in-process ceiling in each round too. Decode tokens/s (tokens after the
   first / time after the first token), median and p10/p90 per side;
2. head to head, 8 concurrent streams, then 4: the same interleaving, aggregate tokens/s
   (at 4, the slots a server puts the requests in decide how many passes a step takes);
3. warm time to first token (short prompt, `max_tokens` 1), median;
4. the pool worker's sweep over 2 and 16 concurrent streams (1, 4 and 8 from above);
5. time to first token with a ~1,000-token system prompt, the first time and repeated;
6. if the manager serves the unified endpoint, its overhead: time to first token through
   the manager minus straight to the worker, in alternating pairs;
7. worker, spare and manager resident memory (psutil);
8. llama-server's cold start (file in the page cache, and dropped from it);
9. the cold-start matrix, rounds of each: spare guessed right (the default, weights and
   context loaded ahead), the same through the manager, spare without weights, spare
   guessed wrong, the file not in the page cache (posix_fadvise DONTNEED, checked with
   mincore), no spare, no spare and no page cache, four models in rotation.

Figures are reported against SPEC's llama.cpp router anchor (101 tokens/s single stream,
157 tokens/s over 8 streams, 23 ms warm time to first token, 546 ms cold start) and, when
it ran, llama-server in the same run, and against the targets.

This file parses the arguments and runs the phases in order (`run_bench`); the harness
(settings, timing one streamed request, the manager it starts, the machine's and the page
cache's probes) is scripts/bench_harness.py, the phases scripts/bench_measure.py, and the
targets, the summary and docs/BENCHMARKS.md scripts/bench_report.py.

Run it from the repository root, with nothing else busy if the figures are to mean much:

    .venv/bin/python scripts/bench.py --quick                     # ~1 minute (CI)
    .venv/bin/python scripts/bench.py --json-out /tmp/bench.json  # the full run
    .venv/bin/python scripts/bench.py --build-router --router-stock --write-docs
        # the full run with llama-server (patched and stock, each built once: ~6-10 min),
        # rewriting docs/BENCHMARKS.md, docs/benchmarks.png and docs/bench.json
    .venv/bin/python scripts/bench.py --from-json docs/bench.json --write-docs
        # no run: the page and the plot again from the committed JSON

The plot needs matplotlib; without it the PNG is skipped. All traffic stays on 127.0.0.1.
Every request has a timeout and every loop a bound; the manager is stopped with SIGTERM
at the end and every process it started must be gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import llama_router
import psutil
from bench_common import cpu_model, git
from bench_harness import (
    COPY_MODELS,
    FAILED_REQUESTS,
    HOT,
    N_CTX,
    REQUEST_TIMEOUT_S,
    ROUTER_COPY,
    ROUTER_Q4_1,
    ROUTER_Q8_0,
    THREADS,
    WEIGHTS_CACHE,
    WORKLOAD,
    Manager,
    Plan,
    busy_cores,
    file_copies,
    log,
    model_file,
    rss_mb,
    wait_until_quiet,
)
from bench_measure import (
    CLASSIC_COLD_CASES,
    Bench,
    router_meta,
    start_router,
)
from bench_report import (
    ANCHOR,
    checks,
    summary_markdown,
    write_docs,
)

from model_service.weights import (
    ensure_served,
    fast_q4_1,
    served_path,
    widened_path,
)


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick)
    if args.budget:
        plan = replace(plan, budget_s=args.budget)
    dirty = git("status", "--porcelain", "--untracked-files=no") or ""
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty),
        "git_dirty_files": [line[3:] for line in dirty.splitlines()],
        "quick": args.quick,
        "command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu_model": cpu_model(),
            "gpu": None,
        },
        "python": platform.python_version(),
    }
    log("sampling background CPU use before starting anything")
    busy, waited = wait_until_quiet(args.wait_quiet, 1.0 if args.quick else 3.0)
    meta["busy_cores_before"] = busy
    meta["waited_for_quiet_s"] = waited
    meta["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    import llama_cpp  # here, not at the top: importing it takes a while

    meta["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
    source = model_file()
    path = ensure_served(source, served_path(source, "auto", WEIGHTS_CACHE))
    # For the Q8_0 comparisons (the pool's and llama-server's): made if not served.
    q8_0_copy = ensure_served(source, widened_path(source, WEIGHTS_CACHE))
    copies = file_copies(source, len(COPY_MODELS))
    for copy in copies:  # their Q8_0 copies too, if that is what is served: not in a load
        ensure_served(copy, served_path(copy, "auto", WEIGHTS_CACHE))
    meta["fast_q4_1_kernel"] = fast_q4_1()
    meta["served_weights"] = path.name
    log(f"in-process ceiling: loading {path.name}")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )
    folder = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    manager = Manager(folder, q8_0_copy)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
        trust_env=False,
    )
    bench = Bench(
        plan,
        manager,
        llm,
        client,
        copies=copies,
        bare_loop=args.bare_loop,
        bare_loop_files=(source, q8_0_copy),
    )
    router_models = {ROUTER_Q4_1: source, ROUTER_Q8_0: q8_0_copy, ROUTER_COPY: copies[2]}
    failed = False
    started = time.monotonic()
    try:
        async with asyncio.timeout(plan.budget_s):
            log(f"starting the pool manager on {manager.url} (workers {manager.port_range})")
            await manager.start()
            if args.router is not None:
                bench.router = await start_router(
                    args.router, folder / "llama-server", router_models, "the compared"
                )
                bench.results["router"] = router_meta(args.router, bench.router)
            if args.router_stock_binary is not None:
                bench.router_stock = await start_router(
                    args.router_stock_binary,
                    folder / "llama-server-stock",
                    {ROUTER_Q4_1: source},
                    "the stock",
                )
                bench.results["router_stock"] = router_meta(
                    args.router_stock_binary, bench.router_stock
                )
            hot = await manager.wait_serving(HOT)
            bench.hot_url = f"{hot['endpoint']}/v1/chat/completions"
            await manager.wait_spare()
            health = await manager.health()
            meta["machine"]["gpu"] = (health.get("memory") or {}).get("gpu_available")
            if plan.q8_0_copy:
                await bench.load_q8_0_copy()
            await bench.warm_up()
            with bench.phase("head to head, single stream"):
                await bench.head_to_head_single()
            with bench.phase("warm ttft"):
                await bench.warm_ttft()
            with bench.phase("system prompt"):
                await bench.system_prompt_reuse()
            llm.close()  # the ceiling is measured; free its memory and threads
            with bench.phase("head to head, 8 streams"):
                await bench.head_to_head_streams(8)
            with bench.phase("head to head, 4 streams"):
                await bench.head_to_head_streams(4)
            await bench.unload_q8_0_copy()
            with bench.phase("concurrency"):
                await bench.concurrency()
            with bench.phase("unified endpoint"):
                await bench.unified_endpoint()
            await bench.memory()
            if bench.router is not None:
                bench.results["router"]["rss_mb"] = [rss_mb(p) for p in bench.router.pids()]
                with bench.phase("llama-server cold start"):
                    await bench.router_cold_start()
            for case in bench.cold_cases():
                if case.key not in CLASSIC_COLD_CASES:
                    await bench.register_copies()  # after the classic cases: as they were
                with bench.phase(f"cold start: {case.key}"):
                    await bench.cold_start(case)
    except (TimeoutError, RuntimeError, httpx.HTTPError) as exc:
        failed = True
        reason = str(exc) or (
            f"its budget of {plan.budget_s:g} s ran out" if isinstance(exc, TimeoutError) else ""
        )
        what = f"the run stopped early: {type(exc).__name__}: {reason}"
        bench.problems.append(what)
        log(what)
    finally:
        with contextlib.suppress(Exception):
            llm.close()
        await client.aclose()
        for server in bench.routers:
            bench.problems.extend(await server.stop())
        bench.problems.extend(await manager.stop())
        errors, first_errors = manager.log_errors()
        if errors:
            bench.problems.append(f"{errors} ERROR lines in the manager's log: {first_errors}")
        if failed or args.keep or bench.problems:
            log(f"kept {folder} (manager.log is there)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["busy_cores_after"] = busy_cores(1.0 if args.quick else 3.0)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {
        "meta": meta,
        "anchor": ANCHOR,
        "config": {
            "pool": manager.config(),
            "registry": manager.registry(),
            "registered_for_cold_starts": [
                manager.copy_entry(m, p) for m, p in zip(COPY_MODELS, copies, strict=True)
            ],
            "plan": asdict(plan),
            "bench": {
                **WORKLOAD,
                "client": "httpx, one client for every server, a new connection per request "
                "(no keep-alive)",
            },
        },
        **bench.results,
        "other_work_cores": bench.contention,
        "phase_seconds": bench.phase_seconds,
        "problems": bench.problems,
        "failed_requests": {"count": len(FAILED_REQUESTS), "first": FAILED_REQUESTS[:5]},
        "completed": not failed,
    }
    results["checks"] = checks(results)
    return results


# --- entry point ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description="Benchmark the pool worker against in-process llama-cpp-python and "
        "llama.cpp's router.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, 1 and 8 streams, no Q8_0 copy"
    )
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite docs/BENCHMARKS.md and the plot"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="no run: print the summary of a JSON file an earlier run wrote (with "
        "--write-docs, render docs/BENCHMARKS.md, the plot and docs/bench.json from it)",
    )
    parser.add_argument(
        "--docs-from-json",
        type=Path,
        metavar="FILE",
        help="the same as --from-json FILE --write-docs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    router = parser.add_mutually_exclusive_group()
    router.add_argument(
        "--router",
        type=Path,
        metavar="LLAMA_SERVER",
        help="also run the workload on this llama-server binary in router mode",
    )
    router.add_argument(
        "--build-router",
        action="store_true",
        help="build llama-server from llama-cpp-python's vendored llama.cpp WITH this "
        "project's kernel patches (patches/*.patch, as the pool's wheel; cached in "
        "~/.cache/model-pool; the first build takes about 6-10 minutes) and run it side by "
        "side: the same weights on the same kernels; llama.cpp's bare decode loop "
        "(llama-batched-bench, the same build) too",
    )
    parser.add_argument(
        "--router-stock",
        nargs="?",
        const="build",
        metavar="LLAMA_SERVER",
        help="also run stock llama-server (no patches; built and cached when no binary is "
        "given) on the Q4_1 file, for the kernel's own gain",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="stop the run after SECONDS (default: 300 quick, 3600 full)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other work on the machine to stop (default 0)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.from_json or args.docs_from_json
    if source:
        results = json.loads(source.read_text())
        print(summary_markdown(results))
        if args.write_docs or args.docs_from_json:
            write_docs(results, source)
        return 0
    try:
        args.bare_loop = None
        if args.build_router:
            args.router = llama_router.build(patched=True)
            # llama.cpp's bare decode loop, from the same build: the kernels' own ceiling.
            args.bare_loop = llama_router.build(patched=True, target="llama-batched-bench")
        args.router_stock_binary = None
        if args.router_stock == "build":
            args.router_stock_binary = llama_router.build(patched=False)
        elif args.router_stock:
            args.router_stock_binary = Path(args.router_stock)
    except RuntimeError as exc:
        log(f"could not build llama-server: {exc}")
        return 1
    results = asyncio.run(run_bench(args))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    print(summary_markdown(results))
    if args.write_docs:
        if results["completed"]:
            write_docs(results)
        else:
            log("the run stopped early: docs left as they were")
    leftovers = any("outlived" in p or "did not exit" in p for p in results["problems"])
    if results["failed_requests"]["count"]:
        log(f"{results['failed_requests']['count']} requests failed: {FAILED_REQUESTS[:3]}")
    ok = results["completed"] and not leftovers and not results["failed_requests"]["count"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
