"""KV-cache sampler against transformers' ``generate`` and a full non-cached forward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert.decoders import load_hf_decoder  # noqa: E402
from medvl_jax.convert.vlm import load_hf_vlm  # noqa: E402
from medvl_jax.models.decoder import Decoder  # noqa: E402
from medvl_jax.models.masks import causal_mask  # noqa: E402
from medvl_jax.sampling.filters import top_k_mask, top_p_mask  # noqa: E402
from medvl_jax.sampling.sampler import generate, left_pad  # noqa: E402

NEW = 16
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)


def _hf_decoder(family: str, path: str):
    t = transformers
    cls, extra = {"llama": (t.LlamaConfig, {}), "qwen2": (t.Qwen2Config, {}),
                  "gemma": (t.GemmaConfig, dict(head_dim=8))}[family]
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(cls(**COMMON, **extra), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper distributions: fewer near-ties between top tokens
    model.eval().save_pretrained(path)
    return model


def _hf_greedy(model, prompt: list[int], **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                               dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def decoder(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = _hf_decoder(request.param, path)
    config, params = load_hf_decoder(path)
    return model, config, jax.tree.map(jnp.asarray, params)


PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 2, 60], [90, 91, 92, 93, 94]]


def test_greedy_matches_transformers_and_batching(decoder):
    model, config, params = decoder
    # The longest prompt alone, and a left-padded batch of prompts of different lengths: each
    # row must equal transformers' greedy generation of that prompt alone (unpadded).
    single = generate(config, params, np.array([PROMPTS[0]]), max_new_tokens=NEW)
    assert single.lengths.tolist() == [NEW] and not single.done[0]
    tokens, mask = left_pad(PROMPTS)
    batch = generate(config, params, tokens, mask, max_new_tokens=NEW)
    assert single.tokens[0].tolist() == _hf_greedy(model, PROMPTS[0])
    for i, prompt in enumerate(PROMPTS):
        assert batch.tokens[i].tolist() == _hf_greedy(model, prompt)
    np.testing.assert_allclose(batch.logprobs[0], single.logprobs[0], atol=1e-4)


def _full_logprobs(config, params, prompt, completion) -> np.ndarray:
    seq = np.array([list(prompt) + list(completion)], np.int32)
    mask = np.ones_like(seq, bool)
    pos = np.arange(seq.shape[1])[None]
    logits, _ = Decoder(config).apply({"params": params}, seq, positions=pos,
                                      attn_mask=causal_mask(mask))
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    start = len(prompt) - 1
    return logp[np.arange(start, start + len(completion)), np.asarray(completion)]


def test_sampled_logprobs_equal_full_forward(decoder):
    _, config, params = decoder
    tokens, mask = left_pad(PROMPTS)
    out = generate(config, params, tokens, mask, max_new_tokens=NEW, rng=jax.random.key(3),
                   temperature=1.3, top_k=20, top_p=0.9)
    again = generate(config, params, tokens, mask, max_new_tokens=NEW, rng=jax.random.key(3),
                     temperature=1.3, top_k=20, top_p=0.9)
    np.testing.assert_array_equal(out.tokens, again.tokens)  # deterministic given the key
    for i, prompt in enumerate(PROMPTS):
        ref = _full_logprobs(config, params, prompt, out.tokens[i])
        np.testing.assert_allclose(out.logprobs[i], ref, atol=1e-4)
    # top-k = 1 is greedy whatever the temperature.
    k1 = generate(config, params, tokens, mask, max_new_tokens=NEW, rng=jax.random.key(5),
                  temperature=2.0, top_k=1)
    greedy = generate(config, params, tokens, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)


def test_stop_tokens_end_rows(decoder):
    _, config, params = decoder
    tokens, mask = left_pad(PROMPTS)
    greedy = generate(config, params, tokens, mask, max_new_tokens=NEW)
    # Stop row 0 at its 4th token and row 1 at its 7th (two stop ids); row 2 may run on.
    stops = [int(greedy.tokens[0, 3]), int(greedy.tokens[1, 6])]
    out = generate(config, params, tokens, mask, max_new_tokens=NEW, stop_tokens=stops,
                   pad_id=-7)
    for i in range(3):
        row = greedy.tokens[i].tolist()
        hits = [j for j, tok in enumerate(row) if tok in stops]
        end = hits[0] + 1 if hits else NEW
        assert out.lengths[i] == end
        assert bool(out.done[i]) == bool(hits)
        assert out.tokens[i, :end].tolist() == row[:end]
        assert (out.tokens[i, end:] == -7).all() and (out.logprobs[i, end:] == 0).all()
    assert out.lengths[0] <= 4 and out.lengths[1] <= 7


def _np_top_k(x, k):
    kth = np.sort(x)[::-1][k - 1]
    return x >= kth


def _np_top_p(x, p):
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x.max())
    probs /= probs.sum()
    keep = np.zeros_like(x, bool)
    total = 0.0
    for idx, pr in zip(order, probs):
        keep[idx] = True
        total += pr
        if total >= p:
            break
    return keep


def test_filters_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    for k in (1, 5, 50):
        got = np.asarray(top_k_mask(jnp.asarray(logits), jnp.int32(k)))
        for r in range(4):
            np.testing.assert_array_equal(got[r], _np_top_k(logits[r], k))
    assert np.asarray(top_k_mask(jnp.asarray(logits), jnp.int32(0))).all()
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cums = np.cumsum(np.sort(probs / probs.sum(axis=1, keepdims=True), axis=1)[:, ::-1], axis=1)
    for p in (0.05, 0.3, 0.5, 0.75, 0.9):
        got = np.asarray(top_p_mask(jnp.asarray(logits), jnp.float32(p)))
        for r in range(4):
            if np.abs(cums[r] - p).min() < 1e-5:
                continue  # float32 vs float64 rounding could decide a token exactly at p
            np.testing.assert_array_equal(got[r], _np_top_p(logits[r].astype(np.float64), p))
    assert np.asarray(top_p_mask(jnp.asarray(logits), jnp.float32(1.0))).all()


IMG_TOK = 127


def _tiny_llava(vision_layers: int):
    """A random tiny transformers LLaVA (CLIP vision, Llama text, image token IMG_TOK)."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=16,
                  patch_size=8)
    text = dict(model_type="llama", **{k: v for k, v in COMMON.items()}, head_dim=8)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=IMG_TOK)
    torch.manual_seed(0)
    return transformers.AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager")


def test_llava_greedy_with_images_matches_transformers(tmp_path):
    img_tok = IMG_TOK
    model = _tiny_llava(2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.eval().save_pretrained(str(tmp_path))
    config, params = load_hf_vlm(str(tmp_path))
    params = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    prompts = [[3, 4] + [img_tok] * 4 + [9, 10, 11], [7] + [img_tok] * 4 + [12]]
    tokens, mask = left_pad(prompts)
    batch = generate(config, params, tokens, mask, images=images, max_new_tokens=NEW)
    for i, prompt in enumerate(prompts):
        pix = torch.tensor(images[i].transpose(0, 3, 1, 2))
        ref = _hf_greedy(model, prompt, pixel_values=pix)
        assert batch.tokens[i].tolist() == ref


def test_vlm_never_samples_its_image_placeholder(tmp_path):
    """A VLM whose head prefers the image token still never emits it (it would become an image
    slot in the next forward pass): greedy and sampled rows both leave it out, and the
    sampled log-probs are those of the distribution without it."""
    img_tok = IMG_TOK
    model = _tiny_llava(1)
    with torch.no_grad():  # The image token's head row: large and constant.
        head = model.lm_head if hasattr(model, "lm_head") else model.language_model.lm_head
        head.weight[img_tok] = 0.0
        head.weight[img_tok, :] += 50.0 / head.weight.shape[1]
    model.eval().save_pretrained(str(tmp_path))
    config, params = load_hf_vlm(str(tmp_path))
    params = jax.tree.map(jnp.asarray, params)
    images = np.random.default_rng(1).normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    tokens, mask = left_pad([[3] + [img_tok] * 4 + [9], [7] + [img_tok] * 4 + [12]])
    greedy = generate(config, params, tokens, mask, images=images, max_new_tokens=NEW)
    sampled = generate(config, params, tokens, mask, images=images, max_new_tokens=NEW,
                       rng=jax.random.key(0), temperature=1.0)
    for out in (greedy, sampled):
        assert img_tok not in out.tokens.tolist()[0] + out.tokens.tolist()[1]
    # Unmasked, the placeholder would be the most likely first token (of a row at least).
    from medvl_jax.models.vlm import VLM

    seq = np.concatenate([tokens, sampled.tokens[:, :1]], 1)
    logits, _ = VLM(config).apply({"params": params}, seq, images, input_mask=np.ones_like(seq),
                                  mask_ar=np.ones_like(seq))
    first = np.asarray(logits, np.float64)[:, tokens.shape[1] - 1]
    assert (first.argmax(-1) == img_tok).any()
    first[:, img_tok] = -np.inf
    top = first.max(-1, keepdims=True)
    logp = first - top - np.log(np.exp(first - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(sampled.logprobs[:, 0],
                               logp[np.arange(2), sampled.tokens[:, 0]], atol=1e-4)
