"""Masked-image-modelling pretraining of a vision tower (MAE, He et al. 2021), 2D and 3D.

Each image (or volume) is cut into patches (tubelets ``tubelet x p x p`` for volumes, as
M3Ret does for 3D retrieval encoders); a random ``mask_ratio`` of them is removed per example,
the tower encodes only the visible ones, and a light decoder (its own transformer over every
position: the encoded visible tokens, a learned mask token elsewhere, fixed sine-cosine
positions) predicts the pixels of every patch. The loss is the mean squared error over the
*masked* patches only, against targets normalised per patch (each patch minus its mean,
divided by ``sqrt(var + 1e-6)``, ``var`` the unbiased variance, as MAE's reference code
computes it) when ``norm_pix_loss``; it is averaged over the masked patches of the batch,
whose number is the same for every example (so it is a batch mean). With ``norm_pix_loss``,
predicting 0 (each patch's mean) scores about 1.0: the loss reads as the fraction of a
patch's variation not reconstructed (metric ``loss_of_zero`` is that baseline on the batch).

Config::

    mae = {"mask_ratio": 0.75, "norm_pix_loss": True,
           "decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4,
           "decoder_mlp_dim": 512, "predict_batch_size": 250}
    model = {"vision": {VisionConfig fields}}      # 2D, or 3D with tubelet > 0

Parameters: ``{"vision": <exactly VisionEncoder's layout>, "decoder": {...}}``. The encoder
(:class:`MAEEncoder`) declares the tower's own parameters under their own names (``patch``,
``patch_bias``, ``pos``, ``cls``/``pre_norm`` for CLIP, ``layers_{i}`` or scanned ``layers``,
``post_norm``) and runs vision.py's blocks and norms, so an MAE workdir is a vision tower
for any other recipe: ``config.vision_init=<workdir>`` (or ``vision_stage``), the decoder
dropped. Without masking it computes exactly :class:`VisionEncoder`'s tokens (before any
token merge; for CLIP, its post-norm is applied to every token, the class token's being the
encoder's pooled output) — tests/tasks/test_mae.py checks both.

Masking: per example, a random permutation of the patches (``jax.random``, from the step's
rng, split per example) whose first ``round(mask_ratio * N)`` entries are masked; the number
is fixed, so every shape is static. The same rng gives the same masks.

Data: image-only batches ``{"images": [B, H, W, C] | [B, D, H, W, C]}`` from the sources of
:mod:`medvl_jax.data.pairs` (MedSynth cxr/ct studies, ``pairs`` or ``labels`` JSONL files:
any image they hold; texts and labels are not read).

Evaluation (``config.evals``): ``linear_probe`` on :meth:`MAETask.image_features`, the
tower's post-normed tokens of *all* patches (no masking), mean-pooled.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.data import pairs, pipeline
from medvl_jax.models import from_config
from medvl_jax.models.decoder import REMAT_POLICIES
from medvl_jax.models.layers import param_with_axes
from medvl_jax.models.vision import (LayerNorm, VisionBlock, VisionConfig,
                                     resample_pos_embedding, sincos2d_init)
from medvl_jax.tasks import base

NORM_PIX_EPS = 1e-6  # MAE's epsilon in the per-patch normalisation of the targets.


def default_config() -> ml_collections.ConfigDict:
    """The ``mae`` section of a config."""
    c = ml_collections.ConfigDict()
    c.mask_ratio = 0.75          # Fraction of the patches removed per example.
    c.norm_pix_loss = True       # Targets normalised per patch (mean, unbiased var, eps 1e-6).
    c.decoder_width = 128        # The decoder's transformer (dropped after pretraining).
    c.decoder_depth = 2
    c.decoder_heads = 4
    c.decoder_mlp_dim = 512
    c.predict_batch_size = 250   # Rows per forward pass when computing features of a set.
    return c


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """The tower and the decoder (``.vision`` is what ``vision_init`` reuses)."""
    vision: VisionConfig
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 512

    def __post_init__(self):
        if self.vision.use_head:
            raise ValueError("model.vision.use_head=True: MAE trains the tower's tokens, not "
                             "an attention-pooling head (it would stay random); set it False")
        if self.decoder_width % 4:
            raise ValueError(f"mae.decoder_width={self.decoder_width} must be a multiple of 4 "
                             f"(sine-cosine positions)")
        if self.decoder_depth < 0:
            raise ValueError(f"mae.decoder_depth must be >= 0, got {self.decoder_depth}")

    @property
    def decoder(self) -> VisionConfig:
        """The decoder's blocks, as a :class:`VisionConfig` (vision.py's blocks run it)."""
        v = self.vision
        return VisionConfig(layout="siglip", width=self.decoder_width, depth=self.decoder_depth,
                            num_heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim,
                            activation=v.activation, norm_eps=v.norm_eps,
                            param_dtype=v.param_dtype, dtype=v.dtype)


# --------------------------------------------------------------------------------------------
# Patches, masks and the loss: pure functions (tested against NumPy).
# --------------------------------------------------------------------------------------------

def patch_grid(shape: tuple[int, ...], patch: int, tubelet: int = 0) -> tuple[int, int, int]:
    """``(gt, gh, gw)``: the patch grid of images ``[B, H, W, C]`` (gt = 1) or, with
    ``tubelet`` > 0, volumes ``[B, D, H, W, C]`` (trailing pixels that fill no patch are
    dropped, as :class:`VisionEncoder` drops them)."""
    if tubelet:
        if len(shape) != 5:
            raise ValueError(f"tubelet={tubelet} needs volumes [B, D, H, W, C], got {shape}")
        return shape[1] // tubelet, shape[2] // patch, shape[3] // patch
    if len(shape) != 4:
        raise ValueError(f"2D patches need images [B, H, W, C], got {shape}")
    return 1, shape[1] // patch, shape[2] // patch


def patchify(images, patch: int, tubelet: int = 0):
    """Patches ``[B, N, P]`` of images ``[B, H, W, C]`` or (``tubelet`` > 0) volumes
    ``[B, D, H, W, C]``. Patches in raster order over (t, h, w), the tower's token order; the
    pixels of a patch in the order (tubelet frame, row, column, channel), the order of the
    tower's patch kernel ``[(t,) p, p, C, W]`` flattened, so ``patchify(x) @ kernel.reshape(P,
    W)`` is the tower's patch embedding. ``P = (tubelet *) p * p * C``."""
    gt, gh, gw = patch_grid(images.shape, patch, tubelet)
    b, ch = images.shape[0], images.shape[-1]
    p = patch
    if tubelet:
        x = images[:, : gt * tubelet, : gh * p, : gw * p]
        x = x.reshape(b, gt, tubelet, gh, p, gw, p, ch).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, gt * gh * gw, tubelet * p * p * ch)
    x = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * ch)


def random_masking(rng, batch_size: int, num_patches: int, num_masked: int):
    """``(keep int32 [B, N - M], mask bool [B, N])``: for each example a random permutation
    of the ``N`` patches (``jax.random.permutation`` with ``rng`` split per example) whose
    first ``M`` entries are masked; ``keep`` holds the visible patches' indices in increasing
    order, ``mask`` is True on the masked ones."""
    if not 0 <= num_masked < num_patches:
        raise ValueError(f"num_masked={num_masked} must be in [0, {num_patches})")
    keys = jax.random.split(rng, batch_size)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_patches))(keys)
    keep = jnp.sort(perms[:, num_masked:], axis=1).astype(jnp.int32)
    mask = jnp.ones((batch_size, num_patches), bool)
    mask = mask.at[jnp.arange(batch_size)[:, None], keep].set(False)
    return keep, mask


def normalise_patches(target, eps: float = NORM_PIX_EPS):
    """Each patch (last axis) minus its mean, over ``sqrt(unbiased variance + eps)``."""
    target = target.astype(jnp.float32)
    mean = target.mean(-1, keepdims=True)
    var = jnp.square(target - mean).sum(-1, keepdims=True) / (target.shape[-1] - 1)
    return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(pred, target_patches, mask, norm_pix: bool = True):
    """MAE's loss: the mean over pixels of the squared error of each patch, averaged over the
    masked patches (``mask`` True) of the whole batch. ``pred`` and ``target_patches`` are
    ``[B, N, P]`` (targets: :func:`patchify` of the images), normalised per patch first with
    ``norm_pix`` (:func:`normalise_patches`)."""
    target = (normalise_patches(target_patches) if norm_pix
              else target_patches.astype(jnp.float32))
    per_patch = jnp.square(pred.astype(jnp.float32) - target).mean(-1)
    m = mask.astype(jnp.float32)
    return (per_patch * m).sum() / jnp.maximum(m.sum(), 1.0)


def sincos_positions(gt: int, gh: int, gw: int, dim: int) -> np.ndarray:
    """``[gt * gh * gw, dim]`` fixed sine-cosine positions in (t, h, w) raster order: MAE's 2D
    table (a quarter of the channels each for sin/cos of the row and of the column), plus, for
    volumes (``gt`` > 1), a 1D table of the slab index (half sin, half cos) added to it."""
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q) / q)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    r = rows.reshape(-1, 1) * omega[None]
    c = cols.reshape(-1, 1) * omega[None]
    table = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
    table = np.tile(table, (gt, 1))
    if gt > 1:
        h = dim // 2
        omega_t = 1.0 / 10000.0 ** (np.arange(h) / h)
        t = np.repeat(np.arange(gt), gh * gw).reshape(-1, 1) * omega_t[None]
        table = table + np.concatenate([np.sin(t), np.cos(t)], axis=1)
    return table.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------

class MAEEncoder(nn.Module):
    """The tower of :class:`medvl_jax.models.vision.VisionEncoder`, run on the visible patches.

    Same parameters (names, shapes, logical axes, initialisers, creation order) as
    ``VisionEncoder(config)`` without a head: the patch embedding and position table are
    declared here under the tower's names (VisionEncoder computes them inline, with no
    submodule to call), then the visible tokens are gathered and vision.py's own
    ``VisionBlock``s and ``LayerNorm`` run them. Returns post-normed tokens ``[B, K, W]``
    (``K`` = visible patches, plus the class token first for CLIP).
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, images, keep=None):
        """``keep``: int32 ``[B, K]`` indices of the visible patches; None keeps them all."""
        c = self.config
        p, dt = c.patch_size, c.dtype
        x = images.astype(dt)
        gt, gh, gw = patch_grid(x.shape, p, c.tubelet)
        ch = x.shape[-1]
        kshape = ((c.tubelet,) if c.tubelet else ()) + (p, p, ch, c.width)
        kernel = param_with_axes(self, "patch", nn.initializers.lecun_normal(), kshape,
                                 c.param_dtype, (None,) * (len(kshape) - 1) + ("vision_embed",))
        x = jnp.einsum("bnp,pd->bnd", patchify(x, p, c.tubelet),
                       kernel.reshape(-1, c.width).astype(dt))
        b = x.shape[0]
        if c.layout == "siglip":
            bias = param_with_axes(self, "patch_bias", nn.initializers.zeros, (c.width,),
                                   c.param_dtype, ("vision_embed",))
            x = x + bias.astype(dt)
        n_pos = c.grid ** 2 + (c.layout == "clip")
        pos_init = nn.initializers.normal(0.02)
        if c.pos_init == "sincos2d":
            pos_init = sincos2d_init(c.grid, clip=c.layout == "clip")
        pos = param_with_axes(self, "pos", pos_init, (n_pos, c.width), c.param_dtype,
                              (None, "vision_embed"))
        patch_pos = pos[1:] if c.layout == "clip" else pos
        patch_pos = resample_pos_embedding(patch_pos, c.grid, (gh, gw)).astype(dt)
        x = x + jnp.tile(patch_pos, (gt, 1))[None]  # The same (h, w) table on every slab.
        if keep is not None:
            x = jnp.take_along_axis(x, keep[..., None].astype(jnp.int32), axis=1)
        if c.layout == "clip":
            cls = param_with_axes(self, "cls", nn.initializers.normal(0.02), (c.width,),
                                  c.param_dtype, ("vision_embed",))
            cls = (cls + pos[0]).astype(dt)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.width)), x], axis=1)
        ln = dict(eps=c.norm_eps, dtype=dt, param_dtype=c.param_dtype)
        if c.layout == "clip":
            x = LayerNorm(name="pre_norm", **ln)(x)
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))
        block = VisionBlock
        if c.remat_policy != "none":
            block = nn.remat(VisionBlock, policy=REMAT_POLICIES[c.remat_policy],
                             prevent_cse=not c.scan_layers)
        if c.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"}
                           )(c, name="layers")(x, None)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"layers_{i}")(x)
        return LayerNorm(name="post_norm", **ln)(x)


class MAEDecoder(nn.Module):
    """Encoded visible tokens → predicted pixels ``[B, N, P]`` of every patch."""

    config: MAEConfig

    @nn.compact
    def __call__(self, tokens, keep, grid: tuple[int, int, int], patch_dim: int):
        c, dc = self.config, self.config.decoder
        dt, w = dc.dtype, dc.width
        if c.vision.layout == "clip":
            tokens = tokens[:, 1:]  # The class token has no patch to reconstruct.
        b = tokens.shape[0]
        n = grid[0] * grid[1] * grid[2]
        h = jnp.einsum("bkv,vw->bkw", tokens.astype(dt), param_with_axes(
            self, "embed", nn.initializers.lecun_normal(), (c.vision.width, w), dc.param_dtype,
            ("vision_embed", None)).astype(dt))
        h = h + param_with_axes(self, "embed_bias", nn.initializers.zeros, (w,), dc.param_dtype,
                                (None,)).astype(dt)
        mask_token = param_with_axes(self, "mask_token", nn.initializers.normal(0.02), (w,),
                                     dc.param_dtype, (None,))
        x = jnp.broadcast_to(mask_token.astype(dt), (b, n, w))
        x = x.at[jnp.arange(b)[:, None], keep].set(h)
        x = x + jnp.asarray(sincos_positions(*grid, w), dt)[None]
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))
        for i in range(dc.depth):
            x, _ = VisionBlock(dc, name=f"layers_{i}")(x)
        x = LayerNorm(dc.norm_eps, dt, dc.param_dtype, name="norm")(x)
        y = jnp.einsum("bnw,wp->bnp", x, param_with_axes(
            self, "pred", nn.initializers.lecun_normal(), (w, patch_dim), dc.param_dtype,
            (None, None)).astype(dt))
        return y + param_with_axes(self, "pred_bias", nn.initializers.zeros, (patch_dim,),
                                   dc.param_dtype, (None,)).astype(dt)


class MAEModel(nn.Module):
    """Images and visible-patch indices → predicted pixels of every patch ``[B, N, P]``."""

    config: MAEConfig

    @nn.compact
    def __call__(self, images, keep):
        v = self.config.vision
        tokens = MAEEncoder(v, name="vision")(images, keep)
        grid = patch_grid(images.shape, v.patch_size, v.tubelet)
        patch_dim = (v.tubelet or 1) * v.patch_size ** 2 * images.shape[-1]
        return MAEDecoder(self.config, name="decoder")(tokens, keep, grid, patch_dim)


def model_config(model: Any, mae: Any) -> MAEConfig:
    """An :class:`MAEConfig` from ``config.model`` (``{"vision": {...}}``) and ``config.mae``."""
    model = dict(model)
    if "vision" not in model:
        raise KeyError("config.model has no 'vision' section")
    unknown = set(model) - {"vision"}
    if unknown:
        raise KeyError(f"config.model: unknown key(s) {sorted(unknown)} for the mae task; "
                       f"allowed: ['vision'] (the decoder is configured in config.mae)")
    vision = from_config.dataclass_from_dict(VisionConfig, dict(model["vision"]), "model.vision")
    return MAEConfig(vision=vision, decoder_width=int(mae.decoder_width),
                     decoder_depth=int(mae.decoder_depth), decoder_heads=int(mae.decoder_heads),
                     decoder_mlp_dim=int(mae.decoder_mlp_dim))




class MAETask(base.Task):
    """Masked autoencoder: random patch masking, the tower on visible patches, a light
    decoder, per-patch-normalised pixel loss on the masked patches."""

    name = "mae"
    outputs = frozenset({"image_features"})
    default_config = staticmethod(default_config)

    def __init__(self, config: ml_collections.ConfigDict, tokenizer=None, *, start=None):
        super().__init__(config, tokenizer, start=start)
        mc = config.mae
        self.model_config = model_config(config.model, mc)
        v = self.model_config.vision
        pairs.check_images(config.data, v)
        self.model = MAEModel(self.model_config)
        self.encoder = MAEEncoder(v)
        shape = pipeline.image_shape(config.data)
        self.grid = patch_grid((1,) + shape, v.patch_size, v.tubelet)
        self.num_patches = int(np.prod(self.grid))
        self.patch_dim = (v.tubelet or 1) * v.patch_size ** 2 * shape[-1]
        ratio = float(mc.mask_ratio)
        self.num_masked = int(round(ratio * self.num_patches))
        if not 0 < self.num_masked < self.num_patches:
            raise ValueError(f"mae.mask_ratio={ratio} masks {self.num_masked} of the "
                             f"{self.num_patches} patches; it must mask at least one and keep "
                             f"at least one")
        if mc.norm_pix_loss and self.patch_dim < 2:
            raise ValueError("mae.norm_pix_loss needs patches of at least 2 pixels")
        self._features = None

    def image_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image or volume (no batch axis)."""
        return pipeline.image_shape(self.config.data)

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch."""
        return {"images": np.zeros((batch_size,) + self.image_shape(), np.float32)}

    def _keep_all_but_masked(self, batch_size: int):
        k = self.num_patches - self.num_masked
        return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch_size, k))

    def init(self, rng, batch):
        """Parameters (with logical-axis metadata): ``{"vision", "decoder"}``."""
        images = batch["images"]
        return self.model.init(rng, images, self._keep_all_but_masked(images.shape[0]))["params"]

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's grain iterator of image batches."""
        return pairs.build_iterator(config.data, None, split="train", sentences=0,
                                    process_index=process_index,
                                    process_count=process_count, skips=skips)

    def masks(self, rng, batch_size: int):
        """``(keep, mask)`` of a batch for the step's ``rng`` (:func:`random_masking`)."""
        return random_masking(rng, batch_size, self.num_patches, self.num_masked)

    def loss(self, params, batch, rng):
        """``(loss, metrics)``: :func:`mae_loss` on the masked patches, and the loss of
        predicting 0 (``loss_of_zero``; with ``norm_pix_loss``: each patch's mean)."""
        images = batch["images"]
        keep, mask = self.masks(rng, images.shape[0])
        pred = self.model.apply({"params": params}, images, keep)
        v, norm = self.model_config.vision, bool(self.config.mae.norm_pix_loss)
        target = patchify(images, v.patch_size, v.tubelet)
        loss = mae_loss(pred, target, mask, norm)
        return loss, {"loss_of_zero": mae_loss(jnp.zeros_like(pred), target, mask, norm)}

    def count_tokens(self, local_batch) -> int:
        """No text: 0 (the loop reports examples/s)."""
        del local_batch
        return 0

    def image_features(self, model_params, images: np.ndarray) -> np.ndarray:
        """The tower's post-normed tokens of every patch (no masking), mean-pooled:
        ``[N, width]``."""
        if self._features is None:
            self._features = jax.jit(
                lambda p, x: self.encoder.apply({"params": p["vision"]}, x).mean(1))
        return pairs.in_chunks(lambda x: self._features(model_params, x), [images],
                               int(self.config.mae.predict_batch_size))


TASK = MAETask
