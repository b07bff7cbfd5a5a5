"""Report-generation metrics: BLEU-1..4, ROUGE-L, CIDEr and MedSynth's clinical F1.

BLEU and ROUGE-L come from the maintained reference implementations (sacrebleu, rouge-score),
so the numbers are the ones those libraries give; CIDEr is written here (Vedantam et al.,
2015, the ``Cider`` scorer of the COCO caption evaluation: tf-idf n-gram vectors, n = 1..4,
document frequencies over the references, cosine similarity averaged over n and the
references, times 10; no length penalty or clipping, which are CIDEr-D's).

Clinical F1 compares the findings stated by a generated MedSynth report with those of the
reference report, both read by :func:`medsynth_findings` (MedSynth's report phrasing: nodules
per lung zone and side, pleural effusion per side, cardiomegaly, and a normal study).

All scores are in [0, 1] except CIDEr (0 to 10).
"""
from __future__ import annotations

import collections
import json
import math
import re
from typing import Iterable, Sequence

import numpy as np


def _check(predictions: Sequence[str], references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not len(predictions):
        raise ValueError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str], *,
         max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` (``{"bleu1": ..., "bleu4": ...}``, in [0, 1]) with
    sacrebleu: BLEU-n is the brevity-penalised geometric mean of the 1..n-gram precisions,
    13a tokenisation, lower-cased, sacrebleu's default ("exp") smoothing."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    preds, refs = [str(p) for p in predictions], [[str(r) for r in references]]
    return {f"bleu{n}": BLEU(max_ngram_order=n, lowercase=True).corpus_score(preds, refs).score
            / 100.0 for n in range(1, max_order + 1)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over the examples (rouge-score's tokeniser: lower case,
    alphanumeric words; no stemming)."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(str(r), str(p))["rougeL"].fmeasure
                          for p, r in zip(predictions, references)]))


_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers (decimal points kept), punctuation dropped."""
    return _WORD.findall(str(text).lower())


def _ngrams(words: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
          max_order: int = 4) -> float:
    """Corpus CIDEr of ``predictions``; each reference may be a string or a list of strings.

    For n = 1..max_order, every text becomes a vector of n-gram weights
    ``count * log(N / df)`` (N examples, df the number of examples whose references hold the
    n-gram); an example scores the cosine similarity of its prediction's vector with each
    reference's (0 if either is empty), averaged over n and over its references, times 10.
    The corpus score is the mean over examples."""
    _check(predictions, references)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    n_docs = len(refs)
    df = collections.Counter()
    ref_grams = []
    for rs in refs:
        grams = [[_ngrams(tokenize(r), n) for n in range(1, max_order + 1)] for r in rs]
        ref_grams.append(grams)
        seen = set()
        for g in grams:
            for counter in g:
                seen.update(counter)
        df.update(seen)

    def vector(counter):
        return {g: c * (math.log(n_docs) - math.log(max(1.0, df[g]))) for g, c in counter.items()}

    def cosine(a, b):
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(v * b.get(g, 0.0) for g, v in a.items()) / (na * nb)

    scores = []
    for pred, grams in zip(predictions, ref_grams):
        words = tokenize(pred)
        pv = [vector(_ngrams(words, n)) for n in range(1, max_order + 1)]
        per_ref = [np.mean([cosine(pv[k], vector(g[k])) for k in range(max_order)])
                   for g in grams]
        scores.append(10.0 * float(np.mean(per_ref)))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# MedSynth findings.
# --------------------------------------------------------------------------------------------

SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
LABELS = tuple(f"nodule:{s} {z}" for s in SIDES for z in ZONES) + (
    "effusion:right", "effusion:left", "cardiomegaly", "normal")

_CELL = re.compile(r"\b(right|left)\s+(upper|middle|lower)\s+(?:zone|lung)\b")
_NODULE = re.compile(r"\b(?:nodules?|nodular|lesions?|opacity|mass)\b")
_GONE = re.compile(r"\b(?:resolved|resolution)\b")
_NEGATED_EFFUSION = re.compile(r"\bno\b[^.]*\beffusion")
_ENLARGED = re.compile(r"\bcardiomegaly\b|\bheart is enlarged\b|\benlarged heart\b")
_NEGATED_HEART = re.compile(r"\bno\b[^.]*\bcardiomegaly\b")
_NORMAL = re.compile(r"\bnormal chest (?:radiograph|ct)\b|\bno acute cardiopulmonary "
                     r"abnormality\b|\bno pulmonary lesion\b")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"\.(?!\d)|\n", text.lower()) if s.strip()]


def medsynth_findings(report: str) -> frozenset[str]:
    """The findings a MedSynth-style report states, as labels of :data:`LABELS`.

    Per sentence: a nodule (also "nodular opacity", "rounded opacity", "lesion") with a
    "<side> <zone> zone|lung" location, unless the sentence says it resolved; a pleural
    effusion on the sides named ("bilateral" = both), unless negated ("no ... effusion");
    cardiomegaly ("cardiomegaly", "the heart is enlarged"), unless negated. ``normal`` when a
    sentence calls the study normal ("normal chest radiograph", "no acute cardiopulmonary
    abnormality", "normal chest CT", "no pulmonary lesion") and no other finding is stated.
    """
    labels: set[str] = set()
    normal = False
    for s in _sentences(report):
        cells = _CELL.findall(s)
        if cells and _NODULE.search(s) and not _GONE.search(s):
            labels.update(f"nodule:{side} {zone}" for side, zone in cells)
        if "effusion" in s and not _NEGATED_EFFUSION.search(s):
            if "bilateral" in s or re.search(r"\bboth\b", s):
                labels.update(("effusion:right", "effusion:left"))
            else:
                labels.update(f"effusion:{side}" for side in SIDES
                              if re.search(rf"\b{side}\b", s))
        if _ENLARGED.search(s) and not _NEGATED_HEART.search(s):
            labels.add("cardiomegaly")
        if _NORMAL.search(s):
            normal = True
    if normal and not labels:
        labels.add("normal")
    return frozenset(labels)


def findings_labels(findings: dict | str) -> frozenset[str]:
    """The labels of :data:`LABELS` that a MedSynth study's structured findings (the
    record's ``findings`` JSON) make its report state: for radiograph pairs, those of the
    current study (a pair's report never calls it normal)."""
    f = json.loads(findings) if isinstance(findings, (str, bytes)) else dict(findings)
    kind = f.get("kind", "cxr")
    if kind == "longitudinal":
        cur = f["current"]
        return frozenset(_cxr_labels(cur) - {"normal"})
    if kind == "ct":
        cells = {f"nodule:{n['side']} {n['zone']}" for n in f["lesions"]}
        return frozenset(cells or {"normal"})
    return frozenset(_cxr_labels(f))


def _cxr_labels(f: dict) -> set[str]:
    out = {f"nodule:{n['side']} {n['zone']}" for n in f["nodules"]}
    eff = f["effusion"]
    out.update(f"effusion:{s}" for s in SIDES if eff in (s, "both"))
    if f["cardiomegaly"]:
        out.add("cardiomegaly")
    if f["normal"]:
        out.add("normal")
    return out


def clinical_f1(predictions: Sequence[str],
                references: Sequence[str | Iterable[str]]) -> dict:
    """Finding-level precision, recall and F1 of generated reports.

    ``predictions`` are report texts, read by :func:`medsynth_findings`; each reference is a
    report text (read the same way) or a set of labels. Micro-averaged over all (example,
    label) pairs: ``f1 = 2 TP / (2 TP + FP + FN)``; precision (recall) is 0 when nothing was
    predicted (expected), and F1 is 1 when no example has any finding on either side.
    ``per_label`` gives the F1 of each label that occurs on either side.
    """
    _check(predictions, references)
    counts = {label: [0, 0, 0] for label in LABELS}  # tp, fp, fn
    for pred, ref in zip(predictions, references):
        p = medsynth_findings(pred)
        r = medsynth_findings(ref) if isinstance(ref, str) else frozenset(ref)
        unknown = set(r) - set(LABELS)
        if unknown:
            raise ValueError(f"unknown finding labels {sorted(unknown)}; known: {LABELS}")
        for label in p & r:
            counts[label][0] += 1
        for label in p - r:
            counts[label][1] += 1
        for label in r - p:
            counts[label][2] += 1
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))

    def f1(t, p_, n_):
        return 2 * t / (2 * t + p_ + n_) if (2 * t + p_ + n_) else 1.0

    return {"precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": f1(tp, fp, fn),
            "per_label": {label: f1(*c) for label, c in counts.items() if any(c)}}


def corpus_metrics(predictions: Sequence[str], references: Sequence[str], *,
                   clinical: bool = False) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of a corpus of reports, plus clinical precision, recall
    and F1 (MedSynth findings) when ``clinical``."""
    out = {**bleu(predictions, references), "rouge_l": rouge_l(predictions, references),
           "cider": cider(predictions, references)}
    if clinical:
        c = clinical_f1(predictions, references)
        out.update(clinical_precision=c["precision"], clinical_recall=c["recall"],
                   clinical_f1=c["f1"])
    return out
