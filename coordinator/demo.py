"""``coordinator demo`` (``make demo``): the whole system on one machine, on embedded defaults.

An in-process MQTT broker (amqtt) unless ``--broker`` names one, the coordinator (SQLite,
gRPC, dashboard on localhost) in this process, and one edge agent as a child process — exactly
as it runs on a lab PC — reading camera 0 when one delivers frames, else the bundled sample
video. Adaptation signals stream to the terminal. The demo policy (``demo_rules.toml``) is the
default policy with its windows and durations shortened ~10x, so signals appear within a minute.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from affectedge.loopback import free_port
from affectedge.settings import parse
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db
from coordinator.config import CoordinatorConfig
from coordinator.embedded_broker import EmbeddedBroker
from coordinator.service import Coordinator
from coordinator.users import create_user

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "edge_agent" / "sample" / "classroom.mp4"
DEMO_RULES = Path(__file__).with_name("demo_rules.toml")
DEFAULT_STATE_DIR = ROOT / ".demo"
DEMO_MARKER = ".affectedge-demo"  # in a --state-dir the demo made, and so may empty
DEMO_LOCK = ".demo.lock"  # held by the running demo, holds its pid; never removed, so the lock outlives a reset
CLASSROOM, AGENT, TEACHER = "demo-room", "demo-pc", "teacher"
# `python -c DIES_WITH_PARENT <demo pid> <command…>` asks the kernel to SIGTERM it when the demo dies, then
# becomes the command by exec, which keeps that request (PR_SET_PDEATHSIG is 1 in <linux/prctl.h>)
DIES_WITH_PARENT = """import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):  # the demo died before prctl
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _configure_logging() -> None:
    """Warnings and errors with a timestamp, as today's demo shows them, but without the noise that drowned the
    SIGNAL lines: werkzeug logs every HTTP request (in ANSI colours, even into a file) at INFO, and amqtt warns
    at shutdown about messages it did not forward to clients that had already gone."""
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.ERROR)


def _camera_source(choice: str) -> str:
    """Camera 0 if it delivers a frame, else the sample video (or what the user named)."""
    if choice != "auto":
        return choice
    import cv2

    if Path("/dev/video0").exists():
        capture = cv2.VideoCapture(0)
        ok = capture.isOpened() and capture.read()[0]
        capture.release()
        if ok:
            return "0"
    if not SAMPLE_VIDEO.exists():
        raise SystemExit(f"demo: no camera and no sample video at {SAMPLE_VIDEO}; pass --camera FILE")
    return str(SAMPLE_VIDEO)


def _agent_config(path: Path, broker_url: str, protocol: str, source: str) -> None:
    url = urlparse(broker_url)
    path.write_text(
        f'log_level = "WARNING"\n[agent]\nid = "{AGENT}"\nclassroom = "{CLASSROOM}"\n'
        f'[[cameras]]\nid = "cam0"\nsource = "{source}"\nfps = 15.0\n'
        f'[model]\ndir = "{ROOT / "models"}"\n'
        f'[mqtt]\nhost = "{url.hostname}"\nport = {url.port or 1883}\nprotocol = "{protocol}"\n'
        f'[spool]\npath = "{path.parent / "spool.sqlite3"}"\n'
    )


def _setup_accounts(coordinator: Coordinator, password: str) -> None:
    with coordinator.sessions() as session:
        if not session.query(db.User).filter_by(username=TEACHER).first():
            create_user(session, TEACHER, password, "instructor")
        room = session.get(db.Classroom, CLASSROOM) or db.Classroom(id=CLASSROOM)
        room.name, room.course_id, room.instructor = "Demo classroom", "demo-course", TEACHER
        session.merge(room)
        session.commit()


def _print_signal(item: pb.AdaptationSignal) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] SIGNAL {pb.SignalKind.Name(item.kind):<19} {item.classroom_id}: {item.reason} "
          f"(strength {item.strength:.2f}, rule {item.evidence.rule})", flush=True)


def _reset(state_dir: Path) -> TextIO | None:
    """Empty ``state_dir`` for a fresh demo, but only if a demo made it: never an admin's folder, and never
    the folder of a demo still running there, whose database would vanish under it. Returns the lock file,
    to keep open for the demo's lifetime, or None after a one-line error. A path that cannot be a folder (a
    file, or under one) or that this user may not write is one line, not a NotADirectoryError traceback, and
    is found here, before the broker or the coordinator starts."""
    marker = state_dir / DEMO_MARKER
    try:
        ours = marker.is_file() or state_dir.resolve() == DEFAULT_STATE_DIR  # .demo: the checkout's own
        if state_dir.exists() and any(state_dir.iterdir()) and not ours:
            print(f"error: --state-dir {state_dir} holds files the demo did not create, and the demo empties its "
                  "folder on every start: pass a new or empty folder", file=sys.stderr)
            return None
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(state_dir)
        if lock is None:
            return None
        for entry in state_dir.iterdir():  # each demo starts from an empty database
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != DEMO_LOCK:
                entry.unlink()
        marker.write_text("made by `coordinator demo`, which empties this folder on every start\n")
    except OSError as exc:
        print(f"error: --state-dir {state_dir}: cannot make it the demo's folder ({exc.strerror or exc}): pass a "
              "new or empty folder in a writable place", file=sys.stderr)
        return None
    return lock


def _lock(state_dir: Path) -> TextIO | None:
    """An exclusive flock on ``state_dir``'s lock file, with this pid written in it, or None (after a
    one-line error naming the pid that holds it) when another demo runs there. The kernel drops the lock
    when the demo dies, however it dies, so a killed demo never leaves a stale one."""
    lock = (state_dir / DEMO_LOCK).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"error: another demo is running in {state_dir} (pid {lock.read().strip() or '?'}): stop it, or "
              "pass --state-dir to run a second one", file=sys.stderr)
        lock.close()
        return None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _agent_command(config: Path) -> list[str]:
    """The edge agent, which on Linux the kernel stops (SIGTERM) when the demo dies, however it dies (SIGKILL,
    a crash): an orphaned agent kept the camera busy and reconnected to the next demo's broker under the same
    agent id, doubling its observations. A small exec wrapper sets this up, not a ``preexec_fn``, which would
    make Popen fork() this threaded process (and gRPC log about it) instead of using vfork()."""
    command = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", DIES_WITH_PARENT, str(os.getpid()), *command]


def _broker_ok(url: str) -> bool:
    """Whether ``--broker`` is mqtt://host[:port]. Checked before anything starts, so a mistake is
    named as the option typed, not as the config key ``mqtt.url``; mqtts:// is refused too, since
    the edge agent the demo configures connects without TLS."""
    try:
        parts = urlparse(url)
        return parts.scheme == "mqtt" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port outside 0-65535, an unclosed [IPv6]
        return False


def run(duration: float, camera: str, broker: str | None, web_port: int, state_dir: Path) -> int:
    if broker is not None and not _broker_ok(broker):
        print("error: --broker takes an MQTT broker URL of the form mqtt://host:port, e.g. mqtt://localhost:1883",
              file=sys.stderr)
        return 2
    _configure_logging()
    stop = threading.Event()
    # Ctrl-C, SIGTERM and a closed terminal (SIGHUP) only ask for a stop: the shutdown below then runs once,
    # uninterrupted, and stops the edge agent too
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    lock = _reset(state_dir)
    if lock is None:
        return 2
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker(port=free_port(1883))
        embedded.start()
        broker, protocol, group = embedded.url, "3.1.1", ""
    else:
        protocol, group = "5", "coordinators"
    password = secrets.token_urlsafe(9)
    config = parse({
        "state_dir": str(state_dir),
        "mqtt": {"url": broker, "protocol": protocol, "shared_group": group},
        "database": {"url": f"sqlite:///{state_dir / 'coordinator.db'}"},
        "policy": {"rules": str(DEMO_RULES)},
        "grpc": {"port": free_port(50051)},
        "web": {"port": free_port(web_port), "admin_password": secrets.token_urlsafe(9)},
    }, CoordinatorConfig, "demo defaults")
    coordinator = Coordinator(config)
    coordinator.start()
    _setup_accounts(coordinator, password)
    signals = coordinator.hub.subscribe()
    source = _camera_source(camera)
    agent_toml = state_dir / "agent.toml"
    _agent_config(agent_toml, broker, protocol, source)
    # its own session: the terminal's Ctrl-C reaches the demo only, which stops the agent with SIGTERM
    agent = subprocess.Popen(_agent_command(agent_toml), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             start_new_session=True)
    url = f"http://{config.web.host}:{config.web.port}"
    print(f"\nAffectEdge demo is running\n  dashboard  {url}/classrooms/{CLASSROOM}\n"
          f"  login      {TEACHER} / {password}   (admin: {config.web.admin_user} / {config.web.admin_password})\n"
          f"  gRPC       {config.grpc.host}:{config.grpc.port}\n  broker     {broker}\n"
          f"  camera     {source}\n"
          + (f"  stopping after {duration:.0f} s\n" if duration else "  Ctrl-C stops everything\n"), flush=True)

    started, seen, next_status = time.monotonic(), 0, time.monotonic() + 10
    try:
        while not stop.is_set() and (not duration or time.monotonic() - started < duration):
            if agent.poll() is not None:
                print(f"demo: the edge agent exited with status {agent.returncode}", file=sys.stderr)
                break
            try:
                item = signals.queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if isinstance(item, pb.AdaptationSignal):
                seen += 1
                _print_signal(item)
            if time.monotonic() >= next_status:
                next_status += 10
                print(f"[{time.strftime('%H:%M:%S')}] {_observations(coordinator)} observations stored, "
                      f"{seen} signals", flush=True)
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        observations = _observations(coordinator)
        coordinator.hub.unsubscribe(signals)
        coordinator.stop()
        if embedded:
            embedded.stop()
        lock.close()
    print(f"demo finished: {observations} observations stored, {seen} adaptation signals", flush=True)
    if duration:
        return 0 if observations > 0 and seen > 0 else 1
    return 0


def _observations(coordinator: Coordinator) -> int:
    with coordinator.sessions() as session:
        return session.query(db.Observation).count()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run broker + coordinator + dashboard + one edge agent on this machine")
    p.add_argument("--duration", type=float, default=0,
                   help="seconds to run, then exit 0 if observations and a signal were produced (0 = until Ctrl-C)")
    p.add_argument("--camera", default="auto", help="auto (camera 0, else the sample video), an index, URL or file")
    p.add_argument("--broker", help="use this MQTT broker URL instead of the embedded one")
    p.add_argument("--web-port", type=int, default=8080)
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="where the demo keeps its database; emptied on every start, so it must be new, empty "
                   "or an earlier demo's (default: .demo in the checkout)")
    p.set_defaults(func=lambda a: run(a.duration, a.camera, a.broker, a.web_port, a.state_dir))
