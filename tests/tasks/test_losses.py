"""Token losses against a NumPy implementation of cross-entropy."""
import numpy as np
import pytest

from medvl_jax.tasks import losses


def _np_nll(logits, tokens):
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


@pytest.mark.parametrize("normalise", ["token", "example"])
def test_next_token_loss_matches_numpy(normalise):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 9, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 9)).astype(np.int32)
    mask = np.zeros((3, 9), np.int32)
    mask[0, 5:8] = 1
    mask[1, 2:9] = 1  # Example 2 has no trained token: it must not count in "example" mode.
    loss, m = losses.next_token_loss(logits, tokens, mask, normalise=normalise)
    nll, tm = _np_nll(logits, tokens), mask[:, 1:]
    if normalise == "token":
        want = (nll * tm).sum() / tm.sum()
    else:
        want = np.mean([(nll[i] * tm[i]).sum() / tm[i].sum() for i in (0, 1)])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["num_tokens"]) == 10
    pred = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    np.testing.assert_allclose(float(m["token_accuracy"]), (pred * tm).sum() / 10, rtol=1e-6)
