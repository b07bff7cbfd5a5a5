"""LLaVA-Med's VQA scoring (``llava/eval/run_eval.py``, ``run_eval_batch.py`` and their
``eval_metrics`` package, tag v1.0.0), rule for rule, so that numbers are comparable.

Both scripts lower-case and normalise the reference and the prediction once
(:func:`normalise`), then:

* closed questions (the dataset's ``answer_type`` CLOSED) —
  ``run_eval.py`` (:func:`closed_run_eval`): the prediction contains the substring "yes" or "no"
  and the reference is a substring of it; ``run_eval_batch.py`` (:func:`closed_batch`): the
  reference is a substring of the prediction (no yes/no condition);
* open questions — "recall" (:func:`recall`): the metric the LLaVA-Med paper reports for open
  questions. It normalises both texts a second time first. ``run_eval_batch.py`` also prints an
  "open accuracy", the reference being a substring of the prediction (:func:`open_hit`).

The normaliser's quirks are kept: its full-stop deletion stops after 32 full stops per pass
(``re.sub``'s count argument was given ``re.UNICODE``, which is 32), the number words
``none``/``zero``..``ten`` become digits, so "none" is "0". Its table restoring apostrophes
("dont" -> "don't") is not reproduced: it maps whole words one to one, so it changes a verdict
only for a prediction and a reference that spell the same contraction differently.
:func:`normalise_fixed` is the same normaliser without the 32-stop limit.
"""
from __future__ import annotations

import collections
import re

# Marks deleted where they touch a space (or everywhere, if the text holds digit-comma-digit)
# and replaced by a space elsewhere.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
FULL_STOP_LIMIT = 32  # Full stops deleted per pass by the original normaliser.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_FULL_STOP = re.compile(r"\.(?!\d)")


def _normalise(text: str, stop_limit: int) -> str:
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        touches = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if touches or delete_all else " ")
    out = _FULL_STOP.sub("", out, count=stop_limit)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in ARTICLES).replace(",", "")


def normalise(text: str) -> str:
    """LLaVA-Med's ``normalize_word``: each mark of :data:`PUNCTUATION` is deleted where it
    touches a space in ``text`` (everywhere, if ``text`` holds digit-comma-digit) and becomes a
    space elsewhere; the first 32 full stops not followed by a digit are deleted; lower case;
    number words become digits; articles dropped; commas deleted."""
    return _normalise(text, FULL_STOP_LIMIT)


def normalise_fixed(text: str) -> str:
    """:func:`normalise` deleting every full stop not followed by a digit."""
    return _normalise(text, 0)


def closed_run_eval(prediction: str, reference: str) -> float:
    """``run_eval.py``'s closed rule on the raw texts: after lower-casing and :func:`normalise`,
    the prediction contains "yes" or "no" as a substring and the reference is a substring of
    it. ("normal" and "unknown" contain "no"; "yes, no evidence" matches either answer.)"""
    p, r = normalise(prediction.lower()), normalise(reference.lower())
    return float(("yes" in p or "no" in p) and r in p)


def closed_batch(prediction: str, reference: str) -> float:
    """``run_eval_batch.py``'s closed rule: after lower-casing and :func:`normalise`, the
    reference is a substring of the prediction ("no" is found in "normal", "cannot", "not")."""
    return float(normalise(reference.lower()) in normalise(prediction.lower()))


def open_hit(prediction: str, reference: str) -> float:
    """``run_eval_batch.py``'s "open accuracy": the normalised reference is a substring of
    the normalised prediction."""
    return closed_batch(prediction, reference)


def _word_counts(text: str) -> collections.Counter:
    return collections.Counter(text.lower().strip().split())


def recall(prediction: str, reference: str, *, fixed: bool = False) -> float:
    """LLaVA-Med's open-question recall: both texts lower-cased and normalised twice (once by
    the script, once by its F1 function); ``tp`` counts the prediction's occurrences of words
    the reference has, ``fn`` the reference's occurrences of words the prediction lacks;
    ``tp / (tp + fn)``, 0 when either text has no words or nothing matches. A repeated shared
    word counts once per repetition ("left left" against "left zone": 2/3). ``fixed``: with
    :func:`normalise_fixed` (every full stop deleted)."""
    norm = normalise_fixed if fixed else normalise
    cand = _word_counts(norm(norm(prediction.lower())))
    ref = _word_counts(norm(norm(reference.lower())))
    if not cand or not ref:
        return 0.0
    tp = sum(n for w, n in cand.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    return tp / (tp + fn) if tp else 0.0


def _words_in(phrase: str, words: list[str]) -> bool:
    target = phrase.split()
    k = len(target)
    return k > 0 and any(words[i:i + k] == target for i in range(len(words) - k + 1))


def closed_strict(prediction: str, reference: str) -> float:
    """The whole-word closed rule (``llava_med_strict``), on :func:`normalise_fixed` words: a
    yes/no reference is right only if exactly one of the words "yes"/"no" occurs and it is
    the reference ("normal" is not "no"; "yes, no evidence of ..." is wrong whatever the
    reference); any other reference must occur as a whole-word sequence."""
    words = normalise_fixed(prediction.lower()).split()
    r = normalise_fixed(reference.lower())
    if r in ("yes", "no"):
        return float((("yes" in words) != ("no" in words)) and r in words)
    return float(_words_in(r, words))
