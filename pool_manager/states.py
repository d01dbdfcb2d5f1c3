"""Model states and the transitions allowed between them, written down once as data.

`docs/ARCHITECTURE.md` carries a diagram of TRANSITIONS; a test checks that the two agree.
"""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    COLD = "COLD"  # registered, no process
    WARMING = "WARMING"  # worker starting, weights loading
    HOT = "HOT"  # serving
    COOLING = "COOLING"  # TTL ran out; grace period, still serving
    UNLOADING = "UNLOADING"  # draining in-flight requests, then stopping
    FAILED = "FAILED"  # loading kept failing; retried after a cooldown


S = ModelState

# (from, to) -> why this edge exists.
TRANSITIONS: dict[tuple[ModelState, ModelState], str] = {
    (S.COLD, S.WARMING): "load requested",
    (S.WARMING, S.HOT): "worker ready",
    (S.WARMING, S.COLD): "load failed",
    (S.WARMING, S.FAILED): "load failed too often",
    (S.HOT, S.COOLING): "TTL expired",
    (S.HOT, S.UNLOADING): "unload or eviction",
    (S.HOT, S.COLD): "worker died",
    (S.HOT, S.FAILED): "worker keeps dying",
    (S.COOLING, S.HOT): "request during grace period",
    (S.COOLING, S.UNLOADING): "grace period over",
    (S.COOLING, S.COLD): "worker died",
    (S.COOLING, S.FAILED): "worker keeps dying",
    (S.UNLOADING, S.COLD): "worker stopped",
    (S.FAILED, S.WARMING): "retry",
    (S.FAILED, S.COLD): "reset by an operator's unload",
}

# States in which a model holds a worker process (and counts against the pool's limits).
OCCUPYING = frozenset({S.WARMING, S.HOT, S.COOLING, S.UNLOADING})
SERVING = frozenset({S.HOT, S.COOLING})


class InvalidTransition(RuntimeError):
    def __init__(self, model_id: str, old: ModelState, new: ModelState) -> None:
        super().__init__(f"{model_id}: {old} -> {new} is not an allowed transition")


def check_transition(model_id: str, old: ModelState, new: ModelState) -> None:
    """Raise InvalidTransition unless old -> new is in TRANSITIONS."""
    if (old, new) not in TRANSITIONS:
        raise InvalidTransition(model_id, old, new)


def mermaid_diagram() -> str:
    """The state diagram as Mermaid, generated from TRANSITIONS."""
    lines = ["stateDiagram-v2", "    [*] --> COLD"]
    lines += [f"    {a} --> {b}: {why}" for (a, b), why in TRANSITIONS.items()]
    return "\n".join(lines)
