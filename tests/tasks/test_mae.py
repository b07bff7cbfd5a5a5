"""The mae task: patchify and the per-patch-normalised masked loss against NumPy written here,
the masks (exact count, per example, deterministic, the encoder blind to masked pixels), the
encoder against vision.py's VisionEncoder (same parameters, same tokens without masking), a
3D tubelet run of ``:ct_smoke`` through the training entry point, and the pretrained tower
starting the classify recipe through ``vision_init``."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.models.vision import VisionConfig, VisionEncoder
from medvl_jax.tasks import mae
from medvl_jax.train import restore, run

CONFIG = "configs/medsynth_mae.py"
QUIET = [("train.progress", False)]


# --------------------------------------------------------------------------------------------
# NumPy references, written independently of mae.py.
# --------------------------------------------------------------------------------------------

def np_patches(images, p, tubelet=0):
    """[B, N, P] by slicing each patch out of the array, (t, h, w) raster order, each patch
    flattened in C order (frame, row, column, channel)."""
    out = []
    for img in images:
        rows = []
        if tubelet:
            d, h, w = img.shape[:3]
            for t in range(d // tubelet):
                for i in range(h // p):
                    for j in range(w // p):
                        rows.append(img[t * tubelet:(t + 1) * tubelet, i * p:(i + 1) * p,
                                        j * p:(j + 1) * p].reshape(-1))
        else:
            h, w = img.shape[:2]
            for i in range(h // p):
                for j in range(w // p):
                    rows.append(img[i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1))
        out.append(np.stack(rows))
    return np.stack(out)


def np_mae_loss(pred, images, mask, p, tubelet=0, norm_pix=True):
    """MAE's loss in float64: targets normalised per patch (unbiased variance, eps 1e-6),
    squared error averaged over each patch's pixels, then over the masked patches."""
    target = np_patches(images.astype(np.float64), p, tubelet)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, ddof=1, keepdims=True)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred.astype(np.float64) - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def set_patch(images, b, index, value, p, tubelet=0):
    """Writes ``value`` into patch ``index`` (raster order) of example ``b`` (in place)."""
    if tubelet:
        d, h, w = images.shape[1:4]
        t, rest = divmod(index, (h // p) * (w // p))
        i, j = divmod(rest, w // p)
        images[b, t * tubelet:(t + 1) * tubelet, i * p:(i + 1) * p, j * p:(j + 1) * p] = value
    else:
        i, j = divmod(index, images.shape[2] // p)
        images[b, i * p:(i + 1) * p, j * p:(j + 1) * p] = value


# --------------------------------------------------------------------------------------------
# Pure functions.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,p,tubelet", [((2, 16, 24, 3), 8, 0), ((2, 19, 17, 1), 4, 0),
                                             ((2, 6, 8, 12, 2), 4, 2), ((1, 9, 8, 8, 1), 4, 4)])
def test_patchify_equals_numpy_slicing(shape, p, tubelet):
    """2D and 3D tubelets (trailing pixels that fill no patch dropped, as the tower does)."""
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = np.asarray(mae.patchify(jnp.asarray(x), p, tubelet))
    want = np_patches(x, p, tubelet)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    n = int(np.prod(mae.patch_grid(shape, p, tubelet)))
    assert got.shape[1] == n


@pytest.mark.parametrize("tubelet", [0, 2])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_equals_numpy_reference_on_a_hand_made_mask(tubelet, norm_pix):
    rng = np.random.default_rng(1)
    p = 4
    shape = (3, 4, 8, 8, 1) if tubelet else (3, 8, 12, 2)
    images = rng.normal(size=shape).astype(np.float32)
    set_patch(images, 0, 1, 0.25, p, tubelet)  # A constant patch: variance 0, target 0.
    n = int(np.prod(mae.patch_grid(shape, p, tubelet)))
    pdim = np_patches(images, p, tubelet).shape[-1]
    pred = rng.normal(size=(3, n, pdim)).astype(np.float32)
    mask = np.zeros((3, n), bool)
    mask[0, [1, 2, 5]] = True      # Different counts per example: the mean is over patches.
    mask[1, [0]] = True
    mask[2, [n - 1, 3, 4, 2]] = True
    got = mae.mae_loss(jnp.asarray(pred), mae.patchify(jnp.asarray(images), p, tubelet),
                       jnp.asarray(mask), norm_pix)
    want = np_mae_loss(pred, images, mask, p, tubelet, norm_pix)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Predictions on visible patches do not count.
    pred2 = np.where(mask[..., None], pred, 100.0).astype(np.float32)
    got2 = mae.mae_loss(jnp.asarray(pred2), mae.patchify(jnp.asarray(images), p, tubelet),
                        jnp.asarray(mask), norm_pix)
    np.testing.assert_allclose(float(got2), want, rtol=1e-5)


def test_random_masking_exact_count_per_example_and_deterministic():
    n, m, b = 64, 48, 6
    keep, mask = mae.random_masking(jax.random.key(3), b, n, m)
    keep, mask = np.asarray(keep), np.asarray(mask)
    assert keep.shape == (b, n - m) and mask.shape == (b, n)
    np.testing.assert_array_equal(mask.sum(1), [m] * b)
    for row_keep, row_mask in zip(keep, mask):
        assert (np.diff(row_keep) > 0).all()                   # Sorted, no repeats.
        np.testing.assert_array_equal(np.flatnonzero(~row_mask), row_keep)
    assert len({row.tobytes() for row in mask}) == b           # Every example its own mask.
    again, _ = mae.random_masking(jax.random.key(3), b, n, m)
    np.testing.assert_array_equal(np.asarray(again), keep)     # Same rng, same masks.
    other, _ = mae.random_masking(jax.random.key(4), b, n, m)
    assert not np.array_equal(np.asarray(other), keep)


# --------------------------------------------------------------------------------------------
# The encoder is the vision tower.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,shape", [
    ({}, (2, 32, 32, 1)),
    ({"tubelet": 2}, (2, 8, 32, 32, 1)),
    ({"layout": "clip"}, (2, 32, 32, 3)),
    ({"scan_layers": True, "pos_init": "sincos2d"}, (2, 32, 32, 1)),
])
def test_encoder_has_the_tower_params_and_without_masking_its_tokens(changes, shape):
    c = VisionConfig(image_size=32, patch_size=8, num_channels=shape[-1], width=32, depth=2,
                     num_heads=4, mlp_dim=64, **changes)
    x = jax.random.normal(jax.random.key(1), shape)
    tower = VisionEncoder(c)
    want = nn.unbox(tower.init(jax.random.key(0), x)["params"])
    got = nn.unbox(mae.MAEEncoder(c).init(jax.random.key(0), x)["params"])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)  # Same names, shapes, initialisers, order.
    tokens, aux = tower.apply({"params": want}, x)
    out = mae.MAEEncoder(c).apply({"params": want}, x)
    if c.layout == "clip":  # The class token's post-norm is the tower's pooled output.
        np.testing.assert_allclose(out[:, 0], aux["pooled"], atol=2e-5)
    else:
        np.testing.assert_allclose(out, tokens, atol=2e-5)


@pytest.mark.parametrize("spec", [f"{CONFIG}:smoke", f"{CONFIG}:ct_smoke"])
def test_encoder_does_not_see_masked_pixels(spec):
    config = run.load(spec, QUIET)
    task = restore.build_task(config)
    v = task.model_config.vision
    params = nn.unbox(task.init(jax.random.key(0), task.dummy_batch(2)))
    rng = np.random.default_rng(0)
    images = rng.normal(size=task.dummy_batch(3)["images"].shape).astype(np.float32)
    keep, mask = task.masks(jax.random.key(5), 3)
    keep, mask = np.asarray(keep), np.asarray(mask)
    assert (mask.sum(1) == task.num_masked).all()
    assert task.num_masked == round(0.75 * task.num_patches)
    changed = images.copy()
    for b in range(3):
        for idx in np.flatnonzero(mask[b]):
            set_patch(changed, b, idx, rng.normal(size=()) * 5, v.patch_size, v.tubelet)

    def encode(x):
        return np.asarray(mae.MAEEncoder(v).apply({"params": params["vision"]}, x, keep))

    def predict(x):
        return np.asarray(task.model.apply({"params": params}, x, keep))

    assert encode(images).shape == (3, task.num_patches - task.num_masked, v.width)
    np.testing.assert_allclose(encode(changed), encode(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict(changed), predict(images), rtol=0, atol=1e-6)
    # A visible patch does change them.
    set_patch(changed, 0, int(keep[0, 0]), 3.0, v.patch_size, v.tubelet)
    assert np.abs(encode(changed)[0] - encode(images)[0]).max() > 1e-3
    # The task's loss is mae_loss of these masks (the step's rng decides them).
    loss, metrics = task.loss(params, {"images": jnp.asarray(images)}, jax.random.key(5))
    want = mae.mae_loss(predict(images), mae.patchify(images, v.patch_size, v.tubelet), mask)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    other, _ = task.loss(params, {"images": jnp.asarray(images)}, jax.random.key(6))
    assert float(other) != float(loss)
    assert 0.9 < float(metrics["loss_of_zero"]) < 1.0  # (P - 1) / P of normalised targets.


# --------------------------------------------------------------------------------------------
# Training through the entry point.
# --------------------------------------------------------------------------------------------

def _rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_ct_smoke_trains_on_tubelets(tmp_path):
    """3D: MedSynth CT volumes in tubelets through the training entry point, a few steps,
    finite loss, a checkpoint whose tower loads, and features of whole volumes."""
    wd = str(tmp_path / "ct")
    config = run.load(f"{CONFIG}:ct_smoke", QUIET + [("evals", {})])  # The probe: costly.
    assert config.model.vision.tubelet > 0 and config.data.volume_shape is not None
    assert run.train(config, wd) == 0
    rows = _rows(wd)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    _, task, params, step = restore.restore_params(wd)
    assert step == 4 and set(params) == {"vision", "decoder"}
    assert task.num_patches == 4 * 4 * 4  # 8x32x32 volumes, tubelets 2x8x8.
    assert params["vision"]["patch"].shape == (2, 8, 8, 1, 32)
    tower = restore.vision_tower(wd, task.model_config.vision)["vision"]
    assert set(tower) == set(params["vision"])
    volumes = np.random.default_rng(0).normal(size=(3, 8, 32, 32, 1)).astype(np.float32)
    feats = task.image_features(params, volumes)  # What the linear_probe evaluator reads.
    assert feats.shape == (3, 32) and np.isfinite(feats).all()


def test_mae_tower_starts_the_classify_recipe(tmp_path):
    """vision_init=<mae workdir>: the classifier's tower is the MAE encoder (checked with
    the tower frozen for the classifier's steps), its head fresh."""
    tower = str(tmp_path / "mae")
    assert run.train(run.load(f"{CONFIG}:smoke", QUIET + [("evals", {})]), tower) == 0
    _, _, want, _ = restore.restore_params(tower)
    _, _, before, _ = restore.restore_params(tower, 2)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want["vision"]),
                                                      jax.tree.leaves(before["vision"]))]
    assert any(moved)  # The tower trained: equality below is not two equal inits.
    cls = str(tmp_path / "cls")
    smoke_tower = [("model.vision.width", 32), ("model.vision.depth", 1),
                   ("model.vision.mlp_dim", 64)]
    config = run.load("configs/medsynth_classify.py:smoke", QUIET + smoke_tower + [
        ("evals", {}), ("train.steps", 2), ("train.checkpoint_every", 2),
        ("optim.freeze", "^vision/"), ("vision_init", tower)])
    assert run.train(config, cls) == 0
    _, _, got, _ = restore.restore_params(cls)
    assert "head" in got
    want, got = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in
                 (want["vision"], got["vision"]))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_config_arguments():
    for arg in ("", ":smoke", ":ct", ":ct_smoke"):
        config = run.load(f"{CONFIG}{arg}")
        assert config.task == "mae" and config.mae.mask_ratio == 0.75
        assert "probe" in config.evals
    with pytest.raises(ValueError, match="unknown argument"):
        run.load(f"{CONFIG}:nope")
