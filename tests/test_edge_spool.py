"""The on-disk spool: FIFO order, the bound, what survives a restart."""

from __future__ import annotations

from edge_agent.spool import Spool


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
