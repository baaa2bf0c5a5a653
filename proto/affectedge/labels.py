"""The one canonical emotion order, shared by the model, the wire contract and the coordinator.

Index ``i`` of every probability vector is ``EMOTIONS[i]``; the protobuf enum ``affectedge.v1.Emotion``
uses ``i + 1`` (0 is reserved for "unspecified"), and a test keeps the two in step.
"""

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: Folder / CSV names seen in public FER datasets, mapped to the canonical label.
SYNONYMS: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "neutral": "neutral",
    "calm": "neutral",
}


def canonical(name: str) -> str | None:
    """Canonical label for a dataset's class name (case-insensitive), or None if unknown."""
    return SYNONYMS.get(name.strip().lower())
