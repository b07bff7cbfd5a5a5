"""Contrastive image–report pretraining (ConVIRT, CLIP, SigLIP) of a two-tower model.

The model is :class:`medvl_jax.models.two_tower.TwoTower` built from ``config.model``::

    model = {"vision": {VisionConfig fields}, "text": {TextEncoderConfig fields},
             "embed_dim": None | int, "image_pool": ..., "text_pool": ..., "logit_init": ...}

(``text.vocab_size`` defaults to the tokenizer's length rounded up to 128). The loss is one of
:mod:`medvl_jax.tasks.contrastive_losses` (``contrastive.loss``); with ``contrastive.sharded``
and more than one device on the mesh's batch axes it is the ring loss (``make_sharded_loss``)
over ``('data', 'fsdp')``, which never builds the ``[B, B]`` logits on one device. The mesh is
the one the loop sets while it traces the step (``jax.set_mesh``), or ``task.mesh`` if set.

Data: image–text pairs from :mod:`medvl_jax.data.pairs` (MedSynth studies with ConVIRT-style
sentence sampling, 3D volumes, JSONL pair files, label-only files captioned by templates).

Evaluation (one pass over frozen embeddings of the MedSynth test studies): zero-shot binary
classification per finding from prompt ensembles (ROC-AUC and accuracy), image→text and
text→image Recall@{1,5,10} on the test reports, and a linear probe on image features (trained
on train-split studies, tested on test). :meth:`ContrastiveTask.report` prints the table and
writes ``<workdir>/contrastive_results.json``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.data import pairs, pipeline
from medvl_jax.models import from_config
from medvl_jax.models.text_encoder import TextEncoderConfig
from medvl_jax.models.two_tower import TwoTower, TwoTowerConfig
from medvl_jax.models.vision import VisionConfig
from medvl_jax.tasks import contrastive_losses as closs

LOSSES = closs.KINDS  # "clip", "convirt", "siglip"
BATCH_AXES = ("data", "fsdp")

# Zero-shot prompt ensembles. Per finding: sentences saying it is absent, and (sentence,
# impression item) pairs saying it is present. "sentence" prompts are these sentences alone;
# "report" prompts are whole reports (FINDINGS + IMPRESSION) in which every other finding is
# normal, so that the two classes differ only in the finding asked about.
_ABSENT = {
    "nodule": ("The lungs are clear.", "No pulmonary nodule or mass is seen.",
               "The lung fields are clear without focal opacity."),
    "effusion": ("No pleural effusion.", "The costophrenic angles are sharp.",
                 "No pleural effusion or pneumothorax."),
    "cardiomegaly": ("Heart size is normal (cardiothoracic ratio 0.42).",
                     "Normal cardiomediastinal silhouette, cardiothoracic ratio 0.44.",
                     "Heart size is normal (cardiothoracic ratio 0.40)."),
}
_PRESENT = {
    "nodule": (("There is a 20 mm nodule in the right upper zone.",
                "20 mm nodule in the right upper zone."),
               ("A 25 mm rounded opacity is seen in the left lower zone.",
                "25 mm nodule in the left lower zone."),
               ("There is a 17 mm nodular opacity projecting over the right mid zone.",
                "17 mm nodule in the right mid zone."),
               ("A 22 mm nodule is seen in the left mid zone.",
                "22 mm nodule in the left mid zone.")),
    "effusion": (("Small right pleural effusion with blunting of the costophrenic angle.",
                  "Right pleural effusion."),
                 ("Moderate left pleural effusion with a meniscus at the lung base.",
                  "Left pleural effusion."),
                 ("Moderate bilateral pleural effusion with blunting of the costophrenic "
                  "angles.", "Bilateral pleural effusion.")),
    "cardiomegaly": (("The heart is enlarged (cardiothoracic ratio 0.58).", "Cardiomegaly."),
                     ("Cardiomegaly, cardiothoracic ratio 0.61.", "Cardiomegaly."),
                     ("The heart is enlarged (cardiothoracic ratio 0.55).", "Cardiomegaly.")),
}
_BONES = ("Osseous structures are unremarkable.", "No acute osseous abnormality.",
          "The visualised bones are intact.")
FINDINGS = tuple(_ABSENT)
PROMPT_STYLES = ("report", "sentence")


def _report(sentences: dict, impression: list[str], i: int) -> str:
    body = " ".join([sentences["nodule"], sentences["effusion"], sentences["cardiomegaly"],
                     _BONES[i % len(_BONES)]])
    imp = impression or ["No acute cardiopulmonary abnormality." if i % 2
                         else "Normal chest radiograph."]
    return f"FINDINGS: {body}\nIMPRESSION: {' '.join(imp)}"


def prompts(finding: str, style: str = "report") -> tuple[list[str], list[str]]:
    """``(absent prompts, present prompts)`` of a finding (nodule, effusion, cardiomegaly)."""
    if finding not in _ABSENT:
        raise KeyError(f"no prompts for finding {finding!r}; known: {FINDINGS}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"contrastive.prompts must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "sentence":
        return list(_ABSENT[finding]), [s for s, _ in _PRESENT[finding]]
    absent, present = [], []
    for i in range(3):
        normal = {f: _ABSENT[f][(i + k) % 3] for k, f in enumerate(FINDINGS)}
        absent.append(_report(normal, [], i))
    for i, (sentence, item) in enumerate(_PRESENT[finding]):
        normal = {f: _ABSENT[f][(i + k) % 3] for k, f in enumerate(FINDINGS)}
        present.append(_report({**normal, finding: sentence}, [item], i))
    return absent, present


def default_config() -> ml_collections.ConfigDict:
    """The ``contrastive`` section of a config."""
    c = ml_collections.ConfigDict()
    c.loss = "siglip"            # "siglip" | "clip" | "convirt"
    c.convirt_temperature = 0.1  # ConVIRT's fixed tau (the model's logit_scale is unused).
    c.convirt_lambda = 0.75      # ConVIRT's weight of the image->text term.
    c.sharded = True             # Ring loss over the mesh's batch axes when they hold > 1 device.
    c.sharded_impl = "ring"      # "ring" | "all_gather"
    c.sentences = 1              # Report sentences per pair (random, per epoch); 0 = the report.
    c.text_mask = True           # Pass the padding mask to the text tower (False: SigLIP-style).
    c.prompts = "report"         # Zero-shot prompts: "report" (whole reports) | "sentence".
    c.eval_source = ""           # MedSynth source of data.sources to evaluate on ("" = first).
    c.eval_studies = 500         # Test studies for zero-shot and retrieval; 0 = no evaluation.
    c.probe_studies = 1000       # Train studies the linear probe is fitted on; 0 = no probe.
    c.eval_batch_size = 250
    return c


def model_config(model: Any, *, vocab_size: int) -> TwoTowerConfig:
    """A :class:`TwoTowerConfig` from a ``config.model`` section (see the module docstring)."""
    model = dict(model)
    for key in ("vision", "text"):
        if key not in model:
            raise KeyError(f"config.model has no {key!r} section")
    text = dict(model.pop("text"))
    if text.get("vocab_size", vocab_size) < vocab_size:
        raise ValueError(f"model.text.vocab_size={text['vocab_size']} but the tokenizer has "
                         f"{vocab_size} tokens")
    text.setdefault("vocab_size", from_config.padded_vocab_size(vocab_size))
    vision = from_config.dataclass_from_dict(VisionConfig, dict(model.pop("vision")),
                                             "model.vision")
    text = from_config.dataclass_from_dict(TextEncoderConfig, text, "model.text")
    return from_config.dataclass_from_dict(TwoTowerConfig, {**model, "vision": vision,
                                                            "text": text}, "model")


def _batch_devices(mesh) -> int:
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


class ContrastiveTask:
    """Two-tower model + contrastive loss + MedSynth evaluations; the loop does the rest."""

    name = "contrastive"

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        cc = config.contrastive
        if cc.loss not in LOSSES:
            raise ValueError(f"contrastive.loss must be one of {LOSSES}, got {cc.loss!r}")
        if cc.sharded_impl not in closs.IMPLS:
            raise ValueError(f"contrastive.sharded_impl must be one of {closs.IMPLS}, got "
                             f"{cc.sharded_impl!r}")
        if cc.prompts not in PROMPT_STYLES:
            raise ValueError(f"contrastive.prompts must be one of {PROMPT_STYLES}, got "
                             f"{cc.prompts!r}")
        if cc.sentences < 0:
            raise ValueError(f"contrastive.sentences must be >= 0, got {cc.sentences}")
        if not 0.0 <= cc.convirt_lambda <= 1.0 or cc.convirt_temperature <= 0:
            raise ValueError("contrastive.convirt_lambda must be in [0, 1] and "
                             "contrastive.convirt_temperature > 0")
        self.model_config = model_config(config.model, vocab_size=len(tokenizer))
        mc, d = self.model_config, config.data
        if cc.loss == "siglip" and not mc.has_bias:
            raise ValueError("contrastive.loss='siglip' needs a logit bias: set "
                             "model.logit_init='siglip'")
        if d.max_length > mc.text.max_len:
            raise ValueError(f"data.max_length={d.max_length} (text tokens) exceeds "
                             f"model.text.max_len={mc.text.max_len}")
        pairs.check_images(d, mc.vision)
        self.model = TwoTower(mc)
        self.mesh = None  # None: the mesh set while the loop traces the step.
        self._encoders = None

    # ----------------------------------------------------------------------------------------
    # The Task protocol.
    # ----------------------------------------------------------------------------------------

    def image_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image (no batch axis)."""
        return pipeline.image_shape(self.config.data)

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch (for shape-only initialisation)."""
        L = self.config.data.max_length
        return {"images": np.zeros((batch_size,) + self.image_shape(), np.float32),
                "tokens": np.zeros((batch_size, L), np.int32),
                "input_mask": np.ones((batch_size, L), bool)}

    def init(self, rng, batch):
        """Parameters (with logical-axis metadata) for a batch of this shape."""
        return self.model.init(rng, batch["images"], batch["tokens"],
                               self._text_mask(batch))["params"]

    def data_iterator(self, config, *, process_index: int, process_count: int):
        """This process's grain iterator of image–text batches (:mod:`medvl_jax.data.pairs`)."""
        return pairs.build_iterator(config.data, self.tokenizer, split="train",
                                    sentences=int(config.contrastive.sentences),
                                    process_index=process_index, process_count=process_count)

    def _text_mask(self, batch):
        return batch["input_mask"] if self.config.contrastive.text_mask else None

    def embed(self, params, batch):
        """``(img_emb, txt_emb, logit_scale, logit_bias)`` of a batch."""
        return self.model.apply({"params": params}, batch["images"], batch["tokens"],
                                self._text_mask(batch))

    def contrastive_loss(self, img, txt, logit_scale, logit_bias):
        """The configured loss of embeddings ``[B, E]`` (global arrays under jit): sharded
        when ``contrastive.sharded`` and the mesh splits the batch over several devices."""
        cc = self.config.contrastive
        if cc.loss == "convirt":
            scale, bias = cc.convirt_temperature, cc.convirt_lambda
        else:
            scale, bias = logit_scale, logit_bias
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        if cc.sharded and _batch_devices(mesh) > 1:
            axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
            fn = closs.make_sharded_loss(cc.loss, mesh, axes, impl=cc.sharded_impl)
            return fn(img, txt, scale, bias)
        if cc.loss == "siglip":
            return closs.siglip_loss(img, txt, scale, bias)
        if cc.loss == "clip":
            return closs.clip_loss(img, txt, scale)
        return closs.convirt_loss(img, txt, scale, bias)

    def loss(self, params, batch, rng):
        """``(loss, metrics)``: the contrastive loss of the batch, the inverse temperature
        (``logit_scale`` = exp of the parameter, or 1/tau for ConVIRT), the bias, and the
        in-batch image→text / text→image top-1 accuracies."""
        del rng  # No dropout.
        img, txt, logit_scale, logit_bias = self.embed(params, batch)
        loss = self.contrastive_loss(img, txt, logit_scale, logit_bias)
        cc = self.config.contrastive
        scale = (jnp.float32(1.0 / cc.convirt_temperature) if cc.loss == "convirt"
                 else jnp.exp(logit_scale))
        sims = jax.lax.stop_gradient(img @ txt.T)
        target = jnp.arange(img.shape[0])
        metrics = {"logit_scale": scale, "temperature": 1.0 / scale,
                   "i2t_accuracy": jnp.mean(jnp.argmax(sims, axis=1) == target),
                   "t2i_accuracy": jnp.mean(jnp.argmax(sims, axis=0) == target)}
        if logit_bias is not None and cc.loss == "siglip":
            metrics["logit_bias"] = logit_bias
        return loss, metrics

    def count_tokens(self, local_batch) -> int:
        """Real text tokens of a batch."""
        return int(np.asarray(local_batch["input_mask"]).sum())

    # ----------------------------------------------------------------------------------------
    # Embeddings of whole sets (evaluation).
    # ----------------------------------------------------------------------------------------

    def _jitted(self):
        if self._encoders is None:
            img = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                        method=TwoTower.encode_image))
            txt = jax.jit(lambda p, t, m: self.model.apply({"params": p}, t, m,
                                                           method=TwoTower.encode_text))
            self._encoders = img, txt
        return self._encoders

    def image_embeddings(self, params, images: np.ndarray) -> np.ndarray:
        """Normalised image embeddings ``[N, E]`` of preprocessed images."""
        fn, bs = self._jitted()[0], int(self.config.contrastive.eval_batch_size)
        return pairs.in_chunks(lambda x: fn(params, x), [images], bs)

    def text_embeddings(self, params, texts: list[str]) -> np.ndarray:
        """Normalised text embeddings ``[N, E]`` of strings."""
        tokens, mask = pairs.tokenize(self.tokenizer, texts, self.config.data.max_length)
        fn, bs = self._jitted()[1], int(self.config.contrastive.eval_batch_size)
        if not self.config.contrastive.text_mask:
            return pairs.in_chunks(lambda t: fn(params, t, None), [tokens], bs)
        return pairs.in_chunks(lambda t, m: fn(params, t, m), [tokens, mask], bs)

    # ----------------------------------------------------------------------------------------
    # Evaluation.
    # ----------------------------------------------------------------------------------------

    def _eval_spec(self) -> tuple[str, dict] | None:
        return pairs.eval_source(self.config.data.sources, self.config.contrastive.eval_source,
                                 "contrastive.eval_source")

    def prompt_embeddings(self, params, finding: str) -> list[np.ndarray]:
        """``[absent [P0, E], present [P1, E]]``: the prompt-ensemble text embeddings of a
        finding (:func:`prompts`, style ``contrastive.prompts``)."""
        return [self.text_embeddings(params, p)
                for p in prompts(finding, self.config.contrastive.prompts)]

    def zero_shot(self, params, img_emb: np.ndarray, labels: dict[str, np.ndarray]) -> dict:
        """Per finding of :data:`FINDINGS`: ROC-AUC of ``cos(image, present) - cos(image,
        absent)`` (class embeddings = normalised means of their prompts' embeddings, see
        ``retrieval.class_embeddings``) and the accuracy of the closer class."""
        from medvl_jax.evaluate import retrieval

        out = {}
        for finding, y in labels.items():
            if finding not in FINDINGS:
                continue
            scores, pred = retrieval.zero_shot_classify(
                img_emb, self.prompt_embeddings(params, finding))
            both = 0 < y.sum() < len(y)  # AUC needs both classes (NaN otherwise).
            auc = retrieval.roc_auc(scores[:, 1] - scores[:, 0], y) if both else float("nan")
            out[finding] = {"auc": float(auc),
                            "accuracy": retrieval.accuracy(pred, y.astype(int)),
                            "positives": int(y.sum()), "n": int(len(y))}
        return out

    def evaluate(self, params, split: str = "test") -> dict:
        """Zero-shot, retrieval and linear-probe results on MedSynth ``split`` (see the module
        docstring); ``{}`` when there is no MedSynth source or ``eval_studies`` is 0."""
        from medvl_jax.evaluate import retrieval

        cc = self.config.contrastive
        spec = self._eval_spec()
        if spec is None or not cc.eval_studies:
            return {}
        name, spec = spec
        data = pairs.medsynth_eval_set(self.config.data, spec, split, int(cc.eval_studies))
        img = self.image_embeddings(params, data["images"])
        txt = self.text_embeddings(params, data["reports"])
        out = {"split": split, "source": name, "n": len(img),
               "zero_shot": self.zero_shot(params, img, data["labels"]),
               "retrieval": retrieval.recall_at_k(img @ txt.T, (1, 5, 10))}
        if cc.probe_studies:
            train = pairs.medsynth_eval_set(self.config.data, spec, "train",
                                            int(cc.probe_studies))
            feats = self.image_embeddings(params, train["images"])
            out["linear_probe"] = {}
            for finding, y in data["labels"].items():
                ty = train["labels"][finding]
                if not (0 < y.sum() < len(y) and 0 < ty.sum() < len(ty)):
                    continue  # The probe needs both classes in train and in test.
                res = retrieval.linear_probe(feats, ty.astype(np.int32),
                                             img, y.astype(np.int32), num_classes=2)
                out["linear_probe"][finding] = {k: float(res[k]) for k in
                                                ("auc", "accuracy", "train_accuracy")}
        return out

    def evaluators(self) -> dict:
        """``{"medsynth": fn(state) -> results}`` (empty when evaluation is off)."""
        if not self.config.contrastive.eval_studies or self._eval_spec() is None:
            return {}
        return {"medsynth": lambda state: self.evaluate(state.params, "test")}

    # ----------------------------------------------------------------------------------------
    # The end-of-run table.
    # ----------------------------------------------------------------------------------------

    def report(self, results: dict, workdir: str) -> None:
        """Prints the evaluation table and writes it to ``<workdir>/contrastive_results.json``."""
        res = results.get("medsynth") if "medsynth" in results else results
        if not res or "zero_shot" not in res:
            return
        print(f"\nMedSynth {res['split']} ({res['source']}), {res['n']} studies")
        print(f"{'finding':<14}{'pos':>5}{'zero-shot AUC':>15}{'acc':>8}{'probe AUC':>11}")
        for finding, row in res["zero_shot"].items():
            probe = res.get("linear_probe", {}).get(finding, {})
            pauc = f"{probe['auc']:.3f}" if "auc" in probe else "-"
            print(f"{finding:<14}{row['positives']:>5}{row['auc']:>15.3f}"
                  f"{100 * row['accuracy']:>7.1f}%{pauc:>11}")
        r = res["retrieval"]
        for direction in ("i2t", "t2i"):
            print(f"{direction} recall  " + "  ".join(
                f"R@{k} {100 * r[f'{direction}@{k}']:.1f}%" for k in (1, 5, 10)))
        path = os.path.join(workdir, "contrastive_results.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results written to {path}")


# --------------------------------------------------------------------------------------------
# Starting from a converted two-tower checkpoint (config.init_from, e.g. SigLIP).
# --------------------------------------------------------------------------------------------

def checkpoint_config(directory: str) -> TwoTowerConfig:
    """The two-tower config of a converted checkpoint; a clear error for other models."""
    from medvl_jax.convert import checkpoint_io

    meta = checkpoint_io.read_meta(directory)
    config = checkpoint_io.config_from_dict(meta["family"], meta["model_config"])
    if not isinstance(config, TwoTowerConfig):
        raise checkpoint_io.CheckpointError(
            f"init_from={directory}: {meta['family']} is not a two-tower (image-text) model; "
            f"contrastive training needs one (e.g. SiglipModel)")
    return config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` completed from ``config.init_from`` (a converted two-tower checkpoint):
    an empty ``model`` becomes the checkpoint's, an empty ``tokenizer`` its ``tokenizer/``,
    ``data.image_size`` / ``data.channels`` / ``data.max_length`` left None its vision size,
    channels and text length. Unchanged without ``init_from``; returns a locked config."""
    from medvl_jax.convert import checkpoint_io

    directory = config.get("init_from") or ""
    if not directory:
        return config
    directory = os.path.abspath(directory)
    ckpt = checkpoint_config(directory)
    out = ml_collections.ConfigDict(config.to_dict())
    out.init_from = directory
    if not config.get("model"):
        out.model = ml_collections.ConfigDict(checkpoint_io.config_to_dict(ckpt))
    if not config.get("tokenizer"):
        tok = checkpoint_io.tokenizer_dir(directory)
        if tok is None:
            raise checkpoint_io.CheckpointError(
                f"init_from={directory} has no tokenizer/ directory; set config.tokenizer")
        out.tokenizer = tok
    if out.data.image_size is None and out.data.volume_shape is None:
        out.data.image_size = ckpt.vision.image_size
    if out.data.channels is None:
        out.data.channels = ckpt.vision.num_channels
    if out.data.max_length is None:
        out.data.max_length = ckpt.text.max_len
    out.lock()
    return out


def load_params(directory: str, task: ContrastiveTask) -> dict:
    """The checkpoint's params for ``task`` after checking that the task's model config is
    the checkpoint's (a ValueError names the first differing field)."""
    from medvl_jax.convert import checkpoint_io
    from medvl_jax.tasks import pretrained

    ckpt = checkpoint_config(directory)
    diff = pretrained._first_difference(task.model_config, ckpt, "model.")
    if diff:
        field, ours, theirs = diff
        raise ValueError(f"{field}={ours!r} in the config but {theirs!r} in init_from="
                         f"{directory}; leave config.model empty to take the checkpoint's")
    if len(task.tokenizer) > ckpt.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(task.tokenizer)} tokens but init_from="
                         f"{directory} has a vocabulary of {ckpt.text.vocab_size}")
    _, params, _ = checkpoint_io.load_checkpoint(directory)
    return params
