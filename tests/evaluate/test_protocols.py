"""Evaluation protocols: every parser and metric on hand-worked cases, traps included."""
import dataclasses

import pytest
from rouge_score import rouge_scorer

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
# LLaVA-Med.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Yes.", "yes"),
    # '-' inside a word becomes a space; ',' and '(' touch a space and are deleted; ')' at the
    # end touches no space and becomes one; the article goes.
    ("The left-lung, (upper)", "left lung upper"),
    ("none", "0"),                       # number words become digits
    ("Two nodules", "2 nodules"),
    ("1,000 mm", "1000 mm"),             # a digit-comma-digit deletes every listed mark
    ("3.5 cm.", "3.5 cm"),               # decimal points stay, full stops go
])
def test_llava_normalise(text, want):
    assert P.llava_normalise(text) == want


@pytest.mark.parametrize("prediction, reference, want", [
    ("Yes", "yes", 1.0),
    ("No.", "yes", 0.0),
    ("normal", "no", 1.0),     # the substring flaw: "normal" contains "no"
    ("unknown", "no", 1.0),    # ... and so does "unknown"
    ("Yes, no evidence of effusion.", "yes", 1.0),  # both answers count as correct
    ("Yes, no evidence of effusion.", "no", 1.0),
    ("none", "no", 0.0),       # "none" is normalised to "0" first
    ("left", "left", 0.0),     # a closed answer without yes/no never scores
    ("yes, on the left", "left", 1.0),
])
def test_llava_med_closed(prediction, reference, want):
    assert score("llava_med", prediction, ex("closed", reference)) == want


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
    for name in ("llava_med", "llava_med_strict"):
        assert score(name, prediction, ex("open", reference)) == pytest.approx(want)


def test_llava_med_other_types_are_open_questions():
    # Multiple choice, counting, progression: recall of the reference words.
    assert score("llava_med", "B", ex("multiple_choice", "B", options=MC_OPTIONS)) == 1.0
    assert score("llava_med", "2 nodules", ex("counting", "2")) == 1.0   # 1 / (1 + 0)
    assert score("llava_med", "two", ex("counting", "2")) == 1.0          # two -> 2
    assert score("llava_med", "grown", ex("progression", "stable")) == 0.0


# ---------------------------------------------------------------------------------------------
# MedEvalKit.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Looking at the image ... \\boxed{B}", "b"),
    ("\\boxed{\\text{Yes}}", "\\text{yes}"),            # nested braces matched
    ("\\boxed{A} then \\boxed{C}", "c"),                # the last box
    ("<think>hmm</think><answer>No</answer>", "no"),
    ("<answer>left</answer> and <answer>upper</answer>", "left upper"),
    ("<answer>unclosed", "<answer>unclosed"),           # no complete pair: the whole text
    ("Answer: Yes", "yes"),
    ("The final answer is B", "b"),                     # "answer is" cuts, then nothing else
    ("The answer is: left", ": left"),                  # markers are tried in order
    ("  plain  ", "plain"),
])
def test_medevalkit_extraction(text, want):
    assert P.extract_answer(text) == want


@pytest.mark.parametrize("prediction, reference, want", [
    ("no", "no", 1.0),
    ("Yes.", "yes", 1.0),
    ("\\boxed{no}", "no", 1.0),
    ("Answer: No, it is not.", "no", 1.0),
    ("Yes, no evidence of effusion.", "yes", 0.0),   # exactly one of yes/no must appear
    ("Yes, no evidence of effusion.", "no", 0.0),
    ("normal", "no", 1.0),      # substrings, as MedEvalKit: "normal" holds "no"
    ("maybe", "yes", 0.0),
    ("yes", "no", 0.0),
])
def test_medevalkit_yes_no(prediction, reference, want):
    assert score("medevalkit", prediction, ex("closed", reference)) == want


@pytest.mark.parametrize("prediction, want_letter", [
    ("C", "C"),
    ("c. left upper zone", "C"),             # the letter before the first full stop
    ("left upper zone", "C"),                # an option's text
    ("Answer: D", "D"),
    ("\\boxed{B}", "B"),
    ("The answer is C.\n\nBecause ...", "C"),
    # No letter, no option text: the most similar option by difflib's ratio. "left upper"
    # matches 10 of the 15 + 10 characters of "left upper zone": 2 * 10 / 25 = 0.8, and only
    # 7 of "left lower zone" ("left " and "er"): 0.56.
    ("left upper", "C"),
])
def test_medevalkit_multiple_choice(prediction, want_letter):
    e = ex("multiple_choice", "C", "Which region contains a nodule?", MC_OPTIONS)
    parsed, s = P.get("medevalkit").evaluate(prediction, e)
    assert parsed == want_letter
    assert s == float(want_letter == "C")


def test_medevalkit_multiple_choice_reference_as_text_and_similarity():
    import difflib

    e = ex("multiple_choice", "left upper zone", "Where?", MC_OPTIONS)
    assert score("medevalkit", "C", e) == 1.0
    assert score("medevalkit", "B", e) == 0.0
    text = "the nodule is in the left upper lung"
    ratios = [difflib.SequenceMatcher(None, o, text).ratio() for o in MC_OPTIONS]
    assert P.choose_option(text, MC_OPTIONS) == ratios.index(max(ratios)) == 2


def test_medevalkit_open_is_exact_after_extraction():
    assert score("medevalkit", "Answer: Left", ex("open", "left")) == 1.0
    assert score("medevalkit", "left lung", ex("open", "left")) == 0.0
    assert score("medevalkit", "\\boxed{2}", ex("counting", "2")) == 1.0


def test_medevalkit_prompts():
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
        parsed, s = P.get(name).evaluate(" " + pred + " ", ex("report", ref))
        assert parsed == pred and s == pytest.approx(want)
    # By hand: LCS "the heart is enlarged pleural effusion" = 6 of 7 and 8 words.
    assert want == pytest.approx(2 * (6 / 7) * (6 / 8) / (6 / 7 + 6 / 8))


def test_registry_stamps_and_errors():
    assert set(P.PROTOCOLS) == {"exact", "medsynth", "llava_med", "llava_med_strict",
                                "medevalkit", "token_f1"}
    assert P.get("llava_med").stamp() == {"protocol": "llava_med", "version": "1"}
    assert P.get("llava_med_strict").tag == "llava_med_strict@1"
    with pytest.raises(ValueError, match="unknown protocol 'llava'.*llava_med, llava_med_strict"):
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
    # The traps table of docs/evaluation.md: llava_med, llava_med_strict, medevalkit, exact.
    ("normal", "no", (1, 0, 1, 0)),
    ("unknown", "no", (1, 0, 1, 0)),
    ("none", "no", (0, 0, 1, 0)),
    ("Yes, no evidence of effusion.", "yes", (1, 0, 0, 0)),
    ("Yes, no evidence of effusion.", "no", (1, 0, 0, 0)),
    ("not seen", "no", (1, 0, 1, 0)),
    ("\\boxed{no}", "no", (1, 1, 1, 0)),
])
def test_traps_table(prediction, reference, want):
    names = ("llava_med", "llava_med_strict", "medevalkit", "exact")
    assert tuple(score(n, prediction, ex("closed", reference)) for n in names) == want
