"""Start-up errors the admin can fix: `edge-agent run` exits 2 (systemd does not restart it) with one
line on stderr naming what is wrong, before any camera thread starts, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MODELS, ROOT, free_port
from edge_support import AGENT_CMD, SAMPLE, needs_models, write_config


def run_agent(config: Path, command: str = "run", logged: bool = False) -> str:
    """Run the agent, assert exit 2 and one error line on stderr, return that line. ``logged``: the
    models had begun to load, so INFO log lines may come before it (never a traceback)."""
    result = subprocess.run([*AGENT_CMD, command, "--config", str(config)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    if logged:
        lines = [line for line in lines if " INFO " not in line]
    (line,) = lines
    assert line.startswith("edge-agent: ")
    return line


def models_with_manifest(target: Path, manifest: object) -> Path:
    """A models/ copy (links) whose manifest.json holds ``manifest``."""
    target.mkdir()
    for entry in MODELS.iterdir():
        if entry.name != "manifest.json":
            (target / entry.name).symlink_to(entry)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def use_models(config: Path, models: Path) -> Path:
    config.write_text(config.read_text().replace(f'dir = "{MODELS}"', f'dir = "{models}"'))
    return config


def unprivileged() -> list[str]:
    """The prefix under which file modes apply to the agent: root reads any file, so as root it drops to nobody."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, sys.executable, "-c", ""]).returncode:
        pytest.skip("as root this needs setpriv and a Python that user nobody can run")
    return prefix


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temporary folder every user may enter (pytest's tmp_path is its owner's alone), for the agent as nobody."""
    path = Path(tempfile.mkdtemp())
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def models_with_truncated_onet(target: Path) -> Path:
    """A models/ copy (links) whose mtcnn/onet.onnx is cut short, like an interrupted copy."""
    target.mkdir()
    for entry in MODELS.iterdir():
        if entry.name != "mtcnn":
            (target / entry.name).symlink_to(entry)
    (target / "mtcnn").mkdir()
    for net in ("pnet", "rnet"):
        (target / "mtcnn" / f"{net}.onnx").symlink_to(MODELS / "mtcnn" / f"{net}.onnx")
    (target / "mtcnn" / "onet.onnx").write_bytes((MODELS / "mtcnn" / "onet.onnx").read_bytes()[:1000])
    return target


@needs_models
def test_missing_tls_ca_file(tmp_path: Path):
    ca = tmp_path / "missing-ca.pem"
    config = write_config(tmp_path / "agent.toml", free_port(), extra=f'[mqtt.tls]\nca = "{ca}"\n')
    line = run_agent(config)
    assert f"mqtt.tls.ca = {ca}" in line and "missing or not readable" in line


@needs_models
def test_corrupt_spool_file(tmp_path: Path):
    spool = tmp_path / "spool.sqlite3"
    spool.write_bytes(b"not a database, e.g. a disk error\n" * 200)
    line = run_agent(write_config(tmp_path / "agent.toml", free_port(), spool=spool))
    assert f"spool.path = {spool}" in line and "move a corrupt file away" in line


@needs_models
def test_spool_path_under_a_file(tmp_path: Path):
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool.sqlite3"
    line = run_agent(write_config(tmp_path / "agent.toml", free_port(), spool=spool))
    assert f"spool.path = {spool}" in line


@needs_models
def test_check_tries_the_spool_as_run_opens_it(tmp_path: Path):
    """`check` said ok to a spool.path `run` cannot open (exit 2): a path under a file fails for root too."""
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool.sqlite3"
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(write_config(tmp_path / "agent.toml", free_port(),
                                                                                 spool=spool))],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL  spool")]
    assert f"spool.path = {spool}: cannot open it" in line


@needs_models
def test_a_publisher_that_fails_to_start_leaves_no_camera_running(tmp_path: Path):
    """paho refuses an empty host only in Publisher.start, after the cameras started: a camera thread left
    inside OpenCV at exit made the process abort (SIGABRT), which systemd restarted for ever."""
    from edge_agent import config as agent_config
    from edge_agent.service import Agent

    agent = Agent(agent_config.load(write_config(tmp_path / "agent.toml", free_port())))
    # as an empty host reached paho before config validation refused it
    agent.publisher.config = agent.publisher.config.model_copy(update={"host": ""})
    with pytest.raises(ValueError, match="Invalid host"):
        agent.run()
    assert [t.name for t in threading.enumerate() if t.name.startswith("camera-")] == []


@needs_models
def test_truncated_detector_model(tmp_path: Path):
    models = models_with_truncated_onet(tmp_path / "models")
    line = run_agent(use_models(write_config(tmp_path / "agent.toml", free_port()), models), logged=True)
    assert "onet.onnx does not load" in line and "reinstall the model files" in line


@needs_models
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt(tmp_path: Path):
    config = write_config(tmp_path / "agent.toml", free_port())
    config.write_text(config.read_text().replace('backend = "onnxruntime"', 'backend = "tensorrt"'))
    line = run_agent(config, logged=True)
    assert 'model.backend = "tensorrt"' in line and "tensorrt" in line.split("but", 1)[1]


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_directory_as_config(tmp_path: Path, command: str):
    line = run_agent(tmp_path, command)
    assert str(tmp_path) in line and "cannot read it" in line


@needs_models
def test_model_version_longer_than_the_wire_allows(tmp_path: Path):
    """Every batch carries the version; one the contract refuses must stop start-up, not each publish."""
    manifest = json.loads((MODELS / "manifest.json").read_text())
    models = models_with_manifest(tmp_path / "models", {**manifest, "version": "v" * 65})
    line = run_agent(use_models(write_config(tmp_path / "agent.toml", free_port()), models))
    assert "version has 65 characters" in line and "shorter --version" in line


@needs_models
@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: {k: v for k, v in m.items() if k != "version"}, ': "version" is missing or not a string'),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, ': "files" is missing or not an object'),
    (lambda m: {**m, "window": "8"}, ': "window" is missing or not a whole number'),
    (lambda m: {**m, "files": {"encoder": m["files"]["encoder"]}},
     ': "files.head" is missing or has no "file" and "sha256"'),
    (lambda m: [m], " is not a JSON object"),
], ids=["no-version", "no-files", "window-text", "no-head", "list"])
def test_incomplete_manifest(tmp_path: Path, change, expected: str):
    """A truncated or hand-edited manifest names the key to fix, in `run` (exit 2) and in `check`'s model line."""
    manifest = json.loads((MODELS / "manifest.json").read_text())
    models = models_with_manifest(tmp_path / "models", change(manifest))
    config = use_models(write_config(tmp_path / "agent.toml", free_port()), models)
    message = f"{models / 'manifest.json'}{expected}; reinstall the model files"
    assert run_agent(config) == f"edge-agent: {message}"
    checked = subprocess.run([*AGENT_CMD, "check", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr[-2000:]
    assert checked.stdout.splitlines()[1] == f"FAIL  model: {message}"


@needs_models
@pytest.mark.parametrize(("key", "file"), [("window", "head.onnx"), ("embed_dim", "encoder.onnx")])
def test_manifest_shapes_the_model_files_do_not_have(tmp_path: Path, key: str, file: str):
    """A manifest whose window or embed_dim disagrees with the ONNX files (hand-edited, or a mis-exported
    model; its sha256 covers the files, not itself) is one line naming the file and both values at load, in
    `run` and `bench` (exit 2) and in `check`'s model line, not an ONNX Runtime traceback on the first face."""
    manifest = json.loads((MODELS / "manifest.json").read_text())
    models = models_with_manifest(tmp_path / "models", {**manifest, key: manifest[key] * 2})
    config = use_models(write_config(tmp_path / "agent.toml", free_port()), models)
    message = (f'{models / file} has {key} {manifest[key]} but manifest.json declares "{key}": {manifest[key] * 2}; '
               "re-export the model (model_export export) or reinstall the model files")
    assert run_agent(config) == f"edge-agent: {message}"
    bench = subprocess.run([*AGENT_CMD, "bench", "--video", str(SAMPLE), "--frames", "2", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bench.returncode == 2 and bench.stderr.strip() == f"edge-agent: {message}", bench.stderr[-2000:]
    checked = subprocess.run([*AGENT_CMD, "check", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr[-2000:]
    assert checked.stdout.splitlines()[1] == f"FAIL  model: {message}"


@needs_models
@pytest.mark.parametrize("blocked", [".", "encoder.onnx", "mtcnn"], ids=["models-dir", "encoder", "mtcnn-dir"])
def test_model_files_the_service_user_cannot_read(open_dir: Path, blocked: str):
    """Models copied by root with a private umask: one line naming the path and the chmod, exit 2 (no restart
    loop), and a readable FAIL line from `check`."""
    prefix = unprivileged()
    models = open_dir / "models"
    models.mkdir()
    for entry in MODELS.iterdir():
        if entry.name not in ("encoder.onnx", "mtcnn"):
            (models / entry.name).symlink_to(entry)
    shutil.copy(MODELS / "encoder.onnx", models)  # a copy: its mode is changed below, never the checkout's
    (models / "mtcnn").mkdir()
    for net in (MODELS / "mtcnn").iterdir():
        (models / "mtcnn" / net.name).symlink_to(net)
    spool = open_dir / "spool"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    config = use_models(write_config(open_dir / "agent.toml", free_port(), spool=spool / "spool.sqlite3"), models)
    config.chmod(0o644)
    (models / blocked).chmod(0)
    try:
        run = subprocess.run([*prefix, *AGENT_CMD, "run", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        check = subprocess.run([*prefix, *AGENT_CMD, "check", "--config", str(config)], capture_output=True,
                               text=True, timeout=60, cwd=ROOT)
    finally:
        (models / blocked).chmod(0o755)
    fix = f"(permission denied): make the model files readable by the user the agent runs as, e.g. chmod -R a+rX " \
        f"{models}"
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (line,) = [line for line in run.stderr.splitlines() if " INFO " not in line]
    assert line.startswith(f"edge-agent: cannot read {models / blocked}") and line.endswith(fix), line
    assert check.returncode == 1
    failed = check.stdout.splitlines()[1]
    assert failed.startswith(f"FAIL  model: cannot read {models / blocked}") and failed.endswith(fix), failed
