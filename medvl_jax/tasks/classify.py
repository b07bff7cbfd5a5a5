"""Multi-label image classification: findings per image, e.g. to pretrain a VLM's vision tower.

The model is :class:`medvl_jax.models.classifier.ImageClassifier` (a ViT from
``config.model.vision`` and a linear head over its flattened tokens); the loss is the binary
cross-entropy per label, averaged over the labels each example states (a label missing from a
record's ``labels`` dict is unknown and left out, as CheXpert-style blanks are).

Config::

    classify = {"labels": ("nodule_right_upper", ...),   # the K outputs, in order
                "eval_source": "", "eval_studies": 500, "eval_batch_size": 250}
    model = {"vision": {VisionConfig fields}}

Data: image–labels pairs from :mod:`medvl_jax.data.pairs` (MedSynth cxr/ct studies, whose
findings give the labels of :func:`medvl_jax.data.pairs.medsynth_labels` with ``regional``;
``{"image", "labels"}`` JSONL files). Evaluation: ROC-AUC and accuracy (logit > 0) per label on
MedSynth test studies; :meth:`ClassifyTask.report` prints the table and writes
``<workdir>/classify_results.json``.

A classifier workdir is a vision tower for the SFT task (``sft.vision_init``, or
``sft.vision_stage`` to train it first in the same command): the recipe of vision encoders
pretrained on labelled radiographs before they meet language.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvl_jax.data import pairs, pipeline
from medvl_jax.data.medsynth import findings
from medvl_jax.models import from_config
from medvl_jax.models.classifier import ClassifierConfig, ImageClassifier
from medvl_jax.models.vision import VisionConfig

# MedSynth chest radiographs: a nodule per lung zone, an effusion per side, cardiomegaly.
MEDSYNTH_CXR_LABELS = (tuple(f"nodule_{side}_{zone}" for side, zone in findings.CELLS)
                       + tuple(f"effusion_{side}" for side in findings.SIDES)
                       + ("cardiomegaly",))


def default_config() -> ml_collections.ConfigDict:
    """The ``classify`` section of a config."""
    c = ml_collections.ConfigDict()
    c.labels = MEDSYNTH_CXR_LABELS  # Names of the outputs, in order.
    c.eval_source = ""              # MedSynth source of data.sources to evaluate on ("" = first).
    c.eval_studies = 500            # MedSynth test studies to evaluate on; 0 = no evaluation.
    c.eval_batch_size = 250
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


class ClassifyTask:
    """Image classifier + masked BCE + MedSynth per-label evaluation; the loop does the rest."""

    name = "classify"

    def __init__(self, config: ml_collections.ConfigDict, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer  # Unused: labels, not text.
        cc, d = config.classify, config.data
        self.labels = tuple(str(x) for x in cc.labels)
        if not self.labels:
            raise ValueError("classify.labels is empty: name the labels to predict")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"classify.labels has duplicates: {self.labels}")
        self.model_config = model_config(config.model, num_labels=len(self.labels))
        pairs.check_images(d, self.model_config.vision)
        self.model = ImageClassifier(self.model_config)
        self._predict = None

    # ----------------------------------------------------------------------------------------
    # The Task protocol.
    # ----------------------------------------------------------------------------------------

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

    def data_iterator(self, config, *, process_index: int, process_count: int):
        """This process's grain iterator of image–labels batches."""
        return pairs.build_iterator(config.data, self.tokenizer, split="train",
                                    process_index=process_index, process_count=process_count,
                                    label_names=self.labels)

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

    # ----------------------------------------------------------------------------------------
    # Evaluation.
    # ----------------------------------------------------------------------------------------

    def logits(self, params, images: np.ndarray) -> np.ndarray:
        """Label logits ``[N, K]`` of preprocessed images, in chunks of ``eval_batch_size``
        (the last one padded: one compile)."""
        if self._predict is None:
            self._predict = jax.jit(lambda p, x: self.model.apply({"params": p}, x))
        return pairs.in_chunks(lambda x: self._predict(params, x), [images],
                               int(self.config.classify.eval_batch_size))

    def _eval_spec(self) -> tuple[str, dict] | None:
        return pairs.eval_source(self.config.data.sources, self.config.classify.eval_source,
                                 "classify.eval_source")

    def evaluate(self, params, split: str = "test") -> dict:
        """ROC-AUC and accuracy per label (those MedSynth's findings give) on ``split``, and
        their means; ``{}`` without a MedSynth source or with ``eval_studies`` 0."""
        from medvl_jax.evaluate import retrieval

        spec = self._eval_spec()
        n = int(self.config.classify.eval_studies)
        if spec is None or not n:
            return {}
        name, spec = spec
        data = pairs.medsynth_eval_set(self.config.data, spec, split, n, regional=True)
        logits = self.logits(params, data["images"])
        per_label = {}
        for i, label in enumerate(self.labels):
            y = data["labels"].get(label)
            if y is None:
                continue
            both = 0 < y.sum() < len(y)  # AUC needs both classes.
            per_label[label] = {
                "auc": float(retrieval.roc_auc(logits[:, i], y)) if both else float("nan"),
                "accuracy": float(np.mean((logits[:, i] > 0) == y)),
                "positives": int(y.sum()), "n": int(len(y))}
        aucs = [r["auc"] for r in per_label.values() if not np.isnan(r["auc"])]
        return {"split": split, "source": name, "n": len(logits), "per_label": per_label,
                "mean_auc": float(np.mean(aucs)) if aucs else float("nan"),
                "mean_accuracy": float(np.mean([r["accuracy"] for r in per_label.values()]))
                if per_label else float("nan")}

    def evaluators(self) -> dict:
        """``{"medsynth": fn(state) -> results}`` (empty when evaluation is off)."""
        if not self.config.classify.eval_studies or self._eval_spec() is None:
            return {}
        return {"medsynth": lambda state: self.evaluate(state.params, "test")}

    def report(self, results: dict, workdir: str) -> None:
        """Prints the per-label table and writes it to ``<workdir>/classify_results.json``."""
        res = results.get("medsynth") if "medsynth" in results else results
        if not res or "per_label" not in res:
            return
        print(f"\nMedSynth {res['split']} ({res['source']}), {res['n']} studies")
        print(f"{'label':<22}{'pos':>5}{'AUC':>8}{'acc':>8}")
        for label, row in res["per_label"].items():
            print(f"{label:<22}{row['positives']:>5}{row['auc']:>8.3f}"
                  f"{100 * row['accuracy']:>7.1f}%")
        print(f"{'mean':<22}{'':>5}{res['mean_auc']:>8.3f}{100 * res['mean_accuracy']:>7.1f}%")
        path = os.path.join(workdir, "classify_results.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results written to {path}")
