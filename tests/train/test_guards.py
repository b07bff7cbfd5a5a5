"""Guards of the loop: non-finite steps skipped and counted, too many in a row abort, config
typos and indivisible batches fail before any work."""
import json
import os

import grain
import jax
import numpy as np
import pytest

from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import loop
from tests.train import tiny


def _poisoned(bad_batches):
    """tiny.data_iter, with NaN inputs in the batches (0-based) of ``bad_batches``."""

    def fn(config, *, process_index=0, process_count=1):
        d = config.data
        ds = grain.MapDataset.source(tiny._examples(d.num_examples, d.seed)).shuffle(seed=d.seed)
        ds = ds.repeat(None).batch(d.batch_size, drop_remainder=True)

        def poison(i, b):
            if i in bad_batches:
                b = {**b, "x": np.full_like(b["x"], np.nan)}
            return b

        return iter(ds.map_with_index(poison))

    return fn


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return list(map(json.loads, f))


def _params(workdir):
    mngr = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    return step, jax.tree.map(np.asarray, mngr.restore_state(step)["params"])


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    clean, bad = str(tmp_path / "clean"), str(tmp_path / "bad")
    loop.train(tiny.config(steps=2), clean, tiny.TinyTask(), data_iter_fn=_poisoned(set()))
    loop.train(tiny.config(steps=3, max_nonfinite_in_a_row=2), bad, tiny.TinyTask(),
               data_iter_fn=_poisoned({2}))
    rows = _rows(bad)
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1]
    assert not np.isfinite(rows[2]["loss"])
    # Step 3 applied no update: the parameters are those after step 2, bit for bit.
    (s1, p_clean), (s2, p_bad) = _params(clean), _params(bad)
    assert (s1, s2) == (2, 3)
    jax.tree.map(np.testing.assert_array_equal, p_clean, p_bad)


def test_too_many_non_finite_steps_in_a_row_abort(tmp_path):
    # Two bad steps, a good one, then three bad ones: only the second run trips the limit.
    cfg = tiny.config(steps=8, max_nonfinite_in_a_row=3, log_every=4)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss or "
                                                 r"gradient \(by step 8"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=_poisoned({0, 1, 3, 4, 5}))
    rows = _rows(str(tmp_path))
    assert [r["step"] for r in rows] == [4, 8] and rows[-1]["skipped_nonfinite"] == 5


def test_config_typo_fails_fast_naming_the_key(tmp_path):
    cfg = tiny.config()
    cfg.train.stepz = 3
    with pytest.raises(KeyError, match=r"train\.stepz.*did you mean steps"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    cfg = tiny.config()
    cfg.optim.warmup = 3
    with pytest.raises(KeyError, match=r"optim\.warmup"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    # A whole config against a schema of defaults, nested sections included.
    schema = tiny.config()
    cfg = tiny.config()
    cfg.data.num_exampels = 5
    with pytest.raises(KeyError, match=r"data\.num_exampels.*num_examples"):
        loop.validate_config(cfg, schema)
    cfg = tiny.config()
    cfg.modle = {}
    with pytest.raises(KeyError, match="'modle'"):
        loop.validate_config(cfg, schema)
    assert not os.listdir(tmp_path)  # Nothing was written.


def test_indivisible_batch_fails_fast(tmp_path):
    cfg = tiny.config()
    cfg.data.batch_size = 12
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the data-parallel "
                                         r"size 8"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    cfg = tiny.config(mesh={"data": 2, "fsdp": 2, "tensor": 2})
    cfg.data.batch_size = 12
    cfg.optim.grad_accum = 2
    with pytest.raises(ValueError, match=r"not divisible by optim.grad_accum=2 x the "
                                         r"data-parallel size 4"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_non_grain_data_is_refused(tmp_path):
    with pytest.raises(TypeError, match="must be a grain iterator"):
        loop.train(tiny.config(), str(tmp_path), tiny.TinyTask(),
                   data_iter_fn=lambda c, **kw: iter([]))
