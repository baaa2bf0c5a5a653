"""Window aggregates and the emotion -> learning-state mapping, on a real SQLite database."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, func, insert, select

from affectedge.labels import EMOTIONS
from coordinator import aggregate, db, states
from coordinator.store import Received, Store, Written

NOW = datetime(2026, 3, 2, 10, 0, 0)


def one_hot(name: str, p: float = 1.0) -> list[float]:
    rest = (1.0 - p) / (len(EMOTIONS) - 1)
    return [p if e == name else rest for e in EMOTIONS]


@pytest.fixture
def sessions(tmp_path):
    return db.connect(f"sqlite:///{tmp_path / 'agg.db'}")


def head_counts(rows: list[tuple]) -> dict[tuple[str, str, float], int]:
    """Each camera's head count at each instant of ``rows``: its distinct tracks then."""
    tracks: dict[tuple[str, str, float], set] = {}
    for agent, camera, track, ago, *_ in rows:
        tracks.setdefault((agent, camera, ago), set()).add(track)
    return {key: len(seen) for key, seen in tracks.items()}


def add_head_counts(sessions, classroom: str, rows: list[tuple]) -> None:
    """The camera summaries an edge sends with ``rows``."""
    with sessions.begin() as s:
        s.execute(insert(db.CameraSample), [
            {"classroom_id": classroom, "agent_id": agent, "camera_id": camera, "ts": NOW - timedelta(seconds=ago),
             "faces_present": faces}
            for (agent, camera, ago), faces in head_counts(rows).items()
        ])


def add_obs(sessions, classroom: str, rows: list[tuple], with_head_counts: bool = True) -> None:
    """rows: (agent, camera, track, seconds before NOW, distribution, confidence); with their
    cameras' head counts unless a test writes its own."""
    if with_head_counts:
        add_head_counts(sessions, classroom, rows)
    with sessions.begin() as s:
        db.insert_observations(
            s,
            [
                {
                    "classroom_id": classroom,
                    "agent_id": agent,
                    "camera_id": camera,
                    "track_id": track,
                    "window_start": NOW - timedelta(seconds=ago + 1),
                    "window_end": NOW - timedelta(seconds=ago),
                    "label": max(range(7), key=lambda i: dist[i]),
                    "confidence": conf,
                    **dict(zip(db.PROB_COLUMNS, dist, strict=True)),
                }
                for agent, camera, track, ago, dist, conf in rows
            ],
        )


def test_mapping_rows_sum_to_one_and_cover_every_emotion():
    assert set(states.MAPPING) == set(EMOTIONS)
    for emotion, row in states.MAPPING.items():
        assert sum(row.values()) == pytest.approx(1.0), emotion
        assert set(row) <= set(states.STATES)
    scores = states.from_distribution(one_hot("fear"))
    assert sum(scores.values()) == pytest.approx(1.0)
    assert max(scores, key=scores.get) == "confused"
    assert max(states.from_distribution(one_hot("angry")), key=lambda k: states.from_distribution(
        one_hot("angry"))[k]) == "frustrated"
    with pytest.raises(ValueError, match="7"):
        states.from_distribution([1.0, 0.0])


def test_state_is_confidence_weighted_counts_distinct_learners_and_latest_faces(sessions):
    add_obs(
        sessions,
        "room-a",
        [
            ("ag1", "cam0", 1, 2, one_hot("happy"), 0.9),
            ("ag1", "cam0", 2, 2, one_hot("happy"), 0.9),
            ("ag2", "cam0", 1, 2, one_hot("angry"), 0.3),  # same track id, other agent: a new learner
            ("ag1", "cam0", 1, 3, one_hot("happy"), 0.9),  # same learners again, a second earlier
            ("ag1", "cam0", 2, 3, one_hot("happy"), 0.9),
            ("ag2", "cam0", 1, 3, one_hot("happy"), 0.9),
            ("ag1", "cam0", 1, 4, one_hot("sad"), 1.0),  # alone in view: fewer than k, left out
            ("ag1", "cam0", 3, 90, one_hot("sad"), 1.0),  # outside a 60 s window
        ],
        with_head_counts=False,
    )
    with sessions.begin() as s:
        s.execute(
            insert(db.CameraSample),
            [
                {"classroom_id": "room-a", "agent_id": "ag1", "camera_id": "cam0", "ts": NOW - timedelta(seconds=30),
                 "faces_present": 9},
                {"classroom_id": "room-a", "agent_id": "ag1", "camera_id": "cam0", "ts": NOW - timedelta(seconds=2),
                 "faces_present": 4},
                {"classroom_id": "room-a", "agent_id": "ag2", "camera_id": "cam0", "ts": NOW - timedelta(seconds=1),
                 "faces_present": 2},
            ],
        )
        s.add(db.Agent(id="ag1", classroom_id="room-a", state="ONLINE", last_seen=NOW - timedelta(seconds=5)))
        s.add(db.Agent(id="ag2", classroom_id="room-a", state="OFFLINE", last_seen=NOW - timedelta(seconds=5)))
    with sessions() as s:
        state = aggregate.classroom_state(s, "room-a", 60, NOW, k=3)
    assert state.learners == 3 and state.observations == 6 and not state.suppressed
    assert state.faces_present == 6  # latest per camera: 4 + 2, not the older 9
    assert state.agents_online == 1  # ag2's Last Will said OFFLINE
    happy, angry, sad = EMOTIONS.index("happy"), EMOTIONS.index("angry"), EMOTIONS.index("sad")
    # five happy observations at confidence 0.9 against one angry at 0.3; the lone sad one left out
    assert state.distribution[happy] == pytest.approx(4.5 / 4.8)
    assert state.distribution[angry] == pytest.approx(0.3 / 4.8)
    assert state.distribution[sad] == pytest.approx(0.0, abs=1e-6)
    assert sum(state.distribution) == pytest.approx(1.0)
    scores = states.from_messages(state.states)
    assert scores == pytest.approx(states.from_distribution(list(state.distribution)))


def test_below_k_learners_is_suppressed_with_no_per_learner_detail(sessions):
    add_obs(sessions, "room-b", [("ag1", "cam0", track, t, one_hot("sad"), 0.8) for t in (1, 2) for track in (1, 2)])
    with sessions() as s:
        state = aggregate.classroom_state(s, "room-b", 10, NOW, k=3)
        assert aggregate.classroom_state(s, "room-b", 10, NOW, k=2).suppressed is False
        points = aggregate.timeline(s, "room-b", NOW - timedelta(seconds=10), NOW, 10, k=3)
    assert state.suppressed and state.learners == 2 and state.observations == 0
    assert list(state.distribution) == [0.0] * 7
    assert all(ls.score == 0 for ls in state.states)
    assert len(points) == 1 and points[0]["suppressed"] and points[0]["distribution"] == [0.0] * 7


def _alone_then_with_two_others(sessions, store: Store, classroom: str) -> None:
    """The reviewer's scenario through ingest's path: learner A (sad .9, neutral .1) alone for
    48 s, then A and two happy learners for the last 8 s; a batch a second per agent."""
    from coordinator.bench import make_batch, stamp

    a = [0.0] * len(EMOTIONS)
    a[EMOTIONS.index("sad")], a[EMOTIONS.index("neutral")] = 0.9, 0.1
    happy = one_hot("happy", 0.9)
    batches = []
    for seq, ago in enumerate(range(55, -1, -1), start=1):
        end = (NOW - datetime(1970, 1, 1)).total_seconds() - ago - 0.5
        batches.append(make_batch("ag-a", classroom, 1, a, seq=seq))
        if ago < 8:
            batches.append(make_batch("ag-b", classroom, 2, happy, seq=seq))
        for batch in batches[-2 if ago < 8 else -1:]:
            stamp(batch, end)
    store.write([Received(batch, NOW) for batch in batches], [])


def test_one_learner_alone_in_most_of_a_window_is_not_revealed_by_it_nor_by_differencing(sessions):
    """k is judged per instant: the 48 s A spent alone are in no distribution, so the 60 s state
    is not 90 % A, and differencing it with the 10 s state (n60*D60 - n10*D10) recovers nothing."""
    _alone_then_with_two_others(sessions, Store(sessions), "room-a")
    with sessions() as s:
        short = aggregate.classroom_state(s, "room-a", 10, NOW, k=3)
        long = aggregate.classroom_state(s, "room-a", 60, NOW, k=3)
        points = aggregate.timeline(s, "room-a", NOW - timedelta(seconds=60), NOW, 60, k=3)
    sad, happy = EMOTIONS.index("sad"), EMOTIONS.index("happy")
    assert short.learners == long.learners == 3 and not long.suppressed
    together = (8 * 0.9 + 16 * 0.1 / 6) / 24  # A's sad with the happy pair's: the last 8 s only
    assert long.distribution[sad] == pytest.approx(together, abs=1e-6)  # not A's 0.9 taking over
    assert list(long.distribution) == pytest.approx(list(short.distribution), abs=1e-6)
    assert long.distribution[happy] == pytest.approx(0.6, abs=1e-6)
    assert short.observations == long.observations == 24  # nothing left to difference
    assert points[0]["observations"] == 24 and points[0]["distribution"][sad] == pytest.approx(together)


def test_a_window_is_judged_on_whole_seconds_so_two_ending_together_differ_by_whole_instants(sessions):
    """One agent sees a lone learner (sad) and publishes at .3 s, another three (happy) at .8 s. A
    10 s window starting at .5 s held the second it cut only from .5 s on (the three), where the
    60 s window held it whole (four): the two differed by exactly the lone learner's observation."""
    rows = []
    for second in range(10):  # NOW - 10 + second + 0.3 and + 0.8
        rows.append(("ag-a", "cam0", 1, 9.7 - second, one_hot("sad"), 0.9))
        rows += [("ag-b", "cam0", track, 9.2 - second, one_hot("happy"), 0.9) for track in (1, 2, 3)]
    add_obs(sessions, "room-c", rows)
    now = NOW + timedelta(seconds=0.5)
    with sessions() as s:
        short = aggregate.classroom_state(s, "room-c", 10, now, k=3)
        long = aggregate.classroom_state(s, "room-c", 60, now, k=3)
    assert (short.observations, long.observations) == (36, 40)  # seconds 1..9, and second 0 with them
    sad = EMOTIONS.index("sad")
    difference = (long.distribution[sad] * long.observations - short.distribution[sad] * short.observations) / 4
    assert difference == pytest.approx(0.25, abs=1e-6)  # second 0's four learners, one of them sad


def test_a_window_without_one_instant_of_k_learners_is_suppressed(sessions):
    """Three learners over the window, never more than two in view at once: no distribution."""
    add_obs(sessions, "room-b", [("ag1", "cam0", 1, 5, one_hot("sad"), 0.9), ("ag1", "cam0", 2, 5, one_hot("sad"), 0.9),
                                 ("ag1", "cam0", 3, 2, one_hot("happy"), 0.9)], with_head_counts=False)
    with sessions.begin() as s:  # a camera that saw three faces at some point of the window
        s.add(db.CameraSample(classroom_id="room-b", agent_id="ag1", camera_id="cam0", ts=NOW - timedelta(seconds=3),
                              faces_present=3))
    with sessions() as s:
        state = aggregate.classroom_state(s, "room-b", 10, NOW, k=3)
        points = aggregate.timeline(s, "room-b", NOW - timedelta(seconds=10), NOW, 10, k=3)
    assert state.learners == 3 and state.suppressed and state.observations == 0
    assert list(state.distribution) == [0.0] * 7
    assert points[0]["suppressed"] and points[0]["distribution"] == [0.0] * 7


def test_one_face_tracked_again_after_looking_away_stays_one_learner(sessions):
    """The edge gives a face that left the view a new track id; three ids of one face, never two
    in view at once, must not lift k = 3's suppression, in the live state nor in the history."""
    add_obs(sessions, "room-b", [("ag1", "cam0", track, ago, one_hot("fear"), 0.9)
                                 for track, agos in ((1, (40, 39)), (2, (20, 19)), (3, (2, 1))) for ago in agos])
    with sessions() as s:
        state = aggregate.classroom_state(s, "room-b", 60, NOW, k=3)
        points = aggregate.timeline(s, "room-b", NOW - timedelta(seconds=60), NOW, 60, k=3)
    assert state.learners == 1 and state.suppressed and list(state.distribution) == [0.0] * 7
    assert points[0]["learners"] == 1 and points[0]["suppressed"] and points[0]["distribution"] == [0.0] * 7
    add_obs(sessions, "room-b", [("ag1", "cam0", track, 0.5, one_hot("fear"), 0.9) for track in (4, 5, 6)])
    with sessions() as s:  # three faces in view at once: three learners (not the six ids)
        state = aggregate.classroom_state(s, "room-b", 60, NOW, k=3)
    assert state.learners == 3 and not state.suppressed


def test_timeline_buckets_raw_data_and_falls_back_to_stored_snapshots(sessions):
    start = NOW - timedelta(seconds=60)
    add_obs(
        sessions,
        "room-c",
        [(f"ag{i}", "cam0", 1, 45, one_hot("happy"), 1.0) for i in range(3)]  # bucket [10, 20)
        + [(f"ag{i}", "cam0", 1, 5, one_hot("fear"), 1.0) for i in range(3)],  # bucket [50, 60)
    )
    # an older hour whose raw rows are gone: only a stored 60 s snapshot remains
    snap_end = start - timedelta(minutes=30)
    with sessions.begin() as s:
        s.add(db.Aggregate(classroom_id="room-c", window_end=snap_end, window_seconds=60, faces_present=5, learners=4,
                           agents_online=1, distribution=one_hot("sad"), states={}, observations=40))
    with sessions() as s:
        points = aggregate.timeline(s, "room-c", start, NOW, 10, k=3)
        old = aggregate.timeline(s, "room-c", start - timedelta(hours=1), start, 600, k=3)
    assert [p["t"] for p in points] == [
        (start + timedelta(seconds=10)).isoformat() + "Z",
        (start + timedelta(seconds=50)).isoformat() + "Z",
    ]
    assert points[0]["distribution"][EMOTIONS.index("happy")] == pytest.approx(1.0)
    assert points[1]["states"]["confused"] > 0.5 and points[1]["learners"] == 3
    assert len(old) == 1 and old[0]["observations"] == 40 and old[0]["faces"] == 5
    assert old[0]["distribution"][EMOTIONS.index("sad")] == pytest.approx(1.0)


def test_store_writes_batches_and_attaches_them_to_one_auto_opened_session(sessions):
    from coordinator.bench import make_batch

    store = Store(sessions)
    batches = [Received(make_batch(f"ag{i}", "room-d", 4, seq=1), NOW) for i in range(3)]
    assert store.write(batches, []) == Written(12, 0)
    assert store.write([Received(make_batch("ag9", "room-d", 2, seq=1), NOW)], []) == Written(2, 0)
    with sessions() as s:
        assert s.get(db.Classroom, "room-d") is not None
        open_sessions = s.scalars(select(db.ClassSession).where(db.ClassSession.ended_at.is_(None))).all()
        assert len(open_sessions) == 1
        attached = s.scalar(select(func.count()).where(db.Observation.session_id == open_sessions[0].id))
        assert attached == 14
        assert s.scalar(select(func.count()).select_from(db.Agent)) == 4
    # explicit start closes the open session and opens its successor; a second store agrees on ids
    new_id = store.start_session("room-d", NOW, course_id="math-101")
    assert new_id != open_sessions[0].id
    assert Store(sessions).write([Received(make_batch("ag1", "room-d", 1, seq=2), NOW)], []) == Written(1, 0)
    with sessions() as s:
        row = s.scalars(select(db.Observation).order_by(db.Observation.id.desc())).first()
        assert row.session_id == new_id
        assert s.get(db.ClassSession, new_id).course_id == "math-101"
    assert store.end_session("room-d", NOW) == 1 and store.end_session("room-d", NOW) == 0


def test_a_window_starts_no_earlier_than_the_last_session_end(sessions):
    """A lesson started 20 s ago is judged on its own 20 s: the happy minute before it, in the
    session the start closed, is not in its 60 s window; a classroom whose session has run all
    along keeps the whole window."""
    before = [(f"ag{i}", "cam0", 1, 40, one_hot("happy"), 1.0) for i in range(3)]
    after = [(f"ag{i}", "cam0", 1, 10, one_hot("fear"), 1.0) for i in range(3)]
    add_obs(sessions, "room-s", before + after)
    add_obs(sessions, "room-t", before + after)
    store = Store(sessions)
    for room in ("room-s", "room-t"):
        store.start_session(room, NOW - timedelta(minutes=5))
    store.start_session("room-s", NOW - timedelta(seconds=20))
    with sessions() as s:
        states_ = aggregate.classroom_states(s, ["room-s", "room-t"], 60, NOW, k=3)
    lesson, whole = states_["room-s"], states_["room-t"]
    assert lesson.observations == 3 and lesson.distribution[EMOTIONS.index("fear")] == pytest.approx(1.0)
    assert lesson.window_start.ToDatetime() == NOW - timedelta(seconds=20) and lesson.session_id
    assert whole.observations == 6 and whole.window_start.ToDatetime() == NOW - timedelta(seconds=60)


def _raw_rows(rng: random.Random, count: int) -> list[tuple]:
    """Random observations: several agents, cameras and tracks, batch instants that repeat."""
    rows = []
    for _ in range(count):
        dist = [rng.random() for _ in EMOTIONS]
        total = sum(dist)
        rows.append((f"ag{rng.randrange(3)}", f"cam{rng.randrange(2)}", rng.randrange(1, 9),
                     rng.choice([0.5, 1, 2, 7.25, 9.999, 10, 11, 30, 59, 61]), [d / total for d in dist],
                     rng.uniform(0.2, 1.0)))
    return rows


def _by_brute_force(rows: list[tuple], window_s: float) -> tuple[int, int, list[float]]:
    """(observations, learners, distribution) straight from the raw rows: the definition (a window
    is its whole seconds, NOW being one: labels ending in [NOW - window_s, NOW); learners: distinct
    tracks, at most the sum of each camera's largest head count)."""
    inside = [r for r in rows if 0 < r[3] <= window_s]
    total = sum(r[5] for r in inside)
    dist = [sum(r[5] * r[4][i] for r in inside) / total for i in range(len(EMOTIONS))]
    peaks: dict[tuple[str, str], int] = {}
    for (agent, camera, _ago), faces in head_counts(inside).items():
        peaks[agent, camera] = max(peaks.get((agent, camera), 0), faces)
    return len(inside), min(len({(r[0], r[1], r[2]) for r in inside}), sum(peaks.values())), dist


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_window_from_rollups_equals_the_raw_definition(sessions, seed):
    """Rollups are an optimisation: over any window they must give what the raw rows give."""
    rng = random.Random(seed)
    rows = _raw_rows(rng, 400)
    for chunk in range(0, len(rows), 37):  # several transactions, like ingest's
        add_obs(sessions, "room-r", rows[chunk : chunk + 37], with_head_counts=False)
    add_head_counts(sessions, "room-r", rows)
    with sessions() as s:
        for window in (1, 10, 60):
            state = aggregate.classroom_state(s, "room-r", window, NOW, k=1)
            count, learners, dist = _by_brute_force(rows, window)
            assert (state.observations, state.learners) == (count, learners)
            assert list(state.distribution) == pytest.approx(dist, abs=1e-6)  # float32 on the wire
        # at most one rollup per agent and instant in each transaction
        transactions = -(-len(rows) // 37)
        assert s.scalar(select(func.count()).select_from(db.ObservationRollup)) <= transactions * 3 * 10


def test_a_database_from_before_rollups_gets_them_rebuilt_at_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    sessions = db.connect(url)
    rows = _raw_rows(random.Random(7), 300)
    add_obs(sessions, "room-o", rows)
    with sessions() as s:
        before = aggregate.classroom_state(s, "room-o", 60, NOW, k=1)
    db.ObservationRollup.__table__.drop(sessions.kw["bind"])  # as an older release left it
    again = db.connect(url)
    with again() as s:
        after = aggregate.classroom_state(s, "room-o", 60, NOW, k=1)
    assert before.observations == after.observations == _by_brute_force(rows, 60)[0]
    assert after.learners == before.learners
    assert list(after.distribution) == pytest.approx(list(before.distribution), abs=1e-6)


def test_online_rule_is_the_same_in_python_and_in_sql(sessions):
    cutoff = NOW - timedelta(seconds=30)
    cases = {
        f"ag-{state}-{ago}": (state, None if ago is None else NOW - timedelta(seconds=ago))
        for state in ("ONLINE", "DEGRADED", "OFFLINE", "UNKNOWN")
        for ago in (None, 5, 30, 31)
    }
    with sessions.begin() as s:
        s.add_all(db.Agent(id=i, classroom_id="room-x", state=st, last_seen=seen) for i, (st, seen) in cases.items())
    with sessions() as s:
        in_sql = set(s.scalars(select(db.Agent.id).where(db.Agent.online(cutoff))))
        in_python = {agent.id for agent in s.scalars(select(db.Agent)) if agent.online(cutoff)}
        counted = aggregate.agents_online_by_classroom(s, ["room-x"], NOW, 30)
    assert in_sql == in_python == {f"ag-{st}-{ago}" for st in ("ONLINE", "DEGRADED", "UNKNOWN") for ago in (5, 30)}
    assert counted == {"room-x": 6}


def active_classrooms_plan(sessions) -> str:
    """SQLite's plan for the statement :func:`aggregate.active_classrooms` runs, as it runs it."""
    engine, statements = sessions.kw["bind"], []

    def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions() as s:
            aggregate.active_classrooms(s, NOW)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    with engine.connect() as conn:
        return " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))


def test_active_classrooms_searches_an_index_on_window_end_also_in_a_database_made_before_it(tmp_path):
    """Asked every tick: scanning every rollup kept (30 days, 3.6 M) took 0.3-0.4 s a tick. An index
    added to the schema must reach existing databases too, which ``create_all`` does not do."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with db.connect(url).kw["bind"].begin() as conn:
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_rollup_end")  # the schema before the index
    plan = active_classrooms_plan(db.connect(url))
    assert "SEARCH observation_rollups USING INDEX ix_rollup_end (window_end>?)" in plan, plan
