"""SFT evaluation through the KV-cache sampler, and ``python -m medvl_jax.evaluate``.

One MedSynth smoke run (a few steps, 1-layer towers) is trained in-process; its evaluation is
checked against a full-forward greedy reference written here (no cache), its scores against
``scoring.score``, and the evaluation CLI against the task's ``evaluate`` on the same params.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import chat, pipeline
from medvl_jax.evaluate import cli as eval_cli
from medvl_jax.evaluate import scoring
from medvl_jax.sampling import sampler
from medvl_jax.train import cli as train_cli

SMOKE = "configs/medsynth_sft.py:smoke"
COMMON = ["--config.model.text.num_layers=1", "--config.model.vision.depth=1",
          "--config.sft.eval_max_new_tokens=8", "--config.sft.eval_batch_size=16",
          "--config.sft.eval_studies=2"]
TRAIN = COMMON + ["--config.train.steps=4", "--config.train.eval_every=2",
                  "--config.train.checkpoint_every=4", "--config.train.progress=False"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained workdir, and how many sampler compilations its in-loop evaluations made."""
    wd = str(tmp_path_factory.mktemp("wd"))
    before = sampler._generate._cache_size()
    assert train_cli.main(["--config", SMOKE, "--workdir", wd] + TRAIN) == 0
    return wd, sampler._generate._cache_size() - before


@pytest.fixture(scope="module")
def restored(run):
    wd, _ = run
    overrides, _ = config_lib.parse_overrides(COMMON)
    config, task, params, step = eval_cli.load(config_lib.load_config(SMOKE, overrides), wd)
    assert step == 4
    return task, params


def _reference(task, params, examples):
    """Greedy answers by full forward passes (no cache): argmax of the last real position's
    logits, one token at a time; right padding to a fixed length (causal, so it is unseen)."""
    d, sc = task.config.data, task.config.sft
    max_new = int(sc.eval_max_new_tokens)
    stop = task.tokenizer.convert_tokens_to_ids(chat.end_of_turn_token(d.template))
    feat = pipeline.Featurizer(d, task.tokenizer, train=False)
    L = d.max_length + max_new
    n = len(examples)
    tokens = np.zeros((n, L), np.int32)
    mask_ar = np.ones((n, L), np.int32)
    images = np.zeros((n, d.max_images) + feat.image_shape(), np.float32)
    lengths = np.zeros(n, np.int32)
    for i, ex in enumerate(examples):
        imgs = [feat.ops(x, None) for x in pipeline.decode_images(ex, d)]
        enc = chat.encode_prompt(task.tokenizer, ex["messages"], d.template,
                                 num_image_tokens=d.num_image_tokens, num_images=len(imgs),
                                 prefix_lm=d.prefix_lm)
        tokens[i, :len(enc.tokens)] = enc.tokens
        mask_ar[i, :len(enc.tokens)] = enc.mask_ar
        images[i, :len(imgs)] = imgs
        lengths[i] = len(enc.tokens)
    model_params = jax.device_get(task.model_params(params))
    forward = jax.jit(lambda p, t, m, a, x: task.model.apply(
        {"params": p}, t, x, input_mask=m, mask_ar=a)[0])
    answers = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    for _ in range(max_new):
        mask = np.arange(L)[None] < lengths[:, None]
        logits = np.asarray(forward(model_params, tokens, mask, mask_ar, images))
        nxt = logits[np.arange(n), lengths - 1].argmax(-1)
        for i in range(n):
            if done[i]:
                continue
            if nxt[i] == stop:
                done[i] = True
                continue
            answers[i].append(int(nxt[i]))
            tokens[i, lengths[i]] = nxt[i]
            lengths[i] += 1
    return [task.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def test_in_loop_evaluations_compile_the_sampler_once(run):
    wd, compiles = run
    assert compiles == 1  # eval at step 2 (val) and at the end (test): one compilation
    assert os.path.isfile(os.path.join(wd, "results.json"))


def test_sampler_evaluation_equals_full_forward_greedy(restored):
    task, params = restored
    examples = task.eval_examples("test")
    assert len(examples) > int(task.config.sft.eval_batch_size)  # several batches, one padded
    results = task.evaluate(params, "test")
    preds = [p["prediction"] for p in results["predictions"]]
    assert [p["id"] for p in results["predictions"]] == [ex["id"] for ex in examples]
    assert preds == _reference(task, params, examples)
    assert any(preds)
    by_type = {}
    for ex, p in zip(examples, results["predictions"]):
        s = scoring.score(ex["meta"]["question_type"], p["prediction"], ex["meta"]["answer"])
        assert p["score"] == s
        by_type.setdefault(ex["meta"]["question_type"], []).append(s)
    assert results["per_type"] == {t: {"score": float(np.mean(v)), "n": len(v)}
                                   for t, v in sorted(by_type.items())}
    assert results["num_questions"] == len(examples)


def test_evaluate_cli_writes_what_evaluate_returns(run, restored, tmp_path, capsys):
    wd, _ = run
    task, params = restored
    expected = task.evaluate(params, "test")
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert eval_cli.main(["--config", SMOKE, "--checkpoint", wd, "--out", out] + COMMON) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "eval_test.json")))
    assert summary.pop("step") == 4 and summary.pop("checkpoint") == os.path.abspath(wd)
    assert summary == {k: v for k, v in expected.items() if k != "predictions"}
    rows = [json.loads(line) for line in open(os.path.join(out, "predictions_test.jsonl"))]
    assert rows == expected["predictions"]
    train_cli.print_table(expected)
    table = capsys.readouterr().out
    assert table.strip() and table in printed


def test_evaluate_cli_wrong_checkpoint_dir(tmp_path, capsys):
    assert eval_cli.main(["--config", SMOKE, "--checkpoint", str(tmp_path)] + COMMON) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "neither a training workdir" in err
