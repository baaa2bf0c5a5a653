"""The agent as IT runs it: a real process on the sample video, a real Mosquitto, systemd's protocols."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, free_port, start_mosquitto
from edge_support import AGENT_CMD, SAMPLE, Subscriber, edge_agent, needs_models, write_config
from google.protobuf.descriptor import FieldDescriptor
from paho.mqtt.client import topic_matches_sub

from affectedge import codec, topics
from affectedge.v1 import affectedge_pb2 as pb
from coordinator.embedded_broker import EmbeddedBroker
from coordinator.ingest import OBSERVATION_FILTER, STATUS_FILTER
from coordinator.provision import acl_text
from edge_agent.config import AgentSection
from edge_agent.publisher import probe_topic

STATUS = topics.status("lab-a", "pc-1")
OBSERVATIONS = topics.observations("lab-a", "pc-1")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"\x00\x00\x00\x18ftyp", b"RIFF")


def decode(message) -> pb.ObservationBatch | pb.AgentStatus:
    kind = topics.parse(message.topic)
    assert kind is not None, f"unexpected topic {message.topic}"
    cls = pb.ObservationBatch if kind.kind == topics.OBSERVATIONS else pb.AgentStatus
    decoded = codec.decode(message.payload, cls)
    # nothing rides along: re-encoding the decoded message gives back the exact payload
    assert decoded.SerializeToString() == message.payload
    return decoded


def has_bytes_field(descriptor, seen=None) -> bool:
    seen = seen if seen is not None else set()
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    return any(f.type == FieldDescriptor.TYPE_BYTES
               or (f.message_type is not None and has_bytes_field(f.message_type, seen))
               for f in descriptor.fields)


@needs_models
def test_privacy_only_labels_leave_the_agent_and_systemd_lifecycle(mosquitto, tmp_path: Path):
    """Subscribe to '#' while the agent runs on the sample video: only valid label messages appear,
    the agent writes nothing but its spool, and it speaks sd_notify READY/WATCHDOG/STOPPING."""
    assert not has_bytes_field(pb.ObservationBatch.DESCRIPTOR)
    assert not has_bytes_field(pb.AgentStatus.DESCRIPTOR)
    work, tmp, home = (tmp_path / d for d in ("work", "tmp", "home"))
    for d in (work, tmp, home):
        d.mkdir()
    config = write_config(tmp_path / "agent.toml", mosquitto.port, spool=work / "spool.sqlite3")
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    everything = Subscriber(mosquitto.port, "#")
    agent = edge_agent("run", "--config", str(config), cwd=work, env={
        "TMPDIR": str(tmp), "HOME": str(home), "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "400000"})
    try:
        assert notify.recv(256) == b"READY=1"
        assert notify.recv(256) == b"WATCHDOG=1"
        everything.wait_for(lambda ms: sum(m.topic == OBSERVATIONS and len(decode(m).observations) > 0
                                           for m in ms) >= 4, timeout=40)
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    notified = []
    notify.settimeout(0.5)
    while True:
        try:
            notified.append(notify.recv(256))
        except TimeoutError:
            break
    notify.close()
    assert agent.returncode == 0, stderr.decode()[-2000:]
    assert b"STOPPING=1" in notified

    everything.wait_for(lambda ms: ms[-1].topic == STATUS)
    messages = everything.received()
    everything.close()
    batches = [decode(m) for m in messages if m.topic == OBSERVATIONS]
    statuses = [decode(m) for m in messages if m.topic == STATUS]
    assert {m.topic for m in messages} == {STATUS, OBSERVATIONS}
    for m in messages:
        assert not m.payload.startswith(IMAGE_MAGIC)
        assert len(m.payload) < 8192  # labels for a handful of learners, nowhere near an image
    for batch in batches:
        for obs in batch.observations:
            assert len(obs.probabilities) == 7
            assert obs.label != pb.EMOTION_UNSPECIFIED and obs.frames >= 1
            # of the face measurements only the combined quality score is published
            assert 0 < obs.quality.score <= 1
            assert [f.name for f, _ in obs.quality.ListFields()] == ["score"]
        assert [len(s.distribution) for s in batch.summaries if s.faces_present] == \
            [7] * sum(1 for s in batch.summaries if s.faces_present)
    assert [b.seq for b in batches] == sorted({b.seq for b in batches})
    assert max(len(b.observations) for b in batches) == 4  # the sample's four learners
    assert statuses[0].state == pb.AgentStatus.ONLINE
    assert statuses[-1].state == pb.AgentStatus.OFFLINE and statuses[-1].detail == "stopped"

    # nothing but the spool touched the disk: no frames, crops or embeddings anywhere
    written = sorted(str(p.relative_to(tmp_path)) for d in (work, tmp, home) for p in d.rglob("*"))
    assert written and all(p.startswith("work/spool.sqlite3") for p in written), written
    assert b"Traceback" not in stderr


@needs_models
def test_last_will_announces_offline_when_the_agent_is_killed(mosquitto, tmp_path: Path):
    config = write_config(tmp_path / "agent.toml", mosquitto.port)
    agent = edge_agent("run", "--config", str(config))
    try:
        watcher = Subscriber(mosquitto.port, STATUS)
        first = watcher.wait_for(lambda ms: len(ms) >= 1, timeout=40)[0]
        assert codec.decode(first.payload, pb.AgentStatus).state == pb.AgentStatus.ONLINE
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        watcher.wait_for(lambda ms: codec.decode(ms[-1].payload, pb.AgentStatus).state
                         == pb.AgentStatus.OFFLINE)
        watcher.close()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate()
    late = Subscriber(mosquitto.port, STATUS)  # joins after the death: gets the retained Will
    will = late.wait_for(lambda ms: len(ms) >= 1)[0]
    late.close()
    assert will.retain
    status = codec.decode(will.payload, pb.AgentStatus)
    assert status.state == pb.AgentStatus.OFFLINE
    assert "Last Will" in status.detail
    assert will.content_type == "application/x-protobuf; proto=affectedge.v1.AgentStatus"


@needs_models
def test_check_reports_one_line_per_check(mosquitto, tmp_path: Path):
    good = write_config(tmp_path / "good.toml", mosquitto.port)
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(good)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok    config", "ok    model", "ok    camera cam0",
                                                      "ok    spool", "ok    broker"]
    assert "640x480" in lines[2]
    assert not (tmp_path / "spool.sqlite3").exists()  # what check created it removed: run may be another user

    bad = write_config(tmp_path / "bad.toml", free_port(), source=tmp_path / "missing.mp4",
                       extra=f'[mqtt.tls]\nca = "{tmp_path / "missing-ca.pem"}"\n')
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "ok    config", "ok    model", "FAIL  camera cam0", "ok    spool", "FAIL  tls", "FAIL  broker"]
    nobody = free_port()
    unreachable = write_config(tmp_path / "unreachable.toml", nobody)
    result = subprocess.run([*AGENT_CMD, "check", "--config", str(unreachable)],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == (
        f"FAIL  broker: cannot reach 127.0.0.1:{nobody} (Connection refused): check mqtt.host/port/tls and "
        "that the broker runs")
    assert "Traceback" not in result.stdout + result.stderr


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT_CMD, "check", "--config", str(config)], capture_output=True, text=True, timeout=120)


@needs_models
def test_check_names_mqtt_protocol_for_a_broker_without_mqtt_5(tmp_path: Path):
    """amqtt (the demo's broker) refuses MQTT 5 in its CONNACK: check blamed username/password and the ACL."""
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    try:
        result = run_check(write_config(tmp_path / "agent.toml", broker.port))
    finally:
        broker.stop()
    assert result.returncode == 1
    line = result.stdout.splitlines()[-1]
    assert line.startswith(f"FAIL  broker: 127.0.0.1:{broker.port} refused the connection (Unsupported protocol")
    assert 'set mqtt.protocol = "3.1.1"' in line and "username" not in line


@needs_models
def test_check_publishes_a_test_message_the_provisioned_acl_must_allow(tmp_path: Path):
    """A connection alone said ok while the broker's ACL refused every batch: check publishes one message
    where the ACL `coordinator provision-agent` writes lets the agent publish, and no consumer listens."""
    probe = probe_topic(AgentSection(id="pc-1", classroom="lab-a"))
    assert not any(topic_matches_sub(f, probe) for f in (OBSERVATION_FILTER, STATUS_FILTER, topics.ALL))
    acl = tmp_path / "acl"
    acl.write_text(acl_text(["coordinator"], [("pc-1", "lab-b")]))  # provisioned for another classroom
    broker = start_mosquitto(tmp_path / "mosquitto", f"acl_file {acl}\nuser root")  # root: reads tmp_path
    config = write_config(tmp_path / "agent.toml", broker.port)
    config.write_text(config.read_text().replace("max_backoff_s = 1\n", 'max_backoff_s = 1\nusername = "pc-1"\n'))
    try:
        refused = run_check(config)
        acl.write_text(acl_text(["coordinator"], [("pc-1", "lab-a")]))
        broker.process.send_signal(signal.SIGHUP)  # mosquitto rereads its ACL
        allowed = run_check(config)
    finally:
        broker.stop()
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[-1] == (
        f"FAIL  broker: the broker refused a test message on {probe} (Not authorized): check the broker ACL allows "
        "agent 'pc-1' in classroom 'lab-a' to publish there, e.g. re-run `coordinator provision-agent`")
    assert allowed.returncode == 0, allowed.stdout
    assert allowed.stdout.splitlines()[-1].endswith(f"accepted the connection (MQTT 5) and a test message on {probe}")


@pytest.mark.parametrize(("body", "expected"), [
    ('[agent]\nid = "pc 1"\n', "agent.id"),
    ("[mqtt]\nprot = 1883\n", "unknown key `mqtt.prot`"),
    ('[mqtt]\nprotocol = "4"\n', "mqtt.protocol"),
    ("[[cameras]]\nid = \"a\"\n[[cameras]]\nid = \"a\"\n", "camera ids must be unique"),
    ("[agent\n", "not valid TOML"),
    ('[model]\nbackend = "tensorrt"\nint8 = true\n', "model_export build --int8"),
    (None, "no such config file"),
    ('[mqtt]\nhost = ""\n', "key `mqtt.host`"),
    ("[output]\ninterval_s = 5\n", "key `output.interval_s`"),  # k is judged per second across agents
    ("".join(f'[[cameras]]\nid = "c{i}"\nsource = "{i}"\n' for i in range(17)), "key `cameras`"),  # > MAX_CAMERAS
    ('[mqtt]\npassword = "s3cret"\n', "key `mqtt`: Value error, `password` is set without `username`"),
    ("[[cameras]]\nwidth = 640\n", "key `cameras.0`: Value error, set both `width` and `height`"),
    ("[[cameras]]\nheight = 480\n", "key `cameras.0`: Value error, set both `width` and `height`"),
])
def test_config_errors_exit_2_with_one_line(tmp_path: Path, body, expected):
    path = tmp_path / "agent.toml"
    if body is not None:
        path.write_text(body)
    for command in ("run", "check"):
        result = subprocess.run([*AGENT_CMD, command, "--config", str(path)],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_documented_check_runs_as_the_unit_does():
    """`check` must see what the service sees: model.dir ("models") is relative, so it runs as the unit's
    User= in its WorkingDirectory=, or it tests another folder's models."""
    unit = (ROOT / "deploy" / "systemd" / "affectedge-agent.service").read_text()
    user, workdir = (re.search(rf"^{key}=(.+)$", unit, re.M)[1] for key in ("User", "WorkingDirectory"))
    command = f"cd {workdir} && sudo -u {user} {workdir}/venv/bin/edge-agent check --config /etc/affectedge/agent.toml"
    readme = (ROOT / "README.md").read_text().splitlines()
    assert [line for line in readme if "edge-agent check" in line and "sudo" in line] == [command]
    script = (ROOT / "deploy" / "systemd" / "install.sh").read_text()
    assert re.search(r"^PREFIX=(.+)$", script, re.M)[1] == workdir
    assert re.search(r"^CONF=(.+)$", script, re.M)[1] == "/etc/affectedge"
    shown = command.replace(workdir, "$PREFIX").replace("/etc/affectedge", "$CONF")
    assert [line.split(". ", 1)[1] for line in script.splitlines() if "edge-agent check" in line] == [shown]


def test_example_config_is_the_defaults():
    from edge_agent import config

    assert config.load(ROOT / "deploy" / "agent.example.toml") == config.load(None)


@needs_models
def test_bench_reports_throughput_stages_and_resources(tmp_path: Path):
    out = tmp_path / "bench.json"
    result = subprocess.run([*AGENT_CMD, "bench", "--video", str(SAMPLE), "--frames", "60",
                             "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["frames"] == 60 and report["fps"] > 0
    assert report["stages_ms"]["detect"]["n"] == 12  # every 5th frame
    for stage in ("decode", "track", "align", "encode", "head", "publish"):
        assert report["stages_ms"][stage]["n"] > 0, stage
    assert report["latency_ms"]["n"] > 0
    assert report["frames_with_face_pct"] > 90 and report["rss_mb"] > 0
    assert "frames/s" in result.stdout


@needs_models
def test_bench_runs_the_int8_encoder_when_configured(tmp_path: Path):
    config = write_config(tmp_path / "agent.toml", free_port())
    config.write_text(config.read_text().replace('backend = "onnxruntime"', 'backend = "onnxruntime"\nint8 = true'))
    out = tmp_path / "bench.json"
    result = subprocess.run([*AGENT_CMD, "bench", "--video", str(SAMPLE), "--frames", "20", "--config", str(config),
                             "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == "onnxruntime-int8" and report["stages_ms"]["encode"]["n"] > 0


def test_bench_missing_video_exits_2_with_one_line():
    result = subprocess.run([*AGENT_CMD, "bench", "--video", "missing.mp4"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line == "edge-agent: missing.mp4: no such video file; pass --video with an existing file"


def bench_error(*args: str, cwd: Path = ROOT) -> str:
    """Run ``edge-agent bench ARGS``, assert exit 2 with one line and no output (nothing benched), return it."""
    result = subprocess.run([*AGENT_CMD, "bench", *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    return line


def test_bench_default_config_outside_the_checkout_names_the_missing_manifest(tmp_path: Path):
    line = bench_error("--video", str(SAMPLE), "--frames", "1", cwd=tmp_path)
    assert line == (f"edge-agent: {tmp_path / 'models' / 'manifest.json'} is missing: point model.dir at the "
                    "shipped models/ folder")


def test_bench_refuses_a_file_that_is_no_video(tmp_path: Path):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n")
    assert bench_error("--video", str(notes)) == (
        f"edge-agent: {notes}: OpenCV decodes no frame from it; pass --video with a video file "
        "(e.g. edge_agent/sample/classroom.mp4)")


@pytest.mark.parametrize("target", ["missing-dir/bench.json", "."], ids=["no-such-dir", "a-directory"])
def test_bench_checks_the_json_path_before_it_runs(tmp_path: Path, target: str):
    out = tmp_path / target
    assert bench_error("--video", str(SAMPLE), "--json", str(out)) == (
        f"edge-agent: --json {out}: cannot write a file there; pass a path in an existing, writable directory")


@pytest.mark.parametrize(("flag", "value"), [("--frames", "0"), ("--detect-every", "-2"), ("--frames", "ten")])
def test_bench_counts_below_1_are_refused_before_any_work(flag: str, value: str):
    result = subprocess.run([*AGENT_CMD, "bench", "--video", str(SAMPLE), flag, value], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"argument {flag}: '{value}' is not a whole number of at least 1")


def test_missing_model_files_exit_2_with_one_line(tmp_path: Path):
    config = write_config(tmp_path / "agent.toml", free_port())
    config.write_text(config.read_text().replace(f'dir = "{ROOT / "models"}"', f'dir = "{tmp_path}"'))
    result = subprocess.run([*AGENT_CMD, "run", "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("edge-agent: ")
    assert "manifest.json is missing" in result.stderr and "Traceback" not in result.stderr
