"""Generate text from a medvl_jax checkpoint (a text decoder or a VLM).

    python -m medvl_jax.generate --checkpoint DIR --prompt TEXT [--image FILE ...]
        [--max_new_tokens 64 --temperature 0 --top_k 0 --top_p 1 --seed 0] [--modality ct]

The checkpoint is a directory written by ``medvl_jax.convert.from_hf`` (tokenizer in
``DIR/tokenizer``) or a training workdir (its newest checkpoint is exported once to
``DIR/export/step_N``, see ``medvl_jax.convert.workdir``). A model trained here is prompted
exactly as in training: its chat template with the images' ``<image>`` placeholders in the user
turn, its image preprocessing (a 3D tower gets the whole volume), its end-of-turn stop token.
Images are read and scaled to [0, 1] by ``medvl_jax.data.pipeline.load_image``, the function
training uses (DICOM CT in Hounsfield units through ``data.ct_window``, the non-finite policy,
spacing), with the run's data section, or the default one for a converted model.
Files that do not say what they hold (NIfTI) are read in their stored units: ``--modality ct``
says they are CT in Hounsfield units, windowed as in training (MedSynth CT); otherwise they are
min-max scaled. A DICOM file's own modality is kept.
For a converted model, the prompt goes through the tokenizer's chat template when it
has one (a single user turn plus the generation prompt), else it is used as raw text. For a VLM,
each ``--image`` (PNG/JPEG/DICOM/NIfTI slice stack) is scaled to [0, 1] as above, turned into 3
channels, resized to the vision tower's size, normalised with the processor's mean/std
(``preprocessor_config.json``, else 0.5/0.5), and its image tokens are placed before the text.
PaliGemma prompts are a bidirectional prefix, as in its training. Greedy by default
(``--temperature 0``); stops at the tokenizer's EOS. Prints the generated text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import numpy as np

from medvl_jax import cli_errors
from medvl_jax.convert import checkpoint_io
from medvl_jax.data.errors import DataError
from medvl_jax.models.from_config import num_image_tokens
from medvl_jax.models.decoder import DecoderConfig
from medvl_jax.models.vlm import VLMConfig
from medvl_jax.sampling.sampler import generate


def preprocess_image(path: str, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), *,
                     modality: str | None = None) -> np.ndarray:
    """Reads an image file and returns float32 ``[size, size, 3]`` ready for the vision tower.

    Intensities as in training with the default data section
    (:func:`medvl_jax.data.pipeline.load_image`; ``modality`` for files that state none). A
    volume or multi-frame file contributes its middle slice.
    """
    from medvl_jax.data import pipeline
    from medvl_jax.data.preprocess import linear_resize

    x = pipeline.load_image(path, pipeline.default_config(), modality=modality)
    if x.ndim == 4:  # multi-frame colour
        x = x[x.shape[0] // 2]
    if x.ndim == 3 and x.shape[-1] not in (3, 4):  # volume: middle slice
        x = x[x.shape[0] // 2]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    x = x[..., :3]
    if x.ndim != 3:
        raise DataError(f"cannot make an RGB image of shape {x.shape}", where=path,
                        reason="bad_dimensionality")
    x = linear_resize(x, (size, size), axes=(0, 1), antialias=True)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def _processor_stats(tok_dir: str | None) -> tuple[tuple, tuple]:
    if tok_dir is not None:
        path = os.path.join(tok_dir, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            return tuple(cfg.get("image_mean", (0.5,) * 3)), tuple(cfg.get("image_std", (0.5,) * 3))
    return (0.5,) * 3, (0.5,) * 3


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of the prompt: chat template (user turn + generation prompt) if any, else raw."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return list(tokenizer(text)["input_ids"])


def trained_prompt(data: dict, tokenizer, prompt: str, images: list[str],
                   modality: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
    """Prompt ids, ``mask_ar``, images and stop ids exactly as the training data pipeline made
    them (``data``: the run's data config): chat template, ``<image>`` placeholders in the user
    turn, the same image preprocessing. A volume given to a 2D model contributes its middle
    slice. ``modality`` (e.g. "ct") applies to files whose reader reports none (NIfTI)."""
    import ml_collections

    from medvl_jax.data import chat, pipeline

    d = ml_collections.ConfigDict(data)
    feat = pipeline.Featurizer(d, tokenizer, train=False)
    arrays = []
    for path in images:
        x = pipeline.load_image(path, d, modality=modality)
        if d.volume_shape is None and (x.ndim == 4 or (x.ndim == 3 and x.shape[-1] not in (
                3, 4, d.channels))):
            x = x[x.shape[0] // 2]
        arrays.append(feat.ops(x, None))
    text = "".join(f"{chat.IMAGE_PLACEHOLDER}\n" for _ in images) + prompt
    enc = chat.encode_prompt(tokenizer, [{"role": "user", "content": text}], d.template,
                             num_image_tokens=d.num_image_tokens, num_images=len(images),
                             prefix_lm=d.prefix_lm, where="prompt")
    pixels = np.stack(arrays)[None] if arrays else None
    stop = tokenizer.convert_tokens_to_ids(chat.end_of_turn_token(d.template))
    return np.asarray([enc.tokens], np.int32), np.asarray([enc.mask_ar], np.int32), pixels, [stop]


def run(checkpoint: str, prompt: str, images: list[str] = (), *, max_new_tokens: int = 64,
        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        modality: str | None = None) -> str:
    """Loads the checkpoint (a converted directory or a training workdir), generates and
    returns the decoded completion. ``modality``: see :func:`trained_prompt`."""
    from medvl_jax.data import pipeline
    from medvl_jax.train import restore

    ckpt = restore.load(checkpoint)
    config, params = ckpt.model_config, ckpt.params
    if ckpt.is_workdir and not isinstance(config, (VLMConfig, DecoderConfig)):
        raise checkpoint_io.CheckpointError(
            f"{checkpoint}: a {ckpt.config.task} run's model does not generate text")
    if not ckpt.tokenizer:
        raise checkpoint_io.CheckpointError(f"{checkpoint}: no tokenizer")
    tokenizer = pipeline.make_tokenizer(ckpt.tokenizer)
    tok_dir = None if ckpt.is_workdir else ckpt.tokenizer
    if images and not isinstance(config, VLMConfig):
        raise checkpoint_io.CheckpointError(
            f"{checkpoint}: --image given but {type(config).__name__} is a text-only model")
    if ckpt.data_config:  # Trained here: prompts exactly as in training.
        tokens, mask_ar, pixels, stops = trained_prompt(ckpt.data_config, tokenizer, prompt,
                                                        list(images), modality)
    else:
        ids = prompt_ids(tokenizer, prompt)
        pixels, mask_ar = None, None
        if images:
            mean, std = _processor_stats(tok_dir)
            pixels = np.stack([preprocess_image(p, config.vision.image_size, mean, std,
                                                modality=modality) for p in images])[None]
            ids = [config.image_token_id] * (num_image_tokens(config) * len(images)) + ids
        if isinstance(config, VLMConfig) and config.projector == "linear":
            mask_ar = np.zeros((1, len(ids)), np.int32)  # PaliGemma: bidirectional prefix
        stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        tokens = np.asarray([ids], np.int32)
    out = generate(config, params, tokens, images=pixels, mask_ar=mask_ar,
                   max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops,
                   pad_id=tokenizer.pad_token_id or 0)
    new = out.tokens[0, :out.lengths[0]].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@cli_errors.handle_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; a user error (bad flag value, missing or unsupported
    checkpoint, unreadable image) is one ``error:`` line with exit code 2."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modality", default=None,
                    help="what files without a modality (NIfTI) hold, e.g. ct (Hounsfield "
                         "units, windowed as in training); default: min-max scaled")
    cli_errors.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    for flag, ok, allowed in (
            ("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
            ("temperature", math.isfinite(args.temperature) and args.temperature >= 0,
             "a finite number >= 0 (0: greedy)"),
            ("top_k", args.top_k >= 0, "an integer >= 0 (0: off)"),
            ("top_p", 0 < args.top_p <= 1, "in (0, 1] (1: off)")):
        if not ok:
            raise cli_errors.UserError(f"--{flag}={getattr(args, flag)}: must be {allowed}")
    for path in args.image:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--image {path}: no such file")
    text = run(args.checkpoint, args.prompt, args.image, max_new_tokens=args.max_new_tokens,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, modality=args.modality)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
