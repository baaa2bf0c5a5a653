"""The policy engine: thresholds, minimum duration, hysteresis, cooldown (from stored signals), overrides."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from affectedge.settings import ConfigError
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db, policy, states
from coordinator.store import Store

T0 = datetime(2026, 3, 2, 9, 0, 0)
RULE = policy.Rule(
    name="confusion", signal="SLOW_DOWN", states=("confused",), above=0.4, clear=0.3,
    window_s=60, min_duration_s=30, cooldown_s=300,
)


def state_with(confused: float, learners: int = 10, k: int = 3) -> pb.ClassroomState:
    """A real ClassroomState whose confusion score is ``confused`` (rest engaged)."""
    msg = pb.ClassroomState(classroom_id="room-1", session_id="s1", course_id="c1", window_seconds=60,
                            learners=learners, observations=100, suppressed=learners < k)
    msg.distribution.extend([0.0] * 7)
    msg.states.extend(states.to_messages({"confused": confused, "engaged": 1 - confused}))
    return msg


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(db.connect(f"sqlite:///{tmp_path / 'policy.db'}"))


def run(engine: policy.PolicyEngine, store: Store, values: list[float], start: datetime = T0, step: int = 10,
        overrides: dict | None = None, learners: int = 10) -> list[tuple[int, pb.AdaptationSignal]]:
    """Feed one value per ``step`` seconds; store what fires (as the service does); (second, signal)."""
    fired = []
    for i, value in enumerate(values):
        now = start + timedelta(seconds=i * step)
        for signal in engine.evaluate("room-1", now, {60: state_with(value, learners)}, overrides or {}):
            store.add_signal(signal)
            fired.append((i * step, signal))
    return fired


def test_fires_after_min_duration_with_evidence_and_plain_reason(store):
    engine = policy.PolicyEngine((RULE,), store.last_signal_at)
    fired = run(engine, store, [0.2, 0.5, 0.5, 0.5, 0.6])
    assert [t for t, _ in fired] == [40]  # above since t=10, sustained 30 s at t=40
    signal = fired[0][1]
    assert signal.kind == pb.SLOW_DOWN and signal.classroom_id == "room-1" and signal.session_id == "s1"
    assert signal.reason == "confusion above 40% for 30 s"
    ev = signal.evidence
    assert ev.rule == "confusion"
    assert ev.threshold == pytest.approx(0.4, abs=1e-6) and ev.observed == pytest.approx(0.6, abs=1e-6)
    assert ev.sustained_seconds == 30 and ev.learners == 10 and len(ev.distribution) == 7
    assert 0.5 < signal.strength < 1.0


def test_a_dip_below_the_trigger_restarts_the_duration(store):
    engine = policy.PolicyEngine((RULE,), store.last_signal_at)
    assert run(engine, store, [0.5, 0.5, 0.35, 0.5, 0.5, 0.5]) == []
    assert [t for t, _ in run(engine, store, [0.5], start=T0 + timedelta(seconds=60))] == [0]


def test_hysteresis_one_signal_while_hovering_and_rearm_after_clear(store):
    rule = RULE.model_copy(update={"cooldown_s": 0, "min_duration_s": 0})
    engine = policy.PolicyEngine((rule,), store.last_signal_at)
    # fires at 0; hovering between clear (0.3) and trigger (0.4) and back above does not re-fire;
    # falling below 0.3 re-arms it, and the next rise fires again
    values = [0.5, 0.35, 0.45, 0.32, 0.5, 0.25, 0.45]
    assert [t for t, _ in run(engine, store, values)] == [0, 60]


def test_cooldown_comes_from_stored_signals_and_survives_a_new_engine(store):
    rule = RULE.model_copy(update={"min_duration_s": 0})
    first = policy.PolicyEngine((rule,), store.last_signal_at)
    assert [t for t, _ in run(first, store, [0.5])] == [0]
    # a different instance (fresh memory, as after failover) sees the value cross again inside the cooldown
    second = policy.PolicyEngine((rule,), store.last_signal_at)
    assert run(second, store, [0.5, 0.2, 0.5], start=T0 + timedelta(seconds=60)) == []
    assert [t for t, _ in run(second, store, [0.5], start=T0 + timedelta(seconds=301))] == [0]


def test_below_k_learners_never_fires(store):
    engine = policy.PolicyEngine((RULE.model_copy(update={"min_duration_s": 0}),), store.last_signal_at)
    assert run(engine, store, [0.9, 0.9], learners=2) == []


def test_admin_override_moves_threshold_and_clear_together(store):
    rule = RULE.model_copy(update={"min_duration_s": 0, "cooldown_s": 0})
    engine = policy.PolicyEngine((rule,), store.last_signal_at)
    assert run(engine, store, [0.5], overrides={"confusion": 0.6}) == []
    fired = run(engine, store, [0.65, 0.55, 0.65, 0.45, 0.65], start=T0 + timedelta(seconds=5),
                overrides={"confusion": 0.6})
    # clear moves to 0.5 with the trigger: 0.55 keeps it active, 0.45 re-arms it
    assert [t for t, _ in fired] == [0, 40]
    assert fired[0][1].evidence.threshold == pytest.approx(0.6, abs=1e-6)
    assert RULE.levels(None) == pytest.approx((0.4, 0.3))


def test_below_rules_and_summed_states():
    rule = policy.Rule(name="low", signal="SWITCH_MODALITY", states=("engaged",), below=0.2, window_s=60)
    assert rule.levels(None) == pytest.approx((0.2, 0.3))
    assert policy.reason(rule, 0.2, 600) == "engagement below 20% for 10 min"
    both = policy.Rule(name="tired", signal="TAKE_BREAK", states=("frustrated", "bored"), above=0.5)
    msg = pb.ClassroomState(learners=5, observations=5)
    msg.states.extend(states.to_messages({"frustrated": 0.3, "bored": 0.25}))
    assert policy.observed_value(both, msg) == pytest.approx(0.55)
    assert policy.reason(both, 0.5, 90) == "frustration + boredom above 50% for 90 s"


def test_shipped_and_demo_rules_load():
    shipped = policy.load_rules()
    assert {r.signal for r in shipped} == {
        "SLOW_DOWN", "REVIEW", "OFFER_HINT", "INCREASE_CHALLENGE", "TAKE_BREAK", "SWITCH_MODALITY"
    }
    demo = policy.load_rules(Path(policy.__file__).with_name("demo_rules.toml"))
    assert [r.name for r in demo] == [r.name for r in shipped]


@pytest.mark.parametrize(("body", "message"), [
    pytest.param('signal = "SLOW_DOWN"\nstates = ["confused"]', "exactly one of `above` or `below`", id="no-level"),
    pytest.param('signal = "NAP"\nstates = ["confused"]\nabove = 0.4', "SLOW_DOWN", id="signal"),
    pytest.param('signal = "REVIEW"\nstates = ["sleepy"]\nabove = 0.4', "engaged", id="state"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\nclear = 0.5', "hysteresis", id="clear"),
    # each of these loaded, then counted a state twice, fired and never cleared, or broke every tick
    pytest.param('signal = "REVIEW"\nstates = ["confused", "confused"]\nabove = 0.4',
                 r"rule\.0\.states.*each state once", id="state-twice"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.0', r"rule\.0\.above.*greater than 0", id="above-0"),
    pytest.param('signal = "REVIEW"\nstates = ["engaged"]\nbelow = 1.0', r"rule\.0\.below.*less than 1", id="below-1"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\nclear = 0.0', "above 0 and below `above`",
                 id="clear-0"),
    pytest.param('signal = "REVIEW"\nstates = ["engaged"]\nbelow = 0.2\nclear = 1.0', "above `below` and below 1",
                 id="clear-1"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = true', r"rule\.0\.above.*valid number",
                 id="above-bool"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\nwindow_s = true', r"rule\.0\.window_s.*integer",
                 id="window-bool"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\ncooldown_s = inf', r"rule\.0\.cooldown_s.*finite",
                 id="cooldown-inf"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\ncooldown_s = nan', r"rule\.0\.cooldown_s.*finite",
                 id="cooldown-nan"),
    pytest.param('signal = "REVIEW"\nstates = ["bored"]\nabove = 0.4\nmin_duration_s = 6e10',
                 r"rule\.0\.min_duration_s.*less than or equal to 604800", id="duration-huge"),
])
def test_bad_rules_are_one_line_config_errors(tmp_path: Path, body: str, message: str):
    path = tmp_path / "rules.toml"
    path.write_text(f'[[rule]]\nname = "x"\n{body}\n')
    with pytest.raises(ConfigError, match=message) as info:
        policy.load_rules(path)
    assert "\n" not in str(info.value)


def test_a_new_session_starts_the_rules_afresh(store):
    """A rule half-way through its minimum duration, or fired and waiting to clear, in one lesson
    carries nothing into the next one."""
    rule = RULE.model_copy(update={"cooldown_s": 0})
    engine = policy.PolicyEngine((rule,), store.last_signal_at)

    def tick(seconds: int, confused: float, session: str) -> list[pb.AdaptationSignal]:
        state = state_with(confused)
        state.session_id = session
        return engine.evaluate("room-1", T0 + timedelta(seconds=seconds), {60: state}, {})

    assert tick(0, 0.5, "s1") == [] and tick(20, 0.5, "s1") == []
    assert tick(30, 0.5, "s2") == []  # 30 s above the trigger, but only 0 s of them in s2
    fired = tick(60, 0.5, "s2")
    assert len(fired) == 1 and fired[0].session_id == "s2" and fired[0].evidence.sustained_seconds == 30
    assert tick(70, 0.5, "s2") == []  # fired, waiting for the clear level
    assert tick(80, 0.5, "s3") == [] and len(tick(110, 0.5, "s3")) == 1  # s3 is not held by s2's signal


def test_an_override_near_the_end_of_the_scale_can_still_clear(store):
    """With a 10-point gap, a 5% trigger would put the clear level at 0, which a share never
    falls below: the rule would stay fired for good. It clears halfway to 0 instead."""
    rule = RULE.model_copy(update={"min_duration_s": 0, "cooldown_s": 0})
    assert rule.levels(0.05) == pytest.approx((0.05, 0.025))
    low = policy.Rule(name="low", signal="SWITCH_MODALITY", states=("engaged",), below=0.95, window_s=60)
    assert low.levels(0.95) == pytest.approx((0.95, 0.975))
    engine = policy.PolicyEngine((rule,), store.last_signal_at)
    fired = run(engine, store, [0.1, 0.1, 0.0, 0.1], overrides={"confusion": 0.05})
    assert [t for t, _ in fired] == [0, 30]  # cleared by the 0.0 at 20 s, fired again at 30 s


def test_a_signal_that_could_not_be_stored_fires_again_on_the_next_tick(store):
    rule = RULE.model_copy(update={"min_duration_s": 0})
    engine = policy.PolicyEngine((rule,), store.last_signal_at)
    first = engine.evaluate("room-1", T0, {60: state_with(0.5)}, {})
    assert len(first) == 1
    engine.unfire(first[0])  # the service does this when storing it fails
    again = engine.evaluate("room-1", T0 + timedelta(seconds=1), {60: state_with(0.5)}, {})
    assert len(again) == 1 and again[0].id != first[0].id


def test_a_window_with_nothing_to_judge_does_not_rearm_a_fired_rule(store):
    """Confusion stays at 60% for 15 min; one window at t=400 s has too few learners to judge. The
    rule fired at 30 s and never came back below its clear level: one signal, not a second at 440 s."""
    engine = policy.PolicyEngine((RULE,), store.last_signal_at)
    fired = []
    for second in range(0, 900, 10):
        state = state_with(0.6, learners=2 if second == 400 else 10)
        for signal in engine.evaluate("room-1", T0 + timedelta(seconds=second), {60: state}, {}):
            store.add_signal(signal)
            fired.append(second)
    assert fired == [30]


def test_a_rule_fired_before_a_later_rule_fails_is_taken_back(store):
    """Judging a rule reads the cooldown from the database; when that read fails after an earlier
    rule of the same classroom fired, that signal never reaches the caller, so its rule must not stay
    marked as fired (it would wait for a clear that may never come)."""
    first = RULE.model_copy(update={"min_duration_s": 0, "cooldown_s": 0})
    second = RULE.model_copy(update={"name": "confusion-cooldown", "min_duration_s": 0})
    engine = policy.PolicyEngine((first, second), store.last_signal_at)
    with store.sessions.kw["bind"].begin() as conn:
        conn.exec_driver_sql("ALTER TABLE signals RENAME TO signals_away")
    with pytest.raises(OperationalError, match="no such table: signals"):
        engine.evaluate("room-1", T0, {60: state_with(0.5)}, {})
    with store.sessions.kw["bind"].begin() as conn:
        conn.exec_driver_sql("ALTER TABLE signals_away RENAME TO signals")
    again = engine.evaluate("room-1", T0 + timedelta(seconds=1), {60: state_with(0.5)}, {})
    assert sorted(s.evidence.rule for s in again) == ["confusion", "confusion-cooldown"]


@pytest.mark.parametrize(("rule", "value", "problem"), [
    (RULE, 0.6, None),
    (RULE, 1, None),
    (RULE, 0, "above 0"),  # a rising trigger of 0 holds whatever the class does and never clears
    (RULE, True, "a number"),  # JSON true is not 100 %
    (RULE, float("nan"), "a number"),
    (policy.Rule(name="low", signal="SWITCH_MODALITY", states=("engaged",), below=0.2), 0, None),
    (policy.Rule(name="low", signal="SWITCH_MODALITY", states=("engaged",), below=0.2), 1.0, "below 1"),
])
def test_an_override_is_held_to_the_bounds_of_the_rules_own_trigger(rule, value, problem):
    found = rule.override_problem(value)
    assert (found is None) if problem is None else (problem in found)
