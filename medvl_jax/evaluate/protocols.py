"""Evaluation protocols: named, versioned rules that turn a generated answer into a score.

A published VQA number depends on more than the model: on the prompt (is an instruction such
as "answer yes or no" appended?), the decoding settings, how the answer is pulled out of the
generated text and the metric. A :class:`Protocol` fixes all four under a name and a version;
every result of :mod:`medvl_jax.evaluate.harness` is stamped with both. Change a rule, and the
version changes with it.

    protocol          closed (yes/no)                         open                 multiple choice
    exact             normalised exact match                  same                 same (letter)
    medsynth          normalised exact match                  token F1             exact (letter)
    llava_med         reference is a substring of the         LLaVA-Med recall     as open
                      prediction, which contains "yes" or "no"
    llava_med_strict  exactly one of the whole words          LLaVA-Med recall     as open
                      yes / no, and it is the reference
    medevalkit        after extraction, exactly one of the    exact match after    letter, option
                      substrings "yes" / "no", and the        extraction           text, or most
                      reference is a substring                                     similar option
    token_f1          token F1 (SQuAD-style)                  token F1             token F1

The exact rules, with their traps, are in docs/evaluation.md. Rules every protocol shares:
``report`` answers are scored by ROUGE-L per example (corpus BLEU, ROUGE-L, CIDEr and, for
MedSynth, clinical F1 are added by the harness), and MedSynth's geometric types ``box`` and
``size`` by their MedSynth rules (:func:`medvl_jax.evaluate.scoring.score`) after the
protocol's answer extraction. Other MedSynth types (``counting``, ``progression``) follow the
protocol's open-question rule, except under ``exact``/``medsynth`` (exact match).

Decoding is greedy (deterministic) for every protocol: up to the task's
``sft.eval_max_new_tokens`` tokens for questions and
:attr:`Decoding.report_max_new_tokens` for reports.

Extension point: a model-based judge (an LLM grading free-text answers) plugs in as a
:class:`Judge` through :func:`with_judge`, which makes a new named, versioned protocol; no
judge ships with medvl_jax.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import re
from typing import Callable, Mapping, Protocol as _Interface, Sequence

from medvl_jax.evaluate import scoring

YES_NO = ("yes", "no")
REPORT = "report"
GEOMETRIC = ("box", "size")  # MedSynth types scored by their geometric rules everywhere.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Decoding settings of a protocol (always greedy, so results are deterministic)."""
    max_new_tokens: int | None = None  # Questions; None: the task's sft.eval_max_new_tokens.
    report_max_new_tokens: int = 160   # Report generation.

    def for_type(self, question_type: str) -> int | None:
        """The token budget for a question of this type (None: the task's default)."""
        return self.report_max_new_tokens if question_type == REPORT else self.max_new_tokens


def _no_instruction(example: dict) -> str:
    return ""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named, versioned evaluation protocol: prompt format + decoding + parser + metric.

    ``instruction(example)`` is text appended (on a new line) to the example's last user
    message ("" for none); ``parse(generated, example)`` extracts the answer from the generated
    text; ``score(parsed, example)`` gives a score in [0, 1] against
    ``example["meta"]["answer"]``. Use :meth:`evaluate`, which applies the rules shared by all
    protocols (reports, geometric types) around ``parse`` and ``score``.
    """
    name: str
    version: str
    description: str
    parse: Callable[[str, dict], str]
    score: Callable[[str, dict], float]
    instruction: Callable[[dict], str] = _no_instruction
    decoding: Decoding = Decoding()

    @property
    def tag(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def stamp(self) -> dict:
        """What every result of this protocol carries."""
        return {"protocol": self.name, "version": self.version}

    def prompt(self, example: dict) -> dict:
        """A copy of ``example`` whose last user message ends with this protocol's
        instruction, and with a trailing assistant answer (the reference) dropped."""
        messages = [dict(m) for m in example["messages"]]
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        extra = self.instruction(example)
        if extra:
            users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
            if not users:
                raise ValueError(f"example {example.get('id')!r} has no user message")
            messages[users[-1]]["content"] = messages[users[-1]]["content"].rstrip() + "\n" + extra
        return {**example, "messages": messages}

    def evaluate(self, generated: str, example: dict) -> tuple[str, float]:
        """``(parsed answer, score)`` of one generated answer to ``example``."""
        meta = example["meta"]
        qtype = meta["question_type"]
        if qtype == REPORT:
            from medvl_jax.evaluate import report_metrics

            text = generated.strip()
            return text, report_metrics.rouge_l([text], [meta["answer"]])
        parsed = self.parse(generated, example)
        if qtype in GEOMETRIC:
            return parsed, scoring.score(qtype, parsed, meta["answer"])
        return parsed, float(self.score(parsed, example))


# --------------------------------------------------------------------------------------------
# exact, medsynth, token_f1.
# --------------------------------------------------------------------------------------------

def _strip(text: str, example: dict) -> str:
    return text.strip()


def _answer(example: dict) -> str:
    return str(example["meta"]["answer"])


def exact_match(parsed: str, example: dict) -> float:
    """1 if ``parsed`` equals the reference after :func:`scoring.normalise` (lower case, no
    punctuation except decimal points, no articles, single spaces)."""
    return float(scoring.normalise(parsed) == scoring.normalise(_answer(example)))


def _medsynth_score(parsed: str, example: dict) -> float:
    return scoring.score(example["meta"]["question_type"], parsed, _answer(example))


def _token_f1(parsed: str, example: dict) -> float:
    return scoring.token_f1(parsed, _answer(example))


# --------------------------------------------------------------------------------------------
# LLaVA-Med (llava/eval/run_eval.py and its eval_metrics package).
# --------------------------------------------------------------------------------------------

# The VQA-style normaliser of LLaVA-Med's evaluation: punctuation, full stops, number words,
# articles. (Its table restoring apostrophes, "dont" -> "don't", is left out: it changes no
# yes/no word and no medical term.)
_LLAVA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")


def llava_normalise(text: str) -> str:
    """LLaVA-Med's answer normalisation: lower case; each punctuation mark of a fixed list is
    deleted where it touches a space (or anywhere, if the text holds a digit-comma-digit) and
    replaced by a space elsewhere; full stops not followed by a digit are deleted; the words
    ``none``/``zero``..``ten`` become digits (so "none" becomes "0"); articles are dropped;
    commas are deleted."""
    text = text.lower()
    delete_all = re.search(r"\d,\d", text) is not None
    out = text
    for p in _LLAVA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or delete_all) else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def llava_recall(prediction: str, reference: str) -> float:
    """LLaVA-Med's open-question "recall" over normalised words: ``tp / (tp + fn)`` where
    ``tp`` counts the prediction's occurrences of words that the reference has and ``fn`` the
    reference's occurrences of words the prediction lacks. For predictions that do not repeat
    a shared word it is the fraction of reference words found in the prediction; a repeated
    shared word counts once per repetition (as in LLaVA-Med). 0 for an empty prediction or
    reference."""
    cand = collections.Counter(llava_normalise(prediction).split())
    ref = collections.Counter(llava_normalise(reference).split())
    if not cand or not ref:
        return 0.0
    tp = sum(n for w, n in cand.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    return tp / (tp + fn) if tp else 0.0


def llava_closed(prediction: str, reference: str) -> float:
    """LLaVA-Med's closed-question rule: after :func:`llava_normalise`, the prediction
    contains "yes" or "no" as a substring, and the reference is a substring of it. Substring
    tests are its known flaw: "normal" and "unknown" contain "no", and "yes, no evidence of
    ..." matches both answers. (The original script also drops such misses from the
    denominator; here every question counts.)"""
    p, r = llava_normalise(prediction), llava_normalise(reference)
    return float(("yes" in p or "no" in p) and r in p)


def _words_in(phrase: str, words: Sequence[str]) -> bool:
    """Whether ``phrase`` occurs in ``words`` as a whole-word sequence."""
    target = phrase.split()
    k = len(target)
    return k > 0 and any(list(words[i:i + k]) == target for i in range(len(words) - k + 1))


def llava_closed_strict(prediction: str, reference: str) -> float:
    """The strict closed rule: words after :func:`llava_normalise`. A yes/no reference is
    correct only if exactly one of the whole words "yes"/"no" occurs and it is the reference
    ("normal" is not "no"; "yes, no evidence of ..." is wrong whatever the reference). Any
    other reference must occur as a whole-word sequence."""
    words = llava_normalise(prediction).split()
    r = llava_normalise(reference)
    if r in YES_NO:
        return float(("yes" in words) != ("no" in words) and r in words)
    return float(_words_in(r, words))


def _llava_score(closed: Callable[[str, str], float]) -> Callable[[str, dict], float]:
    def score(parsed: str, example: dict) -> float:
        if example["meta"]["question_type"] == "closed":
            return closed(parsed, _answer(example))
        return llava_recall(parsed, _answer(example))
    return score


# --------------------------------------------------------------------------------------------
# MedEvalKit (utils/utils.py, utils/question_formats.py and the per-dataset cal_metrics).
# --------------------------------------------------------------------------------------------

# Answer markers, tried in this order; each one present cuts the text to what follows its
# last occurrence.
ANSWER_MARKERS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is",
                  "answer:", "final answer", "final answer is")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return text[begin:]  # Unclosed: everything after the opening brace.


def extract_answer(text: str) -> str:
    """MedEvalKit's answer extraction, lower-cased: the content of the last ``\\boxed{}`` if
    there is one; otherwise, if ``<answer>`` occurs, the contents of the complete
    ``<answer>...</answer>`` pairs joined by spaces (the whole text if none is complete);
    then, for each of :data:`ANSWER_MARKERS` in order, the text after its last occurrence;
    finally stripped of surrounding whitespace."""
    t = text.lower()
    boxed = _last_boxed(t)
    if boxed is not None:
        t = boxed
    elif "<answer>" in t:
        inside = re.findall(r"<answer>(.*?)</answer>", t, flags=re.S)
        if inside:
            t = " ".join(inside).strip()
    for marker in ANSWER_MARKERS:
        if marker in t:
            t = t.split(marker)[-1]
    return t.strip()


def medevalkit_yes_no(parsed: str, reference: str) -> float:
    """MedEvalKit's yes/no judgement: with line breaks and full stops removed, exactly one of
    the substrings "yes"/"no" occurs and the reference is a substring. (Substrings, as in
    MedEvalKit: "normal" counts as "no"; "yes, no evidence of ..." is wrong either way.)"""
    r = parsed.lower().replace("\n", "").replace(".", "")
    ref = reference.lower().strip()
    return float((("yes" in r) != ("no" in r)) and ref in r)


def _options(example: dict) -> list[str]:
    return [str(o) for o in example["meta"].get("options") or []]


def choose_option(text: str, options: Sequence[str]) -> int:
    """The index of the option MedEvalKit reads from ``text``: a lone letter in the first
    paragraph or before the first full stop of the last one; otherwise, after
    :func:`extract_answer`, the part before the first full stop and after the last colon,
    read as a letter or an option's text; otherwise the option most similar to the whole
    extracted answer (``difflib`` ratio; the first of ties)."""
    letters = [c.lower() for c in LETTERS[:len(options)]]
    opts = [o.lower().strip() for o in options]
    t = text.lower()
    paragraphs = t.split("\n\n")
    if paragraphs[0].strip() in letters:
        t = paragraphs[0]
    elif paragraphs[-1].split(".")[0].strip() in letters:
        t = paragraphs[-1].split(".")[0]
    t = extract_answer(t).replace("\n", "")
    head = t.split(".")[0].split(":")[-1].strip()
    if head in letters:
        return letters.index(head)
    if head in opts:
        return opts.index(head)
    ratios = [difflib.SequenceMatcher(None, o, t).ratio() for o in opts]
    return ratios.index(max(ratios))


def _reference_option(example: dict) -> int | None:
    """Index of the reference among the options (given as a letter or as option text)."""
    opts = [o.lower().strip() for o in _options(example)]
    ref = _answer(example).lower().strip()
    letters = [c.lower() for c in LETTERS[:len(opts)]]
    if ref in letters:
        return letters.index(ref)
    return opts.index(ref) if ref in opts else None


def _is_yes_no(example: dict) -> bool:
    return (example["meta"]["question_type"] not in ("multiple_choice", REPORT)
            and _answer(example).lower().strip() in YES_NO)


def _is_choice(example: dict) -> bool:
    return example["meta"]["question_type"] == "multiple_choice" and bool(_options(example))


def _medevalkit_parse(text: str, example: dict) -> str:
    if _is_choice(example):
        return LETTERS[choose_option(text, _options(example))]
    return extract_answer(text)


def _medevalkit_score(parsed: str, example: dict) -> float:
    if _is_yes_no(example):
        return medevalkit_yes_no(parsed, _answer(example))
    if _is_choice(example):
        ref = _reference_option(example)
        if ref is not None:
            return float(parsed == LETTERS[ref])
    return float(parsed.lower().strip() == _answer(example).lower().strip())


def _medevalkit_instruction(example: dict) -> str:
    if example["meta"]["question_type"] == REPORT:
        return ""
    if _is_yes_no(example):  # MedEvalKit picks the prompt by the reference answer.
        return "Please output 'yes' or 'no'(no extra output)."
    if _is_choice(example):
        question = "\n".join(str(m.get("content", "")) for m in example["messages"]
                             if m.get("role") == "user")
        options = _options(example)
        listed = all(o.lower() in question.lower() for o in options)
        lines = "" if listed else "Options:\n" + "\n".join(
            f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\n"
        return lines + "Answer with the option's letter from the given choices directly."
    return "Please answer the question concisely."


# --------------------------------------------------------------------------------------------
# The registry, and the judge extension point.
# --------------------------------------------------------------------------------------------

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("exact", "1", "normalised exact match for every question type",
             parse=_strip, score=exact_match),
    Protocol("medsynth", "1", "MedSynth's rules (medvl_jax.evaluate.scoring): exact match, "
             "token F1 for open questions, IoU >= 0.5 for boxes, 20%/2 mm for sizes",
             parse=_strip, score=_medsynth_score),
    Protocol("llava_med", "1", "LLaVA-Med: closed = reference substring of a prediction "
             "containing yes/no; other questions = LLaVA-Med token recall",
             parse=_strip, score=_llava_score(llava_closed)),
    Protocol("llava_med_strict", "1", "LLaVA-Med with whole-word yes/no: exactly one of "
             "yes/no, equal to the reference; other questions = LLaVA-Med token recall",
             parse=_strip, score=_llava_score(llava_closed_strict)),
    Protocol("medevalkit", "1", "MedEvalKit: answer extraction (\\boxed{}, <answer>, answer:), "
             "yes/no judgement, multiple choice by letter/text/most similar option, exact "
             "match otherwise; MedEvalKit's prompt instructions",
             parse=_medevalkit_parse, score=_medevalkit_score,
             instruction=_medevalkit_instruction),
    Protocol("token_f1", "1", "token F1 (SQuAD-style, normalised words) for every question",
             parse=_strip, score=_token_f1),
)}


def default_for(benchmark: str) -> str:
    """The protocol used when none is named: ``medsynth`` (the training loop's own scoring)
    on MedSynth benchmarks, ``exact`` elsewhere."""
    return "medsynth" if benchmark.startswith("medsynth") else "exact"


def get(name: str) -> Protocol:
    """The protocol called ``name``; a ValueError lists the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known protocols: "
                         f"{', '.join(sorted(PROTOCOLS))}") from None


def parse_list(spec: str | Sequence[str]) -> list[Protocol]:
    """Protocols from a comma-separated list of names (or a list), duplicates dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no protocol named; known protocols: {', '.join(sorted(PROTOCOLS))}")
    return [get(n) for n in dict.fromkeys(names)]


class Judge(_Interface):
    """A model-based grader: a score in [0, 1] for ``prediction`` against ``reference``.

    ``question`` is the text of the example's last user message; ``example`` is the whole
    example (images, meta) for judges that need more. An implementation should be
    deterministic (fixed judge model, temperature 0) so that results stay reproducible.
    """

    def __call__(self, question: str, prediction: str, reference: str,
                 example: Mapping) -> float: ...


def question_text(example: dict) -> str:
    """The text of the last user message of ``example``, image placeholders removed."""
    users = [m for m in example["messages"] if m.get("role") == "user"]
    return str(users[-1]["content"]).replace("<image>", "").strip() if users else ""


def with_judge(base: Protocol, judge: Judge, *, name: str, version: str,
               question_types: Sequence[str] = ("open",)) -> Protocol:
    """A new protocol that scores ``question_types`` with ``judge`` (after ``base``'s answer
    extraction) and every other type as ``base`` does. Prompt and decoding are ``base``'s.
    The name and version must identify the judge (model, prompt), e.g.
    ``with_judge(PROTOCOLS["exact"], my_judge, name="exact+gpt_judge", version="1")``."""
    types = tuple(question_types)

    def score(parsed: str, example: dict) -> float:
        if example["meta"]["question_type"] in types:
            value = float(judge(question_text(example), parsed, _answer(example), example))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"judge of protocol {name!r} returned {value} for example "
                                 f"{example.get('id')!r}; scores must lie in [0, 1]")
            return value
        return base.score(parsed, example)

    return dataclasses.replace(
        base, name=name, version=version, score=score,
        description=f"{base.description}; {', '.join(types)} questions scored by a judge")
