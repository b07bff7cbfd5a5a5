"""Logical axis names of the decoder/VLM params and a sharded forward on 8 fake CPU devices."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from medvl_jax.models.decoder import Decoder, DecoderConfig
from medvl_jax.models.masks import causal_mask

RULES = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("layers", None),
         ("length", None))


def _config(scan: bool) -> DecoderConfig:
    return DecoderConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, mlp_dim=128, qkv_bias=True, qk_norm=True, sliding_window=4,
                         layer_types=("local", "global"), scan_layers=scan, remat_policy="dots")


def _init(model, tokens, pos, mask):
    return lambda: model.init(jax.random.key(0), tokens, positions=pos, attn_mask=mask)


def test_logical_axis_names():
    tokens = jnp.zeros((1, 4), jnp.int32)
    mask = causal_mask(jnp.ones((1, 4), bool))
    for scan in (False, True):
        abstract = jax.eval_shape(_init(Decoder(_config(scan)), tokens, tokens, mask))
        specs = nn.get_partition_spec(abstract)["params"]
        assert specs["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
        layer = specs["layers"] if scan else specs["layers_0"]
        lead = ("layers",) if scan else ()
        assert tuple(layer["attn"]["q"]) == lead + ("embed", "heads", "head_dim")
        assert tuple(layer["attn"]["k_bias"]) == lead + ("kv_heads", "head_dim")
        assert tuple(layer["attn"]["o"]) == lead + ("heads", "head_dim", "embed")
        assert tuple(layer["mlp"]["down"]) == lead + ("mlp", "embed")
        assert tuple(layer["attn"]["q_norm"]["scale"]) == lead + ("head_dim",)


def test_sharded_forward_matches_single_device():
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    model = Decoder(_config(True))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, size=(4, 16)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(16), (4, 16))
    mask = causal_mask(jnp.ones((4, 16), bool))
    init = _init(model, tokens, pos, mask)
    reference = nn.meta.unbox(init())
    want = model.apply(reference, tokens, positions=pos, attn_mask=mask)[0]
    with mesh, nn.logical_axis_rules(RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(init)),
                                                mesh, RULES)
        variables = jax.jit(init, out_shardings=shardings)()
        q = variables["params"]["layers"]["attn"]["q"].value
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        got = jax.jit(lambda v: model.apply(v, tokens, positions=pos, attn_mask=mask)[0])(variables)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
