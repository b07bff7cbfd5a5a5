"""The policy: a VLM with optional LoRA factors and an optional frozen reference.

SFT, DPO and GRPO (and any later preference or RL task) hold one :class:`Policy`; none of them
extends another. The policy owns

* the model built from ``config.model`` (:class:`medvl_jax.models.vlm.VLM`), its checks
  against the data section and the tokenizer, and starting from a checkpoint
  (:meth:`Policy.resolve_config`, :meth:`Policy.pretrained_params`);
* LoRA (``config.lora``; with ``rank > 0`` params are ``{**base, "lora": factors}``);
* the reference model a preference or RL loss compares against (:meth:`reference_params`):
  with LoRA on, the base inside the train state (no second copy, sharded like the state);
  otherwise the starting checkpoint (``config.init_from``), or params given at construction,
  held as a replicated constant;
* log-probabilities of answer tokens (:meth:`sequence_logprobs`, :meth:`completion_logprobs`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.convert import checkpoint_io
from medvl_jax.models import from_config
from medvl_jax.models import lora as lora_lib
from medvl_jax.models.vlm import VLM, VLMConfig
from medvl_jax.tasks import base, losses


def resolve_config(config: ml_collections.ConfigDict, start) -> ml_collections.ConfigDict:
    """``config`` completed from the starting checkpoint ``start`` (a restore.Checkpoint, or
    None): an empty ``config.model`` becomes the checkpoint's model (every field but
    ``image_token_id``, which comes from the tokenizer), an empty ``tokenizer`` the
    checkpoint's, ``data.image_size`` / ``data.num_image_tokens`` left None the checkpoint's.
    The completed config is what the run saves, so its workdir never needs ``init_from`` to
    be rebuilt. Returns a new, locked config (``config`` itself without ``start``)."""
    what = "a VLM workdir or converted checkpoint"
    if start is None:
        return base.from_start(config, None, {}, what)
    ckpt = start.model_config
    if not isinstance(ckpt, VLMConfig):
        raise checkpoint_io.CheckpointError(
            f"init_from={start.path}: {type(ckpt).__name__} is not a vision-language model; "
            f"this task needs a VLM (PaliGemma, LLaVA, Gemma 3, or a VLM workdir)")
    section = checkpoint_io.config_to_dict(ckpt)
    section.pop("image_token_id")  # The tokenizer's.
    out = base.from_start(config, start, section, what)
    if out.data.image_size is None and out.data.volume_shape is None:
        out.data.image_size = ckpt.vision.image_size
    if out.data.num_image_tokens is None:
        out.data.num_image_tokens = from_config.num_image_tokens(ckpt)
    out.lock()
    return out


def check_tokenizer(tokenizer, ckpt: VLMConfig, path: str) -> None:
    """The tokenizer must fit the checkpoint's vocabulary and use its image token."""
    n = len(tokenizer)
    if n > ckpt.text.vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but init_from={path} has a "
                         f"vocabulary of {ckpt.text.vocab_size}: tokenizer and checkpoint do "
                         f"not match (use the checkpoint's tokenizer)")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != ckpt.image_token_id:
        name = tokenizer.convert_ids_to_tokens(ckpt.image_token_id) if (
            0 <= ckpt.image_token_id < n) else None
        raise ValueError(f"the tokenizer's '<image>' token has id {image_id} but "
                         f"init_from={path} expects image token id {ckpt.image_token_id} "
                         f"({name!r}); the data pipeline expands '<image>' placeholders into "
                         f"'<image>' tokens, so the two must be the same token")


def sequence_logprobs(logits: jnp.ndarray, tokens: jnp.ndarray,
                      mask: jnp.ndarray) -> jnp.ndarray:
    """Sum of ``log p(token)`` over the tokens where ``mask`` is 1: ``[B, L, V] -> [B]``."""
    lp = losses.token_logprobs(logits, tokens)
    return (lp * mask[:, 1:].astype(jnp.float32)).sum(axis=1)


class Policy:
    """A VLM + LoRA + optional frozen reference; see the module docstring.

    Args:
      config: the run config (``model``, ``data``, ``lora``).
      tokenizer: must have an ``<image>`` token.
      start: the starting checkpoint (restore.Checkpoint) or None.
      reference_params: plain params of the reference model (default: ``start``'s).
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *, start=None,
                 reference_params=None):
        self.config = config
        self.tokenizer = tokenizer
        self.start = start
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
        self.lora_config = lora_lib.get_config(config)
        self._reference = reference_params
        self._placed = None  # (shardings, the reference placed with them)

    @property
    def lora(self) -> bool:
        return lora_lib.enabled(self.lora_config)

    # --- parameters ------------------------------------------------------------------------

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a batch of ``batch_size`` examples of the data section."""
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
        """Parameters for a batch of this shape; with LoRA on, the base params plus a
        ``lora`` entry (the base init is unchanged by LoRA)."""
        params = self.model.init(rng, batch["tokens"], batch["images"],
                                 input_mask=batch["input_mask"], mask_ar=batch["mask_ar"])["params"]
        if self.lora:
            params = {**params, lora_lib.LORA_KEY: lora_lib.init_lora(
                jax.random.fold_in(rng, 0x10A), params, self.lora_config)}
        return params

    def model_params(self, params):
        """Plain model params (LoRA merged, no dropout): for sampling, evaluation, export."""
        return lora_lib.merged_params(params, self.lora_config)

    def pretrained_params(self):
        """The starting checkpoint's params after checking its tokenizer and model config."""
        if self.start is None:
            raise ValueError("no starting checkpoint (config.init_from is empty)")
        check_tokenizer(self.tokenizer, self.start.model_config, self.start.path)
        base.check_same_model(self.model_config, self.start.model_config, self.start.path)
        return self.start.params

    def reference_params(self, params=None):
        """The frozen reference's plain params: the base of ``params`` with LoRA on, else the
        params given at construction, the starting checkpoint's, or (a run from scratch) the
        run's initial weights; read once and kept on the host as a replicated constant."""
        if self.lora:
            if params is None:
                raise ValueError("with LoRA on, the reference is the base of the params: "
                                 "pass params")
            base_params, _ = lora_lib.split(params)
            return jax.lax.stop_gradient(base_params)
        if self._reference is None:
            if self.start is not None:
                self._reference = self.pretrained_params()
            elif self.config.get("init_from"):
                raise ValueError(f"the reference is init_from={self.config.init_from}, but "
                                 f"this task was built without it (pass start=)")
            elif self.config.get("vision_init") or self.config.get("vision_stage"):
                raise ValueError("a reference model is needed and the run starts from a "
                                 "vision tower: set config.init_from (a training workdir or "
                                 "a converted checkpoint) to the model to start from")
            else:  # From scratch: the run's own initial weights, recomputed from its seed.
                import flax.linen as nn

                key, _ = base.run_keys(int(self.config.train.seed))
                self._reference = nn.unbox(jax.jit(self.init)(key, self.dummy_batch(1)))
        self._reference = jax.tree.map(np.asarray, self._reference)
        return self._placed_like(params)

    def _placed_like(self, params):
        """The host reference, or, when ``params`` are placed arrays (outside a jit: the GRPO
        rollout's log-prob pass), a device copy with each parameter's sharding, made once.
        A host pytree would be sent whole to one device on every call."""
        leaves = jax.tree.leaves(params) if params is not None else []
        if not leaves or not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                                 for x in leaves):
            return self._reference
        shardings = jax.tree.map(lambda x: x.sharding, params)
        if self._placed is None or self._placed[0] != shardings:
            self._placed = (shardings, jax.device_put(self._reference, shardings))
        return self._placed[1]

    # --- forward passes --------------------------------------------------------------------

    def apply(self, params, batch, rng=None):
        """Logits ``[B, L, V]``; ``rng`` enables LoRA dropout (training)."""
        if self.lora:
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

    def apply_model(self, model_params, batch):
        """Logits of plain model params (a reference; no LoRA, no dropout)."""
        logits, _ = self.model.apply({"params": model_params}, batch["tokens"], batch["images"],
                                     input_mask=batch["input_mask"], mask_ar=batch["mask_ar"])
        return logits

    def sequence_logprobs(self, params, batch, rng=None, *, reference: bool = False):
        """``[B]`` sums of the log-probs of the ``loss_mask`` tokens of ``batch``, under the
        policy (``params``: the task's params) or, with ``reference``, the frozen reference
        (``params`` then only give the LoRA base)."""
        if reference:
            logits = jax.lax.stop_gradient(
                self.apply_model(self.reference_params(params), batch))
        else:
            logits = self.apply(params, batch, rng)
        return sequence_logprobs(logits, batch["tokens"],
                                 batch["loss_mask"] * batch["input_mask"])

    def completion_logprobs(self, logits, tokens, prompt_len: int, num_new: int):
        """Log-probs ``[B, T]`` of the completion tokens at positions ``P .. P+T-1`` over the
        sampler's distribution (the image placeholder left out, as the sampler does)."""
        from medvl_jax.sampling.sampler import suppress_image_token

        logits = suppress_image_token(logits, self.model_config.image_token_id)
        lp = losses.token_logprobs(logits, tokens)  # entry i: token i + 1
        return lp[:, prompt_len - 1:prompt_len - 1 + num_new]

    @functools.cached_property
    def jitted_completion_logprobs(self):
        """Jitted ``(model params, tokens, images, input_mask, mask_ar) -> [B, T]`` for
        prompts of ``data.max_length`` tokens and completions of the rest."""
        p = int(self.config.data.max_length)

        def fn(model_params, tokens, images, input_mask, mask_ar):
            logits = self.apply_model(model_params, {"tokens": tokens, "images": images,
                                                     "input_mask": input_mask,
                                                     "mask_ar": mask_ar})
            return self.completion_logprobs(logits, tokens, p, tokens.shape[1] - p)

        return jax.jit(fn)
