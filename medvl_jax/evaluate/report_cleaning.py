"""Report text cleaning as R2Gen does it (github.com/cuhksz-nlp/R2Gen, ``modules/tokenizers.py``,
commit 5a2e63f), before BLEU/METEOR/ROUGE-L/CIDEr are computed by the COCO caption scorers.

The report is split into sentences on ". " after list numbers ("1. ", " 2. " ... " 5. ") are
removed and doubled full stops collapsed; each sentence loses quotes, slashes, backslashes and
apostrophes, is stripped and lower-cased, and loses the characters of
:data:`DROPPED_CHARACTERS`; the sentences are joined by " . " and end with " .". MIMIC-CXR's
variant first turns line breaks into spaces and collapses runs of underscores, spaces and full
stops further.

Quirks kept: "1. " is removed anywhere (also inside "11. "); a list number above 5 stays;
empty sentences stay (". ." in the output); the removed characters include ``: ; < = > ? @``
and ``[`` (a character range in R2Gen's pattern) but not digits.
"""
from __future__ import annotations

# Characters deleted from every sentence: . , ? ; * ! % ^ & _ + ( ) ] { } and the range
# ":" .. "[" of R2Gen's character class (":;<=>?@", the capitals, "[").
DROPPED_CHARACTERS = frozenset(".,?;*!%^&_+()]{}") | frozenset(
    chr(c) for c in range(ord(":"), ord("[") + 1))
_REMOVED_FIRST = ('"', "/", "\\", "'")


def _replace_times(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _drop_list_numbers(text: str) -> str:
    text = text.replace("1. ", "")
    for n in range(2, 6):
        text = text.replace(f". {n}. ", ". ")
    for n in range(2, 6):
        text = text.replace(f" {n}. ", ". ")
    return text


def _clean_sentence(sentence: str) -> str:
    for ch in _REMOVED_FIRST:
        sentence = sentence.replace(ch, "")
    sentence = sentence.strip().lower()
    return "".join(ch for ch in sentence if ch not in DROPPED_CHARACTERS)


def _join(text: str) -> str:
    sentences = text.strip().lower().split(". ")
    return " . ".join(_clean_sentence(s) for s in sentences) + " ."


def clean_iu_xray(report: str) -> str:
    """R2Gen's ``clean_report_iu_xray``: "The heart is normal. 2. No effusion." becomes
    "the heart is normal . no effusion ."."""
    text = _replace_times(str(report), "..", ".", 3)
    return _join(_drop_list_numbers(text))


def clean_mimic_cxr(report: str) -> str:
    """R2Gen's ``clean_report_mimic_cxr``: line breaks become spaces, runs of "__", "  " and
    ".." are collapsed (7, 6 and 8 passes), then as :func:`clean_iu_xray`."""
    text = str(report).replace("\n", " ")
    text = _replace_times(text, "__", "_", 7)
    text = _replace_times(text, "  ", " ", 6)
    text = _replace_times(text, "..", ".", 8)
    return _join(_drop_list_numbers(text))


CLEANERS = {"iu_xray": clean_iu_xray, "mimic_cxr": clean_mimic_cxr}


def cleaner_for(benchmark: str | None):
    """The cleaning of ``benchmark``: MIMIC-CXR's for ``mimic_cxr``, IU-Xray's otherwise (as
    R2Gen picks it by dataset name)."""
    return clean_mimic_cxr if benchmark == "mimic_cxr" else clean_iu_xray
