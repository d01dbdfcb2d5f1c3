"""`poolctl`: operate a running pool manager over its REST API.

The key comes from the environment: POOL_ADMIN_KEY, else POOL_API_KEY, sent as
`Authorization: Bearer`. Exit codes: 0 ok, 1 the manager refused or is not healthy,
2 bad usage, 3 the manager cannot be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8050"
EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
READ_TIMEOUT = 30.0
SLOW_TIMEOUT = 900.0  # load, unload and rm wait for the worker
HOLDING_WORKER = ("WARMING", "HOT", "COOLING", "UNLOADING")


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- talking to the manager -------------------------------------------------------------


class Client:
    """A thin REST client for the manager; raises CliError on any failure."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(READ_TIMEOUT, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        slow: bool = False,
    ) -> Any:
        """Send one request and return its JSON reply."""
        timeout = httpx.Timeout(SLOW_TIMEOUT if slow else READ_TIMEOUT, connect=5.0)
        try:
            reply = self._http.request(
                method,
                f"{self.url}{path}",
                json=body,
                params=params,
                timeout=timeout,
            )
        except httpx.ConnectError as exc:
            reason = "connection refused" if _refused(exc) else (str(exc) or type(exc).__name__)
            raise CliError(
                f"cannot reach the pool manager at {self.url}: {reason}", EXIT_UNREACHABLE
            ) from exc
        except httpx.TimeoutException as exc:
            raise CliError(
                f"the pool manager at {self.url} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise CliError(f"request to {self.url} failed: {exc}") from exc
        if reply.status_code >= 400:
            raise CliError(_http_error_line(reply))
        try:
            return reply.json()
        except ValueError as exc:
            raise CliError(f"the pool manager sent a reply that is not JSON ({path})") from exc


def _refused(exc: BaseException) -> bool:
    """Whether a connect error was (somewhere down its causes) ECONNREFUSED."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        if "refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _http_error_line(reply: httpx.Response) -> str:
    """The OpenAI-shaped error as one line: message (HTTP status code), plus hints."""
    message = reply.reason_phrase or "error"
    code: str | None = None
    try:
        error = reply.json().get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    status = f"HTTP {reply.status_code}" + (f" {code}" if code else "")
    line = f"{message.strip()} ({status})"
    if reply.status_code == 401:
        line += "; set POOL_ADMIN_KEY (or POOL_API_KEY) to the manager's key"
    elif reply.status_code == 403:
        line += "; set POOL_ADMIN_KEY to the manager's admin key"
    retry_after = reply.headers.get("Retry-After")
    if retry_after:
        line += f"; retry after {retry_after} s"
    return " ".join(line.split())


def model_path(model_id: str, suffix: str = "") -> str:
    """The REST path of a model; ids with ':' and '/' go in as they are."""
    return f"/models/{model_id}{suffix}"


# --- formatting ---------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """4m12s, 45s, 1h02m, 2d03h."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def short_duration(seconds: float) -> str:
    """Like human_duration, without zero seconds: 15m, 1h30m, 4m12s."""
    text = human_duration(seconds)
    return text[:-3] if len(text) > 3 and text.endswith(("00s", "00m", "00h")) else text


def ttl_left(model: dict[str, Any]) -> str:
    """The TTL column of `ps`: time left, pinned, cooling, or a dash."""
    state = model.get("state")
    if model.get("warmup"):
        return "pinned"
    if state == "COOLING":
        cooling = model.get("cooling_remaining_seconds")
        return "cooling" if cooling is None else f"cooling {human_duration(cooling)}"
    remaining = model.get("ttl_remaining_seconds")
    if state in ("HOT",) and remaining is None:
        return "never"  # auto_unload is off
    return "-" if remaining is None else human_duration(remaining)


def relative_time(iso: str | None, now: dt.datetime | None = None) -> str:
    """ "12s ago" for an ISO 8601 time, "never" for None."""
    if not iso:
        return "never"
    try:
        then = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    elapsed = ((now or dt.datetime.now(dt.UTC)) - then).total_seconds()
    return "just now" if elapsed < 1 else f"{human_duration(elapsed)} ago"


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    return text.removesuffix(".0") + unit


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by three spaces, like `ollama ps`."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


@contextmanager
def spinner(text: str, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner with elapsed seconds on a TTY stream (stderr); nothing otherwise."""
    out = stream or sys.stderr
    if not out.isatty():
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    utf8 = (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"
    frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if utf8 else "|/-\\"

    def spin() -> None:
        for frame in itertools.cycle(frames):
            out.write(f"\r{frame} {text} {time.monotonic() - start:.1f}s\x1b[K")
            out.flush()
            if done.wait(0.1):
                break
        out.write("\r\x1b[K")
        out.flush()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --- commands -----------------------------------------------------------------------------


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    """Models that hold a worker process."""
    models = [
        m for m in client.call("GET", "/models")["models"] if m.get("state") in HOLDING_WORKER
    ]
    if args.json:
        print_json({"models": models})
        return 0
    rows = [
        [
            m["model_id"],
            m["state"],
            _number(m.get("port")),
            ttl_left(m),
            _number(m.get("memory_rss_mb"), " MB"),
            _number(m.get("in_flight")),
            relative_time(m.get("last_used")),
        ]
        for m in models
    ]
    headers = ["MODEL", "STATE", "PORT", "TTL LEFT", "MEMORY", "IN-FLIGHT", "LAST USED"]
    print(table(headers, rows))
    return 0


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    """Every registered model."""
    reply = client.call("GET", "/models")
    if args.json:
        print_json(reply)
        return 0
    rows = [
        [
            m["model_id"],
            m["state"],
            str(m.get("backend") or "-"),
            "yes" if m.get("warmup") else "no",
            "-" if m.get("ttl_minutes") is None else short_duration(m["ttl_minutes"] * 60),
            ",".join(m.get("tags") or []) or "-",
        ]
        for m in reply["models"]
    ]
    print(table(["MODEL", "STATE", "BACKEND", "WARMUP", "TTL", "TAGS"], rows))
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    """Load a model and wait until it serves."""
    before = client.call("GET", model_path(args.model))
    with spinner(f"loading {args.model}"):
        model = client.call("POST", model_path(args.model, "/load"), slow=True)
    if args.json:
        print_json(model)
        return 0
    where = model.get("endpoint") or "-"
    if before.get("state") in ("HOT", "COOLING"):
        print(f"{model['model_id']} is {model['state']} on {where} (already loaded)")
    else:
        seconds = model.get("load_seconds")
        took = f"loaded in {seconds:.2f} s" if seconds is not None else "loaded"
        print(f"{model['model_id']} is {model['state']} on {where} ({took})")
    return 0


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    """Drain and stop a model's worker (or kill it with --force)."""
    body = {"force": True} if args.force else None
    with spinner(f"unloading {args.model}"):
        model = client.call("POST", model_path(args.model, "/unload"), body=body, slow=True)
    if args.json:
        print_json(model)
        return 0
    how = "force-unloaded" if args.force else "unloaded"
    print(f"{model['model_id']} {how}; it is {model['state']}")
    return 0


def cmd_extend_ttl(client: Client, args: argparse.Namespace) -> int:
    """Add minutes to a loaded model's remaining TTL."""
    body = {"minutes": args.minutes}
    model = client.call("POST", model_path(args.model, "/extend-ttl"), body=body)
    if args.json:
        print_json(model)
        return 0
    print(f"{model['model_id']}: TTL left {ttl_left(model)}")
    return 0


def _entries_from_file(path: Path) -> list[dict[str, Any]]:
    """One registry entry, a list of them, or a registry file's {"models": [...]}."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        data = data["models"]
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise CliError(f"{path} must hold a registry entry (a JSON object) or a list of them")
    return entries


def _entry_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    entry: dict[str, Any] = {"model_id": args.id}
    if args.model_path:
        local = Path(args.model_path).expanduser()
        # A relative path that exists here is meant from here, not from the registry file.
        entry["model_path"] = str(local.resolve()) if local.exists() else args.model_path
    if args.package_file:
        entry["package_file"] = args.package_file
    if args.ttl_minutes is not None:
        entry["ttl_minutes"] = args.ttl_minutes
    if args.warmup:
        entry["warmup"] = True
    if args.n_ctx is not None:
        entry["n_ctx"] = args.n_ctx
    return entry


def cmd_register(client: Client, args: argparse.Namespace) -> int:
    """Register a model from a JSON file or from flags."""
    entries = _entries_from_file(args.file) if args.file else [_entry_from_flags(args)]
    params = {"replace": "true"} if args.replace else None
    replies = []
    for entry in entries:
        try:
            replies.append(client.call("POST", "/models/register", body=entry, params=params))
        except CliError as exc:
            if "HTTP 409" in exc.message:
                exc.message += "; add --replace to update it"
            raise
    if args.json:
        print_json(replies[0] if len(replies) == 1 else {"models": replies})
        return 0
    verb = "registered (replaced)" if args.replace else "registered"
    for model in replies:
        print(f"{model['model_id']} {verb}; it is {model['state']}")
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    """Unload (with drain) and forget a model."""
    with spinner(f"removing {args.model}"):
        reply = client.call("DELETE", model_path(args.model), slow=True)
    if args.json:
        print_json(reply)
        return 0
    print(f"{reply.get('deleted', args.model)} removed")
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CliError(f"no config key '{key}'")
        node = node[part]
    return node


def parse_value(text: str) -> Any:
    """JSON when it parses (20, true, null, [..], {..}), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def nested(key: str, value: Any) -> dict[str, Any]:
    """port_range.start=8060 -> {"port_range": {"start": 8060}}."""
    parts = key.split(".")
    if not all(parts):
        raise CliError(f"bad config key '{key}'")
    body: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        body = {part: body}
    return body


def cmd_config_get(client: Client, args: argparse.Namespace) -> int:
    """Show the running configuration, or one key of it."""
    config = client.call("GET", "/config")
    if args.key:
        value = _lookup(config, args.key)
        if args.json:
            print_json(value)
        elif isinstance(value, dict):
            for name, item in _flatten(value, f"{args.key}."):
                print(f"{name} = {_show(item)}")
        else:
            print(_show(value))
        return 0
    if args.json:
        print_json(config)
        return 0
    for name, value in _flatten(config):
        print(f"{name} = {_show(value)}")
    return 0


def cmd_config_set(client: Client, args: argparse.Namespace) -> int:
    """Change one setting (saved to the manager's config file)."""
    config = client.call("PATCH", "/config", body=nested(args.key, parse_value(args.value)))
    if args.json:
        print_json(config)
        return 0
    value = _lookup(config, args.key)
    print(f"{args.key} = {_show(value)}")
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    """The manager's health summary; exit 1 unless healthy."""
    health = client.call("GET", "/health")
    status = health.get("status", "unknown")
    if args.json:
        print_json(health)
    else:
        states = health.get("models_by_state") or {}
        busy = ", ".join(f"{n} {s}" for s, n in states.items() if n) or "none"
        memory = health.get("memory") or {}
        print(f"status: {status}")
        print(f"url: {client.url}")
        print(f"warmup complete: {'yes' if health.get('warmup_complete') else 'no'}")
        print(
            f"models: {health.get('total_models', 0)} registered, "
            f"{health.get('active_models', 0)} holding a worker ({busy})"
        )
        limit = memory.get("limit_mb")
        print(
            f"memory: {_number(health.get('total_memory_mb'), ' MB')} RSS, "
            f"estimate {_number(memory.get('estimated_use_mb'), ' MB')}"
            f" + spares {_number(memory.get('spares_mb'), ' MB')}"
            + (f" of {_number(limit, ' MB')} limit" if limit is not None else "")
        )
        print(f"free ports: {health.get('available_ports', '-')}")
        print(f"spare workers: {health.get('spare_workers', '-')}")
        for name, state in (health.get("dependencies") or {}).items():
            detail = state.get("store") or ", ".join(
                f"{k} {', '.join(v) or 'none'}" for k, v in state.items() if isinstance(v, list)
            )
            verdict = "ok" if state.get("ok") else f"DOWN ({state.get('error', 'see --json')})"
            print(f"{name}: {verdict}" + (f" — {detail}" if detail else ""))
    return 0 if status == "healthy" else EXIT_ERROR


def _limits_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """--requests-per-hour, --tokens-per-minute, --concurrent as a limits object (None:
    none given); --limits JSON instead for per-model ones."""
    if args.limits is not None:
        value = parse_value(args.limits)
        if not isinstance(value, dict):
            raise CliError("--limits: a JSON object, e.g. '{\"requests_per_hour\": 100}'", 2)
        return value
    given = {
        "requests_per_hour": args.requests_per_hour,
        "tokens_per_minute": args.tokens_per_minute,
        "concurrent_requests": args.concurrent,
    }
    limits = {name: value for name, value in given.items() if value is not None}
    return limits or None


def _limits_text(limits: dict[str, Any] | None) -> str:
    if limits is None:
        return "default"
    parts = []
    for name, short in (
        ("requests_per_hour", "req/h"),
        ("tokens_per_minute", "tok/min"),
        ("concurrent_requests", "at once"),
    ):
        if limits.get(name) is not None:
            parts.append(f"{limits[name]} {short}")
    if limits.get("models"):
        parts.append(f"+{len(limits['models'])} model(s)")
    return ", ".join(parts) or "none"


def cmd_keys_list(client: Client, args: argparse.Namespace) -> int:
    """The named keys (never the keys themselves)."""
    reply = client.call("GET", "/keys")
    if args.json:
        print_json(reply)
        return 0
    rows = [
        [
            k["name"],
            k["role"],
            k["prefix"] + "…",
            _limits_text(k.get("limits")),
            relative_time(k.get("created_at")),
        ]
        for k in reply["keys"]
    ]
    print(table(["NAME", "ROLE", "KEY", "LIMITS", "CREATED"], rows))
    return 0


def cmd_keys_create(client: Client, args: argparse.Namespace) -> int:
    """Make a named key; it is printed once, here."""
    body = {"name": args.name, "role": args.role, "limits": _limits_of(args)}
    reply = client.call("POST", "/keys", body=body)
    if args.json:
        print_json(reply)
        return 0
    print(reply["key"])
    print(
        f"key '{reply['name']}' ({reply['role']}, limits: {_limits_text(reply.get('limits'))}) "
        "made; it is shown only now.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_update(client: Client, args: argparse.Namespace) -> int:
    """Change a named key's role or limits."""
    body: dict[str, Any] = {}
    if args.role:
        body["role"] = args.role
    limits = _limits_of(args)
    if args.no_limits:
        limits = {}
    if limits is not None:
        body["limits"] = limits
    if not body:
        raise CliError("nothing to change: give --role, limits, or --no-limits", 2)
    reply = client.call("PATCH", f"/keys/{args.name}", body=body)
    if args.json:
        print_json(reply)
    else:
        print(f"{reply['name']}: {reply['role']}, limits: {_limits_text(reply.get('limits'))}")
    return 0


def cmd_keys_delete(client: Client, args: argparse.Namespace) -> int:
    """Revoke a named key."""
    reply = client.call("DELETE", f"/keys/{args.name}")
    if args.json:
        print_json(reply)
    else:
        print(f"{args.name}: deleted")
    return 0


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    """Usage by caller and model (summed over the hours asked for)."""
    params = {"caller": args.caller, "model": args.model}
    if args.hours:
        now = int(time.time())
        params["since"] = str(now - now % 3600 - (args.hours - 1) * 3600)
    reply = client.call("GET", "/usage", params={k: v for k, v in params.items() if v is not None})
    if args.json:
        print_json(reply)
        return 0
    sums: dict[tuple[str, str], dict[str, int]] = {}
    counted = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors")
    for row in reply["usage"]:
        entry = sums.setdefault((row["caller"], row["model"]), dict.fromkeys(counted, 0))
        entry["refusals"] = entry.get("refusals", 0) + row["refusals"]
        for name in counted:
            entry[name] += row[name]
    rows = [
        [caller, model, *(str(entry[n]) for n in (*counted, "refusals"))]
        for (caller, model), entry in sorted(sums.items())
    ]
    headers = ["CALLER", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "ERRORS", "REFUSED"]
    print(table(headers, rows))
    return 0


# --- arguments ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of poolctl."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the manager's base URL (env POOL_URL, default {DEFAULT_URL})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON"
    )
    parser = _Parser(
        prog="poolctl",
        description="Operate a running pool manager. The key comes from POOL_ADMIN_KEY "
        "(else POOL_API_KEY).",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, run: Callable[[Client, argparse.Namespace], int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text, parents=[common])
        sub.set_defaults(run=run)
        return sub

    add("ps", cmd_ps, "models holding a worker: state, port, TTL left, memory")
    add("models", cmd_models, "every registered model")
    add("load", cmd_load, "load a model and wait until it is HOT").add_argument("model")
    unload = add("unload", cmd_unload, "drain and stop a model's worker")
    unload.add_argument("model")
    unload.add_argument("--force", action="store_true", help="kill at once, cutting off requests")
    extend = add("extend-ttl", cmd_extend_ttl, "add minutes to a loaded model's TTL")
    extend.add_argument("model")
    extend.add_argument("minutes", type=float)

    register = add("register", cmd_register, "register a model from FILE.json or from flags")
    register.add_argument("file", nargs="?", type=Path, help="a registry entry as JSON")
    register.add_argument("--id", help="the model id")
    weights = register.add_mutually_exclusive_group()
    weights.add_argument("--model-path", help="path of the GGUF file")
    weights.add_argument("--package-file", help="'package/file' inside an installed package")
    register.add_argument("--ttl-minutes", type=float)
    register.add_argument("--warmup", action="store_true", help="load at start, never evict")
    register.add_argument("--n-ctx", type=int)
    register.add_argument("--replace", action="store_true", help="update an existing entry")

    add("rm", cmd_rm, "unload and forget a model").add_argument("model")

    config = commands.add_parser(
        "config", help="show or change the configuration", parents=[common]
    )
    config_commands = config.add_subparsers(
        dest="config_command", metavar="ACTION", parser_class=_Parser
    )
    get = config_commands.add_parser("get", help="show the configuration", parents=[common])
    get.add_argument("key", nargs="?", help="a key, dotted for nested ones (port_range.start)")
    get.set_defaults(run=cmd_config_get)
    put = config_commands.add_parser("set", help="change one setting", parents=[common])
    put.add_argument("key", help="a key, dotted for nested ones (port_range.start)")
    put.add_argument("value", help="JSON (20, true, [..]) or a plain string")
    put.set_defaults(run=cmd_config_set)

    add("health", cmd_health, "the manager's health; exit 1 unless healthy")

    keys = commands.add_parser("keys", help="named API keys (admin)", parents=[common])
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)

    def with_limits(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--requests-per-hour", type=int)
        sub.add_argument("--tokens-per-minute", type=int)
        sub.add_argument("--concurrent", type=int, help="requests at once")
        sub.add_argument("--limits", help="the limits as JSON (per-model ones under 'models')")

    listed = key_commands.add_parser("list", help="the named keys", parents=[common])
    listed.set_defaults(run=cmd_keys_list)
    create = key_commands.add_parser("create", help="make a key (shown once)", parents=[common])
    create.add_argument("name")
    create.add_argument("--role", choices=["client", "admin"], default="client")
    with_limits(create)
    create.set_defaults(run=cmd_keys_create)
    update = key_commands.add_parser("update", help="change role or limits", parents=[common])
    update.add_argument("name")
    update.add_argument("--role", choices=["client", "admin"])
    with_limits(update)
    update.add_argument("--no-limits", action="store_true", help="lift every limit")
    update.set_defaults(run=cmd_keys_update)
    delete = key_commands.add_parser("delete", help="revoke a key", parents=[common])
    delete.add_argument("name")
    delete.set_defaults(run=cmd_keys_delete)

    usage = add("usage", cmd_usage, "usage by caller and model")
    usage.add_argument("--caller", help="one caller: key:NAME, user:SUB, env:client, ...")
    usage.add_argument("--model")
    usage.add_argument("--hours", type=int, help="only the last N hours (this one included)")
    parser.set_defaults(_parsers={"": parser, "config": config, "register": register, "keys": keys})
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the command line; usage errors exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parsers: dict[str, argparse.ArgumentParser] = args._parsers
    if not getattr(args, "run", None):
        sub = parsers[args.command] if args.command in ("config", "keys") else parsers[""]
        sub.print_help(sys.stderr)
        sys.exit(2)
    if args.command == "register":
        register = parsers["register"]
        flags = args.id or args.model_path or args.package_file
        extra = args.ttl_minutes is not None or args.warmup or args.n_ctx is not None
        if args.file and (flags or extra):
            register.error("give FILE.json or --id with flags, not both")
        if not args.file:
            if not args.id:
                register.error("give FILE.json, or --id with --model-path or --package-file")
            if not (args.model_path or args.package_file):
                register.error("--id needs --model-path or --package-file")
    args.url = getattr(args, "url", None) or os.environ.get("POOL_URL") or DEFAULT_URL
    args.json = getattr(args, "json", False)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run poolctl; returns the exit code."""
    args = parse_args(argv)
    key = os.environ.get("POOL_ADMIN_KEY") or os.environ.get("POOL_API_KEY") or None
    client = Client(args.url, key)
    try:
        code: int = args.run(client, args)
        return code
    except CliError as exc:
        print(f"poolctl: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("poolctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `poolctl models | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
