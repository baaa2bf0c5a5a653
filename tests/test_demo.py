"""`make demo DURATION=…`: the whole system on one machine publishes observations and produces signals."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_headless_and_produces_signals(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--duration", "45", "--camera",
         str(ROOT / "edge_agent" / "sample" / "classroom.mp4"), "--state-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/classrooms/demo-room", result.stdout)
    assert re.search(r"login\s+teacher / \S+", result.stdout)
    assert "SIGNAL" in result.stdout
    observations, signals = map(int, re.search(r"demo finished: (\d+) observations stored, (\d+) adaptation signals",
                                               result.stdout).groups())
    assert observations > 0 and signals > 0


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
