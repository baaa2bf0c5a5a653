"""The on-disk spool: FIFO order, the bound, what survives a restart, a full disk."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, free_port
from edge_support import write_config

from edge_agent.spool import DiskFull, Spool

BIG = bytes(5000)  # more than a 4 KiB page: storing it needs a new page


def fill_disk(spool: Spool) -> None:
    """Let the spool's file grow no more: SQLite then answers what needs a new page as on a full disk."""
    with spool._lock:
        spool._db.execute("VACUUM")  # no free page left to reuse
        spool._db.execute(f"PRAGMA max_page_count = {spool._db.execute('PRAGMA page_count').fetchone()[0]}")


def free_disk(spool: Spool) -> None:
    with spool._lock:
        spool._db.execute("PRAGMA max_page_count = 1000000")


def put(spool: Spool, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = spool.next_seq()
        spool.put("t", "c", seq.to_bytes(4, "big"))
        seqs.append(seq)
    return seqs


def payloads(rows) -> list[int]:
    return [int.from_bytes(r.payload, "big") for r in rows]


def test_fifo_ack_and_restart(tmp_path):
    spool = Spool(tmp_path / "s.sqlite3", max_batches=100)
    assert put(spool, 5) == [1, 2, 3, 4, 5]
    first = spool.take(2)
    assert payloads(first) == [1, 2]
    assert payloads(spool.take(10)) == [3, 4, 5]
    assert spool.take(10) == []
    spool.ack(first[0].id)
    assert spool.depth == 4
    spool.close()

    again = Spool(tmp_path / "s.sqlite3", max_batches=100)  # after a crash: unacked rows go again, in order
    assert payloads(again.take(10)) == [2, 3, 4, 5]
    assert again.next_seq() == 6  # seq keeps counting across restarts


def test_bound_drops_the_oldest_not_yet_sent_and_counts_them(tmp_path):
    spool = Spool(tmp_path / "s.sqlite3", max_batches=4)
    put(spool, 2)
    assert payloads(spool.take(1)) == [1]  # in the MQTT client's hands: must not be dropped
    put(spool, 5)
    assert spool.dropped == 3
    assert payloads(spool.take(10)) == [5, 6, 7]
    assert spool.depth == 4
    spool.close()
    assert Spool(tmp_path / "s.sqlite3", max_batches=4).dropped == 3


def test_a_full_disk_drops_and_counts_the_batch_and_the_spool_recovers_with_its_counts(tmp_path):
    spool = Spool(tmp_path / "s.sqlite3", max_batches=100)
    put(spool, 2)
    fill_disk(spool)
    for _ in range(3):
        seq = spool.next_seq()
        with pytest.raises(DiskFull, match=f"disk is full .{tmp_path}"):
            spool.put("t", "c", seq.to_bytes(4, "big") + BIG)
    assert (spool.depth, spool.dropped) == (2, 3)
    free_disk(spool)
    assert put(spool, 1) == [6]
    spool.close()

    again = Spool(tmp_path / "s.sqlite3", max_batches=100)
    assert again.dropped == 3
    assert payloads(again.take(10)) == [1, 2, 6]
    assert again.next_seq() == 7


# the agent with SQLite capped at one page per file, which a new spool outgrows at once
FULL_DISK_AGENT = """
import sqlite3, sys
connect = sqlite3.connect
def full_disk(*args, **kwargs):
    db = connect(*args, **kwargs)
    db.execute("PRAGMA max_page_count = 1")
    return db
sqlite3.connect = full_disk
from edge_agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_at_start_is_one_line_and_an_exit_status_systemd_restarts(tmp_path):
    spool = tmp_path / "state" / "spool.sqlite3"
    config = write_config(tmp_path / "agent.toml", free_port(), spool=spool)
    result = subprocess.run([sys.executable, "-c", FULL_DISK_AGENT, "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1  # not 2: RestartPreventExitStatus=2 would keep the agent down once space is freed
    assert result.stderr.strip().splitlines() == [
        f"edge-agent: cannot create the spool {spool}: its disk is full; free space there "
        "(systemd restarts the agent until it starts)"]


def test_replace_puts_the_parts_behind_the_queue_and_counts_survive_a_restart(tmp_path):
    spool = Spool(tmp_path / "s.sqlite3", max_batches=100)
    put(spool, 3)
    [first] = spool.take(1)
    parts = [spool.next_seq(), spool.next_seq()]
    spool.replace(first, [seq.to_bytes(4, "big") for seq in parts])
    spool.count_dropped()  # a batch no split could fit, never spooled
    assert payloads(spool.take(10)) == [2, 3, 4, 5]
    assert (spool.depth, spool.dropped) == (4, 1)
    spool.close()

    again = Spool(tmp_path / "s.sqlite3", max_batches=100)
    assert payloads(again.take(10)) == [2, 3, 4, 5]
    assert again.next_seq() == 6
    assert again.dropped == 0  # a count not written yet is lost with the process, as on a full disk
