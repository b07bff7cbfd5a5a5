"""GRPO task: a rollout of a tiny VLM and two inner updates on it, driven by hand as the loop
hook would (rollout with the current params, then mu jitted updates)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.tasks import grpo


def test_rollout_and_inner_updates():
    base = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    config = ml_collections.ConfigDict(base.to_dict())
    del config["sft"]
    config.task = "grpo"
    config.data.pack = False  # GRPO builds its own batches.
    config.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=2)}
    config.data.max_images = 1
    config.data.batch_size = 4
    config.grpo = grpo.GRPOTask.default_config()
    config.grpo.update(group_size=2, max_new_tokens=6, mu=2, beta=0.04,
                       rewards={"accuracy": 1.0, "length": 0.5}, length_buffer=2)
    tok = pipeline.make_tokenizer(config.tokenizer)
    params = nn.unbox(jax.jit(grpo.GRPOTask(config, tok).init)(
        jax.random.key(0), grpo.GRPOTask(config, tok).dummy_batch(4)))
    task = grpo.GRPOTask(config, tok, reference_params=params)
    examples = pipeline.question_examples(
        {"cxr": {**config.data.sources["cxr"], "num_studies": 1}}, "test")[:2]

    batch = task.rollout(params, examples, jax.random.key(1))
    dummy = task.dummy_batch(4)
    assert {k: np.shape(v) for k, v in batch.items()} == {k: np.shape(v)
                                                          for k, v in dummy.items()}
    # Groups: rows 0-1 answer example 0, rows 2-3 example 1; advantages are zero-mean per group.
    adv = batch["advantages"].reshape(2, 2)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5)
    # Images travel with their prompts.
    np.testing.assert_array_equal(batch["images"][0], batch["images"][1])
    # The sampler's and the trainer's log-probs of the same tokens agree.
    m = batch["completion_mask"] > 0
    assert m.sum() > 0
    assert np.abs(batch["old_logp"] - batch["sampler_logp"])[m].max() < 1e-3
    lengths = batch["completion_mask"].sum(1)
    np.testing.assert_allclose(batch["reward_length"],
                               [-min(max(n - 4, 0) / 2, 1.0) for n in lengths])

    tx = optax.adam(1e-2)
    opt = tx.init(params)
    loss_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
    p = params
    for inner in range(int(config.grpo.mu)):
        (loss, met), grads = loss_fn(p, batch, jax.random.key(2))
        assert np.isfinite(float(loss))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
        if inner == 0:  # On-policy: ratio 1, nothing clipped, KL 0 (reference = start).
            assert abs(float(met["ratio_mean"]) - 1) < 1e-5
            assert float(met["clip_fraction"]) == 0.0 and abs(float(met["kl"])) < 1e-6
            assert float(met["sampler_logp_gap"]) < 1e-3
            np.testing.assert_allclose(float(met["completion_length"]), lengths.mean())
        else:  # One update later the policy has moved away from the rollout policy.
            assert abs(float(met["ratio_max"]) - 1) > 1e-4 and float(met["kl"]) > 0
        assert float(met["entropy"]) > 0
        updates, opt = tx.update(grads, opt, p)
        p = optax.apply_updates(p, updates)
    assert jnp.isfinite(met["reward_accuracy"])


def _sft_checkpoint(out: str) -> str:
    """A MedSynth SFT model (random weights) in the exported-checkpoint layout."""
    import os

    from medvl_jax.convert import checkpoint_io
    from medvl_jax.tasks.sft import SFTTask

    config = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    tok = pipeline.make_tokenizer(config.tokenizer)
    task = SFTTask(config, tok)
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0), task.dummy_batch(1)))
    checkpoint_io.save_checkpoint(out, params, {
        "family": checkpoint_io.NATIVE_VLM,
        "model_config": checkpoint_io.config_to_dict(task.model_config)})
    tok.save_pretrained(os.path.join(out, checkpoint_io.TOKENIZER_DIR))
    return out


def _losses(workdir: str) -> dict:
    import json

    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    return {r["step"]: (r["loss"], r["reward"], r["sampler_logp_gap"]) for r in rows}


def test_cli_run_through_the_loop_hook_resumes_exactly(tmp_path):
    """configs/medsynth_grpo.py:smoke through the shared loop (rollouts via prepare_batch):
    4 steps straight equal 2 steps, a stop, and 2 resumed steps; the sampler's log-probs of
    the sampled tokens equal the trainer's."""
    from medvl_jax.train import cli

    ckpt = _sft_checkpoint(str(tmp_path / "sft"))
    base = ["--config", "configs/medsynth_grpo.py:smoke", f"--config.init_from={ckpt}",
            "--config.train.progress=False", "--config.evals={}"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(base + ["--workdir", straight]) == 0
    assert cli.main(base + ["--workdir", resumed, "--config.train.steps=2"]) == 0
    assert cli.main(base + ["--workdir", resumed]) == 0
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step][:2] == b[step][:2], (step, a[step], b[step])
    assert max(v[2] for v in a.values()) < 1e-4
    # Every row says where the rollout time went, and the sampled tokens per second of
    # sampling match the logged completion lengths (G completions per prompt).
    import json

    rows = [json.loads(line) for line in open(f"{straight}/metrics.jsonl")]
    for r in rows:
        assert all(r[f"time_{k}_s"] >= 0 for k in ("update", "sample", "logp", "reward"))
        assert r["time_sample_s"] > 0 and r["time_logp_s"] > 0
        tokens = r["completion_length"] * 8  # data.batch_size completions (smoke: 8).
        np.testing.assert_allclose(r["rollout_tokens_per_s"], tokens / r["time_sample_s"],
                                   rtol=1e-4)


def test_standalone_smoke_starts_from_its_own_random_policy(tmp_path):
    """configs/medsynth_grpo.py:smoke without init_from: a random policy of the SFT smoke
    model whose reference is the run's own initial weights (recomputed from train.seed), so
    the first update is on-policy with a zero KL; the declared evaluator answers with both."""
    import json

    from medvl_jax.train import cli

    wd = str(tmp_path / "run")
    assert cli.main(["--config", "configs/medsynth_grpo.py:smoke", "--workdir", wd,
                     "--config.train.steps=1", "--config.train.progress=False"]) == 0
    row = json.loads(open(f"{wd}/metrics.jsonl").readline())
    assert abs(row["kl"]) < 1e-6 and abs(row["ratio_mean"] - 1) < 1e-5
    res = json.load(open(f"{wd}/results.json"))["test"]
    assert set(res["before"]["per_type"]) == set(res["per_type"])
