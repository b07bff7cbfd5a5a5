"""The real training command as a two-process JAX job, against the same config in one process.

``python -m launch.local`` starts ``python -m medvl_jax.train`` twice (2 fake CPU devices
each, gloo collectives, coordinator on 127.0.0.1); at the same time one process with 4 fake
devices trains the same config. The mesh is data=2 x fsdp=2, so the parameters are sharded
over devices of both processes and each process feeds half of every batch. Checked:

* the per-step losses and gradient norms in ``metrics.jsonl`` are the same (rtol 1e-5): each
  process read its own half of the data, and the collectives (gradient all-reduce, FSDP
  gathers, the contrastive loss's ring over all four devices) span both processes;
* the two processes wrote one checkpoint together: one step directory, files of both
  processes in its state, one data-iterator state file per process;
* resuming that checkpoint in one process is refused with an error naming both counts (the
  data position is per process);
* its parameters restore in this (single) process, on another device count, with the reader
  export and evaluation use (``convert.workdir.restore_params``), and equal the one-process
  run's at the same step (rtol 1e-5; attention key biases, whose
  gradient is zero, only hold rounding noise and are checked to stay at that level).

Cases: SFT (configs/medsynth_sft.py:smoke) and the contrastive task with its sharded sigmoid
loss (configs/medsynth_siglip.py:smoke). Three steps each, one layer per tower; the SFT case
also evaluates on one test study.
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from medvl_jax.train import restore as workdir_lib
from medvl_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
TIMEOUT_S = 900  # Generous: the 2-core CI machine may be shared with other test workers.
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def _train_args(config: str, extra: list[str]) -> list[str]:
    return ["--config", config, f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", f"--config.train.checkpoint_every={STEPS}",
            "--config.train.mesh.data=2", "--config.train.mesh.fsdp=2",
            "--config.train.mesh.tensor=1", "--config.train.progress=False", *extra]


def _run_both(tmp_path, config: str, extra: list[str]) -> tuple[str, str]:
    """Trains ``config`` as 2 processes x 2 devices and as 1 process x 4 devices, at the same
    time (the three processes share the cores); returns the two workdirs."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    args = _train_args(config, extra)
    flags = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).split()
    # Nothing from a surrounding job may leak in; the single run is told it is alone.
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                 "JAX_LOCAL_DEVICE_IDS", "SLURM_"))}
    jobs = {
        "2 processes": subprocess.Popen(
            [sys.executable, "-m", "launch.local", "--num_processes", "2",
             "--devices_per_process", "2", "--grace_s", "5", "--", *args, "--workdir", multi],
            cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "1 process": subprocess.Popen(
            [sys.executable, "-m", "medvl_jax.train", *args, "--workdir", single],
            cwd=ROOT, env={**base, "JAX_PLATFORMS": "cpu", "MEDVL_JAX_DISTRIBUTED": "0",
                           "XLA_FLAGS": " ".join(
                               flags + ["--xla_force_host_platform_device_count=4"])},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    }
    try:
        outs = {name: p.communicate(timeout=TIMEOUT_S)[0] for name, p in jobs.items()}
    finally:
        for p in jobs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in jobs.items():
        assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{outs[name][-6000:]}"
    # The launcher prefixes each process's lines with its id: both joined one 4-device job.
    for rank in range(2):
        assert f"[{rank}] jax.distributed: process {rank} of 2, 2 of 4 devices here" \
            in outs["2 processes"], outs["2 processes"][-3000:]
    return multi, single, outs["2 processes"]


def _metrics(workdir: str) -> dict[str, list[float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), workdir
    return {k: [r[k] for r in rows] for k in ("loss", "grad_norm")}


def _check(tmp_path, config: str, extra: list[str]) -> tuple[str, str, str]:
    """Runs both and checks them; returns the two workdirs and the two-process output."""
    multi, single, out = _run_both(tmp_path, config, extra)

    # Same training, step by step.
    a, b = _metrics(multi), _metrics(single)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, err_msg="loss per step")
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5,
                               err_msg="gradient norm per step")

    # One checkpoint, written by both processes together.
    ckpts = os.path.join(multi, "checkpoints")
    assert sorted(os.listdir(ckpts)) == [str(STEPS)]
    step_dir = os.path.join(ckpts, str(STEPS))
    assert sorted(os.listdir(os.path.join(step_dir, "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    for rank in range(2):
        with open(os.path.join(step_dir, "data", f"process_{rank}-of-2.json")) as f:
            assert json.load(f), f"process {rank}'s data-iterator state is empty"
    state_files = [os.path.relpath(os.path.join(d, n), step_dir)
                   for d, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
    for rank in range(2):  # Orbax names each process's part of the state after it.
        files = [f for f in state_files if f"process_{rank}" in f]
        assert files, f"process {rank} wrote nothing into {step_dir}/state"

    # Resuming it in one process would misplace the data: refused, naming both counts.
    manager = ckpt_lib.CheckpointManager(ckpts, async_save=False)
    assert manager.data_process_count(STEPS) == 2
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*this run has 1"):
        manager.restore(STEPS, None, None)

    # ... which restores in this one process (its own device count) to the one-process run's
    # parameters at the same step.
    _, _, got, step = workdir_lib.restore_params(multi)
    _, _, want, want_step = workdir_lib.restore_params(single)
    assert step == want_step == STEPS
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name, x, y = jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)
        if name.endswith("['k_bias']"):
            # A key bias adds the same q.b to every score of a query, which the softmax
            # ignores: its gradient is zero up to rounding, and Adam turns that rounding
            # (which depends on the reduction order) into tiny updates. Nothing to compare
            # but that both stayed at that noise level (they start at zero).
            assert max(np.abs(x).max(), np.abs(y).max()) < 1e-5, name
            continue
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    return multi, single, out


# One layer per tower instead of the smoke configs' 2-4: compilation is most of each run, and
# this makes the two cases about 40% faster; nothing checked depends on the depth.
def test_sft_two_processes_match_one(tmp_path):
    """... and the end-of-run evaluation: both processes take part, process 0 alone prints
    and writes results.json, which holds the one-process run's answers."""
    # Unpacked: each process packs the examples it reads into its own rows, so packed rows
    # (the main config's) differ between a two-process and a one-process run.
    multi, single, out = _check(tmp_path, "configs/medsynth_sft.py:smoke",
                                ["--config.model.vision.depth=1", "--config.evals.test.batch_size=8",
                                 *[f"--config.evals.test.data.{s}.num_studies=1"
                                   for s in ("cxr", "cxr_closed", "pairs")],
                                 "--config.model.text.num_layers=1", "--config.data.pack=False",
                                 "--config.data.qa_per_example=2", "--config.data.max_images=2"])
    assert out.count("results written to") == 1 and "[0] results written to" in out, out[-3000:]
    results = []
    for workdir in (multi, single):
        with open(os.path.join(workdir, "results.json")) as f:
            results.append(json.load(f))
    results = [r["test"] for r in results]
    assert results[0]["num_questions"] == results[1]["num_questions"] > 0
    assert results[0]["per_type"] == results[1]["per_type"]


def test_contrastive_sharded_loss_two_processes_match_one(tmp_path):
    _check(tmp_path, "configs/medsynth_siglip.py:smoke",
           ["--config.evals={}", "--config.contrastive.sharded=True",
            "--config.model.vision.depth=1", "--config.model.text.depth=1"])
