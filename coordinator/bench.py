"""``coordinator bench``: ingest throughput and publish-to-signal latency through a real broker.

It runs real ``coordinator serve`` child processes (so each has its own interpreter) against a
real MQTT broker (``--broker spawn`` starts a private Mosquitto) and a real database (a private
SQLite file, ``--database postgres`` for a private PostgreSQL cluster, or a URL of an empty one);
``--instances 2`` runs two coordinators splitting the stream with a shared subscription. It measures:

1. **drain**: simulated agents publish a backlog of QoS 1 ObservationBatches while the
   coordinator is stopped (its persistent session queues them in the broker), then it starts and
   the bench times how fast the observations land in the database. Publishers cannot be the
   bottleneck here, so this is the coordinator's ingest capacity.
2. **live**: agents publish at ``--rate`` batches/s each while probe batches of confused faces go
   to fresh classrooms; the time from publishing a probe to receiving its SLOW_DOWN signal on the
   gRPC stream is the publish-to-signal latency (it includes up to one policy tick). Every
   probe must give exactly one signal: probes without one are reported as lost, extra ones as
   duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import paho.mqtt.client as mqtt
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from affectedge import codec, topics
from affectedge.cli_args import positive_float, positive_int
from affectedge.labels import EMOTIONS
from affectedge.loopback import free_port, wait_for_port
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import db

CALM = (0.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.3)  # happy / neutral: engaged, nothing to signal
CONFUSED = (0.0, 0.0, 0.9, 0.0, 0.0, 0.1, 0.0)  # fear / surprise: confusion ~0.6
PROBE_RULES = """
[[rule]]
name = "bench-probe"
signal = "SLOW_DOWN"
states = ["confused"]
above = 0.5
clear = 0.3
window_s = 10
min_duration_s = 0
cooldown_s = 0
"""


def make_batch(
    agent_id: str, classroom_id: str, tracks: int, distribution=CALM, seq: int = 0, camera_id: str = "cam0"
) -> pb.ObservationBatch:
    """A batch of ``tracks`` one-second observations ending now, all with ``distribution``."""
    batch = pb.ObservationBatch(agent_id=agent_id, classroom_id=classroom_id, model_version="bench", seq=seq)
    label = codec.label_of(max(range(len(EMOTIONS)), key=lambda i: distribution[i]))
    for track in range(tracks):
        obs = batch.observations.add(
            camera_id=camera_id, track_id=track + 1, label=label, confidence=max(distribution), frames=10
        )
        obs.probabilities.extend(distribution)
        obs.quality.score = 0.9
    batch.summaries.add(camera_id=camera_id, faces_present=tracks, frames_processed=10).distribution.extend(
        distribution
    )
    stamp(batch, time.time())
    return batch


def stamp(batch: pb.ObservationBatch, now: float) -> None:
    """Re-time a batch to end at ``now`` (cheaper than building a new one)."""
    end, start = Timestamp(), Timestamp()
    end.FromNanoseconds(int(now * 1e9))
    start.FromNanoseconds(int((now - 1) * 1e9))
    batch.sent_at.CopyFrom(end)
    for obs in batch.observations:
        obs.window_start.CopyFrom(start)
        obs.window_end.CopyFrom(end)
    for summary in batch.summaries:
        summary.timestamp.CopyFrom(end)


def mqtt_client(url: str, client_id: str) -> mqtt.Client:
    """A connected MQTT v5 publisher (loop running) for ``url``."""
    parts = urlsplit(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    return client


def publish(client: mqtt.Client, batch: pb.ObservationBatch) -> mqtt.MQTTMessageInfo:
    return client.publish(
        topics.observations(batch.classroom_id, batch.agent_id), codec.encode(batch), qos=1
    )


@contextlib.contextmanager
def spawned_mosquitto(workdir: Path) -> Iterator[str]:
    """A private Mosquitto on a free loopback port; yields its URL."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("error: mosquitto is not installed: apt-get install mosquitto, or pass --broker URL")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def spawned_postgres() -> Iterator[str]:
    """A private PostgreSQL cluster on a free loopback port; yields its SQLAlchemy URL."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb or (os.geteuid() == 0 and shutil.which("runuser") is None):
        raise SystemExit("error: PostgreSQL is not installed: apt-get install postgresql, or pass --database URL")
    bindir = Path(initdb[-1]).parent
    # not under a private temp dir: the postgres user must be able to enter it
    root = Path(tempfile.mkdtemp(prefix="affectedge-pg-"))
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "start",
                          "-o", f"-p {port} -k {data} -h 127.0.0.1"]),
            check=True, capture_output=True,
        )
        wait_for_port(port)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Server:
    """A ``coordinator serve`` child process and what the bench needs to talk to it."""

    config: Path
    grpc_port: int
    token: str
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--config", str(self.config), "--log-level", "WARNING"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"error: the coordinator exited at start; see {self.log}")
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    channel.close()
                    return
            time.sleep(0.1)
        raise SystemExit(f"error: the coordinator did not become healthy in 30 s; see {self.log}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def _count(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(db.Observation))


def _publish_all(client: mqtt.Client, batches: list[pb.ObservationBatch], rounds: int) -> float:
    """Publish every batch ``rounds`` times as fast as possible; returns seconds taken."""
    started = time.perf_counter()
    last = None
    seq = 0
    for _ in range(rounds):
        for batch in batches:
            seq += 1
            batch.seq = seq
            stamp(batch, time.time())
            last = publish(client, batch)
    if last is not None:
        last.wait_for_publish(120)
    return time.perf_counter() - started


def _database(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> str:
    if args.database == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    if args.database == "postgres":
        return stack.enter_context(spawned_postgres())
    return args.database


def run_bench(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="affectedge-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        url = stack.enter_context(spawned_mosquitto(workdir)) if args.broker == "spawn" else args.broker
        database = _database(args, workdir, stack)
        sessions = db.connect(database)
        if _count(sessions):
            raise SystemExit("error: --database must be empty: the bench counts the observations it stores")
        token = secrets.token_urlsafe(16)
        servers = [_configure(workdir, url, database, token, args, i) for i in range(args.instances)]
        for server in servers:
            stack.callback(server.stop)
        rooms = [f"bench-room-{i // 4}" for i in range(args.agents)]
        batches = [make_batch(f"bench-agent-{i}", rooms[i], args.tracks) for i in range(args.agents)]
        publisher = mqtt_client(url, f"bench-publisher-{os.getpid()}")
        stack.callback(publisher.loop_stop)

        # 1. drain: backlog published while the coordinators are down, then timed as it lands
        for server in servers:
            server.start()  # creates the persistent sessions and their subscriptions
        for server in servers:
            server.stop()
        rounds = max(1, int(args.seconds * args.rate))
        publish_s = _publish_all(publisher, batches, rounds)
        total = rounds * args.agents * args.tracks
        for server in servers:
            server.start()
        first = done = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            count = _count(sessions)
            if count and first is None:
                first = (time.perf_counter(), count)
            if count >= total:
                done = time.perf_counter()
                break
            time.sleep(0.05)
        drained = _count(sessions)
        drain_rate = (drained - first[1]) / (done - first[0]) if first and done and done > first[0] else 0.0

        # 2. live: paced load plus probes, latency measured on the gRPC stream of the first instance
        received, sent = _live(publisher, servers[0], batches, args)
        live_stored = _count(sessions) - drained
        latencies = [received[room][0] - t for room, t in sent.items() if room in received]
        return {
            "database": sessions.kw["bind"].dialect.name,
            "instances": args.instances,
            "agents": args.agents,
            "tracks_per_batch": args.tracks,
            "rate_hz": args.rate,
            "seconds": args.seconds,
            "tick_seconds": args.tick,
            "backlog_observations": total,
            "backlog_publish_obs_per_s": round(total / publish_s),
            "drained_observations": drained,
            "ingest_obs_per_s": round(drain_rate),
            "live_offered_obs_per_s": args.agents * args.tracks * args.rate,
            "live_stored_observations": live_stored,
            "probes_sent": len(sent),
            "signals_received": len(latencies),
            "lost_signals": len(sent) - len(latencies),
            "duplicate_signals": sum(len(times) - 1 for times in received.values()),
            "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "latency_p95_ms": round(1000 * _percentile(latencies, 0.95), 1) if latencies else None,
        }


def _configure(workdir: Path, url: str, database: str, token: str, args: argparse.Namespace, index: int) -> Server:
    rules = workdir / "rules.toml"
    rules.write_text(PROBE_RULES)
    grpc_port = free_port()
    config = workdir / f"coordinator-{index}.toml"
    shared = 'shared_group = "bench"\n' if args.instances > 1 else ""
    config.write_text(
        f'state_dir = "{workdir}"\n'
        f'[mqtt]\nurl = "{url}"\nclient_id = "bench-coordinator-{index}"\n{shared}'
        f'[database]\nurl = "{database}"\n'
        f"[aggregate]\ntick_seconds = {args.tick}\n"
        f'[policy]\nrules = "{rules}"\n'
        f'[grpc]\nport = {grpc_port}\ntokens = ["{token}"]\n'
        f"[web]\nport = {free_port()}\n"
    )
    return Server(config, grpc_port, token, workdir / f"coordinator-{index}.log")


def _live(
    publisher: mqtt.Client, server: Server, batches: list, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Paced load with probes: ({probe room: arrival times of its signals}, {probe room: sent at})."""
    received: dict[str, list[float]] = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = pb_grpc.CoordinatorStub(channel)
    stream = stub.StreamAdaptations(
        pb.StreamAdaptationsRequest(), metadata=[("authorization", f"Bearer {server.token}")]
    )
    ready = threading.Event()

    def listen() -> None:
        ready.set()
        with contextlib.suppress(grpc.RpcError):
            for signal_ in stream:
                received.setdefault(signal_.classroom_id, []).append(time.perf_counter())

    threading.Thread(target=listen, daemon=True).start()
    ready.wait()
    time.sleep(0.5)  # let the stream subscribe before the first probe
    sent: dict[str, float] = {}
    period = 1.0 / args.rate
    started = time.perf_counter()
    seq = 10**9  # clear of the drain phase's sequence numbers
    tick = 0
    while time.perf_counter() - started < args.seconds:
        for batch in batches:
            seq += 1
            batch.seq = seq
            stamp(batch, time.time())
            publish(publisher, batch)
        if tick % max(1, round(args.rate / args.probes)) == 0:
            room = f"probe-{len(sent)}"
            probe = make_batch(f"probe-agent-{len(sent)}", room, 5, CONFUSED, seq=1)
            sent[room] = time.perf_counter()
            publish(publisher, probe)
        tick += 1
        time.sleep(max(0.0, started + tick * period - time.perf_counter()))
    time.sleep(2 * args.tick + 2)  # the last probes' signals, and any duplicate
    stream.cancel()
    channel.close()
    return received, sent


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


def _run(args: argparse.Namespace) -> int:
    result = run_bench(args)
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure ingest throughput and publish-to-signal latency through a real broker",
        description="Simulated agents publish through a real MQTT broker to real `coordinator serve` processes: "
        "first a backlog (ingest rate), then a paced load with latency probes (publish-to-signal p50/p95, "
        "lost and duplicate signals). The default load is 40 agents x 50 faces x 10 batches/s = 20,000 "
        "observations/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--agents", type=positive_int, default=40, help="simulated edge agents (4 per classroom)")
    parser.add_argument("--seconds", type=positive_float, default=10,
                        help="length of the backlog and of the live phase")
    parser.add_argument("--tracks", type=positive_int, default=50, help="observations per batch (faces per agent)")
    parser.add_argument("--rate", type=positive_float, default=10, help="batches per second per agent")
    parser.add_argument("--probes", type=positive_float, default=2, help="latency probes per second in the live phase")
    parser.add_argument("--tick", type=positive_float, default=0.25, help="the coordinator's tick_seconds")
    parser.add_argument("--broker", default="spawn", help="mqtt://host:port, or 'spawn' for a private Mosquitto")
    parser.add_argument("--database", default="sqlite",
                        help="'sqlite' (a private file), 'postgres' (a private PostgreSQL cluster), or the URL "
                             "of an empty database")
    parser.add_argument("--instances", type=int, choices=range(1, 9), default=1, metavar="N",
                        help="coordinators sharing the broker (shared subscription) and the database")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.set_defaults(func=_run)
