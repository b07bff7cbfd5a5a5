"""Contrastive losses against NumPy versions of the published formulas; sharded (ring and
all-gather) losses and their gradients against the single-device losses on 8 fake devices."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.parallel.mesh import make_mesh
from medvl_jax.tasks import contrastive_losses as cl

RTOL = 1e-5


def _pairs(b, d, seed=0, noise=1.0):
    """Normalised embeddings whose positives are correlated (a realistic loss range)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(b, d))
    txt = img + noise * rng.normal(size=(b, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _np_logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# --- NumPy references (float64), written from the papers' formulas. ---

def np_clip(img, txt, logit_scale):
    x, y = img.astype(np.float64), txt.astype(np.float64)
    logits = np.exp(logit_scale) * x @ y.T
    labels = np.arange(len(x))
    ce_i2t = _np_logsumexp(logits, 1) - logits[labels, labels]
    ce_t2i = _np_logsumexp(logits.T, 1) - logits.T[labels, labels]
    return 0.5 * (ce_i2t.mean() + ce_t2i.mean())


def np_convirt(img, txt, tau, lam):
    v, u = img.astype(np.float64), txt.astype(np.float64)
    n = len(v)
    total = 0.0
    for i in range(n):
        cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
        v2u = [np.exp(cos(v[i], u[k]) / tau) for k in range(n)]
        u2v = [np.exp(cos(u[i], v[k]) / tau) for k in range(n)]
        l_vu = -np.log(v2u[i] / sum(v2u))
        l_uv = -np.log(u2v[i] / sum(u2v))
        total += lam * l_vu + (1 - lam) * l_uv
    return total / n


def np_siglip(img, txt, logit_scale, logit_bias):
    x, y = img.astype(np.float64), txt.astype(np.float64)
    n = len(x)
    t = np.exp(logit_scale)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += np.log(1.0 / (1.0 + np.exp(-z * (t * x[i] @ y[j] + logit_bias))))
    return -total / n


@pytest.mark.parametrize("logit_scale", [0.0, np.log(1 / 0.07), 4.6])
def test_clip_matches_numpy(logit_scale):
    img, txt = _pairs(24, 16, seed=1)
    got = cl.clip_loss(img, txt, logit_scale)
    assert _rel(got, np_clip(img, txt, logit_scale)) <= RTOL


@pytest.mark.parametrize("tau,lam", [(0.1, 0.75), (0.5, 0.3), (1.0, 1.0)])
def test_convirt_matches_numpy(tau, lam):
    img, txt = _pairs(20, 12, seed=2)
    got = cl.convirt_loss(img, txt, tau, lam)
    assert _rel(got, np_convirt(img, txt, tau, lam)) <= RTOL


def test_convirt_half_is_clip():
    img, txt = _pairs(16, 8, seed=3)
    np.testing.assert_allclose(cl.convirt_loss(img, txt, 0.2, 0.5),
                               cl.clip_loss(img, txt, np.log(5.0)), rtol=1e-6)


@pytest.mark.parametrize("logit_scale,logit_bias", [(np.log(10.0), -10.0), (1.0, 0.5)])
def test_siglip_matches_numpy(logit_scale, logit_bias):
    img, txt = _pairs(20, 12, seed=4)
    got = cl.siglip_loss(img, txt, logit_scale, logit_bias)
    assert _rel(got, np_siglip(img, txt, logit_scale, logit_bias)) <= RTOL


def test_plain_losses_reject_bad_shapes():
    img, txt = _pairs(8, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        cl.clip_loss(img, txt[:6], 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, D\]"):
        cl.siglip_loss(img[0], txt[0], 1.0, 0.0)


# --- Sharded losses. ---

def _reference(kind):
    if kind == "siglip":
        return lambda i, t, s, b: cl.siglip_loss(i, t, s, b)
    if kind == "clip":
        return lambda i, t, s, b: cl.clip_loss(i, t, s)
    return lambda i, t, s, b: cl.convirt_loss(i, t, s, b)


_ARGS = {"siglip": (np.log(10.0), -10.0), "clip": (np.log(1 / 0.07), 0.0),
         "convirt": (0.1, 0.75)}


def _check_sharded(kind, mesh_shape, impl, batch_axes=("data", "fsdp"), b=64, d=16):
    mesh = make_mesh(mesh_shape)
    img, txt = _pairs(b, d, seed=5)
    scale, bias = (jnp.float32(a) for a in _ARGS[kind])
    argnums = (0, 1, 2, 3)
    want_v, want_g = jax.jit(jax.value_and_grad(_reference(kind), argnums))(img, txt, scale, bias)
    fn = cl.make_sharded_loss(kind, mesh, batch_axes, impl=impl)
    got_v, got_g = jax.jit(jax.value_and_grad(fn, argnums))(img, txt, scale, bias)
    assert _rel(got_v, want_v) <= RTOL, (float(got_v), float(want_v))
    for name, g, w in zip(("img", "txt", "scale", "bias"), got_g, want_g):
        if kind == "clip" and name == "bias":  # CLIP has no bias: both gradients are zero.
            assert float(g) == 0.0 and float(w) == 0.0
            continue
        if kind == "convirt" and name == "bias":
            # d loss / d lam = l(v->u) - l(u->v): a difference of two nearly equal terms, so
            # fp32 rounding is measured against the terms, not against their small difference.
            terms = np_convirt(img, txt, 0.1, 1.0) + np_convirt(img, txt, 0.1, 0.0)
            assert abs(float(g) - float(w)) <= RTOL * terms, (float(g), float(w), terms)
            continue
        assert _rel(g, w) <= RTOL, (name, _rel(g, w))


@pytest.mark.parametrize("kind", cl.KINDS)
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 4},
                                        {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data8", "data2xfsdp4", "data2xfsdp2xtensor2"])
def test_ring_loss_and_grads_match_single_device(kind, mesh_shape):
    _check_sharded(kind, mesh_shape, "ring")


@pytest.mark.parametrize("kind", cl.KINDS)
def test_all_gather_loss_and_grads_match_single_device(kind):
    _check_sharded(kind, {"data": 2, "fsdp": 4}, "all_gather")


def test_ring_single_axis_name():
    _check_sharded("siglip", {"fsdp": 8}, "ring", batch_axes="fsdp")


def test_sharded_inside_user_shard_map():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    img, txt = _pairs(32, 8, seed=6)
    spec = jax.P(("data", "fsdp"))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(spec, spec), out_specs=jax.P())
    def both(i, t):
        return (cl.sharded_siglip_loss(i, t, 2.0, -1.0, ("data", "fsdp")),
                cl.sharded_convirt_loss(i, t, 0.2, 0.6, ("data", "fsdp")))

    sig, con = both(img, txt)
    assert _rel(sig, np_siglip(img, txt, 2.0, -1.0)) <= RTOL
    assert _rel(con, np_convirt(img, txt, 0.2, 0.6)) <= RTOL


def test_sharded_errors():
    mesh = make_mesh({"data": 8})
    img, txt = _pairs(12, 4)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        cl.make_sharded_loss("clip", mesh)(img, txt, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cl.make_sharded_loss("clip", mesh)(img[:8], txt[:4], 1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        cl.make_sharded_loss("infonce", mesh)
    with pytest.raises(ValueError, match="impl must be one of"):
        cl.make_sharded_loss("clip", mesh, impl="gather")
    with pytest.raises(ValueError, match="not in mesh axes"):
        cl.make_sharded_loss("clip", mesh, ("data", "batch"))


def _compiled(kind, impl, b, d, mesh):
    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    fn = cl.make_sharded_loss(kind, mesh, impl=impl)
    return jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3))).lower(x, x, s, s).compile()


def _array_dims(hlo_text):
    dims = set()
    for m in re.finditer(r"\b[a-z]+[0-9]*\[([0-9,]*)\]", hlo_text):
        dims.update(int(v) for v in m.group(1).split(",") if v)
    return dims


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_ring_never_holds_a_global_batch_dimension(kind):
    # Per-device HLO after partitioning: with B = 96 split 8 ways, the ring's arrays are
    # built from b = 12 and D = 20 only; the all-gather variant has [12, 96] logits.
    mesh = make_mesh({"data": 8})
    ring = _array_dims(_compiled(kind, "ring", 96, 20, mesh).as_text())
    gather = _array_dims(_compiled(kind, "all_gather", 96, 20, mesh).as_text())
    assert 96 not in ring, sorted(ring)
    assert 96 in gather  # The check can see a global dimension when there is one.
    # And the per-device scratch memory grows far slower than the all-gather variant's.
    ring_mem = _compiled(kind, "ring", 2048, 20, mesh).memory_analysis().temp_size_in_bytes
    gather_mem = _compiled(kind, "all_gather", 2048, 20, mesh).memory_analysis().temp_size_in_bytes
    assert ring_mem * 4 < gather_mem, (ring_mem, gather_mem)
    assert ring_mem < 2048 * 2048 * 4 / 8  # Less than one device's b x B fp32 logits.
