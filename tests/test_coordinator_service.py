"""The whole coordinator: real Mosquitto, real SQLite, real gRPC on 127.0.0.1, and the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from outlets import parts
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from affectedge import systemd
from affectedge.loopback import free_port
from affectedge.settings import ConfigError
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import db, health, policy
from coordinator.bench import CONFUSED, make_batch, mqtt_client, publish, stamp
from coordinator.config import CoordinatorConfig
from coordinator.grpc_api import GrpcServer
from coordinator.service import Coordinator
from coordinator.store import Received

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = [("authorization", f"Bearer {TOKEN}")]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FAST_RULES = """
[[rule]]
name = "fast-confusion"
signal = "SLOW_DOWN"
states = ["confused"]
above = 0.5
clear = 0.3
window_s = 10
min_duration_s = 0.5
cooldown_s = 120
"""


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def make_config(tmp_path: Path, broker_url: str, client_id: str, db_path: Path) -> CoordinatorConfig:
    rules = tmp_path / "rules.toml"
    rules.write_text(FAST_RULES)
    state = tmp_path / client_id
    state.mkdir(exist_ok=True)
    return CoordinatorConfig.model_validate(
        {
            "state_dir": str(state),
            "mqtt": {"url": broker_url, "client_id": client_id},
            "database": {"url": f"sqlite:///{db_path}"},
            "aggregate": {"tick_seconds": 0.2},
            "policy": {"rules": str(rules)},
            "grpc": {"port": free_port(), "tokens": [TOKEN]},
            "web": {"port": free_port(), "admin_password": "test-admin-password"},
        }
    )


class Stream:
    """A StreamAdaptations call read by a background thread."""

    def __init__(self, coordinator: Coordinator, **request):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.grpc.port}")
        self.call = pb_grpc.CoordinatorStub(self.channel).StreamAdaptations(
            pb.StreamAdaptationsRequest(**request), metadata=AUTH
        )
        self.signals: list[pb.AdaptationSignal] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for signal in self.call:
                self.signals.append(signal)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def coordinator(tmp_path, mosquitto) -> Iterator[Coordinator]:
    instance = Coordinator(make_config(tmp_path, mosquitto.url, "coord-a", tmp_path / "coord.db"))
    instance.start()
    assert instance.ingest.connected.wait(10)
    time.sleep(0.3)
    yield instance
    instance.stop()


def publish_confused(publisher, classroom: str, agents: int = 1, batches: int = 3, learners: int = 4) -> int:
    """Confused batches from ``agents`` agents; returns observations published."""
    last = None
    for seq in range(1, batches + 1):
        for a in range(agents):
            last = publish(publisher, make_batch(f"{classroom}-ag{a}", classroom, learners, CONFUSED, seq=seq))
    last.wait_for_publish(10)
    return agents * batches * learners


def test_grpc_auth_health_and_reflection(coordinator):
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.grpc.port}")
    stub = pb_grpc.CoordinatorStub(channel)
    # health needs no token (load balancers probe it)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="affectedge.v1.Coordinator")).status == 1
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListClassrooms(pb.ListClassroomsRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.StreamAdaptations(pb.StreamAdaptationsRequest())))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ListClassrooms(pb.ListClassroomsRequest(), metadata=AUTH).classrooms == []
    with pytest.raises(grpc.RpcError) as info:
        stub.GetClassroomState(pb.GetClassroomStateRequest(classroom_id="nowhere"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # reflection answers with a token; it names the API
    authed = grpc.intercept_channel(channel, _AddAuth())
    services = ProtoReflectionDescriptorDatabase(authed).get_services()
    assert "affectedge.v1.Coordinator" in services and "grpc.health.v1.Health" in services
    channel.close()


@pytest.mark.parametrize("host", ["::", "[::1]"])  # "::" was ":::port" to gRPC; "[::1]" must not become "[[::1]]"
def test_grpc_listens_on_ipv6_and_refuses_an_empty_classroom_id(tmp_path, host):
    server = GrpcServer(parts(tmp_path, grpc={"host": host, "port": free_port()}))
    server.start()
    try:
        with grpc.insecure_channel(f"[::1]:{server.port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            assert stub.ListClassrooms(pb.ListClassroomsRequest()).classrooms == []
            with pytest.raises(grpc.RpcError) as info:
                stub.GetClassroomState(pb.GetClassroomStateRequest(window_seconds=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classroom_id" in info.value.details()
    finally:
        server.stop()


class _AddAuth(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def _with_auth(self, details):
        return details._replace(metadata=list(details.metadata or []) + AUTH)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_auth(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_auth(details), requests)


def test_signal_end_to_end_with_stream_filtering(coordinator, mosquitto):
    with coordinator.sessions.begin() as s:
        s.add(db.Classroom(id="room-1", name="Room 1", course_id="math"))
    streams = {
        "room-1": Stream(coordinator, classroom_ids=["room-1"]),
        "room-2": Stream(coordinator, classroom_ids=["room-2"]),
        "math": Stream(coordinator, course_ids=["math"]),
        "bio": Stream(coordinator, course_ids=["bio"]),
        "all": Stream(coordinator),
    }
    live = coordinator.hub.subscribe()
    time.sleep(0.3)
    publisher = mqtt_client(mosquitto.url, "test-pub-e2e")
    try:
        publish_confused(publisher, "room-1")
        wait_until(lambda: streams["room-1"].signals and streams["all"].signals and streams["math"].signals)
        time.sleep(1.0)  # more ticks: no second signal (hysteresis + cooldown), nothing leaks to other filters
        signal = streams["room-1"].signals[0]
        assert signal.kind == pb.SLOW_DOWN and signal.course_id == "math" and signal.session_id
        assert signal.reason.startswith("confusion above 50% for") and signal.evidence.learners == 4
        assert [s.id for s in streams["all"].signals] == [signal.id]
        assert [s.id for s in streams["math"].signals] == [signal.id]
        assert streams["room-2"].signals == [] and streams["bio"].signals == []
        with coordinator.sessions() as s:
            row = s.get(db.Signal, signal.id)
            assert row.kind == "SLOW_DOWN" and row.evidence["rule"] == "fast-confusion"
        stub = pb_grpc.CoordinatorStub(streams["all"].channel)
        state = stub.GetClassroomState(pb.GetClassroomStateRequest(classroom_id="room-1", window_seconds=60),
                                       metadata=AUTH)
        assert state.learners == 4 and state.observations == 12 and not state.suppressed
        assert state.window_seconds == 60 and state.session_id == signal.session_id
        rooms = stub.ListClassrooms(pb.ListClassroomsRequest(), metadata=AUTH).classrooms
        assert [(r.classroom_id, r.name, r.session_id, r.agents_online) for r in rooms] == [
            ("room-1", "Room 1", signal.session_id, 1)
        ]
        # the live view gets the short-window state every tick
        states = [item for item in list(live.queue.queue) if isinstance(item, pb.ClassroomState)]
        assert states and all(s.window_seconds == 10 for s in states)
    finally:
        coordinator.hub.unsubscribe(live)
        for stream in streams.values():
            stream.close()
        publisher.loop_stop()


def test_two_instances_split_the_load_without_duplicate_or_lost_signals(tmp_path, mosquitto):
    db_path = tmp_path / "shared.db"
    a = Coordinator(make_config(tmp_path, mosquitto.url, "coord-a", db_path))
    b = Coordinator(make_config(tmp_path, mosquitto.url, "coord-b", db_path))
    for instance in (a, b):
        instance.start()
        assert instance.ingest.connected.wait(10)
    time.sleep(0.3)
    streams = [Stream(a), Stream(b)]
    time.sleep(0.3)
    publisher = mqtt_client(mosquitto.url, "test-pub-split")
    rooms = ["room-a", "room-b", "room-c"]
    try:
        published = sum(publish_confused(publisher, room, agents=2, batches=10) for room in rooms)
        wait_until(lambda: all(len({s.classroom_id for s in st.signals}) == 3 for st in streams))
        time.sleep(1.0)
        # both took part of the stream, and together stored every observation exactly once
        assert a.ingest.counters.observations > 0 and b.ingest.counters.observations > 0
        assert a.ingest.counters.observations + b.ingest.counters.observations == published
        with a.sessions() as s:
            assert s.scalar(select(func.count()).select_from(db.Observation)) == published
            stored = s.execute(select(db.Signal.classroom_id, db.Signal.id)).all()
            open_sessions = s.scalar(select(func.count()).where(db.ClassSession.ended_at.is_(None)))
        assert sorted(room for room, _ in stored) == rooms  # one signal per classroom
        assert open_sessions == 3  # one session per classroom, whoever saw it first
        for stream in streams:  # each instance announced each signal exactly once
            assert sorted(s.id for s in stream.signals) == sorted(i for _, i in stored)
        assert [a.is_leader, b.is_leader].count(True) == 1
        leader, follower = (a, b) if a.is_leader else (b, a)
        leader.stop()
        wait_until(lambda: follower.is_leader, timeout=10)
    finally:
        for stream in streams:
            stream.close()
        publisher.loop_stop()
        for instance in (a, b):
            if not instance._stop.is_set():
                instance.stop()


def test_a_signal_lost_to_a_failed_tick_is_stored_on_the_next_one(tmp_path, mosquitto):
    """The tick that fires a rule fails afterwards (here: writing the window snapshots, on a table the
    database no longer has). The rule must not stay marked as fired without its signal stored: the
    next tick stores it, once."""
    instance = Coordinator(make_config(tmp_path, mosquitto.url, "coord-f", tmp_path / "f.db"))
    start = datetime(2026, 3, 2, 9, 0, 0)  # a whole minute: ticks either side of it cross every window
    batch = make_batch("room-f-ag0", "room-f", 4, CONFUSED, seq=1)
    stamp(batch, (start - datetime(1970, 1, 1)).total_seconds() - 2)  # a whole second before the first tick
    instance.store.write([Received(batch, start - timedelta(seconds=2))], [])

    def rename(table: str, to: str) -> None:
        with instance.sessions.kw["bind"].begin() as conn:
            conn.execute(text(f"ALTER TABLE {table} RENAME TO {to}"))

    def signals() -> int:
        with instance.sessions() as s:
            return s.scalar(select(func.count()).select_from(db.Signal))

    try:
        instance.tick(start - timedelta(seconds=0.9))  # confused from here on; the rule needs 0.5 s
        rename("aggregates", "aggregates_away")
        with pytest.raises(OperationalError, match="no such table: aggregates"):
            instance.tick(start + timedelta(seconds=0.1))  # the rule fires, then the snapshots fail
        assert signals() == 0
        rename("aggregates_away", "aggregates")
        instance.tick(start + timedelta(seconds=0.3))
        instance.tick(start + timedelta(seconds=0.5))
        assert signals() == 1
    finally:
        instance.web.server_close()
        instance.sessions.kw["bind"].dispose()


def test_a_threshold_override_the_rule_could_never_clear_is_ignored_with_a_warning(coordinator, caplog):
    """The settings table is shared with every instance (and writable by SQL): an override of 0 on a
    rule that fires above its threshold would fire at once and stay fired for good."""
    key = policy.threshold_key("fast-confusion")
    with coordinator.sessions.begin() as session:
        session.merge(db.Setting(key=key, value=0))
    with caplog.at_level("WARNING", logger="coordinator.service"):
        assert coordinator._threshold_overrides() == {}
        assert coordinator._threshold_overrides() == {}
    assert [m for m in caplog.messages if key in m] == [
        f"ignoring setting {key} = 0: it must be above 0 and at most 1 for this rule (it fires above its threshold)"]
    with coordinator.sessions.begin() as session:
        session.merge(db.Setting(key=key, value=0.7))
    assert coordinator._threshold_overrides() == {"fast-confusion": 0.7}


def test_health_follows_the_database_and_the_broker(coordinator, mosquitto, monkeypatch, caplog):
    """/healthz and gRPC health say "down" while the database refuses writes (503, NOT_SERVING),
    "ok" again once it takes them (the held batch stored), and "degraded" without a broker."""
    caplog.set_level(logging.INFO, logger="coordinator.service")
    monkeypatch.setattr(health, "STALL_S", 1.0)
    monkeypatch.setattr(health, "tick_deadline_s", lambda _tick: 5.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.grpc.port}")
    probe = health_pb2_grpc.HealthStub(channel)

    def healthz() -> tuple[int, dict]:
        response = requests.get(f"http://127.0.0.1:{coordinator.web.port}/healthz", timeout=5)
        return response.status_code, response.json()

    def grpc_status() -> int:
        return probe.Check(health_pb2.HealthCheckRequest(service="affectedge.v1.Coordinator")).status

    def stored() -> int:
        with coordinator.sessions() as s:
            return s.scalar(select(func.count()).select_from(db.Observation))

    def rename(table: str, to: str) -> None:
        with coordinator.sessions.kw["bind"].begin() as conn:
            conn.execute(text(f"ALTER TABLE {table} RENAME TO {to}"))

    publisher = mqtt_client(mosquitto.url, "test-pub-health")
    try:
        assert healthz() == (200, {"status": "ok", "problems": []}) and grpc_status() == SERVING
        rename("observations", "observations_away")  # every write of a batch now fails
        published = publish_confused(publisher, "room-h", batches=1)
        wait_until(lambda: healthz()[0] == 503)
        code, body = healthz()
        assert body["status"] == "down" and "the database has refused writes" in body["problems"][0]
        assert "observations" not in json.dumps(body)  # the database's own words are for admins only
        assert "no such table: observations" in coordinator.health().db_error
        wait_until(lambda: grpc_status() == NOT_SERVING)
        assert "health ok -> down: the database has refused writes" in caplog.text
        admin = admin_page(coordinator, "/admin/agents")  # the admin sees why, and the counts
        assert 'data-status="down"' in admin and "no such table: observations" in admin
        assert re.search(r'data-counter="db_errors">[1-9]', admin)

        rename("observations_away", "observations")
        wait_until(lambda: healthz() == (200, {"status": "ok", "problems": []}))
        assert stored() == published and coordinator.health().db_error is None
        wait_until(lambda: grpc_status() == SERVING)
        assert "health down -> ok: all clear" in caplog.text

        mosquitto.stop()
        wait_until(lambda: healthz()[1]["status"] == "degraded")
        code, body = healthz()
        assert code == 200 and body["problems"] == [
            "the MQTT broker is unreachable: no new labels arrive; check [mqtt] url and the broker"]
        assert grpc_status() == SERVING  # the API still answers from the database
        assert coordinator.health().counters["observations"] == published
        assert "/healthz" not in caplog.text  # probes stay out of the access log
    finally:
        publisher.loop_stop()
        channel.close()


def test_an_unreachable_notify_socket_is_logged_once_and_changes_nothing(tmp_path, mosquitto, monkeypatch, caplog):
    """systemd's socket gone (or never there): a warning per kind of message, and the service runs on."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-such.sock"))
    monkeypatch.setattr(systemd, "_warned", set())
    instance = Coordinator(make_config(tmp_path, mosquitto.url, "coord-n", tmp_path / "n.db"))
    instance.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{instance.grpc.port}")
        wait_until(lambda: caplog.text.count("cannot tell systemd") == 2)  # READY, then the first STATUS
        time.sleep(2 * health.PERIOD_S)
        probe = health_pb2_grpc.HealthStub(channel)
        check = probe.Check(health_pb2.HealthCheckRequest(service="affectedge.v1.Coordinator"))
        assert check.status == SERVING and instance._monitor.is_alive()
        assert caplog.text.count("cannot tell systemd") == 2 and "cannot tell systemd STATUS through" in caplog.text
        channel.close()
    finally:
        instance.stop()


def admin_page(coordinator: Coordinator, path: str) -> str:
    """``path`` as the dashboard's admin sees it, over HTTP on loopback."""
    base = f"http://127.0.0.1:{coordinator.web.port}"
    with requests.Session() as browser:
        token = re.search(r'name="csrf-token" content="([^"]+)"', browser.get(f"{base}/login", timeout=5).text)
        browser.post(f"{base}/login", data={"username": "admin", "password": "test-admin-password",
                                            "csrf_token": token.group(1)}, timeout=5)
        return browser.get(base + path, timeout=5).text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_cli_config_errors_are_one_line_and_exit_2(tmp_path):
    bad_rules = tmp_path / "bad-rules.toml"
    bad_rules.write_text('[[rule]]\nname = "x"\nsignal = "NAP"\nstates = ["confused"]\nabove = 0.4\n')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    (tmp_path / "not-a-folder").write_text("")
    (tmp_path / "junk.pem").write_text("not PEM\n")
    fine = f'[database]\nurl = "sqlite:///{tmp_path}/y.db"\n[grpc]\nport = {free_port()}\n'
    cases = {
        "missing.toml": None,
        "syntax.toml": "[grpc\nport = 1",
        "unknown.toml": "[mqtt]\nurll = 'mqtt://x'",
        "rules.toml": f'[policy]\nrules = "{bad_rules}"\n[database]\nurl = "sqlite:///{tmp_path}/x.db"',
        "port.toml": f'state_dir = "{tmp_path}"\n[grpc]\nport = {busy_port}\n'
        f'[database]\nurl = "sqlite:///{tmp_path}/x.db"',
        # werkzeug answered a busy web port with exit status 1, which systemd restarts forever
        "web-port.toml": f'state_dir = "{tmp_path}"\n{fine}[web]\nport = {busy_port}\n',
        "state-dir.toml": f'state_dir = "{tmp_path}/not-a-folder"\n{fine}',
        "tls.toml": f'{fine}tls_cert = "{tmp_path}/junk.pem"\ntls_key = "{tmp_path}/junk.pem"\n',
        "webhooks.toml": '[[webhooks]]\nurl = "https://lms.example/hook"\n'
        '[[webhooks]]\nurl = "https://lms.example/hook"\nclassrooms = ["room-2"]\n',
        # each of these once loaded fine and then failed quietly: outlets off, anyone in, no rate limit
        "xapi.toml": '[xapi]\nendpoint = "lrs.example.org/xAPI"',
        "token.toml": '[grpc]\ntokens = [""]',
        "rate.toml": '[web]\nlogin_rate = "five a minute"',
    }
    expected = {
        "missing.toml": "no such config file",
        "syntax.toml": "not valid TOML",
        "unknown.toml": "unknown key `mqtt.urll`",
        "rules.toml": "rule.0.signal",
        "port.toml": f"cannot listen on 127.0.0.1:{busy_port} for gRPC (Address already in use)",
        "web-port.toml": f"cannot listen on 127.0.0.1:{busy_port} for the web app (Address already in use): "
        "change [web] host/port",
        "state-dir.toml": f"state_dir '{tmp_path}/not-a-folder'",
        "tls.toml": "[grpc] tls_cert",
        "webhooks.toml": "webhooks 1 and 2 have the same url",
        "xapi.toml": "xapi.endpoint",
        "token.toml": "grpc.tokens",
        "rate.toml": "web.login_rate",
    }
    try:
        for name, body in cases.items():
            path = tmp_path / name
            if body is not None:
                path.write_text(body)
            result = run_cli("serve", "--config", str(path))
            assert result.returncode == 2, (name, result.stderr)
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and expected[name] in lines[0], (name, result.stderr)
            assert "Traceback" not in result.stderr
    finally:
        busy.close()


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--rate", "0", "'0' is not a number above 0"),
    ("--probes", "0", "'0' is not a number above 0"),
    ("--seconds", "-1", "'-1' is not a number above 0"),
    ("--tick", "inf", "'inf' is not a number above 0"),
    ("--agents", "0", "'0' is not a whole number of at least 1"),
    ("--tracks", "-5", "'-5' is not a whole number of at least 1"),
])
def test_cli_bench_refuses_a_count_or_rate_that_is_not_positive(monkeypatch, capsys, option, value, expected):
    """`--rate 0`/`--probes 0` divided by zero after the broker and coordinators had started, and 0 or negative
    counts ran: argparse refuses them first, one error line and exit 2, so nothing is spawned."""
    from coordinator import bench, cli

    monkeypatch.setattr(bench, "run_bench", lambda args: pytest.fail("the bench started"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", option, value])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"coordinator bench: error: argument {option}: {expected}"]


def test_cli_serve_speaks_sd_notify_and_stops_cleanly_on_sigterm(tmp_path, mosquitto):
    """Under systemd (Type=notify): READY=1 once serving, a STATUS= health line, STOPPING=1 on SIGTERM."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n[mqtt]\nurl = "{mosquitto.url}"\n[database]\nurl = "sqlite:///{tmp_path}/c.db"\n'
        f"[grpc]\nport = {free_port()}\n[web]\nport = {free_port()}\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", "serve", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert notify.recv(512) == b"READY=1"
    status = notify.recv(512).decode()
    assert re.fullmatch(r"STATUS=(ok|degraded): broker (connected|UNREACHABLE), 0 observations stored, 0 malformed, "
                        r"backlog 0(, policy leader)?(; .*)?", status), status
    deadline = time.monotonic() + 30
    output = []
    for line in proc.stdout:
        output.append(line)
        if "ingest connected" in line or time.monotonic() > deadline:
            break
    proc.terminate()
    rest, _ = proc.communicate(timeout=30)
    log = "".join(output) + rest
    assert proc.returncode == 0, log
    assert "received SIGTERM" in log and "stopped" in log and "Traceback" not in log
    notify.settimeout(0.5)
    rest_notified = []
    with contextlib.suppress(TimeoutError):
        while True:
            rest_notified.append(notify.recv(512))
    notify.close()
    assert b"STOPPING=1" in rest_notified


def test_shipped_example_config_is_valid_once_its_token_is_set(tmp_path):
    from coordinator.config import load_config

    example = (ROOT / "deploy" / "coordinator.example.toml").read_text()
    edited = tmp_path / "coordinator.toml"
    edited.write_text(example.replace('password = "change-me"', 'password = "b1e2c3d4e5f60718293a4b5c"'))
    with pytest.raises(ConfigError, match=r"grpc\.tokens.*placeholder"):  # a publicly known token never serves
        load_config(edited)
    edited.write_text(example.replace('"change-me-long-random"', '"3f9a1c0e8b7d6a5f4e3d2c1b0a9f8e7d"'))
    with pytest.raises(ConfigError, match=r"mqtt\.password.*placeholder"):  # nor the broker password
        load_config(edited)
    edited.write_text(example.replace('"change-me-long-random"', '"3f9a1c0e8b7d6a5f4e3d2c1b0a9f8e7d"')
                      .replace('password = "change-me"', 'password = "b1e2c3d4e5f60718293a4b5c"'))
    config = load_config(edited)
    assert config.mqtt.clean_start is False and config.grpc.tokens == ("3f9a1c0e8b7d6a5f4e3d2c1b0a9f8e7d",)
