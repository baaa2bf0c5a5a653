"""`make demo DURATION=…`: the whole system on one machine publishes observations and produces signals."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "edge_agent" / "sample" / "classroom.mp4"


def _start_demo(state_dir: Path, *args: str) -> subprocess.Popen:
    """The demo on the sample video, its stdout and stderr in files beside ``state_dir`` (not pipes, which a
    test that waits on the process would have to drain)."""
    with (state_dir.parent / "stdout").open("w") as stdout, (state_dir.parent / "stderr").open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "coordinator", "demo", "--camera", str(SAMPLE),
                                 "--state-dir", str(state_dir), *args], stdout=stdout, stderr=stderr, cwd=ROOT)


def _output(state_dir: Path, stream: str = "stdout") -> str:
    return (state_dir.parent / stream).read_text()


def _wait_until(condition: Callable[[], bool], demo: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert demo.poll() is None, f"the demo exited ({demo.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def _observations(state_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{state_dir / 'coordinator.db'}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM observations").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def _agents(state_dir: Path) -> list[int]:
    """Pids of the edge agents run with this demo's agent.toml (a zombie's cmdline is empty, so not those)."""
    needle = str(state_dir / "agent.toml").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # it exited meanwhile
            pass
    return pids


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A demo's --state-dir; any edge agent of it still running afterwards is killed, so a failing test
    leaves no orphan spooling into the next demo."""
    yield tmp_path / "demo"
    for pid in _agents(tmp_path / "demo"):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_demo_runs_headless_and_produces_signals(state_dir: Path, tmp_path: Path) -> None:
    """One run, while it runs: a dashboard page is fetched, and a second demo on the same --state-dir is
    refused (it used to delete the running demo's database and start anyway). Its terminal shows the
    banner, status and SIGNAL lines, not werkzeug's ANSI-coloured HTTP access log."""
    demo = _start_demo(state_dir, "--duration", "45")
    try:
        _wait_until(lambda: "dashboard" in _output(state_dir), demo, "banner")
        dashboard = re.search(r"dashboard\s+(http://127\.0\.0\.1:\d+/classrooms/demo-room)", _output(state_dir))
        assert dashboard, _output(state_dir)
        assert urllib.request.urlopen(dashboard[1], timeout=30).status == 200  # via a redirect to /login
        database = (state_dir / "coordinator.db").stat()

        second = subprocess.run(
            [sys.executable, "-m", "coordinator", "demo", "--duration", "1", "--state-dir", str(state_dir)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert second.stderr == (f"error: another demo is running in {state_dir} (pid {demo.pid}): stop it, or "
                                 "pass --state-dir to run a second one\n")
        assert (state_dir / "coordinator.db").stat().st_ino == database.st_ino

        assert demo.wait(240) == 0, _output(state_dir)[-2000:] + _output(state_dir, "stderr")[-2000:]
    finally:
        demo.kill()
    stdout, stderr = _output(state_dir), _output(state_dir, "stderr")
    assert re.search(r"login\s+teacher / \S+", stdout)
    assert "SIGNAL" in stdout
    observations, signals = map(int, re.search(r"demo finished: (\d+) observations stored, (\d+) adaptation signals",
                                               stdout).groups())
    assert observations > 0 and signals > 0
    assert 'HTTP/1.1"' not in stdout + stderr and "\x1b[" not in stdout + stderr, stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["closed-terminal", "killed"])
def test_the_edge_agent_dies_with_the_demo(state_dir: Path, sig: signal.Signals) -> None:
    """A closed terminal (SIGHUP) killed the demo outright and left its agent running under PID 1: it kept
    the camera and sent its backlog and a second live stream into the next demo. Even a SIGKILLed demo,
    which can clean nothing up, must take its agent with it."""
    demo = _start_demo(state_dir)
    try:
        _wait_until(lambda: _observations(state_dir) > 0, demo, "observation from the edge agent")
        assert _agents(state_dir)
        demo.send_signal(sig)
        demo.wait(60)
    finally:
        demo.kill()
    deadline = time.monotonic() + 10
    while _agents(state_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _agents(state_dir) == []
    if sig == signal.SIGHUP:  # a stop, not a death: the demo shut down in order
        assert demo.returncode == 0 and "demo finished" in _output(state_dir), _output(state_dir, "stderr")[-2000:]


def test_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """`--state-dir /var/lib/affectedge-coordinator` must not wipe a production database."""
    precious = tmp_path / "production"
    precious.mkdir()
    (precious / "coordinator.db").write_text("real data")
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--duration", "1", "--state-dir", str(precious)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2 and (precious / "coordinator.db").read_text() == "real data"
    assert result.stderr.startswith(f"error: --state-dir {precious} holds files the demo did not create")
    assert result.stderr.count("\n") == 1


def test_a_broker_without_a_scheme_is_one_line_naming_the_option(tmp_path: Path) -> None:
    """`--broker localhost:1883` was a traceback about `mqtt.url`, a key the user never wrote."""
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--broker", "localhost:1883", "--state-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2 and not (tmp_path / "d").exists()  # refused before anything started
    assert result.stderr.startswith("error: --broker ") and "mqtt://localhost:1883" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["file", "file/demo"], ids=["a-file", "under-a-file"])
def test_a_state_dir_that_cannot_be_a_folder_is_one_line(tmp_path: Path, where: str) -> None:
    """`--state-dir` naming a file, or a path under one, was a NotADirectoryError traceback."""
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / where
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--duration", "1", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
    assert result.stderr == (f"error: --state-dir {state_dir}: cannot make it the demo's folder (Not a directory): "
                             "pass a new or empty folder in a writable place\n")
