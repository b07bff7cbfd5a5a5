"""The attention entry point: splash (Pallas, interpret mode on CPU) equals the xla path.

Every mask kind the towers use (causal with padding, prefix-LM, Gemma 3 image blocks, sliding
windows, packed segments, key padding, soft-capping), grouped-query heads, a length (150) that
is not a multiple of the kernel's 128-token blocks: outputs and gradients with respect to q, k
and v agree within 1e-5 in float32 on every query row that sees a key (rows that see none are
padding: their output is unspecified). The structured masks are checked against the dense
ones they stand for, and the backend/mask -> implementation choice (cuDNN included, which
cannot run here) as a pure function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medvl_jax import config as config_lib
from medvl_jax.models import attention as A
from medvl_jax.models import masks as M
from medvl_jax.models.vlm import image_groups

B, LEN, H, K, D = 2, 150, 2, 1, 8
TOL = 1e-5


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, LEN, n, D)), jnp.float32) for n in (H, K, K))
    valid = np.ones((B, LEN), bool)
    valid[0, 131:] = False  # right padding
    valid[1, :5] = False  # left padding
    return q, k, v, valid, jnp.asarray(rng.normal(size=(B, LEN, H, D)), jnp.float32)


def _groups():
    img = np.zeros((B, LEN), bool)
    img[0, 10:40] = img[0, 100:140] = img[1, 50:60] = True
    return image_groups(jnp.asarray(img))


def _prefix_ar(lengths=(37, 140)):
    ar = np.ones((B, LEN), np.int32)
    for b, n in enumerate(lengths):
        ar[b, :n] = 0
    return ar


def _masks(valid):
    segs = np.ones((B, LEN), np.int32)
    segs[0, 70:] = 2
    segs[1, 120:] = 2
    return {
        "causal_softcap": (M.attn_mask(valid), 5.0),
        "prefix_lm_packed": (M.attn_mask(valid, _prefix_ar(), segment_ids=segs), None),
        "image_blocks_window_softcap": (
            M.attn_mask(valid, np.ones((B, LEN), np.int32), image_groups=_groups())
            .replace(window=24, local=True), 5.0),
        "causal_window": (M.attn_mask(valid).replace(window=24, local=True), None),
        "key_padding": (M.key_padding_mask(valid), None),
        "full": (None, None),
    }


@pytest.mark.parametrize("name", list(_masks(np.ones((B, LEN), bool))))
def test_splash_equals_xla(name):
    q, k, v, valid, cot = _inputs()
    mask, softcap = _masks(valid)[name]
    dense = None if mask is None else jnp.broadcast_to(mask.dense_mask(), (B, LEN, LEN))
    seen = np.ones((B, LEN), bool) if dense is None else np.asarray(dense.any(-1))
    weights = cot * seen[..., None, None]

    def run(impl):
        def f(q, k, v):
            return A.attend(q, k, v, mask, scale=0.3, softcap=softcap, impl=impl)
        loss = lambda *a: jnp.sum(f(*a) * weights)  # noqa: E731
        return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    (out_s, grads_s), (out_x, grads_x) = jax.jit(lambda: (run("splash"), run("xla")))()
    diff = float(jnp.max(jnp.abs(out_s - out_x) * seen[..., None, None]))
    gdiff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads_s, grads_x))
    print(f"{name}: max abs diff output {diff:.1e}, gradients {gdiff:.1e}")
    assert diff <= TOL and gdiff <= TOL
    assert all(bool(jnp.isfinite(g).all()) for g in grads_s)


def test_traced_window_flag_and_mesh():
    """Scanned layers pass the local flag traced (a cond between the two kernels); under a
    mesh the kernel runs in shard_map over the batch and heads."""
    from medvl_jax.parallel.mesh import make_mesh
    from medvl_jax.parallel.rules import activation_rules

    _, _, _, valid, _ = _inputs()
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, LEN, n, D)), jnp.float32) for n in (4, 2, 2))
    mask = M.attn_mask(valid, _prefix_ar()).replace(window=24)
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])

    @jax.jit
    def both(flag, q, k, v):
        m = mask.replace(local=flag)
        return (A.attend(q, k, v, m, scale=0.3, impl="splash"),
                A.attend(q, k, v, m, scale=0.3, impl="xla"))

    shard = jax.sharding.NamedSharding(mesh, P("data", None, "tensor", None))
    args = [jax.device_put(x, shard) for x in (q, k, v)]
    with activation_rules(mesh):
        lowered = both.lower(jnp.asarray(True), *args)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        for flag in (True, False):
            got, want = both(jnp.asarray(flag), *args)
            seen = np.asarray(jnp.broadcast_to(
                mask.replace(local=flag).dense_mask(), (B, LEN, LEN)).any(-1))
            assert float(jnp.max(jnp.abs(got - want) * seen[..., None, None])) <= TOL


def test_structure_matches_dense():
    """Each structured mask allows exactly what its dense array allows on rows that see a
    key: the brute-force reading of (causal, last_key, segments, window) equals ``dense``."""
    _, _, _, valid, _ = _inputs()
    i = np.arange(LEN)
    for name, (mask, _) in _masks(valid).items():
        if mask is None:
            continue
        dense = np.asarray(jnp.broadcast_to(mask.dense_mask(), (B, LEN, LEN)))
        allowed = np.ones((B, LEN, LEN), bool)
        if mask.last_key is not None:
            allowed &= i[None, None, :] <= np.asarray(mask.last_key)[:, :, None]
        elif mask.causal:
            allowed &= i[None, :, None] >= i[None, None, :]
        if mask.q_segments is not None:
            allowed &= (np.asarray(mask.q_segments)[:, :, None]
                        == np.asarray(mask.kv_segments)[:, None, :])
        if mask.window is not None and mask.local:
            allowed &= (i[:, None] - i[None, :] < mask.window)[None]
        seen = dense.any(-1)
        np.testing.assert_array_equal(allowed[seen], dense[seen], err_msg=name)
        assert allowed.any(-1).all(), name  # no empty row reaches a kernel (NaN-free)


def test_last_keys_follow_mask_ar_and_groups():
    ar = jnp.asarray([[0, 0, 0, 1, 1, 0, 1]])
    np.testing.assert_array_equal(M.last_keys(ar)[0], [2, 2, 2, 3, 5, 5, 6])
    groups = jnp.asarray([[0, 1, 1, 0, 2, 2, 0]])
    np.testing.assert_array_equal(M.last_keys(jnp.ones((1, 7), jnp.int32), groups)[0],
                                  [0, 2, 2, 3, 5, 5, 6])


def test_choose_impl():
    common = dict(dtype=jnp.bfloat16, head_dim=128, q_len=300, kv_len=300)
    assert A.choose_impl("auto", platform="cpu", kind="causal", **common) == ("xla", None)
    assert A.choose_impl("auto", platform="tpu", kind="rows", **common) == ("splash", None)
    assert A.choose_impl("auto", platform="gpu", kind="causal", **common) == ("cudnn", None)
    assert A.choose_impl("xla", platform="tpu", kind="causal", **common) == ("xla", None)
    for impl in ("splash", "auto"):
        chosen, why = A.choose_impl(impl, platform="tpu", kind="dense", **common)
        assert chosen == "xla" and "dense array" in why
    assert A.choose_impl("cudnn", platform="gpu", kind="dense", **common) == ("cudnn", None)
    assert A.choose_impl("splash", platform="cpu", kind="full", **common)[0] == "splash"
    _, why = A.choose_impl("splash", platform="tpu", kind="causal", **{**common, "q_len": 1})
    assert "different query and key" in why
    long = {**common, "q_len": 40_000, "kv_len": 40_000}
    assert A.choose_impl("splash", platform="tpu", kind="rows", windowed=True, **long)[0] == "xla"
    assert A.choose_impl("splash", platform="tpu", kind="causal", windowed=True, **long)[0] \
        == "splash"
    # cuDNN: bf16/fp16 only, no soft-cap, head dims it supports, a GPU.
    assert "float32" in A.choose_impl("cudnn", platform="gpu", kind="causal",
                                      **{**common, "dtype": jnp.float32})[1]
    assert "soft-capping" in A.choose_impl("cudnn", platform="gpu", kind="causal", softcap=50.0,
                                           **common)[1]
    assert "head dim" in A.choose_impl("cudnn", platform="gpu", kind="causal",
                                       cudnn_max_head_dim=128, **{**common, "head_dim": 256})[1]
    assert A.choose_impl("cudnn", platform="gpu", kind="rows", **common) == ("cudnn", None)
    assert "GPU" in A.choose_impl("cudnn", platform="tpu", kind="causal", **common)[1]
    with pytest.raises(ValueError, match="attention_impl"):
        A.choose_impl("flash", platform="cpu", kind="causal", **common)


def test_fallback_logged_once(caplog):
    q, k, v, valid, _ = _inputs()
    dense = M.make_attn_mask(valid, np.ones((B, LEN), np.int32))
    A._LOGGED.clear()
    with caplog.at_level("WARNING", logger=A.__name__):
        for _ in range(3):
            out = A.attend(q, k, v, dense, scale=0.3, impl="splash")
    assert sum("dense array" in r.message for r in caplog.records) == 1
    np.testing.assert_array_equal(out, A.attend(q, k, v, dense, scale=0.3, impl="xla"))


def test_config_plumbing():
    from medvl_jax.models.decoder import DecoderConfig
    from medvl_jax.models.vision import VisionConfig
    from medvl_jax.models.vlm import VLMConfig

    assert DecoderConfig().attention_impl == VisionConfig().attention_impl == "auto"
    vlm = VLMConfig(vision=VisionConfig(), text=DecoderConfig(), attention_impl="splash")
    assert vlm.vision.attention_impl == vlm.text.attention_impl == "splash"
    with pytest.raises(ValueError, match="attention_impl"):
        DecoderConfig(attention_impl="flash")
    assert set(config_lib.VALUE_CHECKS["model.*.attention_impl"].choices) == set(A.IMPLS)
    cfg = {"model": {"attention_impl": "flash"}}
    with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
        config_lib.check_values(cfg)
    with pytest.raises(config_lib.ConfigError, match="model.text.attention_impl"):
        config_lib.check_values({"model": {"text": {"attention_impl": "fused"}}})
