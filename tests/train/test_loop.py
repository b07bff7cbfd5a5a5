"""The shared loop with the real SFT task and the CLI (MedSynth smoke config): the VLM's
parameters sharded by the rules, config errors failing fast, SIGTERM save and resume through
``python -m medvl_jax.train``. The loop's own behaviour (bit-exact resume, meshes, guards) is
tested on a tiny task in the other files of this folder."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.tasks.sft import SFTTask
from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.parallel import rules
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import guards
from medvl_jax.train import run as run_lib

SMOKE = "configs/medsynth_sft.py:smoke"
BASE = [("train.log_every", 1), ("train.progress", False), ("evals", {}),
        ("optim.schedule", "constant"), ("model.text.num_layers", 1), ("model.vision.depth", 1)]


def _config(*overrides):
    return config_lib.load_config(SMOKE, BASE + list(overrides))


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")


def test_params_are_sharded_as_the_rules_say(tokenizer):
    cfg = _config()
    task = SFTTask(cfg, tokenizer)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(8))
    shardings = rules.logical_shardings(boxed, mesh)
    emb = shardings["decoder"]["embedding"].spec  # [vocab, embed]
    assert tuple(emb) == ("tensor", "fsdp")
    q = shardings["decoder"]["layers_0"]["attn"]["q"].spec  # [embed, heads, head_dim]
    assert tuple(q)[:2] == ("fsdp", "tensor")


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
        run_lib.validate(cfg)


def test_sigterm_saves_and_resume_continues(tmp_path):
    wd = str(tmp_path)
    args = [sys.executable, "-m", "medvl_jax.train", "--config", SMOKE, "--workdir", wd,
            "--config.train.steps=400", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.evals={}",
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
    assert proc.returncode == guards.PREEMPTED_EXIT_CODE == 75, err[-2000:]
    assert "SIGTERM: saved step" in out
    saved = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints")).latest_step()
    assert saved is not None and 2 <= saved < 400
    # Resume for a few more steps: it starts right after the saved step.
    p = subprocess.run(args[:-7] + ["--config.train.steps=%d" % (saved + 2),
                                    "--config.model.text.num_layers=1",
                                    "--config.model.vision.depth=1",
                                    "--config.train.log_every=1",
                                    "--config.train.progress=False",
                                    "--config.evals={}"],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from step {saved}" in p.stdout
    steps = [json.loads(l)["step"] for l in open(metrics)]
    assert steps[-2:] == [saved + 1, saved + 2]
