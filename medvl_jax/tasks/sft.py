"""Supervised fine-tuning (instruction tuning) of a VLM: next-token loss on the answers.

The loss covers the tokens of ``loss_mask`` (assistant answers and their end-of-turn marker),
normalised per token or per example (``config.sft.normalise``). Multi-stage recipes are
configs: LLaVA-Med's alignment stage freezes everything but the projector
(``config.optim.freeze = "^(vision|decoder)/"``), the next stage tunes more. The vision tower
can start from another run (``sft.vision_init``: a contrastive or classify workdir, or a
converted checkpoint) or from a config trained first in the same command
(``sft.vision_stage``, see :mod:`medvl_jax.train.cli`).
"""
from __future__ import annotations

import ml_collections
import numpy as np

from medvl_jax.models import from_config
from medvl_jax.models import lora as lora_lib
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
    # A vision tower to start from: a training workdir (e.g. a contrastive run) or a converted
    # checkpoint; the rest of the model is initialised fresh. Empty: from scratch.
    c.vision_init = ""
    # Or a config ("path.py[:arg]", e.g. a classify or contrastive run) trained first into
    # <workdir>/vision_stage, whose tower then starts this run: two stages, one command.
    c.vision_stage = ""
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
        # config.lora (absent: off); with rank > 0 params are {**base, "lora": factors}.
        self.lora_config = lora_lib.get_config(config)

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
                "image_mask": np.ones((batch_size, n), bool),
                **({"segment_ids": np.ones((batch_size, d.max_length), np.int32),
                    "positions": np.zeros((batch_size, d.max_length), np.int32)}
                   if d.get("pack") else {})}

    def init(self, rng, batch):
        """Parameters (with logical-axis metadata) for a batch of this shape; with LoRA on,
        the base params plus a ``lora`` entry (base init unchanged by LoRA)."""
        params = self.model.init(rng, batch["tokens"], batch["images"],
                                 input_mask=batch["input_mask"], mask_ar=batch["mask_ar"])["params"]
        if lora_lib.enabled(self.lora_config):
            import jax

            params = {**params, lora_lib.LORA_KEY: lora_lib.init_lora(
                jax.random.fold_in(rng, 0x10A), params, self.lora_config)}
        return params

    def model_params(self, params):
        """The plain model params of ``params`` (LoRA merged, no dropout), for
        ``self.model.apply``, sampling and export."""
        return lora_lib.merged_params(params, self.lora_config)

    def apply(self, params, batch, rng=None):
        """Logits ``[B, L, V]`` for a batch; ``rng`` enables LoRA dropout (training)."""
        if lora_lib.enabled(self.lora_config):
            params = lora_lib.merge(params, self.lora_config, rng=rng,
                                    deterministic=rng is None)
        packed = {}
        if "segment_ids" in batch:  # Packed rows (medvl_jax.data.packing).
            packed = dict(segment_ids=batch["segment_ids"],
                          positions=batch["positions"] + self.model_config.position_offset)
        logits, _ = self.model.apply({"params": params}, batch["tokens"], batch["images"],
                                     input_mask=batch["input_mask"], mask_ar=batch["mask_ar"],
                                     **packed)
        return logits

    def loss(self, params, batch, rng):
        """``(loss, metrics)`` of one batch; ``rng`` drives LoRA dropout (if any)."""
        logits = self.apply(params, batch, rng)
        mask = batch["loss_mask"] * batch["input_mask"]
        return losses.next_token_loss(logits, batch["tokens"], mask,
                                      normalise=self.config.sft.normalise,
                                      segment_ids=batch.get("segment_ids"))

    # ----------------------------------------------------------------------------------------
    # Evaluation: answer MedSynth questions by greedy decoding, score per question type.
    # ----------------------------------------------------------------------------------------

    def eval_examples(self, split: str, num_studies: int | None = None) -> list[dict]:
        """Single-question examples of ``num_studies`` studies (default ``sft.eval_studies``)
        of each configured MedSynth source's ``split``, of the source's question types."""
        from medvl_jax.data import medsynth, sources as sources_lib

        if num_studies is None:
            num_studies = int(self.config.sft.eval_studies)
        out = []
        for name, spec in sorted(dict(self.config.data.sources).items()):
            if spec["kind"] != "medsynth" or not num_studies:
                continue
            src = medsynth.MedSynthSource(medsynth.MedSynthConfig(
                kind=spec["medsynth_kind"], split=split,
                num_studies=int(num_studies), image_size=spec["render_size"],
                volume_shape=tuple(spec["volume_shape"]), seed=spec["seed"]))
            types = tuple(spec.get("question_types") or ())
            for i in range(len(src)):
                for ex in sources_lib.medsynth_questions(src[i]):
                    if not types or ex["meta"]["question_type"] in types:
                        ex["meta"]["source"] = name
                        out.append(ex)
        return out

    def prompt_batch(self, examples: list[dict]) -> dict:
        """LEFT-padded prompts (no answer) to ``data.max_length`` tokens, with ``input_mask``,
        ``mask_ar`` and the preprocessed images: the layout ``sampling.sampler.generate``
        wants, with one fixed shape so its decode compiles once."""
        from medvl_jax.data import chat, pipeline as pipe

        d = self.config.data
        feat = pipe.Featurizer(d, self.tokenizer, train=False)
        b, L = len(examples), d.max_length
        batch = {"tokens": np.full((b, L), self.tokenizer.pad_token_id, np.int32),
                 "input_mask": np.zeros((b, L), bool),
                 "mask_ar": np.ones((b, L), np.int32),
                 "images": np.zeros((b, d.max_images) + feat.image_shape(), np.float32)}
        for i, ex in enumerate(examples):
            images = [feat.ops(x, None) for x in pipe.decode_images(ex, d)]
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

    def decode(self, params, batch: dict, stop_id: int, max_new_tokens: int | None = None,
               *, temperature: float = 0.0, rng=None) -> list[list[int]]:
        """Answers (stop token removed) of a :meth:`prompt_batch` batch, decoded with the
        KV-cache sampler, up to ``max_new_tokens`` (default ``sft.eval_max_new_tokens``):
        greedy, or sampled at ``temperature`` > 0 with the PRNG key ``rng``. ``params`` are
        plain model params (see :meth:`model_params`). The sampler's jit is keyed on static
        shapes and the model config only, so repeated evaluations (every
        ``train.eval_every`` steps) reuse one compilation."""
        from medvl_jax.sampling import sampler

        if max_new_tokens is None:
            max_new_tokens = int(self.config.sft.eval_max_new_tokens)
        out = sampler.generate(self.model_config, params, batch["tokens"], batch["input_mask"],
                               images=batch["images"], mask_ar=batch["mask_ar"],
                               max_new_tokens=int(max_new_tokens), rng=rng,
                               temperature=float(temperature), stop_tokens=[stop_id],
                               pad_id=self.tokenizer.pad_token_id)
        answers = []
        for row, n, done in zip(out.tokens, out.lengths, out.done):
            answers.append(row[:n - 1 if done else n].tolist())
        return answers

    def generate_texts(self, params, examples: list[dict], *, batch_size: int | None = None,
                       max_new_tokens: int | None = None, temperature: float = 0.0,
                       rng=None) -> list[str]:
        """Answers (decoded text, stripped) to the final question of each of ``examples``,
        greedy or sampled as :meth:`decode`, in one batch padded to ``batch_size`` rows
        (default: as many as there are examples) by repeating the last example, so that
        every batch of a run has one shape and the decode compiles once. ``params``: plain
        model params."""
        from medvl_jax.data import chat

        if not examples:
            return []
        pad = max(0, int(batch_size or len(examples)) - len(examples))
        stop = self.tokenizer.convert_tokens_to_ids(chat.end_of_turn_token(
            self.config.data.template))
        answers = self.decode(params, self.prompt_batch(examples + [examples[-1]] * pad), stop,
                              max_new_tokens, temperature=temperature, rng=rng)
        return [self.tokenizer.decode(gen, skip_special_tokens=True).strip()
                for gen in answers[:len(examples)]]

    def evaluate(self, params, split: str = "test", *, progress=None,
                 condition: str = "real") -> dict:
        """Per-question-type scores on MedSynth ``split`` (see medvl_jax.evaluate.scoring).

        ``params``: the task's params (LoRA factors, if any, are merged here). Greedy decoding
        with the KV-cache sampler up to ``sft.eval_max_new_tokens`` tokens, stopping at the
        template's end-of-turn token; batches of ``sft.eval_batch_size`` (the last one padded,
        so one compilation serves all). ``progress(done, total)`` is called after each batch.
        ``condition``: ``real`` images or a sanity baseline of medvl_jax.evaluate.baselines
        (e.g. ``no_image``).
        """
        return self.evaluate_model(self.model_params(params), split, progress=progress,
                                   condition=condition)

    def evaluate_model(self, model_params, split: str = "test", *, progress=None,
                       condition: str = "real", examples: list[dict] | None = None,
                       temperature: float = 0.0, rng=None) -> dict:
        """:meth:`evaluate` for plain model params (no LoRA factors), e.g. a reference model;
        ``examples``: the questions to answer (default :meth:`eval_examples` of ``split``);
        ``temperature`` > 0 samples the answers instead, batch ``k`` with the key
        ``fold_in(rng, k)``."""
        import jax

        from medvl_jax.evaluate import baselines, scoring

        if examples is None:
            examples = self.eval_examples(split)
        if not examples:
            return {}
        bs = int(self.config.sft.eval_batch_size)
        per_type: dict[str, list[float]] = {}
        predictions = []
        num_batches = -(-len(examples) // bs)
        for k, start in enumerate(range(0, len(examples), bs)):
            chunk = examples[start:start + bs]
            shown = [baselines.apply(ex, condition, self.config.data) for ex in chunk]
            # The last chunk is padded so that the decode compiles once.
            texts = self.generate_texts(model_params, shown, batch_size=bs,
                                        temperature=temperature,
                                        rng=None if rng is None else jax.random.fold_in(rng, k))
            for ex, text in zip(chunk, texts):
                qtype = ex["meta"]["question_type"]
                s = scoring.score(qtype, text, ex["meta"]["answer"])
                per_type.setdefault(qtype, []).append(s)
                predictions.append({"id": ex["id"], "type": qtype,
                                    "template": ex["meta"].get("template", ""),
                                    "prediction": text, "answer": ex["meta"]["answer"],
                                    "score": s})
            if progress is not None:
                progress(k + 1, num_batches)
        table = {t: {"score": float(np.mean(v)), "n": len(v)} for t, v in sorted(per_type.items())}
        overall = float(np.mean([p["score"] for p in predictions]))
        return {"split": split, "condition": condition, "per_type": table, "overall": overall,
                "num_questions": len(predictions), "predictions": predictions}
