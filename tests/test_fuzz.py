"""Fuzz both HTTP APIs with schemathesis: no 5xx, no hang, every 4xx in OpenAI's shape.

Each test starts its own manager (the `start_manager` harness: real processes, the real
model) and loads an OpenAPI schema over HTTP from the running server: the worker's
`/openapi.json` in one test, the manager's in the other. Separate managers keep the worker
test independent of the manager test, which unloads and deletes models.

For every operation, the test sends schemathesis's coverage cases (boundary values,
missing and wrong-typed fields, unexpected methods), then hypothesis-generated cases,
valid and invalid, from `operation.as_strategy()`. Each operation is a subtest, so one
failing operation does not hide the others.

Random strings never name a real model, so generation is steered: part of the cases use
a registered model id (in the manager's paths and registrations, in the worker's `model`
field), so that loads, unloads and real generations are fuzzed too.

The run is bounded (about 20 s on an idle 2-core machine, longer when it is busy):
- the worker's model has `n_ctx=512` and a registry default `max_tokens`, and a fuzzed
  `max_tokens` the model would accept is capped at `MAX_FUZZ_TOKENS`; values it must
  refuse (0, above the context, wrong types) are sent as they are;
- every request has a timeout; one that takes longer, or a stream that never ends, is a
  hang and fails the test;
- hypothesis is derandomized, with a fixed seed, no example database and no shrinking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode, HookContext, Response
from schemathesis.checks import not_a_server_error

from tests.conftest import DEFAULT_MODEL, Manager, ManagerFactory, model_entry, pid_alive

COLD_MODEL = "fuzz/cold:1b"
N_CTX = 512
MAX_FUZZ_TOKENS = 8
REQUEST_TIMEOUT = 45.0  # seconds; a request that takes longer is a hang
WORKER_TIMEOUT = 40.0  # the worker's own per-request limit (timeout_seconds), below ours
# Generated cases per operation and generation mode (valid, invalid). Worker cases may
# generate text, so fewer; manager cases take milliseconds.
WORKER_EXAMPLES = 10
MANAGER_EXAMPLES = 40
COVERAGE_STRIDE = 8  # the worker: every 8th valid coverage case names the real model
SEED = 20_240_601

FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: every step is a real request
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# The fuzzed manager has an admin key, and every case carries it: a generated POST /keys
# that makes the first named key closes an open manager to key-less callers (as it
# should), which would leave the rest of the run, and its checks, locked out. Workers
# of a manager with only an admin key are open, so the header changes nothing there.
FUZZ_ADMIN_KEY = "fuzz-admin-key-" + "7" * 16
FUZZ_KEY = {"X-API-Key": FUZZ_ADMIN_KEY}


def load_schema(url: str) -> BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": REQUEST_TIMEOUT,
            "max-stream-events": 100_000,  # read every stream to its end (or the timeout)
            "generation": {"deterministic": True, "database": "none"},
            "output": {"sanitization": {"enabled": False}},
            # No literals mined from the Python source in this folder: generation must not
            # change when someone edits the code. The steering below names real models.
            "analysis": {"constants": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(url, config=config, timeout=10)


# --- the checks -------------------------------------------------------------------------


def call_and_check(case: Case) -> None:
    """Send `case`; fail on a 5xx, a hang, a 4xx not in OpenAI's shape, a broken stream."""
    started = time.monotonic()
    try:
        response = case.call(timeout=REQUEST_TIMEOUT, headers=dict(FUZZ_KEY))
    except Exception as exc:  # a timeout, or the server dropped the connection
        raise AssertionError(
            f"{case.method} {case.formatted_path}: no reply ({type(exc).__name__}: {exc})\n"
            f"reproduce: {case.as_curl_command()}"
        ) from exc
    elapsed = time.monotonic() - started
    context = (
        f"{case.method} {case.formatted_path} -> {response.status_code} after {elapsed:.1f} s\n"
        f"reproduce: {case.as_curl_command()}\nresponse: {response.content[:600]!r}"
    )
    assert not response.stream_cut_short, f"the event stream did not end (a hang)\n{context}"
    assert elapsed < REQUEST_TIMEOUT, f"the request hung\n{context}"
    if response.status_code in (429, 503, 504) and _capacity_refusal(response):
        # A documented "not now" (full, busy, too slow on a loaded machine), in OpenAI's
        # shape with its code: an answer, not a server bug.
        assert_openai_error(response, context)
        return
    try:
        case.validate_response(response, checks=[not_a_server_error])
    except BaseExceptionGroup:  # schemathesis's FailureGroup
        raise AssertionError(f"a server error\n{context}") from None
    if 400 <= response.status_code < 500:
        assert_openai_error(response, context)
    elif response.status_code == 200 and is_event_stream(response):
        assert_stream_completed(response, context)


CAPACITY_CODES = frozenset(
    {
        "pool_full",
        "insufficient_memory",
        "model_load_failed",
        "model_overloaded",
        "timeout",
        "model_unloading",
        "shutting_down",
    }
)


def _capacity_refusal(response: Response) -> bool:
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code in CAPACITY_CODES


def assert_openai_error(response: Response, context: str) -> None:
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a 4xx body that is not JSON\n{context}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI's error shape\n{context}"
    error = body["error"]
    assert isinstance(error, dict), f"'error' is not an object\n{context}"
    assert {"message", "type", "param", "code"} <= set(error), f"error fields missing\n{context}"
    assert isinstance(error["message"], str) and error["message"], f"bad message\n{context}"
    assert isinstance(error["type"], str) and error["type"], f"bad type\n{context}"
    assert error["param"] is None or isinstance(error["param"], str), f"bad param\n{context}"
    assert error["code"] is None or isinstance(error["code"], str), f"bad code\n{context}"


def is_event_stream(response: Response) -> bool:
    return any(v.startswith("text/event-stream") for v in response.headers.get("content-type", []))


def assert_stream_completed(response: Response, context: str) -> None:
    """A 200 stream ends with `[DONE]` and carries no error event (a 5xx in disguise)."""
    events = [
        line.removeprefix(b"data:").strip()
        for line in response.content.splitlines()
        if line.startswith(b"data:")
    ]
    assert events and events[-1] == b"[DONE]", f"the stream did not end with [DONE]\n{context}"
    for event in events[:-1]:
        assert b'"error"' not in event, f"the stream carried an error event\n{context}"


# --- steering: real model ids, bounded generations -----------------------------------------

# steer(case, pick): with `pick` None the case stays as generated; an int picks real values.
Steer = Callable[[Case, int | None], Case]


def steer_worker(case: Case, pick: int | None) -> Case:
    """Name the served model in the body; cap the tokens of limits the model accepts.

    Containers are replaced, never edited: schemathesis may share them between cases.
    """
    body = case.body
    if isinstance(body, dict):
        changes: dict[str, Any] = {}
        if pick is not None and isinstance(body.get("model"), str):
            changes["model"] = DEFAULT_MODEL
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if type(value) is int and MAX_FUZZ_TOKENS < value <= N_CTX:
                changes[name] = MAX_FUZZ_TOKENS
        if changes:
            case.body = {**body, **changes}
    return case


MANAGER_IDS = [DEFAULT_MODEL, COLD_MODEL, "not-registered:1b"]


# PATCH /config: real keys with plausible values, most of the right type (host, port and
# graceful_shutdown_seconds are left alone: they act at the next start, or at the stop).
_NUMBER = st.one_of(st.integers(0, 100_000), st.floats(0, 1e6))
_CONFIG_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "default_ttl_minutes": _NUMBER,
    "min_ttl_minutes": _NUMBER,
    "max_ttl_minutes": _NUMBER,
    "check_interval_seconds": _NUMBER,
    "grace_period_seconds": _NUMBER,
    "failure_cooldown_seconds": _NUMBER,
    "max_concurrent_models": st.integers(0, 10),
    "max_load_failures": st.integers(0, 10),
    "memory_limit_mb": st.integers(0, 100_000),
    "max_request_bytes": st.integers(0, 10**8),
    "auto_unload": st.booleans(),
    "log_level": st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "verbose"]),
    "warmup_models": st.lists(st.sampled_from(MANAGER_IDS), max_size=2),
    "port_range": st.fixed_dictionaries(
        {}, optional={"start": st.integers(0, 70_000), "end": st.integers(0, 70_000)}
    ),
}
_ANY_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
)
CONFIG_CHANGES = st.lists(
    st.sampled_from(sorted(_CONFIG_FIELDS)).flatmap(
        lambda key: st.tuples(st.just(key), st.one_of(*[_CONFIG_FIELDS[key]] * 3, _ANY_JSON))
    ),
    min_size=1,
    max_size=3,
).map(dict)


def steer_manager(case: Case, pick: int | None) -> Case:
    """Put a known model id in the path, or in the body of a registration."""
    if pick is None:
        return case
    model_id = MANAGER_IDS[pick % len(MANAGER_IDS)]
    if case.path_parameters and isinstance(case.path_parameters.get("model_id"), str):
        case.path_parameters = {**case.path_parameters, "model_id": model_id}
    elif isinstance(case.body, dict) and isinstance(case.body.get("model_id"), str):
        case.body = {**case.body, "model_id": model_id}
    return case


def with_body(case: Case, body: dict[str, Any]) -> Case:
    case.body = body
    return case


def install_steering(schema: BaseSchema, steer: Steer) -> None:
    """Steer 3 in 4 generated cases: known ids (`pick`), real keys for PATCH /config."""
    picks: list[int | None] = [0, 1, 2, None]

    @schema.hook("flatmap_case")
    def _steer(context: HookContext, case: Case) -> st.SearchStrategy[Case]:
        if case.method == "PATCH" and case.path == "/config" and isinstance(case.body, dict):
            changes = CONFIG_CHANGES.map(lambda body: with_body(case, body))
            return st.one_of(st.just(case), changes, changes, changes)
        return st.sampled_from(picks).map(lambda pick: steer(case, pick))


# --- the fuzzing loop ---------------------------------------------------------------------


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    sent: int = 0

    def run(self, case: Case) -> None:
        self.sent += 1
        try:
            call_and_check(case)
        except AssertionError as exc:
            self.failures.append(str(exc))

    def summary(self) -> str:
        """Distinct failures (the first line and the response tell them apart), with counts."""
        distinct: dict[str, list[str]] = {}
        for failure in self.failures:
            lines = failure.splitlines()
            key = "\n".join([lines[0], *(ln for ln in lines if ln.startswith("response:"))])
            distinct.setdefault(key, []).append(failure)
        return "\n\n".join(
            f"[{len(same)}x] {same[0]}" for same in sorted(distinct.values(), key=len, reverse=True)
        )


@dataclass
class Plan:
    steer: Steer
    stride: int  # every `stride`-th valid coverage case is steered
    max_examples: int


def fuzz_operation(schema: BaseSchema, operation: APIOperation, plan: Plan) -> None:
    report = Report()
    # 1. schemathesis's coverage cases, in order; every `stride`-th valid one is steered.
    positives = 0
    for case in schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=schema.config.generation,
    ):
        pick = None
        if case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE:
            if positives % plan.stride == 0:
                pick = positives // plan.stride
            positives += 1
        report.run(plan.steer(case, pick))
    # 2. generated cases, valid then invalid (when the operation has anything to break).
    for mode in GenerationMode:

        @settings(FUZZ_SETTINGS, max_examples=plan.max_examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def generated(case: Case) -> None:
            report.run(case)

        try:
            generated()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid input"
    if report.failures:
        pytest.fail(
            f"{operation.label}: {len(report.failures)} of {report.sent} requests failed\n\n"
            + report.summary(),
            pytrace=False,
        )


def run_order(operation: APIOperation) -> int:
    """Unloads, then config changes, then deletes: the other operations find models first."""
    if operation.method.upper() == "DELETE":
        return 3
    if operation.path in ("/config", "/metrics"):
        return 2
    return 1 if operation.path.endswith("/unload") else 0


def fuzz_schema(schema: BaseSchema, subtests: pytest.Subtests, plan: Plan) -> None:
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=run_order)
    assert operations, "the schema has no operations"
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz_operation(schema, operation, plan)


# --- fixtures -----------------------------------------------------------------------------


def remember_pids(manager: Manager, response: Response) -> None:
    """Note every worker pid the manager reports, so the harness checks that all exit."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return
    views = body.get("models", [body]) if isinstance(body, dict) else []
    for view in views:
        if isinstance(view, dict) and isinstance(view.get("pid"), int):
            manager.seen_worker_pids.add(view["pid"])


@pytest.fixture
def fuzz_worker(start_manager: ManagerFactory) -> Iterator[tuple[Manager, BaseSchema]]:
    entry = model_entry(
        DEFAULT_MODEL,
        warmup=True,
        n_ctx=N_CTX,
        timeout_seconds=WORKER_TIMEOUT,
        defaults={"max_tokens": MAX_FUZZ_TOKENS},
    )
    manager = start_manager(models=[entry])
    model = manager.wait_state(DEFAULT_MODEL, "HOT")
    schema = load_schema(f"{model['endpoint']}/openapi.json")
    install_steering(schema, steer_worker)
    yield manager, schema
    # The fuzzing did not kill the worker: the same process, still HOT, no crash.
    after = manager.model(DEFAULT_MODEL)
    assert after["state"] == "HOT" and after["pid"] == model["pid"], after
    assert after["crashes"] == 0, after


@pytest.fixture
def fuzz_manager(start_manager: ManagerFactory) -> Iterator[tuple[Manager, BaseSchema]]:
    manager = start_manager(
        models=[
            model_entry(DEFAULT_MODEL, warmup=True, n_ctx=N_CTX),
            model_entry(COLD_MODEL, n_ctx=N_CTX),
        ],
        env={"POOL_ADMIN_KEY": FUZZ_ADMIN_KEY},
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    schema = load_schema(f"{manager.url}/openapi.json")
    install_steering(schema, steer_manager)

    @schema.hook("after_call")
    def _pids(context: HookContext, case: Case, response: Response) -> None:
        remember_pids(manager, response)

    yield manager, schema
    # The manager survived the fuzzing: still running, still answering.
    assert manager.process is not None and manager.process.poll() is None, manager.log()
    assert manager.request("GET", "/health", timeout=10).status_code == 200
    listed = {m["pid"] for m in manager.models().values()}
    # An unloaded model's worker may be a spare now (drained workers go back to them).
    listed |= set(manager.request("GET", "/health").json()["spare_pids"])
    stray = [p for p in manager.seen_worker_pids if pid_alive(p) and p not in listed]
    assert not stray, f"workers the manager no longer lists are still running: {stray}"


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fuzz_worker_api(
    fuzz_worker: tuple[Manager, BaseSchema], subtests: pytest.Subtests
) -> None:
    fuzz_schema(fuzz_worker[1], subtests, Plan(steer_worker, COVERAGE_STRIDE, WORKER_EXAMPLES))


@pytest.mark.timeout(300)
def test_fuzz_manager_api(
    fuzz_manager: tuple[Manager, BaseSchema], subtests: pytest.Subtests
) -> None:
    fuzz_schema(fuzz_manager[1], subtests, Plan(steer_manager, 1, MANAGER_EXAMPLES))
