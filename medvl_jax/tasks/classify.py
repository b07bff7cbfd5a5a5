"""Multi-label image classification: findings per image, e.g. to pretrain a VLM's vision tower.

The model is :class:`medvl_jax.models.classifier.ImageClassifier` (a ViT from
``config.model.vision`` and a linear head over its flattened tokens); the loss is the binary
cross-entropy per label, averaged over the labels each example states (a label missing from a
record's ``labels`` dict is unknown and left out, as CheXpert-style blanks are).

Config::

    classify = {"labels": ("nodule_right_upper", ...),   # the K outputs, in order (required)
                "predict_batch_size": 250}
    model = {"vision": {VisionConfig fields}}

Data: image–labels pairs from :mod:`medvl_jax.data.pairs` (MedSynth cxr/ct studies, whose
findings give the labels of :func:`medvl_jax.data.pairs.medsynth_labels` with ``regional``
— :data:`medvl_jax.data.medsynth.prompts.CXR_LABELS` names them; ``{"image", "labels"}``
JSONL files). Evaluation is declared in ``config.evals`` (a ``classify`` evaluator: ROC-AUC
and accuracy per label; ``linear_probe`` on the tower's pooled tokens).

A classifier workdir is a vision tower for a VLM or two-tower run (``config.vision_init``, or
``config.vision_stage`` to train it first in the same command): the recipe of vision encoders
pretrained on labelled radiographs before they meet language.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvl_jax.data import pairs, pipeline
from medvl_jax.models import from_config
from medvl_jax.models.classifier import ClassifierConfig, ImageClassifier
from medvl_jax.models.vision import VisionConfig, VisionEncoder
from medvl_jax.tasks import base


def default_config() -> ml_collections.ConfigDict:
    """The ``classify`` section of a config."""
    c = ml_collections.ConfigDict()
    c.labels = ()                   # Names of the outputs, in order (required).
    c.predict_batch_size = 250      # Rows per forward pass when predicting a whole set.
    return c


def model_config(model: Any, *, num_labels: int) -> ClassifierConfig:
    """A :class:`ClassifierConfig` from a ``config.model`` section ``{"vision": {...}}``."""
    model = dict(model)
    if "vision" not in model:
        raise KeyError("config.model has no 'vision' section")
    unknown = set(model) - {"vision"}
    if unknown:
        raise KeyError(f"config.model: unknown key(s) {sorted(unknown)} for the classify task; "
                       f"allowed: ['vision']")
    vision = from_config.dataclass_from_dict(VisionConfig, dict(model["vision"]), "model.vision")
    return ClassifierConfig(vision=vision, num_labels=num_labels)


def masked_bce(logits, labels, mask):
    """Mean binary cross-entropy of ``logits`` [B, K] against ``labels`` in {0, 1} over the
    entries where ``mask`` is True (0 when there are none)."""
    per = optax.sigmoid_binary_cross_entropy(logits, labels) * mask
    return per.sum() / jnp.maximum(mask.sum(), 1)


class ClassifyTask(base.Task):
    """Image classifier + masked BCE; the loop does the rest."""

    name = "classify"
    outputs = frozenset({"label_logits", "image_features"})
    default_config = staticmethod(default_config)

    def __init__(self, config: ml_collections.ConfigDict, tokenizer=None, *, start=None):
        super().__init__(config, tokenizer, start=start)
        cc, d = config.classify, config.data
        self._labels = tuple(str(x) for x in cc.labels)
        if not self._labels:
            raise ValueError("classify.labels is empty: name the labels to predict (for "
                             "MedSynth radiographs: medvl_jax.data.medsynth.prompts.CXR_LABELS)")
        if len(set(self._labels)) != len(self._labels):
            raise ValueError(f"classify.labels has duplicates: {self._labels}")
        self.model_config = model_config(config.model, num_labels=len(self._labels))
        pairs.check_images(d, self.model_config.vision)
        self.model = ImageClassifier(self.model_config)
        self._jits = {}

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    def image_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image (no batch axis)."""
        return pipeline.image_shape(self.config.data)

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch (for shape-only initialisation)."""
        k = len(self.labels)
        return {"images": np.zeros((batch_size,) + self.image_shape(), np.float32),
                "labels": np.zeros((batch_size, k), np.float32),
                "label_mask": np.ones((batch_size, k), bool)}

    def init(self, rng, batch):
        """Parameters (with logical-axis metadata) for a batch of this shape."""
        return self.model.init(rng, batch["images"])["params"]

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's grain iterator of image–labels batches."""
        return pairs.build_iterator(config.data, self.tokenizer, split="train",
                                    process_index=process_index, process_count=process_count,
                                    skips=skips, label_names=self.labels)

    def loss(self, params, batch, rng):
        """``(loss, metrics)``: masked BCE, and the accuracy (logit > 0) on known labels."""
        del rng  # No dropout.
        logits = self.model.apply({"params": params}, batch["images"])
        mask = batch["label_mask"].astype(jnp.float32)
        correct = ((logits > 0) == (batch["labels"] > 0.5)) * mask
        return masked_bce(logits, batch["labels"], mask), {
            "accuracy": correct.sum() / jnp.maximum(mask.sum(), 1)}

    def count_tokens(self, local_batch) -> int:
        """No text: 0 (the loop reports examples/s)."""
        del local_batch
        return 0

    # --- evaluators --------------------------------------------------------------------------

    def _chunked(self, kind: str, model_params, images: np.ndarray) -> np.ndarray:
        if kind not in self._jits:
            if kind == "logits":
                fn = lambda p, x: self.model.apply({"params": p}, x)  # noqa: E731
            else:
                tower = VisionEncoder(self.model_config.vision)
                fn = lambda p, x: tower.apply({"params": p["vision"]}, x)[0].mean(1)  # noqa
            self._jits[kind] = jax.jit(fn)
        fn = self._jits[kind]
        return pairs.in_chunks(lambda x: fn(model_params, x), [images],
                               int(self.config.classify.predict_batch_size))

    def label_logits(self, model_params, images: np.ndarray) -> np.ndarray:
        """Label logits ``[N, K]`` of preprocessed images."""
        return self._chunked("logits", model_params, images)

    def image_features(self, model_params, images: np.ndarray) -> np.ndarray:
        """The tower's mean-pooled tokens ``[N, width]`` (a linear probe's features)."""
        return self._chunked("features", model_params, images)


TASK = ClassifyTask
