"""The dashboard at /ui, end to end: a real manager, real workers, headless Chromium.

The browser tests need Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver) and the `selenium` package; without them they are skipped. The
plain HTTP tests of /ui and GET /events always run.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.conftest import (
    DEFAULT_MODEL,
    Manager,
    ManagerFactory,
    model_entry,
    pid_alive,
    wait_for,
)

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

COLD_MODEL = "team/cold:tiny"  # ':' and '/' in the id: the page puts it in URLs as it is
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN_KEY = "admin-key-for-the-dashboard"
CLIENT_KEY = "client-key-for-the-dashboard"
CLOCK = re.compile(r"^(?:(\d+):)?(\d+):(\d\d)$")


# --- a browser ------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path, start_manager: ManagerFactory) -> Iterator[WebDriver]:
    """Headless Chromium. Set up after `start_manager`, so it quits before managers stop."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt: chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs the selenium package")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def css(driver: WebDriver, selector: str) -> list[WebElement]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def row(driver: WebDriver, model_id: str) -> WebElement | None:
    found = css(driver, f'tr[data-model-id="{model_id}"]')
    return found[0] if found else None


def cell(driver: WebDriver, model_id: str, selector: str) -> str:
    """The text of one cell of a model's row, or '' while the row is not there."""
    from selenium.common.exceptions import StaleElementReferenceException

    found = row(driver, model_id)
    if found is None:
        return ""
    try:
        text: str = found.find_element("css selector", selector).text
    except StaleElementReferenceException:
        return ""
    return text.strip()


def wait_badge(driver: WebDriver, model_id: str, state: str, timeout: float = 90) -> None:
    wait_for(
        lambda: cell(driver, model_id, ".badge") == state,
        timeout,
        message=f"the row of {model_id} to show {state}",
    )


def click(driver: WebDriver, model_id: str, action: str) -> None:
    found = row(driver, model_id)
    assert found is not None, f"no row for {model_id}"
    button = found.find_element("css selector", f'button[data-action="{action}"]')
    wait_for(button.is_enabled, 30, message=f"the {action} button of {model_id} to be enabled")
    button.click()


def seconds(clock: str) -> int | None:
    match = CLOCK.match(clock)
    if not match:
        return None
    hours, minutes, secs = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs)


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def page_errors(driver: WebDriver) -> list[str]:
    """Console errors, CSP violations included (a wrong script hash would show here)."""
    logs: list[dict[str, Any]] = driver.get_log("browser")
    return [
        entry["message"]
        for entry in logs
        if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]
    ]


def hot_and_cold(start_manager: ManagerFactory, **kwargs: Any) -> Manager:
    manager = start_manager(
        config={"max_ttl_minutes": 120},
        models=[model_entry(DEFAULT_MODEL, warmup=True), model_entry(COLD_MODEL)],
        **kwargs,
    )
    manager.wait_state(DEFAULT_MODEL, "HOT")
    return manager


# --- the page in a browser --------------------------------------------------------------------


def test_dashboard_shows_models_live_and_loads_and_unloads(
    start_manager: ManagerFactory, browser: WebDriver
) -> None:
    manager = hot_and_cold(start_manager)
    browser.get(f"{manager.url}/ui")
    wait_badge(browser, DEFAULT_MODEL, "HOT", 30)
    wait_badge(browser, COLD_MODEL, "COLD", 30)
    assert not css(browser, "#login")[0].is_displayed(), "no keys: the page must not ask for one"
    assert cell(browser, DEFAULT_MODEL, ".port") == str(manager.model(DEFAULT_MODEL)["port"])
    assert cell(browser, DEFAULT_MODEL, ".ttl") == "pinned"
    assert cell(browser, COLD_MODEL, ".port") == "—"
    wait_for(
        lambda: "1 / 2 loaded" in css(browser, "#health")[0].text,
        10,
        message="the pool health header",
    )
    assert "MB" in cell(browser, DEFAULT_MODEL, ".bar-label"), "the memory bar has a label"
    # The spare loads the COLD model's weights ahead (the HOT model made their file).
    wait_for(
        lambda: "loaded ahead" in cell(browser, COLD_MODEL, ".chips"),
        60,
        message="the 'loaded ahead' chip",
    )
    assert "loaded ahead" not in cell(browser, DEFAULT_MODEL, ".chips")

    click(browser, COLD_MODEL, "load")
    wait_badge(browser, COLD_MODEL, "HOT")
    loaded = manager.wait_state(COLD_MODEL, "HOT", timeout=10)
    wait_for(
        lambda: cell(browser, COLD_MODEL, ".port") == str(loaded["port"]),
        10,
        message="the port of the loaded model",
    )
    wait_for(
        lambda: "loaded ahead" not in cell(browser, COLD_MODEL, ".chips"),
        10,
        message="the chip to go once the model is loaded",
    )

    # The TTL ticks down between snapshots, and +10 min adds about 600 s to it.
    first = wait_for(
        lambda: seconds(cell(browser, COLD_MODEL, ".ttl")), 10, message="a TTL countdown"
    )
    assert 14 * 60 < first <= 15 * 60, first  # default_ttl_minutes is 15
    wait_for(
        lambda: (s := seconds(cell(browser, COLD_MODEL, ".ttl"))) is not None and s < first,
        5,
        message="the TTL to tick down",
    )
    click(browser, COLD_MODEL, "extend-ttl")
    wait_for(
        lambda: (seconds(cell(browser, COLD_MODEL, ".ttl")) or 0) > first + 500,
        10,
        message="the TTL to grow by 10 minutes",
    )
    assert manager.model(COLD_MODEL)["ttl_remaining_seconds"] > first + 500

    # Requests/min and tokens/s move when the model serves a request.
    wait_for(
        lambda: number(cell(browser, COLD_MODEL, ".tps")) is not None,
        15,
        message="a first tokens/s figure",
    )
    client = openai.OpenAI(base_url=f"{loaded['endpoint']}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(
        model=COLD_MODEL,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=24,
        temperature=0,
    )
    wait_for(
        lambda: (number(cell(browser, COLD_MODEL, ".rpm")) or 0) > 0,
        15,
        message="requests/min above 0",
    )
    wait_for(
        lambda: (number(cell(browser, COLD_MODEL, ".tps")) or 0) > 0,
        15,
        message="tokens/s above 0",
    )

    click(browser, COLD_MODEL, "unload")
    wait_badge(browser, COLD_MODEL, "COLD", 60)
    assert manager.model(COLD_MODEL)["state"] == "COLD"
    wait_for(lambda: cell(browser, COLD_MODEL, ".port") == "—", 10, message="the port to clear")
    log = css(browser, "#log")[0].text
    assert f"{COLD_MODEL}: COLD → WARMING" in log and f"{COLD_MODEL}: UNLOADING → COLD" in log
    assert page_errors(browser) == []


def test_dashboard_asks_for_the_admin_key_when_keys_are_set(
    start_manager: ManagerFactory, browser: WebDriver
) -> None:
    manager = hot_and_cold(
        start_manager, env={"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY}
    )
    browser.get(f"{manager.url}/ui")
    wait_for(lambda: css(browser, "#login")[0].is_displayed(), 15, message="the key form")
    assert row(browser, DEFAULT_MODEL) is None

    def enter(key: str) -> None:
        field = css(browser, "#key-input")[0]
        field.clear()
        field.send_keys(key)
        css(browser, "#key-form button[type=submit]")[0].click()

    enter(CLIENT_KEY)
    wait_for(
        lambda: "admin key" in css(browser, "#key-error")[0].text,
        15,
        message="the client key to be turned away",
    )
    enter(ADMIN_KEY)
    wait_badge(browser, DEFAULT_MODEL, "HOT", 30)
    wait_badge(browser, COLD_MODEL, "COLD", 30)
    assert not css(browser, "#login")[0].is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('pool-admin-key')") == ADMIN_KEY

    # Asked once: a reload uses the key kept in sessionStorage.
    browser.refresh()
    wait_badge(browser, DEFAULT_MODEL, "HOT", 30)
    assert not css(browser, "#login")[0].is_displayed()

    # Actions carry the key too.
    click(browser, COLD_MODEL, "load")
    wait_badge(browser, COLD_MODEL, "HOT")
    manager.wait_state(COLD_MODEL, "HOT", timeout=10)
    errors = [e for e in page_errors(browser) if not re.search(r"\b40[13]\b", e)]  # key tries
    assert errors == []

    # Usage by caller (issue 17): a request of the client key shows up in its table.
    chat = httpx.post(
        f"{manager.url}/v1/chat/completions",
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
        },
        headers={"X-API-Key": CLIENT_KEY},
        timeout=60,
    )
    assert chat.status_code == 200
    usage_row = '#usage-rows tr[data-caller="env:client"] td'
    wait_for(lambda: css(browser, usage_row), 25, message="the client key's usage row")
    cells = [cell.text for cell in css(browser, usage_row)]
    assert cells[:3] == ["env:client", DEFAULT_MODEL, "1"], cells


def test_dashboard_reconnects_when_the_stream_drops(
    start_manager: ManagerFactory, browser: WebDriver
) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    first_pid = manager.wait_state(DEFAULT_MODEL, "HOT")["pid"]
    browser.get(f"{manager.url}/ui")
    wait_badge(browser, DEFAULT_MODEL, "HOT", 30)

    def connection() -> str:
        return str(css(browser, "#conn")[0].get_attribute("data-conn"))

    assert connection() == "live"
    # The manager dies (SIGKILL, the harshest case); its orphaned worker exits by itself.
    assert manager.process is not None
    manager.process.kill()
    manager.process.wait()
    wait_for(lambda: connection() == "reconnecting", 15, message="the page to notice")
    wait_for(lambda: not pid_alive(first_pid), 15, message="the orphaned worker to exit")
    manager.start()
    second = manager.wait_state(DEFAULT_MODEL, "HOT")
    wait_for(lambda: connection() == "live", 30, message="the page to reconnect")
    wait_badge(browser, DEFAULT_MODEL, "HOT", 15)
    wait_for(
        lambda: cell(browser, DEFAULT_MODEL, ".port") == str(second["port"]),
        15,
        message="the new worker's port",
    )


# --- plain HTTP -------------------------------------------------------------------------------


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_events_stream_a_snapshot_then_state_changes(start_manager: ManagerFactory) -> None:
    manager = hot_and_cold(
        start_manager, env={"POOL_ADMIN_KEY": ADMIN_KEY, "POOL_API_KEY": CLIENT_KEY}
    )
    url = f"{manager.url}/events"
    assert httpx.get(url, timeout=10).status_code == 401
    client_reply = httpx.get(url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    assert client_reply.status_code == 403

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with (
        httpx.stream("GET", url, headers=headers, timeout=30) as reply,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply.iter_lines())
        name, first = next(events)
        assert name == "snapshot"
        states = {m["model_id"]: m["state"] for m in first["models"]}
        assert states == {DEFAULT_MODEL: "HOT", COLD_MODEL: "COLD"}

        loading = pool.submit(manager.load, COLD_MODEL)
        changes: list[dict[str, Any]] = []
        last_snapshot: dict[str, Any] = {}
        for name, data in events:
            if name == "state" and data["model"] == COLD_MODEL:
                changes.append(data)
            elif name == "snapshot":
                last_snapshot = {m["model_id"]: m for m in data["models"]}
            hot = last_snapshot and last_snapshot[COLD_MODEL]["state"] == "HOT"
            if changes and changes[-1]["to"] == "HOT" and hot:
                break
        loading.result(timeout=60)
    assert [(c["from"], c["to"]) for c in changes] == [("COLD", "WARMING"), ("WARMING", "HOT")]
    assert changes[0]["type"] == "state" and changes[0]["reason"] == "load requested"
    assert last_snapshot[COLD_MODEL]["port"] == manager.model(COLD_MODEL)["port"]


def test_ui_page_is_open_and_locked_down(start_manager: ManagerFactory) -> None:
    manager = start_manager(
        models=[model_entry(COLD_MODEL)],
        env={"POOL_ADMIN_KEY": ADMIN_KEY},
    )
    reply = httpx.get(f"{manager.url}/ui", timeout=10)  # no key: the page itself is open
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'$", policy.split(";")[1].strip())
    assert 'fetch("/events"' in reply.text and "EventSource" not in reply.text
    assert "/ui" not in httpx.get(f"{manager.url}/openapi.json", timeout=10).text
    assert httpx.get(f"{manager.url}/models", timeout=10).status_code == 200  # reads are open
    load = httpx.post(f"{manager.url}/models/{COLD_MODEL}/load", timeout=10)
    assert load.status_code == 401, "the page is open, the API behind it is not"


def test_sigterm_stops_the_manager_while_an_event_stream_is_open(
    start_manager: ManagerFactory,
) -> None:
    manager = start_manager(models=[model_entry(DEFAULT_MODEL, warmup=True)])
    manager.wait_state(DEFAULT_MODEL, "HOT")
    assert manager.process is not None
    with httpx.stream("GET", f"{manager.url}/events", timeout=30) as reply:
        lines = reply.iter_lines()  # kept: a dropped iterator would close the connection
        assert next(lines) == "event: snapshot"
        manager.process.send_signal(signal.SIGTERM)
        try:
            exited = manager.process.wait(15)
        except subprocess.TimeoutExpired:
            exited = None
    assert exited == 0, "the manager must stop within 15 s of SIGTERM"
