"""From the 7 basic emotions a FER model sees to the 5 learning-centred states instructors act on.

Basic-emotion classifiers are trained on posed or in-the-wild faces, not on learners, and the states
that matter in a classroom (engagement, confusion, frustration, boredom; D'Mello & Graesser's
"learning-centred affective states") are not among their classes. Each emotion's probability mass
is therefore split over the learning states by a fixed, documented matrix. The split is linear, so
applying it to a confidence-weighted class distribution gives exactly the confidence-weighted mean
of the per-observation state scores, and each row sums to 1, so the five states always sum to 1.

Why each emotion goes where it goes:

* **angry** -> frustrated 0.8, confused 0.2. Brow lowering and lip tightening, which FER models
  label anger, is the face of being blocked; the lowered brow (AU4) is also the main confusion cue.
* **disgust** -> frustrated 0.6, bored 0.4. In learners disgust-labelled faces (nose wrinkle,
  upper-lip raise) mostly appear as aversion to the task: irritation, or "this is tedious".
* **fear** -> confused 0.6, frustrated 0.4. Raised-and-drawn-together brows with widened eyes are
  the uncertainty/anxiety face; in class that is "I don't get this", sliding into frustration.
* **happy** -> engaged 1.0. Smiles in class accompany delight and enjoyment of the task.
* **sad** -> bored 0.5, confused 0.3, frustrated 0.2. Low-arousal negative faces (drooping lids
  and mouth corners) are disengagement; the inner-brow raise it shares with confusion takes a part.
* **surprise** -> engaged 0.5, confused 0.5. Surprise marks novelty: it is the onset of both
  curiosity (engagement) and of an impasse (confusion), which are hard to tell apart from a face.
* **neutral** -> neutral 0.6, engaged 0.3, bored 0.1. Concentration looks neutral, so part of it is
  attentive engagement; a small part is the flat face of boredom. What turns a neutral/sad face
  into *sustained* boredom is time, which the policy rules express with a minimum duration.

These are priors for a first deployment, not measurements; an institution that calibrates against
its own observations changes the table here, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb

STATES: tuple[str, ...] = ("engaged", "confused", "frustrated", "bored", "neutral")

#: emotion -> {state: share of that emotion's mass}; every row sums to 1
MAPPING: dict[str, dict[str, float]] = {
    "angry": {"frustrated": 0.8, "confused": 0.2},
    "disgust": {"frustrated": 0.6, "bored": 0.4},
    "fear": {"confused": 0.6, "frustrated": 0.4},
    "happy": {"engaged": 1.0},
    "sad": {"bored": 0.5, "confused": 0.3, "frustrated": 0.2},
    "surprise": {"engaged": 0.5, "confused": 0.5},
    "neutral": {"neutral": 0.6, "engaged": 0.3, "bored": 0.1},
}

#: the protobuf enum value of each state
KINDS: dict[str, int] = {
    "engaged": pb.ENGAGED,
    "confused": pb.CONFUSED,
    "frustrated": pb.FRUSTRATED,
    "bored": pb.BORED,
    "neutral": pb.NEUTRAL_STATE,
}

#: the noun an instructor reads in a signal's reason ("confusion above 40% for 3 min")
NOUNS: dict[str, str] = {
    "engaged": "engagement",
    "confused": "confusion",
    "frustrated": "frustration",
    "bored": "boredom",
    "neutral": "neutral expression",
}

_MATRIX: tuple[tuple[float, ...], ...] = tuple(
    tuple(MAPPING[emotion].get(state, 0.0) for emotion in EMOTIONS) for state in STATES
)


def from_distribution(distribution: Sequence[float]) -> dict[str, float]:
    """Learning-state scores (summing to the distribution's total) for a 7-way distribution."""
    if len(distribution) != len(EMOTIONS):
        raise ValueError(f"distribution has {len(distribution)} values; it must have {len(EMOTIONS)}")
    return {
        state: sum(w * p for w, p in zip(row, distribution, strict=True))
        for state, row in zip(STATES, _MATRIX, strict=True)
    }


def to_messages(scores: dict[str, float]) -> list[pb.LearningState]:
    """The scores as protobuf LearningState messages, in :data:`STATES` order."""
    return [pb.LearningState(kind=KINDS[state], score=scores.get(state, 0.0)) for state in STATES]


def from_messages(messages: Sequence[pb.LearningState]) -> dict[str, float]:
    names = {kind: state for state, kind in KINDS.items()}
    return {names[m.kind]: m.score for m in messages if m.kind in names}
