"""The policy engine: sustained learning states in a classroom become adaptation signals.

Rules live in a TOML file (``coordinator/rules.toml`` is the shipped, commented default). Per
classroom and rule the engine keeps two facts between ticks: since when the trigger condition has
held, and whether the rule has fired and not yet cleared (hysteresis); a window with nothing to
judge (below k, no data) restarts the first but not the second, and a new class session starts
both afresh. Cooldown is *not* kept in memory: it is read from the stored signals, so it survives a
restart and a change of the instance that evaluates policy. Admin overrides of a rule's threshold
come from the ``settings`` table (``policy.<rule>.threshold``, a number); the clear level moves with
it, keeping the hysteresis gap.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from affectedge import settings
from affectedge.topics import ID_PATTERN
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import states

DEFAULT_RULES = Path(__file__).with_name("rules.toml")
#: Numbers are strict (TOML's ``true`` is not 1) and finite. A rising trigger of 0, or a falling one
#: of 1, holds whatever the class does and could never clear, so it is refused.
Share = Annotated[float, Field(ge=0, le=1, strict=True)]
RisingTrigger = Annotated[float, Field(gt=0, le=1, strict=True)]
FallingTrigger = Annotated[float, Field(ge=0, lt=1, strict=True)]
#: A week at most: a minimum duration longer than a lesson is never met (a new session starts every
#: rule afresh), and a week's cooldown already means "once a week per classroom"; more is a slip of
#: the keyboard, and infinity (or ~6e10 s) overflowed every tick's date arithmetic, stopping policy in
#: all classrooms.
MAX_SECONDS = 7 * 86400
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, strict=True, allow_inf_nan=False)]
DEFAULT_HYSTERESIS = 0.1


class Rule(settings.Section):
    name: str
    signal: str
    states: tuple[str, ...]
    above: RisingTrigger | None = None
    below: FallingTrigger | None = None
    clear: Share | None = None
    window_s: Annotated[int, Field(ge=1, le=86400, strict=True)] = 60
    min_duration_s: Seconds = 0
    cooldown_s: Seconds = 600

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError("use 1-64 letters, digits, '_' or '-'")
        return value

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        kinds = [v.name for v in pb.SignalKind.DESCRIPTOR.values if v.number]
        if value not in kinds:
            raise ValueError(f"use one of {', '.join(kinds)}")
        return value

    @field_validator("states")
    @classmethod
    def _states(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(s not in states.STATES for s in value):
            raise ValueError(f"list one or more of {', '.join(states.STATES)}")
        if len(set(value)) != len(value):  # a state listed twice would count twice
            raise ValueError("list each state once")
        return value

    @model_validator(mode="after")
    def _levels(self) -> Rule:
        if (self.above is None) == (self.below is None):
            raise ValueError(f"rule {self.name!r}: set exactly one of `above` or `below`")
        if self.clear is not None and not self._clear_is_inside(self.trigger, self.clear):
            side = "above 0 and below `above`" if self.rising else "above `below` and below 1"
            raise ValueError(f"rule {self.name!r}: `clear` must be {side} (hysteresis: the value must be "
                             "able to come back past it)")
        return self

    @property
    def rising(self) -> bool:
        return self.above is not None

    @property
    def trigger(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    def _clear_is_inside(self, trigger: float, clear: float) -> bool:
        """Between the trigger and the end of the scale the value can reach past it (a share never
        falls below 0 nor rises above 1)."""
        return 0 < clear < trigger if self.rising else trigger < clear < 1

    def override_problem(self, value: object) -> str | None:
        """Why ``value`` cannot be this rule's trigger (an admin override), or None if it can. The
        bounds are those of ``above``/``below`` in the file: a rising trigger of 0 or a falling one
        of 1 holds whatever the class does and never clears."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return "it must be a number"
        if self.rising and not 0 < value <= 1:
            return "it must be above 0 and at most 1 for this rule (it fires above its threshold)"
        if not self.rising and not 0 <= value < 1:
            return "it must be at least 0 and below 1 for this rule (it fires below its threshold)"
        return None

    def levels(self, override: float | None) -> tuple[float, float]:
        """(trigger, clear) with an admin override of the trigger applied. The clear level keeps the
        rule's gap, but where that would put it at or past the end of the 0..1 scale (an override
        of 5% with a 10-point gap) it goes halfway to that end instead: a share never falls below
        0, so a clear level of 0 would leave the rule fired for good."""
        default_clear = self.trigger - DEFAULT_HYSTERESIS if self.rising else self.trigger + DEFAULT_HYSTERESIS
        gap = (self.clear if self.clear is not None else default_clear) - self.trigger
        trigger = self.trigger if override is None else override
        clear = trigger + gap
        if self.rising and clear <= 0:
            clear = trigger / 2
        elif not self.rising and clear >= 1:
            clear = (1 + trigger) / 2
        return trigger, clear


class RulesFile(settings.Section):
    rule: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> RulesFile:
        names = [r.name for r in self.rule]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self


def state_windows(aggregate_windows: Iterable[int], rules: Iterable[Rule]) -> tuple[int, ...]:
    """The window lengths the coordinator computes classroom states over, shortest first: the
    [aggregate] windows and the rules'. The only ones a client may ask for: any other length would let
    a caller pick windows that end together and differ by a few seconds, and read those by differencing.
    """
    return tuple(sorted(set(aggregate_windows) | {rule.window_s for rule in rules}))


def load_rules(path: str | Path = "") -> tuple[Rule, ...]:
    """Rules from ``path`` ("" = the shipped default); ConfigError on any problem."""
    return settings.load(Path(path) if path else DEFAULT_RULES, RulesFile).rule


def threshold_key(rule: str) -> str:
    return f"policy.{rule}.threshold"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{round(seconds)} s"
    return f"{round(seconds / 60)} min"


def reason(rule: Rule, threshold: float, sustained_s: float) -> str:
    """Plain words, e.g. "confusion above 40% for 3 min"."""
    what = " + ".join(states.NOUNS[s] for s in rule.states)
    side = "above" if rule.rising else "below"
    return f"{what} {side} {round(threshold * 100)}% for {_duration(sustained_s)}"


def strength(rule: Rule, observed: float, threshold: float) -> float:
    """0.5 at the threshold, rising linearly to 1.0 at the far end of the 0..1 scale."""
    margin = observed - threshold if rule.rising else threshold - observed
    headroom = (1.0 - threshold) if rule.rising else threshold
    return min(1.0, max(0.0, 0.5 + 0.5 * (margin / headroom if headroom > 0 else 1.0)))


def observed_value(rule: Rule, state: pb.ClassroomState) -> float | None:
    """The rule's number for a window, or None when there is nothing to judge (or below k)."""
    if state.suppressed or state.observations == 0:
        return None
    scores = states.from_messages(state.states)
    return sum(scores.get(s, 0.0) for s in rule.states)


@dataclass
class _Track:
    since: datetime | None = None  # when the trigger condition started holding
    active: bool = False  # fired and not yet cleared
    session_id: str = ""  # the class session these facts are about


#: (classroom_id, rule name, since) -> when that rule last fired there after ``since``, or None
LastFired = Callable[[str, str, datetime], datetime | None]


class PolicyEngine:
    def __init__(self, rules: tuple[Rule, ...], last_fired: LastFired):
        self.rules = rules
        self.last_fired = last_fired
        self._tracks: dict[tuple[str, str], _Track] = {}

    @property
    def windows(self) -> set[int]:
        return {r.window_s for r in self.rules}

    def reset(self) -> None:
        """Forget all tracking (this instance stopped evaluating policy)."""
        self._tracks.clear()

    def unfire(self, signal: pb.AdaptationSignal) -> None:
        """Take back a signal that could not be stored, so its rule fires again on the next tick
        instead of waiting, marked as fired, for a clear that may never come."""
        track = self._tracks.get((signal.classroom_id, signal.evidence.rule))
        if track is not None:
            track.active = False

    def forget_except(self, classroom_ids: set[str]) -> None:
        """Drop tracking of classrooms that are no longer active."""
        for key in [k for k in self._tracks if k[0] not in classroom_ids]:
            del self._tracks[key]

    def evaluate(
        self,
        classroom_id: str,
        now: datetime,
        windows: dict[int, pb.ClassroomState],
        overrides: dict[str, float],
    ) -> list[pb.AdaptationSignal]:
        """New signals for one classroom given its states over each rule's window. Each one marks its
        rule fired: the caller stores it or hands it to :meth:`unfire`. If judging a later rule raises
        (the cooldown is a database read), the ones fired so far are taken back here, since the caller
        never sees them."""
        fired: list[pb.AdaptationSignal] = []
        try:
            for rule in self.rules:
                signal = self._judge(rule, classroom_id, now, windows[rule.window_s], overrides.get(rule.name))
                if signal is not None:
                    fired.append(signal)
        except BaseException:
            for signal in fired:
                self.unfire(signal)
            raise
        return fired

    def _judge(
        self, rule: Rule, classroom_id: str, now: datetime, state: pb.ClassroomState, override: float | None
    ) -> pb.AdaptationSignal | None:
        """One rule's step: its tracking updated, and the signal if it fires now."""
        track = self._tracks.setdefault((classroom_id, rule.name), _Track())
        if track.session_id != state.session_id:  # a new lesson: nothing carries over
            track.since, track.active, track.session_id = None, False, state.session_id
        value = observed_value(rule, state)
        threshold, clear = rule.levels(override)
        if value is None:
            # nothing to judge (below k, no data): the duration restarts, but a fired rule stays
            # fired, since it re-arms only once the value is seen back past its clear level
            track.since = None
            return None
        if track.active:
            if (value < clear) if rule.rising else (value > clear):
                track.since, track.active = None, False
            return None
        if not ((value >= threshold) if rule.rising else (value <= threshold)):
            track.since = None
            return None
        track.since = track.since or now
        sustained = (now - track.since).total_seconds()
        if sustained < rule.min_duration_s:
            return None
        if rule.cooldown_s and self.last_fired(classroom_id, rule.name, now - timedelta(seconds=rule.cooldown_s)):
            return None
        track.active = True
        return self._signal(rule, state, now, value, threshold, sustained)

    @staticmethod
    def _signal(
        rule: Rule, state: pb.ClassroomState, now: datetime, value: float, threshold: float, sustained: float
    ) -> pb.AdaptationSignal:
        signal = pb.AdaptationSignal(
            id=uuid.uuid4().hex,
            classroom_id=state.classroom_id,
            session_id=state.session_id,
            course_id=state.course_id,
            kind=pb.SignalKind.Value(rule.signal),
            strength=strength(rule, value, threshold),
            reason=reason(rule, threshold, sustained),
        )
        evidence = signal.evidence
        evidence.rule = rule.name
        evidence.window_start.CopyFrom(state.window_start)
        evidence.window_end.CopyFrom(state.window_end)
        evidence.distribution.extend(state.distribution)
        evidence.states.extend(state.states)
        evidence.observed = value
        evidence.threshold = threshold
        evidence.sustained_seconds = round(sustained)
        evidence.learners = state.learners
        signal.created_at.FromDatetime(now)
        return signal
