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

Evaluation is declared in ``config.evals``: the model gives image and text embeddings (for
``zero_shot`` and ``retrieval`` evaluators) and image features (``linear_probe``) on any
source the data layer reads.

Gradient accumulation (``optim.grad_accum > 1``) is refused: each microbatch would contrast
its examples only against the other examples of the microbatch, a different (easier) loss
than the configured batch's.
"""
from __future__ import annotations

import math
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
from medvl_jax.tasks import base
from medvl_jax.tasks import contrastive_losses as closs

LOSSES = closs.KINDS  # "clip", "convirt", "siglip"
BATCH_AXES = ("data", "fsdp")

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
    c.embed_batch_size = 250     # Rows per forward pass when embedding a whole set.
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


class ContrastiveTask(base.Task):
    """Two-tower model + contrastive loss; the loop does the rest."""

    name = "contrastive"
    outputs = frozenset({"image_embeddings", "text_embeddings", "image_features"})

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *, start=None):
        super().__init__(config, tokenizer, start=start)
        cc = config.contrastive
        if cc.loss not in LOSSES:
            raise ValueError(f"contrastive.loss must be one of {LOSSES}, got {cc.loss!r}")
        if cc.sharded_impl not in closs.IMPLS:
            raise ValueError(f"contrastive.sharded_impl must be one of {closs.IMPLS}, got "
                             f"{cc.sharded_impl!r}")
        if int(config.optim.get("grad_accum", 1)) > 1:
            raise ValueError(
                f"optim.grad_accum={config.optim.grad_accum}: a contrastive loss contrasts each "
                f"example with every other example of the batch, and a microbatch would see "
                f"only its own share of them (a different, easier loss); use a smaller "
                f"data.batch_size or more devices instead")
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

    default_config = staticmethod(default_config)

    @classmethod
    def resolve_config(cls, config, start):
        return resolve_config(config, start)

    def pretrained_params(self):
        """The starting checkpoint's params, after checking the model config and that the
        tokenizer fits its vocabulary."""
        vocab = self.start.model_config.text.vocab_size if self.start else 0
        if self.start is not None and len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but init_from="
                             f"{self.start.path} has a vocabulary of {vocab}")
        return super().pretrained_params()

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

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's grain iterator of image–text batches (:mod:`medvl_jax.data.pairs`)."""
        return pairs.build_iterator(config.data, self.tokenizer, split="train",
                                    sentences=int(config.contrastive.sentences),
                                    process_index=process_index, process_count=process_count,
                                    skips=skips)

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
    # Embeddings of whole sets (evaluators).
    # ----------------------------------------------------------------------------------------

    def _jitted(self):
        if self._encoders is None:
            img = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                        method=TwoTower.encode_image))
            txt = jax.jit(lambda p, t, m: self.model.apply({"params": p}, t, m,
                                                           method=TwoTower.encode_text))
            self._encoders = img, txt
        return self._encoders

    def image_embeddings(self, model_params, images: np.ndarray) -> np.ndarray:
        """Normalised image embeddings ``[N, E]`` of preprocessed images."""
        fn, bs = self._jitted()[0], int(self.config.contrastive.embed_batch_size)
        return pairs.in_chunks(lambda x: fn(model_params, x), [images], bs)

    def image_features(self, model_params, images: np.ndarray) -> np.ndarray:
        """The image embeddings, as a linear probe's features."""
        return self.image_embeddings(model_params, images)

    def text_embeddings(self, model_params, texts: list[str]) -> np.ndarray:
        """Normalised text embeddings ``[N, E]`` of strings."""
        tokens, mask = pairs.tokenize(self.tokenizer, texts, self.config.data.max_length)
        fn, bs = self._jitted()[1], int(self.config.contrastive.embed_batch_size)
        if not self.config.contrastive.text_mask:
            return pairs.in_chunks(lambda t: fn(model_params, t, None), [tokens], bs)
        return pairs.in_chunks(lambda t, m: fn(model_params, t, m), [tokens, mask], bs)


TASK = ContrastiveTask


# --------------------------------------------------------------------------------------------
# Starting from a converted two-tower checkpoint (config.init_from, e.g. SigLIP).
# --------------------------------------------------------------------------------------------

def resolve_config(config: ml_collections.ConfigDict, start) -> ml_collections.ConfigDict:
    """``config`` completed from the starting checkpoint ``start`` (a two-tower model: a
    converted SiglipModel, or a contrastive workdir): an empty ``model`` becomes the
    checkpoint's, an empty ``tokenizer`` its tokenizer, ``data.image_size`` /
    ``data.channels`` / ``data.max_length`` left None its vision size, channels and text
    length. Unchanged without ``start``; returns a locked config."""
    from medvl_jax.convert import checkpoint_io

    what = "a two-tower checkpoint or a contrastive workdir"
    if start is None:
        return base.from_start(config, None, {}, what)
    ckpt = start.model_config
    if not isinstance(ckpt, TwoTowerConfig):
        raise checkpoint_io.CheckpointError(
            f"init_from={start.path}: {type(ckpt).__name__} is not a two-tower (image-text) "
            f"model; contrastive training needs one (e.g. SiglipModel)")
    out = base.from_start(config, start, checkpoint_io.config_to_dict(ckpt), what)
    if out.data.image_size is None and out.data.volume_shape is None:
        out.data.image_size = ckpt.vision.image_size
    if out.data.channels is None:
        out.data.channels = ckpt.vision.num_channels
    if out.data.max_length is None:
        out.data.max_length = ckpt.text.max_len
    out.lock()
    return out
