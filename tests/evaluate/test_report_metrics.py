"""Report metrics against sacrebleu / rouge-score / pycocoevalcap called directly, R2Gen's
cleaning and hand-worked values (CIDEr-D's clipping and length penalty among them)."""
import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from medvl_jax.data.medsynth import source
from medvl_jax.evaluate import report_cleaning
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
    assert set(got) == {"sacrebleu_bleu1", "sacrebleu_bleu2", "sacrebleu_bleu3",
                        "sacrebleu_bleu4", "rouge_score_rouge_l", "cider_plain",
                        "clinical_precision", "clinical_recall", "clinical_f1"}
    assert got["clinical_f1"] == rm.clinical_f1(PREDS, REFS)["f1"]
    assert got["sacrebleu_bleu4"] == rm.bleu(PREDS, REFS)["bleu4"]


# ---------------------------------------------------------------------------------------------
# R2Gen's cleaning and the COCO caption scorers (the ``report`` protocol).
# ---------------------------------------------------------------------------------------------

IU_PREDS = ["The heart is normal in size. The lungs are clear. No pneumothorax or effusion.",
            "1. Cardiomegaly. 2. Small left pleural effusion.",
            "No acute cardiopulmonary abnormality.",
            "The cardiomediastinal silhouette is within normal limits. Degenerative changes of "
            "the thoracic spine (T8-T9).",
            "Heart size normal. Lungs clear.. No focal consolidation."]
IU_REFS = ["Heart size is normal. The lungs are clear. There is no pneumothorax or pleural "
           "effusion.",
           "Cardiomegaly with a small left pleural effusion. No pneumothorax.",
           "No acute cardiopulmonary disease.",
           "The cardiomediastinal silhouette is normal. Mild degenerative changes of the spine.",
           "The heart is normal in size. The lungs are clear without focal consolidation."]


@pytest.mark.parametrize("report, want", [
    ("The heart is normal. 2. No effusion.", "the heart is normal . no effusion ."),
    # "..", list numbers and parentheses go.
    ("1. Heart size normal.. 2. Lungs clear (no infiltrate).",
     "heart size normal . lungs clear no infiltrate ."),
    ("There are 11. nodules.", "there are 1nodules ."),         # "1. " goes anywhere
    ("T8: mild degenerative change; size=3 cm.",                  # digits stay; ":;=" go
     "t8 mild degenerative change size3 cm ."),
    ("No pneumothorax. . Normal.", "no pneumothorax .  . normal ."),   # empty sentences stay
    ("Patient's \"heart\" is normal/stable.", "patients heart is normalstable ."),
])
def test_r2gen_cleaning_iu_xray(report, want):
    assert report_cleaning.clean_iu_xray(report) == want


def test_r2gen_cleaning_mimic_cxr():
    got = report_cleaning.clean_mimic_cxr("FINDINGS:\n\nNo  focal   consolidation.__ ___")
    assert got == "findings no focal consolidation  ."
    assert report_cleaning.cleaner_for("mimic_cxr") is report_cleaning.clean_mimic_cxr
    assert report_cleaning.cleaner_for("iu_xray") is report_cleaning.clean_iu_xray


def _pycocoevalcap(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = dict(zip(("coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4"),
                   Bleu(4).compute_score(gts, res, verbose=0)[0]))
    out["coco_rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["coco_cider_d"] = Cider().compute_score(gts, res)[0]
    return out


def _cleaned(preds, refs):
    clean = report_cleaning.clean_iu_xray
    return ({i: [clean(r)] for i, r in enumerate(refs)},
            {i: [clean(p)] for i, p in enumerate(preds)})


def test_coco_metrics_equal_pycocoevalcap():
    want = _pycocoevalcap(*_cleaned(IU_PREDS, IU_REFS))
    got = rm.coco_metrics(IU_PREDS, IU_REFS, clean=report_cleaning.clean_iu_xray, meteor=False)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # The sacrebleu / rouge-score numbers on raw text are not these.
    assert abs(rm.bleu(IU_PREDS, IU_REFS)["bleu4"] - got["coco_bleu4"]) > 1e-3
    assert abs(rm.cider(IU_PREDS, IU_REFS) - got["coco_cider_d"]) > 0.1


@pytest.mark.skipif(not rm.java_available(),
                    reason="METEOR not checked: no Java runtime (java) on PATH")
def test_coco_meteor_equals_pycocoevalcap():
    # One METEOR process for both (each start loads its paraphrase tables, ~30 s).
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        gts, res = _cleaned(IU_PREDS, IU_REFS)
        want = scorer.compute_score(gts, res)[0]
        got = rm.coco_metrics(IU_PREDS, IU_REFS, clean=report_cleaning.clean_iu_xray,
                              meteor_scorer=scorer)
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    assert got["coco_meteor"] == pytest.approx(want, abs=1e-6)
    assert 0.0 < got["coco_meteor"] < 1.0


def test_coco_metrics_without_java_skip_meteor(monkeypatch, capsys):
    monkeypatch.setattr(rm, "java_available", lambda: False)
    got = rm.coco_metrics(IU_PREDS[:2], IU_REFS[:2])
    assert "coco_meteor" not in got
    assert "METEOR skipped, no Java runtime" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="METEOR needs a Java runtime"):
        rm.coco_metrics(IU_PREDS[:2], IU_REFS[:2], meteor=True)


def test_cider_d_clipping_and_length_penalty_by_hand():
    # Two studies, one reference each, so a reference n-gram weighs log 2 (df = 1) and an
    # n-gram in no reference log 2 too (df floored at 1); call it L.
    # Study 1: "p q p q" against "p q". Unigrams: weights (2L, 2L) vs (L, L); CIDEr-D clips
    # the prediction's weight at the reference's: (L*L + L*L) / (2*sqrt(2) L * sqrt(2) L) =
    # 1/2 (the plain cosine would be 1). Bigrams: "p q" 2L (clipped to L), "q p" L vs "p q" L:
    # L*L / (sqrt(5) L * L) = 1/sqrt(5). No reference 3- or 4-grams: 0. Length penalty:
    # exp(-(4 - 2)^2 / (2 * 6^2)). Study 2 is exact: (1 + 1 + 0 + 0) / 4 * 10 = 5.
    got = rm.coco_metrics(["p q p q", "s t"], ["p q", "s t"], meteor=False)["coco_cider_d"]
    study1 = 10 * math.exp(-4 / 72) * (0.5 + 1 / math.sqrt(5) + 0 + 0) / 4
    assert got == pytest.approx((study1 + 5.0) / 2, abs=1e-9)
    # Plain CIDEr has neither: study 1 scores its cosines (1, 3/sqrt(10)... ) unpenalised.
    assert rm.cider(["p q p q", "s t"], ["p q", "s t"]) > got
    # The length penalty alone: "s t" padded with a word no reference holds.
    longer = rm.coco_metrics(["p q", "s t u"], ["p q", "s t"], meteor=False)["coco_cider_d"]
    cos1 = 2 / math.sqrt(3) / math.sqrt(2)       # unigrams: (L^2 + L^2) / (sqrt(3) L sqrt(2) L)
    cos2 = 1 / math.sqrt(2)                      # bigrams "s t" shared, "t u" not
    study2 = 10 * math.exp(-1 / 72) * (cos1 + cos2) / 4
    assert longer == pytest.approx((5.0 + study2) / 2, abs=1e-9)


def test_report_protocol_through_the_harness(monkeypatch):
    from medvl_jax.evaluate import harness

    monkeypatch.setattr(rm, "java_available", lambda: False)  # METEOR: tested above
    from medvl_jax.evaluate import protocols as P

    examples = [{"id": str(i), "messages": [], "meta": {"question_type": "report",
                                                       "answer": r, "benchmark": "iu_xray"}}
                for i, r in enumerate(IU_REFS)]
    proto = P.get("report")
    rows = []
    for ex, pred in zip(examples, IU_PREDS):
        parsed, score = proto.evaluate(pred, ex)
        assert parsed == report_cleaning.clean_iu_xray(pred)
        assert score == pytest.approx(rm.coco_rouge_l(parsed, report_cleaning.clean_iu_xray(
            ex["meta"]["answer"])))
        rows.append({"type": proto.category(ex), "score": score, "prediction": pred,
                     "parsed": parsed})
    table = harness.summarise(rows, examples, proto)
    want = rm.coco_metrics(IU_PREDS, IU_REFS, clean=report_cleaning.clean_iu_xray,
                           meteor=False)
    for key, value in want.items():
        assert table["report_metrics"][key] == pytest.approx(value, abs=1e-6)
    # The per-report scores average to the corpus ROUGE-L (pycocoevalcap's is a mean).
    assert table["per_type"]["report"]["score"] == pytest.approx(want["coco_rouge_l"])
