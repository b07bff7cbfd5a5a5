"""Supervised fine-tuning (instruction tuning) of a VLM: next-token loss on the answers.

The loss covers the tokens of ``loss_mask`` (assistant answers and their end-of-turn marker),
normalised per token or per example (``config.sft.normalise``). Multi-stage recipes are
configs: LLaVA-Med's alignment stage freezes everything but the projector
(``config.optim.freeze = "^(vision|decoder)/"``), the next stage tunes more. The vision tower
can start from another run (``config.vision_init``) or from a config trained first in the same
command (``config.vision_stage``); the whole VLM from a checkpoint (``config.init_from``).
Evaluation is declared in ``config.evals`` (e.g. a ``vqa`` evaluator).
"""
from __future__ import annotations

import ml_collections

from medvl_jax.tasks import base, losses
from medvl_jax.tasks.answers import Answerer
from medvl_jax.tasks.policy import Policy, resolve_config


class SFTTask(base.Task):
    """A :class:`~medvl_jax.tasks.policy.Policy` and the next-token loss on its answers."""

    name = "sft"
    outputs = frozenset({"text"})

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *, start=None):
        super().__init__(config, tokenizer, start=start)
        if config.sft.normalise not in ("token", "example"):
            raise ValueError(f"sft.normalise must be 'token' or 'example', got "
                             f"{config.sft.normalise!r}")
        self.policy = Policy(config, tokenizer, start=start)
        self.answerer = Answerer(self.policy)
        self.model_config = self.policy.model_config

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        """The ``sft`` section of a config."""
        c = ml_collections.ConfigDict()
        c.normalise = "token"  # "token" or "example"
        return c

    @classmethod
    def resolve_config(cls, config, start):
        return resolve_config(config, start)

    def dummy_batch(self, batch_size: int) -> dict:
        return self.policy.dummy_batch(batch_size)

    def init(self, rng, batch):
        return self.policy.init(rng, batch)

    def model_params(self, params):
        return self.policy.model_params(params)

    def pretrained_params(self):
        return self.policy.pretrained_params()

    def loss(self, params, batch, rng):
        """``(loss, metrics)`` of one batch; ``rng`` drives LoRA dropout (if any)."""
        logits = self.policy.apply(params, batch, rng)
        mask = batch["loss_mask"] * batch["input_mask"]
        return losses.next_token_loss(logits, batch["tokens"], mask,
                                      normalise=self.config.sft.normalise,
                                      segment_ids=batch.get("segment_ids"))

    def generate_texts(self, model_params, examples, *, batch_size, max_new_tokens,
                       temperature=0.0, rng=None):
        return self.answerer.generate_texts(model_params, examples, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens,
                                            temperature=temperature, rng=rng)


TASK = SFTTask


def finetune_config(*, smoke: bool, template: str, prefix_lm: bool, max_length: int,
                    lr: float, steps: int) -> ml_collections.ConfigDict:
    """The common part of the ``configs/*_sft.py`` fine-tune configs: SFT on MedSynth chest
    radiographs from ``--config.init_from=DIR``, model, tokenizer and image size taken from
    the checkpoint (see :func:`medvl_jax.tasks.policy.resolve_config`), evaluated on MedSynth
    test questions. ``smoke``: a few steps on tiny data."""
    from medvl_jax.data import pipeline
    from medvl_jax.evaluate import evaluators
    from medvl_jax.train import loop, optim

    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.init_from = ""                        # Required: a checkpoint directory or workdir.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=64 if smoke else 8000)}
    c.data.template = template
    c.data.prefix_lm = prefix_lm
    c.data.image_size = None                # None: the checkpoint's.
    c.data.num_image_tokens = None          # None: the checkpoint's.
    c.data.channels = 3
    c.data.max_images = 1
    c.data.max_length = 128 if smoke else max_length
    c.data.batch_size = 8 if smoke else 16

    c.sft = SFTTask.default_config()
    c.evals = {"medsynth": evaluators.vqa(c.data.sources, studies=2 if smoke else 60,
                                          batch_size=8 if smoke else 16)}

    c.optim = optim.default_config()
    c.optim.lr = 1e-3 if smoke else lr
    c.optim.warmup_steps = 1 if smoke else 50
    c.optim.weight_decay = 0.0

    c.train = loop.default_config()
    c.train.steps = 2 if smoke else steps
    c.train.log_every = 1 if smoke else 25
    c.train.checkpoint_every = 2 if smoke else 500
    return c
