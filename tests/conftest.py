"""Shared fixtures: the real parts tests run against (Mosquitto on loopback, ../shared media)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from affectedge.loopback import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = ROOT / "models"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    config: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_mosquitto(workdir: Path, extra_config: str = "", port: int | None = None) -> Broker:
    """A real Mosquitto on a free loopback port; ``extra_config`` is appended to its config."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (make test installs it when run as root)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"persistence true\npersistence_location {workdir}/\n"
        "max_queued_messages 100000\n"
        f"{extra_config}\n"
    )
    log = (workdir / "mosquitto.log").open("ab")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise
    return Broker("127.0.0.1", port, process, config)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh real Mosquitto broker for one test."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    if broker.process.poll() is None:
        broker.stop()


@pytest.fixture(scope="session")
def shared_media() -> Path:
    """``../shared/media`` (a real face photo and a no-face photo); skip when the clone has none."""
    media = SHARED / "media"
    if not (media / "justin.jpg").exists():
        pytest.skip("../shared/media is absent (only developers' and CI's clones have it)")
    return media


@pytest.fixture(scope="session")
def fer_val() -> Path:
    """A class-folder FER2013 val tree, unpacked once from ../shared into a session temp dir."""
    tarball = SHARED / "datasets" / "fer2013" / "fer2013-train-val.tar.gz"
    local = ROOT / "data" / "val"
    if local.is_dir():
        return local
    if not tarball.exists():
        pytest.skip("FER2013 is absent (../shared/datasets/fer2013)")
    target = ROOT / "data"
    target.mkdir(exist_ok=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(target), "val"], check=True)
    return local
