"""The evaluation harness and its sanity baselines.

Most tests drive the harness with a scripted model (answers chosen from what it is shown), so
every expected score is worked out by hand; one test runs a tiny randomly initialised VLM
through the real KV-cache sampler.
"""
import dataclasses

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.evaluate import baselines as B
from medvl_jax.evaluate import harness
from medvl_jax.evaluate import protocols as P
from medvl_jax.evaluate import report_metrics
from medvl_jax.tasks.sft import SFTTask

# ---------------------------------------------------------------------------------------------
# Baselines.
# ---------------------------------------------------------------------------------------------


def _checker(n=16):
    return (np.indices((n, n)).sum(0) % 2).astype(np.float32)


def _example(i, qtype, answer, question="Is there a nodule?", images=None, **meta):
    return {"id": f"s{i}", "images": [_checker()] if images is None else images,
            "messages": [{"role": "user", "content": "<image>\n" + question},
                         {"role": "assistant", "content": answer}],
            "meta": {"question_type": qtype, "answer": answer, "options": [], **meta}}


def test_baseline_names():
    assert B.parse_list("no_image, blur,noise") == ["no_image", "blur", "noise"]
    assert B.parse_list("off") == [] and B.parse_list("") == []
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['none'\].*no_image, blank, "
                                         r"blur, noise"):
        B.parse_list("none,blur")


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    img = rng.random((20, 24)).astype(np.float32)
    # scipy's "reflect" is numpy's "symmetric"; truncate 3 sigma gives the same radius (6).
    want = ndimage.gaussian_filter(img.astype(np.float64), 2.0, mode="reflect", truncate=3.0)
    np.testing.assert_allclose(B.gaussian_blur(img, 2.0, (0, 1)), want, atol=1e-6)
    vol = rng.random((6, 8, 10, 3)).astype(np.float32)   # an RGB volume: blur z, y, x only
    want = ndimage.gaussian_filter(vol.astype(np.float64), (1.0, 1.0, 1.0, 0.0), mode="reflect",
                                   truncate=3.0)
    np.testing.assert_allclose(B.gaussian_blur(vol, 1.0, (0, 1, 2)), want, atol=1e-6)


def test_conditions_transform_examples():
    cfg = pipeline.default_config()
    ex = _example(0, "closed", "yes", images=[_checker(), (_checker() * 255).astype(np.uint8)])
    ex["messages"][0]["content"] = "Prior study: <image>\nCurrent study: <image>\nChanged?"
    assert B.apply(ex, "real", cfg) is ex
    text_only = B.apply(ex, "no_image", cfg)
    assert text_only["images"] == []
    assert text_only["messages"][0]["content"] == "Prior study: Current study: Changed?"
    assert ex["messages"][0]["content"].count("<image>") == 2   # the original is untouched
    blank = B.apply(ex, "blank", cfg)
    assert [x.shape for x in blank["images"]] == [(16, 16)] * 2
    assert all(not x.any() for x in blank["images"])
    blur = B.apply(ex, "blur", cfg)
    # sigma = 0.08 * 16 = 1.28 px: a checkerboard blurs to a flat grey.
    assert np.allclose(blur["images"][0], 0.5, atol=0.05)
    np.testing.assert_allclose(blur["images"][0], blur["images"][1], atol=1e-6)  # uint8 scaled
    noise = B.apply(ex, "noise", cfg)
    again = B.apply(ex, "noise", cfg)
    for a, b in zip(noise["images"], again["images"]):
        np.testing.assert_array_equal(a, b)                    # deterministic
    assert not np.array_equal(noise["images"][0], noise["images"][1])  # seeded per image
    assert all(x.min() >= 0 and x.max() <= 1 for x in noise["images"])
    # Noise of std 0.5 around 0/1 pixels, clipped: about half the pixels move.
    assert 0.3 < np.mean(noise["images"][0] != ex["images"][0]) <= 1.0
    assert B.seed("s0", 0) == B.seed("s0", 0) != B.seed("s1", 0)


# ---------------------------------------------------------------------------------------------
# The harness with a scripted model.
# ---------------------------------------------------------------------------------------------


class ScriptedPolicy:
    """Answers from what it sees: the reference if shown the real (checkerboard) image, "no"
    without an image, "normal" for a black image, "yes" for any other image; wrapped in
    \\boxed{} when the prompt carries an instruction ("Please ...")."""

    name = "sft"
    outputs = frozenset({"text"})

    def __init__(self, batch_size=4, max_new_tokens=5):
        self.config = ml_collections.ConfigDict({"data": pipeline.default_config().to_dict()})
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.calls = []

    def generate_texts(self, params, examples, *, batch_size, max_new_tokens):
        self.calls.append((len(examples), batch_size, max_new_tokens))
        return [self._answer(ex) for ex in examples]

    @staticmethod
    def _answer(ex):
        assert ex["messages"][-1]["role"] == "user"   # the reference is never shown
        if not ex["images"]:
            text = "no"
        else:
            x = np.asarray(ex["images"][0], np.float32)
            if not x.any():
                text = "normal"
            elif set(np.unique(x)) == {0.0, 1.0}:
                text = ex["meta"]["answer"]
            else:
                text = "yes"
        return f"\\boxed{{{text}}}" if "Please" in ex["messages"][-1]["content"] else text


def _scripted(policy, examples, protocols, **kw):
    """The harness run with a scripted policy's batch size and token budget."""
    return harness.evaluate(policy, {}, examples, protocols, batch_size=policy.batch_size,
                            max_new_tokens=policy.max_new_tokens,
                            data_config=policy.config.data, **kw)


QA = [_example(0, "closed", "yes"), _example(1, "closed", "no"), _example(2, "closed", "no"),
      _example(3, "closed", "yes"), _example(4, "open", "left", "Which side?"),
      _example(5, "open", "right upper zone", "Where is the nodule?")]
NAMES = ["exact", "llava_med", "llava_med_strict", "medevalkit"]


@pytest.fixture(scope="module")
def scripted():
    policy = ScriptedPolicy()
    results = _scripted(policy, QA, [P.get(n) for n in NAMES],
                               baselines=["no_image", "blank", "blur"], benchmark="toy",
                               split="test")
    return policy, results


def test_scores_per_protocol_and_condition(scripted):
    _, res = scripted
    assert res["conditions"] == ["real", "no_image", "blank", "blur"]
    assert res["num_examples"] == 6

    def table(name, cond):
        t = res["protocols"][name]["conditions"][cond]
        return (t["per_type"]["closed"]["score"], t["per_type"]["open"]["score"], t["overall"])

    for name in NAMES:   # the real images: every answer is the reference
        assert table(name, "real") == (1.0, 1.0, 1.0)
    # No image -> "no": right on the two "no" questions, zero recall on open ones.
    assert table("llava_med", "no_image") == (0.5, 0.0, 2 / 6)
    assert table("exact", "no_image") == (0.5, 0.0, 2 / 6)
    # Black image -> "normal": LLaVA-Med's substring rule takes it for "no"; strict does not.
    assert table("llava_med", "blank") == (0.5, 0.0, 2 / 6)
    assert table("llava_med_strict", "blank") == (0.0, 0.0, 0.0)
    assert table("exact", "blank") == (0.0, 0.0, 0.0)
    assert table("medevalkit", "blank") == (0.5, 0.0, 2 / 6)   # "\boxed{normal}" holds "no"
    # Blurred image -> "yes" (boxed for MedEvalKit's prompts, extracted again).
    for name in NAMES:
        assert table(name, "blur") == (0.5, 0.0, 2 / 6)
    for name in NAMES:
        entry = res["protocols"][name]
        assert (entry["protocol"], entry["version"]) == (name, P.get(name).version)
        assert entry["conditions"]["real"]["per_type"]["closed"]["n"] == 4
        assert entry["conditions"]["real"]["num_questions"] == 6


def test_prediction_rows(scripted):
    _, res = scripted
    rows = res["predictions"]["medevalkit"]["no_image"]
    assert [r["id"] for r in rows] == [ex["id"] for ex in QA]
    assert rows[0] == {"id": "s0", "type": "closed", "prediction": "\\boxed{no}", "parsed": "no",
                       "answer": "yes", "score": 0.0, "protocol": "medevalkit", "version": "2",
                       "condition": "no_image"}
    assert res["predictions"]["llava_med"]["real"][4]["prediction"] == "left"


def test_generations_are_shared_between_protocols(scripted):
    policy, _ = scripted
    # Two prompt formats (no instruction: exact, llava_med, llava_med_strict; MedEvalKit's) x
    # four conditions x two batches of at most 4 (6 examples), each padded to 4 rows.
    assert len(policy.calls) == 2 * 4 * 2
    assert sorted(set(policy.calls)) == [(2, 4, 5), (4, 4, 5)]


def test_deterministic(scripted):
    _, res = scripted
    again = _scripted(ScriptedPolicy(), QA, [P.get(n) for n in NAMES],
                             baselines=["no_image", "blank", "blur"], benchmark="toy",
                             split="test")
    assert again == res


def test_tables_and_chart(scripted, tmp_path):
    _, res = scripted
    text = harness.format_tables(res)
    assert "toy test, 6 questions; protocol llava_med_strict (version 2)" in text
    assert "question type" in text and "no_image" in text
    block = text.split("protocol llava_med_strict (version 2)")[1]
    line = next(row for row in block.splitlines() if row.startswith("closed"))
    assert line.split() == ["closed", "4", "100.0%", "50.0%", "0.0%", "50.0%"]
    path = tmp_path / "chart.png"
    harness.plot(res, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_reports_get_corpus_metrics_and_their_own_budget():
    ref0 = ("FINDINGS: There is a 17 mm nodule in the right upper zone. No pleural effusion. "
            "Heart size is normal.\nIMPRESSION: 17 mm nodule in the right upper zone.")
    ref1 = ("FINDINGS: The lungs are clear. Small left pleural effusion. The heart is enlarged."
            "\nIMPRESSION: 1. Left pleural effusion. 2. Cardiomegaly.")
    reports = [_example(i, "report", r, "Write the radiology report.", findings="{}")
               for i, r in enumerate([ref0, ref1])]
    policy = ScriptedPolicy(batch_size=2)
    exact = P.get("exact")
    res = _scripted(policy, reports + QA[:1], [exact], baselines=["no_image"])
    assert sorted(set(policy.calls)) == [(1, 2, 5), (2, 2, exact.decoding.report_max_new_tokens)]
    real = res["protocols"]["exact"]["conditions"]["real"]["report_metrics"]
    assert real["sacrebleu_bleu4"] == pytest.approx(1.0)
    assert real["rouge_score_rouge_l"] == pytest.approx(1.0)
    assert real["clinical_f1"] == 1.0
    # Without the image the scripted model writes "no": no finding stated. TP 0, FN 3
    # (nodule; effusion, cardiomegaly) -> recall 0, F1 0.
    blind = res["protocols"]["exact"]["conditions"]["no_image"]["report_metrics"]
    assert blind["clinical_recall"] == 0.0 and blind["clinical_f1"] == 0.0
    # ROUGE-L: "no" is 1 of the 28 words of the first report (F = 2/29), absent from the
    # second.
    assert blind["rouge_score_rouge_l"] == pytest.approx((2 / 29 + 0) / 2)
    # The per-example report score is ROUGE-L; the table's "report" row averages it.
    assert res["protocols"]["exact"]["conditions"]["real"]["per_type"]["report"] == \
        {"score": pytest.approx(1.0), "n": 2}
    assert report_metrics.medsynth_findings(ref1) == {"effusion:left", "cardiomegaly"}


def test_errors():
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; known benchmarks: "
                                         "medsynth, medsynth_report"):
        harness.check_benchmark("nope")
    with pytest.raises(ValueError, match="no examples to evaluate"):
        _scripted(ScriptedPolicy(), [], [P.get("exact")])
    with pytest.raises(ValueError, match="unknown condition 'none'"):
        _scripted(ScriptedPolicy(), QA, [P.get("exact")], baselines=["none"])

    class Contrastive:
        name = "contrastive"
        outputs = frozenset({"image_embeddings"})
    with pytest.raises(ValueError, match="'contrastive' does not generate text"):
        harness.evaluate(Contrastive(), {}, QA, [P.get("exact")], batch_size=4,
                         max_new_tokens=5, data_config=None)


def test_unreadable_images_are_skipped_and_counted_with_skip_bad_examples(tmp_path, capsys):
    bad = {**_example(9, "closed", "yes"), "images": [str(tmp_path / "gone.png")]}
    bad["meta"] = {**bad["meta"], "where": "qa.jsonl:10"}
    policy = ScriptedPolicy()
    assert harness._readable([bad], policy.config.data) == ([bad], 0)  # Not asked to skip.
    policy.config.data.skip_bad_examples = True
    policy.config.data.max_skip_fraction = 1.0
    res = _scripted(policy, QA + [bad], [P.get("exact")])
    assert res["num_examples"] == len(QA) and res["skipped_examples"] == 1
    assert [r["id"] for r in res["predictions"]["exact"]["real"]] == [e["id"] for e in QA]
    assert "qa.jsonl:10" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real (tiny, untrained) VLM through the KV-cache sampler.
# ---------------------------------------------------------------------------------------------


def test_real_model_and_medsynth_benchmarks():
    overrides = [("model.text.num_layers", 1), ("model.vision.depth", 1)]
    config = config_lib.load_config("configs/medsynth_sft.py:smoke", overrides)
    task = SFTTask(config, pipeline.make_tokenizer(config.tokenizer))
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0), task.dummy_batch(1)))

    qa = harness.load_examples("medsynth", config, "test", limit=3, studies=1)
    reports = harness.load_examples("medsynth_report", config, "test", studies=1)
    assert [ex["meta"]["benchmark"] for ex in qa] == ["medsynth"] * 3
    assert len(reports) == 3   # one study of each MedSynth source (cxr, cxr_closed, pairs)
    for ex in reports:
        assert ex["meta"]["question_type"] == "report" and ex["id"].endswith("/report")
        assert ex["messages"][-1]["content"] == ex["meta"]["answer"]
        assert report_metrics.medsynth_findings(ex["meta"]["answer"]) == \
            report_metrics.findings_labels(ex["meta"]["findings"])

    examples = qa + reports
    exact = dataclasses.replace(P.get("exact"), decoding=P.Decoding(report_max_new_tokens=6))
    mp = task.model_params(params)
    res = harness.evaluate(task, mp, examples, [exact], baselines=["no_image"], batch_size=4,
                           max_new_tokens=6, data_config=config.data)
    direct = (task.generate_texts(mp, examples[:4], batch_size=4, max_new_tokens=6)
              + task.generate_texts(mp, examples[4:], batch_size=4, max_new_tokens=6))
    assert [r["prediction"] for r in res["predictions"]["exact"]["real"]] == direct
    # Without images: the same questions with their placeholders removed, no pixels.
    text_only = []
    for ex in examples:
        content = ex["messages"][0]["content"].replace("<image>\n", "").replace("<image>", "")
        text_only.append({**ex, "images": [],
                          "messages": [{"role": "user", "content": content}]})
    blind = (task.generate_texts(mp, text_only[:4], batch_size=4, max_new_tokens=6)
             + task.generate_texts(mp, text_only[4:], batch_size=4, max_new_tokens=6))
    assert [r["prediction"] for r in res["predictions"]["exact"]["no_image"]] == blind
    metrics = res["protocols"]["exact"]["conditions"]["real"]["report_metrics"]
    assert {"sacrebleu_bleu4", "rouge_score_rouge_l", "cider_plain", "clinical_f1"} <= set(metrics)


# ---------------------------------------------------------------------------------------------
# Resumable and sharded generation.
# ---------------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for the process being killed."""


class KilledPolicy(ScriptedPolicy):
    """Dies (as a killed process would) when asked for its ``after``-th batch."""

    def __init__(self, after, **kw):
        super().__init__(**kw)
        self.after = after

    def generate_texts(self, params, examples, **kw):
        if len(self.calls) == self.after:
            raise Killed("killed")
        return super().generate_texts(params, examples, **kw)


def _rows(res):
    return {n: {c: [(r["id"], r["prediction"], r["score"]) for r in rows]
                for c, rows in per.items()} for n, per in res["predictions"].items()}


def test_killed_evaluation_continues_without_recomputing(tmp_path):
    from medvl_jax.evaluate.generation_store import GenerationStore

    protocols = [P.get("exact"), P.get("medevalkit")]
    kw = dict(baselines=["no_image"])
    want = _scripted(ScriptedPolicy(batch_size=2), QA, protocols, **kw)
    total = want["generations"]["total"]
    assert want["generations"] == {"total": total, "cached": 0, "generated": total}
    identity = {"checkpoint": "/ckpt", "step": 7}
    path = str(tmp_path / "generations.jsonl")
    killed = KilledPolicy(after=3, batch_size=2)
    with pytest.raises(Killed):
        _scripted(killed, QA, protocols, store=GenerationStore(path, identity), **kw)
    with open(path, "a") as f:
        f.write('{"key": "cut off by the kil')     # a write the kill interrupted
    again = ScriptedPolicy(batch_size=2)
    got = _scripted(again, QA, protocols, store=GenerationStore(path, identity), **kw)
    assert got["generations"] == {"total": total, "cached": 6, "generated": total - 6}
    assert sum(n for n, _, _ in again.calls) == total - 6    # only what was missing
    assert _rows(got) == _rows(want)
    third = ScriptedPolicy(batch_size=2)
    assert _rows(_scripted(third, QA, protocols, store=GenerationStore(path, identity),
                           **kw)) == _rows(want)
    assert third.calls == []
    with pytest.raises(ValueError, match="step=7, this evaluation has step=8"):
        GenerationStore(path, {"checkpoint": "/ckpt", "step": 8})


def test_shards_add_up_to_the_whole_evaluation(tmp_path):
    from medvl_jax.evaluate.generation_store import GenerationStore

    protocols = [P.get("exact"), P.get("medevalkit")]
    want = _scripted(ScriptedPolicy(batch_size=2), QA, protocols)
    identity = {"checkpoint": "/ckpt", "step": 1}
    files = [str(tmp_path / f"gen.shard{k}of3.jsonl") for k in range(3)]
    counts = []
    for k in range(3):
        res = _scripted(ScriptedPolicy(batch_size=2), QA, protocols, shard=(k, 3),
                        store=GenerationStore(files[k], identity))
        assert res["shard"] == [k, 3] and "protocols" not in res
        counts.append(res["generated"])
    assert sum(counts) == want["generations"]["total"] and max(counts) - min(counts) <= 1
    final = ScriptedPolicy(batch_size=2)
    got = _scripted(final, QA, protocols,
                    store=GenerationStore(str(tmp_path / "gen.jsonl"), identity, files))
    assert final.calls == [] and _rows(got) == _rows(want)
