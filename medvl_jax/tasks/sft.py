"""Supervised fine-tuning (instruction tuning) of a VLM: next-token loss on the answers.

The loss covers the tokens of ``loss_mask`` (assistant answers and their end-of-turn marker),
normalised per token or per example (``config.sft.normalise``). Multi-stage recipes are
configs: LLaVA-Med's alignment stage freezes everything but the projector
(``config.optim.freeze = "^(vision|decoder)/"``), the next stage tunes more.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from medvl_jax.models import from_config
from medvl_jax.models.vlm import VLM
from medvl_jax.tasks import losses


def default_config() -> ml_collections.ConfigDict:
    """The ``sft`` section of a config."""
    c = ml_collections.ConfigDict()
    c.normalise = "token"  # "token" or "example"
    c.eval_studies = 100   # MedSynth studies per source to evaluate on (all their questions);
                           # 0 = no evaluation.
    c.eval_batch_size = 64
    c.eval_max_new_tokens = 16
    return c


class SFTTask:
    """Model + loss for SFT; the shared loop does the rest."""

    name = "sft"

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <image> token")
        self.model_config = from_config.vlm_config(config.model, vocab_size=len(tokenizer),
                                                   image_token_id=image_id)
        want = from_config.num_image_tokens(self.model_config)
        if config.data.num_image_tokens != want:
            raise ValueError(f"data.num_image_tokens={config.data.num_image_tokens} but the "
                             f"model turns each image into {want} tokens")
        vsize = self.model_config.vision.image_size
        if config.data.volume_shape is None and config.data.image_size != vsize:
            raise ValueError(f"data.image_size={config.data.image_size} but "
                             f"model.vision.image_size={vsize}")
        self.model = VLM(self.model_config)

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch (for shape-only initialisation)."""
        d = self.config.data
        spatial = tuple(d.volume_shape) if d.volume_shape is not None else (d.image_size,) * 2
        n = d.max_images
        tokens = np.zeros((batch_size, d.max_length), np.int32)
        tokens[:, :n * d.num_image_tokens] = self.model_config.image_token_id
        return {"tokens": tokens,
                "input_mask": np.ones((batch_size, d.max_length), bool),
                "mask_ar": np.ones((batch_size, d.max_length), np.int32),
                "loss_mask": np.ones((batch_size, d.max_length), np.int32),
                "images": np.zeros((batch_size, n) + spatial + (d.channels,), np.float32),
                "image_mask": np.ones((batch_size, n), bool)}

    def init(self, rng, batch):
        """Parameters (with logical-axis metadata) for a batch of this shape."""
        return self.model.init(rng, batch["tokens"], batch["images"],
                               input_mask=batch["input_mask"], mask_ar=batch["mask_ar"])["params"]

    def apply(self, params, batch):
        """Logits ``[B, L, V]`` for a batch."""
        logits, _ = self.model.apply({"params": params}, batch["tokens"], batch["images"],
                                     input_mask=batch["input_mask"], mask_ar=batch["mask_ar"])
        return logits

    def loss(self, params, batch, rng):
        """``(loss, metrics)`` of one batch; ``rng`` is unused (no dropout)."""
        del rng
        logits = self.apply(params, batch)
        mask = batch["loss_mask"] * batch["input_mask"]
        return losses.next_token_loss(logits, batch["tokens"], mask,
                                      normalise=self.config.sft.normalise)

    # ----------------------------------------------------------------------------------------
    # Evaluation: answer MedSynth questions by greedy decoding, score per question type.
    # ----------------------------------------------------------------------------------------

    def eval_examples(self, split: str) -> list[dict]:
        """Single-question examples of the configured MedSynth sources' ``split``."""
        from medvl_jax.data import medsynth, sources as sources_lib

        out = []
        for name, spec in sorted(dict(self.config.data.sources).items()):
            if spec["kind"] != "medsynth" or not self.config.sft.eval_studies:
                continue
            src = medsynth.MedSynthSource(medsynth.MedSynthConfig(
                kind=spec["medsynth_kind"], split=split,
                num_studies=int(self.config.sft.eval_studies), image_size=spec["render_size"],
                volume_shape=tuple(spec["volume_shape"]), seed=spec["seed"]))
            types = tuple(spec.get("question_types") or ())
            for i in range(len(src)):
                for ex in sources_lib.medsynth_questions(src[i]):
                    if not types or ex["meta"]["question_type"] in types:
                        ex["meta"]["source"] = name
                        out.append(ex)
        return out

    def _prompt_batch(self, examples: list[dict]) -> tuple[dict, np.ndarray]:
        """Right-padded prompts (no answer) and preprocessed images, plus prompt lengths."""
        from medvl_jax.data import chat, pipeline as pipe

        d = self.config.data
        feat = pipe.Featurizer(d, self.tokenizer, train=False)
        rows, lengths = [], []
        for ex in examples:
            images = [feat.ops(x, None) for x in pipe.decode_images(ex, d)]
            enc = chat.encode_prompt(self.tokenizer, ex["messages"], d.template,
                                     num_image_tokens=d.num_image_tokens, num_images=len(images),
                                     max_length=d.max_length, prefix_lm=d.prefix_lm,
                                     where=ex["id"])
            arr = np.zeros((d.max_images,) + feat.image_shape(), np.float32)
            arr[:len(images)] = images
            rows.append((enc, arr))
            lengths.append(len(enc.tokens))
        b, L = len(rows), d.max_length
        batch = {"tokens": np.full((b, L), self.tokenizer.pad_token_id, np.int32),
                 "mask_ar": np.ones((b, L), np.int32),
                 "images": np.stack([a for _, a in rows])}
        for i, (enc, _) in enumerate(rows):
            batch["tokens"][i, :len(enc.tokens)] = enc.tokens
            batch["mask_ar"][i, :len(enc.tokens)] = enc.mask_ar
        return batch, np.asarray(lengths, np.int32)

    def _greedy_fn(self, max_new: int, stop_id: int):
        """Jitted greedy decoding by full forward passes (prompts are short here)."""
        import jax
        import jax.numpy as jnp

        def run(params, batch, lengths):
            tokens = batch["tokens"]
            rows = jnp.arange(tokens.shape[0])

            def body(t, carry):
                tokens, done = carry
                pos = lengths + t
                mask = jnp.arange(tokens.shape[1])[None] < pos[:, None]
                logits, _ = self.model.apply({"params": params}, tokens, batch["images"],
                                             input_mask=mask, mask_ar=batch["mask_ar"])
                nxt = jnp.argmax(logits[rows, pos - 1], axis=-1).astype(jnp.int32)
                nxt = jnp.where(done, self.tokenizer.pad_token_id, nxt)
                ok = pos < tokens.shape[1]
                tokens = tokens.at[rows, jnp.minimum(pos, tokens.shape[1] - 1)].set(
                    jnp.where(ok, nxt, tokens[rows, jnp.minimum(pos, tokens.shape[1] - 1)]))
                return tokens, done | (nxt == stop_id) | ~ok

            out, _ = jax.lax.fori_loop(0, max_new, body, (tokens, jnp.zeros_like(lengths, bool)))
            return out

        return jax.jit(run)

    def evaluate(self, params, split: str = "test") -> dict:
        """Per-question-type scores on MedSynth ``split`` (see medvl_jax.evaluate.scoring)."""
        from medvl_jax.data import chat
        from medvl_jax.evaluate import scoring

        examples = self.eval_examples(split)
        if not examples:
            return {}
        stop = self.tokenizer.convert_tokens_to_ids(chat.end_of_turn_token(
            self.config.data.template))
        max_new = int(self.config.sft.eval_max_new_tokens)
        fn = self._greedy_fn(max_new, stop)
        bs = int(self.config.sft.eval_batch_size)
        per_type: dict[str, list[float]] = {}
        predictions = []
        for start in range(0, len(examples), bs):
            chunk = examples[start:start + bs]
            pad = bs - len(chunk)  # Pad the last chunk so the decode compiles once.
            batch, lengths = self._prompt_batch(chunk + [chunk[-1]] * pad)
            out = np.asarray(fn(params, batch, lengths))
            for ex, row, n in zip(chunk, out, lengths):
                gen = row[n:n + max_new].tolist()
                if stop in gen:
                    gen = gen[:gen.index(stop)]
                text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
                qtype = ex["meta"]["question_type"]
                s = scoring.score(qtype, text, ex["meta"]["answer"])
                per_type.setdefault(qtype, []).append(s)
                predictions.append({"id": ex["id"], "type": qtype, "prediction": text,
                                    "answer": ex["meta"]["answer"], "score": s})
        table = {t: {"score": float(np.mean(v)), "n": len(v)} for t, v in sorted(per_type.items())}
        overall = float(np.mean([p["score"] for p in predictions]))
        return {"split": split, "per_type": table, "overall": overall,
                "num_questions": len(predictions), "predictions": predictions}
