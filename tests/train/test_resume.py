"""Resume on the tiny task: bit-exact across processes (through a real SIGTERM), from an
asynchronous mid-run checkpoint, and onto another mesh."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import loop, optim
from medvl_jax.train import state as state_lib
from tests.train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 8


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _params(workdir):
    mngr = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    return step, jax.tree.map(np.asarray, mngr.restore_state(step)["params"])


def _run(workdir, steps, *extra):
    return subprocess.run([sys.executable, "-m", "tests.train.tiny", workdir, str(steps),
                           *map(str, extra)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sigterm_then_fresh_process_resume_is_bit_exact(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    loop.train(tiny.config(steps=N, checkpoint_every=2), straight, tiny.TinyTask(),
               data_iter_fn=tiny.data_iter)
    # First half: SIGTERM arrives while step 5's batch is fetched; the loop finishes that
    # step, saves it and exits cleanly.
    first = _run(split, N, 5)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SIGTERM: saved step 5" in first.stdout and "preempted_at': 5" in first.stdout
    assert sorted(int(d) for d in os.listdir(os.path.join(split, "checkpoints"))) == [4, 5]
    # Keep a copy whose newest checkpoint is the asynchronous one of step 4.
    from_async = str(tmp_path / "from_async")
    shutil.copytree(split, from_async)
    shutil.rmtree(os.path.join(from_async, "checkpoints", "5"))

    second = _run(split, N)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 5" in second.stdout
    want = _losses(straight)
    assert [s for s, _ in want] == list(range(1, N + 1))
    assert _losses(split) == want  # The same floats, step for step.
    (sa, pa), (sb, pb) = _params(straight), _params(split)
    assert sa == sb == N
    jax.tree.map(np.testing.assert_array_equal, pa, pb)

    # Resuming from the asynchronous step-4 checkpoint (in this process) replays steps 5..8
    # exactly: the saved data position is the one of step 4, not a later one.
    with open(os.path.join(from_async, "metrics.jsonl")) as f:
        kept = [l for l in f if json.loads(l)["step"] <= 4]
    with open(os.path.join(from_async, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    loop.train(tiny.config(steps=N, checkpoint_every=2), from_async, tiny.TinyTask(),
               data_iter_fn=tiny.data_iter)
    assert _losses(from_async) == want
    jax.tree.map(np.testing.assert_array_equal, _params(from_async)[1], pa)


def test_restore_onto_another_mesh(tmp_path):
    wd = str(tmp_path)
    cfg = tiny.config(steps=2, checkpoint_every=2, mesh={"data": 8, "fsdp": 1, "tensor": 1})
    loop.train(cfg, wd, tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    _, saved = _params(wd)

    task = tiny.TinyTask()
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    dummy = task.dummy_batch(16)
    _, shapes = state_lib.abstract_params(task.init, jax.random.key(0), dummy)
    tx, _ = optim.make_optimizer(cfg.optim, shapes, cfg.train.steps)
    target, _ = state_lib.abstract_state(task.init, tx, mesh, jax.random.key(0), dummy)
    mngr = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints"))
    state, meta = mngr.restore(2, target, tiny.data_iter(cfg))
    assert meta["task"] == "tiny" and meta["schema_version"] == ckpt_lib.SCHEMA_VERSION
    assert int(state.step) == 2
    kernel = state.params["hidden"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P("fsdp",
                                                                                  "tensor")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), saved)

    # And the loop itself continues on the new mesh, close to a straight run on the old one.
    straight = str(tmp_path / "straight")
    loop.train(tiny.config(steps=4, mesh={"data": 8, "fsdp": 1, "tensor": 1}), straight,
               tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    loop.train(tiny.config(steps=4, mesh={"data": 2, "fsdp": 2, "tensor": 2}), wd,
               tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    for (s1, l1), (s2, l2) in zip(_losses(straight), _losses(wd)):
        assert s1 == s2 and abs(l1 - l2) <= 1e-5 * abs(l1)
