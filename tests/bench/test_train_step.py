"""The training-step benchmark's two sides compute the same first-step loss (micro model)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medvl_jax.bench import train_step as ts  # noqa: E402


def test_first_step_losses_agree(tmp_path):
    hf_model, config, params = ts.build_models(str(tmp_path), ts.MICRO_VISION, ts.MICRO_TEXT)
    tokens, images = ts.make_batch(ts.MICRO_VISION, ts.MICRO_TEXT, batch=2, seq_len=12)
    init, step = ts.jax_step_fn(config)
    state, ours = step(init(params), tokens, images)
    theirs = ts.torch_step_fn(hf_model)(*ts.torch_inputs(tokens, images))
    assert np.isfinite(float(ours))
    np.testing.assert_allclose(float(ours), theirs, rtol=1e-4)
