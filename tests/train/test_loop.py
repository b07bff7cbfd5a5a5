"""The shared loop end to end on the MedSynth SFT smoke config: exact resume, SIGTERM,
sharding, non-finite guard, config validation."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.tasks.sft import SFTTask
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import cli, loop

SMOKE = "configs/medsynth_sft.py:smoke"
BASE = [("train.log_every", 1), ("train.progress", False), ("sft.eval_studies", 0),
        ("optim.schedule", "constant"), ("model.text.num_layers", 1), ("model.vision.depth", 1)]


def _config(*overrides):
    return config_lib.load_config(SMOKE, BASE + list(overrides))


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _final_params(workdir, config, tokenizer):
    """Restores the newest checkpoint's params as plain numpy."""
    task = SFTTask(config, tokenizer)
    mngr = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    state = mngr.restore_state(step)  # Without a target: arrays as saved.
    return step, jax.tree.map(np.asarray, state["params"])


def test_resume_is_bit_exact(tmp_path, tokenizer):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    cfg6 = _config(("train.steps", 6), ("train.checkpoint_every", 3))
    loop.train(cfg6, straight, SFTTask(cfg6, tokenizer))
    cfg3 = _config(("train.steps", 3), ("train.checkpoint_every", 3))
    loop.train(cfg3, split, SFTTask(cfg3, tokenizer))
    loop.train(cfg6, split, SFTTask(cfg6, tokenizer))  # Resumes at step 3.
    a, b = _losses(straight), _losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)  # Identical floats, not merely close.
    sa, pa = _final_params(straight, cfg6, tokenizer)
    sb, pb = _final_params(split, cfg6, tokenizer)
    assert sa == sb == 6
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_same_loss_on_every_mesh(tmp_path, tokenizer):
    losses = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = dict(zip(("data", "fsdp", "tensor"), shape))
        cfg = _config(("train.steps", 2), ("train.checkpoint_every", 100),
                      ("train.mesh", mesh))
        wd = str(tmp_path / "x".join(map(str, shape)))
        loop.train(cfg, wd, SFTTask(cfg, tokenizer), devices=jax.devices()[:int(np.prod(shape))])
        losses[shape] = _losses(wd)
    ref = losses[(1, 1, 1)]
    for shape, l in losses.items():
        for s in ref:
            assert abs(l[s] - ref[s]) <= 1e-5 * abs(ref[s]), (shape, l, ref)


def test_params_are_sharded_as_the_rules_say(tokenizer):
    cfg = _config()
    task = SFTTask(cfg, tokenizer)
    mesh = loop.mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(8))
    shardings = loop._shardings(boxed, mesh)
    emb = shardings["decoder"]["embedding"].spec  # [vocab, embed]
    assert tuple(emb) == ("tensor", "fsdp")
    q = shardings["decoder"]["layers_0"]["attn"]["q"].spec  # [embed, heads, head_dim]
    assert tuple(q)[:2] == ("fsdp", "tensor")


class _NaNTask(SFTTask):
    def loss(self, params, batch, rng):
        loss, aux = super().loss(params, batch, rng)
        return loss * np.nan, aux


def test_non_finite_steps_in_a_row_abort(tmp_path, tokenizer):
    cfg = _config(("train.steps", 6), ("train.max_nonfinite_in_a_row", 2))
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        loop.train(cfg, str(tmp_path), _NaNTask(cfg, tokenizer))


def test_config_errors_fail_fast(tmp_path):
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "medvl_jax.train", "--config", SMOKE, "--workdir",
         str(tmp_path), *a], capture_output=True, text=True, timeout=120)
    p = run("--config.train.stepz=3")
    assert p.returncode != 0 and "train.stepz" in p.stderr and "steps" in p.stderr
    p = run("--config.data.batch_size=6")
    assert p.returncode != 0 and "not divisible by the data-parallel size" in p.stderr
    assert not os.path.exists(tmp_path / "checkpoints" / "1")
    cfg = config_lib.load_config_file(SMOKE)
    cfg.unknown_section = 1
    with pytest.raises(KeyError, match="unknown_section"):
        cli.validate(cfg)


def test_sigterm_saves_and_resume_continues(tmp_path):
    wd = str(tmp_path)
    args = [sys.executable, "-m", "medvl_jax.train", "--config", SMOKE, "--workdir", wd,
            "--config.train.steps=400", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.sft.eval_studies=0",
            "--config.model.text.num_layers=1", "--config.model.vision.depth=1",
            "--config.train.checkpoint_every=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved step" in out
    saved = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints")).latest_step()
    assert saved is not None and 2 <= saved < 400
    # Resume for a few more steps: it starts right after the saved step.
    p = subprocess.run(args[:-7] + ["--config.train.steps=%d" % (saved + 2),
                                    "--config.model.text.num_layers=1",
                                    "--config.model.vision.depth=1",
                                    "--config.train.log_every=1",
                                    "--config.train.progress=False",
                                    "--config.sft.eval_studies=0"],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from step {saved}" in p.stdout
    steps = [json.loads(l)["step"] for l in open(metrics)]
    assert steps[-2:] == [saved + 1, saved + 2]
