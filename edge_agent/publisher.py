"""MQTT out: observation batches through the spool (QoS 1, in order), the retained status, the Last Will.

* ``.../observations`` — every :class:`ObservationBatch` is first appended to the on-disk
  :class:`~edge_agent.spool.Spool`; a sender thread hands the oldest rows to paho-mqtt while
  connected (at most ``MAX_INFLIGHT`` unacknowledged) and deletes each row on its PUBACK. paho
  re-sends unacknowledged messages itself after a reconnect, and MQTT keeps one client's QoS 1
  messages in order, so batches arrive in ``seq`` order. A batch the broker refuses for now (MQTT 5:
  its ACL, a quota) stays in the spool and goes again after a back-off, with those after it, in order;
  only one it can never accept (:data:`PERMANENT_REFUSALS`) is dropped and counted. No packet exceeds the
  broker's Maximum Packet Size (:mod:`edge_agent.packets`): a batch too large goes as several smaller ones.
* ``.../status`` — a retained :class:`AgentStatus`: ONLINE on every (re)connect, refreshed by the
  service, OFFLINE on a clean stop; the same OFFLINE message is the Last Will, so the broker
  announces a crashed or unplugged agent by itself.

MQTT 5 carries the wire format in the Content Type property (``codec.content_type``); MQTT 3.1.1
(e.g. the demo's amqtt broker) has no properties and consumers sniff JSON vs protobuf. The password
and key paths go to paho only; nothing here logs them.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable

import paho.mqtt.client as mqtt
from google.protobuf.timestamp_pb2 import Timestamp
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from affectedge import codec, topics
from affectedge.errors import first_line
from affectedge.settings import ConfigError
from affectedge.v1 import affectedge_pb2 as pb
from edge_agent.config import AgentSection, MqttSection, TlsSection
from edge_agent.packets import FALLBACK_MAX_PACKET, WIDEST_SEQ, publish_size, split
from edge_agent.spool import DiskFull, Row, Spool

log = logging.getLogger(__name__)

MAX_INFLIGHT = 20
QOS = 1
# PUBACK reason codes no retry can turn into a delivery, since the batch itself is wrong for the broker: topic
# name invalid, payload format invalid. The others (not authorized, quota exceeded, unspecified error, ...)
# an admin fixes or they pass, so those batches wait in the spool.
PERMANENT_REFUSALS = frozenset({0x90, 0x99})
# what to fix for a refusal, by reason code (the default: any other)
REFUSAL_FIXES = {
    0x87: "check the broker ACL allows agent {agent!r} in classroom {classroom!r} to publish there, e.g. re-run "
          "`coordinator provision-agent`",
    0x97: "the broker's quota for this client is used up; it passes, or raise the broker's limits",
}
DEFAULT_FIX = "the broker's log says why"
# CONNACK reason codes (paho maps MQTT 3.1.1's return codes to them): a protocol version the broker lacks, and
# who we are (client identifier, user name or password, not authorized, banned, authentication method)
UNSUPPORTED_PROTOCOL = 0x84
KEEPALIVE_TIMEOUT = 0x8D  # paho's disconnect reason when the broker stayed silent, e.g. no CONNACK
CREDENTIAL_REFUSALS = frozenset({0x85, 0x86, 0x87, 0x8A, 0x8C})
# a connection the broker closes sooner than this after CONNACK counts as dropped at once: paho starts its
# reconnect delay again at 1 s after every CONNACK, so without our own back-off such a broker is redialled
# every second for ever (e.g. two agents with the same id taking the session from each other)
STABLE_S = 10.0


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def probe_topic(agent: AgentSection) -> str:
    """Where ``edge-agent check`` publishes its one test message: under the agent's own topics, so the ACL
    that lets it publish batches covers it (``coordinator provision-agent`` grants .../<classroom>/<agent>/#),
    and a level deeper than the wire contract's topics, so no consumer receives it (the coordinator
    subscribes .../+/+/observations and .../+/+/status; :data:`affectedge.topics.ALL` is .../+/+/+)."""
    return f"{topics.PREFIX}/{agent.classroom}/{agent.id}/check/probe"


def refusal_fix(reason_code: ReasonCode, agent: AgentSection) -> str:
    """What to fix for a PUBACK refusal (:data:`REFUSAL_FIXES`)."""
    return REFUSAL_FIXES.get(reason_code.value, DEFAULT_FIX).format(agent=agent.id, classroom=agent.classroom)


def tls_context(tls: TlsSection) -> ssl.SSLContext:
    """The TLS context for ``[mqtt.tls]``, verifying the broker; loaded at start-up so a missing or
    broken file is a config error (exit 2) instead of a failure in paho's network thread."""
    for key in ("ca", "cert", "key"):
        path = getattr(tls, key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"mqtt.tls.{key} = {path}: the file is missing or not readable by this user; "
                              "fix the path or the file's permissions")
    try:
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.cert:
            context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        raise ConfigError(f"[mqtt.tls] files do not load ({exc.reason or exc}): check they are PEM and the key "
                          "matches the certificate") from None
    return context


def unreachable(config: MqttSection, error: BaseException | None) -> str:
    """One line for a broker that cannot be reached: where, why, and what to check."""
    reason = (getattr(error, "strerror", None) or str(error) or type(error).__name__) if error else "unknown reason"
    return (f"cannot reach {config.host}:{config.port} ({reason}): check mqtt.host/port/tls and that the "
            "broker runs")


def connection_refused(config: MqttSection, reason_code: ReasonCode | None, waited_s: float | None = None) -> str:
    """One line for a broker that did not take a connection: refused in its CONNACK (``reason_code``), or no
    CONNACK at all (None): closed at once, or silent for ``waited_s``. Said by ``run`` and ``check`` alike,
    so both point the admin at the setting that is wrong, not at the credentials for every failure."""
    where = f"{config.host}:{config.port}"
    if reason_code is None:
        what = f"sent no CONNACK in {waited_s:.0f} s" if waited_s else "closed the connection before accepting it"
        tls = ("check the broker accepts the client certificate in [mqtt.tls]" if config.tls is not None else
               "if that port is the broker's TLS listener, add [mqtt.tls] (or use its plain port)")
        protocol = ('; if the broker speaks MQTT 3.1.1 only, set mqtt.protocol = "3.1.1"'
                    if config.protocol == "5" else "")
        return f"{where} {what}: {tls}{protocol}"
    if reason_code.value == UNSUPPORTED_PROTOCOL:
        fix = ('the broker speaks MQTT 3.1.1 only: set mqtt.protocol = "3.1.1"' if config.protocol == "5" else
               "the broker does not speak MQTT 3.1.1 either: check mqtt.host/port point at an MQTT broker")
    elif reason_code.value in CREDENTIAL_REFUSALS:
        fix = ("check mqtt.username/password (`coordinator provision-agent` prints them) and that the broker's "
               "ACL knows this agent")
    else:
        fix = DEFAULT_FIX
    return f"{where} refused the connection ({reason_code}): {fix}"


def make_client(config: MqttSection, client_id: str) -> mqtt.Client:
    """A paho client configured from ``[mqtt]`` (protocol, credentials, TLS); not yet connected."""
    protocol = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if config.username is not None:
        password = config.password.get_secret_value() if config.password else None
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        client.tls_set_context(tls_context(config.tls))
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.reconnect_delay_set(1, config.max_backoff_s)
    return client


class Publisher:
    def __init__(self, config: MqttSection, agent: AgentSection, spool: Spool, model_version: str):
        """Builds the MQTT client (raises ConfigError for bad TLS files) but does not connect yet."""
        self.config = config
        self.agent = agent
        self.spool = spool
        self.model_version = model_version
        self.observations_topic = topics.observations(agent.classroom, agent.id)
        self.status_topic = topics.status(agent.classroom, agent.id)
        self.connected = threading.Event()
        self._client = make_client(config, client_id=f"affectedge-{agent.classroom}-{agent.id}")
        self._status: Callable[[], pb.AgentStatus] | None = None
        # mid -> spool row (None: a status message). Publishing and registering its mid happen
        # under _lock, which paho's on_publish never takes: paho calls on_publish while holding its
        # own queue lock, which publish() needs, so taking _lock there could deadlock.
        self._inflight: dict[int, Row | None] = {}
        self._lock = threading.Lock()
        # (mid, PUBACK reason code), filled by paho's thread
        self._acked: collections.deque[tuple[int, ReasonCode]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._warned_full = False  # once per outage, not once per batch
        self._warned_disk_full = False  # once until a batch is spooled again, not once per batch
        self._warned_spool_error = False  # once until the spool works again, not once a second
        # the refusals warned of (by outcome: status, dropped, kept), once per connection or episode, not per batch
        self._warned_refused: set[str] = set()
        # batches refused for now (sender thread, under _lock): the oldest refused row, sent again from there
        # at _resend_at; _backoff is 0 while no batch is refused, else doubles per refused round
        self._resend_from: int | None = None
        self._resend_at = 0.0
        self._backoff = 0.0
        # why the broker could not be used, warned once per outage and cause, not once per retry
        self._warned_outage: str | None = None
        self._answered = False  # the broker sent a CONNACK on this connection (paho's thread)
        # the largest packet the broker takes (its CONNACK's Maximum Packet Size) and how we know it
        self._max_packet = FALLBACK_MAX_PACKET
        self._max_packet_source = "assumed until the broker is reached"
        self._warned_size: set[str] = set()  # batches split or dropped for size: once per connection each
        self._connected_at = 0.0
        self._redial_s = 1  # paho's first reconnect delay; doubles while connections drop at once
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)

    # -- encoding -------------------------------------------------------------------------------

    def _properties(self, content_type: str) -> Properties | None:
        if self.config.protocol != "5":
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
        props.PayloadFormatIndicator = 1 if self.config.format == "json" else 0
        return props

    def _encode(self, status: pb.AgentStatus) -> tuple[str, bytes]:
        """A status as it goes out; a ``detail`` longer than the contract allows is cut (it names the
        cameras that deliver no frames, so it grows with their ids) rather than the status refused."""
        limit = codec.TEXT_LIMITS["detail"]
        if len(status.detail) > limit:
            status.detail = status.detail[:limit - 1] + "…"
        codec.validate(status)
        return codec.content_type(status, self.config.format), codec.encode(status, self.config.format)

    # -- observations -----------------------------------------------------------------------------

    def publish_batch(self, observations: Iterable[pb.EmotionObservation],
                      summaries: Iterable[pb.CameraSummary]) -> None:
        """Number, encode and spool one batch; it is sent as soon as the broker is reachable.

        A batch larger than the broker takes is spooled as several smaller ones, in order, each with its
        own ``seq`` (:meth:`_fit`). On a full disk the batch is dropped (counted in ``spool_dropped``) rather
        than sent around the spool, where it would overtake the batches waiting there.
        """
        batch = pb.ObservationBatch(
            agent_id=self.agent.id, classroom_id=self.agent.classroom, model_version=self.model_version,
            sent_at=timestamp(time.time()), observations=observations, summaries=summaries)
        codec.validate(batch)
        content_type = codec.content_type(batch, self.config.format)
        payloads = self._fit(batch, self.observations_topic, content_type, "a new batch")
        if payloads is None:
            self.spool.count_dropped()
            return
        for payload in payloads:
            try:
                pushed_out = self.spool.put(self.observations_topic, content_type, payload)
            except DiskFull as exc:
                self._warn_disk_full(exc)
                continue
            if self._warned_disk_full:
                log.info("the spool's disk has space again: spooling batches again")
                self._warned_disk_full = False
            if pushed_out and not self._warned_full:
                log.warning("spool full (%d batches): dropping the oldest until the broker is back "
                            "(counted in the status' spool_dropped)", self.spool.max_batches)
                self._warned_full = True
        self._wake.set()

    def _fit(self, batch: pb.ObservationBatch, topic: str, content_type: str, what: str) -> list[bytes] | None:
        """``batch`` numbered and encoded as one payload, or as several if its packet would exceed the
        broker's Maximum Packet Size; None (with a warning) if no split fits, for the caller to drop and count.

        The broker closes the connection on a packet over its limit, and the spool would send that batch
        again after every reconnect, so nothing behind it would ever be delivered. Each part gets its own
        ``seq``: consumers key batches by it and would skip a repeated one as a duplicate.
        """
        fmt = "json" if content_type.startswith(codec.JSON) else "protobuf"
        properties, limit = self._properties(content_type), self._max_packet

        def size(part: pb.ObservationBatch) -> int:
            return publish_size(topic, codec.encode(part, fmt), properties)

        batch.seq = WIDEST_SEQ  # sized with the widest seq, so each part still fits once numbered
        parts = split(batch, lambda part: size(part) <= limit)
        if parts is None or len(parts) > 1:
            outcome = (f"sending it as {len(parts)} smaller batches" if parts else
                       "dropping it, as one of its observations or summaries alone is larger (counted in "
                       "spool_dropped)")
            self._warn_size(f"{what} of {len(batch.observations)} observations and {len(batch.summaries)} camera "
                            f"summaries is {size(batch)} bytes as an MQTT packet, more than the broker takes "
                            f"(maximum packet size {limit} bytes, {self._max_packet_source}): {outcome}",
                            "split" if parts else "dropped")
        if parts is None:
            return None
        payloads = []
        for part in parts:
            part.seq = self.spool.next_seq()
            payloads.append(codec.encode(part, fmt))
        return payloads

    def _refit(self, row: Row) -> None:
        """Replace a spooled batch too large for this broker by smaller ones at the end of the queue, or
        drop and count it if none fits: built before the agent knew this broker's limit (offline since
        its start, or spooled for another broker)."""
        try:
            batch = codec.decode(row.payload, pb.ObservationBatch, row.content_type)
        except codec.WireError as exc:  # cannot happen to a batch this code encoded; the queue must move on
            log.warning("spooled batch %d is too large for the broker and does not decode (%s): dropping it "
                        "(counted in spool_dropped)", row.id, first_line(exc, 200))
            payloads = None
        else:
            payloads = self._fit(batch, row.topic, row.content_type, f"spooled batch seq {batch.seq}")
        try:
            if payloads is None:
                self.spool.reject(row.id)
            else:
                self.spool.replace(row, payloads)
        except DiskFull as exc:  # the row stays, sent again after a restart
            self._warn_disk_full(exc)
        self._wake.set()

    def _warn_size(self, message: str, outcome: str) -> None:
        # every batch of a large classroom may be too large: say it once per connection and outcome
        if outcome not in self._warned_size:
            log.warning("%s (said once per connection)", message)
            self._warned_size.add(outcome)

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._send_round()
            except sqlite3.Error as exc:  # an I/O error must not end the thread: nothing would be sent again
                if not self._warned_spool_error:
                    log.error("the spool %s failed (%s): sending stops until it works again (retried every "
                              "second; batches answered meanwhile are sent again after a restart)",
                              self.spool.path, first_line(exc, 200))
                    self._warned_spool_error = True
                continue
            if self._warned_spool_error:
                log.info("the spool %s works again: sending batches", self.spool.path)
                self._warned_spool_error = False

    def _send_round(self) -> None:
        """Settle what the broker answered, then hand it what the in-flight window has room for."""
        with self._lock:
            # every acked mid is registered: its publish() returned before we got _lock
            while self._acked:
                try:
                    self._settle(*self._acked.popleft())
                except DiskFull as exc:  # the row stays for the next start (a delivered one: consumers skip it)
                    self._warn_disk_full(exc)
            if not self.connected.is_set():
                return
            in_flight = sum(row is not None for row in self._inflight.values())
            if self._resend_from is not None:
                # the refused rows go first, so none after them may still be in flight
                if in_flight or time.monotonic() < self._resend_at:
                    return
                self.spool.resend_from(self._resend_from)
                self._resend_from = None
            for row in self.spool.take(MAX_INFLIGHT - in_flight):
                properties = self._properties(row.content_type)
                if publish_size(row.topic, row.payload, properties) > self._max_packet:
                    self._refit(row)
                    continue
                info = self._client.publish(row.topic, row.payload, QOS, properties=properties)
                self._inflight[info.mid] = row

    def _settle(self, mid: int, reason_code: ReasonCode) -> None:
        """Act on an answered PUBLISH: delete a delivered batch, drop one the broker can never accept, and keep
        one it refused for now (ACL, quota) to go again after a back-off: an admin's fix must not cost the backlog.
        The refused go again from the oldest, in order; later batches already in flight may arrive before
        them, which the coordinator takes in any order (it keys batches by agent, seq and sent_at)."""
        row = self._inflight.pop(mid, None)
        if row is None:
            if reason_code.is_failure:
                self._warn_refused(self.status_topic, reason_code, "the next status replaces it")
        elif not reason_code.is_failure:
            self.spool.ack(row.id)
            # over only once a whole round went through: a quota lets the first batches of each round pass
            if self._backoff and self._resend_from is None and not self._inflight:
                log.info("the broker accepts batches on %s again", row.topic)
                self._backoff = 0.0
                self._warned_refused.clear()
        elif reason_code.value in PERMANENT_REFUSALS:
            self.spool.reject(row.id)
            self._warn_refused(row.topic, reason_code, "dropping such batches (counted in spool_dropped): "
                               "sending them again cannot change that answer")
        else:
            if self._resend_from is None:  # the first refusal of this round
                self._backoff = min(max(1.0, 2 * self._backoff), self.config.max_backoff_s)
                self._resend_at = time.monotonic() + self._backoff
            self._resend_from = row.id if self._resend_from is None else min(self._resend_from, row.id)
            self._warn_refused(row.topic, reason_code, "keeping the batches in the spool and sending them again, "
                               f"in order, every {self.config.max_backoff_s} s at most")

    def _warn_refused(self, topic: str, reason_code: ReasonCode, outcome: str) -> None:
        # a refusal repeats for every message until it is fixed or passes: say it once per outcome, so a
        # refused status does not hide that batches are refused too
        if outcome not in self._warned_refused:
            log.warning("the broker refused a message on %s (%s): %s; %s", topic, reason_code, outcome,
                        refusal_fix(reason_code, self.agent))
            self._warned_refused.add(outcome)

    def _warn_disk_full(self, exc: DiskFull) -> None:
        if not self._warned_disk_full:
            log.warning("%s: dropping new batches (counted in spool_dropped) until space is freed there", exc)
            self._warned_disk_full = True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acked.append((mid, reason_code))
        self._wake.set()

    # -- status -------------------------------------------------------------------------------------

    def publish_status(self, status: pb.AgentStatus) -> mqtt.MQTTMessageInfo | None:
        """Publish ``status`` retained if connected (a snapshot: no point queuing a stale one)."""
        if not self.connected.is_set():
            return None
        content_type, payload = self._encode(status)
        properties = self._properties(content_type)
        size = publish_size(self.status_topic, payload, properties)
        if size > self._max_packet:
            self._warn_size(f"the status is {size} bytes as an MQTT packet, more than the broker takes (maximum "
                            f"packet size {self._max_packet} bytes, {self._max_packet_source}): not sending it",
                            "status")
            return None
        with self._lock:
            info = self._client.publish(self.status_topic, payload, QOS, retain=True, properties=properties)
            self._inflight[info.mid] = None
        return info

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._answered = True
        if reason_code.is_failure:
            self._warn_outage(connection_refused(self.config, reason_code))
            return
        advertised = getattr(properties, "MaximumPacketSize", None)
        self._max_packet = advertised or FALLBACK_MAX_PACKET
        self._max_packet_source = "from the broker's CONNACK" if advertised else "assumed: the broker advertises none"
        log.info("connected to broker %s:%d (MQTT %s, maximum packet size %d bytes, %s)", self.config.host,
                 self.config.port, self.config.protocol, self._max_packet, self._max_packet_source)
        self._connected_at = time.monotonic()
        self.connected.set()
        self._warned_full = False
        self._warned_outage = None
        self._warned_refused.clear()
        self._warned_size.clear()
        self.publish_status(self._status())
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its `except OSError:` and passes no error: it is the one in flight
        self._warn_outage(unreachable(self.config, sys.exc_info()[1]))

    def _warn_outage(self, cause: str) -> None:
        """Say why the broker cannot be used once per outage and cause: paho retries every few seconds."""
        if cause != self._warned_outage:
            log.warning("%s; spooling batches and retrying (run `edge-agent check` to test the settings)", cause)
            self._warned_outage = cause

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """Warn, and back off from a broker that keeps closing connections at once (see :data:`STABLE_S`);
        one that closes before its CONNACK never accepted us, which is said once per outage."""
        if self.connected.is_set() and not self._stopping.is_set():
            lasted = time.monotonic() - self._connected_at
            if lasted < STABLE_S:
                self._redial_s = min(2 * self._redial_s, self.config.max_backoff_s)
                log.warning("lost the broker (%s) %.1f s after connecting; spooling batches and reconnecting in "
                            "%d s (backing off up to mqtt.max_backoff_s while connections drop at once)",
                            reason_code, lasted, self._redial_s)
            else:
                self._redial_s = 1
                log.warning("lost the broker (%s); spooling batches and reconnecting", reason_code)
            client.reconnect_delay_set(self._redial_s, self.config.max_backoff_s)
        elif not self._answered and not self._stopping.is_set():
            # no CONNACK: plain MQTT to a TLS port (closed), MQTT 5 to amqtt with a Will (silent), ...
            silent = reason_code.value == KEEPALIVE_TIMEOUT
            self._warn_outage(connection_refused(self.config, None, self.config.keepalive_s if silent else None))
        self._answered = False
        self.connected.clear()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, status: Callable[[], pb.AgentStatus]) -> None:
        """Connect in the background; ``status()`` gives the ONLINE status to publish on each connect."""
        self._status = status
        client = self._client
        will = status()
        will.state = pb.AgentStatus.OFFLINE
        will.detail = "connection lost (Last Will)"
        content_type, payload = self._encode(will)
        client.will_set(self.status_topic, payload, QOS, retain=True, properties=(
            self._will_properties(content_type)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        client.loop_start()
        self._sender.start()

    def _will_properties(self, content_type: str) -> Properties | None:
        if self.config.protocol != "5":
            return None
        props = Properties(PacketTypes.WILLMESSAGE)
        props.ContentType = content_type
        return props

    def stop(self, final: pb.AgentStatus, flush_timeout: float = 5.0) -> None:
        """Send what the spool holds (up to ``flush_timeout`` s), publish ``final`` retained, disconnect."""
        deadline = time.monotonic() + flush_timeout
        while self.connected.is_set() and self.spool.depth and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        if self._sender.is_alive():  # not started when start() itself failed; the agent still shuts down
            self._sender.join(5)
        info = self.publish_status(final)
        if info is not None:
            try:
                info.wait_for_publish(max(0.5, deadline - time.monotonic()))
            except RuntimeError as exc:  # the connection dropped meanwhile; the Last Will says OFFLINE
                log.info("final status not sent: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        left = self.spool.depth
        if left:
            log.info("%d batches stay in the spool for the next start", left)
