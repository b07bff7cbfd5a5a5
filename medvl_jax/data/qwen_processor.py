"""Images, volumes and videos into Qwen2-VL / Qwen2.5-VL patches, within a visual-token budget.

The per-image steps reproduce transformers' ``Qwen2VLImageProcessor`` (PIL backend) exactly:
:func:`smart_resize` picks a size whose sides are multiples of ``patch_size * merge_size``
(28) and whose area lies within ``[min_pixels, max_pixels]``, keeping the aspect ratio; the
image is resized bicubically, scaled to [0, 1], normalised with CLIP's mean/std and cut into
``patch_size`` patches flattened as (channel, frame, row, column). Patches are listed in the
merge-aware order: ``m x m`` blocks of neighbouring patches (``m = merge_size``) one after
another, so the tower's merger takes consecutive groups of ``m^2``. A still image is two
identical frames (``temporal_patch_size = 2``); a volume or video is its slices/frames, an odd
count padded by repeating the last, and every pair of frames becomes one temporal slice.

Static shapes: :class:`QwenImageProcessor` with ``visual_tokens`` packs all images/videos of
one example into a fixed budget of ``visual_tokens`` merged tokens (``visual_tokens * m^2``
patches), padding the rest (segment id 0). When the example's images do not fit at their
natural size, all of them are shrunk by one common per-frame pixel cap (the largest that
fits), so small images keep their size; an example that does not fit even at ``min_pixels``
is an error naming its images. ``buckets`` offers several budgets instead of one: each
batch takes the smallest bucket that holds its largest example, so a run compiles at most
``len(buckets)`` shapes of the vision step.

Input arrays: ``uint8`` in [0, 255] (resized as 8-bit RGB through PIL, as transformers does),
or floats in [0, 1] (as ``medvl_jax.data.pipeline.load_image`` returns them; resized in
float32 per channel, without an 8-bit round trip). Images are ``[H, W]`` or
``[H, W, C]``; volumes/videos ``[T, H, W]`` or ``[T, H, W, C]``; ``C`` of 1 is repeated to
RGB, an alpha channel is composited onto white.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to: both multiples of ``factor``, the area
    within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible.

    Sides are first rounded to the nearest multiple (Python's round: halves to even); an
    area above ``max_pixels`` is scaled down with sides rounded down (never below
    ``factor``), an area below ``min_pixels`` scaled up with sides rounded up.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image of {height}x{width} pixels has an empty side")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio {ratio:.1f} is above "
                         f"the 200 that Qwen-VL processors accept")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def patch_positions(grid_t: int, grid_h: int, grid_w: int, merge_size: int = 2) -> np.ndarray:
    """``(t, h, w)`` of each patch, int32 ``[t*h*w, 3]``, in the merge-aware patch order."""
    m = merge_size
    t, hb, mh, wb, mw = np.meshgrid(np.arange(grid_t), np.arange(grid_h // m), np.arange(m),
                                    np.arange(grid_w // m), np.arange(m), indexing="ij")
    # Order: t, row block, column block, row in block, column in block.
    t, hb, mh, wb, mw = (a.transpose(0, 1, 3, 2, 4).reshape(-1) for a in (t, hb, mh, wb, mw))
    return np.stack([t, hb * m + mh, wb * m + mw], axis=-1).astype(np.int32)


def as_frames(x: Any, video: bool | None = None) -> np.ndarray:
    """An image/volume/video as RGB frames ``[T, H, W, 3]`` (T = 1 for an image).

    ``video=None`` decides by shape as the data pipeline does: 4 dims, or 3 dims whose last
    is not a channel count (1, 3, 4), are frames.
    """
    x = np.asarray(x)
    if video is None:
        video = x.ndim == 4 or (x.ndim == 3 and x.shape[-1] not in (1, 3, 4))
    want = (3, 4) if video else (2, 3)
    if x.ndim not in want:
        kind = "a volume/video [T, H, W(, C)]" if video else "an image [H, W(, C)]"
        raise ValueError(f"expected {kind}, got an array of shape {x.shape}")
    if not video:
        x = x[None]
    if x.ndim == 3:
        x = x[..., None]
    c = x.shape[-1]
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    elif c == 4:
        x = _on_white(x)
    elif c != 3:
        raise ValueError(f"frames of shape {x.shape[1:]} have {c} channels; expected 1, 3 or 4")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"pixels must be uint8 (0..255) or float (0..1), got {x.dtype}")
        lo, hi = float(np.min(x)), float(np.max(x))  # NaN propagates into both
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(f"float pixels must lie in [0, 1] (window/scale scans first), "
                             f"got values in [{lo}, {hi}]")
    return x


def _on_white(x: np.ndarray) -> np.ndarray:
    """RGBA frames composited onto a white background (as transformers converts to RGB)."""
    if x.dtype == np.uint8:
        white = Image.new("RGBA", x.shape[2:0:-1], (255, 255, 255, 255))
        return np.stack([np.asarray(Image.alpha_composite(white, Image.fromarray(f, "RGBA"))
                                    .convert("RGB")) for f in x])
    alpha = x[..., 3:].astype(np.float32)
    return x[..., :3] * alpha + (1 - alpha)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic (PIL) resize of ``[T, H, W, 3]`` frames to float32 in [0, 1].

    uint8 frames go through PIL as RGB images, then are divided by 255 (transformers' path);
    float frames are resized per channel in PIL's 32-bit float mode.
    """
    out = np.empty((frames.shape[0], height, width, 3), np.float32)
    same = frames.shape[1:3] == (height, width)
    for i, frame in enumerate(frames):
        if frame.dtype == np.uint8:
            img = frame if same else np.asarray(
                Image.fromarray(frame, "RGB").resize((width, height), Image.Resampling.BICUBIC))
            out[i] = (img.astype(np.float64) / 255).astype(np.float32)
        else:
            for ch in range(3):
                plane = frame[..., ch].astype(np.float32)
                out[i, ..., ch] = plane if same else np.asarray(Image.fromarray(plane, "F").resize(
                    (width, height), Image.Resampling.BICUBIC))
    return out


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """Qwen2-VL / Qwen2.5-VL preprocessing (module docstring), optionally within a budget.

    ``visual_tokens``: per-example budget in merged tokens (what the language model sees;
    the tower gets ``visual_tokens * merge_size^2`` patches); None = no padding (each example
    as large as its images, for one-off inference). ``buckets``: several budgets to choose
    from per batch (replaces ``visual_tokens``). ``max_visuals``: rows of ``grid_thw`` per
    example (images + videos), so that it has a static shape too.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    visual_tokens: int | None = None
    buckets: tuple[int, ...] = ()
    max_visuals: int = 4

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} is above max_pixels={self.max_pixels}")
        if self.visual_tokens is not None and self.buckets:
            raise ValueError("give visual_tokens or buckets, not both")
        for b in (self.visual_tokens,) * (self.visual_tokens is not None) + self.buckets:
            if b < 1:
                raise ValueError(f"a visual-token budget must be positive, got {b}")

    @classmethod
    def from_hf(cls, hf: dict, **overrides: Any) -> "QwenImageProcessor":
        """From a transformers ``preprocessor_config.json`` dict (``size`` or
        ``min_pixels``/``max_pixels``)."""
        size = hf.get("size") or {}
        kw = dict(patch_size=hf.get("patch_size", 14),
                  temporal_patch_size=hf.get("temporal_patch_size", 2),
                  merge_size=hf.get("merge_size", 2),
                  min_pixels=hf.get("min_pixels") or size.get("shortest_edge", 56 * 56),
                  max_pixels=hf.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280),
                  image_mean=tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)),
                  image_std=tuple(hf.get("image_std", OPENAI_CLIP_STD)))
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict:
        """A transformers ``preprocessor_config.json`` dict for ``Qwen2VLImageProcessor``."""
        return dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True,
                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                    do_convert_rgb=True, resample=3, image_mean=list(self.image_mean),
                    image_std=list(self.image_std), patch_size=self.patch_size,
                    temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size,
                    min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                    size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})

    @property
    def factor(self) -> int:
        """Sides are multiples of this many pixels (one merged token)."""
        return self.patch_size * self.merge_size

    @property
    def merge_unit(self) -> int:
        """Patches per merged token."""
        return self.merge_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (3 channels)."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def grid(self, height: int, width: int, frames: int = 1,
             max_pixels: int | None = None) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of ``frames`` frames of ``height x width`` pixels (an image
        is one frame); ``max_pixels`` caps the per-frame area below the processor's own."""
        cap = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        h, w = smart_resize(height, width, self.factor, self.min_pixels, cap)
        return -(-frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def patchify(self, x: Any, video: bool | None = None, max_pixels: int | None = None
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image/volume/video -> ``(patches [t*h*w, patch_dim] float32, (t, h, w))``."""
        frames = as_frames(x, video)
        n, height, width = frames.shape[:3]
        gt, gh, gw = self.grid(height, width, n, max_pixels)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        pixels = resize_frames(frames, gh * p, gw * p)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        pixels = (pixels - mean) / std
        if n == 1:  # a still image: its frame repeated
            pixels = np.broadcast_to(pixels, (tp, *pixels.shape[1:]))
        elif n % tp:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], tp - n % tp, axis=0)])
        pixels = pixels.reshape(gt, tp, gh // m, m, p, gw // m, m, p, 3)
        # -> t, row block, column block, row in block, column in block | channel, frame, y, x
        patches = pixels.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return np.ascontiguousarray(patches.reshape(gt * gh * gw, self.patch_dim)), (gt, gh, gw)

    def _natural(self, shapes, cap):
        return [self.grid(h, w, t, cap) for t, h, w in shapes]

    def fit(self, shapes: Sequence[tuple[int, int, int]], budget_tokens: int,
            where: str = "example") -> tuple[list[tuple[int, int, int]], int]:
        """Grids of visuals of ``(frames, height, width)`` within ``budget_tokens`` merged
        tokens, and the per-frame pixel cap that gives them (``max_pixels`` when all fit at
        their natural size). Raises ValueError naming the visuals when none fits."""
        budget = budget_tokens * self.merge_unit

        def total(cap):
            return sum(t * h * w for t, h, w in self._natural(shapes, cap))

        if total(self.max_pixels) <= budget:
            return self._natural(shapes, self.max_pixels), self.max_pixels
        lo, hi = self.min_pixels, self.max_pixels  # total(hi) > budget; find the largest fit
        if total(lo) > budget:
            desc = ", ".join(f"{h}x{w}" + (f"x{t} frames" if t > 1 else "")
                             for t, h, w in shapes)
            raise ValueError(
                f"{where}: its {len(shapes)} image(s)/video(s) ({desc}) need "
                f"{total(lo) // self.merge_unit} visual tokens even at min_pixels="
                f"{self.min_pixels}, more than the budget of {budget_tokens}; raise the budget "
                f"(visual_tokens/buckets), lower min_pixels, or pass fewer frames/images")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
        return self._natural(shapes, lo), lo

    def budget_for(self, natural_tokens: int) -> int | None:
        """The budget (merged tokens) an example or batch of ``natural_tokens`` gets: the
        smallest bucket that holds it (else the largest), or ``visual_tokens``."""
        if not self.buckets:
            return self.visual_tokens
        return next((b for b in self.buckets if b >= natural_tokens), self.buckets[-1])

    def natural_tokens(self, visuals: Sequence[Any], videos: Sequence[bool | None] | None = None
                       ) -> int:
        """Merged tokens the visuals take at their natural (unconstrained) size."""
        shapes = [_shape(as_frames(v, k)) for v, k in zip(visuals, _kinds(visuals, videos))]
        return sum(t * h * w for t, h, w in self._natural(shapes, None)) // self.merge_unit

    def example(self, visuals: Sequence[Any], videos: Sequence[bool | None] | None = None, *,
                budget_tokens: int | None = None, where: str = "example") -> dict:
        """Packs the images/volumes/videos of one example.

        ``videos``: per visual True (frames), False (an image) or None (decide by shape).
        ``budget_tokens``: overrides the processor's budget (see :meth:`budget_for`).
        Returns ``patches`` float32 ``[N, patch_dim]``, ``positions`` int32 ``[N, 3]``,
        ``segment_ids`` int32 ``[N]`` (visual k is k + 1, padding 0), ``grid_thw`` int32
        ``[max_visuals, 3]`` (zero rows unused) and ``num_visuals``; ``N`` is the budget
        times ``merge_size^2``, or the natural total without a budget.
        """
        frames = [as_frames(v, k) for v, k in zip(visuals, _kinds(visuals, videos))]
        if len(frames) > self.max_visuals:
            raise ValueError(f"{where}: {len(frames)} images/videos, more than "
                             f"max_visuals={self.max_visuals}")
        shapes = [_shape(f) for f in frames]
        if budget_tokens is None:
            natural = sum(t * h * w for t, h, w in self._natural(shapes, None))
            budget_tokens = self.budget_for(natural // self.merge_unit)
        cap = None
        if budget_tokens is not None:
            _, cap = self.fit(shapes, budget_tokens, where)
        parts, pos, seg = [], [], []
        grid_thw = np.zeros((self.max_visuals, 3), np.int32)
        for k, f in enumerate(frames):
            patches, grid = self.patchify(f, video=True, max_pixels=cap)
            parts.append(patches)
            pos.append(patch_positions(*grid, self.merge_size))
            seg.append(np.full(len(patches), k + 1, np.int32))
            grid_thw[k] = grid
        n = sum(len(p) for p in parts)
        size = n if budget_tokens is None else budget_tokens * self.merge_unit
        patches = np.zeros((size, self.patch_dim), np.float32)
        positions = np.zeros((size, 3), np.int32)
        segment_ids = np.zeros((size,), np.int32)
        if parts:
            patches[:n] = np.concatenate(parts)
            positions[:n] = np.concatenate(pos)
            segment_ids[:n] = np.concatenate(seg)
        return {"patches": patches, "positions": positions, "segment_ids": segment_ids,
                "grid_thw": grid_thw, "num_visuals": np.int32(len(frames))}

    def batch(self, examples: Sequence[Sequence[Any]],
              videos: Sequence[Sequence[bool | None] | None] | None = None) -> dict:
        """Packs several examples at one budget (the bucket of the largest) and stacks them:
        every array gets a leading batch axis."""
        videos = list(videos) if videos is not None else [None] * len(examples)
        budget = self.visual_tokens
        if self.buckets:
            budget = self.budget_for(max(self.natural_tokens(v, k)
                                         for v, k in zip(examples, videos)))
        if budget is None:
            raise ValueError("batching needs a budget: set visual_tokens or buckets")
        rows = [self.example(v, k, budget_tokens=budget, where=f"example {i}")
                for i, (v, k) in enumerate(zip(examples, videos))]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def _kinds(visuals, videos):
    if videos is None:
        return [None] * len(visuals)
    if len(videos) != len(visuals):
        raise ValueError(f"videos has {len(videos)} entries for {len(visuals)} visuals")
    return list(videos)


def _shape(frames: np.ndarray) -> tuple[int, int, int]:
    return frames.shape[0], frames.shape[1], frames.shape[2]
