"""How this coordinator is doing: for load balancers (``GET /healthz``, gRPC health), systemd
(``systemctl status`` shows the STATUS= line) and the admin (the agents page).

Three questions, each answered from state the running parts already keep, so a probe costs no
query and a load balancer may poll every second:

* **Can ingest store what it receives?** The writer retrying a batch the database will not take
  (:attr:`coordinator.ingest.Ingest.stalled`) for :data:`STALL_S` means the database is down or
  locked: labels pile up at the broker, unacknowledged, and nothing is lost yet.
* **Is aggregation running?** No progress of the ticker for :func:`tick_deadline_s` means live
  states and signals have stopped (each failure is in the log).
* **Is the broker connected?** If not, no new labels arrive; the API still serves what the
  database holds.
* **Did an LMS miss signals?** Dead webhook or xAPI deliveries (retries ran out, or the receiver
  refused them) of the last day, counted by the policy leader's senders
  (:meth:`coordinator.outbox.Outbox.dead_deliveries`, at most a minute old; other instances send
  nothing and report none) until ``coordinator requeue-deliveries`` sends them again.

*down* (the first two; HTTP 503, gRPC ``NOT_SERVING``) tells a load balancer to send clients
elsewhere; *degraded* (the broker, dead deliveries) is served as usual (HTTP 200) with the problem named.
``/healthz`` shows the status and the problems only; the counters, the backlog and the
database's own error are on the admin's page, behind a login.

The backlog (messages received and not yet stored) is shown, not judged: with QoS 1 the broker
hands over at most its in-flight window (:data:`coordinator.ingest.RECEIVE_MAXIMUM` under MQTT 5,
Mosquitto's ``max_inflight_messages`` under 3.1.1) before an acknowledgement, so ingest falling
behind piles messages up at the broker, where a count here cannot see them. ``coordinator bench``
measures how far behind it can fall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK, DEGRADED, DOWN = "ok", "degraded", "down"
STALL_S = 10.0  # the database refusing writes this long makes the coordinator "down"
PERIOD_S = 2.0  # how often the monitor re-assesses (gRPC health, systemd status, transition logs)


def tick_deadline_s(tick_seconds: float) -> float:
    """No progress of the ticker for this long is "down": ten ticks, and never under 30 s (a tick may
    be slow; a retention purge inside one counts each chunk it deletes as progress)."""
    return max(30.0, 10 * tick_seconds)


@dataclass(frozen=True)
class Health:
    status: str
    problems: tuple[str, ...]
    broker_connected: bool
    backlog: int
    leader: bool
    last_tick_age_s: float
    counters: dict[str, int]
    db_error: str | None  # the database's own words while ingest is stalled; admins only

    def public(self) -> dict:
        """What ``/healthz`` shows anyone who can reach it: no counts, no database error text."""
        return {"status": self.status, "problems": list(self.problems)}

    def status_line(self) -> str:
        """One line for ``systemctl status`` and the transition log."""
        c = self.counters
        line = (f"{self.status}: broker {'connected' if self.broker_connected else 'UNREACHABLE'}, "
                f"{c.get('observations', 0)} observations stored, {c.get('malformed', 0)} malformed, "
                f"backlog {self.backlog}{', policy leader' if self.leader else ''}")
        return line + (f"; {'; '.join(self.problems)}" if self.problems else "")


def assess(*, stalled_for_s: float | None, db_error: str | None, last_tick_age_s: float, tick_seconds: float,
           broker_connected: bool, backlog: int, leader: bool, counters: dict[str, int],
           dead_deliveries: Sequence[tuple[str, int]] = ()) -> Health:
    """The status and the problems, each one line saying what is wrong and where to look (``db_error``:
    the database's words while ingest is stalled, else None; ``dead_deliveries``: the outlets'
    ``(kind, count)`` of the last day)."""
    down, degraded = [], []
    if stalled_for_s is not None and stalled_for_s >= STALL_S:
        down.append(f"the database has refused writes for {stalled_for_s:.0f} s (down or locked): labels wait "
                    "to be stored; see the coordinator log")
    if last_tick_age_s >= tick_deadline_s(tick_seconds):
        down.append(f"the aggregation ticker has made no progress for {last_tick_age_s:.0f} s: live states and signals "
                    "have stopped; see the coordinator log")
    if not broker_connected:
        degraded.append("the MQTT broker is unreachable: no new labels arrive; check [mqtt] url and the broker")
    for kind, count in dead_deliveries:
        degraded.append(f"{count} {kind} deliveries of the last day are dead (retries ran out, or the receiver "
                        "refused them): an LMS missed those signals; the coordinator log names the receiver; "
                        "once it answers, run `coordinator requeue-deliveries`")
    status = DOWN if down else DEGRADED if degraded else OK
    return Health(status, tuple(down + degraded), broker_connected, backlog, leader, last_tick_age_s, counters,
                  db_error)
