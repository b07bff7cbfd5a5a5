"""Report metrics against sacrebleu / rouge-score called directly and hand-worked values."""
import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from medvl_jax.data.medsynth import source
from medvl_jax.evaluate import report_metrics as rm

PREDS = ["The heart is enlarged. There is a small left pleural effusion.",
         "No pleural effusion. A 17 mm nodule is seen in the right upper zone.",
         "The lungs are clear and the heart size is normal."]
REFS = ["The heart is enlarged with a small left pleural effusion.",
        "A 17 mm nodule in the right upper zone. No pleural effusion.",
        "The lungs are clear. Heart size is normal."]


def test_bleu_agrees_with_sacrebleu():
    got = rm.bleu(PREDS, REFS)
    ref = sacrebleu.corpus_bleu(PREDS, [REFS], lowercase=True)
    assert got["bleu4"] == pytest.approx(ref.score / 100)
    # BLEU-n from sacrebleu's own n-gram precisions and brevity penalty.
    assert min(ref.precisions) > 0  # no smoothing involved below
    for n in (1, 2, 3):
        want = ref.bp * math.exp(np.mean([math.log(p / 100) for p in ref.precisions[:n]]))
        assert got[f"bleu{n}"] == pytest.approx(want)


def test_bleu_by_hand():
    # Unigram precision 4/4, bigram 2/3 ("is enlarged" is not in the reference), brevity
    # penalty exp(1 - 5/4).
    got = rm.bleu(["the heart is enlarged"], ["the heart is not enlarged"], max_order=2)
    bp = math.exp(1 - 5 / 4)
    assert got["bleu1"] == pytest.approx(bp)
    assert got["bleu2"] == pytest.approx(bp * math.sqrt(2 / 3))


def test_rouge_l_agrees_with_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)])
    assert rm.rouge_l(PREDS, REFS) == pytest.approx(want)
    # By hand: LCS "the heart is enlarged" = 4 of 4 and 5 words -> P = 1, R = 0.8.
    assert rm.rouge_l(["the heart is enlarged"], ["the heart size is enlarged"]) == \
        pytest.approx(2 * 0.8 / 1.8)


def test_cider_by_hand():
    # Three examples, so an n-gram in the references of d of them weighs log(3 / d); unseen
    # n-grams weigh log(3). u: weight of df = 2 ("heart", "is", "heart is"), v: df = 1 or 0.
    preds = ["heart is enlarged", "heart is enlarged", "right effusion"]
    refs = ["heart is enlarged", "heart is normal", "left effusion"]
    u, v = math.log(3 / 2), math.log(3)
    ex1 = 10 * (1 + 1 + 1 + 0) / 4                 # identical: cosine 1 for n = 1..3, no 4-grams
    cos1 = (2 * u * u) / (2 * u * u + v * v)       # heart, is shared; enlarged vs normal
    cos2 = (u * u) / (u * u + v * v)               # "heart is" shared
    ex2 = 10 * (cos1 + cos2 + 0 + 0) / 4
    ex3 = 10 * (0.5 + 0 + 0 + 0) / 4               # "effusion" shared, both weigh v
    assert rm.cider(preds, refs) == pytest.approx((ex1 + ex2 + ex3) / 3)
    assert rm.cider(preds, refs) == pytest.approx(3.19498, abs=1e-5)
    # Several references per example average over the references.
    two = rm.cider(["a b", "c"], [["a b", "a b"], ["a c"]])
    assert two == pytest.approx((10 * 2 / 4 + 10 * 1 / 4) / 2)


@pytest.mark.parametrize("report, want", [
    ("FINDINGS: There is a 17 mm nodule in the right upper zone. Small left pleural effusion "
     "with blunting of the costophrenic angle. The heart is enlarged (cardiothoracic ratio "
     "0.58). No acute osseous abnormality.\nIMPRESSION: 1. 17 mm nodule in the right upper "
     "zone. 2. Left pleural effusion. 3. Cardiomegaly.",
     {"nodule:right upper", "effusion:left", "cardiomegaly"}),
    ("FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal "
     "(cardiothoracic ratio 0.42).\nIMPRESSION: Normal chest radiograph.", {"normal"}),
    ("A 20 mm rounded opacity is seen projecting over the left middle zone. Moderate "
     "bilateral pleural effusion with a meniscus at the lung base.",
     {"nodule:left middle", "effusion:left", "effusion:right"}),
    ("The previously seen 20 mm nodule in the left lower zone has resolved. Stable 18 mm "
     "nodule in the right middle zone.\nIMPRESSION: Resolution of the left lower zone nodule.",
     {"nodule:right middle"}),
    ("There is a 12 mm nodule in the left upper lung (35 HU), seen on slices 3-9. The pleural "
     "spaces are clear.", {"nodule:left upper"}),
    ("Normal chest radiograph. Cardiomegaly.", {"cardiomegaly"}),  # a finding beats "normal"
    ("No pulmonary nodule or mass is seen. The costophrenic angles are sharp.", set()),
    ("", set()),
])
def test_medsynth_findings_by_hand(report, want):
    assert rm.medsynth_findings(report) == want


def test_medsynth_findings_recover_the_generator_findings():
    # The report parser against the structured findings the reports were written from.
    for kind in ("cxr", "longitudinal", "ct"):
        for i in range(40):
            rec = source.generate_study(kind, 1000 + i, render=False, study_id=str(i))
            assert rm.medsynth_findings(rec["report"]) == rm.findings_labels(rec["findings"]), \
                (kind, rec["report"])


def test_clinical_f1_by_hand():
    preds = ["Nodule in the right upper zone. Cardiomegaly.", "Right pleural effusion."]
    refs = ["17 mm nodule in the right upper zone. Left pleural effusion. Cardiomegaly.",
            {"normal"}]
    # Example 1: tp = 2 (nodule, cardiomegaly), fn = 1 (left effusion); example 2: fp = 1
    # (right effusion), fn = 1 (normal). TP 2, FP 1, FN 2.
    got = rm.clinical_f1(preds, refs)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 4)
    assert got["f1"] == pytest.approx(4 / 7)
    assert got["per_label"] == {"nodule:right upper": 1.0, "cardiomegaly": 1.0,
                                "effusion:left": 0.0, "effusion:right": 0.0, "normal": 0.0}
    assert rm.clinical_f1(["x"], ["y"])["f1"] == 1.0   # nothing stated on either side
    with pytest.raises(ValueError, match="unknown finding labels"):
        rm.clinical_f1(["x"], [{"pneumonia"}])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rm.rouge_l(["a", "b"], ["a"])


def test_corpus_metrics_keys():
    got = rm.corpus_metrics(PREDS, REFS, clinical=True)
    assert set(got) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider",
                        "clinical_precision", "clinical_recall", "clinical_f1"}
    assert got["clinical_f1"] == rm.clinical_f1(PREDS, REFS)["f1"]
