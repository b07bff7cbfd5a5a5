"""SFT evaluation through the KV-cache sampler, and ``python -m medvl_jax.evaluate``.

One MedSynth smoke run (a few steps, 1-layer towers) is trained in-process; its evaluation is
checked against a full-forward greedy reference written here (no cache), its scores against
``scoring.score``, and the evaluation CLI (two protocols with the sanity baselines) against the
config's declared evaluator on the same params.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import chat, pipeline
from medvl_jax.evaluate import cli as eval_cli
from medvl_jax.evaluate import evaluators, scoring
from medvl_jax.evaluate import protocols as protocols_lib
from medvl_jax.sampling import sampler
from medvl_jax.train import cli as train_cli
from medvl_jax.train import run as run_lib

SMOKE = "configs/medsynth_sft.py:smoke"
COMMON = ["--config.model.text.num_layers=1", "--config.model.vision.depth=1",
          "--config.evals.test.max_new_tokens=8", "--config.evals.test.batch_size=16"] + [
              f"--config.evals.test.data.{s}.num_studies=2" for s in ("cxr", "cxr_closed",
                                                                      "pairs")]
TRAIN = COMMON + ["--config.train.steps=4", "--config.evals.test.every=2",
                  "--config.train.checkpoint_every=4", "--config.train.progress=False"]
# The evaluation CLI's MedSynth benchmark with the same studies, batches and budget.
CLI = ["--studies", "2", "--batch_size", "16", "--max_new_tokens", "8"]


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
    config, task, params, step = eval_cli.load(run_lib.load(SMOKE, overrides), wd)
    assert step == 4
    return task, params


def _declared(task, params):
    """The config's declared test evaluator on ``params``, and its examples."""
    ev = evaluators.build(task.config, task)["test"]
    return ev(params), evaluators.examples(ev)


def _reference(task, params, examples):
    """Greedy answers by full forward passes (no cache): argmax of the last real position's
    logits, one token at a time; right padding to a fixed length (causal, so it is unseen)."""
    d = task.config.data
    max_new = 8
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
    forward = jax.jit(lambda p, t, m, a, x: task.policy.model.apply(
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
    assert compiles == 1  # eval at step 2 and at the end: one compilation
    assert os.path.isfile(os.path.join(wd, "results.json"))


def test_sampler_evaluation_equals_full_forward_greedy(restored):
    task, params = restored
    results, examples = _declared(task, params)
    assert len(examples) > 16  # several batches, one padded
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


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _strict_closed(prediction: str, reference: str) -> float:
    """LLaVA-Med's closed rule made strict, for MedSynth's plain answers: exactly one of the
    whole words yes/no, equal to the reference."""
    words = re.findall(r"[a-z0-9]+", prediction.lower())
    return float((("yes" in words) != ("no" in words)) and reference in words)


def test_evaluate_cli_two_protocols_with_baselines(run, restored, tmp_path, capsys):
    wd, _ = run
    task, params = restored
    expected, _ = _declared(task, params)
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert eval_cli.main(["--config", SMOKE, "--checkpoint", wd, "--out", out,
                          "--protocol", "medsynth,llava_med_strict"] + COMMON + CLI) == 0
    printed = capsys.readouterr().out
    n = expected["num_questions"]
    for name in ("medsynth", "llava_med_strict"):
        version = protocols_lib.get(name).version
        assert f"medsynth test, {n} questions; protocol {name} (version {version})" in printed
    header = [line for line in printed.splitlines() if line.startswith("question type")]
    assert len(header) == 2 and header[0].split()[2:] == ["n", "real", "no_image", "blur", "noise"]

    summary = json.load(open(os.path.join(out, "eval_medsynth_test.json")))
    assert summary["step"] == 4 and summary["checkpoint"] == os.path.abspath(wd)
    assert summary["conditions"] == ["real", "no_image", "blur", "noise"]
    med = summary["protocols"]["medsynth"]
    assert (med["protocol"], med["version"]) == ("medsynth", "1")
    # The default MedSynth protocol on the real images is the declared evaluator's.
    assert med["conditions"]["real"]["per_type"] == expected["per_type"]
    assert med["conditions"]["real"]["overall"] == expected["overall"]
    files = summary["files"]["predictions"]
    rows = _rows(os.path.join(out, files["medsynth"]["real"]))
    keys = ("id", "type", "prediction", "answer", "score")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: p[k] for k in keys}
                                                       for p in expected["predictions"]]
    assert all(r["protocol"] == "medsynth" and r["version"] == "1" for r in rows)
    # One generation serves both protocols; the strict rule scores it.
    strict = _rows(os.path.join(out, "predictions_medsynth_test_llava_med_strict_real.jsonl"))
    assert [r["prediction"] for r in strict] == [r["prediction"] for r in rows]
    closed = [r for r in strict if r["type"] == "closed"]
    assert closed and all(r["score"] == _strict_closed(r["prediction"], r["answer"])
                          for r in closed)
    for name in ("medsynth", "llava_med_strict"):
        for cond in ("no_image", "blur", "noise"):
            base = _rows(os.path.join(out, files[name][cond]))
            assert [r["id"] for r in base] == [r["id"] for r in rows]
            assert {r["condition"] for r in base} == {cond}
            table = summary["protocols"][name]["conditions"][cond]
            assert table["overall"] == pytest.approx(np.mean([r["score"] for r in base]))
    with open(os.path.join(out, "scores_medsynth_test.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_without_config_uses_the_saved_one(run, restored, tmp_path, capsys):
    wd, _ = run
    task, params = restored
    expected = _declared(task, params)[0]["predictions"][:4]
    overrides, _ = config_lib.parse_overrides(TRAIN)
    saved = eval_cli.config_from_checkpoint(wd)
    given = run_lib.load(SMOKE, overrides)
    assert json.loads(json.dumps(saved.to_dict())) == json.loads(json.dumps(given.to_dict()))
    out = str(tmp_path / "out")
    assert eval_cli.main(["--checkpoint", wd, "--out", out, "--protocol", "exact", "--limit",
                          "4", "--baselines", "off"] + COMMON + CLI) == 0
    assert "protocol exact (version 1)" in capsys.readouterr().out
    rows = _rows(os.path.join(out, "predictions_medsynth_test_exact_real.jsonl"))
    assert [r["prediction"] for r in rows] == [p["prediction"] for p in expected]
    assert [r["score"] for r in rows] == [
        float(scoring.normalise(p["prediction"]) == scoring.normalise(p["answer"]))
        for p in expected]


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "llava"], "unknown protocol 'llava'; known protocols: exact, llava_med, "
                              "llava_med_batch, llava_med_strict, medevalkit, "
                              "medevalkit_strict, medsynth, report, token_f1"),
    (["--benchmark", "nope"], "unknown benchmark 'nope'; known benchmarks: medsynth, "
                              "medsynth_report"),
    (["--baselines", "none"], "unknown baseline(s) ['none']"),
])
def test_evaluate_cli_names_unknown_names(tmp_path, capsys, flags, message):
    assert eval_cli.main(["--config", SMOKE, "--checkpoint", str(tmp_path)] + flags) == 2
    assert message in capsys.readouterr().err


def test_evaluate_cli_wrong_checkpoint_dir(tmp_path, capsys):
    assert eval_cli.main(["--config", SMOKE, "--checkpoint", str(tmp_path)] + COMMON) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "neither a training workdir" in err
    assert eval_cli.main(["--checkpoint", str(tmp_path)]) == 2   # no config to take either
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "pass --config" in err


def test_benchmark_options_from_the_command_line():
    assert eval_cli.parse_options(["include_zh=true", "access=all", "limit=3"]) == {
        "include_zh": True, "access": "all", "limit": 3}
    assert eval_cli.parse_options([]) == {}
    with pytest.raises(Exception, match="expected KEY=VALUE"):
        eval_cli.parse_options(["include_zh"])


def test_generation_files_of_the_cli(tmp_path, capsys):
    out = str(tmp_path)
    shard = eval_cli._store(out, "vqa_rad", "test", "/ckpt", 5, False, (1, 2), {"a": 1})
    assert re.search(r"generations_vqa_rad_test_\w{10}\.shard1of2\.jsonl$", shard.path)
    shard.add([("k1", "q1", "yes")])
    whole = eval_cli._store(out, "vqa_rad", "test", "/ckpt", 5, False, None, {"a": 1})
    assert whole.path == shard.path.replace(".shard1of2", "") and whole.get("k1") == "yes"
    # Another step or config: another file, nothing reused.
    assert "k1" not in eval_cli._store(out, "vqa_rad", "test", "/ckpt", 6, False, None,
                                       {"a": 1})
    assert "k1" not in eval_cli._store(out, "vqa_rad", "test", "/ckpt", 5, False, None,
                                       {"a": 2})
    fresh = eval_cli._store(out, "vqa_rad", "test", "/ckpt", 5, True, None, {"a": 1})
    assert "k1" not in fresh and not os.path.exists(shard.path)
    assert eval_cli.parse_shard("1/4") == (1, 4) and eval_cli.parse_shard(None) is None
    with pytest.raises(Exception, match="expected K/N"):
        eval_cli.parse_shard("4/4")
