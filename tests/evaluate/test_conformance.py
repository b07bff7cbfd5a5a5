"""Conformance of ``medevalkit``, ``llava_med`` and ``llava_med_batch`` with the original scoring
code, record for record.

``data/scoring_conformance.jsonl`` holds 830 realistic model outputs (written by
``data/conformance_outputs.py``) for questions of VQA-RAD, SLAKE (English and Chinese),
PathVQA, PMC-VQA, OmniMedVQA, MMMU (medical) and LLaVA-Med's closed/open split, each with the
verdict the ORIGINAL code gives it. The verdicts were produced by ``data/conformance_verdicts.py``,
which imports and runs, unmodified:

* MedEvalKit, github.com/alibaba-damo-academy/MedEvalKit at commit
  9b12e3b34232a8779cc1275417bf4f72f03d28e0: each dataset's ``cal_metrics`` (VQA_RAD, PATH_VQA,
  SLAKE, PMC_VQA, OmniMedVQA) and MMMU's ``eval_val.run_model`` + ``eval_utils.evaluate``, with
  mathruler 0.1.0 and rouge 1.0.1; the prompts from the datasets' own ``construct_messages`` /
  ``construct_prompt`` / ``question_formats``. Verdicts: true/false; ``"error: ..."`` where the
  original raises on the record (its open-question metrics refuse an empty answer); ``"random"``
  where MMMU's parser draws a random option (its ``random.choice`` was replaced by a recorder).
* LLaVA-Med, github.com/microsoft/LLaVA-Med tag v1.0.0 (commit
  b9a98a736d2ef05bcf5ff345be6403fb3a664eaf): ``llava/eval/run_eval.py`` and
  ``run_eval_batch.py``'s ``evaluate`` (their ``tabulate`` replaced by a function returning the
  rows, for full precision): the closed accuracy and open recall of each record, and the
  batch script's "open accuracy".

Here the same records go through our protocols as examples shaped like our benchmark readers'.
"""
import json
import os
from collections import Counter

import pytest

from medvl_jax.evaluate import llava_med
from medvl_jax.evaluate import protocols as P

DATA = os.path.join(os.path.dirname(__file__), "data", "scoring_conformance.jsonl")


def _records():
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


RECORDS = _records()


def _example(rec: dict) -> dict:
    """An example as medvl_jax.data.benchmarks' readers give it for this record."""
    d = rec["dataset"]
    meta = {"benchmark": d, "answer": rec.get("answer"), "question": rec["question"],
            "options": []}
    if d in ("vqa_rad", "pathvqa"):  # Hugging Face layouts: split by the answer.
        meta["question_type"] = "closed" if rec["answer"].lower() in ("yes", "no") else "open"
    elif d in ("slake", "llava_med"):
        meta.update(question_type=rec["answer_type"].lower(), answer_type=rec["answer_type"],
                    q_lang=rec.get("lang", "en"))
    elif d == "pmc_vqa":
        meta.update(question_type="multiple_choice", choices=rec["choices"],
                    options=[c.split(":", 1)[1].strip() for c in rec["choices"]])
    elif d == "omnimedvqa":
        letter = "ABCD"[rec["options"].index(rec["gt_answer"])]
        meta.update(question_type="multiple_choice", answer=letter, options=rec["options"],
                    answer_text=rec["gt_answer"])
    elif d == "mmmu_med":
        mc = rec["question_type"] == "multiple-choice"
        meta.update(question_type="multiple_choice" if mc else "open", options=rec["options"])
    return {"id": rec["id"], "images": ["x.png"],
            "messages": [{"role": "user", "content": "<image>\n" + rec["question"]},
                         {"role": "assistant", "content": str(meta["answer"])}],
            "meta": meta}


def test_the_suite_is_what_it_says():
    counts = Counter(r["dataset"] for r in RECORDS)
    assert len(RECORDS) >= 300
    assert set(counts) == {"vqa_rad", "slake", "pathvqa", "pmc_vqa", "omnimedvqa", "mmmu_med",
                           "llava_med"}
    assert min(counts.values()) >= 60
    verdicts = Counter(str(r["verdict"])[:6] for r in RECORDS if r["dataset"] != "llava_med")
    assert verdicts["True"] > 100 and verdicts["False"] > 100
    assert verdicts["error:"] > 0 and verdicts["random"] > 0
    assert sum(r.get("lang") == "zh" for r in RECORDS) >= 40


MEDEVALKIT = [r for r in RECORDS if r["dataset"] != "llava_med"]


@pytest.mark.parametrize("dataset", ["vqa_rad", "slake", "pathvqa", "pmc_vqa", "omnimedvqa",
                                     "mmmu_med"])
def test_medevalkit_gives_the_original_verdicts(dataset):
    protocol = P.get("medevalkit")
    wrong = []
    for rec in (r for r in MEDEVALKIT if r["dataset"] == dataset):
        example = _example(rec)
        _, got = protocol.evaluate(rec["response"], example)
        v = rec["verdict"]
        if v == "random":  # The original draws one option: its expected score.
            want = 1.0 / len(rec["options"])
        elif isinstance(v, str):  # The original raises here; an unanswerable record is 0.
            want = 0.0
        else:
            want = float(v)
        if got != pytest.approx(want):
            wrong.append((rec["id"], rec["response"], rec["answer"] if "answer" in rec
                          else rec.get("gt_answer"), v, got))
    assert not wrong, f"{len(wrong)} verdicts differ from MedEvalKit's: {wrong[:5]}"


@pytest.mark.parametrize("dataset", ["vqa_rad", "slake", "pathvqa", "pmc_vqa", "omnimedvqa",
                                     "mmmu_med"])
def test_medevalkit_prompts_are_the_originals(dataset):
    for name in ("medevalkit", "medevalkit_strict"):
        protocol = P.get(name)
        for rec in (r for r in MEDEVALKIT if r["dataset"] == dataset):
            content = protocol.prompt(_example(rec))["messages"][-1]["content"]
            assert content == "<image>\n" + rec["prompt"], rec["id"]


def test_medevalkit_tables_split_as_the_original():
    # VQA-RAD and PathVQA count a question as closed when its reference is yes/no; SLAKE by
    # answer_type; the multiple-choice sets in one table.
    protocol = P.get("medevalkit")
    for rec in MEDEVALKIT:
        group = protocol.category(_example(rec))
        d = rec["dataset"]
        if d in ("vqa_rad", "pathvqa"):
            assert group == ("closed" if rec["answer"] in ("yes", "no") else "open")
        elif d == "slake":
            assert group == rec["answer_type"].lower()
        elif d == "mmmu_med" and rec["question_type"] == "open":
            assert group == "open"
        else:
            assert group == "multiple_choice"


def test_medevalkit_strict_repairs_what_it_says():
    strict, faithful = P.get("medevalkit_strict"), P.get("medevalkit")
    changed = 0
    for rec in MEDEVALKIT:
        e = _example(rec)
        s = strict.evaluate(rec["response"], e)[1]
        assert 0.0 <= s <= 1.0
        changed += s != faithful.evaluate(rec["response"], e)[1]
    assert changed > 50
    by_id = {r["id"]: r for r in MEDEVALKIT}

    def strict_score(response, like):
        return strict.evaluate(response, _example(by_id[like]))[1]
    slake_yes = next(r["id"] for r in MEDEVALKIT if r["dataset"] == "slake"
                     and r["answer"] == "Yes")
    assert strict_score("Yes, there is.", slake_yes) == 1.0
    assert strict_score(" yes", slake_yes) == 1.0
    assert strict_score("normal", slake_yes) == 0.0
    mmmu_open = next(r["id"] for r in MEDEVALKIT if r["dataset"] == "mmmu_med"
                     and r["answer"] == "75")
    assert strict_score("The heart rate is 75 bpm.", mmmu_open) == 1.0
    assert strict_score("The heart rate is 80.", mmmu_open) == 0.0


LLAVA = [r for r in RECORDS if r["dataset"] == "llava_med"]


def test_llava_med_gives_the_original_verdicts():
    wrong = []
    for rec in LLAVA:
        e = _example(rec)
        v = rec["verdict"]
        got = {"run_eval": P.get("llava_med").evaluate(rec["response"], e)[1],
               "run_eval_batch": P.get("llava_med_batch").evaluate(rec["response"], e)[1]}
        if "run_eval_batch_open_hit" in v:
            got["run_eval_batch_open_hit"] = llava_med.open_hit(rec["response"], rec["answer"])
        for key, want in v.items():
            if got[key] != pytest.approx(want, abs=1e-12):
                wrong.append((rec["id"], key, rec["response"][:60], rec["answer"], want,
                               got[key]))
    assert not wrong, f"{len(wrong)} verdicts differ from LLaVA-Med's: {wrong[:5]}"
    closed = [r for r in LLAVA if r["answer_type"] == "CLOSED"]
    # The two scripts disagree on a good share of closed records: why both protocols exist.
    assert sum(r["verdict"]["run_eval"] != r["verdict"]["run_eval_batch"] for r in closed) >= 5
