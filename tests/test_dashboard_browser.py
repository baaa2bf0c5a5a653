"""End to end in a real headless Chromium: agent -> Mosquitto -> coordinator -> live dashboard.

A simulated edge agent publishes ObservationBatch messages through a real broker; a real
Coordinator ingests them, aggregates, fires a signal from a fast test rule and serves the
dashboard, which an instructor watches in Chromium: the empty chart says so, the chart grows, the
signal arrives with its reason, the instructor acknowledges it, every time shows in the browser's
zone, another instructor's classroom stays closed, and logging out in one tab ends the other tab's
live view, whose Acknowledge then says the login has ended instead of pretending to succeed.
Screenshots go to artifacts/screenshots/; with AFFECTEDGE_UPDATE_DOCS=1 the live view is also copied to
docs/dashboard.png (the README's screenshot).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, free_port, wait_for_port
from webapp import CONFUSED, HAPPY, PASSWORD, add_classroom, add_user, batch

from affectedge import codec, topics
from affectedge.settings import parse
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.store import Store, utcnow

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
DOCS_SHOT = ROOT / "docs" / "dashboard.png"
MAX_DOCS_SHOT = 300 * 1024
#: fires after 3 s of a confused class (the shipped rules wait minutes)
FAST_RULE = """
[[rule]]
name = "confusion-now"
signal = "SLOW_DOWN"
states = ["confused"]
above = 0.40
window_s = 10
min_duration_s = 3
cooldown_s = 600
"""


class Agent(threading.Thread):
    """A lab PC's edge agent: its status, then one batch of 4 learners per 0.5 s (happy, then confused)."""

    def __init__(self, broker_port: int, room: str, name: str = "lab-pc-1"):
        super().__init__(daemon=True)
        self.room, self.name = room, name
        self.stopping = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()
        status = pb.AgentStatus(agent_id=name, classroom_id=room, state=pb.AgentStatus.ONLINE,
                                version="test", backend="onnxruntime", model_version="test")
        status.timestamp.FromDatetime(utcnow())
        self.client.publish(topics.status(room, name), codec.encode(status), qos=1, retain=True).wait_for_publish(5)

    def run(self) -> None:
        seq = 0
        while not self.stopping.wait(0.5):
            seq += 1
            mood = HAPPY if seq <= 8 else CONFUSED
            message = batch(self.room, self.name, utcnow(), tracks=4, probabilities=mood, seq=seq)
            self.client.publish(topics.observations(self.room, self.name), codec.encode(message), qos=1)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.client.loop_stop()
        self.client.disconnect()


sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
expect = sync_api.expect
AT_LEAST_5 = re.compile(r"^([5-9]|[1-9]\d+)$")
#: the browser's zone: no summer time, and 10 h from UTC, so a UTC time would show a different hour
ZONE, ZONE_NAME = "Pacific/Honolulu", "HST"
LOGIN_ENDED = "Your login has ended: log in again"


def local_times(page) -> list[str]:
    return page.eval_on_selector_all("time[data-local]", "els => els.map((e) => e.textContent)")


def open_signal(coordinator: Coordinator, room: str) -> pb.AdaptationSignal:
    """A stored and published signal, as the policy leader makes one."""
    signal = pb.AdaptationSignal(id=str(uuid.uuid4()), classroom_id=room, kind=pb.SLOW_DOWN, strength=0.5,
                                 reason="confusion above 40%", evidence=pb.Evidence(rule="confusion-now"))
    signal.created_at.FromDatetime(utcnow())
    Store(coordinator.sessions).add_signal(signal, [])
    coordinator.hub.publish(signal)
    return signal


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless"])
        yield chromium
        chromium.close()


@pytest.fixture
def coordinator(tmp_path, mosquitto):
    rules = tmp_path / "rules.toml"
    rules.write_text(FAST_RULE)
    config = parse(
        {
            "state_dir": str(tmp_path),
            "mqtt": {"url": mosquitto.url, "client_id": f"coordinator-{uuid.uuid4().hex[:8]}"},
            "database": {"url": f"sqlite:///{tmp_path / 'coordinator.db'}"},
            "policy": {"rules": str(rules)},
            "grpc": {"port": free_port()},
            "web": {"port": free_port(), "admin_password": "admin-password-1"},
        },
        CoordinatorConfig,
        "browser test config",
    )
    running = Coordinator(config)
    running.start()
    wait_for_port(config.web.port)
    yield running
    running.stop()


def test_instructor_watches_a_live_classroom(browser, tmp_path, mosquitto, coordinator):
    add_user(coordinator, "alice")
    add_user(coordinator, "bob")
    add_classroom(coordinator, "room-1", "alice", course="physics-1")
    add_classroom(coordinator, "room-2", "bob")
    base = f"http://127.0.0.1:{coordinator.config.web.port}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US", timezone_id=ZONE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)  # CSP reports too
    page.goto(f"{base}/classrooms/room-1")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/classrooms/room-1")
    page.wait_for_selector("#connection[data-state=waiting]", timeout=10_000)
    # no data yet: said so, over an axis of the last minutes (not from 1970)
    assert page.inner_text("#chart-empty").startswith("No data yet")
    axis_from = page.evaluate("Chart.getChart(document.getElementById('emotion-chart')).scales.x.min")
    assert axis_from > (time.time() - 20 * 60) * 1000

    agent = Agent(mosquitto.port, "room-1")
    agent.start()
    try:
        # the chart grows with each pushed state, and the state panel shows the class
        expect(page.locator("#emotion-chart")).to_have_attribute("data-points", AT_LEAST_5, timeout=30_000)
        assert page.inner_text("#connection") == "Live"
        assert page.inner_text("#learners") == "4"
        assert page.inner_text("#agents").strip() == "● lab-pc-1: online"
        assert "happy" in page.inner_text("#mix")
        assert page.is_hidden("#chart-empty")

        card = page.wait_for_selector(".signal[data-kind=SLOW_DOWN]", timeout=45_000)
        assert "confusion above 40%" in card.inner_text()
        assert "Measured" in card.inner_text() and "learners in view" in card.inner_text()
        assert "UTC" not in card.inner_text()  # the evidence window, too, in the browser's zone
        times = card.eval_on_selector_all("time", "els => els.map((e) => e.textContent)")
        assert len(times) == 3 and all(t.endswith(ZONE_NAME) for t in times), times
        assert not page.is_hidden("#gauges")
        page.screenshot(path=str(SCREENSHOTS / "live.png"), full_page=True)
        page.set_viewport_size({"width": 768, "height": 1024})  # a tablet in portrait
        page.screenshot(path=str(SCREENSHOTS / "live-tablet.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 768  # nothing runs off the side
    finally:
        agent.stop()

    signal_id = card.get_attribute("data-signal-id")
    card.query_selector("button[name=decision][value=acknowledge]").click()
    page.wait_for_selector(f'.signal[data-signal-id="{signal_id}"].handled', timeout=10_000)
    assert "acknowledged by alice" in card.inner_text()
    with coordinator.sessions() as session:
        row = session.get(db.Signal, signal_id)
        assert (row.status, row.handled_by) == ("acknowledged", "alice")
        assert row.reason.startswith("confusion above 40%")

    page.click("text=Past sessions")
    page.click("text=Timeline")
    page.wait_for_selector("#emotion-chart")
    assert "Slow down" in page.inner_text("main") and "Signals in this session (1)" in page.inner_text("main")
    page.screenshot(path=str(SCREENSHOTS / "session.png"), full_page=True)
    page.click("text=Printable summary")
    page.wait_for_selector("#emotion-chart")
    times = local_times(page)  # the session's start and end, the peaks and the signal: one zone, named
    assert len(times) >= 3 and all(t.endswith(ZONE_NAME) for t in times), times
    assert "UTC" not in page.inner_text("main")

    denied = page.goto(f"{base}/classrooms/room-2")
    assert denied.status == 403
    assert "is not assigned to you" in page.inner_text("main")
    page.screenshot(path=str(SCREENSHOTS / "denied.png"))
    assert [e for e in errors if "403" not in e] == []  # the denied page's own 403 is logged

    # a shared classroom PC: logging out in one tab ends the live view in the other
    page.goto(f"{base}/classrooms/room-1")
    expect(page.locator("#connection")).to_have_attribute("data-state", re.compile("waiting|live"))
    other = context.new_page()
    other.goto(f"{base}/classrooms/room-1")
    late = open_signal(coordinator, "room-1")
    card = page.locator(f'.signal[data-signal-id="{late.id}"]')
    expect(card).to_be_visible(timeout=10_000)
    other.click("button:has-text('Log out')")
    other.wait_for_url(re.compile(r"/login$"))
    # a state the stream would forward (suppressed: nothing to show), were the login not checked first
    coordinator.hub.publish(pb.ClassroomState(classroom_id="room-1", suppressed=True))
    expect(page.locator("#connection")).to_have_text(LOGIN_ENDED, timeout=15_000)
    assert page.get_attribute("#connection a", "href") == "/login?next=%2Fclassrooms%2Froom-1"
    card.locator("button[value=acknowledge]").click()
    expect(card.locator(".signal-status")).to_have_text(LOGIN_ENDED)
    assert "handled" not in card.get_attribute("class") and card.locator("form").is_visible()
    with coordinator.sessions() as session:
        assert session.get(db.Signal, late.id).status == "open"
    outcomes = page.evaluate("""() => Promise.all(["/login", "/"].map(
        (url) => AE.request(url).then(() => "resolved", (error) => error.name)))""")
    assert outcomes == ["Error", "LoginEnded"]  # an HTML page is no answer; a refused login says so
    assert [e for e in errors if "403" not in e and "401" not in e] == []  # refused requests are logged

    shot = SCREENSHOTS / "live.png"
    assert shot.stat().st_size < MAX_DOCS_SHOT, "the live-view screenshot is too big for docs/"
    if os.environ.get("AFFECTEDGE_UPDATE_DOCS"):  # refresh the README's screenshot on request only
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)

