"""make_attn_mask against hand-written masks."""
from __future__ import annotations

import numpy as np

from medvl_jax.models.masks import causal_mask, make_attn_mask, sliding_window_mask


def test_prefix_lm_mask_by_hand():
    # Two prefix tokens (bidirectional), then two causal tokens, then padding.
    m = np.asarray(make_attn_mask(np.array([[1, 1, 1, 1, 0]]), np.array([[0, 0, 1, 1, 1]])))[0]
    want = np.array([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ], bool)
    np.testing.assert_array_equal(m, want)


def test_causal_and_image_groups_and_window():
    n = 6
    np.testing.assert_array_equal(np.asarray(causal_mask(np.ones((1, n))))[0],
                                  np.tril(np.ones((n, n), bool)))
    groups = np.array([[0, 1, 1, 1, 0, 0]])  # one image at tokens 1..3
    m = np.asarray(make_attn_mask(np.ones((1, n)), np.ones((1, n)), image_groups=groups))[0]
    want = np.tril(np.ones((n, n), bool))
    want[1:4, 1:4] = True
    np.testing.assert_array_equal(m, want)
    w = np.asarray(make_attn_mask(np.ones((1, n)), np.ones((1, n)), sliding_window=2))[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(w, (j <= i) & (i - j < 2))
    np.testing.assert_array_equal(np.asarray(sliding_window_mask(2, 5, 3, q_offset=3)),
                                  np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool))
