"""Evaluation protocols: named, versioned rules that turn a generated answer into a score.

A published VQA number depends on more than the model: on the prompt (is an instruction such
as "answer yes or no" appended?), the decoding settings, how the answer is pulled out of the
generated text and the metric. A :class:`Protocol` fixes all four under a name and a version;
every result of :mod:`medvl_jax.evaluate.harness` is stamped with both. Change a rule, and the
version changes with it.

    protocol           closed (yes/no)                        open                multiple choice
    exact              normalised exact match                 same                same (letter)
    medsynth           normalised exact match                 token F1            exact (letter)
    llava_med          reference is a substring of the        LLaVA-Med recall    as open
                       prediction, which contains yes or no
    llava_med_batch    reference is a substring of the        LLaVA-Med recall    as open
                       prediction
    llava_med_strict   exactly one of the whole words         LLaVA-Med recall    as open
                       yes / no, and it is the reference
    medevalkit         MedEvalKit's rules per dataset (medvl_jax.evaluate.medevalkit): its
                       prompts, extraction, yes/no, exact-match, multiple-choice and MMMU
                       judgements, record for record, quirks included
    medevalkit_strict  MedEvalKit's prompts, repaired judgements
    report             reports: R2Gen's cleaning + pycocoevalcap BLEU/ROUGE-L/CIDEr-D/METEOR;
                       other questions as exact
    token_f1           token F1 (SQuAD-style)                 token F1            token F1

The exact rules, with their traps, are in docs/evaluation.md. Report answers are scored by the
protocol's :class:`ReportScoring` (by default rouge-score ROUGE-L per report, and sacrebleu
BLEU, rouge-score ROUGE-L, plain CIDEr and, for MedSynth, clinical F1 over the corpus; the
``report`` protocol uses the COCO scorers instead); MedSynth's geometric types ``box`` and
``size`` are scored by their MedSynth rules (:func:`medvl_jax.evaluate.scoring.score`) after
the protocol's answer extraction. Other MedSynth types (``counting``, ``progression``) follow the
protocol's open-question rule, except under ``exact``/``medsynth`` (exact match).

Decoding is greedy (deterministic) for every protocol: up to the task's
``sft.eval_max_new_tokens`` tokens for questions and
:attr:`Decoding.report_max_new_tokens` for reports.

Extension point: a model-based judge (an LLM grading free-text answers) plugs in as a
:class:`Judge` through :func:`with_judge`, which makes a new named, versioned protocol; no
judge ships with medvl_jax.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Protocol as _Interface, Sequence

from medvl_jax.evaluate import llava_med, medevalkit, scoring

YES_NO = ("yes", "no")
REPORT = "report"
GEOMETRIC = ("box", "size")  # MedSynth types scored by their geometric rules everywhere.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE = "<image>"  # Image placeholder of the example format.


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
class ReportScoring:
    """How a protocol scores generated reports: ``example(generated, example) -> (parsed,
    score)`` per report, and ``corpus(generated, references, examples) -> {metric: value}``
    over all reports of a table."""
    example: Callable[[str, dict], tuple[str, float]]
    corpus: Callable[[Sequence[str], Sequence[str], Sequence[dict]], dict]


def _default_report(generated: str, example: dict) -> tuple[str, float]:
    from medvl_jax.evaluate import report_metrics

    text = generated.strip()
    return text, report_metrics.rouge_l([text], [example["meta"]["answer"]])


def _default_report_corpus(generated, references, examples) -> dict:
    from medvl_jax.evaluate import report_metrics

    clinical = all(ex["meta"].get("findings") is not None for ex in examples)
    return report_metrics.corpus_metrics([g.strip() for g in generated], references,
                                         clinical=clinical)


DEFAULT_REPORT = ReportScoring(_default_report, _default_report_corpus)


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
    # Optional: the whole text of the last user message (after its image placeholders), for
    # protocols that reproduce a script's own prompt; None keeps the example's text.
    user_text: Callable[[dict], str | None] | None = None
    # Optional: ``(parsed, score)`` straight from the generated text, for protocols whose
    # judgement reads the raw response (the scripts they reproduce do); replaces parse+score.
    verdict: Callable[[str, dict], tuple[str, float]] | None = None
    # Optional: the row of the per-type table a question counts in (the script's own split);
    # None: the example's question type.
    group: Callable[[dict], str] | None = None
    # Report questions: per-report score and corpus metrics (default: rouge-score ROUGE-L per
    # report; sacrebleu BLEU, rouge-score ROUGE-L and plain CIDEr over the corpus).
    report: ReportScoring = DEFAULT_REPORT

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
        text = self.user_text(example) if self.user_text is not None else None
        extra = self.instruction(example)
        if text is not None or extra:
            users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
            if not users:
                raise ValueError(f"example {example.get('id')!r} has no user message")
            last = messages[users[-1]]
            if text is not None:
                n_images = len(re.findall(re.escape(IMAGE), str(last["content"])))
                last["content"] = f"{IMAGE}\n" * n_images + text
            if extra:
                last["content"] = last["content"].rstrip() + "\n" + extra
        return {**example, "messages": messages}

    def category(self, example: dict) -> str:
        """The per-type table row ``example`` counts in under this protocol."""
        if self.group is not None and example["meta"]["question_type"] not in (REPORT,) + GEOMETRIC:
            return self.group(example)
        return example["meta"]["question_type"]

    def evaluate(self, generated: str, example: dict) -> tuple[str, float]:
        """``(parsed answer, score)`` of one generated answer to ``example``."""
        meta = example["meta"]
        qtype = meta["question_type"]
        if qtype == REPORT:
            parsed, value = self.report.example(generated, example)
            return parsed, float(value)
        if qtype in GEOMETRIC:
            parsed = self.parse(generated, example)
            return parsed, scoring.score(qtype, parsed, meta["answer"])
        if self.verdict is not None:
            parsed, value = self.verdict(generated, example)
            return parsed, float(value)
        parsed = self.parse(generated, example)
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
# LLaVA-Med (llava/eval/run_eval.py and run_eval_batch.py; medvl_jax.evaluate.llava_med).
# --------------------------------------------------------------------------------------------

def _llava_score(closed: Callable[[str, str], float],
                 fixed: bool = False) -> Callable[[str, dict], float]:
    def score(parsed: str, example: dict) -> float:
        if example["meta"]["question_type"] == "closed":
            return closed(parsed, _answer(example))
        return llava_med.recall(parsed, _answer(example), fixed=fixed)
    return score


# --------------------------------------------------------------------------------------------
# MedEvalKit (medvl_jax.evaluate.medevalkit: the per-dataset cal_metrics).
# --------------------------------------------------------------------------------------------

def _options(example: dict) -> list[str]:
    return [str(o) for o in example["meta"].get("options") or []]


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


def medevalkit_record(example: dict) -> medevalkit.Record | None:
    """The :class:`medevalkit.Record` of an example of one of MedEvalKit's datasets
    (``meta["benchmark"]`` in :data:`medevalkit.DATASETS`), or None for other benchmarks.

    Reads ``meta``: ``answer``; ``question`` (the question as the dataset words it; else the
    last user message); ``answer_type`` and ``q_lang`` (SLAKE); ``choices`` (PMC-VQA: the
    options as its CSV writes them, "A:CT"); ``options``, ``gt_answer`` / ``answer_text``
    (OmniMedVQA), ``options`` (MMMU)."""
    meta = example["meta"]
    d = meta.get("benchmark")
    if d not in medevalkit.DATASETS:
        return None
    question = str(meta.get("question") or question_text(example))
    common = dict(dataset=d, question=question, answer_type=str(meta.get("answer_type", "")),
                  lang=str(meta.get("q_lang", "en")))
    if d == "pmc_vqa":
        choices = meta.get("choices") or [f"{LETTERS[i]}:{o}" for i, o in
                                          enumerate(_options(example))]
        return medevalkit.Record(answer=_answer(example), choices=tuple(choices), **common)
    if d == "omnimedvqa":
        # The answer as the release writes it (MedEvalKit turns it into a letter only when it
        # equals an option exactly).
        text = str(meta.get("gt_answer") or meta.get("answer_text") or _answer(example))
        choices, answer = medevalkit.omnimedvqa_choices(_options(example), text)
        return medevalkit.Record(answer=answer, choices=tuple(choices), **common)
    if d == "mmmu_med":
        kind = "multiple-choice" if _is_choice(example) else "open"
        return medevalkit.Record(answer=_answer(example), choices=tuple(_options(example)),
                                 kind=kind, **common)
    return medevalkit.Record(answer=_answer(example), **common)


def _generic_record(example: dict) -> medevalkit.Record:
    """Other benchmarks: multiple choice as OmniMedVQA ("A. text" options, the letter as
    reference), other questions as VQA-RAD (yes/no rule for a yes/no reference)."""
    if _is_choice(example):
        ref = _reference_option(example)
        choices = [f"{LETTERS[i]}. {o}" for i, o in enumerate(_options(example))]
        answer = LETTERS[ref] if ref is not None else _answer(example)
        return medevalkit.Record("omnimedvqa", question_text(example), answer, tuple(choices))
    return medevalkit.Record("vqa_rad", question_text(example), _answer(example))


def _medevalkit_parsed(generated: str, rec: medevalkit.Record) -> str:
    """What MedEvalKit compares with the reference, for the prediction rows."""
    if rec.dataset == "mmmu_med" and rec.kind == "multiple-choice":
        letters = LETTERS[:len(rec.choices)]
        return medevalkit.mmmu_choice(medevalkit._mmmu_extract(generated), letters,
                                      dict(zip(letters, rec.choices)))
    if rec.dataset in ("omnimedvqa", "pmc_vqa", "mmmu_med"):
        return medevalkit.parse_response(medevalkit.answer_tags(generated)).strip()
    return medevalkit.parse_response(medevalkit.pre_extract(generated)).strip()


def _medevalkit_extract(generated: str, example: dict) -> str:
    return medevalkit.parse_response(medevalkit.pre_extract(generated)).strip()


def _medevalkit_verdict(generated: str, example: dict) -> tuple[str, float]:
    rec = medevalkit_record(example) or _generic_record(example)
    return _medevalkit_parsed(generated, rec), medevalkit.verdict(rec, generated).score


def _medevalkit_strict_verdict(generated: str, example: dict) -> tuple[str, float]:
    rec = medevalkit_record(example) or _generic_record(example)
    options = _options(example) if _is_choice(example) else []
    if rec.dataset == "pmc_vqa" and not options:
        options = [re.sub(r"^\s*[A-Z]\s*:", "", c).strip() for c in rec.choices]
    return (medevalkit.strict_extract(generated),
            medevalkit.strict_verdict(rec, generated, options))


def _medevalkit_user_text(example: dict) -> str | None:
    """MedEvalKit's own prompt for its datasets (None for other benchmarks)."""
    rec = medevalkit_record(example)
    return None if rec is None else medevalkit.prompt(rec)


def _medevalkit_group(example: dict) -> str:
    rec = medevalkit_record(example)
    if rec is not None:
        return medevalkit.group(rec)
    return "closed" if _is_yes_no(example) else example["meta"]["question_type"]


def _medevalkit_instruction(example: dict) -> str:
    """Instructions for benchmarks outside MedEvalKit's (appended to the question)."""
    if example["meta"]["question_type"] == REPORT or medevalkit_record(example) is not None:
        return ""
    if _is_yes_no(example):  # MedEvalKit picks the prompt by the reference answer.
        return medevalkit.JUDGEMENT["en"]
    if _is_choice(example):
        question = "\n".join(str(m.get("content", "")) for m in example["messages"]
                             if m.get("role") == "user")
        options = _options(example)
        listed = all(o.lower() in question.lower() for o in options)
        lines = "" if listed else "Options:\n" + "\n".join(
            f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\n"
        return lines + medevalkit.CHOICE
    return medevalkit.OPEN_ENDED["en"]


# --------------------------------------------------------------------------------------------
# Reports as papers score them (R2Gen's cleaning, pycocoevalcap's scorers).
# --------------------------------------------------------------------------------------------

def _cleaner(example: dict):
    from medvl_jax.evaluate import report_cleaning

    return report_cleaning.cleaner_for(example["meta"].get("benchmark"))


def _coco_report(generated: str, example: dict) -> tuple[str, float]:
    from medvl_jax.evaluate import report_metrics

    clean = _cleaner(example)
    text = clean(generated)
    return text, report_metrics.coco_rouge_l(text, clean(str(example["meta"]["answer"])))


def _coco_report_corpus(generated, references, examples) -> dict:
    from medvl_jax.evaluate import report_metrics

    clinical = all(ex["meta"].get("findings") is not None for ex in examples)
    return report_metrics.report_corpus_metrics(generated, references,
                                                clean=_cleaner(examples[0]), clinical=clinical)


COCO_REPORT = ReportScoring(_coco_report, _coco_report_corpus)


# --------------------------------------------------------------------------------------------
# The registry, and the judge extension point.
# --------------------------------------------------------------------------------------------

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("exact", "1", "normalised exact match for every question type",
             parse=_strip, score=exact_match),
    Protocol("medsynth", "1", "MedSynth's rules (medvl_jax.evaluate.scoring): exact match, "
             "token F1 for open questions, IoU >= 0.5 for boxes, 20%/2 mm for sizes",
             parse=_strip, score=_medsynth_score),
    Protocol("llava_med", "2", "LLaVA-Med run_eval.py (v1.0.0, with its closed-accuracy "
             "fix): closed = reference substring of a prediction containing yes/no; other "
             "questions = LLaVA-Med recall",
             parse=_strip, score=_llava_score(llava_med.closed_run_eval)),
    Protocol("llava_med_batch", "1", "LLaVA-Med run_eval_batch.py (v1.0.0): closed = "
             "reference substring of the prediction; other questions = LLaVA-Med recall",
             parse=_strip, score=_llava_score(llava_med.closed_batch)),
    Protocol("llava_med_strict", "2", "LLaVA-Med with whole-word yes/no: exactly one of "
             "yes/no, equal to the reference; other questions = LLaVA-Med recall, every full "
             "stop normalised",
             parse=_strip, score=_llava_score(llava_med.closed_strict, fixed=True)),
    Protocol("medevalkit", "2", "MedEvalKit (9b12e3b) per dataset: its prompts, answer "
             "extraction, yes/no, closed, open exact-match and multiple-choice judgements "
             "and MMMU parsers, quirks kept",
             parse=_medevalkit_extract, score=exact_match, verdict=_medevalkit_verdict,
             user_text=_medevalkit_user_text, group=_medevalkit_group,
             instruction=_medevalkit_instruction),
    Protocol("medevalkit_strict", "1", "MedEvalKit's prompts with repaired judgements: "
             "whitespace and trailing punctuation ignored, whole-word yes/no in any case, "
             "option letters in any wrapping, no similarity guess or random pick, MMMU open "
             "questions by MMMU's own rule",
             parse=_medevalkit_extract, score=exact_match,
             verdict=_medevalkit_strict_verdict,
             user_text=_medevalkit_user_text, group=_medevalkit_group,
             instruction=_medevalkit_instruction),
    Protocol("report", "1", "reports as report-generation papers score them: R2Gen's text "
             "cleaning, then pycocoevalcap's BLEU-1..4, ROUGE-L, CIDEr-D and METEOR (with "
             "Java); per report its COCO ROUGE-L; other questions by normalised exact match",
             parse=_strip, score=exact_match, report=COCO_REPORT),
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

    def verdict(generated: str, example: dict) -> tuple[str, float]:
        if example["meta"]["question_type"] not in types:
            return base.evaluate(generated, example)
        parsed = (base.verdict(generated, example)[0] if base.verdict is not None
                  else base.parse(generated, example))
        value = float(judge(question_text(example), parsed, _answer(example), example))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"judge of protocol {name!r} returned {value} for example "
                             f"{example.get('id')!r}; scores must lie in [0, 1]")
        return parsed, value

    return dataclasses.replace(
        base, name=name, version=version, verdict=verdict,
        description=f"{base.description}; {', '.join(types)} questions scored by a judge")
