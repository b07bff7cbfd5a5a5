"""DPO: preference pairs from MedSynth, the task's loss against an independent computation,
and a smoke run of configs/medsynth_dpo.py from an SFT checkpoint."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.convert import checkpoint_io
from medvl_jax.data import medsynth, pipeline, preferences
from medvl_jax.evaluate import scoring
from medvl_jax.tasks import dpo, policy, rl_losses
from medvl_jax.tasks.sft import SFTTask
from medvl_jax.train import cli, restore, run

RUN = ["--config.train.progress=False"]


@pytest.fixture(scope="module")
def records():
    src = medsynth.MedSynthSource(medsynth.MedSynthConfig(kind="cxr", split="train",
                                                          num_studies=24, image_size=64))
    return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A MedSynth SFT model (random weights) written as a checkpoint directory, the layout a
    training workdir is exported to."""
    config = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    tok = pipeline.make_tokenizer(config.tokenizer)
    task = SFTTask(config, tok)
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0), task.dummy_batch(1)))
    out = str(tmp_path_factory.mktemp("sft") / "ckpt")
    checkpoint_io.save_checkpoint(out, params, {
        "family": checkpoint_io.NATIVE_VLM,
        "model_config": checkpoint_io.config_to_dict(task.model_config)})
    tok.save_pretrained(os.path.join(out, checkpoint_io.TOKENIZER_DIR))
    return out


def test_wrong_answers_are_valid_and_wrong(records):
    rng = np.random.default_rng(0)
    seen = set()
    for rec in records:
        for qa in rec["qa"]:
            bad = preferences.wrong_answer(qa, rng)
            assert bad is not None, qa
            assert scoring.score(qa["type"], bad, qa["answer"]) == 0.0, (qa, bad)
            if qa["type"] == "multiple_choice":
                assert bad in "ABCD"[:len(qa["options"])]
            seen.add(qa["type"])
    assert {"closed", "multiple_choice", "counting", "size", "box", "open"} <= seen


def test_pairs(records):
    rng = np.random.default_rng(1)
    kinds = set()
    for rec in records:
        p = preferences.make_pair(rec, rng, visual_fraction=0.5,
                                  weights={"text": 1.0, "visual": 2.0})
        kinds.add(p["meta"]["pair_kind"])
        clean, other = p["images_chosen"][0], p["images_rejected"][0]
        if p["meta"]["pair_kind"] == "visual":
            assert p["chosen"] == p["rejected"] == p["meta"]["answer"]
            assert p["meta"]["weight"] == 2.0
            boxes = [n["box"] for n in json.loads(rec["findings"])["nodules"]]
            changed = np.argwhere(clean != other)
            assert len(changed) > 0
            h, w = clean.shape
            inside = np.zeros(clean.shape, bool)
            for x0, y0, x1, y1 in boxes:  # Only the nodule boxes (plus a 2% margin) change.
                inside[int((y0 / 100 - .02) * h):int(np.ceil((y1 / 100 + .02) * h)),
                       int((x0 / 100 - .02) * w):int(np.ceil((x1 / 100 + .02) * w))] = True
            assert inside[tuple(changed.T)].all()
        else:
            assert p["chosen"] == p["meta"]["answer"] != p["rejected"]
            np.testing.assert_array_equal(clean, other)
    assert kinds == {"text", "visual"}


def test_mistake_pairs_are_the_wrong_predictions(records):
    from medvl_jax.data import sources

    examples = [ex for rec in records[:6] for ex in sources.medsynth_questions(rec)]
    rng = np.random.default_rng(3)
    predictions, wrong = [], {}
    for i, ex in enumerate(examples):  # Every other question answered wrong, by hand.
        qa = {"type": ex["meta"]["question_type"], "answer": ex["meta"]["answer"],
              "options": ex["meta"]["options"], "template": ex["meta"]["template"]}
        text = preferences.wrong_answer(qa, rng) if i % 2 else ex["meta"]["answer"]
        s = scoring.score(qa["type"], text, qa["answer"])
        predictions.append({"id": ex["id"], "prediction": text, "score": s})
        if s < 1:
            wrong[ex["id"]] = text
    assert 0 < len(wrong) < len(examples)
    pairs = preferences.mistake_pairs(examples, predictions, weight=2.0)
    assert {p["id"]: p["rejected"] for p in pairs} == wrong
    by_id = {ex["id"]: ex for ex in examples}
    for p in pairs:
        ex = by_id[p["id"]]
        assert p["chosen"] == ex["meta"]["answer"] and p["meta"]["pair_kind"] == "mistake"
        assert p["meta"]["weight"] == 2.0 and p["messages"] == ex["messages"][:1]
        assert p["images_chosen"] is p["images_rejected"] is ex["images"]
    with pytest.raises(ValueError, match="does not match"):
        preferences.mistake_pairs(examples[:2], predictions[1:3])


def _config(ckpt, *extra):
    overrides, _ = config_lib.parse_overrides([f"--config.init_from={ckpt}", *extra] + RUN)
    return policy.resolve_config(run.load("configs/medsynth_dpo.py:smoke", overrides),
                                 restore.load(ckpt))


def _task(config, **kw):
    """The DPO task of ``config`` started from its init_from (the reference)."""
    return dpo.DPOTask(config, pipeline.make_tokenizer(config.tokenizer),
                       start=restore.load(config.init_from), **kw)


def test_task_loss_equals_dpo_loss_of_independent_logprobs(sft_checkpoint):
    config = _config(sft_checkpoint, "--config.dpo.label_smoothing=0.1",
                     "--config.dpo.pair_weights.visual=3.0", "--config.dpo.nll_weight=0.5",
                     "--config.dpo.mistake_fraction=0")  # The synthetic pairs.
    tok = pipeline.make_tokenizer(config.tokenizer)
    _, params, _ = checkpoint_io.load_checkpoint(sft_checkpoint)
    # A reference different from the policy, so that the loss is not log 2.
    ref = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape,
                                                              x.dtype), params)
    task = dpo.DPOTask(config, tok, reference_params=ref)
    batch = next(task.data_iterator(config, process_index=0, process_count=1))
    assert set(batch) == set(task.dummy_batch(1))
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(0))

    def seq_logp(p, side):  # Full forward pass, NumPy log-softmax in float64.
        logits, _ = task.policy.model.apply({"params": p}, batch[f"{side}_tokens"],
                                     batch[f"{side}_images"],
                                     input_mask=batch[f"{side}_input_mask"],
                                     mask_ar=batch[f"{side}_mask_ar"])
        x = np.asarray(logits, np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        toks = np.asarray(batch[f"{side}_tokens"])
        mask = np.asarray(batch[f"{side}_loss_mask"] * batch[f"{side}_input_mask"])
        out = []
        for b in range(len(toks)):
            out.append(sum(x[b, t - 1, toks[b, t]] - lse[b, t - 1]
                           for t in range(1, toks.shape[1]) if mask[b, t]))
        return np.asarray(out)

    lp = {(who, s): seq_logp(p, s) for who, p in (("pi", params), ("ref", ref)) for s in dpo.SIDES}
    assert all((np.asarray(batch[f"{s}_loss_mask"]).sum(1) > 0).all() for s in dpo.SIDES)
    want, want_m = rl_losses.dpo_loss(*(jnp.asarray(lp[k], jnp.float32) for k in (
        ("pi", "chosen"), ("pi", "rejected"), ("ref", "chosen"), ("ref", "rejected"))),
        beta=0.1, label_smoothing=0.1, weights=batch["weight"], nll_weight=0.5,
        chosen_lengths=np.asarray(batch["chosen_loss_mask"] * batch["chosen_input_mask"])[
            :, 1:].sum(1))
    assert abs(float(loss) - float(want)) <= 1e-5 * abs(float(want))
    assert abs(float(loss) - np.log(2)) > 1e-4
    np.testing.assert_allclose(float(metrics["chosen_logp"]), lp["pi", "chosen"].mean(),
                               rtol=1e-5)
    assert float(metrics["reward_accuracy"]) == float(want_m["reward_accuracy"])
    g = jax.grad(lambda p: task.loss(p, batch, jax.random.key(0))[0])(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def _loss_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_smoke_run_starts_at_the_reference_and_resumes_exactly(sft_checkpoint, tmp_path):
    wd, split = str(tmp_path / "wd"), str(tmp_path / "split")
    base = ["--config", "configs/medsynth_dpo.py:smoke", f"--config.init_from={sft_checkpoint}",
            "--config.evals={}"]
    assert cli.main(base + ["--workdir", wd] + RUN) == 0
    rows = _loss_rows(wd)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Stopped after 2 steps and resumed in a new run (which mines its pairs again): step 3
    # is the same, to the float.
    assert cli.main(base + ["--workdir", split, "--config.train.steps=2"] + RUN) == 0
    assert cli.main(base + ["--workdir", split] + RUN) == 0
    assert [(r["step"], r["loss"]) for r in _loss_rows(split)] == \
        [(r["step"], r["loss"]) for r in rows]
    # Step 0: the policy is the reference (the init_from weights), so the DPO part of the
    # loss is log 2; the rest is the NLL term on the chosen answers (weight 1, pairs of equal
    # weight).
    assert rows[0]["chosen_nll"] > 1.0 and abs(rows[0]["reward_margin"]) < 1e-6
    assert abs(rows[0]["loss"] - rows[0]["chosen_nll"] - np.log(2)) < 1e-5
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The DPO workdir exports like any other (for generation, evaluation, HF conversion).
    from medvl_jax.convert import workdir

    out = workdir.resolve(wd)
    assert checkpoint_io.read_meta(out)["source"]["step"] == 3


def test_declared_evaluation_adds_the_reference_and_a_no_image_baseline(sft_checkpoint):
    """The smoke config's vqa evaluator (compare_start, no_image baseline) answers with the
    trained model, the reference (before) and the trained model without its images."""
    from medvl_jax.evaluate import evaluators

    config = _config(sft_checkpoint, "--config.evals.test.data.cxr.num_studies=6")
    _, params, _ = checkpoint_io.load_checkpoint(sft_checkpoint)
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape,
                                                                x.dtype), params)
    task = _task(config)
    ev = evaluators.build(config, task)["test"]
    # The reference is the starting point: with the policy still there, before == after.
    same = ev(params)
    assert same["before"]["per_type"] == same["per_type"]
    res = ev(moved)
    assert res["num_questions"] >= 10
    assert [p["prediction"] for p in res["predictions"]] != \
        [p["prediction"] for p in same["predictions"]]
    assert res["before"]["per_type"] == same["per_type"]
    # Independently of the evaluator: the reference's answers, scored by hand.
    examples = evaluators.examples(ev)
    texts = task.generate_texts(params, examples, batch_size=8, max_new_tokens=16)
    want = np.mean([scoring.score(ex["meta"]["question_type"], t, ex["meta"]["answer"])
                    for ex, t in zip(examples, texts)])
    assert res["before"]["overall"] == pytest.approx(want)
    blind = res["protocols"]["medsynth"]["conditions"]["no_image"]
    assert blind["num_questions"] == res["num_questions"]
    table = ev.format(res)
    assert "before" in table and "no_image" in table and "change" in table


def test_mined_mistakes_are_the_starting_models_wrong_greedy_answers(sft_checkpoint):
    config = _config(sft_checkpoint, "--config.dpo.mistake_fraction=1.0",
                     "--config.dpo.mistake_studies=3", "--config.data.batch_size=4",
                     "--config.dpo.mistake_samples=1", "--config.dpo.mistake_temperature=0")
    task = _task(config)
    tok = task.tokenizer
    pairs = task.mine_mistakes()
    again = task.mine_mistakes()  # Deterministic: a resumed run mines the same pairs.
    assert pairs and [(p["id"], p["rejected"]) for p in pairs] == \
        [(p["id"], p["rejected"]) for p in again]
    # Independently: the checkpoint's greedy answers, one question at a time.
    _, params, _ = checkpoint_io.load_checkpoint(sft_checkpoint)
    examples = {ex["id"]: ex for ex in pipeline.question_examples(config.data.sources, "train",
                                                                   limit=3)}
    for p in pairs[:4]:
        ex = examples[p["id"]]
        [text] = task.generate_texts(params, [ex], batch_size=1, max_new_tokens=16)
        assert p["rejected"] == text and p["chosen"] == ex["meta"]["answer"]
        assert scoring.score(ex["meta"]["question_type"], text, p["chosen"]) < 1
    # With mistake_fraction 1 every batch is made of them: the rejected side's answer tokens
    # decode to a mined wrong answer.
    batch = next(task.data_iterator(config, process_index=0, process_count=1))
    rejected = {p["rejected"] for p in pairs}
    for toks, mask in zip(batch["rejected_tokens"], batch["rejected_loss_mask"]):
        text = tok.decode(toks[mask.astype(bool)], skip_special_tokens=True).strip()
        assert text in rejected


def test_sampled_mistakes(sft_checkpoint):
    config = _config(sft_checkpoint, "--config.dpo.mistake_fraction=1.0",
                     "--config.dpo.mistake_studies=2", "--config.dpo.mistake_samples=3")
    task = _task(config)
    questions = {ex["id"]: ex for ex in pipeline.question_examples(config.data.sources,
                                                                    "train", limit=2)}
    pairs = task.mine_mistakes()
    again = task.mine_mistakes()
    assert [p["rejected"] for p in pairs] == [p["rejected"] for p in again]
    assert len(pairs) <= 3 * len(questions)
    for p in pairs:
        ex = questions[p["id"]]
        assert p["chosen"] == ex["meta"]["answer"]
        assert scoring.score(ex["meta"]["question_type"], p["rejected"], p["chosen"]) < 1
    # Temperature 1 on random weights: the three answers to a question are not all the same.
    by_q = {}
    for p in pairs:
        by_q.setdefault(p["id"], []).append(p["rejected"])
    assert any(len(set(v)) > 1 for v in by_q.values())
    with pytest.raises(ValueError, match="one sample when greedy"):
        _task(_config(sft_checkpoint, "--config.dpo.mistake_temperature=0")).mine_mistakes()


def _write_pairs(tmp_path, records):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _pixels(path, config):
    """A 64x64 8-bit PNG as the pipeline should give it: [0, 1], then (x - mean) / std."""
    from PIL import Image

    mean, std = config.data.normalise
    return (np.asarray(Image.open(path), np.float32) / 255.0 - mean) / std


def test_preference_files_feed_dpo(sft_checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b", "a_masked"):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    records = [
        {"id": "p0", "image": "a.png", "prompt": "Is there a nodule?", "chosen": "yes",
         "rejected": "no", "weight": 2.5},
        {"id": "p1", "image": "b.png", "prompt": "<image>\nWhich side?", "chosen": "left",
         "rejected": "right"},
        {"id": "p2", "image": "a.png", "rejected_image": "a_masked.png",
         "prompt": "Is there a nodule?", "chosen": "yes", "rejected": "yes"},
    ]
    path = _write_pairs(tmp_path, records)
    src = preferences.PreferenceFile(path)
    assert [p["meta"]["pair_kind"] for p in src.pairs] == ["text", "text", "visual"]
    assert src[0]["messages"][0]["content"] == "<image>\nIs there a nodule?"
    assert src[1]["messages"][0]["content"] == "<image>\nWhich side?"  # Not doubled.
    assert src[2]["images_rejected"] == [str(tmp_path / "a_masked.png")]

    config = _config(sft_checkpoint, "--config.dpo.mistake_fraction=0",
                     "--config.data.batch_size=3", "--config.data.shuffle=False",
                     "--config.dpo.pair_weights.visual=4.0")
    config.data.sources = {"mine": preferences.preference_source(path)}
    task = _task(config)
    tok = task.tokenizer
    batch = next(task.data_iterator(config, process_index=0, process_count=1))
    by_weight = dict(zip(batch["weight"].tolist(), range(3)))
    assert sorted(by_weight) == [1.0, 2.5, 4.0]  # Record weight; default text 1; visual 4.
    for rec, w in zip(records, (2.5, 1.0, 4.0)):
        i = by_weight[w]
        for side in dpo.SIDES:
            toks, mask = batch[f"{side}_tokens"][i], batch[f"{side}_loss_mask"][i]
            text = tok.decode(toks[mask.astype(bool)], skip_special_tokens=True).strip()
            assert text == rec[side]
        got = batch["chosen_images"][i, 0, ..., 0]
        np.testing.assert_allclose(got, _pixels(tmp_path / rec["image"], config), atol=1e-6)
    v = by_weight[4.0]  # The visual pair: the rejected side sees the other image.
    np.testing.assert_allclose(batch["rejected_images"][v, 0, ..., 0],
                               _pixels(tmp_path / "a_masked.png", config), atol=1e-6)
    loss, _ = jax.jit(task.loss)(task.reference_params(), batch, jax.random.key(0))
    assert np.isfinite(float(loss))
    # The same config trains through the CLI's path.
    wd = str(tmp_path / "wd")
    config.data.batch_size = 8  # Divisible by the test session's 8 CPU devices.
    config.evals = {}
    assert run.train(config, wd) == 0
    assert [r["step"] for r in _loss_rows(wd)] == [1, 2, 3]


@pytest.mark.parametrize("record,message", [
    ({"image": "a.png", "prompt": "q", "chosen": "yes"}, "'rejected' must be non-empty"),
    ({"image": "a.png", "prompt": "q", "chosen": "yes", "rejected": " yes"}, "same answer"),
    ({"image": "a.png", "rejected_images": ["x.png", "y.png"], "prompt": "q", "chosen": "a",
      "rejected": "b"}, "2 rejected images for 1 images"),
    ({"image": "a.png", "prompt": "q", "chosen": "a", "rejected": "b", "weight": -1},
     "weight must be a number >= 0"),
    ({"image": ["a.png", 3], "prompt": "q", "chosen": "a", "rejected": "b"},
     "'image' must be image paths"),
])
def test_bad_preference_records_name_the_line(tmp_path, record, message):
    from medvl_jax.data.errors import DataError

    good = {"image": "a.png", "prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write_pairs(tmp_path, [good, record])
    with pytest.raises(DataError, match=message) as e:
        preferences.PreferenceFile(path)
    assert "pairs.jsonl:2" in str(e.value)
