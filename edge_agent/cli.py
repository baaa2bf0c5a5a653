"""``edge-agent``: run | check | bench | install-service.

Exit status: 0 fine, 1 a check or the run failed, 2 the config or the command line is wrong
(one line on stderr saying what and how to fix it, never a traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from affectedge.cli_args import positive_int
from affectedge.settings import ConfigError
from edge_agent import config as agent_config
from edge_agent.capture import describe, has_frames, open_capture
from edge_agent.config import AgentConfig, MqttSection

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("edge_agent")
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "install.sh"
CHECK_TIMEOUT_S = 10.0


class UsageError(Exception):
    """Wrong input from the user: reported as one line, exit status 2."""


def setup_logging(level: str) -> None:
    # under systemd the journal adds timestamps; elsewhere we do
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


@contextmanager
def _model_errors(config: AgentConfig) -> Iterator[None]:
    """Model files missing, corrupt or unreadable by this user as one line (UsageError, exit 2): restarting
    cannot fix them. PermissionError is turned here too, since the detector's mtcnn/ folder raises it
    while it opens its sessions (edge_agent.faces), not through the manifest."""
    from edge_agent.emotion_model import ModelError, unreadable

    try:
        yield
    except (ModelError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    except PermissionError as exc:
        raise UsageError(str(unreadable(exc.filename or config.model.dir, config.model.dir))) from None


def _writable(path: Path) -> bool:
    """Whether this user can create or replace the file ``path``: checked before a bench that runs for minutes."""
    if path.exists():
        return path.is_file() and os.access(path, os.W_OK)
    return path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)


# -- check ----------------------------------------------------------------------------------------------

def _check_model(config: AgentConfig) -> str:
    import numpy as np

    from edge_agent.service import load_models

    with _model_errors(config):
        model, detector = load_models(config)
    detector.detect(np.zeros((240, 320, 3), np.uint8))
    probs = model.classify(np.repeat(model.embed(np.zeros((1, 48, 48), np.uint8))[:, None], model.window, 1))
    if probs.shape != (1, 7):
        raise RuntimeError(f"the head returned shape {probs.shape}, expected (1, 7); reinstall the model files")
    return f"{model.version} on {model.backend} (window {model.window}); detector on {detector.backend}"


def _check_camera(source: str) -> Callable[[], str]:
    def check() -> str:
        capture = open_capture(source)
        try:
            ok, frame = capture.read() if capture.isOpened() else (False, None)
        finally:
            capture.release()
        if not ok:
            raise RuntimeError(f"cannot read a frame from {describe(source)}: check the device/URL/path, "
                               "and that no other program holds the camera")
        return f"{describe(source)}: {frame.shape[1]}x{frame.shape[0]}"
    return check


def _check_spool(config: AgentConfig) -> str:
    """Open the spool as ``run`` does (service.open_spool), so a spool.path ``run`` refuses fails here too.

    The default path is $STATE_DIRECTORY's, which only the unit has: run by hand, that is the unit's
    state directory, not this working directory. A spool file this check creates is removed again:
    made by another user than the service's (say root), it would lock the service out of it."""
    from edge_agent.service import open_spool

    section = config.spool
    if "path" not in section.model_fields_set and "STATE_DIRECTORY" not in os.environ:
        return "spool.path is not set: the unit keeps it in its StateDirectory= (created by systemd)"
    existed = section.path.exists()
    try:
        spool = open_spool(section)
    except SystemExit as exc:  # a full disk, which `run` exits 1 for
        raise RuntimeError(exc.code) from None
    waiting = spool.depth
    spool.close()
    if not existed:
        for created in (section.path, Path(f"{section.path}-wal"), Path(f"{section.path}-shm")):
            created.unlink(missing_ok=True)
        return f"{section.path}: can be created"
    return f"{section.path}: {waiting} batches waiting"


def _check_tls(config: AgentConfig) -> str:
    from edge_agent.publisher import tls_context

    tls = config.mqtt.tls
    tls_context(tls)
    return f"CA {tls.ca or 'system store'}" + (f", client certificate {tls.cert}" if tls.cert else "")


def _check_broker(config: AgentConfig) -> str:
    """Connect as the agent does and, on MQTT 5, publish one test message as its batches go (QoS 1): the
    broker's ACL answers only in the PUBACK, so a connection alone said ok to an agent whose every batch
    the broker refuses. MQTT 3.1.1 has no PUBACK reason codes: there the connection is all we can test."""
    from edge_agent.publisher import make_client

    mqtt_config = config.mqtt
    client = make_client(mqtt_config, client_id=f"affectedge-check-{config.agent.id}-{os.getpid()}")
    socket.setdefaulttimeout(CHECK_TIMEOUT_S)
    try:
        _connect(client, mqtt_config)
        published = f" and a test message on {_publish_probe(client, config)}" if mqtt_config.protocol == "5" else ""
    finally:
        socket.setdefaulttimeout(None)
        client.disconnect()
        client.loop_stop()
    return f"{mqtt_config.host}:{mqtt_config.port} accepted the connection (MQTT {mqtt_config.protocol}){published}"


def _connect(client: mqtt.Client, mqtt_config: MqttSection) -> None:
    """Connect ``client`` and start its loop, or raise RuntimeError saying why the broker is not usable:
    unreachable, closed before its CONNACK (TLS or protocol mismatch), or refused in it (credentials)."""
    from edge_agent.publisher import connection_refused, unreachable

    answered, connack = threading.Event(), []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        connack.append(reason_code)
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: answered.set()  # after the CONNACK, or without one
    try:
        client.connect(mqtt_config.host, mqtt_config.port, mqtt_config.keepalive_s)
    except OSError as exc:  # refused, no route, unknown host, TLS handshake: all say the same to the admin
        raise RuntimeError(unreachable(mqtt_config, exc)) from None
    client.loop_start()
    if not answered.wait(CHECK_TIMEOUT_S):
        raise RuntimeError(connection_refused(mqtt_config, None, CHECK_TIMEOUT_S))
    if not connack or connack[0].is_failure:
        raise RuntimeError(connection_refused(mqtt_config, connack[0] if connack else None))


def _publish_probe(client: mqtt.Client, config: AgentConfig) -> str:
    """Publish the test message (QoS 1, not retained) and return its topic, or raise RuntimeError with the
    broker's PUBACK refusal and what to fix, as ``run`` would log it for every batch."""
    from edge_agent.publisher import QOS, probe_topic, refusal_fix

    topic, acked, puback = probe_topic(config.agent), threading.Event(), []

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        puback.append(reason_code)
        acked.set()

    client.on_publish = on_publish
    client.publish(topic, b"edge-agent check", QOS)
    if not acked.wait(CHECK_TIMEOUT_S):
        raise RuntimeError(f"no PUBACK for a test message on {topic} in {CHECK_TIMEOUT_S:.0f} s: the broker's "
                           "log says why")
    if puback[0].is_failure:
        raise RuntimeError(f"the broker refused a test message on {topic} ({puback[0]}): "
                           f"{refusal_fix(puback[0], config.agent)}")
    return topic


def check(config: AgentConfig) -> int:
    """One line per check; exit status 1 if any failed."""
    checks: list[tuple[str, Callable[[], str]]] = [("model", lambda: _check_model(config))]
    checks += [(f"camera {c.id}", _check_camera(c.source)) for c in config.cameras]
    checks.append(("spool", lambda: _check_spool(config)))
    if config.mqtt.tls is not None:
        checks.append(("tls", lambda: _check_tls(config)))
    checks.append(("broker", lambda: _check_broker(config)))
    failed = 0
    for name, run in checks:
        try:
            print(f"ok    {name}: {run()}", flush=True)
        except Exception as exc:  # each check reports any failure as its line, then the next runs
            failed += 1
            print(f"FAIL  {name}: {exc}", flush=True)
    return 1 if failed else 0


# -- commands ---------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    config = agent_config.load(args.config)
    setup_logging(config.log_level)
    from edge_agent.service import Agent

    with _model_errors(config):
        agent = Agent(config)
    agent.run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = agent_config.load(args.config)
    setup_logging("WARNING")
    print(f"ok    config: {args.config}", flush=True)
    return check(config)


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent import bench

    if not args.video.is_file():
        raise UsageError(f"{args.video}: no such video file; pass --video with an existing file")
    if args.json and not _writable(args.json):
        raise UsageError(f"--json {args.json}: cannot write a file there; pass a path in an existing, writable "
                         "directory")
    config = agent_config.load(args.config)
    # FFmpeg's own lines ("moov atom not found") would come before the one below; read at the first open
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # AV_LOG_FATAL
    if not has_frames(str(args.video)):
        raise UsageError(f"{args.video}: OpenCV decodes no frame from it; pass --video with a video file "
                         "(e.g. edge_agent/sample/classroom.mp4)")
    if args.detect_every:
        config = config.model_copy(update={"detection": config.detection.model_copy(
            update={"every": args.detect_every})})
    setup_logging("WARNING")
    with _model_errors(config):
        result = bench.bench(args.video, config, args.frames)
    print(bench.render(result))
    if args.json:
        bench.write_json(result, args.json)
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    if not INSTALL_SCRIPT.exists():
        raise UsageError(f"{INSTALL_SCRIPT} is missing: run deploy/systemd/install.sh from a source checkout")
    if os.geteuid() != 0:
        raise UsageError(f"installing a system service needs root: sudo {INSTALL_SCRIPT}")
    return subprocess.call([str(INSTALL_SCRIPT)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="AffectEdge edge agent: cameras -> emotions -> MQTT")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    run.add_argument("--config", type=Path, default=agent_config.DEFAULT_PATH,
                     help=f"agent config (default: {agent_config.DEFAULT_PATH})")
    run.set_defaults(func=cmd_run)
    chk = sub.add_parser("check", help="check model, cameras, spool, TLS files and broker "
                                           "(with a test message on MQTT 5); one line each")
    chk.add_argument("--config", type=Path, default=agent_config.DEFAULT_PATH,
                     help=f"agent config (default: {agent_config.DEFAULT_PATH})")
    chk.set_defaults(func=cmd_check)
    ben = sub.add_parser("bench", help="measure the pipeline on a video file, as fast as it goes")
    ben.add_argument("--video", type=Path, required=True,
                     help="a video file read as if it were a camera (e.g. edge_agent/sample/classroom.mp4)")
    ben.add_argument("--config", type=Path, default=None, help="agent config (default: built-in defaults)")
    ben.add_argument("--json", type=Path, default=None, help="also write the results here")
    ben.add_argument("--frames", type=positive_int, default=None,
                     help="stop after this many frames (default: the whole video)")
    ben.add_argument("--detect-every", type=positive_int, default=None,
                     help="run the face detector on every Nth frame, tracking in between (default: the "
                          "config's detection.every)")
    ben.set_defaults(func=cmd_bench)
    ins = sub.add_parser("install-service", help="install the systemd service (runs deploy/systemd/install.sh)")
    ins.set_defaults(func=cmd_install_service)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
