"""Runs the ORIGINAL scoring code of MedEvalKit and LLaVA-Med on records.jsonl (from
conformance_outputs.py) and writes each record with the original's verdict (and, for
MedEvalKit, the prompt the original builds) to scoring_conformance.jsonl.

    MEDEVALKIT=/path/to/MedEvalKit LLAVA_MED=/path/to/LLaVA-Med python conformance_verdicts.py

in a scratch directory (run_eval_batch.py writes correct_answers_file.json into it), with
mathruler==0.1.0 rouge==1.0.1 nltk sympy pyyaml tabulate pandas installed. Not collected by
pytest; kept to show how scoring_conformance.jsonl was made.

MedEvalKit: alibaba-damo-academy/MedEvalKit at 9b12e3b34232a8779cc1275417bf4f72f03d28e0,
    the datasets' own cal_metrics / construct_messages / construct_prompt, with mathruler 0.1.0,
    rouge 1.0.1, nltk. Modules the scoring never calls (torch, datasets, openai, google.genai,
    tenacity) are replaced by empty stand-ins so that the files import without a GPU or keys.
LLaVA-Med: microsoft/LLaVA-Med tag v1.0.0 (b9a98a736d2ef05bcf5ff345be6403fb3a664eaf),
    llava/eval/run_eval.py and run_eval_batch.py, their evaluate() with tabulate replaced by a
    function returning its rows (full float precision).
"""
import contextlib
import io
import json
import os
import sys
import types

os.environ["REASONING"] = "False"
os.environ["use_llm_judge"] = "False"
os.environ["api_key"] = "unused"


def stub(name, **attrs):
    m = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


class _Any:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _passthrough(*a, **k):
    return lambda f: f


stub("torch", no_grad=_Any)
stub("datasets", load_dataset=None, load_from_disk=None, concatenate_datasets=None)
g = stub("google")
g.genai = stub("google.genai", Client=_Any)
stub("openai", AzureOpenAI=_Any, OpenAI=_Any, AsyncAzureOpenAI=_Any, AsyncOpenAI=_Any)
stub("tenacity", retry=_passthrough, stop_after_attempt=lambda *a: None,
     wait_fixed=lambda *a: None)

MEK = os.environ["MEDEVALKIT"]
sys.path.insert(0, MEK)
pkg = types.ModuleType("utils")
pkg.__path__ = [os.path.join(MEK, "utils")]
sys.modules["utils"] = pkg

from utils.VQA_RAD.VQA_RAD import VQA_RAD  # noqa: E402
from utils.PATH_VQA.PATH_VQA import PATH_VQA  # noqa: E402
from utils.SLAKE.SLAKE import SLAKE  # noqa: E402
from utils.PMC_VQA.PMC_VQA import PMC_VQA  # noqa: E402
from utils.OmniMedVQA.OmniMedVQA import OmniMedVQA  # noqa: E402
from utils import question_formats as qf  # noqa: E402
from utils.MMMU import eval_val, eval_utils, data_utils  # noqa: E402


def quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **k)


def instance(cls):
    obj = cls.__new__(cls)
    obj.chunk_idx, obj.num_chunks, obj.samples = 0, 1, []
    obj.dataset_path = "unused"
    return obj


def verdict_of(cal, samples, index):
    try:
        _, out = quiet(cal, samples)
        return bool(out[index]["correct"])
    except Exception as e:  # the original crashes on this record
        return f"error: {type(e).__name__}: {e}"


def medevalkit(rec):
    d = rec["dataset"]
    if d in ("vqa_rad", "pathvqa"):
        cls = VQA_RAD if d == "vqa_rad" else PATH_VQA
        ds = instance(cls)
        built = ds.construct_messages({"question": rec["question"], "image": None,
                                       "answer": rec["answer"]})
        prompt = built["messages"]["prompt"]
        pads = [{"response": "yes", "answer": "yes", "question": "q"},
                {"response": "lung", "answer": "lung", "question": "q"}]
        sample = {"response": rec["response"], "answer": rec["answer"],
                  "question": rec["question"]}
        return prompt, verdict_of(ds.cal_metrics, pads + [sample], 2)
    if d == "slake":
        ds = instance(SLAKE)
        # SLAKE.load_data's rule: OPEN -> open-ended prompt, else close-ended, in the language.
        make = qf.get_open_ended_prompt if rec["answer_type"] == "OPEN" else \
            qf.get_close_ended_prompt
        prompt = make(rec["question"], False, rec["lang"])
        pads = [{"response": "Yes", "answer": "Yes", "question": "q", "lang": "en",
                 "answer_type": "CLOSED"},
                {"response": "lung", "answer": "Lung", "question": "q", "lang": "en",
                 "answer_type": "OPEN"}]
        sample = {"response": rec["response"], "answer": rec["answer"],
                  "question": rec["question"], "lang": rec["lang"],
                  "answer_type": rec["answer_type"]}
        return prompt, verdict_of(ds.cal_metrics, pads + [sample], 2)
    if d == "pmc_vqa":
        ds = instance(PMC_VQA)
        prompt = qf.get_multiple_choice_prompt(rec["question"], rec["choices"], False)
        sample = {"response": rec["response"], "choices": rec["choices"],
                  "answer": rec["answer"]}
        return prompt, verdict_of(ds.cal_metrics, [sample], 0)
    if d == "omnimedvqa":
        ds = instance(OmniMedVQA)
        raw = {"question": rec["question"], "gt_answer": rec["gt_answer"], "image_path": "x.png",
               "question_type": rec["question_type"], "modality_type": rec["modality_type"]}
        for letter, o in zip("ABCD", rec["options"]):
            raw[f"option_{letter}"] = o
        built = ds.construct_messages(raw)
        prompt = built["messages"]["prompt"]
        sample = {**built, "response": rec["response"]}
        del sample["messages"]
        return prompt, verdict_of(ds.cal_metrics, [sample], 0)
    if d == "mmmu_med":
        data = {"id": rec["id"], "question": rec["question"], "options": repr(rec["options"]),
                "answer": rec["answer"], "image_1": None, "question_type": rec["question_type"]}
        sample = data_utils.construct_prompt(data_utils.process_single_sample(data))
        prompt = sample["final_input_prompt"]

        class Model:
            def generate_outputs(self, messages):
                return [rec["response"]]

        picked = []

        class Rng:  # parse_multi_choice_response's random fallback, made visible
            @staticmethod
            def choice(seq):
                picked.append(list(seq))
                return "<random>"

        eval_utils.random = Rng
        try:
            out = quiet(eval_val.run_model, [sample], Model())
            judge, _ = eval_utils.evaluate(out)
            v = judge[rec["id"]] == "Correct"
        except Exception as e:
            v = f"error: {type(e).__name__}: {e}"
        if picked:
            v = "random"
        return prompt, v
    raise ValueError(d)


LLAVA = os.path.join(os.environ["LLAVA_MED"], "llava", "eval")
sys.path.insert(0, LLAVA)
import run_eval  # noqa: E402
import run_eval_batch  # noqa: E402

run_eval.tabulate = lambda rows, headers=None: {k: v for k, v in rows}
run_eval_batch.tabulate = lambda rows, headers=None: {k: v for k, v in rows}
_CAND = {"0": ["lung"]}


def llava(rec):
    item = {"id": 1, "answer_type": rec["answer_type"],
            "conversations": [{"value": rec["question"]}, {"value": rec["answer"]}]}
    pred = {"question_id": 1, "text": rec["response"]}
    open_pad = ({"id": 0, "answer_type": "OPEN",
                 "conversations": [{"value": "q"}, {"value": "lung"}]},
                {"question_id": 0, "text": "lung"})
    closed_pad = ({"id": 2, "answer_type": "CLOSED",
                   "conversations": [{"value": "q"}, {"value": "yes"}]},
                  {"question_id": 2, "text": "yes"})
    out = {}
    if rec["answer_type"] == "CLOSED":
        rows = quiet(run_eval.evaluate, [open_pad[0], item], [open_pad[1], pred], _CAND)
        out["run_eval"] = rows["yes/no accuracy"] / 100
        # Batch: one padded closed record that always hits; the mean is (1 + hit) / 2.
        rows = quiet(run_eval_batch.evaluate, [open_pad[0], closed_pad[0], item],
                     [open_pad[1], closed_pad[1], pred], _CAND)
        out["run_eval_batch"] = 2 * rows["yes/no accuracy"] / 100 - 1
    else:
        rows = quiet(run_eval.evaluate, [item], [pred], _CAND)
        out["run_eval"] = rows["recall"] / 100
        rows_b = quiet(run_eval_batch.evaluate, [closed_pad[0], item], [closed_pad[1], pred],
                       _CAND)
        out["run_eval_batch"] = rows_b["recall"] / 100
        out["run_eval_batch_open_hit"] = rows_b["open accuracy"] / 100
    return out


def main():
    out = []
    with open("records.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec["dataset"] == "llava_med":
                rec["verdict"] = llava(rec)
            else:
                rec["prompt"], rec["verdict"] = medevalkit(rec)
            out.append(rec)
    with open("scoring_conformance.jsonl", "w") as f:
        for rec in out:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    from collections import Counter
    c = Counter((r["dataset"], str(r["verdict"])[:40]) for r in out if r["dataset"] != "llava_med")
    for k, v in sorted(c.items()):
        print(k, v)


if __name__ == "__main__":
    main()
