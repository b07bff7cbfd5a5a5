"""Report-generation metrics: the COCO caption scorers as papers use them, the sacrebleu /
rouge-score variants, a plain CIDEr, and MedSynth's clinical F1.

:func:`coco_metrics` is what report-generation papers (R2Gen and those compared with it)
report: the texts are cleaned as R2Gen cleans them (:mod:`medvl_jax.evaluate.report_cleaning`),
then scored by pycocoevalcap's own scorers — ``Bleu(4)`` (corpus BLEU-1..4 over whitespace
tokens, "closest" reference length), ``Rouge`` (ROUGE-L with beta = 1.2, "." a token),
``Cider`` (CIDEr-D: tf-idf n-grams, clipped counts, a Gaussian length penalty with sigma = 6,
times 10) and ``Meteor`` (METEOR 1.5, which needs a Java runtime and is skipped with a message
when there is none).

The other functions keep their own names: :func:`bleu` (sacrebleu, 13a tokenisation), and
:func:`rouge_l` (rouge-score, plain F1 over alphanumeric words), :func:`cider` (plain CIDEr,
written here: Vedantam et al. 2015 without CIDEr-D's clipping and length penalty — *not*
COCO's scorer, whose numbers are tens of points lower on reports).

Clinical F1 compares the findings stated by a generated MedSynth report with those of the
reference report, both read by :func:`medsynth_findings` (MedSynth's report phrasing: nodules
per lung zone and side, pleural effusion per side, cardiomegaly, and a normal study).

All scores are in [0, 1] except the CIDEr variants (0 to 10).
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
    """Corpus plain CIDEr of ``predictions`` (not COCO's CIDEr-D: no clipping, no length
    penalty; see :func:`coco_metrics` for that); each reference may be a string or a list of
    strings.

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
    """sacrebleu BLEU-1..4, rouge-score ROUGE-L and plain CIDEr of a corpus of reports, under
    their libraries' names (``sacrebleu_bleu1``.., ``rouge_score_rouge_l``, ``cider_plain``),
    plus clinical precision, recall and F1 (MedSynth findings) when ``clinical``."""
    out = {f"sacrebleu_{k}": v for k, v in bleu(predictions, references).items()}
    out.update(rouge_score_rouge_l=rouge_l(predictions, references),
               cider_plain=cider(predictions, references))
    if clinical:
        out.update(_clinical(predictions, references))
    return out


def _clinical(predictions, references) -> dict[str, float]:
    c = clinical_f1(predictions, references)
    return {"clinical_precision": c["precision"], "clinical_recall": c["recall"],
            "clinical_f1": c["f1"]}


# --------------------------------------------------------------------------------------------
# The COCO caption scorers (pycocoevalcap), as report-generation papers use them.
# --------------------------------------------------------------------------------------------

def java_available() -> bool:
    """Whether a Java runtime is on PATH (METEOR runs pycocoevalcap's METEOR 1.5 jar)."""
    import shutil

    return shutil.which("java") is not None


def _coco_inputs(predictions, references, clean):
    _check(predictions, references)
    clean = clean or (lambda t: t)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    gts = {i: [clean(str(x)) for x in rs] for i, rs in enumerate(refs)}
    res = {i: [clean(str(p))] for i, p in enumerate(predictions)}
    for i, p in res.items():
        if not p[0].split():
            # pycocoevalcap's BLEU divides by the hypothesis length; an empty one scores 0
            # through a single token no reference holds.
            res[i] = ["<empty>"]
    return gts, res


def coco_metrics(predictions: Sequence[str], references: Sequence, *,
                 clean=None, meteor: bool | None = None,
                 meteor_scorer=None) -> dict[str, float]:
    """COCO caption metrics of a corpus: ``coco_bleu1``..``coco_bleu4``, ``coco_rouge_l``,
    ``coco_cider_d`` and ``coco_meteor``, computed by pycocoevalcap's scorers on the texts
    after ``clean`` (a function, e.g. :func:`report_cleaning.clean_iu_xray`; None: as given).
    Each reference may be a string or a list of strings.

    ``meteor``: None runs METEOR when a Java runtime is present and otherwise leaves it out
    with a message on stderr; True requires it; False skips it. METEOR starts a Java process
    that loads its paraphrase tables (about half a minute); ``meteor_scorer``, a running
    ``pycocoevalcap.meteor.meteor.Meteor``, is used (and left running) instead of a new one.
    An empty prediction is scored as a word no reference holds (pycocoevalcap's BLEU cannot
    take an empty one)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs(predictions, references, clean)
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"coco_bleu{n + 1}": float(v) for n, v in enumerate(b)}
    out["coco_rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["coco_cider_d"] = float(Cider().compute_score(gts, res)[0])
    run_meteor = java_available() if meteor is None else meteor
    if meteor_scorer is not None and meteor is not False:
        out["coco_meteor"] = float(meteor_scorer.compute_score(gts, res)[0])
    elif run_meteor:
        if not java_available():
            raise RuntimeError("METEOR needs a Java runtime (java on PATH): pycocoevalcap runs "
                               "the METEOR 1.5 jar; install one (apt-get install "
                               "default-jre-headless) or pass meteor=False")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["coco_meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    elif meteor is None:
        import sys

        print("report metrics: METEOR skipped, no Java runtime (java) on PATH",
              file=sys.stderr)
    return out


def coco_rouge_l(prediction: str, reference: str) -> float:
    """pycocoevalcap's ROUGE-L of one prediction (beta = 1.2, whitespace tokens)."""
    from pycocoevalcap.rouge.rouge import Rouge

    p = prediction if prediction.split() else "<empty>"
    return float(Rouge().calc_score([p], [reference]))


def report_corpus_metrics(predictions: Sequence[str], references: Sequence[str], *,
                          clean, clinical: bool = False) -> dict[str, float]:
    """:func:`coco_metrics` after ``clean``, plus clinical precision, recall and F1 (MedSynth
    findings, read from the texts as generated) when ``clinical``."""
    out = coco_metrics(predictions, references, clean=clean)
    if clinical:
        out.update(_clinical(predictions, references))
    return out
