"""Scoring a generated answer against a reference, by question type (MedSynth's types).

    closed, multiple_choice, counting, progression   exact match after normalisation
    open                                             token F1
    box                                              IoU >= 0.5 of "[x0, y0, x1, y1]" boxes
    size                                             within 20% (or 2 mm) of the reference
"""
from __future__ import annotations

import collections
import re
import string

_PUNCT = str.maketrans("", "", string.punctuation.replace(".", ""))
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalise(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # Drop full stops, keep decimal points.
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the multiset overlap of normalised words (SQuAD-style)."""
    p, r = normalise(prediction).split(), normalise(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as a box, or None if there are fewer than four."""
    nums = [float(x) for x in _NUMBER.findall(text)]
    return tuple(nums[:4]) if len(nums) >= 4 else None


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for degenerate boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def score(question_type: str, prediction: str, reference: str) -> float:
    """A score in [0, 1] for one answer; see the module docstring for the rule per type."""
    if question_type == "open":
        return token_f1(prediction, reference)
    if question_type == "box":
        p, r = parse_box(prediction), parse_box(reference)
        return float(p is not None and r is not None and box_iou(p, r) >= 0.5)
    if question_type == "size":
        p, r = _first_number(prediction), _first_number(reference)
        return float(p is not None and r is not None and abs(p - r) <= max(2.0, 0.2 * abs(r)))
    return float(normalise(prediction) == normalise(reference))
