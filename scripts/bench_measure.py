"""The benchmark's measurements (scripts/bench.py): the requests it sends and its phases.

Each phase is a method of `Bench` that writes its figures into `Bench.results`: head to
head on one and on 8 streams, warm time to first token, system prompt reuse, the pool
worker's concurrency sweep, the unified endpoint's overhead, memory, llama-server's cold
start and the pool's cold-start matrix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llama_router
import psutil
from bench_harness import (
    COLD,
    COPY_MODELS,
    HOT,
    LOAD_TIMEOUT_S,
    MAX_TOKENS,
    N_CTX,
    Q8_0_COPY,
    ROUTER_COPY,
    ROUTER_Q4_1,
    ROUTER_Q8_0,
    SLOTS,
    SPARE_WAIT_S,
    THREADS,
    WEIGHTS_CACHE,
    Manager,
    Plan,
    StreamResult,
    all_idle,
    chat_body,
    dist,
    drop_from_page_cache,
    log,
    machine_busy_seconds,
    median,
    ms,
    ratio,
    rounded,
    rss_mb,
    stream_http,
    stream_inprocess,
)

from model_service.preload import FREE_DELAY_SECONDS
from model_service.weights import served_path
from pool_manager.ports import free_port

SYSTEM_PROMPT_TOKENS = 960  # with the chat template and a question: ~990 of the 1024 context
DECOY_ROUNDS_MAX = 40  # batches of up to 8 one-token requests that make a decoy the guess


# --- what is sent -------------------------------------------------------------------------

STORY_SUBJECTS = (
    "a lighthouse keeper who finds a message in a bottle",
    "a baker who opens a shop on the moon",
    "a robot learning to paint",
    "two friends crossing a desert",
    "a library that rearranges itself at night",
    "a fisherman and a talking seagull",
    "a city where it always rains",
    "an old clockmaker and his apprentice",
    "a girl who can speak to trees",
    "a train that never stops",
    "a detective cat in Paris",
    "a mountain village in winter",
    "a sailor lost in the fog",
    "a gardener who grows glass flowers",
    "a musician who plays for whales",
    "a school for young dragons",
)
SHORT_QUESTIONS = (
    "Say hello.",
    "Name three colours.",
    "What is the capital of France?",
    "Count to five.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Name a large animal.",
    "What day comes after Monday?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
    "Name a planet.",
    "What colour is the sky?",
    "Say goodbye politely.",
    "Name a musical instrument.",
    "What do bees make?",
    "Name a month in winter.",
    "What is frozen water called?",
    "Name a kind of tree.",
    "What sound does a dog make?",
    "Name a breakfast food.",
    "What is the largest ocean?",
    "Name a shape with three sides.",
    "What do plants need to grow?",
    "Name a country in Asia.",
    "What is a baby cat called?",
    "Name something that flies.",
    "What is the boiling point of water?",
    "Name a sport played with a ball.",
    "What is the first letter of the alphabet?",
    "Name a vegetable that is green.",
)
SYSTEM_RULE_TOPICS = (
    "billing",
    "shipping",
    "returns",
    "warranty",
    "passwords",
    "invoices",
    "discounts",
    "gift cards",
    "accessibility",
    "privacy",
    "delivery times",
    "international orders",
)
SYSTEM_RULE_STYLES = (
    "two short sentences",
    "a numbered list",
    "a friendly tone",
    "plain words",
    "a formal tone",
    "one paragraph",
)


def system_prompt(tag: str, tokens: Callable[[str], int]) -> str:
    """A deterministic support-bot system prompt of about SYSTEM_PROMPT_TOKENS tokens.

    `tag` goes first, so prompts with different tags share no cached prefix.
    """
    lines = [f"Session {tag}. You are the support assistant of a small online shop."]
    for i in range(400):
        topic = SYSTEM_RULE_TOPICS[i % len(SYSTEM_RULE_TOPICS)]
        style = SYSTEM_RULE_STYLES[(i * 5) % len(SYSTEM_RULE_STYLES)]
        rule = (
            f"Rule {i + 1}: when a customer asks about {topic}, answer in {style}, "
            f"check order number {1000 + 37 * i}, and never promise more than {i % 9 + 2} days."
        )
        candidate = [*lines, rule]
        if tokens("\n".join(candidate)) > SYSTEM_PROMPT_TOKENS:
            break
        lines = candidate
    return "\n".join(lines)


def story(i: int) -> list[dict[str, str]]:
    subject = STORY_SUBJECTS[i % len(STORY_SUBJECTS)]
    return [{"role": "user", "content": f"Write a long story about {subject}. Tell it in detail."}]


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]}]


# --- the benchmark's phases ----------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One server the head-to-head phases send the same requests to; or, with a `file`,
    llama.cpp's bare decode loop on that file (llama-batched-bench: no server)."""

    key: str
    label: str
    model: str
    url: str
    file: Path | None = None


@dataclass(frozen=True)
class ColdCase:
    """One row of the cold-start matrix: how the pool stood when the load came."""

    key: str  # where its figures go in the results
    label: str
    model: str
    spare_preload: int  # set by PATCH /config before the rounds
    spare_workers: int = 1  # 0: no spare, the load starts a new Python process
    through_manager: bool = False  # one request to the manager's /v1, no load call
    decoy: str | None = None  # made the most in demand before each round: the spare's guess
    # The model itself made the most in demand before each round, so that the spare's
    # guess (weights and context ahead) is right whatever ran before the case.
    likeliest: bool = False
    drop_cache: bool = False  # the served file out of the page cache before each round
    rotation: tuple[str, ...] = ()  # these cold-started in turn, each load evicting the last


@dataclass
class Bench:
    plan: Plan
    manager: Manager
    llm: Any
    # Every request, to the pool and to llama-server alike, goes through this one client,
    # on a new connection each (no keep-alive): llama-server closes kept-alive connections
    # after a streamed reply without saying so, and reusing one fails.
    client: httpx.AsyncClient
    hot_url: str = ""
    q8_0_url: str = ""  # the Q8_0 copy's worker, while it is loaded (head to head)
    router: llama_router.Router | None = None  # llama.cpp's llama-server, when run side by side
    router_stock: llama_router.Router | None = None  # the same, stock kernels (the kernel line)
    copies: list[Path] = field(default_factory=list)  # the files of COPY_MODELS
    # llama-batched-bench, built as llama-server, and the files it runs on (the Q4_1 file
    # as given to llama-server, then the Q8_0 copy): the bare loop's sides.
    bare_loop: Path | None = None
    bare_loop_files: tuple[Path, Path] | None = None
    prompt_sizes: dict[str, int] = field(default_factory=dict)  # a prompt's JSON: tokens
    registered: bool = False  # COPY_MODELS registered with the manager
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    contention: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # each phase's wall time

    @property
    def routers(self) -> list[llama_router.Router]:
        return [r for r in (self.router, self.router_stock) if r is not None]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and note how many cores other work on the machine used meanwhile.

        Other work = the machine's busy CPU time (steal included: in a VM that is CPU the
        host gave to someone else) minus ours: this process and the tools it ran (the bare
        loop: their time counts in its children once reaped), the manager, and its
        workers (alive, or exited and reaped: their time then counts in the manager's
        children), and llama-server.
        """
        started, machine_before, ours_before = (
            time.monotonic(),
            machine_busy_seconds(),
            self._ours(),
        )
        yield
        wall = time.monotonic() - started
        others = (machine_busy_seconds() - machine_before) - (self._ours() - ours_before)
        self.contention[name] = round(max(0.0, others) / wall, 2) if wall > 0 else 0.0
        self.phase_seconds[name] = round(wall, 1)

    def _ours(self) -> float:
        """CPU seconds used so far by this process, the manager and all its workers."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            times = psutil.Process().cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        if self.manager.pid is not None:
            with contextlib.suppress(psutil.Error):
                manager = psutil.Process(self.manager.pid)
                times = manager.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        for child in self.manager.note_children():
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
        for server in self.routers:
            if server.process is None:
                continue
            with contextlib.suppress(psutil.Error):
                router = psutil.Process(server.process.pid)
                times = router.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
                for child in router.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        times = child.cpu_times()
                        total += times.user + times.system
        return total

    def note_incomplete(self, what: str, results: list[StreamResult], max_tokens: int) -> None:
        bad = [r for r in results if not r.complete(max_tokens)]
        for r in bad[:3]:
            self.problems.append(
                f"{what}: incomplete stream (tokens {r.tokens}, finish {r.finish_reason}, "
                f"done {r.done}, error {r.error})"
            )
        if len(bad) > 3:
            self.problems.append(f"{what}: {len(bad) - 3} more incomplete streams")

    async def http(
        self,
        model: str,
        messages: list[dict[str, str]],
        max_tokens: int,
        seed: int,
        url: str | None = None,
    ) -> StreamResult:
        body = chat_body(model, messages, max_tokens, seed)
        return await stream_http(self.client, url or self.hot_url, body)

    async def on_router(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        seed: int,
        model: str = ROUTER_Q4_1,
        router: llama_router.Router | None = None,
    ) -> StreamResult:
        server = router or self.router
        assert server is not None
        url = f"{server.url}/v1/chat/completions"
        return await self.http(model, messages, max_tokens, seed, url=url)

    def sides(self) -> list[Side]:
        """Who the head-to-head phases measure, with the same requests, interleaved."""
        sides = [
            Side("pool_worker", "pool, worker port", HOT, self.hot_url),
            Side(
                "pool_manager",
                "pool, through the manager's /v1",
                HOT,
                f"{self.manager.url}/v1/chat/completions",
            ),
        ]
        if self.router is not None:
            kernels = (self.results.get("router") or {}).get("kernels") or "unknown"
            sides.append(
                Side(
                    "llama_server",
                    f"llama-server ({kernels} kernels)",
                    ROUTER_Q4_1,
                    f"{self.router.url}/v1/chat/completions",
                )
            )
        bare = self.bare_loop_files if self.bare_loop is not None else None
        if bare is not None:
            label = "llama.cpp's bare decode loop"
            sides.append(Side("bare_loop", label, ROUTER_Q4_1, "", bare[0]))
        if self.router_stock is not None:
            sides.append(
                Side(
                    "llama_server_stock",
                    "llama-server (stock kernels)",
                    ROUTER_Q4_1,
                    f"{self.router_stock.url}/v1/chat/completions",
                )
            )
        if self.q8_0_url:
            sides.append(
                Side("pool_worker_q8_0", "pool, worker port, Q8_0 copy", Q8_0_COPY, self.q8_0_url)
            )
            if self.router is not None:
                sides.append(
                    Side(
                        "llama_server_q8_0",
                        "llama-server, Q8_0 copy",
                        ROUTER_Q8_0,
                        f"{self.router.url}/v1/chat/completions",
                    )
                )
            if bare is not None:
                sides.append(
                    Side(
                        "bare_loop_q8_0",
                        "llama.cpp's bare decode loop, Q8_0 copy",
                        ROUTER_Q8_0,
                        "",
                        bare[1],
                    )
                )
        return sides

    async def warm_up(self) -> None:
        """One request each way, so templates, samplers and caches are built before timing
        (and the routers load their models: they load on demand)."""
        stream_inprocess(self.llm, story(99), 16, seed=99)
        for side in self.sides():
            if side.file is not None:
                continue  # a new process each round: nothing to warm
            warm = await self.http(side.model, story(98), 16, seed=98, url=side.url)
            if warm.error:
                raise RuntimeError(f"{side.label}: {warm.error}")

    async def head_to_head_single(self) -> None:
        """Single-stream decode, interleaved: each round sends the same story (same seed,
        `max_tokens`) to every side, one after the other, the order rotating by one each
        round so that no side always goes first; the in-process ceiling goes first in
        even rounds and last in odd ones. Drift on the machine hits every side alike."""
        sides = self.sides()
        log(f"head to head, single stream: {self.plan.decode_runs} rounds x {len(sides)} sides")
        runs: dict[str, list[StreamResult]] = {side.key: [] for side in sides}
        ceiling: list[StreamResult] = []
        for i in range(self.plan.decode_runs):
            if i % 2 == 0:
                ceiling.append(stream_inprocess(self.llm, story(i), MAX_TOKENS, seed=100 + i))
            for side in _rotated(sides, i):
                if side.file is not None:
                    result = await self._bare_loop_single(side.file, story(i))
                else:
                    result = await self.http(side.model, story(i), MAX_TOKENS, 100 + i, side.url)
                runs[side.key].append(result)
            if i % 2 == 1:
                ceiling.append(stream_inprocess(self.llm, story(i), MAX_TOKENS, seed=100 + i))
        table: dict[str, Any] = {}
        for side in sides:
            self.note_incomplete(f"{side.label}: single stream", runs[side.key], MAX_TOKENS)
            table[side.key] = _single_summary(side, runs[side.key])
        self.results.setdefault("head_to_head", {})["single_stream"] = table
        self.results["head_to_head"]["order"] = [side.key for side in sides]
        worker = runs["pool_worker"]
        self.results["single_stream"] = {
            "runs": [r.summary(MAX_TOKENS) for r in worker],
            "decode_tps": table["pool_worker"]["decode_tps"]["median"],
            "ttft_ms": table["pool_worker"]["ttft_ms"]["median"],
        }
        self.results["inprocess"] = {
            "decode_runs": [r.summary(MAX_TOKENS) for r in ceiling],
            "decode_tps": rounded(median([r.decode_tps for r in ceiling if r.decode_tps])),
            "decode_tps_dist": dist([r.decode_tps for r in ceiling]),
        }
        if "llama_server" in table:
            self.results["router"]["single_stream"] = {
                "decode_tps": table["llama_server"]["decode_tps"]["median"]
            }

    async def head_to_head_streams(self, streams: int) -> None:
        """`streams` concurrent streams (8: every slot; 4: half of them, where the slots a
        server picks decide how many passes a step takes), interleaved as the single
        stream: each round, one run of `streams` stories on every side in turn, the order
        rotating each round."""
        sides = self.sides()
        rounds = self.plan.eight_runs
        log(f"head to head, {streams} streams: {rounds} rounds x {len(sides)} sides")
        runs: dict[str, list[dict[str, Any]]] = {side.key: [] for side in sides}
        for i in range(rounds):
            for side in _rotated(sides, i):
                if side.file is not None:
                    run = await self._bare_loop_streams(side.file, streams, i)
                else:
                    run = await self._streams_run(side.model, side.url, streams, i)
                runs[side.key].append(run)
        table = {
            side.key: {"label": side.label, **_level_summary(streams, runs[side.key])}
            for side in sides
        }
        self.results.setdefault("head_to_head", {})[f"aggregate_{streams}"] = table

    async def concurrency(self) -> None:
        """The pool worker's sweep over concurrent streams (1, 4 and 8 come from head to
        head, measured there interleaved with the other sides)."""
        h2h = self.results.get("head_to_head") or {}
        levels: list[dict[str, Any]] = []
        for streams in self.plan.stream_levels:
            if streams == 1 and "single_stream" in h2h:
                levels.append(h2h["single_stream"]["pool_worker"]["as_level"])
                continue
            if f"aggregate_{streams}" in h2h:
                level = h2h[f"aggregate_{streams}"]["pool_worker"]
                levels.append({k: v for k, v in level.items() if k != "label"})
                continue
            log(f"{streams} concurrent streams x {MAX_TOKENS} tokens")
            runs = [
                await self._streams_run(HOT, self.hot_url, streams, run)
                for run in range(self.plan.runs_per_level)
            ]
            levels.append(_level_summary(streams, runs))
        self.results["concurrency"] = levels
        if "llama_server" in (h2h.get("single_stream") or {}):
            self.results["router"]["concurrency"] = [
                h2h["single_stream"]["llama_server"]["as_level"],
                *(
                    {k: v for k, v in h2h[key]["llama_server"].items() if k != "label"}
                    for key in ("aggregate_4", "aggregate_8")
                    if "llama_server" in (h2h.get(key) or {})
                ),
            ]

    async def router_cold_start(self) -> None:
        """The router's cold start: a request for an unloaded model, to its first token;
        with the file in the page cache (as the anchor), then with it dropped first."""
        assert self.router is not None
        cases: list[tuple[str, str, bool]] = [("cold_start", ROUTER_Q4_1, False)]
        if self.copies:
            cases.append(("cold_start_uncached", ROUTER_COPY, True))
        for key, model, drop in cases:
            log(f"llama-server cold start ({model}), {self.plan.cold_rounds} rounds")
            rounds: list[dict[str, Any]] = []
            for i in range(self.plan.cold_rounds):
                await self.router.unload(model)
                cache: tuple[float | None, float | None] = (None, None)
                if drop:
                    cache = drop_from_page_cache(self.copies[2])
                    self._check_dropped(f"llama-server {model}", cache)
                result = await self.on_router(question(50 + i), 1, seed=500 + i, model=model)
                again = await self.on_router(question(60 + i), 1, seed=600 + i, model=model)
                self.note_incomplete("llama-server cold start", [result, again], 1)
                rounds.append(
                    {
                        "total_ms": rounded(ms(result.ttft_s)),
                        "second_request_ttft_ms": rounded(ms(again.ttft_s)),
                        "page_cache_before": cache[0],
                        "page_cache_after_drop": cache[1],
                        "error": result.error or again.error,
                    }
                )
            if drop:
                await self.router.unload(model)  # its instance maps the file: let it go
            self.results["router"][key] = {
                "model": model,
                "file_dropped_from_page_cache": drop,
                "rounds": rounds,
                "total_ms": rounded(median([r["total_ms"] for r in rounds if r["total_ms"]])),
                "total_ms_dist": dist([r["total_ms"] for r in rounds]),
            }

    def _check_dropped(self, what: str, cache: tuple[float | None, float | None]) -> None:
        after = cache[1]
        if after is not None and after > 0.05:
            self.problems.append(
                f"{what}: {after:.0%} of the file stayed in the page cache after "
                "POSIX_FADV_DONTNEED (a process still maps it?)"
            )

    async def _prompt_size(self, messages: list[dict[str, str]]) -> int:
        """A chat prompt's tokens, as the pool's worker renders it (llama-server's template
        is the model's own too): what the bare loop decodes for it."""
        key = json.dumps(messages)
        if key not in self.prompt_sizes:
            url = self.hot_url.removesuffix("/chat/completions") + "/count_tokens"
            reply = await self.client.post(url, json={"model": HOT, "messages": messages})
            reply.raise_for_status()
            self.prompt_sizes[key] = int(reply.json()["prompt_tokens"])
        return self.prompt_sizes[key]

    async def _bare_loop(self, file: Path, streams: int, prompt_tokens: int) -> dict[str, Any]:
        assert self.bare_loop is not None
        return await asyncio.to_thread(
            llama_router.batched_bench,
            self.bare_loop,
            file,
            streams,
            prompt_tokens,
            MAX_TOKENS,
            THREADS,
            SLOTS * N_CTX,
        )

    async def _bare_loop_single(self, file: Path, messages: list[dict[str, str]]) -> StreamResult:
        """The bare loop on one prompt, as a client would have seen it: the first token when
        the prompt is in (`t_pp`), then MAX_TOKENS - 1 more over as many steps (the tool
        runs MAX_TOKENS steps of `t_tg`: a server's first token comes from the prompt's
        logits, so its stream runs one step fewer)."""
        prompt_tokens = await self._prompt_size(messages)
        row = await self._bare_loop(file, 1, prompt_tokens)
        step = row["t_tg"] / MAX_TOKENS
        return StreamResult(
            sent_at=0.0,
            first_token_at=row["t_pp"],
            first_text_at=row["t_pp"],
            last_text_at=row["t_pp"] + step * (MAX_TOKENS - 1),
            ended_at=row["t_pp"] + step * (MAX_TOKENS - 1),
            completion_tokens=MAX_TOKENS,
            prompt_tokens=prompt_tokens,
            finish_reason="length",
            done=True,
        )

    async def _bare_loop_streams(self, file: Path, streams: int, run: int) -> dict[str, Any]:
        """The bare loop on `streams` prompts at once, each of the run's stories' median size
        (the tool takes one size), counted as `_streams_run` counts a server's run."""
        sizes = [await self._prompt_size(story(run * 17 + s)) for s in range(streams)]
        row = await self._bare_loop(file, streams, round(median(sizes)))
        tokens = streams * MAX_TOKENS
        wall = row["t_pp"] + row["t_tg"] * (MAX_TOKENS - 1) / MAX_TOKENS
        return {
            "aggregate_tps": rounded(tokens / wall),
            "wall_s": round(wall, 3),
            "client_cores": 0.0,
            "tokens": tokens,
            "slowest_ttft_ms": rounded(ms(row["t_pp"])),
            "median_ttft_ms": rounded(ms(row["t_pp"])),
            "all_complete": True,
            "incomplete": 0,
            "errors": [],
        }

    async def _streams_run(self, model: str, url: str, streams: int, run: int) -> dict[str, Any]:
        """One run of `streams` concurrent stories, sent at once."""
        me = psutil.Process().cpu_times()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                self.http(model, story(run * 17 + s), MAX_TOKENS, seed=1000 * streams + s, url=url)
                for s in range(streams)
            )
        )
        ended = max(r.ended_at or started for r in results)
        mine = psutil.Process().cpu_times()
        client_cpu = mine.user + mine.system - me.user - me.system
        self.note_incomplete(f"{model}: {streams} streams", list(results), MAX_TOKENS)
        tokens = sum(r.tokens for r in results if r.error is None)
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        return {
            "aggregate_tps": rounded(tokens / (ended - started)),
            "wall_s": round(ended - started, 3),
            "client_cores": round(client_cpu / (ended - started), 3),
            "tokens": tokens,
            "slowest_ttft_ms": rounded(ms(max(ttfts, default=None))),
            "median_ttft_ms": rounded(ms(median(ttfts))),
            "all_complete": all(r.complete(MAX_TOKENS) for r in results),
            "incomplete": sum(not r.complete(MAX_TOKENS) for r in results),
            "errors": sorted({r.error for r in results if r.error}),
        }

    async def load(self, model_id: str) -> dict[str, Any] | None:
        """POST /models/{id}/load: the model's view, or None (the problem is noted)."""
        reply = await self.manager.api.post(f"/models/{model_id}/load", timeout=LOAD_TIMEOUT_S)
        if reply.status_code != 200:
            self.problems.append(f"load {model_id}: HTTP {reply.status_code} {reply.text[:300]}")
            return None
        view: dict[str, Any] = reply.json()
        if view.get("pid"):
            self.manager.seen_pids.add(int(view["pid"]))
        return view

    async def unload(self, model_id: str) -> bool:
        """POST /models/{id}/unload unless it is COLD; False (noted) if that failed."""
        if (await self.manager.model(model_id))["state"] == "COLD":
            return True
        reply = await self.manager.api.post(f"/models/{model_id}/unload", timeout=LOAD_TIMEOUT_S)
        if reply.status_code != 200:
            self.problems.append(f"unload {model_id}: HTTP {reply.status_code} {reply.text}")
            return False
        return True

    async def configure(self, **changes: Any) -> None:
        reply = await self.manager.api.patch("/config", json=changes)
        if reply.status_code != 200:
            raise RuntimeError(f"PATCH /config {changes}: HTTP {reply.status_code} {reply.text}")

    async def load_q8_0_copy(self) -> None:
        """Serve the Q8_0 copy beside `bench:hot`, for the head-to-head phases."""
        view = await self.load(Q8_0_COPY)
        if view is None:
            return
        self.q8_0_url = f"{view['endpoint']}/v1/chat/completions"
        await self.manager.wait_spare()  # the load's replacement spare starts meanwhile

    async def unload_q8_0_copy(self) -> None:
        if self.q8_0_url:
            await self.unload(Q8_0_COPY)
            self.q8_0_url = ""

    async def warm_ttft(self) -> None:
        log(f"warm time to first token, {self.plan.ttft_runs} runs each way")
        ours: list[float] = []
        ceiling: list[float] = []
        results: list[StreamResult] = []
        router: list[float] = []
        for i in range(self.plan.ttft_runs):
            inproc = stream_inprocess(self.llm, question(i), 1, seed=200 + i)
            if inproc.ttft_s is not None:
                ceiling.append(inproc.ttft_s)
            result = await self.http(HOT, question(i), 1, seed=200 + i)
            results.append(result)
            if result.ttft_s is not None and result.error is None:
                ours.append(result.ttft_s)
            if self.router is not None:
                theirs = await self.on_router(question(i), 1, seed=200 + i)
                if theirs.ttft_s is not None and theirs.error is None:
                    router.append(theirs.ttft_s)
        self.note_incomplete("warm ttft", results, 1)
        if self.router is not None:
            self.results["router"]["warm_ttft_ms"] = rounded(ms(median(router)), 2)
        self.results["warm_ttft"] = {
            "runs_ms": [rounded(ms(t), 2) for t in ours],
            "median_ms": rounded(ms(median(ours)), 2),
            "prompt_tokens": results[0].prompt_tokens if results else None,
        }
        self.results["inprocess"]["ttft_runs_ms"] = [rounded(ms(t), 2) for t in ceiling]
        self.results["inprocess"]["ttft_ms"] = rounded(ms(median(ceiling)), 2)

    async def system_prompt_reuse(self) -> None:
        plan = self.plan
        log(f"~1,000-token system prompt, {plan.system_rounds} rounds x {plan.system_repeats}")
        count = self._count_tokens
        rounds: list[dict[str, Any]] = []
        inproc_rounds: list[dict[str, Any]] = []
        for r in range(plan.system_rounds):
            for where in ("in-process", "http"):
                system = system_prompt(f"{where}-{r}-{random.getrandbits(32):08x}", count)
                runs: list[StreamResult] = []
                for k in range(plan.system_repeats + 1):
                    messages = [{"role": "system", "content": system}, *question(7 * r + k)]
                    if where == "http":
                        runs.append(await self.http(HOT, messages, 1, seed=300 + k))
                    else:
                        runs.append(stream_inprocess(self.llm, messages, 1, seed=300 + k))
                entry = {
                    "system_prompt_tokens": count(system),
                    "first": runs[0].summary(1),
                    "repeats": [x.summary(1) for x in runs[1:]],
                }
                if where == "http":
                    self.note_incomplete("system prompt", runs, 1)
                    rounds.append(entry)
                else:
                    inproc_rounds.append(entry)

        def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
            first = [e["first"]["ttft_ms"] for e in entries if e["first"]["ttft_ms"] is not None]
            again = [x["ttft_ms"] for e in entries for x in e["repeats"] if x["ttft_ms"]]
            cached = [x["cached_tokens"] for e in entries for x in e["repeats"]]
            first_m, again_m = median(first), median(again)
            return {
                "rounds": entries,
                "first_ttft_ms": rounded(first_m),
                "repeated_ttft_ms": rounded(again_m),
                "repeated_over_first": rounded(ratio(again_m, first_m), 3),
                "prompt_tokens": entries[0]["first"]["prompt_tokens"] if entries else None,
                "cached_tokens_first": [e["first"]["cached_tokens"] for e in entries],
                "cached_tokens_repeated": cached,
            }

        self.results["system_prompt"] = summarize(rounds)
        self.results["inprocess"]["system_prompt"] = summarize(inproc_rounds)

    def _count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False))

    async def unified_endpoint(self) -> None:
        """TTFT through the manager's /v1 minus straight to the worker, in pairs.

        Every request is the same short question, so after the first one the worker's
        cache holds the whole prompt and each request computes one token: both ways do
        identical work, and what differs is the manager's hop. The two of a pair go in
        alternating order; the overhead is the median of the pairs' differences.
        """
        url = f"{self.manager.url}/v1/chat/completions"
        probe = await self.http(HOT, question(100), 1, seed=400, url=url)
        if probe.error is not None:
            self.results["unified_endpoint"] = {"measured": False, "reason": probe.error[:200]}
            log(f"unified endpoint not measured: {probe.error[:120]}")
            return
        log(f"unified endpoint overhead, {self.plan.unified_pairs} pairs")
        direct: list[float] = []
        routed: list[float] = []
        differences: list[float] = []
        for i in range(self.plan.unified_pairs):
            pair: dict[str, float] = {}
            for way in ("direct", "routed") if i % 2 == 0 else ("routed", "direct"):
                result = await self.http(
                    HOT, question(100), 1, seed=401, url=url if way == "routed" else None
                )
                if result.ttft_s is not None and result.error is None:
                    pair[way] = result.ttft_s
            if len(pair) == 2:
                direct.append(pair["direct"])
                routed.append(pair["routed"])
                differences.append(pair["routed"] - pair["direct"])
        self.results["unified_endpoint"] = {
            "measured": True,
            "pairs": len(differences),
            "direct_ttft_ms": rounded(ms(median(direct)), 2),
            "routed_ttft_ms": rounded(ms(median(routed)), 2),
            "overhead_ms": rounded(ms(median(differences)), 2),
            "overhead_ms_dist": dist([ms(x) for x in differences]),
        }

    async def memory(self) -> None:
        hot = await self.manager.model(HOT)
        children = self.manager.note_children()
        fork_server = (await self.manager.health())["fork_server_pid"]
        model_pids = {hot.get("pid"), fork_server}
        spares = [c.pid for c in children if c.pid not in model_pids]
        self.results["memory"] = {
            "worker_rss_mb": rss_mb(hot.get("pid")),
            "worker_rss_mb_reported": hot.get("memory_rss_mb"),
            "worker_estimate_mb": hot.get("memory_estimate_mb"),
            "spare_rss_mb": [rss_mb(pid) for pid in spares],
            "fork_server_rss_mb": rss_mb(fork_server),
            "manager_rss_mb": rss_mb(self.manager.pid),
            "bench_client_rss_mb": rss_mb(os.getpid()),
        }

    def cold_cases(self) -> list[ColdCase]:
        """The cold-start matrix: the best case first, then the cases it is not."""
        cases = [
            ColdCase(
                "cold_start",
                "spare guessed right (weights and context loaded ahead)",
                COLD,
                spare_preload=4,
                likeliest=True,
            ),
            ColdCase(
                "cold_start_request",
                "spare guessed right, one request through the manager (no load call)",
                COLD,
                spare_preload=4,
                through_manager=True,
                likeliest=True,
            ),
            ColdCase(
                "cold_start_spare_only",
                "spare without weights (spare_preload 0)",
                COLD,
                spare_preload=0,
            ),
        ]
        if not self.copies:
            return cases
        one, two, three, _ = COPY_MODELS
        return [
            *cases,
            ColdCase(
                "cold_start_wrong_guess",
                "spare guessed wrong (it loaded another model's file ahead)",
                one,
                spare_preload=1,
                decoy=two,
            ),
            ColdCase(
                "cold_start_uncached",
                "spare without weights, the file not in the page cache",
                three,
                spare_preload=0,
                drop_cache=True,
            ),
            ColdCase(
                "cold_start_no_spare",
                "no spare (spare_workers 0): a new Python process",
                COLD,
                spare_preload=0,
                spare_workers=0,
            ),
            ColdCase(
                "cold_start_no_spare_uncached",
                "no spare, the file not in the page cache (the worst case)",
                three,
                spare_preload=0,
                spare_workers=0,
                drop_cache=True,
            ),
            ColdCase(
                "cold_start_rotation",
                "four models in rotation, each load evicting the last (spare_preload 4)",
                one,
                spare_preload=4,
                rotation=COPY_MODELS,
            ),
        ]

    async def register_copies(self) -> None:
        """Register COPY_MODELS, each on its own copy of the file (once)."""
        if self.registered:
            return
        self.registered = True
        for model_id, path in zip(COPY_MODELS, self.copies, strict=True):
            entry = self.manager.copy_entry(model_id, path)
            reply = await self.manager.api.post("/models/register?replace=true", json=entry)
            if reply.status_code not in (200, 201):
                raise RuntimeError(f"register {model_id}: HTTP {reply.status_code} {reply.text}")

    async def cold_start(self, case: ColdCase) -> None:
        """Rounds of COLD -> first token, the pool set up as `case` says.

        Each round is `POST /models/{id}/load`, then a request to the worker it returns;
        `through_manager`: one request to the manager's /v1/chat/completions instead,
        which loads the model on demand and relays (what an agent does).
        """
        rotation = case.rotation
        rounds_n = (
            self.plan.cold_rounds if case.key in CLASSIC_COLD_CASES else self.plan.matrix_rounds
        )
        if rotation:
            rounds_n = self.plan.rotation_cycles * len(rotation)
        log(f"cold start: {case.label}, {rounds_n} rounds")
        await self.configure(spare_preload=case.spare_preload, spare_workers=case.spare_workers)
        if rotation:
            await self.configure(max_concurrent_models=2)  # bench:hot (pinned) + one
            for model_id in rotation:
                await self.unload(model_id)
        if case.spare_workers == 0:
            await self._use_up_spares(case.model)
        rounds: list[dict[str, Any]] = []
        for i in range(rounds_n):
            model = rotation[i % len(rotation)] if rotation else case.model
            if not rotation and not await self.unload(model):
                break
            # The decoy (or the model itself) becomes the COLD model most in demand: the
            # spare's guess.
            guessed = case.decoy or (model if case.likeliest else None)
            if guessed is not None and not await self._make_the_guess(guessed):
                break
            guess = guessed or (model if case.spare_preload and not rotation else None)
            if case.spare_workers:
                spare_wait = await self.manager.wait_spare(preloaded=guess)
            else:
                spare_wait = await self._wait_no_spare()
            preloaded = (await self.manager.health()).get("preloaded_models") or []
            cache: tuple[float | None, float | None] = (None, None)
            if case.drop_cache:
                cache = drop_from_page_cache(self._served_file(model))
                self._check_dropped(f"cold start {model}", cache)
            started = time.perf_counter()
            loaded: float | None = None
            if case.through_manager:
                routed = f"{self.manager.url}/v1/chat/completions"
                result = await self.http(model, question(50 + i), 1, seed=500 + i, url=routed)
                view = await self.manager.model(model)
            else:
                loaded_view = await self.load(model)
                loaded = time.perf_counter()
                if loaded_view is None:
                    break
                view = loaded_view
            url = f"{view['endpoint']}/v1/chat/completions"
            if not case.through_manager:
                result = await self.http(model, question(50 + i), 1, seed=500 + i, url=url)
            # A second request on the fresh worker: how much of the first was warm-up.
            again = await self.http(model, question(60 + i), 1, seed=600 + i, url=url)
            self.note_incomplete(f"cold start ({case.key})", [result, again], 1)
            first = result.first_token_at
            rounds.append(
                {
                    "model": model,
                    "spare_wait_s": round(spare_wait, 3),
                    "preloaded_before": preloaded,
                    "page_cache_before": cache[0],
                    "page_cache_after_drop": cache[1],
                    "load_call_ms": rounded(ms(loaded - started) if loaded else None),
                    "load_seconds_reported_ms": rounded(ms(view.get("load_seconds"))),
                    "first_token_after_load_ms": rounded(
                        ms(first - loaded) if first and loaded else None
                    ),
                    "total_ms": rounded(ms(first - started) if first else None),
                    "second_request_ttft_ms": rounded(ms(again.ttft_s)),
                    "breakdown_ms": view.get("load_breakdown_ms") or {},
                    "weights_preloaded": view.get("weights_preloaded"),
                    "context_preloaded": view.get("context_preloaded"),
                    "error": result.error or again.error,
                }
            )
        if case.key == "cold_start":
            # After the worker has freed the other weights its spare held (5 s after the load).
            await asyncio.sleep(FREE_DELAY_SECONDS + 1.0)
            cold_view = await self.manager.model(COLD)
            self.results["memory"]["cold_worker_rss_mb"] = rss_mb(cold_view.get("pid"))
        if rotation:
            for model_id in rotation:
                await self.unload(model_id)
            await self.configure(max_concurrent_models=4)
        else:
            await self.unload(case.model)
        if case.spare_workers == 0:
            await self.configure(spare_workers=1)
        await self.configure(spare_preload=4)
        self.results[case.key] = _cold_summary(case, rounds)

    async def _make_the_guess(self, decoy: str) -> bool:
        """Make `decoy` the COLD local model most in demand, which spares load ahead
        (pool_manager.policies.choose_preload): load it, send it one-token requests until
        its demand passes every other model's (GET /models `demand`), unload it. False
        (noted) when a step failed."""
        view = await self.load(decoy)
        if view is None:
            return False
        url = f"{view['endpoint']}/v1/chat/completions"
        for attempt in range(DECOY_ROUNDS_MAX):
            models = (await self.manager.api.get("/models")).json()["models"]
            demand = {m["model_id"]: m["demand"] for m in models}
            top = max((d for m, d in demand.items() if m not in (decoy, HOT)), default=0.0)
            if demand[decoy] > top:
                return await self.unload(decoy)
            missing = math.floor(top - demand[decoy]) + 1
            batch = [
                self.http(decoy, question(i), 1, seed=700 + i, url=url)
                for i in range(min(missing, 8))
            ]
            results = await asyncio.gather(*batch)
            self.note_incomplete(f"decoy requests (round {attempt})", results, 1)
        self.problems.append(f"{decoy} not the most in demand after {DECOY_ROUNDS_MAX} rounds")
        return False

    def _served_file(self, model_id: str) -> Path:
        """The file a COPY_MODELS model's worker loads (its Q8_0 copy if one is served)."""
        path = self.copies[COPY_MODELS.index(model_id)]
        return served_path(path, "auto", WEIGHTS_CACHE)

    async def _use_up_spares(self, model: str) -> None:
        """With spare_workers 0 no spare is started, but the one there waits for a load:
        let a load (not timed) take it."""
        if (await self.manager.health()).get("spare_workers", 0) > 0:
            await self.manager.wait_spare()
            await self.load(model)
            await self.unload(model)

    async def _wait_no_spare(self, timeout: float = SPARE_WAIT_S) -> float:
        """Wait until no spare is left and every process of the pool is idle."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if (await self.manager.health()).get("spare_workers", 0) == 0 and await all_idle(
                self.manager.note_children()
            ):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"spares left or the pool not idle within {timeout:g} s")


CLASSIC_COLD_CASES = ("cold_start", "cold_start_request", "cold_start_spare_only")


def _rotated(sides: list[Side], i: int) -> list[Side]:
    """The round's order: the sides rotated by `i`, so each goes first as often."""
    k = i % len(sides) if sides else 0
    return sides[k:] + sides[:k]


def _single_summary(side: Side, runs: list[StreamResult]) -> dict[str, Any]:
    """One side's single-stream rounds: decode rate, time to first token, and the request's
    own aggregate rate (its tokens over its whole time: the 1-stream level)."""
    whole = [
        r.tokens / (r.ended_at - r.sent_at)
        if r.error is None and r.ended_at and r.ended_at > r.sent_at
        else None
        for r in runs
    ]
    return {
        "label": side.label,
        "model": side.model,
        "runs": [r.summary(MAX_TOKENS) for r in runs],
        "decode_tps": dist([r.decode_tps for r in runs]),
        "ttft_ms": dist([ms(r.ttft_s) for r in runs]),
        "as_level": {
            "streams": 1,
            "runs": [
                {
                    "aggregate_tps": rounded(w),
                    "tokens": r.tokens,
                    "slowest_ttft_ms": rounded(ms(r.ttft_s)),
                    "median_ttft_ms": rounded(ms(r.ttft_s)),
                    "all_complete": r.complete(MAX_TOKENS),
                    "incomplete": int(not r.complete(MAX_TOKENS)),
                    "errors": [r.error] if r.error else [],
                }
                for r, w in zip(runs, whole, strict=True)
            ],
            "aggregate_tps": dist(whole)["median"],
            "aggregate_tps_dist": dist(whole),
            "slowest_ttft_ms": rounded(max((ms(r.ttft_s) or 0.0 for r in runs), default=None)),
            "all_complete": all(r.complete(MAX_TOKENS) for r in runs),
        },
    }


def _level_summary(streams: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of `streams` concurrent streams: the median and the spread of the aggregate."""
    spread = dist([x["aggregate_tps"] for x in runs])
    return {
        "streams": streams,
        "runs": runs,
        "aggregate_tps": spread["median"],
        "aggregate_tps_dist": spread,
        "slowest_ttft_ms": rounded(max((x["slowest_ttft_ms"] or 0 for x in runs), default=None)),
        "all_complete": all(x["all_complete"] for x in runs),
    }


def _cold_summary(case: ColdCase, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return rounded(median([r[key] for r in rounds if r[key] is not None]))

    return {
        "label": case.label,
        "case": asdict(case),
        "weights_loaded_ahead": case.spare_preload > 0 and case.decoy is None,
        "rounds": rounds,
        "load_call_ms": med("load_call_ms"),
        "load_seconds_reported_ms": med("load_seconds_reported_ms"),
        "first_token_after_load_ms": med("first_token_after_load_ms"),
        "total_ms": med("total_ms"),
        "total_ms_dist": dist([r["total_ms"] for r in rounds]),
        "second_request_ttft_ms": med("second_request_ttft_ms"),
        "rounds_weights_preloaded": sum(bool(r["weights_preloaded"]) for r in rounds),
        "breakdown_ms": {
            phase: rounded(median([r["breakdown_ms"].get(phase, 0.0) for r in rounds]))
            for phase in (rounds[0]["breakdown_ms"] if rounds else {})
        },
    }


async def start_router(
    binary: Path, folder: Path, models: dict[str, Path], name: str
) -> llama_router.Router:
    folder.mkdir(parents=True, exist_ok=True)
    router = llama_router.Router(binary, folder, free_port(), models)
    log(f"starting {name} llama-server (router mode) on {router.url}")
    await router.start()
    return router


def router_meta(binary: Path, router: llama_router.Router) -> dict[str, Any]:
    patches = llama_router.patches_applied(binary)
    return {
        "binary": str(binary),
        "version": llama_router.version(binary),
        "kernels": "patched" if patches else "stock",
        "patches": patches,
        # The models folder is a temporary folder of links: named, not shown.
        "args": ["--models-dir", "MODELS_DIR", *router.args[2:]],
    }
