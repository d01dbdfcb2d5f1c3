"""Memory admission: the rules, as small functions fed with numbers (bytes).

What counts against `memory_limit_mb` and the machine's free memory: every model holding
a worker (by its estimate, `model_service.gguf.estimate_memory_bytes`) and every spare
worker (by what it holds, `SpareMemory`), except the spare the load will take: that one
becomes the model's worker, so the model's estimate already covers it, and the heap it
mapped ahead is where the model's buffers go.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20

# A spare worker with no reserve and nothing loaded ahead: Python with FastAPI and
# llama.cpp imported. Measured: ~75 MB RSS, a third of it shared libraries.
SPARE_PROCESS_BYTES = 75 * MB


@dataclass(frozen=True)
class SpareMemory:
    """One spare's memory, from its measured RSS and the reserve it was told to map.

    Measured, not estimated: what a spare holds changes on its own (its preloader thread
    loads and frees weights at low priority, the likeliest model's context sits in its
    reserve), and the manager only hears which files it has. RSS is what it holds; a
    spare still starting counts at least its process and the reserve it is about to map.
    """

    rss: int  # resident now (0: unknown)
    file_backed: int  # resident pages of mapped files (the weights it loaded ahead, libraries)
    reserve: int  # the heap it maps ahead (spare_reserve_mb)

    @property
    def held(self) -> int:
        """What counts against memory_limit_mb."""
        return max(self.rss, SPARE_PROCESS_BYTES + self.reserve)

    @property
    def not_free(self) -> int:
        """What to take off the machine's available memory on top of the OS's own count:
        the part still to be mapped, and the mapped model files, which the kernel counts as
        available page cache though the spare keeps using them."""
        return self.held - self.rss + self.file_backed


def why_it_does_not_fit(
    need: int,
    *,
    limit: int,
    models: int,
    spares: list[SpareMemory],
    available: int,
    reusable: int,
) -> str | None:
    """Why a model needing `need` does not fit, or None when it does.

    `models`: the estimates of the models holding a worker; `spares`: every spare but the
    one the load takes; `available`: the machine's available memory; `reusable`: the heap
    the taken spare has already mapped (its reserve), which the model's buffers reuse.
    """
    held = sum(spare.held for spare in spares)
    if models + held + need > limit:
        return (
            f"it needs about {need // MB} MB and loaded models use about {models // MB} MB "
            f"and spare workers {held // MB} MB of memory_limit_mb={limit // MB}"
        )
    free = available - sum(spare.not_free for spare in spares) + min(reusable, need)
    if need > free:
        return f"it needs about {need // MB} MB and only {max(free, 0) // MB} MB are free"
    return None


def room_under_limit(limit: int, models: int, spares: list[SpareMemory]) -> int:
    """What memory_limit_mb leaves for one more spare's process and memory, or its weights."""
    return max(0, limit - models - sum(spare.held for spare in spares))


def spare_reserve_bytes(largest_need: int, available: int, room: int) -> int:
    """A new spare's reserve: what the largest local model allocates, at most a quarter of
    the free memory (an idle spare must not crowd out the models themselves), and no more
    than memory_limit_mb leaves once the spare's process is counted."""
    return max(0, min(largest_need, available // 4, room - SPARE_PROCESS_BYTES))


def preload_budget(available: int, room: int, spares: int) -> int:
    """Bytes of model files each spare may load ahead: at most half the free memory, and
    within what memory_limit_mb leaves (every spare maps the files: they count per spare)."""
    return max(0, min(available // 2, room // max(1, spares)))
