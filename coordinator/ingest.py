"""MQTT ingest: edge agents' label batches and status messages into the database.

Delivery guarantees, and why each setting is there:

* **MQTT v5 persistent session** (``clean_start = false`` + a session expiry): while the
  coordinator is down the broker queues the QoS 1 batches agents publish, and delivers them when
  it reconnects under the same client id.
* **Ack after commit** (paho ``manual_ack``): a batch is acknowledged to the broker only once its
  rows are committed, so a crash between receipt and commit means redelivery, not loss.
* **Stored once**: a batch delivered again (the broker after a lost ack, an edge agent resending
  after a lost PUBACK, to this instance or another, before or after a restart) is recognised by
  its agent, ``seq`` and ``sent_at``, recorded in the database in the transaction that stored it
  (:meth:`Store.write`), and counted as a duplicate instead. Batches without ``seq`` or ``sent_at``
  cannot be told apart from new ones and are always stored.
* **Shared subscription** for observations (``$share/<group>/...``): several coordinators with the
  same group split the batches between them. Statuses use a plain subscription on every instance
  instead: they are few, retained, and brokers never hand retained messages to shared subscribers,
  so a fresh coordinator would otherwise not know which agents are online.

Messages are queued by paho's network thread and written by one writer thread in batches (one
transaction, ``executemany`` per table), which is what lets one instance keep up with thousands of
observations per second. Memory stays bounded whatever agents publish and however long the database
is away: the broker hands over at most :data:`RECEIVE_MAXIMUM` unacknowledged messages (MQTT 5), the
queue holds at most :data:`BACKLOG_BYTES` of payload (a full queue makes paho's network thread wait, so
the broker keeps the rest: MQTT 3.1.1, QoS 0), and a transaction decodes at most
:data:`TRANSACTION_BYTES` of it. Bad payloads are counted and logged at most every few seconds; they are
acknowledged (redelivering them cannot fix them) and never stop ingest. So are batches timed more
than :data:`FUTURE_TOLERANCE_S` after they arrive (an agent whose clock is ahead): stored, they would
keep their classroom's session open until that time.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from affectedge import codec, topics
from affectedge.errors import first_line
from affectedge.v1 import affectedge_pb2 as pb
from coordinator.config import MqttConfig
from coordinator.ratelimit import RateLimitedLog
from coordinator.store import Received, Store, Written, utcnow

log = logging.getLogger(__name__)

OBSERVATION_FILTER = f"{topics.PREFIX}/+/+/{topics.OBSERVATIONS}"
STATUS_FILTER = f"{topics.PREFIX}/+/+/{topics.STATUS}"
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue through a week-long outage
#: unacknowledged QoS 1 messages the broker may have in flight to us: at the broker's 1 MiB packet limit
#: (deploy/mosquitto/mosquitto.conf) that is :data:`BACKLOG_BYTES`, so under MQTT 5 the queue never fills
RECEIVE_MAXIMUM = 64
#: payload bytes queued for the writer; a message arriving at a full queue waits in paho's network thread
BACKLOG_BYTES = 64 * 1024 * 1024
MAX_BATCH = 1000  # MQTT messages per database transaction
#: payload bytes per transaction: decoded batches and their rows take several times their wire size
TRANSACTION_BYTES = 4 * 1024 * 1024
PUT_WAIT_S = 0.5  # a waiting message checks this often whether ingest is stopping
SKEW_TOLERANCE_S = 5.0  # an agent's batches arriving this much off its clock, all minute: warn
SKEW_PERIOD_S = 60.0
FUTURE_TOLERANCE_S = 300.0  # a batch whose labels end further than this after it arrived is refused


@dataclass
class Counters:
    """What ingest has seen: on the admin's agents page while running, logged when ingest stops."""

    messages: int = 0
    observations: int = 0
    statuses: int = 0
    duplicates: int = 0
    malformed: int = 0
    unauthorised: int = 0
    clock_ahead: int = 0  # batches refused: timed in the future (see FUTURE_TOLERANCE_S)
    db_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class _DataRejected(Exception):
    """The database refused the rows themselves, not the connection."""


class ClockWatch:
    """Notices an agent whose clock is off: its labels would fall outside the live windows unseen.

    Windows are cut by the agents' timestamps, so a lab PC running 20 s behind shows as online
    with no learners. Per agent, the smallest gap between ``sent_at`` and arrival over a minute
    is what counts: a backlog (a spool or the broker's queue draining) has large gaps only until
    it is drained, a wrong clock has them on every batch.
    """

    def __init__(self, tolerance_s: float = SKEW_TOLERANCE_S, period_s: float = SKEW_PERIOD_S):
        self.tolerance_s, self.period_s = tolerance_s, period_s
        self._since: dict[str, float] = {}
        self._smallest: dict[str, float] = {}

    def gap(self, agent_id: str, gap_s: float, now_s: float) -> float | None:
        """Record one batch's arrival gap; the smallest gap of a period that exceeded tolerance."""
        since = self._since.setdefault(agent_id, now_s)
        smallest = self._smallest.get(agent_id)
        if smallest is None or abs(gap_s) < abs(smallest):
            self._smallest[agent_id] = smallest = gap_s
        if now_s - since < self.period_s:
            return None
        del self._since[agent_id], self._smallest[agent_id]
        return smallest if abs(smallest) > self.tolerance_s else None


def seconds_ahead(batch: pb.ObservationBatch, now: datetime) -> float:
    """How long after ``now`` (its arrival, naive UTC) the batch's last observation window ends;
    0 for a batch without observations."""
    if not batch.observations:
        return 0.0
    latest = max(obs.window_end.ToSeconds() for obs in batch.observations)
    return latest - now.replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class _Message:
    mid: int
    qos: int
    topic: str
    payload: bytes
    content_type: str | None


class _Backlog:
    """A FIFO of messages bounded in payload bytes, which is what costs memory (a batch is up to a broker's
    packet limit). One message always fits into an empty backlog, however large, so none waits for ever."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._messages: collections.deque[_Message] = collections.deque()
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: _Message, timeout: float) -> bool:
        """Append ``message`` once there is room; False if there was none within ``timeout`` seconds."""
        size = len(message.payload)
        with self._changed:
            if not self._changed.wait_for(lambda: not self._messages or self.bytes + size <= self.limit_bytes,
                                          timeout):
                return False
            self._messages.append(message)
            self.bytes += size
            self._changed.notify_all()
        return True

    def take(self, max_messages: int, max_bytes: int, timeout: float) -> list[_Message]:
        """The oldest messages, at most ``max_messages`` and ``max_bytes`` (at least one); [] after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._messages, timeout):
                return []
            taken = [self._messages.popleft()]
            size = len(taken[0].payload)
            while (self._messages and len(taken) < max_messages
                   and size + len(self._messages[0].payload) <= max_bytes):
                taken.append(self._messages.popleft())
                size += len(taken[-1].payload)
            self.bytes -= size
            self._changed.notify_all()
        return taken


class Ingest:
    def __init__(self, config: MqttConfig, store: Store):
        self.config = config
        self.store = store
        self.counters = Counters()
        self.connected = threading.Event()
        self._queue = _Backlog(BACKLOG_BYTES)
        self._accepting = threading.Event()
        self._stop = threading.Event()
        self._bad = RateLimitedLog(10.0, log)
        self._clocks = ClockWatch()
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self.client = self._client()
        #: while the writer retries a batch the database will not take: since when (monotonic), and why
        self.stalled: tuple[float, str] | None = None

    @property
    def backlog(self) -> int:
        """Messages received and not yet committed (the batch being retried not counted)."""
        return len(self._queue)

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5 if self.config.protocol == "5" else mqtt.MQTTv311,
            clean_session=None if self.config.protocol == "5" else self.config.clean_start,
            manual_ack=True,
        )
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password or None)
        if self.config.tls:
            client.tls_set(
                ca_certs=self.config.tls_ca or None,
                certfile=self.config.tls_cert or None,
                keyfile=self.config.tls_key or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        self._accepting.set()
        self._writer.start()
        if self.config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            self.client.connect_async(self.config.host, self.config.port, keepalive=30,
                                      clean_start=self.config.clean_start, properties=properties)
        else:
            self.client.connect_async(self.config.host, self.config.port, keepalive=30)
        self.client.loop_start()
        log.info("ingest connecting to %s as %s", self.config.url, self.config.client_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, commit and acknowledge what was taken, then disconnect.

        Messages arriving after this point are left unacknowledged, so the broker delivers them
        again on the next start instead of them being lost with this process.
        """
        self._accepting.clear()
        self._stop.set()
        self._writer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("ingest stopped: %s", self.counters.snapshot())

    def _on_connect(self, client, _userdata, flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.config.url, reason_code)
            return
        group = self.config.shared_group
        shared = topics.shared(OBSERVATION_FILTER, group) if group else OBSERVATION_FILTER
        client.subscribe([(shared, self.config.qos), (STATUS_FILTER, self.config.qos)])
        self.connected.set()
        log.info(
            "ingest connected to %s (%s session), subscribed to %s and %s",
            self.config.url,
            "resumed" if flags.session_present else "new",
            shared,
            STATUS_FILTER,
        )

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        if self._accepting.is_set():
            log.warning("lost the broker at %s (%s); reconnecting", self.config.url, reason_code)

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        """Queue ``msg``, waiting while the backlog is full: paho reads nothing more meanwhile, so the broker
        keeps what follows. A message still waiting when ingest stops is left unacknowledged (redelivered)."""
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        message = _Message(msg.mid, msg.qos, msg.topic, msg.payload, content_type)
        while self._accepting.is_set():
            if self._queue.put(message, PUT_WAIT_S):
                return

    def _write_loop(self) -> None:
        while not self._stop.is_set() or len(self._queue):
            messages = self._queue.take(MAX_BATCH, TRANSACTION_BYTES, 0.1)
            if messages:
                self._commit(messages)

    def _commit(self, messages: list[_Message]) -> None:
        received, statuses = self._decode(messages)
        try:
            written = self._store(received, statuses, len(messages))
        except _DataRejected:
            written = self._store_one_by_one(received, statuses)
        if written is None:
            return  # stopping while the database was down: unacknowledged, so redelivered after restart
        self.counters.add(messages=len(messages), observations=written.observations, duplicates=written.duplicates,
                          statuses=len(statuses))
        for m in messages:
            if m.qos:
                self.client.ack(m.mid, m.qos)

    def _store(self, received: list[Received], statuses: list, messages: int) -> Written | None:
        """Write, retrying while the database is unreachable or locked (or fails unexpectedly, which is
        logged: the writer thread must outlive it); None if stopped meanwhile.

        An error about the data itself (a constraint, a value the column cannot hold) raises
        :class:`_DataRejected` instead: retrying the same rows would stall ingest for good.
        """
        while True:
            try:
                written = self.store.write(received, statuses)
                self.stalled = None
                return written
            except (OperationalError, InterfaceError) as exc:  # down, locked or disconnected
                why = first_line(exc)
            except (DBAPIError, ValueError) as exc:  # the rows themselves
                self.stalled = None  # the database answered
                raise _DataRejected(exc) from exc
            except Exception as exc:  # a pool timeout or a bug: keep the batch and the writer thread
                why = f"{type(exc).__name__}: {first_line(exc)}"
            self.counters.add(db_errors=1)
            self.stalled = (self.stalled[0] if self.stalled else time.monotonic(), why)
            self._bad.warning("db", "cannot store %d messages (%s); retrying", messages, why)
            if self._stop.wait(1.0):
                return None

    def _store_one_by_one(self, received: list[Received], statuses: list) -> Written | None:
        """After a data error: store each message alone and drop (count, log) the ones refused."""
        written = Written(0, 0)
        items = [([r], [], f"agent {r.batch.agent_id} seq {r.batch.seq}") for r in received]
        items += [([], [s], f"status of agent {s[0].agent_id}") for s in statuses]
        for one_batch, one_status, what in items:
            try:
                count = self._store(one_batch, one_status, 1)
            except _DataRejected as exc:
                self._malformed(what, f"the database refused it: {first_line(exc.__cause__)}")
                continue
            if count is None:
                return None
            written += count
        return written

    def _decode(self, messages: list[_Message]) -> tuple[list[Received], list[tuple[pb.AgentStatus, datetime]]]:
        now = utcnow()
        received: list[Received] = []
        statuses = []
        for m in messages:
            topic = topics.parse(m.topic)
            if topic is None:
                self._malformed(m.topic, "not an AffectEdge topic")
                continue
            cls = pb.ObservationBatch if topic.kind == topics.OBSERVATIONS else pb.AgentStatus
            try:
                message = codec.decode(m.payload, cls, m.content_type)
            except codec.WireError as exc:
                self._malformed(m.topic, str(exc))
                continue
            if (message.agent_id, message.classroom_id) != (topic.agent, topic.classroom):
                self.counters.add(unauthorised=1)
                self._bad.warning(
                    "unauthorised",
                    "dropped a message on %s claiming agent %r in classroom %r: ids must match the topic",
                    m.topic,
                    message.agent_id,
                    message.classroom_id,
                )
                continue
            if isinstance(message, pb.AgentStatus):
                statuses.append((message, now))
                continue
            if (ahead := seconds_ahead(message, now)) > FUTURE_TOLERANCE_S:
                self._refuse_ahead(message.agent_id, ahead)
                continue
            self._check_clock(message, now)
            received.append(Received(message, now))
        return received, statuses

    def _check_clock(self, batch: pb.ObservationBatch, now: datetime) -> None:
        if not batch.HasField("sent_at"):
            return
        gap = self._clocks.gap(batch.agent_id, (now - batch.sent_at.ToDatetime()).total_seconds(), time.monotonic())
        if gap is not None:
            self._bad.warning(
                f"clock-{batch.agent_id}",
                "agent %s: every batch for a minute arrived %.0f s %s its own clock says it was sent; its clock "
                "is off (turn on NTP there: timedatectl set-ntp true) or it is still sending a backlog. Labels "
                "timed outside the live windows are not counted",
                batch.agent_id, abs(gap), "after" if gap > 0 else "before",
            )

    def _refuse_ahead(self, agent_id: str, ahead_s: float) -> None:
        self.counters.add(clock_ahead=1)
        self._bad.warning(
            f"ahead-{agent_id}",
            "agent %s: dropped a batch timed %s ahead of this coordinator's clock (more than %.0f s); its labels "
            "are dropped until that PC's clock is fixed (turn on NTP there: timedatectl set-ntp true)",
            agent_id, timedelta(seconds=round(ahead_s)), FUTURE_TOLERANCE_S,
        )

    def _malformed(self, topic: str, why: str) -> None:
        self.counters.add(malformed=1)
        self._bad.warning("malformed", "dropped a malformed message on %s: %s", topic[:200], why[:300])
