"""Start-up errors the admin can fix: `edge-agent run` exits 2 (systemd does not restart it) with one
line on stderr naming what is wrong, before any camera thread starts, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from conftest import MODELS, ROOT, free_port
from edge_support import AGENT_CMD, needs_models, write_config


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
def test_truncated_detector_model(tmp_path: Path):
    models = models_with_truncated_onet(tmp_path / "models")
    config = write_config(tmp_path / "agent.toml", free_port())
    config.write_text(config.read_text().replace(f'dir = "{MODELS}"', f'dir = "{models}"'))
    line = run_agent(config, logged=True)
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
    models = tmp_path / "models"
    models.mkdir()
    for entry in MODELS.iterdir():
        if entry.name != "manifest.json":
            (models / entry.name).symlink_to(entry)
    manifest = json.loads((MODELS / "manifest.json").read_text())
    (models / "manifest.json").write_text(json.dumps({**manifest, "version": "v" * 65}))
    config = write_config(tmp_path / "agent.toml", free_port())
    config.write_text(config.read_text().replace(f'dir = "{MODELS}"', f'dir = "{models}"'))
    line = run_agent(config)
    assert "version has 65 characters" in line and "shorter --version" in line
