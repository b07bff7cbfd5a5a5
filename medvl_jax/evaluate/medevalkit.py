"""MedEvalKit's rule-based scoring (github.com/alibaba-damo-academy/MedEvalKit, commit 9b12e3b),
per dataset, quirks kept, so that a verdict here is the verdict MedEvalKit gives.

The pieces (``utils/utils.py``, mathruler's ``extract_boxed_content``, the datasets'
``cal_metrics`` and MMMU's ``eval_utils``):

* :func:`boxed` — the content of the last ``\\boxed{`` up to its matching brace, stripped; a
  box that is never closed (an answer cut off by the token budget) gives the literal text
  "None".
* :func:`answer_tags` — the complete ``<answer>...</answer>`` pairs joined by spaces; the
  whole text when there is none (or they are empty).
* :func:`parse_response` — lower case; a box if the text says "boxed" anywhere, else answer
  tags; then for each of :data:`ANSWER_MARKERS` in order, the text after its last occurrence.
  Nothing is stripped.
* :func:`judge_yes_no` — after :func:`parse_response`, line breaks and full stops removed:
  exactly one of the substrings "yes"/"no" occurs and the reference is a substring.
* :func:`judge_closed` — same cleaning, then equality with the lower-cased reference.
* :func:`judge_open` — :func:`parse_response` equals the lower-cased reference (the original
  also computes BLEU/ROUGE here and raises on an empty answer: see :class:`Verdict`).
* :func:`judge_multi_choice` — the option letter read from the response, the option text, or
  the most similar option (``difflib``), compared with the reference letter or text.
* :func:`mmmu_choice` / :func:`mmmu_open_val` — MMMU's parsers as MedEvalKit runs them.

:func:`verdict` applies the rules of one dataset (``vqa_rad``, ``pathvqa``, ``slake``,
``pmc_vqa``, ``omnimedvqa``, ``mmmu_med``) to one response; :func:`prompt` builds the prompt
MedEvalKit sends (non-reasoning mode). :func:`strict_verdict` is the repaired rule set of the
``medevalkit_strict`` protocol.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import string
from typing import Sequence

ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is",
                  "answer:", "答案:", "final answer", "final answer is")
NO_BOX = "None"  # What mathruler's extract_boxed_content returns when it finds no closed box.
YES_NO = ("yes", "no")
DATASETS = ("vqa_rad", "pathvqa", "slake", "pmc_vqa", "omnimedvqa", "mmmu_med")

# Prompt suffixes (question_formats.py, non-reasoning mode).
JUDGEMENT = {"en": "Please output 'yes' or 'no'(no extra output).",
             "zh": "请输出'是'或'否'(不要有任何其它输出)。"}
CLOSE_ENDED = {"en": "Answer the question using a single word or phrase.",
               "zh": "请用一个单词或者短语回答该问题。"}
OPEN_ENDED = {"en": "Please answer the question concisely.", "zh": "请简要回答该问题。"}
CHOICE = "Answer with the option's letter from the given choices directly."


# --------------------------------------------------------------------------------------------
# Extraction.
# --------------------------------------------------------------------------------------------

def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces matched), stripped; None when
    there is no ``\\boxed{`` or it is never closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    body = text[start + len("\\boxed{"):]
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return body[:i].strip()
    return None


def answer_tags(text: str) -> str:
    """The contents of the complete ``<answer>...</answer>`` pairs, each followed by a space,
    stripped; the whole text when that is empty; "" for an empty text."""
    if not text:
        return ""
    parts, start = [], text.find("<answer>")
    while start != -1:
        end = text.find("</answer>", start + len("<answer>"))
        if end == -1:
            break
        parts.append(text[start + len("<answer>"):end] + " ")
        start = text.find("<answer>", end + len("</answer>"))
    joined = "".join(parts).strip()
    return joined if joined else text


def parse_response(response: str) -> str:
    """MedEvalKit's ``parse_response``: lower case; if "boxed" occurs anywhere, the last box
    (:func:`boxed`, "None" when it is not closed); elif ``<answer>`` occurs, the answer tags;
    then, for each of :data:`ANSWER_MARKERS` in order, what follows its last occurrence."""
    r = response.lower()
    if "boxed" in r:
        b = boxed(r)
        r = NO_BOX if b is None else b
    elif "<answer>" in r:
        r = answer_tags(r)
    for marker in ANSWER_MARKERS:
        if marker in r:
            r = r.split(marker)[-1]
    return r


def pre_extract(response: str) -> str:
    """The first step of the VQA datasets' ``cal_metrics``, on the text as generated
    (case-sensitive): a closed box's content, else the answer tags if ``<answer>`` occurs."""
    b = boxed(response)
    if b is not None:
        return b
    return answer_tags(response) if "<answer>" in response else response


# --------------------------------------------------------------------------------------------
# Judgements.
# --------------------------------------------------------------------------------------------

def judge_yes_no(reference: str, response: str) -> bool:
    """``judge_judgement``: exactly one of the substrings "yes"/"no" in the parsed response
    (line breaks and full stops removed), and the lower-cased reference a substring of it."""
    r = parse_response(response).replace("\n", "").replace(".", "")
    return (("yes" in r) != ("no" in r)) and reference.lower() in r


def judge_closed(reference: str, response: str) -> bool:
    """``judge_close_end_vqa``: the parsed response, line breaks and full stops removed,
    equals the lower-cased reference (no stripping)."""
    return parse_response(response).replace("\n", "").replace(".", "") == reference.lower()


def open_raises(reference: str, response: str) -> bool:
    """Whether MedEvalKit's ``judge_open_end_vqa`` raises on this pair instead of judging
    it: its ROUGE call refuses a parsed response with no text between full stops, and its F1
    cannot unpack the 0 it returns when either side has no words."""
    r = parse_response(response)
    return (not any(r.split(".")) or not r.split()
            or not reference.lower().split())


def judge_open(reference: str, response: str) -> bool:
    """``judge_open_end_vqa``'s exact match: the parsed response equals the lower-cased
    reference (no stripping)."""
    return parse_response(response) == reference.lower()


def _most_similar(options: Sequence[str], text: str) -> int:
    best, index = 0.0, 0
    for i, o in enumerate(options):
        ratio = difflib.SequenceMatcher(None, o, text).ratio()
        if ratio > best:
            best, index = ratio, i
    return index


def judge_multi_choice(choices: Sequence[str], answer: str, response: str) -> bool:
    """``judge_multi_choice``: a lone letter as the first paragraph, or before the first full
    stop of the last paragraph, replaces the response; then :func:`parse_response`; the part
    before the first full stop and after the last colon (``head``) is compared with the
    reference (a letter or option text), read as a letter, or looked up among the options as
    they are listed (``choices``, often carrying their letter: "A. CT", "A:CT"); otherwise the
    option most similar to the whole parsed response is taken (first of ties; the first
    option when nothing is similar)."""
    r = response.lower()
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    paragraphs = r.split("\n\n")
    if paragraphs[0] in letters:
        r = paragraphs[0]
    elif paragraphs[-1].split(".")[0] in letters:
        r = paragraphs[-1].split(".")[0]
    r = parse_response(r).strip().lower().replace("\n", "")
    opts = [c.lower() for c in choices]
    head = r.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if head == answer:
        return True
    if head in letters:
        return opts[letters.index(head)] == answer
    if head in opts:
        return answer in letters and head == opts[letters.index(answer)]
    i = _most_similar(opts, r)
    return letters[i] == answer or opts[i] == answer


# --------------------------------------------------------------------------------------------
# MMMU (validation split, as MedEvalKit's eval_val runs it).
# --------------------------------------------------------------------------------------------

RANDOM = "<random>"  # MMMU's parser picks a random letter: no candidate was found.


def mmmu_choice(response: str, letters: Sequence[str], index2ans: dict) -> str:
    """MMMU's ``parse_multi_choice_response``: "(X)" candidates, else " X " (upper-case,
    space-delimited) candidates, else — for responses of more than five words — options whose
    text occurs; several candidates: the one occurring last; none: :data:`RANDOM`."""
    if "<answer>" in response:
        response = answer_tags(response)
    elif "\\boxed" in response:
        b = boxed(response)
        response = NO_BOX if b is None else b
    response = response.strip()
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [k for k, v in index2ans.items() if v.lower() in response.lower()]
        by_letter = not candidates
    if not candidates:
        return RANDOM
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        where = [response.rfind(f"({c})") for c in candidates]
    else:
        where = [response.rfind(f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]


def _mmmu_extract(response: str) -> str:
    """eval_val.run_model's extraction: answer tags, then a closed box."""
    if "<answer>" in response:
        response = answer_tags(response)
    b = boxed(response)
    return response if b is None else b


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalise(text: str) -> list:
    """MMMU's ``normalize_str``: a number becomes ``[round(float, 2)]``; a one-character
    string ``[" x", "x "]``; other strings ``[lower-cased]``."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_eval_open(gold: str, predictions) -> bool:
    """MMMU's ``eval_open``: a string prediction is right when a normalised string answer is
    a substring of it; a number prediction when it equals a normalised answer. MedEvalKit's
    validation run passes the raw response string here, so its *characters* are the
    predictions (see :func:`mmmu_open_val`)."""
    answers = mmmu_normalise(gold)
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in answers):
                return True
        elif pred in answers:
            return True
    return False


def mmmu_open_val(gold: str, response: str) -> bool:
    """MedEvalKit's MMMU validation verdict of an open question: :func:`mmmu_eval_open` over
    the characters of the extracted response, so practically always False."""
    return mmmu_eval_open(gold, _mmmu_extract(response))


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                   "result ")


def mmmu_parse_open(response: str) -> list:
    """MMMU's ``parse_open_response`` (the official rule): the shortest tail after a key
    phrase ("is ", "so ", "answer ", "=" in the last sentence, ...) of each sentence, plus the
    numbers in them, normalised (:func:`mmmu_normalise`), duplicates removed."""
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for i, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in sentence:
                tail = sentence.split(ind)[-1].strip()
                if shortest is None or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [text]
    preds = list(keys)
    for k in keys:
        preds += _NUM_COMMAS.findall(k) + _NUM_SCI.findall(k) + _NUM_SIMPLE.findall(k)
    out = []
    for p in preds:
        for v in mmmu_normalise(p):
            if v not in out:
                out.append(v)
    return out


# --------------------------------------------------------------------------------------------
# Per dataset.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    """One response's verdict: ``score`` in [0, 1] and how the original reaches it
    (``rule``); ``raises`` is True where MedEvalKit raises instead (scored 0 here), ``random``
    where it draws a random option (scored 1 / number of options here, its expected value)."""
    score: float
    rule: str
    raises: bool = False
    random: bool = False


@dataclasses.dataclass(frozen=True)
class Record:
    """What the scoring of one question needs. ``answer``: the reference as the dataset
    stores it (a letter for PMC-VQA and MMMU, the option text for OmniMedVQA); ``choices``:
    the options as MedEvalKit lists them in the prompt; ``answer_type``: SLAKE's
    OPEN/CLOSED; ``kind``: MMMU's "multiple-choice" or "open"."""
    dataset: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    answer_type: str = ""
    lang: str = "en"
    kind: str = ""


def omnimedvqa_choices(options: Sequence[str], answer_text: str) -> tuple[list[str], str]:
    """OmniMedVQA's ``construct_messages``: options A-D listed as "A. text"; the reference
    becomes the letter of the (last) option equal to it, and stays text if none is."""
    choices, answer = [], answer_text
    for letter, text in zip("ABCD", options):
        if answer_text == text:
            answer = letter
        choices.append(f"{letter}. {text}")
    return choices, answer


def verdict(rec: Record, response: str) -> Verdict:
    """The verdict MedEvalKit's ``cal_metrics`` of ``rec.dataset`` gives ``response``."""
    d = rec.dataset
    if d in ("vqa_rad", "pathvqa"):
        r = pre_extract(response).lower().strip()
        a = rec.answer.lower().strip()
        if a in YES_NO:
            return Verdict(float(judge_yes_no(a, r)), "yes/no")
        if open_raises(a, r):
            return Verdict(0.0, "open exact match", raises=True)
        return Verdict(float(judge_open(a, r)), "open exact match")
    if d == "slake":
        r = pre_extract(response)
        if rec.answer_type.upper() == "OPEN":
            if open_raises(rec.answer, r):
                return Verdict(0.0, "open exact match", raises=True)
            return Verdict(float(judge_open(rec.answer, r)), "open exact match")
        if rec.answer in YES_NO:  # Case-sensitive: SLAKE's "Yes"/"No" are not.
            return Verdict(float(judge_yes_no(rec.answer, r)), "yes/no")
        return Verdict(float(judge_closed(rec.answer, r)), "closed exact match")
    if d == "pmc_vqa":
        return Verdict(float(judge_multi_choice(rec.choices, rec.answer, response)),
                       "multiple choice")
    if d == "omnimedvqa":
        return Verdict(float(judge_multi_choice(rec.choices, rec.answer,
                                                answer_tags(response))), "multiple choice")
    if d == "mmmu_med":
        if rec.kind == "multiple-choice":
            letters = [chr(ord("A") + i) for i in range(len(rec.choices))]
            pick = mmmu_choice(_mmmu_extract(response), letters, dict(zip(letters, rec.choices)))
            if pick == RANDOM:
                return Verdict(1.0 / len(letters), "multiple choice", random=True)
            return Verdict(float(pick == rec.answer), "multiple choice")
        return Verdict(float(mmmu_open_val(rec.answer, response)), "open (characters)")
    raise ValueError(f"MedEvalKit dataset {d!r} unknown; known: {', '.join(DATASETS)}")


def prompt(rec: Record) -> str:
    """The prompt MedEvalKit sends for ``rec`` (non-reasoning mode), without the image."""
    d, q = rec.dataset, rec.question
    lang = "zh" if rec.lang == "zh" else "en"
    if d == "vqa_rad":
        return q + "\n" + (JUDGEMENT["en"] if rec.answer.lower() in YES_NO else OPEN_ENDED["en"])
    if d == "pathvqa":  # Case-sensitive here.
        return q + "\n" + (JUDGEMENT["en"] if rec.answer in YES_NO else OPEN_ENDED["en"])
    if d == "slake":
        table = OPEN_ENDED if rec.answer_type.upper() == "OPEN" else CLOSE_ENDED
        return q + "\n" + table[lang]
    if d in ("pmc_vqa", "omnimedvqa"):
        options = "\n".join(str(c) for c in rec.choices)
        return f"\nQuestion: {q}\nOptions: \n{options}\n{CHOICE}"
    if d == "mmmu_med":
        if rec.kind == "multiple-choice":
            listed = "".join(f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(rec.choices))
            return f"\n{q}\n\n{listed}\n\n        {CHOICE}"
        return f"\n{q}\n\n        {CLOSE_ENDED['en']}"
    raise ValueError(f"MedEvalKit dataset {d!r} unknown; known: {', '.join(DATASETS)}")


def group(rec: Record) -> str:
    """The table MedEvalKit counts the question in: VQA-RAD and PathVQA "closed" when the
    reference is yes/no and "open" otherwise; SLAKE by answer_type; PMC-VQA and OmniMedVQA
    "multiple_choice"; MMMU "multiple_choice" or "open"."""
    if rec.dataset in ("vqa_rad", "pathvqa"):
        return "closed" if rec.answer.lower().strip() in YES_NO else "open"
    if rec.dataset == "slake":
        return "open" if rec.answer_type.upper() == "OPEN" else "closed"
    if rec.dataset == "mmmu_med" and rec.kind != "multiple-choice":
        return "open"
    return "multiple_choice"


# --------------------------------------------------------------------------------------------
# The repaired rules (medevalkit_strict).
# --------------------------------------------------------------------------------------------

_ZH_YES_NO = {"是": "yes", "否": "no"}
_TRAILING = string.punctuation + "。，、；：！？ \n\t"
_LETTER = re.compile(r"^(?:option\s+)?[(\[]?([a-z])[)\]]?(?:[.:)]\s*(.*))?$")


def strict_extract(response: str) -> str:
    """Answer extraction without the traps: a closed box, else complete answer tags, else the
    text; then the text after the last answer marker; lower case, markdown emphasis dropped,
    stripped of surrounding whitespace and punctuation."""
    r = response
    b = boxed(r)
    if b is not None:
        r = b
    elif "<answer>" in r.lower():
        inside = re.findall(r"<answer>(.*?)</answer>", r, flags=re.S | re.I)
        if any(s.strip() for s in inside):
            r = " ".join(s.strip() for s in inside)
        else:  # An unclosed tag: what follows it.
            r = re.split(r"<answer>", r, flags=re.I)[-1]
    r = r.lower()
    for marker in ANSWER_MARKERS + ("答案：",):
        if marker in r:
            r = r.split(marker)[-1]
    r = r.replace("*", "").replace("\\text{", "").replace("}", "")
    return r.strip(_TRAILING)


def _strict_yes_no(text: str) -> str | None:
    words = re.findall(r"[a-z]+|[是否]", text)
    found = {_ZH_YES_NO.get(w, w) for w in words} & set(YES_NO)
    return found.pop() if len(found) == 1 else None


def strict_choice(text: str, options: Sequence[str]) -> int | None:
    """The option index a response names: a letter in any common wrapping ("b", "(B)", "B)",
    "**B**", "B. text", "Option B"), or an option's text (bare or after "X:"/"X."); None when
    it names none."""
    t = strict_extract(text)
    opts = [o.lower().strip() for o in options]
    m = _LETTER.match(t)
    if m and ord(m.group(1)) - ord("a") < len(options):
        return ord(m.group(1)) - ord("a")
    if t in opts:
        return opts.index(t)
    return None


def strict_verdict(rec: Record, response: str, options: Sequence[str]) -> float:
    """The repaired rules of ``medevalkit_strict``: :func:`strict_extract`; a yes/no reference
    (any case, or 是/否) is right when exactly one of the whole words yes/no (是/否) is given and
    it is the reference; multiple choice by :func:`strict_choice` (no similarity guess, no
    random pick); MMMU's open questions by the official MMMU rule (:func:`mmmu_parse_open`);
    other questions by exact match after extraction. ``options``: the option texts."""
    t = strict_extract(response)
    if rec.dataset == "mmmu_med" and rec.kind == "open":
        return float(mmmu_eval_open(rec.answer, mmmu_parse_open(strict_extract(response))))
    if options:
        i = strict_choice(response, options)
        if i is None:
            return 0.0
        ref = rec.answer.strip()
        letter = chr(ord("A") + i)
        return float(ref.upper() == letter or ref.lower() == options[i].lower().strip())
    ref = rec.answer.strip().lower().strip(_TRAILING)
    ref = _ZH_YES_NO.get(ref, ref)
    if ref in YES_NO:
        return float(_strict_yes_no(t) == ref)
    return float(t == ref)
