"""The classify task: masked BCE against the NumPy formula, MedSynth's regional labels against
the study's own closed questions, label vectors from JSONL label files, the evaluator against a
pairwise ROC-AUC by hand, learning a finding in a few steps, and ``vision_stage`` (the
classifier's tower starts the SFT model, one command)."""
import json
import re

import jax
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pairs
from medvl_jax.data.medsynth import generate_study, prompts, study_seed
from medvl_jax.evaluate import evaluators
from medvl_jax.tasks import classify
from medvl_jax.tasks.classify import ClassifyTask
from medvl_jax.train import cli, restore, run

SMOKE = "configs/medsynth_classify.py:smoke"
TINY = [("model.vision.depth", 1), ("train.progress", False), ("train.log_every", 1)]


def _task(*overrides):
    return ClassifyTask(run.complete(config_lib.load_config(SMOKE, TINY + list(overrides))))


def test_masked_bce_equals_numpy_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
    labels = (rng.random((6, 5)) < 0.4).astype(np.float32)
    mask = rng.random((6, 5)) < 0.7
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    want = (bce * mask).sum() / mask.sum()
    got = classify.masked_bce(logits, labels, mask.astype(np.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(classify.masked_bce(logits, labels, np.zeros_like(labels))) == 0.0


def test_medsynth_regional_labels_agree_with_the_study_questions():
    """Each closed question about a zone, a side or the heart is answered as the labels say
    (the questions are written from the findings by another path)."""
    checked = 0
    for i in range(60):
        rec = generate_study("cxr", study_seed(0, "test", "cxr", i), image_size=64,
                             render=False)
        lab = pairs.medsynth_labels(rec, regional=True)
        assert set(prompts.CXR_LABELS) <= set(lab)
        assert lab["nodule"] == any(lab[f"nodule_{s}_{z}"] for s in ("right", "left")
                                    for z in ("upper", "middle", "lower"))
        assert lab["effusion"] == (lab["effusion_right"] or lab["effusion_left"])
        for qa in rec["qa"]:
            q, yes = qa["question"].lower(), qa["answer"] == "yes"
            if qa["template"] == "cxr.closed.nodule_cell":
                (name,) = [f"nodule_{s}_{z}" for s in ("right", "left")
                           for z in ("upper", "middle", "lower")
                           if f"{s} {z} zone" in q]
                assert lab[name] == yes, (q, lab)
                checked += 1
            elif qa["template"] == "cxr.closed.effusion_side":
                side = "right" if "right" in q else "left"
                assert lab[f"effusion_{side}"] == yes, (q, lab)
                checked += 1
            elif qa["template"] == "cxr.closed.cardiomegaly":
                assert lab["cardiomegaly"] == yes
                checked += 1
    assert checked > 100
    # The plain labels (contrastive evaluation) are unchanged.
    assert set(pairs.medsynth_labels(rec)) == {"nodule", "effusion", "cardiomegaly"}


def test_label_vector():
    names = ("a", "b", "c")
    v, k = pairs.label_vector({"a": True, "c": False}, names)
    np.testing.assert_array_equal(v, [1, 0, 0])
    np.testing.assert_array_equal(k, [True, False, True])  # "b" unknown: masked out.
    v, k = pairs.label_vector(["b", "zzz"], names)
    np.testing.assert_array_equal(v, [0, 1, 0])
    assert k.all()  # A list names what is present; the rest is absent.
    v, k = pairs.label_vector("c", names)
    np.testing.assert_array_equal(v, [0, 0, 1])
    with pytest.raises(pairs.DataError, match="'a'.*bool"):
        pairs.label_vector({"a": "yes"}, names)


def _write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((20, 24), value, np.uint8)).save(path)


def test_in_chunks_pads_the_last_chunk_and_drops_the_padding():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.arange(5)
    shapes = []

    def fn(a, b):
        shapes.append((a.shape, b.shape))
        return a.sum(1) + b
    got = pairs.in_chunks(fn, [x, y], 2)
    np.testing.assert_array_equal(got, [1 + 0, 5 + 1, 9 + 2, 13 + 3, 17 + 4])
    assert shapes == [((2, 2), (2,))] * 3  # One shape: a jitted fn compiles once.


def test_jsonl_label_files_give_label_batches(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", 60 * i)
    rows = [{"image": "0.png", "labels": {"effusion_right": True}},
            {"image": "1.png", "labels": {"effusion_right": False, "cardiomegaly": True}},
            {"image": "2.png", "label": "cardiomegaly"},
            {"image": "3.png", "labels": ["effusion_left", "cardiomegaly"]}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_lib.load_config(SMOKE, TINY + [("data.batch_size", 4), ("data.shuffle", False)])
    cfg.data.sources = {"l": {"kind": "labels", "path": str(tmp_path / "l.jsonl")}}
    names = ("effusion_right", "effusion_left", "cardiomegaly")
    batch = next(pairs.build_iterator(cfg.data, None, label_names=names))
    assert batch["images"].shape == (4, 64, 64, 1) and "tokens" not in batch
    np.testing.assert_array_equal(batch["labels"], [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(batch["label_mask"], [[1, 0, 0], [1, 0, 1], [1, 1, 1],
                                                        [1, 1, 1]])
    cfg.data.sources = {"p": {"kind": "pairs", "path": str(tmp_path / "l.jsonl")}}
    with pytest.raises(ValueError, match=r"sources\.p.*labels"):
        pairs.build_iterator(cfg.data, None, label_names=names)


def _pairwise_auc(scores, y):
    pos, neg = scores[y], scores[~y]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_evaluator_equals_auc_and_accuracy_by_hand():
    task = _task(("evals.test.data.cxr.num_studies", 24), ("classify.predict_batch_size", 10))
    params = jax.tree.map(np.asarray, task.init(jax.random.key(1),
                                                task.dummy_batch(2)))
    import flax.linen as nn

    params = nn.unbox(params)
    res = evaluators.build(task.config, task)["test"](params)
    data = pairs.eval_set(task.config.data, task.config.evals.test.data, "test")
    logits = np.asarray(task.model.apply({"params": params}, data["images"]))
    assert res["n"] == 24 and list(res["per_label"]) == list(task.labels)
    for i, name in enumerate(task.labels):
        y, row = data["labels"][name] > 0, res["per_label"][name]
        assert row["positives"] == y.sum()
        np.testing.assert_allclose(row["accuracy"], np.mean((logits[:, i] > 0) == y))
        if 0 < y.sum() < len(y):
            np.testing.assert_allclose(row["auc"], _pairwise_auc(logits[:, i], y), rtol=1e-6)


def test_classifier_learns_cardiomegaly(tmp_path):
    """30 steps on 32 radiographs a batch separate heart sizes on unseen test studies."""
    wd = str(tmp_path / "cls")
    assert cli.main(["--config", SMOKE, "--workdir", wd, "--config.train.progress=False",
                     "--config.train.steps=30", "--config.data.batch_size=32",
                     "--config.data.sources.cxr.num_studies=2000",
                     "--config.evals.test.data.cxr.num_studies=64",
                     "--config.train.checkpoint_every=30"]) == 0
    res = json.load(open(f"{wd}/results.json"))["test"]
    assert res["per_label"]["cardiomegaly"]["auc"] > 0.9, res["per_label"]["cardiomegaly"]
    first, *_, last = (json.loads(x) for x in open(f"{wd}/metrics.jsonl"))
    assert last["loss"] < first["loss"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="classify.labels is empty"):
        ClassifyTask(run.complete(config_lib.load_config(SMOKE, TINY + [
            ("classify.labels", ())])))
    with pytest.raises(ValueError, match=r"data.image_size=32 but model.vision.image_size=64"):
        _task(("data.image_size", 32))
    cfg = run.complete(config_lib.load_config(SMOKE, TINY))
    with cfg.unlocked():
        cfg.model.text = {"embed_dim": 8}
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['text'\]"):
        ClassifyTask(cfg)


def test_vision_stage_trains_the_tower_that_starts_sft(tmp_path, capsys):
    """One command: the classifier is trained into <workdir>/vision_stage and its tower is
    the SFT model's (checked with the tower frozen); a resumed run skips the stage."""
    workdir_lib = restore
    wd = str(tmp_path / "sft")
    args = ["--config", "configs/medsynth_sft.py:smoke", "--workdir", wd,
            f"--config.vision_stage={SMOKE}", "--config.train.steps=1",
            "--config.train.checkpoint_every=1", "--config.evals={}",
            "--config.train.progress=False", "--config.optim.freeze=^vision/"]
    assert cli.main(args) == 0
    assert "vision stage:" in capsys.readouterr().out
    _, _, want, _ = workdir_lib.restore_params(f"{wd}/vision_stage")
    _, _, got, _ = workdir_lib.restore_params(wd)
    want, got = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in
                 (want["vision"], got["vision"]))
    assert set(got) == set(want) and want
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    assert cli.main(args + ["--config.train.steps=2"]) == 0  # Resumes: no stage.
    assert "vision stage:" not in capsys.readouterr().out
    assert cli.main(args[:2] + ["--workdir", str(tmp_path / "x"),
                                f"--config.vision_init={wd}"] + args[4:]) == 2
    assert re.search("vision_stage.*not both", capsys.readouterr().err)
