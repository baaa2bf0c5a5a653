"""Store-and-forward: a bounded, on-disk FIFO of encoded batches waiting for the broker.

Every observation batch goes through here, connected or not, so one path handles both cases and
a batch survives a crash or a power cut between being produced and being acknowledged (QoS 1
PUBACK). The publisher :meth:`take`\\ s the oldest rows, hands them to the MQTT client and
:meth:`ack`\\ s each on PUBACK; rows taken but not acknowledged when the process dies are sent
again after a restart (consumers drop the duplicate by its ``seq`` and ``sent_at``).

The bound is a row count. When it is reached the oldest rows not yet handed to the MQTT client
are deleted and counted (:attr:`dropped`, persisted, reported in ``AgentStatus.spool_dropped``);
nothing within the bound is ever lost. The batch ``seq`` counter lives here too, so it keeps
increasing across restarts. Payloads hold labels only; no frame or embedding ever reaches disk.

A full disk is transient, not an error in the spool: :meth:`put` then raises :class:`DiskFull` and
counts the batch as dropped, and the counters wait in memory for the next write that works.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    content_type TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('seq', 0), ('dropped', 0);
"""


class DiskFull(Exception):
    """The spool's disk is full, so nothing was written; writes work again once space is freed."""


def _is_disk_full(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode == sqlite3.SQLITE_FULL


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    content_type: str
    payload: bytes


class Spool:
    """Thread-safe: the pipeline thread puts, the MQTT sender thread takes and acks."""

    def __init__(self, path: Path, max_batches: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_batches = max_batches
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes, 1 fsync/checkpoint
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            self._db.close()
            raise DiskFull(f"cannot create the spool {path}: its disk is full; free space there") from None
        self._taken = 0  # rows with id <= this are in the MQTT client's hands (this process only)
        # kept in memory and saved by every write (_write), so a full disk only delays saving them
        self._seq = self._meta("seq")
        self._unsaved_dropped = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction (the caller holds ``_lock``) that also saves the in-memory counters.

        Raises :class:`DiskFull`, with nothing written, while the disk is full.
        """
        try:
            with self._db:
                yield self._db
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (self._seq,))
                self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (self._unsaved_dropped,))
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            raise DiskFull(f"the spool's disk is full ({self.path})") from None
        self._unsaved_dropped = 0

    def next_seq(self) -> int:
        """The next batch sequence number (1, 2, ...; never reused, also after a restart).

        Saved with the batch by :meth:`put`, not here, so it needs no disk space: a number whose batch
        was never stored may come again after a restart, but nothing carrying it left the agent.
        """
        with self._lock:
            self._seq += 1
            return self._seq

    def put(self, topic: str, content_type: str, payload: bytes) -> int:
        """Append a batch; returns how many old batches the bound pushed out.

        On a full disk the batch is counted as dropped and :class:`DiskFull` raised.
        """
        with self._lock:
            try:
                with self._write() as db:
                    db.execute("INSERT INTO batches (topic, content_type, payload) VALUES (?, ?, ?)",
                               (topic, content_type, payload))
                    excess = db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] - self.max_batches
                    if excess <= 0:
                        return 0
                    dropped = db.execute(
                        "DELETE FROM batches WHERE id IN (SELECT id FROM batches WHERE id > ? ORDER BY id LIMIT ?)",
                        (self._taken, excess)).rowcount
                    db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
                    return dropped
            except DiskFull:
                self._unsaved_dropped += 1
                raise

    def take(self, limit: int) -> list[Row]:
        """Up to ``limit`` of the oldest batches not yet taken, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, content_type, payload FROM batches WHERE id > ? ORDER BY id LIMIT ?",
                (self._taken, limit)).fetchall()
            if rows:
                self._taken = rows[-1][0]
            return [Row(*r) for r in rows]

    def resend_from(self, row_id: int) -> None:
        """Hand the rows from ``row_id`` on out again, oldest first: the broker refused them for now.

        Only once none of them is in the MQTT client's hands any more, or they would be sent twice.
        """
        with self._lock:
            self._taken = min(self._taken, row_id - 1)

    def ack(self, row_id: int) -> None:
        """Delete a delivered batch; :class:`DiskFull` leaves it to be sent again after a restart."""
        with self._lock, self._write() as db:
            db.execute("DELETE FROM batches WHERE id = ?", (row_id,))

    def reject(self, row_id: int) -> None:
        """Delete a batch the broker can never accept (e.g. payload format invalid) and count it as dropped.

        Re-sending cannot help and keeping it would block the spool, but it must not pass for
        delivered: the count shows up in the status' ``spool_dropped``.
        """
        with self._lock, self._write() as db:
            gone = db.execute("DELETE FROM batches WHERE id = ?", (row_id,)).rowcount
            db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (gone,))

    def replace(self, row: Row, payloads: list[bytes]) -> None:
        """Put the parts of a batch too large for the broker in its place, at the end of the queue.

        The batches behind it go first (consumers take batches in any order: they key them by ``seq`` and
        ``sent_at``); one transaction, so a crash leaves the batch or all of its parts. The bound is not
        checked here: the next :meth:`put` trims any excess.
        """
        with self._lock, self._write() as db:
            db.execute("DELETE FROM batches WHERE id = ?", (row.id,))
            db.executemany("INSERT INTO batches (topic, content_type, payload) VALUES (?, ?, ?)",
                           [(row.topic, row.content_type, payload) for payload in payloads])

    def count_dropped(self) -> None:
        """Count a batch dropped before it reached the spool (too large for the broker); saved by the next write."""
        with self._lock:
            self._unsaved_dropped += 1

    @property
    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped") + self._unsaved_dropped
