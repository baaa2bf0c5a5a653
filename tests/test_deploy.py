"""The systemd units: they verify, start as Type=notify (both services speak sd_notify) and are hardened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARDENED = ("User=affectedge", "ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes", "Restart=on-failure",
            "Type=notify")
UNITS = {
    "affectedge-agent.service": ("edge-agent", (
        "DevicePolicy=closed", "DeviceAllow=char-video4linux rw", "DeviceAllow=char-nvidia* rw",
        "DeviceAllow=/dev/nvidiactl rw", "WatchdogSec=", "StateDirectory=affectedge",
        "--config /etc/affectedge/agent.toml")),
    "affectedge-coordinator.service": ("coordinator", (
        "NotifyAccess=main", "StateDirectory=affectedge-coordinator", "RestartPreventExitStatus=2",
        "--config /etc/affectedge/coordinator.toml", "ReadWritePaths=-/etc/mosquitto/affectedge-auth")),
}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path, name: str):
    executable, directives = UNITS[name]
    unit = (ROOT / "deploy" / "systemd" / name).read_text()
    for directive in HARDENED + directives:
        assert directive in unit
    # verify insists that ExecStart= exists: point it at an executable that does here
    local = tmp_path / name
    local.write_text(unit.replace(f"/opt/affectedge/venv/bin/{executable}", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert name not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_broker_reload_path_unit_watches_the_acl_the_broker_reads(tmp_path: Path):
    """The path unit must watch the very file mosquitto.conf names as its ACL, and start a unit that exists."""
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    acl = next(line.split()[1] for line in conf.splitlines() if line.startswith("acl_file "))
    path_unit = (ROOT / "deploy" / "systemd" / "affectedge-broker-reload.path").read_text()
    assert f"PathChanged={acl}" in path_unit
    started = next(line.split("=", 1)[1] for line in path_unit.splitlines() if line.startswith("Unit="))
    assert "systemctl reload mosquitto.service" in (ROOT / "deploy" / "systemd" / started).read_text()
    coordinator = (ROOT / "deploy" / "systemd" / "affectedge-coordinator.service").read_text()
    assert f"ReadWritePaths=-{Path(acl).parent}" in coordinator  # the coordinator may write what is watched
    for name in ("affectedge-broker-reload.path", "affectedge-broker-reload.service"):
        shutil.copy(ROOT / "deploy" / "systemd" / name, tmp_path / name)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "affectedge-broker-reload.path")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "affectedge-broker-reload" not in result.stderr, result.stderr


def _install_steps(tmp_path: Path, steps: str, running: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``steps`` (shell) after sourcing install.sh, which defines its step functions and runs none, against a
    stub systemctl whose unit is ``running`` or not; the result and the systemctl calls."""
    calls, stubs = tmp_path / "systemctl-calls", tmp_path / "bin"
    stubs.mkdir()
    (stubs / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                     f'[ "$1" != is-active ] || exit {0 if running else 3}\n')
    (stubs / "id").write_text("#!/bin/sh\necho 65534\n")  # should sourcing ever run the steps: not as root
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    script = ROOT / "deploy" / "systemd" / "install.sh"
    result = subprocess.run(["bash", "-c", f'source "{script}" && {steps}'], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return result, calls.read_text().splitlines()


@pytest.mark.parametrize(("running", "restarted"), [(True, True), (False, False)])
def test_reinstalling_restarts_a_running_agent_and_a_first_install_says_how_to_start(tmp_path: Path, running: bool,
                                                                                   restarted: bool):
    """An upgrade told the admin to `systemctl start` the unit, which does nothing while it runs: the agent
    kept the old code and model until a reboot. install.sh's last step, run alone against a stub systemctl."""
    result, called = _install_steps(tmp_path, "finish", running)
    assert called[0] == "is-active --quiet affectedge-agent.service"
    assert ("try-restart affectedge-agent.service" in called) is restarted
    assert ("has been restarted" in result.stdout) is restarted
    assert ("sudo systemctl start affectedge-agent.service" in result.stdout) is not restarted
    assert "TensorRT" not in result.stdout  # no engines were removed


@pytest.mark.parametrize("shipped_again", [False, True])
def test_an_upgrade_that_removes_engines_says_how_to_rebuild_them(tmp_path: Path, shipped_again: bool):
    """Step 4 removes the engines of the model it replaces; the agent's backend "auto" then ran on the CPU,
    saying so only in its journal, while the upgrade said it was restarted "on the new code and model".
    Unless the checkout brought engines of the same names, the last step now says how to rebuild them."""
    prefix = tmp_path / "opt"
    engines = [prefix / "models" / "encoder.nvidia-rtx-a2000-sm86.engine",
               prefix / "models" / "mtcnn" / "pnet.nvidia-rtx-a2000-sm86.engine"]
    for engine in engines:
        engine.parent.mkdir(parents=True, exist_ok=True)
        engine.write_bytes(b"old engine")
    (prefix / "models" / "encoder.onnx").write_bytes(b"onnx")
    ship = " && ".join(f'touch "{engine}"' for engine in engines) if shipped_again else "true"
    result, _ = _install_steps(tmp_path, f'PREFIX="{prefix}" && remove_engines && {ship} && finish', running=True)
    assert all(engine.exists() for engine in engines) is shipped_again
    assert (prefix / "models" / "encoder.onnx").exists()
    notices = [line for line in result.stdout.splitlines() if "TensorRT" in line]
    if shipped_again:
        assert notices == []
        return
    assert len(notices) == 1 and notices[0] == result.stdout.splitlines()[-1]
    assert notices[0].startswith("TensorRT engines removed: they were built for the previous model")
    assert notices[0].endswith(f": cd {prefix} && sudo {prefix}/venv/bin/model_export build --fp16 "
                               "&& sudo systemctl try-restart affectedge-agent.service")
