"""FLOPs counted from a jaxpr (medvl_jax.train.flops) against hand counts."""
import jax
import jax.numpy as jnp
import pytest

from medvl_jax.models.decoder import Decoder, DecoderConfig
from medvl_jax.train import flops

f32 = jnp.float32


def S(*shape):
    return jax.ShapeDtypeStruct(shape, f32)


def test_primitives():
    assert flops.count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
                       S(2, 3, 4), S(2, 4, 5)) == 2 * 2 * 3 * 4 * 5
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count(conv, S(1, 8, 8, 3), S(2, 2, 3, 7)) == 2 * (4 * 4 * 7) * (2 * 2 * 3)

    def stack(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

    fwd = 5 * 2 * 8 * 16 * 16
    assert flops.count(stack, S(8, 16), S(5, 16, 16)) == fwd  # Body x length.
    # Gradient wrt the input only: one matmul (dh) per layer on top of the forward.
    assert flops.count(jax.grad(stack), S(8, 16), S(5, 16, 16)) == 2 * fwd
    assert flops.count(jax.grad(stack, argnums=(0, 1)), S(8, 16), S(5, 16, 16)) == 3 * fwd

    def loop(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, h: h @ w, x)

    one = 2 * 4 * 6 * 6
    assert flops.count(loop, S(4, 6), S(6, 6)) == 3 * one  # Static trip count: a scan.
    dynamic = lambda x, w, n: jax.lax.while_loop(  # noqa: E731
        lambda c: c[1] < n, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]
    assert flops.count(dynamic, S(4, 6), S(6, 6), jax.ShapeDtypeStruct((), jnp.int32),
                       while_trips=7) == 7 * one


@pytest.mark.parametrize("scan", [False, True])
def test_decoder_train_flops_equal_the_closed_form(scan):
    """value_and_grad of a decoder's loss: 3 x (2 x matmul weights x tokens + attention)."""
    c = DecoderConfig(vocab_size=96, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=48, scan_layers=scan)
    b, length = 2, 10
    model = Decoder(c)
    tokens = jnp.zeros((b, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = jnp.ones((b, length, length), bool)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens, positions=pos,
                            attn_mask=mask)["params"]

    def loss(p, batch, rng):
        logits, _ = model.apply({"params": p}, batch, positions=pos, attn_mask=mask)
        return jnp.mean(logits ** 2), {}

    e, h, kv, d, m, v = 32, 4, 2, 8, 48, 96
    per_layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * m
    forward = 2 * b * length * (3 * per_layer + e * v) + 3 * 2 * 2 * b * h * length * length * d
    assert flops.train_flops(loss, params, tokens, jax.random.key(0)) == 3 * forward
