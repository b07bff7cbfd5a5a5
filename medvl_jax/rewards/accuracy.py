"""Accuracy reward: is the answer of a completion right, by question type?

The answer is the text of the last ``<answer>…</answer>`` block when there is one, else the
whole completion. Then, by ``question_type`` (MedSynth's types; unknown types use exact match):

    closed           yes/no: right only if exactly one of the words "yes" / "no" appears
                     ("normal", "not", "none" are not "no") and it is the reference
    multiple_choice  the option letter A-D ("B", "(b)", "B.", "B) text", "answer: B",
                     "the answer is B"), or the text of exactly one option when ``options``
                     are given
    counting         numbers (digits or words zero..twenty) equal within ``count_tol``
    size             first number with its unit (mm or cm, converted to mm) within
                     max(size_abs_tol, size_rel_tol * |reference|)
    box              IoU of "[x0, y0, x1, y1]" boxes >= iou_threshold
    others           normalised exact match (medvl_jax.evaluate.scoring.normalise)

Rewards are 1.0 or 0.0. Example fields: ``answer`` (reference per completion),
``question_type`` (per completion, optional), ``options`` (per completion, optional).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from medvl_jax.evaluate import scoring

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)
_LETTER_ALONE = re.compile(r"\s*\(?([A-Da-d])\)?\s*[.):]?\s*")
_LETTER_LEAD = re.compile(r"\s*\(?([A-D])[.)]\s+\S")
# "answer is B because…" (upper case), "answer: b." (lower case only before punctuation/end,
# so that "the answer is a nodule" is not option A).
_SAID = r"\b(?:[Aa]nswer|[Oo]ption|[Cc]hoice)\s*(?:is\s*)?[:=]?\s*\(?"
_LETTER_SAID = re.compile(_SAID + r"([A-D])\)?(?![A-Za-z])")
_LETTER_SAID_LOWER = re.compile(_SAID + r"([a-d])\)?(?=\s*(?:[.,;:!)\n]|$))")
_LETTER_PAREN = re.compile(r"\(([A-Da-d])\)")
_NUMBER_UNIT = re.compile(r"(-?\d+(?:\.\d+)?)\s*(mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)?"
                          r"(?![A-Za-z])", re.IGNORECASE)
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r"|none)\b", re.IGNORECASE)
LETTERS = "ABCD"


def extract_answer(completion: str) -> str:
    """The text of the last ``<answer>…</answer>`` block, else the whole completion (stripped)."""
    found = _ANSWER_TAG.findall(completion)
    return (found[-1] if found else completion).strip()


def yes_no(text: str) -> str | None:
    """"yes" or "no" if exactly one of the two words appears in ``text``, else None."""
    y, n = bool(_YES.search(text)), bool(_NO.search(text))
    if y == n:
        return None
    return "yes" if y else "no"


def choice_letter(text: str, options: Sequence[str] = ()) -> str | None:
    """The option letter (A-D, upper case) that ``text`` gives, or None.

    Accepts a bare letter ("b", "(c)", "D."), a letter leading the option text ("B. right"),
    "answer: B" / "the answer is (b)" / "option C", a parenthesised letter anywhere, or the
    text of exactly one of ``options``.
    """
    m = (_LETTER_ALONE.fullmatch(text) or _LETTER_LEAD.match(text)
         or _LETTER_SAID.search(text) or _LETTER_SAID_LOWER.search(text)
         or _LETTER_PAREN.search(text))
    if m:
        return m.group(1).upper()
    if options:
        norm = scoring.normalise(text)
        hits = [i for i, o in enumerate(options) if scoring.normalise(o) == norm]
        if len(hits) == 1 and hits[0] < len(LETTERS):
            return LETTERS[hits[0]]
    return None


def parse_count(text: str) -> float | None:
    """The first number of ``text`` (digits, or a number word zero..twenty, "none" = 0)."""
    m = _NUMBER_UNIT.search(text)
    w = _NUMBER_WORD.search(text)
    if m and (not w or m.start() < w.start()):
        return float(m.group(1))
    if w:
        word = w.group(1).lower()
        return 0.0 if word == "none" else float(_WORDS.index(word))
    return None


def parse_size_mm(text: str) -> float | None:
    """The first number of ``text`` in millimetres ("18 mm", "18mm", "1.8 cm"; no unit = mm)."""
    m = _NUMBER_UNIT.search(text)
    if not m:
        return None
    value = float(m.group(1))
    unit = (m.group(2) or "mm").lower()
    return value * 10.0 if unit.startswith("c") else value


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
    """Tolerances of :func:`make_accuracy_reward` (defaults as medvl_jax.evaluate.scoring)."""
    count_tol: float = 0.0
    size_abs_tol: float = 2.0   # mm
    size_rel_tol: float = 0.2
    iou_threshold: float = 0.5


def is_correct(prediction: str, reference: str, question_type: str | None = None,
               options: Sequence[str] = (), config: AccuracyConfig = AccuracyConfig()) -> bool:
    """Whether the answer text ``prediction`` (already extracted) matches ``reference``. An
    empty prediction is never right; an empty reference is an error (no answer to check)."""
    if not reference.strip():
        raise ValueError(f"empty reference answer {reference!r}: nothing to score against")
    if not prediction.strip():
        return False
    qt = question_type or ""
    if qt == "closed":
        want = yes_no(reference)
        return want is not None and yes_no(prediction) == want
    if qt == "multiple_choice":
        want = choice_letter(reference, options)
        return want is not None and choice_letter(prediction, options) == want
    if qt == "counting":
        p, r = parse_count(prediction), parse_count(reference)
        return p is not None and r is not None and abs(p - r) <= config.count_tol
    if qt == "size":
        p, r = parse_size_mm(prediction), parse_size_mm(reference)
        return (p is not None and r is not None
                and abs(p - r) <= max(config.size_abs_tol, config.size_rel_tol * abs(r)))
    if qt == "box":
        p, r = scoring.parse_box(prediction), scoring.parse_box(reference)
        return p is not None and r is not None and scoring.box_iou(p, r) >= config.iou_threshold
    return scoring.normalise(prediction) == scoring.normalise(reference)


def _per_completion(name: str, values, n: int) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or len(values) != n:
        raise ValueError(f"example field {name!r} must be a list with one entry per completion "
                         f"({n}), got {values!r:.80}")
    return list(values)


def make_accuracy_reward(config: AccuracyConfig = AccuracyConfig()):
    """An accuracy reward function with the tolerances of ``config``."""

    def accuracy_reward(prompts: list[str], completions: list[str], *, answer=None,
                        question_type=None, options=None, **_) -> list[float]:
        """1.0 where the completion's answer is right for its question type, else 0.0."""
        del prompts
        n = len(completions)
        if answer is None:
            raise ValueError("accuracy_reward needs the example field 'answer' (the reference "
                             "answer of each completion)")
        refs = _per_completion("answer", answer, n)
        types = _per_completion("question_type", question_type, n)
        opts = _per_completion("options", options, n)
        return [float(is_correct(extract_answer(c), str(r), t, o or (), config))
                for c, r, t, o in zip(completions, refs, types, opts)]

    return accuracy_reward


accuracy_reward = make_accuracy_reward()
