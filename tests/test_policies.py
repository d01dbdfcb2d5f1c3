"""The pool's policies on their own (pool_manager/policies.py): no process, no clock."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pool_manager.policies import (
    MB,
    ColdModel,
    CoreShare,
    Demand,
    Expiring,
    Resident,
    affinity_key,
    choose_preload,
    choose_replica,
    choose_victim,
    expire,
    keep_value,
    reload_seconds,
    replicas_wanted,
    split_preload,
)


def test_demand_weighs_frequency_and_recency() -> None:
    """Ten requests five minutes ago outrank one a minute ago; an hour of silence lets the
    ten fade below a fresh one."""
    busy_then, once_lately = Demand(), Demand()
    for _ in range(10):
        busy_then.add(0.0)
    once_lately.add(240.0)
    assert busy_then.value(300.0) > once_lately.value(300.0) > 0
    assert busy_then.value(300.0) < 10.0, "it fades"
    assert math.isclose(busy_then.value(600.0), 5.0), "half of it after one half-life"
    fresh = Demand()
    fresh.add(4000.0)
    assert fresh.value(4000.0) > busy_then.value(4000.0)
    assert Demand().value(1e9) == 0.0


def _resident(
    model_id: str, demand: float, last_used: float, reload: float = 0.2, mb: int = 200
) -> Resident:
    return Resident(model_id, demand, last_used, reload, mb * MB)


def test_with_no_demand_anywhere_eviction_is_least_recently_used() -> None:
    idle = [_resident("a", 0, 30.0), _resident("b", 0, 10.0), _resident("c", 0, 20.0)]
    for short_of_memory in (False, True):
        victim = choose_victim(idle, short_of_memory=short_of_memory)
        assert victim is not None and victim.model_id == "b"
    assert choose_victim([], short_of_memory=False) is None


def test_a_popular_model_outlives_a_more_recent_one_asked_for_once() -> None:
    """Where LRU would evict the popular model (used a little earlier), the demand keeps it."""
    popular = _resident("popular", demand=12.0, last_used=10.0)
    once = _resident("once", demand=1.0, last_used=20.0)
    victim = choose_victim([popular, once], short_of_memory=False)
    assert victim is not None and victim.model_id == "once"


def test_a_model_costly_to_reload_is_kept_over_a_cheap_one_asked_for_as_often() -> None:
    costly = _resident("costly", demand=3.0, last_used=10.0, reload=4.0)
    cheap = _resident("cheap", demand=3.0, last_used=20.0, reload=0.1)
    victim = choose_victim([costly, cheap], short_of_memory=False)
    assert victim is not None and victim.model_id == "cheap"


def test_size_counts_only_when_memory_is_short() -> None:
    """Same demand and reload cost: for a free place any one will do (the least recently
    used goes); for memory, the big one frees more per unit of value lost."""
    big = _resident("big", demand=2.0, last_used=20.0, mb=4000)
    small = _resident("small", demand=2.0, last_used=10.0, mb=100)
    by_count = choose_victim([big, small], short_of_memory=False)
    by_memory = choose_victim([big, small], short_of_memory=True)
    assert by_count is not None and by_count.model_id == "small"
    assert by_memory is not None and by_memory.model_id == "big"
    assert keep_value(big, short_of_memory=True) < keep_value(small, short_of_memory=True)


def test_reload_cost_is_the_last_load_or_a_guess_from_the_size() -> None:
    assert reload_seconds(1.5, 100 * MB) == 1.5
    assert reload_seconds(0.0, 100 * MB) > 0, "a floor: a free reload would never be kept"
    assert reload_seconds(None, 4096 * MB) > reload_seconds(None, 100 * MB) > 0


def _cold(
    model_id: str, demand: float, last_used: float, path: str = "", mb: int = 100
) -> ColdModel:
    return ColdModel(model_id, path or f"/m/{model_id}.gguf", mb * MB, demand, last_used)


def test_preload_takes_the_most_in_demand_then_the_most_recent_then_registry_order() -> None:
    cold = [
        _cold("never-a", 0, 0.0),
        _cold("recent", 0, 50.0),
        _cold("popular", 5.0, 10.0),
        _cold("never-b", 0, 0.0),
    ]
    chosen = choose_preload(cold, count=3, budget_bytes=10**12)
    assert list(chosen) == ["popular", "recent", "never-a"]
    assert chosen["popular"] == "/m/popular.gguf"
    assert choose_preload(cold, count=0, budget_bytes=10**12) == {}


def test_preload_keeps_within_the_budget_and_counts_a_shared_file_once() -> None:
    cold = [
        _cold("first", 3.0, 0.0, path="/m/shared.gguf", mb=300),
        _cold("alias", 2.0, 0.0, path="/m/shared.gguf", mb=300),
        _cold("huge", 1.0, 0.0, mb=900),
        _cold("small", 0.5, 0.0, mb=100),
    ]
    chosen = choose_preload(cold, count=4, budget_bytes=450 * MB)
    # The shared file counts once; the huge one does not fit, the small one after it does.
    assert list(chosen) == ["first", "alias", "small"]


def test_expiry_cools_past_ttl_unloads_past_grace_and_says_when_to_look_again() -> None:
    now = 1000.0
    models = [
        Expiring("fresh", cooling=False, ttl_deadline=now + 30, cooling_deadline=None),
        Expiring("expired", cooling=False, ttl_deadline=now - 1, cooling_deadline=None),
        Expiring("cooling", cooling=True, ttl_deadline=None, cooling_deadline=now + 5),
        Expiring("done", cooling=True, ttl_deadline=None, cooling_deadline=now - 0.1),
        Expiring("no-deadline", cooling=False, ttl_deadline=None, cooling_deadline=None),
    ]
    expiry = expire(models, now, grace_seconds=10)
    assert expiry.cool == ["expired"]
    assert expiry.unload == ["done"]
    assert expiry.next_due == 5, "the cooling model's grace ends first"


def test_expiry_with_no_grace_unloads_in_the_same_pass() -> None:
    models = [Expiring("m", cooling=False, ttl_deadline=9.0, cooling_deadline=None)]
    expiry = expire(models, now=10.0, grace_seconds=0)
    assert expiry.cool == ["m"] and expiry.unload == ["m"]
    assert expire([], now=10.0, grace_seconds=0).next_due == math.inf


def test_a_worker_left_alone_gets_the_cores_back_only_once_the_others_stay_quiet() -> None:
    share = CoreShare(grow_after=2.0)
    assert share.threads(1, 2, now=0.0) == (2, None), "alone on an idle machine: both cores"
    assert share.threads(2, 2, now=1.0) == (1, None), "two busy: one core each, at once"
    threads, recheck = share.threads(1, 2, now=1.5)
    assert threads == 1 and recheck == 2.0, "between two of the other's requests: still one"
    assert share.threads(2, 2, now=2.0) == (1, None)
    assert share.threads(1, 2, now=2.5) == (1, 2.0)
    assert share.threads(0, 2, now=3.0) == (1, 1.5)
    assert share.threads(1, 2, now=4.5) == (2, None), "quiet for 2 s: both cores again"
    assert share.threads(3, 8, now=5.0) == (2, None), "8 cores among 3: 2 threads each"
    assert share.threads(9, 8, now=6.0) == (1, None), "never fewer than 1"


def test_spares_split_the_files_to_load_ahead_each_keeping_what_it_has() -> None:
    paths = ["/m/a", "/m/b", "/m/c", "/m/d"]
    assert split_preload(paths, [set(), set()]) == [["/m/a", "/m/c"], ["/m/b", "/m/d"]]
    # A spare back from serving /m/c keeps it; what nobody holds goes to the emptier.
    assert split_preload(paths, [{"/m/x"}, {"/m/c"}]) == [["/m/a", "/m/d"], ["/m/b", "/m/c"]]
    assert split_preload(paths, [{"/m/b"}]) == [paths], "one spare: all of them"
    assert split_preload(paths, []) == []


# --- replicas -----------------------------------------------------------------------------


def test_a_prompt_prefix_goes_to_the_same_replica_and_others_spread() -> None:
    names = [("10.0.0.1:8051", 0), ("10.0.0.2:8051", 0), ("10.0.0.3:8051", 0)]
    key = affinity_key(b'{"model": "m", "messages": [{"role": "system", "content": "You are A"}]}')
    chosen = {choose_replica(key, names) for _ in range(5)}
    assert len(chosen) == 1, "one prefix, one replica"
    spread = Counter(
        choose_replica(affinity_key(f'{{"messages": "conversation {i}"}}'.encode()), names)
        for i in range(300)
    )
    assert set(spread) == {0, 1, 2} and min(spread.values()) > 50, spread


def test_a_replica_past_its_load_bound_passes_the_prefix_on() -> None:
    key = affinity_key(b'{"messages": [{"role": "user", "content": "same prefix"}]}')
    idle = [("a:1", 0), ("b:1", 0)]
    home = choose_replica(key, idle)
    # 1.25 x the mean load (this request counted): 4 on one and 0 on the other is past it.
    busy = [(name, 4 if index == home else 0) for index, (name, _) in enumerate(idle)]
    assert choose_replica(key, busy) != home
    within = [(name, 1 if index == home else 0) for index, (name, _) in enumerate(idle)]
    assert choose_replica(key, within) == home, "a little busier still keeps its prefix"


def test_removing_a_replica_moves_only_its_own_keys() -> None:
    three = [("a:1", 0), ("b:1", 0), ("c:1", 0)]
    keys = [f'{{"messages": "k{i}"}}'.encode() for i in range(200)]
    before = {k: three[choose_replica(k, three)][0] for k in keys}
    two = [("a:1", 0), ("c:1", 0)]
    after = {k: two[choose_replica(k, two)][0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "b:1" for k in moved)


def test_the_conversation_is_the_key_whatever_comes_before_it() -> None:
    one = affinity_key(b'{"model": "m", "stream": true, "messages": [{"content": "hi"}]}')
    two = affinity_key(b'{"messages": [{"content": "hi"}], "model": "m"}')
    assert one.startswith(b'"messages": [{"content": "hi"}]') and two.startswith(one[:30])
    assert affinity_key(b'{"model": "m", "input": "text"}').startswith(b'"input"')


@pytest.mark.parametrize(
    ("current", "minimum", "maximum", "in_flight", "slots", "wanted"),
    [
        (1, 1, 3, 4, 4, 1),  # every request has a slot: no more
        (1, 1, 3, 5, 4, 2),  # one waits: one more
        (3, 1, 3, 99, 4, 3),  # at the maximum
        (1, 2, 2, 0, 4, 2),  # below the minimum (a replica died): back to it
        (2, 1, 3, 1, 4, 2),  # fewer is the reaper's call (idle for a while), not this
    ],
)
def test_replicas_wanted_grow_on_queued_requests(
    current: int, minimum: int, maximum: int, in_flight: int, slots: int, wanted: int
) -> None:
    assert replicas_wanted(current, minimum, maximum, in_flight, slots) == wanted
