"""TLS with a client certificate against a real Mosquitto, and credentials that never reach a log."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import start_mosquitto
from edge_support import AGENT_CMD, needs_models, write_config

from affectedge.v1 import affectedge_pb2 as pb
from edge_agent.config import AgentSection, MqttSection, TlsSection
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
PASSWORD = "pw-9f3c1e-never-logged"


def issue(tmp: Path, name: str, ca: tuple[Path, Path] | None, san: str | None = None) -> tuple[Path, Path]:
    """An EC key and a certificate for ``name`` (self-signed when ``ca`` is None), valid one day."""
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", *ec, "-out", str(cert), "-days", "1",
                        "-subj", f"/CN={name}"], check=True, capture_output=True)
    else:
        csr = tmp / f"{name}.csr"
        subprocess.run(["openssl", "req", *ec, "-out", str(csr), "-subj", f"/CN={name}"],
                       check=True, capture_output=True)
        extra = tmp / f"{name}.ext"
        extra.write_text(f"subjectAltName={san}\n" if san else "")
        subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
                        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(extra)],
                       check=True, capture_output=True)
    key.chmod(0o644)  # the broker drops root privileges before it reads its key
    return key, cert


@pytest.fixture
def tls_broker(tmp_path: Path):
    # Mosquitto drops root for its own user before reading certificates; pytest's tmp_path is 0700
    with tempfile.TemporaryDirectory(prefix="edge-tls-") as tmp:
        certs = Path(tmp)
        certs.chmod(0o755)
        ca = issue(certs, "test-ca", None)
        server_key, server_cert = issue(certs, "broker", ca, san="IP:127.0.0.1")
        client = issue(certs, "pc-1", ca)
        broker = start_mosquitto(tmp_path / "mosquitto", f"cafile {ca[1]}\ncertfile {server_cert}\n"
                                                         f"keyfile {server_key}\nrequire_certificate true\n")
        yield broker, ca[1], client
        broker.stop()


def test_publisher_delivers_over_tls_with_a_client_certificate(tls_broker, tmp_path: Path, caplog):
    broker, ca, (key, cert) = tls_broker
    caplog.set_level("DEBUG")
    config = MqttSection(port=broker.port, host="127.0.0.1", tls=TlsSection(ca=ca, cert=cert, key=key),
                         username="pc-1", password=PASSWORD)
    spool = Spool(tmp_path / "s.sqlite3", 10)
    status = pb.AgentStatus(agent_id="pc-1", classroom_id="lab-a", state=pb.AgentStatus.ONLINE)
    publisher = Publisher(config, AgentSection(id="pc-1", classroom="lab-a"), spool, "m1")
    publisher.start(lambda: status)
    try:
        assert publisher.connected.wait(15)
        publisher.publish_batch([], [])
        deadline = time.monotonic() + 15
        while spool.depth and time.monotonic() < deadline:  # emptied only by the broker's PUBACK
            time.sleep(0.05)
        assert spool.depth == 0
    finally:
        publisher.stop(status)
    assert PASSWORD not in caplog.text and PASSWORD not in repr(config)


@needs_models
def test_check_validates_tls_files_and_the_tls_broker(tls_broker, tmp_path: Path):
    broker, ca, (key, cert) = tls_broker
    tls = f'username = "pc-1"\npassword = "{PASSWORD}"\n[mqtt.tls]\nca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n'
    good = write_config(tmp_path / "good.toml", broker.port)
    good.write_text(good.read_text().replace("max_backoff_s = 1\n", "max_backoff_s = 1\n" + tls))
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(good)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines()][-2:] == ["ok    tls", "ok    broker"]

    # the same broker without presenting a client certificate: refused, and said so in one line
    no_cert = write_config(tmp_path / "no-cert.toml", broker.port)
    credentials = f'password = "{PASSWORD}"\nusername = "u"\n[mqtt.tls]\nca = "{ca}"\n'
    no_cert.write_text(no_cert.read_text().replace("max_backoff_s = 1\n", "max_backoff_s = 1\n" + credentials))
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(no_cert)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].startswith("FAIL  broker: ")
    assert PASSWORD not in result.stdout + result.stderr


def test_a_plain_connection_to_the_tls_port_is_named_once_with_the_fix(tls_broker, tmp_path: Path, caplog):
    """The broker closes a plain MQTT connection to its TLS port before any CONNACK: run said nothing but
    "broker unreachable" at INFO, for ever."""
    broker, _, _ = tls_broker
    config = MqttSection(port=broker.port, host="127.0.0.1", max_backoff_s=1)
    status = pb.AgentStatus(agent_id="pc-1", classroom_id="lab-a", state=pb.AgentStatus.ONLINE)
    publisher = Publisher(config, AgentSection(id="pc-1", classroom="lab-a"), Spool(tmp_path / "s.sqlite3", 10), "m1")
    with caplog.at_level("WARNING", logger="edge_agent.publisher"):
        publisher.start(lambda: status)
        try:
            deadline = time.monotonic() + 15
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.5)  # more attempts, 1 s apart: still one warning for this outage
        finally:
            publisher.stop(status, flush_timeout=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"127.0.0.1:{broker.port} closed the connection before accepting it: ")
    assert "add [mqtt.tls]" in warnings[0] and 'mqtt.protocol = "3.1.1"' in warnings[0]


@needs_models
def test_check_names_mqtt_tls_for_a_plain_connection_to_the_tls_port(tls_broker, tmp_path: Path):
    """check blamed username/password and the ACL, which the broker never got to look at."""
    broker, _, _ = tls_broker
    config = write_config(tmp_path / "agent.toml", broker.port)
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(config)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    line = result.stdout.splitlines()[-1]
    assert line.startswith(f"FAIL  broker: 127.0.0.1:{broker.port} closed the connection before accepting it: ")
    assert "add [mqtt.tls]" in line and "username" not in line
