"""The sine-cosine initialisation of the vision tower's position table."""
import math

import jax
import numpy as np
import pytest

from medvl_jax.models.vision import VisionConfig, VisionEncoder, sincos2d_init


def test_sincos_table_entries_by_hand():
    table = np.asarray(sincos2d_init(3)(None, (9, 8)))
    # width 8: 2 frequencies (1, 1/100) per block [sin row, cos row, sin col, cos col].
    r, c = 2, 1  # patch index 2 * 3 + 1 = 7
    expected = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
                math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    np.testing.assert_allclose(table[7], expected, rtol=1e-6)
    clip = np.asarray(sincos2d_init(3, clip=True)(None, (10, 8)))
    np.testing.assert_array_equal(clip[0], 0.0)
    np.testing.assert_allclose(clip[8], expected, rtol=1e-6)


def test_encoder_uses_it_and_bad_values_fail():
    cfg = VisionConfig(image_size=16, patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16,
                       pos_init="sincos2d")
    params = VisionEncoder(cfg).init(jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"]
    pos = np.asarray(jax.tree.leaves(params["pos"])[0])
    np.testing.assert_allclose(pos, np.asarray(sincos2d_init(4)(None, (16, 8))))
    with pytest.raises(ValueError, match="pos_init"):
        VisionConfig(pos_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos2d_init(2)(None, (4, 6))
