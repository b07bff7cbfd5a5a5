"""A tiny real task for the loop's tests: a 2-layer MLP classifier on synthetic data.

The data is a grain MapDataset (shuffled per epoch, repeated, batched), so its iterator state
is real. Labels are ``argmax(x @ W_true)`` for a fixed random ``W_true``. The parameters carry
logical axis names so sharding follows medvl_jax.parallel.rules.

Run as a script (``python -m tests.train.tiny WORKDIR STEPS [SIGTERM_AT | stall]``) it trains
in ``WORKDIR``; with SIGTERM_AT it sends itself SIGTERM while fetching that step's batch; with
``stall`` the data blocks forever after two batches (prints STALLED when it does). With
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set it is one process of a
multi-process job.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.tasks import base
from medvl_jax.train import loop, optim

DIM, HIDDEN, CLASSES = 8, 16, 4


def config(**train) -> ml_collections.ConfigDict:
    """A complete config: train/optim defaults for a few-second run, and the data section."""
    c = ml_collections.ConfigDict()
    c.train = loop.default_config()
    c.train.update(dict(steps=8, log_every=1, checkpoint_every=100, progress=False,
                        mesh={"data": -1, "fsdp": 1, "tensor": 1}))
    c.train.update(train)
    c.optim = optim.default_config()
    c.optim.update(dict(lr=0.05, warmup_steps=2, schedule="cosine", weight_decay=0.01))
    c.data = ml_collections.ConfigDict(dict(batch_size=16, num_examples=200, seed=1))
    return c


def _examples(n: int, seed: int) -> list[dict]:
    r = np.random.default_rng(seed)
    w_true = np.random.default_rng(12345).normal(size=(DIM, CLASSES))
    x = r.normal(size=(n, DIM)).astype(np.float32)
    y = np.argmax(x @ w_true, axis=1).astype(np.int32)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def data_iter(config, *, process_index: int = 0, process_count: int = 1):
    """This process's batches: shuffled each epoch, endless."""
    d = config.data
    ds = grain.MapDataset.source(_examples(d.num_examples, d.seed)).shuffle(seed=d.seed)
    ds = ds.repeat(None)[process_index::process_count]
    return iter(ds.batch(d.batch_size // process_count, drop_remainder=True))


class MLP(nn.Module):
    """LayerNorm → Dense(embed→mlp) → gelu → Dense(mlp→vocab)."""

    @nn.compact
    def __call__(self, x):
        p = nn.with_logical_partitioning
        x = nn.LayerNorm(scale_init=p(nn.initializers.ones, ("embed",)),
                         bias_init=p(nn.initializers.zeros, ("embed",)), name="norm")(x)
        x = nn.Dense(HIDDEN, kernel_init=p(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=p(nn.initializers.zeros, ("mlp",)), name="hidden")(x)
        x = nn.gelu(x)
        return nn.Dense(CLASSES, kernel_init=p(nn.initializers.lecun_normal(), ("mlp", "vocab")),
                        bias_init=p(nn.initializers.zeros, ("vocab",)), name="out")(x)


class TinyTask(base.Task):
    """Softmax cross-entropy, averaged over the batch."""

    name = "tiny"
    flops_per_example = 6.0 * (DIM * HIDDEN + HIDDEN * CLASSES)

    def __init__(self):
        super().__init__(ml_collections.ConfigDict())
        self.model = MLP()

    def dummy_batch(self, batch_size: int) -> dict:
        return {"x": np.zeros((batch_size, DIM), np.float32),
                "y": np.zeros((batch_size,), np.int32)}

    def init(self, rng, batch):
        return self.model.init(rng, batch["x"])["params"]

    def loss(self, params, batch, rng):
        logits = self.model.apply({"params": params}, batch["x"])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return jnp.mean(nll), {"accuracy": acc}


class Validation:
    """A held-out accuracy evaluator for the loop (``every`` steps and at the end)."""

    def __init__(self, task: TinyTask, every: int = 0):
        self.every = every
        held_out = _examples(64, seed=99)
        self.x = np.stack([e["x"] for e in held_out])
        self.y = np.stack([e["y"] for e in held_out])
        self.apply = jax.jit(task.model.apply)

    def __call__(self, params):
        logits = np.asarray(self.apply({"params": params}, self.x))
        return {"accuracy": float(np.mean(logits.argmax(-1) == self.y)), "n": len(self.y)}


class _SigtermAt(grain.DatasetIterator):
    """Passes batches through; sends this process SIGTERM when fetching batch ``at``."""

    def __init__(self, it, at: int):
        super().__init__(it)
        self._it, self._at, self._n = it, at, 0

    def __next__(self):
        self._n += 1
        if self._n == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._it)

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


class _StallAfter(_SigtermAt):
    """Passes ``at`` batches through, then blocks forever (a hung file system)."""

    def __next__(self):
        self._n += 1
        if self._n > self._at:
            print("STALLED", flush=True)
            while True:
                time.sleep(1)
        return next(self._it)


if __name__ == "__main__":
    if "JAX_COORDINATOR_ADDRESS" in os.environ:  # A local multi-process run (gloo on CPU).
        from medvl_jax.parallel import mesh as mesh_lib

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        mesh_lib.maybe_initialize_distributed()
    workdir, steps = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else None
    cfg = config(steps=steps, checkpoint_every=2)

    def data_fn(c, **kw):
        it = data_iter(c, **kw)
        if mode == "stall":
            return _StallAfter(it, 2)
        return _SigtermAt(it, int(mode)) if mode else it

    task = TinyTask()
    out = loop.train(cfg, workdir, task, evaluators={"val": Validation(task)},
                     data_iter_fn=data_fn)
    print("RESULT", out)
