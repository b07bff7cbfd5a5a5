"""Two real processes (4 CPU devices each, gloo collectives) train the tiny task: each reads
its own shard of the data, SIGTERM on one process makes both save the same step, and the
resumed two-process run matches a one-process run on 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from medvl_jax.train import loop
from tests.train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(workdir, steps, sigterm_at_on_process_0=None):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        extra = [str(sigterm_at_on_process_0)] if i == 0 and sigterm_at_on_process_0 else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.train.tiny", workdir, str(steps), *extra], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_with_preemption_match_one(tmp_path):
    straight, multi = str(tmp_path / "straight"), str(tmp_path / "multi")
    loop.train(tiny.config(steps=6, checkpoint_every=0), straight, tiny.TinyTask(),
               data_iter_fn=tiny.data_iter)
    outs = _job(multi, 6, sigterm_at_on_process_0=3)
    assert all("SIGTERM: saved step 3" in o for o in outs)  # Both stopped at the same step.
    data = os.path.join(multi, "checkpoints", "3", "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data))
    outs = _job(multi, 6)
    assert all("resumed from step 3" in o for o in outs)

    def losses(wd):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(f"{wd}/metrics.jsonl"))]

    a, b = losses(straight), losses(multi)
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6] == [s for s, _ in a]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
