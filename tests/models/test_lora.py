"""LoRA: factor layout, exact merge, identity at init, training only the factors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.models import lora
from medvl_jax.models.decoder import Decoder, DecoderConfig
from medvl_jax.train import state as state_lib

TARGETS = r"attn/(q|k|v|o)$|mlp/(gate|down)$"


def _decoder(scan: bool):
    c = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=48, scan_layers=scan)
    model = Decoder(c)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((7, 7), bool)), (2, 7, 7))
    boxed = jax.jit(lambda r: model.init(r, tokens, positions=pos, attn_mask=mask))(
        jax.random.key(0))["params"]

    @jax.jit
    def logits(params):
        return model.apply({"params": params}, tokens, positions=pos, attn_mask=mask)[0]

    return boxed, logits


def _init_lora(boxed, c):
    return jax.jit(lambda r: lora.init_lora(r, boxed, c))(jax.random.key(1))


def _config(rank=3, targets=TARGETS, **kw):
    c = lora.default_config()
    c.rank, c.targets = rank, targets
    c.update(kw)
    return c


def _randomise_b(tree, seed=1):
    """Non-zero b factors (a is already random)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = [rng.normal(size=x.shape).astype(np.float32) * 0.1
           if state_lib.path_str(p).endswith("/b") else np.asarray(x) for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("scan", [False, True])
def test_merge_equals_numpy(scan):
    boxed, _ = _decoder(scan)
    c = _config(alpha=6.0)
    base = nn.unbox(boxed)
    factors = _randomise_b(nn.unbox(_init_lora(boxed, c)))
    merged = lora.merge({**base, "lora": factors}, c)
    assert "lora" not in merged
    flat_b, flat_m, flat_f = (state_lib.flatten(t) for t in (base, merged, factors))
    targets = {k.rpartition("/")[0] for k in flat_f}
    assert len(targets) == 12 if not scan else len(targets) == 6
    s = 6.0 / 3
    for path, w in flat_b.items():
        w = np.asarray(w, np.float64)
        if path not in targets:
            np.testing.assert_array_equal(np.asarray(flat_m[path]), w)
            continue
        a, b = (np.asarray(flat_f[f"{path}/{x}"], np.float64) for x in "ab")
        n_in = 2 if path.endswith("attn/o") else 1  # o: [heads, head_dim | embed]
        if scan:
            want = np.stack([w[i] + s * (a[i].reshape(-1, 3) @ b[i].reshape(3, -1)).reshape(
                w.shape[1:]) for i in range(w.shape[0])])
            assert a.shape == w.shape[:1 + n_in] + (3,)
        else:
            want = w + s * (a.reshape(-1, 3) @ b.reshape(3, -1)).reshape(w.shape)
            assert a.shape == w.shape[:n_in] + (3,)
        np.testing.assert_allclose(np.asarray(flat_m[path]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_init_is_the_base_model(scan):
    boxed, logits = _decoder(scan)
    c = _config()
    params = {**boxed, "lora": _init_lora(boxed, c)}
    # Logical names follow the kernels' (rank axis unnamed); b starts at zero, a does not.
    a_box = params["lora"]["layers" if scan else "layers_0"]["attn"]["o"]["a"]
    assert a_box.names == (("layers",) if scan else ()) + ("heads", "head_dim", None)
    params = nn.unbox(params)
    for path, x in state_lib.flatten(params["lora"]).items():
        assert bool(jnp.all(x == 0)) == path.endswith("/b")
    base = nn.unbox(boxed)
    np.testing.assert_array_equal(np.asarray(logits(lora.merge(params, c))),
                                  np.asarray(logits(base)))
    # merged_params keeps dtypes; without a lora entry it is the identity.
    assert jax.tree.map(lambda x: x.dtype, lora.merged_params(params, c)) == \
        jax.tree.map(lambda x: x.dtype, base)


def test_dropout_only_when_training():
    boxed, _ = _decoder(False)
    c = _config(dropout=0.5)
    params = nn.unbox({**boxed, "lora": _init_lora(boxed, c)})
    params["lora"] = _randomise_b(params["lora"])
    plain = lora.merge(params, c)
    same = lora.merge(params, c, rng=jax.random.key(3), deterministic=True)
    dropped = lora.merge(params, c, rng=jax.random.key(3), deterministic=False)
    q = ("layers_0", "attn", "q")
    get = lambda t: np.asarray(t[q[0]][q[1]][q[2]])  # noqa: E731
    np.testing.assert_array_equal(get(plain), get(same))
    diff = get(dropped) - get(plain)
    # Whole input features (rows of q's [embed, heads, head_dim]) are dropped or rescaled.
    w = np.asarray(params["layers_0"]["attn"]["q"])
    rows_dropped = np.all(np.isclose(get(dropped), w, atol=1e-7), axis=(1, 2))
    assert 0 < rows_dropped.sum() < w.shape[0]
    np.testing.assert_allclose(diff[~rows_dropped],
                               (get(plain) - w)[~rows_dropped], rtol=1e-4, atol=1e-6)


def test_bad_targets_are_named():
    boxed, _ = _decoder(False)
    with pytest.raises(ValueError, match=r"lora.targets='nothing_like_this' matches no"):
        lora.init_lora(jax.random.key(0), boxed, _config(targets="nothing_like_this"))
    with pytest.raises(ValueError, match=r"'layers_0/pre_attn_norm/scale'.*not a kernel"):
        lora.init_lora(jax.random.key(0), boxed, _config(targets="layers_0/pre_attn_norm"))
    with pytest.raises(ValueError, match="lora.targets is empty"):
        lora.check_config(_config(targets=""))
    with pytest.raises(KeyError, match="lora.rnak"):
        lora.get_config({"lora": {"rnak": 2}})


def _sft_config(tmp_overrides=()):
    """The smoke SFT config with a ``lora`` section and command-line style overrides."""
    config = config_lib.load_config_file("configs/medsynth_sft.py:smoke")
    config.lora = lora.default_config()
    for key, value in tmp_overrides:
        config_lib.apply_override(config, key, value)
    config.lock()
    return config


def test_sft_trains_only_lora(tmp_path):
    import os

    from medvl_jax.data import pipeline
    from medvl_jax.train import checkpoint as ckpt_lib
    from medvl_jax.train import loop, run

    os.chdir(os.path.join(os.path.dirname(__file__), "..", ".."))
    overrides, _ = config_lib.parse_overrides([
        "--config.lora.rank=4", r"--config.lora.targets=^decoder/layers_\d+/attn/(q|v|o)$",
        "--config.train.steps=3", "--config.train.checkpoint_every=3",
        "--config.model.text.num_layers=2", "--config.model.text.embed_dim=64",
        "--config.model.text.head_dim=16", "--config.model.text.mlp_dim=96",
        "--config.model.vision.depth=1", "--config.model.vision.feature_layer=-1",
        "--config.model.vision.width=32",
        "--config.model.vision.mlp_dim=64", "--config.model.vision.num_heads=2",
        "--config.train.progress=False", "--config.evals={}",
        "--config.optim.warmup_steps=0", "--config.data.batch_size=8"])
    config = _sft_config(overrides)
    run.validate(config)
    assert loop.optim_config(config).freeze == lora.FREEZE_BASE
    from medvl_jax.tasks import sft

    task = sft.SFTTask(config, pipeline.make_tokenizer(config.tokenizer))
    dummy = task.dummy_batch(8)
    init_rng = jax.random.split(jax.random.key(config.train.seed))[0]  # As the loop.
    start = nn.unbox(jax.jit(task.init)(init_rng, dummy))
    assert set(start["lora"]["decoder"]) == {"layers_0", "layers_1"}

    loop.train(config, str(tmp_path), task)
    manager = ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints"), async_save=False)
    assert manager.latest_step() == 3
    params = manager.restore_state(3)["params"]
    base, factors = lora.split(jax.tree.map(np.asarray, params))
    jax.tree.map(np.testing.assert_array_equal, base, lora.split(start)[0])
    for path, x in state_lib.flatten(factors).items():
        if path.endswith("/b"):
            assert np.abs(x).max() > 0, path
    merged = task.model_params(params)
    assert "lora" not in merged
    q0 = np.asarray(merged["decoder"]["layers_0"]["attn"]["q"])
    assert not np.array_equal(q0, start["decoder"]["layers_0"]["attn"]["q"])
