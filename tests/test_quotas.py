"""Callers and their limits without a process (issue 17): JWT checks, the windows of
pool_manager/quotas.py on a fake clock, and the accounting of tickets."""

from __future__ import annotations

import base64
import json

import pytest

from model_service.auth import Role
from model_service.contract import EndEvent
from pool_manager.config import Limits
from pool_manager.identity import Caller, JwtError, sign_jwt, verify_jwt
from pool_manager.quotas import Quotas, RateLimited, duration

SECRET = "jwt-secret-for-tests-7f1e"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- JWT ------------------------------------------------------------------------------------


def test_a_valid_token_names_its_user_and_role() -> None:
    token = sign_jwt({"sub": "bob", "role": "admin", "exp": NOW + 60}, SECRET)
    claims = verify_jwt(token, SECRET, now=NOW)
    assert (claims.subject, claims.role) == ("bob", Role.ADMIN)
    plain = sign_jwt({"sub": "carol", "exp": NOW + 60}, SECRET)
    assert verify_jwt(plain, SECRET, now=NOW).role is Role.CLIENT


def test_a_tokens_limits_claim_sets_the_users_limits() -> None:
    claims = {"sub": "bob", "exp": NOW + 60, "limits": {"requests_per_hour": 7}}
    verified = verify_jwt(sign_jwt(claims, SECRET), SECRET, now=NOW)
    assert verified.limits is not None and verified.limits.requests_per_hour == 7
    assert (
        verify_jwt(sign_jwt({"sub": "bob", "exp": NOW + 60}, SECRET), SECRET, now=NOW).limits
        is None
    )


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"sub": "bob", "exp": NOW - 120}, "expired"),
        ({"sub": "bob"}, "no 'exp'"),
        ({"exp": NOW + 60}, "no 'sub'"),
        ({"sub": "bob", "exp": NOW + 60, "nbf": NOW + 600}, "not valid yet"),
        ({"sub": "bob", "exp": NOW + 60, "role": "root"}, "'role'"),
        ({"sub": "bob", "exp": NOW + 60, "limits": {"requests_per_hour": -1}}, "'limits'"),
        ({"sub": "bob", "exp": NOW + 60, "limits": {"per_day": 5}}, "'limits'"),
    ],
)
def test_a_token_with_wrong_claims_is_refused(claims: dict[str, object], why: str) -> None:
    with pytest.raises(JwtError, match=why):
        verify_jwt(sign_jwt(claims, SECRET), SECRET, now=NOW)


def test_a_token_signed_otherwise_is_refused() -> None:
    token = sign_jwt({"sub": "bob", "exp": NOW + 60}, "another secret")
    with pytest.raises(JwtError, match="signature"):
        verify_jwt(token, SECRET, now=NOW)
    # alg "none" with no signature: the classic forgery.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps({"sub": "x", "exp": NOW + 60}).encode())
    forged = f"{header.decode()}.{body.rstrip(b'=').decode()}."
    with pytest.raises(JwtError, match="HS256"):
        verify_jwt(forged, SECRET, now=NOW)
    with pytest.raises(JwtError, match="three parts"):
        verify_jwt("a.b", SECRET, now=NOW)


# --- windows ----------------------------------------------------------------------------------


def caller(**limits: object) -> Caller:
    return Caller("key:t", Role.CLIENT, Limits.model_validate(limits))


def test_requests_per_hour_slide_and_say_when_to_retry() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    who = caller(requests_per_hour=3)
    grants = []
    for step in range(3):
        grants.append(quotas.admit(who, "m"))
        clock.now += 10 * (step + 1)  # admitted at 1000, 1010, 1030
    assert grants[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert grants[2].headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = 1100.0
    with pytest.raises(RateLimited) as refused:
        quotas.admit(who, "m")
    assert refused.value.status == 429 and refused.value.error_type == "requests"
    assert refused.value.retry_after == pytest.approx(1000 + 3600 - 1100)
    assert refused.value.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = 1000 + 3600 + 0.5  # the first one has left the window
    assert quotas.admit(who, "m").headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited):
        quotas.admit(who, "m")


def test_tokens_per_minute_count_after_the_fact() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    who = caller(tokens_per_minute=100)
    quotas.admit(who, "m").release()
    quotas.charge_tokens(who, "m", 70)
    clock.now += 20
    quotas.admit(who, "m").release()  # 70 < 100: admitted
    quotas.charge_tokens(who, "m", 50)  # 120 in the minute now
    clock.now += 5
    with pytest.raises(RateLimited) as refused:
        quotas.admit(who, "m")
    assert refused.value.error_type == "tokens"
    # Under 100 again once the 70 leave: 60 s after they were counted.
    assert refused.value.retry_after == pytest.approx(60 - 25)
    clock.now += 35.01
    quotas.admit(who, "m")


def test_concurrent_requests_free_their_slot_when_released() -> None:
    quotas = Quotas(Clock())
    who = caller(concurrent_requests=2)
    first, second = quotas.admit(who, "m"), quotas.admit(who, "m")
    with pytest.raises(RateLimited) as refused:
        quotas.admit(who, "m")
    assert refused.value.error_type == "concurrent_requests"
    first.release()
    first.release()  # twice is once
    third = quotas.admit(who, "m")
    with pytest.raises(RateLimited):
        quotas.admit(who, "m")
    second.release()
    third.release()


def test_a_model_limit_applies_on_top_of_the_callers() -> None:
    quotas = Quotas(Clock())
    who = caller(requests_per_hour=10, models={"big": {"requests_per_hour": 1}})
    quotas.admit(who, "big")
    with pytest.raises(RateLimited, match="for model 'big'"):
        quotas.admit(who, "big")
    for _ in range(9):  # the caller's own 10 an hour: 1 used by "big"
        quotas.admit(who, "small")
    with pytest.raises(RateLimited) as refused:
        quotas.admit(who, "small")
    assert "for model" not in refused.value.message


def test_a_refused_request_counts_nothing_and_no_limits_means_none() -> None:
    quotas = Quotas(Clock())
    who = caller(requests_per_hour=1, models={"m": {"requests_per_hour": 0}})
    with pytest.raises(RateLimited):
        quotas.admit(who, "m")  # the model's 0 refuses; the caller's 1 stays unused
    quotas.admit(who, "other")
    unlimited = Caller("env:client", Role.CLIENT)
    for _ in range(1000):
        assert quotas.admit(unlimited, "m").headers == {}


def test_reset_durations_are_written_as_openai_does() -> None:
    assert duration(0.12) == "120ms"
    assert duration(6) == "6s"
    assert duration(360) == "6m0s"
    assert duration(3599.2) == "1h0m0s"


# --- accounting ----------------------------------------------------------------------------


class FakeLedger:
    """Stands in for pool_manager.store.Ledger's `book` (the store has its own tests)."""

    def __init__(self) -> None:
        self.rows: list[object] = []

    def book(self, row: object) -> None:
        self.rows.append(row)


def test_every_ticket_is_booked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from pool_manager import usage

    ledger = FakeLedger()
    quotas = Quotas(Clock())
    accounting = usage.Accounting(ledger, quotas, usage.UsageMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    who = caller(concurrent_requests=5)
    reported = accounting.open(who, "m", quotas.admit(who, "m"))
    accounting.close(reported)
    accounting.worker_reported(
        "m", EndEvent(ticket=reported, status=200, prompt_tokens=7, completion_tokens=3)
    )
    failed = accounting.open(who, "m", quotas.admit(who, "m"))
    accounting.close(failed, failed=True)  # answered by the manager: booked at once
    vanished = accounting.open(who, "m", quotas.admit(who, "m"))
    accounting.close(vanished)  # its worker died mid-stream: no report ever comes
    accounting.worker_reported("m", EndEvent(ticket=None, status=200, prompt_tokens=2))
    assert len(ledger.rows) == 3
    clock = [10_000.0]
    monkeypatch.setattr(usage.time, "monotonic", lambda: clock[0] + 1e9)
    accounting.sweep()
    assert accounting.open_tickets == 0
    rows = ledger.rows
    assert len(rows) == 4, "the vanished request is booked as an error at the sweep"
    callers = [(r.caller, r.requests, r.errors, r.prompt_tokens) for r in rows]  # type: ignore[attr-defined]
    assert callers == [
        ("key:t", 1, 0, 7),
        ("key:t", 1, 1, 0),
        ("worker-port", 1, 0, 2),
        ("key:t", 1, 1, 0),
    ]
