"""The conversion engine's error reporting and the safetensors reader/writer."""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from medvl_jax.convert import hf_io
from medvl_jax.convert.mapping import (COPY, DENSE, DENSE_OUT, ConversionError, Mapping, Rule,
                                       hf_to_ours, ours_to_hf)

RULES = Mapping((
    Rule("emb.weight", "embedding", COPY),
    Rule("layers.{i}.q.weight", "layers/{i}/q", DENSE),
    Rule("layers.{i}.o.weight", "layers/{i}/o", DENSE_OUT),
), ignore_hf=(r"inv_freq$",))


class _Shape:
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)


def _target(scanned: bool):
    if scanned:
        return {"embedding": _Shape((4,)), "layers": {"q": _Shape((2, 3, 2, 2)),
                                                      "o": _Shape((2, 2, 2, 3))}}
    return {"embedding": _Shape((4,)),
            **{f"layers_{i}": {"q": _Shape((3, 2, 2)), "o": _Shape((2, 2, 3))} for i in range(2)}}


def _hf_tensors():
    rng = np.random.default_rng(0)
    out = {"emb.weight": rng.normal(size=4).astype(np.float32), "rope.inv_freq": np.ones(2)}
    for i in range(2):
        out[f"layers.{i}.q.weight"] = rng.normal(size=(4, 3)).astype(np.float32)
        out[f"layers.{i}.o.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
    return out


@pytest.mark.parametrize("scanned", [False, True])
def test_layouts_match_numpy_reference(scanned):
    hf = _hf_tensors()
    params = hf_to_ours(hf.items(), RULES, _target(scanned), scanned=scanned)
    q0 = params["layers"]["q"][0] if scanned else params["layers_0"]["q"]
    o1 = params["layers"]["o"][1] if scanned else params["layers_1"]["o"]
    # q: torch y = x @ W.T, ours y = einsum("e,ehd->hd"); o: ours [h, d, e].
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_allclose(np.einsum("e,ehd->hd", x, q0).reshape(-1),
                               x @ hf["layers.0.q.weight"].T, rtol=1e-6)
    z = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(np.einsum("hd,hde->e", z.reshape(2, 2), o1),
                               z @ hf["layers.1.o.weight"].T, rtol=1e-6)
    back = dict(ours_to_hf(params, RULES, scanned=scanned))
    assert sorted(back) == sorted(k for k in hf if "inv_freq" not in k)
    for k, v in back.items():
        np.testing.assert_array_equal(v, hf[k])


def test_errors_name_missing_unexpected_and_misshaped():
    hf = _hf_tensors()
    del hf["layers.1.q.weight"]
    hf["layers.0.extra.weight"] = np.zeros(3, np.float32)
    hf["layers.0.o.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(ConversionError) as err:
        hf_to_ours(hf.items(), RULES, _target(True), scanned=True, where="ckpt")
    e = err.value
    assert e.unexpected == ["layers.0.extra.weight"]
    assert any("layers/q layers [1]" in m for m in e.missing)
    assert any("layers/o layers [0]" in m for m in e.missing)
    assert len(e.misshaped) == 1 and "layers.0.o.weight (5, 4)" in e.misshaped[0]
    assert str(e).startswith("ckpt: ")


def test_export_rejects_params_without_rule():
    params = {"embedding": np.zeros(4, np.float32), "stray": np.zeros(2, np.float32)}
    with pytest.raises(ConversionError, match="stray"):
        list(ours_to_hf(params, RULES, scanned=False))


def test_sharded_checkpoint_roundtrip_with_bfloat16(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(1)
    tensors = [(f"t{i}", rng.normal(size=(8, 8)).astype(np.float32)) for i in range(5)]
    tensors.append(("b", rng.normal(size=(3,)).astype(ml_dtypes.bfloat16)))
    names = hf_io.save_checkpoint(str(tmp_path), iter(tensors), max_shard_bytes=600)
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.load(open(os.path.join(tmp_path, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == {n for n, _ in tensors}
    got = dict(hf_io.iter_checkpoint(str(tmp_path)))
    for name, arr in tensors:
        assert got[name].dtype == arr.dtype
        np.testing.assert_array_equal(np.asarray(got[name], np.float32), arr.astype(np.float32))
    # An independent reader (the safetensors package) reads the float32 shards too.
    first = load_file(os.path.join(tmp_path, names[0]))
    np.testing.assert_array_equal(first["t0"], tensors[0][1])
