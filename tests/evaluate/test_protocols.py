"""Evaluation protocols: every parser and metric on hand-worked cases, traps included."""
import dataclasses

import pytest
from rouge_score import rouge_scorer

from medvl_jax.evaluate import llava_med, medevalkit
from medvl_jax.evaluate import protocols as P

MC_OPTIONS = ["right upper zone", "left lower zone", "left upper zone", "right middle zone"]


def ex(qtype, answer, question="Is there a nodule?", options=()):
    return {"id": "x", "images": [],
            "messages": [{"role": "user", "content": "<image>\n" + question},
                         {"role": "assistant", "content": answer}],
            "meta": {"question_type": qtype, "answer": answer, "options": list(options)}}


def score(name, prediction, example):
    return P.get(name).evaluate(prediction, example)[1]


# ---------------------------------------------------------------------------------------------
# LLaVA-Med (hand-worked; tests/evaluate/test_conformance.py checks the original's verdicts).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("yes.", "yes"),
    # '-' inside a word becomes a space; ',' and '(' touch a space and are deleted; ')' at the
    # end touches no space and becomes one; the article goes.
    ("The left-lung, (upper)", "left lung upper"),
    ("none", "0"),                       # number words become digits
    ("Two nodules", "2 nodules"),
    ("1,000 mm", "1000 mm"),             # a digit-comma-digit deletes every listed mark
    ("3.5 cm.", "3.5 cm"),               # decimal points stay, full stops go
    ("x." * 33, "x" * 33 + "."),         # only the first 32 full stops go
])
def test_llava_normalise(text, want):
    assert llava_med.normalise(text) == want


def test_llava_normalise_fixed_deletes_every_full_stop():
    assert llava_med.normalise_fixed("x." * 33) == "x" * 33
    # Recall normalises twice: 64 full stops go; the 65th keeps "effusion." apart.
    assert llava_med.recall("x. " * 63 + "effusion.", "effusion") == 1.0
    assert llava_med.recall("x. " * 64 + "effusion.", "effusion") == 0.0
    assert llava_med.recall("x. " * 64 + "effusion.", "effusion", fixed=True) == 1.0


@pytest.mark.parametrize("prediction, reference, run_eval, batch", [
    ("Yes", "yes", 1.0, 1.0),
    ("No.", "yes", 0.0, 0.0),
    ("normal", "no", 1.0, 1.0),     # the substring flaw: "normal" contains "no"
    ("unknown", "no", 1.0, 1.0),    # ... and so does "unknown"
    ("Yes, no evidence of effusion.", "yes", 1.0, 1.0),  # both answers count as correct
    ("Yes, no evidence of effusion.", "no", 1.0, 1.0),
    ("none", "no", 0.0, 0.0),       # "none" is normalised to "0" first
    ("left", "left", 0.0, 1.0),     # run_eval: a closed answer without yes/no never scores
    ("yes, on the left", "left", 1.0, 1.0),
    ("I cannot tell", "no", 1.0, 1.0),   # "cannot" contains "no"
])
def test_llava_med_closed(prediction, reference, run_eval, batch):
    assert score("llava_med", prediction, ex("closed", reference)) == run_eval
    assert score("llava_med_batch", prediction, ex("closed", reference)) == batch


@pytest.mark.parametrize("prediction, reference, want", [
    ("Yes", "yes", 1.0),
    ("No.", "no", 1.0),
    ("normal", "no", 0.0),     # the trap the strict variant fixes
    ("unknown", "no", 0.0),
    ("Yes, no evidence of effusion.", "yes", 0.0),  # both words: ambiguous, wrong either way
    ("Yes, no evidence of effusion.", "no", 0.0),
    ("yes, there is", "yes", 1.0),
    ("not seen", "no", 0.0),   # "not" is not "no"
    ("the left side", "left", 1.0),   # other closed answers: whole words
    ("leftward", "left", 0.0),
])
def test_llava_med_strict_closed(prediction, reference, want):
    assert score("llava_med_strict", prediction, ex("closed", reference)) == want


@pytest.mark.parametrize("prediction, reference, want", [
    ("left lower zone", "left upper zone", 2 / 3),   # tp = left, zone; fn = upper
    ("Right.", "right", 1.0),
    ("left left", "left zone", 2 / 3),   # tp counts the repeat twice: 2 / (2 + 1)
    ("", "left", 0.0),
    ("upper", "left", 0.0),
])
def test_llava_med_open_recall(prediction, reference, want):
    for name in ("llava_med", "llava_med_batch", "llava_med_strict"):
        assert score(name, prediction, ex("open", reference)) == pytest.approx(want)


def test_llava_med_other_types_are_open_questions():
    # Multiple choice, counting, progression: recall of the reference words.
    assert score("llava_med", "B", ex("multiple_choice", "B", options=MC_OPTIONS)) == 1.0
    assert score("llava_med", "2 nodules", ex("counting", "2")) == 1.0   # 1 / (1 + 0)
    assert score("llava_med", "two", ex("counting", "2")) == 1.0          # two -> 2
    assert score("llava_med", "grown", ex("progression", "stable")) == 0.0


# ---------------------------------------------------------------------------------------------
# MedEvalKit (hand-worked; tests/evaluate/test_conformance.py checks the original's verdicts).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Looking at the image ... \\boxed{B}", "b"),
    ("\\boxed{\\text{Yes}}", "\\text{yes}"),            # nested braces matched
    ("\\boxed{A} then \\boxed{C}", "c"),                # the last box
    ("\\boxed{ B }", "b"),                              # its content stripped
    ("The answer is \\boxed{B", "None"),                # a box cut off: the text "None"
    ("the boxed region is normal", "None"),             # "boxed" anywhere asks for a box
    ("<think>hmm</think><answer>No</answer>", "no"),
    ("<answer>left</answer> and <answer>upper</answer>", "left upper"),
    ("<answer>unclosed", "<answer>unclosed"),           # no complete pair: the whole text
    ("<answer></answer> left", "<answer></answer> left"),  # empty pairs: the whole text too
    ("Answer: Yes", " yes"),                            # nothing is stripped
    ("The final answer is B", " b"),                    # "answer is" cuts, then nothing else
    ("The answer is: left", ": left"),                  # markers are tried in order
    ("答案: 是", " 是"),
    ("  plain  ", "  plain  "),
])
def test_medevalkit_parse_response(text, want):
    assert medevalkit.parse_response(text) == want


@pytest.mark.parametrize("prediction, reference, want", [
    ("no", "no", 1.0),
    ("Yes.", "yes", 1.0),
    ("\\boxed{no}", "no", 1.0),
    ("\\boxed{No", "no", 0.0),      # cut-off box: "None" holds neither "yes" nor "no"
    ("Answer: No, it is not.", "no", 1.0),
    ("Yes, no evidence of effusion.", "yes", 0.0),   # exactly one of yes/no must appear
    ("Yes, no evidence of effusion.", "no", 0.0),
    ("normal", "no", 1.0),      # substrings, as MedEvalKit: "normal" holds "no"
    ("maybe", "yes", 0.0),
    ("yes", "no", 0.0),
])
def test_medevalkit_yes_no(prediction, reference, want):
    assert score("medevalkit", prediction, ex("closed", reference)) == want


@pytest.mark.parametrize("prediction, want", [
    ("C", 1.0),
    ("c. left upper zone", 1.0),             # the letter before the first full stop
    ("left upper zone", 1.0),                # closest to "c. left upper zone"
    ("Answer: D", 0.0),
    ("\\boxed{B}", 0.0),
    ("The answer is C.\n\nBecause ...", 1.0),
    # No letter, no option text: the most similar listed option ("A. right upper zone", ...)
    # by difflib's ratio.
    ("left upper", 1.0),
])
def test_medevalkit_multiple_choice(prediction, want):
    e = ex("multiple_choice", "C", "Which region contains a nodule?", MC_OPTIONS)
    assert score("medevalkit", prediction, e) == want


def test_medevalkit_judge_multi_choice_by_hand():
    import difflib

    choices = ["A:CT scan", "B:MRI", "C:Ultrasound"]
    assert medevalkit.judge_multi_choice(choices, "B", "B")
    # "(c)" is neither a letter nor a listed option: the most similar option is taken, and
    # the shorter "a:ct scan" (1 match in 3 + 9 characters, 0.167) beats "c:ultrasound"
    # (1 in 3 + 12, 0.133).
    assert medevalkit.judge_multi_choice(choices, "C", "(C)") is False
    ratios = [difflib.SequenceMatcher(None, c.lower(), "(c)").ratio() for c in choices]
    assert ratios == pytest.approx([2 / 12, 0.0, 2 / 15])
    # Option text without its letter: the similarity fallback against "b:mri".
    assert medevalkit.judge_multi_choice(choices, "B", "MRI")
    # The reference may be the option text (OmniMedVQA when no option equals it).
    assert medevalkit.judge_multi_choice(["A. CT", "B. MRI"], "b. mri", "B")


def test_medevalkit_open_is_exact_after_extraction():
    # VQA-RAD's rule strips before extraction, not after: "answer:" leaves " left".
    assert score("medevalkit", "Answer: Left", ex("open", "left")) == 0.0
    assert score("medevalkit_strict", "Answer: Left", ex("open", "left")) == 1.0
    assert score("medevalkit", "Left", ex("open", "left")) == 1.0
    assert score("medevalkit", "left lung", ex("open", "left")) == 0.0
    assert score("medevalkit", "\\boxed{2}", ex("counting", "2")) == 1.0


def test_medevalkit_dataset_prompts_and_groups():
    p = P.get("medevalkit")
    slake = ex("closed", "Yes", "Is this a CT?")
    slake["meta"].update(benchmark="slake", answer_type="CLOSED", q_lang="en",
                         question="Is this a CT?")
    assert p.prompt(slake)["messages"] == [{"role": "user", "content": "<image>\nIs this a CT?\n"
                                           "Answer the question using a single word or phrase."}]
    assert p.category(slake) == "closed"
    # SLAKE's yes/no rule is case-sensitive: "Yes" goes to exact match, so "Yes, it is" fails.
    assert score("medevalkit", "Yes, it is", slake) == 0.0
    assert score("medevalkit", "Yes.", slake) == 1.0
    assert score("medevalkit_strict", "Yes, it is", slake) == 1.0
    rad = ex("open", "yes", "Is the heart enlarged?")      # VQA-RAD's split: by the answer
    rad["meta"].update(benchmark="vqa_rad", question="Is the heart enlarged?")
    assert p.category(rad) == "closed"
    assert p.prompt(rad)["messages"][-1]["content"] == (
        "<image>\nIs the heart enlarged?\nPlease output 'yes' or 'no'(no extra output).")


def test_medevalkit_prompts_elsewhere():
    p = P.get("medevalkit")
    closed = p.prompt(ex("closed", "yes", "Is the heart enlarged?"))
    assert closed["messages"] == [{"role": "user", "content": "<image>\nIs the heart enlarged?\n"
                                   "Please output 'yes' or 'no'(no extra output)."}]
    listed = "Which region?\nA. right upper zone\nB. left lower zone\nC. left upper zone\n" \
             "D. right middle zone\nAnswer with the letter."
    mc = p.prompt(ex("multiple_choice", "C", listed, MC_OPTIONS))
    assert mc["messages"][-1]["content"] == "<image>\n" + listed + \
        "\nAnswer with the option's letter from the given choices directly."
    bare = p.prompt(ex("multiple_choice", "B", "Which finding?", ["nodule", "effusion"]))
    assert bare["messages"][-1]["content"] == (
        "<image>\nWhich finding?\nOptions:\nA. nodule\nB. effusion\n"
        "Answer with the option's letter from the given choices directly.")
    assert p.prompt(ex("open", "left"))["messages"][-1]["content"].endswith(
        "\nPlease answer the question concisely.")
    # Protocols without an instruction keep the question and drop the reference answer.
    plain = P.get("llava_med").prompt(ex("open", "left", "Which side?"))
    assert plain["messages"] == [{"role": "user", "content": "<image>\nWhich side?"}]


@pytest.mark.parametrize("prediction, want", [
    ("(C)", 1.0), ("C)", 1.0), ("**C**", 1.0), ("\\boxed{(C)}", 1.0), ("Option C", 1.0),
    ("c: left upper zone", 1.0), ("Left upper zone.", 1.0), ("The answer is (C).", 1.0),
    ("B", 0.0), ("left upper", 0.0), ("", 0.0),
])
def test_medevalkit_strict_multiple_choice(prediction, want):
    e = ex("multiple_choice", "C", "Which region contains a nodule?", MC_OPTIONS)
    assert score("medevalkit_strict", prediction, e) == want


# ---------------------------------------------------------------------------------------------
# exact, token_f1, medsynth; rules shared by all protocols.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, want", [
    ("Yes.", "yes", 1.0),
    ("yes, there is", "yes", 0.0),
    ("The left upper zone", "left upper zone", 1.0),
    ("B", "b", 1.0),
])
def test_exact(prediction, reference, want):
    assert score("exact", prediction, ex("open", reference)) == want


def test_token_f1():
    # "yes there is" vs "yes": P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5.
    assert score("token_f1", "yes, there is", ex("closed", "yes")) == pytest.approx(0.5)
    # "left lower zone" vs "left upper zone nodule": 2 common; P = 2/3, R = 2/4 -> 4/7.
    assert score("token_f1", "The left lower zone.", ex("open", "left upper zone nodule")) == \
        pytest.approx(4 / 7)


def test_medsynth_protocol_and_geometric_types():
    assert score("medsynth", "left lower zone", ex("open", "left upper zone")) == \
        pytest.approx(2 / 3)   # token F1: P = R = 2/3
    assert score("medsynth", "normal", ex("closed", "no")) == 0.0
    box = ex("box", "[10, 10, 30, 30]")
    # IoU of [12,10,32,30] and [10,10,30,30] = 360 / 440 >= 0.5, under every protocol.
    for name in P.PROTOCOLS:
        assert score(name, "[12, 10, 32, 30]", box) == 1.0
        assert score(name, "[20, 20, 40, 40]", box) == 0.0   # IoU 100 / 700
    assert score("medevalkit", "\\boxed{14 mm}", ex("size", "15 mm")) == 1.0   # within 2 mm


def test_reports_are_scored_by_rouge_l_under_every_protocol():
    ref = "The heart is enlarged. Small left pleural effusion."
    pred = "The heart is enlarged. No pleural effusion."
    want = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    for name in P.PROTOCOLS:
        if name == "report":
            continue
        parsed, s = P.get(name).evaluate(" " + pred + " ", ex("report", ref))
        assert parsed == pred and s == pytest.approx(want)
    # By hand: LCS "the heart is enlarged pleural effusion" = 6 of 7 and 8 words.
    assert want == pytest.approx(2 * (6 / 7) * (6 / 8) / (6 / 7 + 6 / 8))
    # The report protocol: R2Gen-cleaned texts and pycocoevalcap's ROUGE-L (beta = 1.2, "."
    # a token): "the heart is enlarged . no pleural effusion ." (9 tokens) against "the heart is
    # enlarged . small left pleural effusion ." (10): LCS 8, P = 8/9, R = 8/10.
    parsed, s = P.get("report").evaluate(" " + pred + " ", ex("report", ref))
    assert parsed == "the heart is enlarged . no pleural effusion ."
    p_, r_, b2 = 8 / 9, 8 / 10, 1.2 ** 2
    assert s == pytest.approx((1 + b2) * p_ * r_ / (r_ + b2 * p_))


def test_registry_stamps_and_errors():
    assert set(P.PROTOCOLS) == {"exact", "medsynth", "llava_med", "llava_med_batch",
                                "llava_med_strict", "medevalkit", "medevalkit_strict", "report",
                                "token_f1"}
    assert P.get("llava_med").stamp() == {"protocol": "llava_med", "version": "2"}
    assert P.get("llava_med_strict").tag == "llava_med_strict@2"
    assert P.get("medevalkit").tag == "medevalkit@2"
    with pytest.raises(ValueError, match="unknown protocol 'llava'.*llava_med, llava_med_batch"):
        P.get("llava")
    assert [p.name for p in P.parse_list("exact, llava_med,exact")] == ["exact", "llava_med"]
    with pytest.raises(ValueError, match="no protocol named"):
        P.parse_list(" , ")
    assert P.default_for("medsynth") == "medsynth" and P.default_for("vqa_rad") == "exact"


def test_judge_extension_point():
    seen = []

    def judge(question, prediction, reference, example):
        seen.append((question, prediction, reference))
        return 1.0 if reference in prediction else 0.0

    judged = P.with_judge(P.get("medevalkit"), judge, name="medevalkit+judge", version="1")
    assert judged.stamp() == {"protocol": "medevalkit+judge", "version": "1"}
    e = ex("open", "left", "Which side?")
    assert P.get("medevalkit").evaluate("Answer: the left one", e)[1] == 0.0
    assert judged.evaluate("Answer: the left one", e) == ("the left one", 1.0)
    assert seen == [("Which side?", "the left one", "left")]
    # Other types keep the base rule (and never reach the judge); prompts are the base's.
    assert judged.evaluate("normal", ex("closed", "no"))[1] == 1.0 and len(seen) == 1
    assert judged.prompt(e) == P.get("medevalkit").prompt(e)
    bad = P.with_judge(P.get("exact"), lambda *a: 2.0, name="bad", version="0")
    with pytest.raises(ValueError, match="judge of protocol 'bad' returned 2.0"):
        bad.evaluate("x", e)


def test_decoding_budgets():
    d = P.Decoding(max_new_tokens=None, report_max_new_tokens=99)
    assert d.for_type("closed") is None and d.for_type("report") == 99
    custom = dataclasses.replace(P.get("exact"), decoding=P.Decoding(max_new_tokens=4))
    assert custom.decoding.for_type("open") == 4


@pytest.mark.parametrize("prediction, reference, want", [
    # The traps table of docs/evaluation.md: llava_med, llava_med_batch, llava_med_strict,
    # medevalkit, medevalkit_strict, exact.
    ("normal", "no", (1, 1, 0, 1, 0, 0)),
    ("unknown", "no", (1, 1, 0, 1, 0, 0)),
    ("none", "no", (0, 0, 0, 1, 0, 0)),
    ("Yes, no evidence of effusion.", "yes", (1, 1, 0, 0, 0, 0)),
    ("Yes, no evidence of effusion.", "no", (1, 1, 0, 0, 0, 0)),
    ("not seen", "no", (1, 1, 0, 1, 0, 0)),
    ("No.", "no", (1, 1, 1, 1, 1, 1)),
    ("\\boxed{no}", "no", (1, 1, 1, 1, 1, 0)),
    ("\\boxed{no", "no", (1, 1, 1, 0, 1, 0)),
    ("Answer: no", "no", (1, 1, 1, 1, 1, 0)),
    ("left", "left", (0, 1, 1, 1, 1, 1)),
])
def test_traps_table(prediction, reference, want):
    names = ("llava_med", "llava_med_batch", "llava_med_strict", "medevalkit",
             "medevalkit_strict", "exact")
    assert tuple(score(n, prediction, ex("closed", reference)) for n in names) == want


def test_medevalkit_omnimedvqa_keeps_a_reference_that_matches_no_option_as_text():
    # MedEvalKit turns gt_answer into a letter only when it equals an option exactly; "mri"
    # against the option "MRI" stays text, so the right letter is judged wrong there.
    e = ex("multiple_choice", "B", "What modality?", ["CT", "MRI"])
    e["meta"].update(benchmark="omnimedvqa", question="What modality?", answer_text="MRI")
    assert score("medevalkit", "B", e) == 1.0
    e["meta"]["gt_answer"] = "mri"
    assert score("medevalkit", "B", e) == 0.0
    assert score("medevalkit", "MRI", e) == 1.0        # only the text itself matches
    assert score("medevalkit_strict", "B", e) == 1.0
