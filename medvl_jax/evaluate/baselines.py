"""Sanity baselines: the same evaluation without the image or with a corrupted one.

As in SURE-VQA, a score means little until it is compared with what the model scores when it
cannot see the image: a model answering from language priors alone scores about as well
without the image as with it. Each condition turns an example into another example:

    real       the example as it is
    no_image   images removed, and their <image> placeholders from the messages (text only)
    blank      every image replaced by a black one of the same shape (the prompt is unchanged)
    blur       Gaussian blur, sigma = BLUR_SIGMA x the largest spatial size (about 5 pixels
               at 64 x 64: small findings vanish, the anatomy stays)
    noise      additive Gaussian noise of standard deviation NOISE_STD, clipped to [0, 1]

Corruptions act on the decoded images in [0, 1] (before resizing and normalisation), and are
deterministic: the noise of an image is seeded by its example id and index.
"""
from __future__ import annotations

import zlib

import numpy as np

from medvl_jax.data import pipeline

REAL = "real"
BASELINES = ("no_image", "blank", "blur", "noise")
CONDITIONS = (REAL,) + BASELINES
DEFAULT = ("no_image", "blur", "noise")
BLUR_SIGMA = 0.08
NOISE_STD = 0.5
IMAGE_PLACEHOLDER = "<image>"


def parse_list(spec: str) -> list[str]:
    """Baseline names from a comma-separated list; ``"off"`` (or "") for none."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    if names == ["off"]:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known baselines: "
                         f"{', '.join(BASELINES)} (or 'off' for none)")
    return list(dict.fromkeys(names))


def _spatial_axes(image: np.ndarray, volumes: bool) -> tuple[int, ...]:
    rank = 3 if volumes else 2
    return tuple(range(min(rank, image.ndim)))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1D Gaussian kernel of radius ``ceil(3 sigma)``."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: np.ndarray, sigma: float, axes: tuple[int, ...]) -> np.ndarray:
    """Separable Gaussian blur of ``image`` along ``axes`` (edges mirrored), float32."""
    out = np.asarray(image, np.float64)
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    for ax in axes:
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        moved = np.moveaxis(padded, ax, -1)
        windows = np.lib.stride_tricks.sliding_window_view(moved, len(k), axis=-1)
        out = np.moveaxis(windows @ k, -1, ax)
    return out.astype(np.float32)


def seed(example_id: str, index: int) -> int:
    """The noise seed of image ``index`` of an example (stable across runs and orderings)."""
    return zlib.crc32(f"{example_id}/{index}".encode())


def corrupt(image: np.ndarray, condition: str, *, volumes: bool = False,
            rng_seed: int = 0) -> np.ndarray:
    """``image`` (float in [0, 1]) under ``blank``, ``blur`` or ``noise``."""
    x = np.asarray(image, np.float32)
    if condition == "blank":
        return np.zeros_like(x)
    axes = _spatial_axes(x, volumes)
    if condition == "blur":
        sigma = BLUR_SIGMA * max(x.shape[a] for a in axes)
        return np.clip(gaussian_blur(x, sigma, axes), 0.0, 1.0)
    if condition == "noise":
        noise = np.random.default_rng(rng_seed).normal(0.0, NOISE_STD, x.shape)
        return np.clip(x + noise.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unknown image corruption {condition!r}; known: blank, blur, noise")


def apply(example: dict, condition: str, data_config) -> dict:
    """A copy of ``example`` under ``condition`` (see the module docstring). Images are read
    and scaled to [0, 1] as the pipeline does (``data_config``: the config's data section)
    before they are corrupted."""
    if condition == REAL:
        return example
    if condition == "no_image":
        messages = [{**m, "content": _without_placeholders(m["content"])}
                    if isinstance(m.get("content"), str) else dict(m)
                    for m in example["messages"]]
        return {**example, "images": [], "messages": messages}
    if condition not in BASELINES:
        raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    volumes = data_config.volume_shape is not None
    images = pipeline.decode_images(example, data_config)
    return {**example, "images": [corrupt(x, condition, volumes=volumes,
                                          rng_seed=seed(str(example["id"]), i))
                                  for i, x in enumerate(images)]}


def _without_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
