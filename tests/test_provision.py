"""Provisioning against a real Mosquitto: the generated passwd + ACL pin each agent to its own topic."""

from __future__ import annotations

import base64
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, free_port, start_mosquitto, wait_for_port
from outlets import wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import select

from affectedge import topics
from affectedge.settings import ConfigError, parse
from coordinator import db
from coordinator.cli import main
from coordinator.config import CoordinatorConfig, MqttConfig
from coordinator.provision import ProvisionError, hash_password, provision_agent, set_password
from edge_agent.config import AgentConfig

COORDINATOR, COORDINATOR_PASSWORD = "coordinator", "coordinator-broker-password"
DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"


def config_for(tmp_path: Path, **broker) -> CoordinatorConfig:
    (tmp_path / "broker").mkdir(exist_ok=True)
    return parse({
        "mqtt": {"username": COORDINATOR, "password": COORDINATOR_PASSWORD},
        "database": {"url": f"sqlite:///{tmp_path / 'coordinator.db'}"},
        "broker": {"passwd_file": str(tmp_path / "broker" / "passwd"),
                   "acl_file": str(tmp_path / "broker" / "acl"), **broker},
    }, CoordinatorConfig, "test config")


#: tests run as root in private temp dirs: keep Mosquitto from dropping to its own user, which could
#: not read them (in production the files are group mosquitto, see deploy/mosquitto/mosquitto.conf)
STAY_ROOT = "user root"
NOBODY = 65534


def secured_broker(tmp_path: Path, config: CoordinatorConfig) -> Broker:
    return start_mosquitto(tmp_path / "mosquitto", extra_config=(
        f"allow_anonymous false\npassword_file {config.broker.passwd_file}\nacl_file {config.broker.acl_file}\n"
        f"{STAY_ROOT}"))


class Client:
    """A paho MQTT 5 client that records the CONNACK, PUBACKs, messages and disconnections it gets.

    ``persistent``: a session the broker keeps across disconnections, as coordinator.ingest asks for."""

    def __init__(self, port: int, user: str, password: str, tls_ca: str | None = None,
                 client_id: str | None = None, persistent: bool = False):
        self.connack: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.disconnects: list = []
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{user}",
                                protocol=mqtt.MQTTv5)
        self.mqtt.username_pw_set(user, password)
        if tls_ca:
            self.mqtt.tls_set(ca_certs=tls_ca)
        self.mqtt.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        self.mqtt.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.mqtt.on_disconnect = self._on_disconnect
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if persistent else 0
        self.mqtt.connect("127.0.0.1" if not tls_ca else "localhost", port, clean_start=not persistent,
                          properties=properties)
        self.mqtt.loop_start()
        self.reason = self.connack.get(timeout=10)

    def _on_disconnect(self, _client, _userdata, _flags, reason, _properties) -> None:
        self.disconnects.append(reason)
        # a connection dropped before any CONNACK (e.g. plain MQTT to a TLS port) reports its reason too
        self.connack.put(reason)

    def subscribe(self, *filters: str) -> None:
        granted: queue.Queue = queue.Queue()
        self.mqtt.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.put(codes)
        self.mqtt.subscribe([(f, 1) for f in filters])
        codes = granted.get(timeout=10)
        assert not any(code.is_failure for code in codes), codes

    def publish(self, topic: str, payload: bytes) -> None:
        self.mqtt.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def refused(port: int, user: str, password: str) -> bool:
    client = Client(port, user, password)
    client.close()
    return client.reason.is_failure


def coordinator_subscriber(port: int, tls_ca: str | None = None, user: str = COORDINATOR,
                           password: str = COORDINATOR_PASSWORD) -> Client:
    """Subscribed the way coordinator.ingest is: with the config's default client id and a persistent
    session, a shared subscription to every agent's observations."""
    client = Client(port, user, password, tls_ca, client_id=MqttConfig().client_id, persistent=True)
    assert client.reason == 0
    client.subscribe(topics.shared(f"{topics.PREFIX}/+/+/{topics.OBSERVATIONS}", "coordinators"),
                     f"{topics.PREFIX}/+/+/{topics.STATUS}")
    return client


def test_each_agent_may_publish_only_under_its_own_topic(tmp_path):
    config = config_for(tmp_path)
    one = provision_agent(config, "agent-1", "room-1")
    provision_agent(config, "agent-2", "room-2")
    broker = secured_broker(tmp_path, config)
    try:
        coordinator = coordinator_subscriber(broker.port)
        agent = Client(broker.port, one.username, one.password)
        assert agent.reason == 0
        # forbidden first: another agent's topic, another classroom under its own name, a made-up topic
        agent.publish(topics.observations("room-2", "agent-2"), b"forged")
        agent.publish(topics.observations("room-2", "agent-1"), b"wrong classroom")
        agent.publish(topics.status("room-1", "agent-2"), b"forged status")
        agent.publish(topics.observations("room-1", "agent-1"), b"mine")
        agent.publish(topics.status("room-1", "agent-1"), b"my status")
        got = [coordinator.messages.get(timeout=10) for _ in range(2)]
        assert sorted(got) == [(topics.observations("room-1", "agent-1"), b"mine"),
                               (topics.status("room-1", "agent-1"), b"my status")]
        # the broker delivers one publisher's messages in order: nothing forbidden slipped in before
        assert coordinator.messages.empty()

        assert refused(broker.port, "agent-1", "not-the-password")
        assert refused(broker.port, COORDINATOR, "wrong")
        agent.close()
        coordinator.close()
    finally:
        broker.stop()

    with db.connect(config.database.url)() as s:
        rows = s.execute(select(db.Agent.id, db.Agent.classroom_id, db.Agent.provisioned_at)).all()
    assert {(r.id, r.classroom_id) for r in rows} == {("agent-1", "room-1"), ("agent-2", "room-2")}
    assert all(r.provisioned_at is not None for r in rows)


def test_the_snippet_is_a_valid_agent_config(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here")
    config = config_for(tmp_path, host="broker.school.example", port=8883, tls=True)
    config = config.model_copy(update={"mqtt": config.mqtt.model_copy(update={"tls_ca": str(ca)})})
    result = provision_agent(config, "lab-pc-07", "room-12")
    agent = parse(tomllib.loads(result.config_snippet), AgentConfig, "snippet")
    assert (agent.agent.id, agent.agent.classroom) == ("lab-pc-07", "room-12")
    assert (agent.mqtt.host, agent.mqtt.port, agent.mqtt.username) == ("broker.school.example", 8883, "lab-pc-07")
    assert agent.mqtt.password.get_secret_value() == result.password
    assert agent.mqtt.tls.ca == ca
    assert len(result.password) >= 32


def test_the_snippet_asks_for_the_mode_and_owner_install_sh_gives_the_agent_config(tmp_path):
    """It said "mode 0600", which root-owned locks out the unit's `User=affectedge`: the snippet must ask for what
    deploy/systemd/install.sh installs agent.toml with."""
    install = (DEPLOY_CONF.parents[1] / "systemd" / "install.sh").read_text()
    (mode, owner, group), = re.findall(r'install -m (\d+) -o (\S+) -g (\S+) \S+ "\$CONF/agent\.toml"', install)
    snippet = provision_agent(config_for(tmp_path), "lab-pc-07", "room-12").config_snippet
    comment = " ".join(line.lstrip("# ") for line in snippet.splitlines() if line.startswith("#"))
    assert f"mode {mode}, owner {owner}, group {group}" in comment
    assert f"chown {owner}:{group} /etc/affectedge/agent.toml && chmod {mode} /etc/affectedge/agent.toml" in comment
    assert "0600" not in snippet


def test_python_written_hashes_are_accepted_by_mosquitto(tmp_path, monkeypatch):
    config = config_for(tmp_path)
    monkeypatch.setenv("PATH", "")  # no mosquitto_passwd: provisioning writes the hash itself
    result = provision_agent(config, "agent-1", "room-1")
    lines = Path(config.broker.passwd_file).read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["agent-1", COORDINATOR]
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)
    broker = secured_broker(tmp_path, config)
    try:
        coordinator = coordinator_subscriber(broker.port)
        agent = Client(broker.port, "agent-1", result.password)
        assert agent.reason == 0
        agent.publish(topics.observations("room-1", "agent-1"), b"hello")
        assert coordinator.messages.get(timeout=10)[1] == b"hello"
        assert refused(broker.port, "agent-1", result.password + "x")
        agent.close()
        coordinator.close()
    finally:
        broker.stop()


def test_hash_matches_mosquitto_passwd(tmp_path):
    passwd = tmp_path / "passwd"
    set_password(passwd, "alice", "correct horse")  # the real binary
    _, _, iterations, salt, digest = passwd.read_text().strip().split(":", 1)[1].split("$")
    assert hash_password("correct horse", base64.b64decode(salt), int(iterations)).endswith(f"${digest}")


def test_reprovisioning_rotates_the_password_and_moves_the_agent_after_a_reload(tmp_path):
    config = config_for(tmp_path)
    old = provision_agent(config, "agent-1", "room-1")
    broker = secured_broker(tmp_path, config)
    try:
        new = provision_agent(config, "agent-1", "room-3")
        broker.process.send_signal(signal.SIGHUP)  # what `systemctl reload mosquitto` does
        wait_until(lambda: refused(broker.port, "agent-1", old.password), what="the reload to drop the old password")
        coordinator = coordinator_subscriber(broker.port)
        agent = Client(broker.port, "agent-1", new.password)
        assert agent.reason == 0
        agent.publish(topics.observations("room-1", "agent-1"), b"old room")
        agent.publish(topics.observations("room-3", "agent-1"), b"new room")
        assert coordinator.messages.get(timeout=10) == (topics.observations("room-3", "agent-1"), b"new room")
        assert coordinator.messages.empty()
        agent.close()
        coordinator.close()
    finally:
        broker.stop()
    assert "room-1" not in Path(config.broker.acl_file).read_text()


def production_config(tmp_path: Path, **broker) -> CoordinatorConfig:
    """A coordinator config whose [broker] files sit where deploy/mosquitto/mosquitto.conf's do, moved into
    tmp_path, with a self-signed certificate for the broker's TLS listener."""
    etc, auth = tmp_path / "etc", tmp_path / "auth"
    etc.mkdir()
    auth.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout",
                    str(etc / "broker.key"), "-out", str(etc / "broker.crt")], check=True, capture_output=True)
    return parse({
        "mqtt": {"username": COORDINATOR, "password": COORDINATOR_PASSWORD, "tls_ca": str(etc / "broker.crt")},
        "database": {"url": f"sqlite:///{tmp_path / 'coordinator.db'}"},
        "broker": {"passwd_file": str(auth / "passwd"), "acl_file": str(auth / "acl"),
                   "host": "localhost", "tls": True, **broker},
    }, CoordinatorConfig, "test config")


@contextmanager
def production_broker(tmp_path: Path) -> Iterator[int]:
    """deploy/mosquitto/mosquitto.conf, with its paths moved into tmp_path, on a real broker: its TLS port."""
    port = free_port()
    conf = (DEPLOY_CONF.read_text()
            .replace("/etc/mosquitto/affectedge/", f"{tmp_path / 'etc'}/")
            .replace("/etc/mosquitto/affectedge-auth/", f"{tmp_path / 'auth'}/")
            .replace("/var/lib/mosquitto/", f"{tmp_path}/")
            .replace("listener 8883", f"listener {port} 127.0.0.1")
            .replace("log_dest syslog", "log_dest stderr")) + f"\n{STAY_ROOT}\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    with (tmp_path / "mosquitto.log").open("wb") as log:
        process = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def test_production_template_serves_tls_to_provisioned_agents(tmp_path):
    config = production_config(tmp_path)
    result = provision_agent(config, "agent-1", "room-1")
    with production_broker(tmp_path) as port:
        snippet = parse(tomllib.loads(result.config_snippet), AgentConfig, "snippet")
        coordinator = coordinator_subscriber(port, tls_ca=config.mqtt.tls_ca)
        agent = Client(port, snippet.mqtt.username, snippet.mqtt.password.get_secret_value(), str(snippet.mqtt.tls.ca))
        assert agent.reason == 0
        agent.publish(topics.observations("room-2", "agent-1"), b"not mine")
        agent.publish(topics.observations("room-1", "agent-1"), b"over tls")
        assert coordinator.messages.get(timeout=10)[1] == b"over tls"
        assert coordinator.messages.empty()
        agent.close()
        coordinator.close()
        assert refused(port, "agent-1", result.password)  # plain MQTT is not offered


def test_an_agent_cannot_take_over_the_coordinators_or_another_agents_session(tmp_path):
    """Client ids are predictable (the coordinator's default, affectedge-<classroom>-<agent>): on a broker that
    lets any user claim any client id, agent-1's password kicked the coordinator off its persistent session
    (and with it room-2's batches) or kicked agent-2. The shipped broker must tie each session to its user."""
    config = production_config(tmp_path)
    one = provision_agent(config, "agent-1", "room-1")
    two = provision_agent(config, "agent-2", "room-2")
    ca = config.mqtt.tls_ca
    with production_broker(tmp_path) as port:
        coordinator = coordinator_subscriber(port, tls_ca=ca)
        agent_2 = Client(port, "agent-2", two.password, ca, client_id="affectedge-room-2-agent-2", persistent=True)
        for victim in (MqttConfig().client_id, "affectedge-room-2-agent-2"):
            intruder = Client(port, "agent-1", one.password, ca, client_id=victim, persistent=True)
            assert intruder.reason == 0  # connected, but as its own session
            agent_2.publish(topics.observations("room-2", "agent-2"), f"while {victim} was claimed".encode())
            intruder.close()
            assert coordinator.messages.get(timeout=10) == (
                topics.observations("room-2", "agent-2"), f"while {victim} was claimed".encode())
        assert coordinator.disconnects == [] and agent_2.disconnects == []
        agent_2.close()
        coordinator.close()


def test_each_coordinator_instance_reads_as_its_own_user(tmp_path):
    """Each instance needs its own user on the shipped broker; [broker] coordinator_users grants them all."""
    config = production_config(tmp_path, coordinator_users=[COORDINATOR, "coordinator-b"])
    one = provision_agent(config, "agent-1", "room-1")
    set_password(Path(config.broker.passwd_file), "coordinator-b", "second-instance-password")  # as the admin does
    assert "user coordinator-b\ntopic read affectedge/v1/#" in Path(config.broker.acl_file).read_text()
    with production_broker(tmp_path) as port:
        # both with the config's default client id, which the broker replaces by each one's user
        first = coordinator_subscriber(port, config.mqtt.tls_ca)
        second = coordinator_subscriber(port, config.mqtt.tls_ca, "coordinator-b", "second-instance-password")
        agent = Client(port, "agent-1", one.password, config.mqtt.tls_ca)
        for i in range(4):
            agent.publish(topics.observations("room-1", "agent-1"), b"%d" % i)
        wait_until(lambda: first.messages.qsize() + second.messages.qsize() == 4,
                   what="the shared subscription to deliver all 4 batches")
        assert first.disconnects == [] and second.disconnects == []
        for client in (agent, first, second):
            client.close()


def test_coordinator_users_mistakes_are_one_line(tmp_path):
    with pytest.raises(ProvisionError, match=r"^\[mqtt\] username 'coordinator' is not in \[broker\] "
                                             r"coordinator_users: add it"):
        provision_agent(config_for(tmp_path, coordinator_users=["coordinator-b"]), "agent-1", "room-1")
    with pytest.raises(ProvisionError, match="is a coordinator's broker user"):
        provision_agent(config_for(tmp_path, coordinator_users=[COORDINATOR, "coordinator-b"]),
                        "coordinator-b", "room-1")
    with pytest.raises(ConfigError, match=r"broker\.coordinator_users") as raised:
        config_for(tmp_path, coordinator_users=["coordinator", "two words"])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("mosquitto_passwd", [True, False], ids=["mosquitto_passwd", "python"])
def test_new_files_are_readable_by_the_brokers_group_under_the_units_umask(tmp_path, monkeypatch, mosquitto_passwd):
    """The coordinator unit's UMask=0077 turned touch(mode=0o640) into 0600, which group mosquitto cannot read."""
    if not mosquitto_passwd:
        monkeypatch.setenv("PATH", "")
    config = config_for(tmp_path)
    old = os.umask(0o077)
    try:
        provision_agent(config, "agent-1", "room-1")
        provision_agent(config, "agent-2", "room-1")  # a replacement keeps the mode
    finally:
        os.umask(old)
    for path in (config.broker.passwd_file, config.broker.acl_file):
        assert oct(Path(path).stat().st_mode & 0o777) == oct(0o640), path


def test_cli_prints_the_snippet_and_fails_in_one_line(tmp_path, capsys):
    config = config_for(tmp_path)
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'[mqtt]\nusername = "{COORDINATOR}"\npassword = "{COORDINATOR_PASSWORD}"\n'
        f'[database]\nurl = "{config.database.url}"\n'
        f'[broker]\npasswd_file = "{config.broker.passwd_file}"\nacl_file = "{config.broker.acl_file}"\n')
    assert main(["provision-agent", "agent-5", "--classroom", "room-1", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert parse(tomllib.loads(out), AgentConfig, "stdout").agent.id == "agent-5"
    assert "reload the broker" in err

    assert main(["provision-agent", "bad/name", "--classroom", "room-1", "--config", str(path)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: agent name 'bad/name' is not a valid id") and err.count("\n") == 1

    bare = tmp_path / "bare.toml"
    bare.write_text(f'[mqtt]\nusername = "{COORDINATOR}"\n')
    assert main(["provision-agent", "agent-6", "--classroom", "room-1", "--config", str(bare)]) == 2
    _, err = capsys.readouterr()
    assert "set [broker] passwd_file and acl_file" in err and err.count("\n") == 1

    # a database that cannot be used: one line, and agent-5's password (shown above) still stands
    before = Path(config.broker.passwd_file).read_text()
    (tmp_path / "not-a-dir").write_text("")
    down = tmp_path / "down.toml"
    down.write_text(path.read_text().replace(config.database.url, f"sqlite:///{tmp_path}/not-a-dir/x.db"))
    assert main(["provision-agent", "agent-5", "--classroom", "room-1", "--config", str(down)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: cannot use the database sqlite:///") and err.count("\n") == 1
    assert Path(config.broker.passwd_file).read_text() == before


def _as_nobody(call) -> str:
    """Run ``call`` in a forked child that has dropped to user nobody; the error it raised, or ""."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            call()
            message = ""
        except Exception as exc:  # reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to user nobody, which needs root")
def test_a_broker_directory_the_service_user_cannot_write_is_one_line_and_changes_nothing():
    """The shipped unit's file system is read-only outside its ReadWritePaths: the dashboard's Provision
    button must say how to fix that, not fail halfway with an errno."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # nobody may reach it, not write it
        config = config_for(base)
        (base / "broker").chmod(0o755)
        Path(config.broker.passwd_file).write_text("someone:$7$hash\n")
        message = _as_nobody(lambda: provision_agent(config, "agent-1", "room-1"))
        assert message.startswith(f"ProvisionError: user nobody cannot read and replace {config.broker.passwd_file}: "
                                  "provision as the coordinator's service user"), message
        assert "ReadWritePaths" in message and "\n" not in message
        assert Path(config.broker.passwd_file).read_text() == "someone:$7$hash\n"
        assert not Path(config.broker.acl_file).exists() and not (base / "coordinator.db").exists()
        provision_agent(config, "agent-1", "room-1")  # root may
    finally:
        shutil.rmtree(base)
