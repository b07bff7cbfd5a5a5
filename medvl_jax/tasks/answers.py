"""Answer generation: prompts of examples → batched KV-cache sampling → decoded answers.

An :class:`Answerer` turns examples (the form of :mod:`medvl_jax.data.sources`) into
LEFT-padded prompt batches of one fixed shape (``data.max_length`` tokens, ``data.max_images``
image slots) and decodes them with :func:`medvl_jax.sampling.sampler.generate`, so that every
batch of a run compiles the decode once. Evaluators, GRPO rollouts and DPO's mistake mining
all answer through it.
"""
from __future__ import annotations

import jax
import numpy as np

from medvl_jax.data import chat
from medvl_jax.data import pipeline as pipe
from medvl_jax.data.errors import DataError, located


class Answerer:
    """Answers with a :class:`~medvl_jax.tasks.policy.Policy`'s model, prompted as the
    config's data section says (template, prefix-LM, image preprocessing)."""

    def __init__(self, policy):
        self.policy = policy
        self.config = policy.config
        self.tokenizer = policy.tokenizer
        self.stop_id = self.tokenizer.convert_tokens_to_ids(chat.end_of_turn_token(
            self.config.data.template))

    def prompt_batch(self, examples: list[dict]) -> dict:
        """LEFT-padded prompts (the final answer dropped) to ``data.max_length`` tokens:
        ``tokens``, ``input_mask``, ``mask_ar`` and the preprocessed ``images``."""
        d = self.config.data
        feat = pipe.Featurizer(d, self.tokenizer, train=False)
        b, L = len(examples), d.max_length
        batch = {"tokens": np.full((b, L), self.tokenizer.pad_token_id, np.int32),
                 "input_mask": np.zeros((b, L), bool),
                 "mask_ar": np.ones((b, L), np.int32),
                 "images": np.zeros((b, d.max_images) + feat.image_shape(), np.float32)}
        for i, ex in enumerate(examples):
            try:
                images = [feat.ops(x, None) for x in pipe.decode_images(ex, d)]
            except DataError as e:  # Name the record, not only the image.
                raise located(e, ex)
            enc = chat.encode_prompt(self.tokenizer, ex["messages"], d.template,
                                     num_image_tokens=d.num_image_tokens, num_images=len(images),
                                     max_length=L, prefix_lm=d.prefix_lm, where=ex["id"])
            n = len(enc.tokens)
            batch["tokens"][i, L - n:] = enc.tokens
            batch["input_mask"][i, L - n:] = True
            batch["mask_ar"][i, L - n:] = enc.mask_ar
            if images:
                batch["images"][i, :len(images)] = images
        return batch

    def decode(self, model_params, batch: dict, max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng=None):
        """The sampler's output for a :meth:`prompt_batch` batch: greedy, or sampled at
        ``temperature`` > 0 with the key ``rng``; stops at the template's end of turn."""
        from medvl_jax.sampling import sampler

        return sampler.generate(self.policy.model_config, model_params, batch["tokens"],
                                batch["input_mask"], images=batch["images"],
                                mask_ar=batch["mask_ar"], max_new_tokens=int(max_new_tokens),
                                rng=rng, temperature=float(temperature), top_k=int(top_k),
                                top_p=float(top_p), stop_tokens=[self.stop_id],
                                pad_id=self.tokenizer.pad_token_id)

    def texts(self, out) -> list[str]:
        """Decoded answers (stop token removed, stripped) of a sampler output."""
        return [self.tokenizer.decode(row[:n - 1 if done else n].tolist(),
                                      skip_special_tokens=True).strip()
                for row, n, done in zip(np.asarray(out.tokens), np.asarray(out.lengths),
                                        np.asarray(out.done))]

    def generate_texts(self, model_params, examples: list[dict], *, batch_size: int,
                       max_new_tokens: int, temperature: float = 0.0, rng=None) -> list[str]:
        """Answers to the final question of each example, in batches of ``batch_size`` rows
        (the last padded by repeating its last example, so every batch has one shape).
        Batch ``k`` is sampled with ``fold_in(rng, k)`` when ``temperature`` > 0."""
        out = []
        for k, s in enumerate(range(0, len(examples), batch_size)):
            key = None if rng is None else jax.random.fold_in(rng, k)
            out.extend(self._batch(model_params, examples[s:s + batch_size], batch_size,
                                   max_new_tokens, temperature, key))
        return out

    def _batch(self, model_params, chunk, batch_size, max_new_tokens, temperature, key):
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        result = self.decode(model_params, self.prompt_batch(padded), max_new_tokens,
                             temperature=temperature, rng=key)
        return self.texts(result)[:len(chunk)]

    def scored_answers(self, model_params, examples: list[dict], *, batch_size: int,
                       max_new_tokens: int, temperature: float = 0.0, rng=None,
                       progress=None) -> list[dict]:
        """One row ``{"id", "type", "template", "prediction", "answer", "score"}`` per example:
        its answer scored by MedSynth's rules (:func:`medvl_jax.evaluate.scoring.score`) by
        question type. ``progress(done, total)`` after each batch."""
        from medvl_jax.evaluate import scoring

        rows, total = [], -(-len(examples) // batch_size)
        for k, s in enumerate(range(0, len(examples), batch_size)):
            chunk = examples[s:s + batch_size]
            key = None if rng is None else jax.random.fold_in(rng, k)
            texts = self._batch(model_params, chunk, batch_size, max_new_tokens, temperature,
                                key)
            for ex, text in zip(chunk, texts):
                qtype = ex["meta"]["question_type"]
                rows.append({"id": ex["id"], "type": qtype,
                             "template": ex["meta"].get("template", ""), "prediction": text,
                             "answer": ex["meta"]["answer"],
                             "score": scoring.score(qtype, text, ex["meta"]["answer"])})
            if progress is not None:
                progress(k + 1, total)
        return rows
