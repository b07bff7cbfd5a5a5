"""The contrastive task: its loss against the loss functions on independently computed
embeddings, sharded (ring) vs unsharded training through the CLI on 8 fake devices, the
zero-shot evaluator against retrieval.roc_auc by hand, and the pair data (sentence sampling,
JSONL pairs, label captions, 3D volumes)."""
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pairs, pipeline
from medvl_jax.data.errors import DataError
from medvl_jax.evaluate import retrieval
from medvl_jax.models.two_tower import TwoTower
from medvl_jax.tasks import contrastive_losses as closs
from medvl_jax.data.medsynth.prompts import FINDINGS, prompts
from medvl_jax.evaluate import evaluators
from medvl_jax.tasks.contrastive import ContrastiveTask
from medvl_jax.train import cli, run

SMOKE = "configs/medsynth_siglip.py:smoke"
TINY = [("model.vision.depth", 1), ("model.text.depth", 1), ("train.progress", False),
        ("train.log_every", 1), ("data.max_length", 32), ("model.text.max_len", 32)]


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")


def _task(tokenizer, *overrides, vision=None):
    cfg = run.complete(config_lib.load_config(SMOKE, TINY + list(overrides)))
    if vision:  # Model fields the config does not set.
        with cfg.unlocked():
            cfg.model.vision.update(vision)
    return ContrastiveTask(cfg, tokenizer)


def _batch(task):
    it = task.data_iterator(task.config, process_index=0, process_count=1)
    return jax.tree.map(np.asarray, next(it))


@pytest.mark.parametrize("kind", ["siglip", "clip", "convirt"])
def test_loss_equals_loss_of_independent_embeddings(tokenizer, kind):
    init = "siglip" if kind == "siglip" else "clip"
    task = _task(tokenizer, ("contrastive.loss", kind), ("model.logit_init", init),
                 ("data.batch_size", 8))
    batch = _batch(task)
    params = nn.unbox(task.init(jax.random.key(0), batch))
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(1))
    model = TwoTower(task.model_config)
    v = {"params": params}
    img = model.apply(v, batch["images"], method=TwoTower.encode_image)
    txt = model.apply(v, batch["tokens"], batch["input_mask"], method=TwoTower.encode_text)
    if kind == "siglip":
        want = closs.siglip_loss(img, txt, params["logit_scale"], params["logit_bias"])
    elif kind == "clip":
        want = closs.clip_loss(img, txt, params["logit_scale"])
    else:
        want = closs.convirt_loss(img, txt, 0.1, 0.75)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    acc = np.mean(np.argmax(np.asarray(img @ txt.T), axis=1) == np.arange(len(img)))
    np.testing.assert_allclose(float(metrics["i2t_accuracy"]), acc)


def _cli_losses(tmp_path, name, *extra):
    workdir = str(tmp_path / name)
    args = ["--config", SMOKE, "--workdir", workdir, "--config.train.steps=3",
            "--config.train.mesh.data=8", "--config.evals={}",
            "--config.train.checkpoint_every=0", "--config.model.vision.depth=1",
            "--config.model.text.depth=1", "--config.train.progress=False",
            "--config.data.max_length=32", "--config.model.text.max_len=32", *extra]
    assert cli.main(args) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("kind", ["siglip"])  # The ring losses of every kind are checked in
def test_sharded_ring_loss_trains_like_unsharded(tmp_path, kind):  # test_contrastive_losses.
    assert jax.device_count() == 8
    extra = [f"--config.contrastive.loss={kind}"]
    if kind != "siglip":
        extra.append("--config.model.logit_init=clip")
    ring = _cli_losses(tmp_path, "ring", "--config.contrastive.sharded=True", *extra)
    plain = _cli_losses(tmp_path, "plain", "--config.contrastive.sharded=False", *extra)
    assert len(ring) == 3
    np.testing.assert_allclose(ring, plain, rtol=1e-5)


def test_sharded_loss_is_used_under_a_mesh(tokenizer):
    from medvl_jax.parallel import mesh as mesh_lib

    task = _task(tokenizer)
    img = np.eye(16, 8, dtype=np.float32)
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2})
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(task.contrastive_loss)(img, img, 1.0, -1.0))
    assert "shard_map" in jaxpr and "ppermute" in jaxpr
    assert "shard_map" not in str(jax.make_jaxpr(task.contrastive_loss)(img, img, 1.0, -1.0))


def test_zero_shot_equals_roc_auc_by_hand(tokenizer):
    task = _task(tokenizer)
    params = nn.unbox(task.init(jax.random.key(3), task.dummy_batch(2)))
    evals = evaluators.build(task.config, task)
    res = evals["zero_shot"](params)
    spec = dict(task.config.data.sources["cxr"])
    data = pairs.eval_set(task.config.data, {"cxr": {**spec, "num_studies": 16}}, "test")
    model, v = TwoTower(task.model_config), {"params": params}
    img = np.asarray(model.apply(v, data["images"], method=TwoTower.encode_image))
    for finding in FINDINGS:
        cls = []
        for texts in prompts(finding, "report"):
            tok, mask = pairs.tokenize(tokenizer, texts, task.config.data.max_length)
            e = np.asarray(model.apply(v, tok, mask, method=TwoTower.encode_text)).mean(0)
            cls.append(e / np.linalg.norm(e))
        score = img @ cls[1] - img @ cls[0]
        want = retrieval.roc_auc(score, data["labels"][finding] > 0)
        assert res["per_label"][finding]["auc"] == pytest.approx(want, abs=1e-6)
        acc = np.mean((score > 0) == (data["labels"][finding] > 0))
        assert res["per_label"][finding]["accuracy"] == pytest.approx(acc)
    assert set(evals["retrieval"](params)) >= {"i2t@1", "t2i@10"}


def _texts(cfg, n):
    ds = pairs.pair_dataset(cfg, split="train", sentences=1)
    return [ds[i]["text"] for i in range(n)]


def test_sentences_deterministic_per_seed_and_epoch():
    cfg = config_lib.load_config(SMOKE, []).data
    n = 64  # Studies in the smoke source: element e * n + j is epoch e.
    a, b = _texts(cfg, 2 * n), _texts(cfg, 2 * n)
    assert a == b
    first, second = a[:n], a[n:]
    assert sum(x != y for x, y in zip(first, second)) > n // 4  # New sentences next epoch.
    src = pairs.medsynth_records(dict(cfg.sources["cxr"]), "train", render=False)
    reports = {src[i]["report"] for i in range(n)}
    for text in first:
        assert any(text in pairs.report_sentences(r) for r in reports)
    cfg2 = config_lib.load_config(SMOKE, [("data.seed", 1)]).data
    assert _texts(cfg2, n) != first


def test_report_sentences_and_label_captions():
    report = ("FINDINGS: There is a 21 mm nodule in the right lower zone. Cardiomegaly, "
              "cardiothoracic ratio 0.57.\nIMPRESSION: 1. 21 mm nodule in the right lower zone. "
              "2. Cardiomegaly.")
    assert pairs.report_sentences(report) == [
        "There is a 21 mm nodule in the right lower zone.",
        "Cardiomegaly, cardiothoracic ratio 0.57.", "21 mm nodule in the right lower zone.",
        "Cardiomegaly."]
    assert pairs.caption_from_labels({"effusion": True, "cardiomegaly": False}) == (
        "Pleural effusion. Heart size is normal.")
    assert pairs.caption_from_labels(["pneumothorax"]) == "Pneumothorax."
    assert pairs.caption_from_labels({"lung_mass": False}) == "No lung mass."
    rng = np.random.default_rng(0)
    caps = {pairs.caption_from_labels("effusion", rng) for _ in range(20)}
    assert caps == set(pairs.CAPTION_TEMPLATES["effusion"][0])
    with pytest.raises(ValueError, match="no labels"):
        pairs.caption_from_labels({})


def _write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((20, 24), value, np.uint8)).save(path)


def test_jsonl_pairs_and_labels(tmp_path, tokenizer):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", 60 * i)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"image": f"{i}.png", "text": f"Image {i}. Second one."}) + "\n")
    with open(tmp_path / "labels.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"image": f"{i}.png", "labels": {"effusion": i % 2 == 0}}) + "\n")
    cfg = config_lib.load_config(SMOKE, TINY + [("data.batch_size", 4)]).data
    cfg.sources = {"p": {"kind": "pairs", "path": str(tmp_path / "pairs.jsonl")},
                   "l": {"kind": "labels", "path": str(tmp_path / "labels.jsonl")}}
    batch = next(pairs.build_iterator(cfg, tokenizer, sentences=1))
    assert batch["images"].shape == (4, 64, 64, 1) and batch["tokens"].shape == (4, 32)
    texts = [tokenizer.decode(t[m]) for t, m in zip(batch["tokens"], batch["input_mask"])]
    assert all(t.strip() for t in texts)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "text": "ok"}) + "\n"
                   + json.dumps({"image": "1.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*\"text\""):
        pairs.JsonlPairs(str(bad))
    bad.write_text(json.dumps({"text": "no image"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*\"image\""):
        pairs.JsonlPairs(str(bad))
    bad.write_text(json.dumps({"image": "0.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*\"labels\""):
        pairs.JsonlPairs(str(bad), labels=True)


def test_ct_volume_report_pairs(tokenizer):
    task = _task(tokenizer,
                 ("data.sources", {"ct": pipeline.medsynth_source(
                     "ct", num_studies=8, volume_shape=(8, 16, 16))}),
                 ("data.volume_shape", (8, 16, 16)), ("data.batch_size", 4),
                 ("model.vision.image_size", 16), ("contrastive.embed_batch_size", 4),
                 ("evals", {"zs": evaluators.entry(
                     "zero_shot", {"ct": pipeline.medsynth_source(
                         "ct", num_studies=4, volume_shape=(8, 16, 16))},
                     classes={"nodule": [["No lesion."], ["A lung lesion."]]})}),
                 vision={"tubelet": 2})
    batch = _batch(task)
    assert batch["images"].shape == (4, 8, 16, 16, 1)
    params = nn.unbox(task.init(jax.random.key(0), batch))
    loss, _ = task.loss(params, batch, None)
    assert np.isfinite(float(loss))
    res = evaluators.build(task.config, task)["zs"](params)
    assert set(res["per_label"]) == {"nodule"} and res["n"] == 4


def test_config_errors_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="contrastive.loss"):
        _task(tokenizer, ("contrastive.loss", "triplet"))
    with pytest.raises(ValueError, match="logit bias"):
        _task(tokenizer, ("model.logit_init", "clip"))
    with pytest.raises(ValueError, match="data.max_length"):
        _task(tokenizer, ("data.max_length", 64))  # The text tower has 32 positions.


def test_finetune_from_a_converted_siglip_checkpoint(tmp_path):
    """configs/siglip_finetune.py:smoke starts from a converted SiglipModel (init_from): the
    learned temperature and bias continue from the checkpoint's values."""
    import json as json_lib

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from medvl_jax.convert import from_hf
    from medvl_jax.data import pipeline as pipe
    from medvl_jax.train import cli as train_cli

    tok = pipe.make_tokenizer("medsynth")
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=len(tok) + 4, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=48),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
        model.logit_bias.fill_(-3.0)
    hf_dir, ckpt, wd = (str(tmp_path / d) for d in ("hf", "ckpt", "run"))
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    from_hf.convert(hf_dir, ckpt)
    assert train_cli.main(["--config", "configs/siglip_finetune.py:smoke", "--workdir", wd,
                           f"--config.init_from={ckpt}", "--config.train.progress=False",
                           "--config.optim.lr=0.0", "--config.optim.warmup_steps=0"]) == 0
    first = json_lib.loads(open(f"{wd}/metrics.jsonl").readline())
    np.testing.assert_allclose(first["logit_scale"], np.exp(1.5), rtol=1e-6)
    np.testing.assert_allclose(first["logit_bias"], -3.0, rtol=1e-6)


def test_contrastive_tower_initialises_the_sft_encoder(tmp_path, capsys):
    """vision_init: the VLM's vision params start as the contrastive run's tower (checked
    with the tower frozen for a step), the rest fresh; a tower of another shape is refused."""
    from medvl_jax.train import restore as workdir_lib

    tower = str(tmp_path / "tower")
    assert cli.main(["--config", SMOKE, "--workdir", tower, "--config.train.steps=2",
                     "--config.train.checkpoint_every=2", "--config.evals={}",
                     "--config.train.progress=False"]) == 0
    sft_args = ["--config", "configs/medsynth_sft.py:smoke", "--config.train.steps=1",
                "--config.train.checkpoint_every=1", "--config.evals={}",
                f"--config.vision_init={tower}", "--config.train.progress=False"]
    sft_wd = str(tmp_path / "sft")
    # The SFT smoke model's tower is one layer deeper than the contrastive smoke tower.
    assert cli.main(sft_args + ["--workdir", sft_wd]) == 2  # One line, exit code 2.
    assert re.search(r"error: model\.vision\.depth=3 .* has 2", capsys.readouterr().err)
    assert cli.main(sft_args + ["--workdir", sft_wd, "--config.model.vision.depth=2",
                                "--config.optim.freeze=^vision/"]) == 0
    _, _, want, _ = workdir_lib.restore_params(tower)
    _, _, got, _ = workdir_lib.restore_params(sft_wd)
    want, got = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in
                 (want["vision"], got["vision"]))
    assert set(got) == set(want)  # The contrastive tower has no head here.
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
