"""The grain input pipeline: sources → examples → images + tokens → padded batches.

    sources (MedSynth, JSON/JSONL, TFDS), each shuffled and repeated with its own seed
      → mixed by weight → this process's shard → decode images, preprocess, tokenise
      → padded, fixed-shape batches

Batches are dicts of numpy arrays with static shapes, so the jitted step compiles once::

    tokens      int32 [B, L]   token ids, padded with the tokenizer's pad id
    input_mask  bool  [B, L]   True on real tokens
    mask_ar     int32 [B, L]   0 = prefix (may attend bidirectionally), 1 = causal
    loss_mask   int32 [B, L]   1 on the tokens the model is trained to predict
    images      float32 [B, N, H, W, C] (2D) or [B, N, D, H, W, C] (volumes)
    image_mask  bool  [B, N]   True where an image is present

The iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` restore the exact
position, so a resumed run sees exactly the batches an uninterrupted one would have.

Bad input (missing or corrupt image, too-long sequence, wrong number of image placeholders…)
raises :class:`~medvl_jax.data.errors.DataError` naming the record. With
``skip_bad_examples=True`` such examples are dropped instead and counted in ``skips``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from medvl_jax.data import chat, packing, preprocess, readers, sources
from medvl_jax.data.errors import DataError, SkipCounter, guarded


def default_config() -> ml_collections.ConfigDict:
    """The data section of every config, with its defaults (unknown keys are errors)."""
    c = ml_collections.ConfigDict()
    # Named sources; each: kind = medsynth | json | tfds, weight, and its kind's fields.
    c.sources = {"medsynth": medsynth_source()}
    c.batch_size = 32               # Global batch size, across all processes.
    c.seed = 0
    c.shuffle = True
    c.max_length = 128              # Tokens per example, after padding.
    c.truncation = "error"          # "error" or "right" (see medvl_jax.data.chat.encode).
    c.template = "gemma"            # Chat template: gemma | chatml | llama3.
    c.prefix_lm = False             # mask_ar = 0 over the prompt (PaliGemma-style prefix-LM).
    c.num_image_tokens = 64         # Tokens each image expands to (set from the model).
    c.max_images = 1                # Images per example (N); fewer are masked out. With
                                    # packing: image slots per packed row.
    c.pack = False                  # Pack several examples per row (medvl_jax.data.packing).
    c.image_size = 64
    c.channels = 1
    c.volume_shape = None           # (D, H, W) to feed volumes instead of 2D images.
    c.pad_to_square = True
    c.ct_window = (-600.0, 1500.0)  # (centre, width) in HU, for CT images in HU.
    c.ct_windows = ()               # ((centre, width), ...) in HU: one channel per window for
                                    # CT (e.g. 3 windows as RGB); len must equal channels;
                                    # empty: ct_window.
    c.hu_clip = None                # (lo, hi) HU: CT is clipped to it before resampling.
    c.target_spacing = None         # (z, y, x) mm: volumes resampled to this voxel spacing,
                                    # then centre-cropped/padded to volume_shape (None: resized
                                    # to volume_shape whatever their spacing).
    c.nonfinite = "error"           # NaN/inf pixels: "error" (DataError) or "replace".
    c.nonfinite_value = 0.0         # Replacement with "replace", in the image's units as read
                                    # (HU for CT, stored units for NIfTI).
    c.augment = False               # Train-time photometric + small affine augmentation.
    c.normalise = (0.5, 0.5)        # (mean, std) applied last.
    c.qa_per_example = 1            # MedSynth: question/answer turns per example.
    c.skip_bad_examples = False     # Drop (and count) bad examples instead of failing.
    c.max_skip_fraction = 0.1       # With skipping: stop when more of the reads were bad.
    c.num_threads = 2               # grain read threads.
    c.prefetch = 4
    return c


def medsynth_source(kind: str = "cxr", num_studies: int = 2000, weight: float = 1.0,
                    **kwargs) -> dict:
    """Config dict for a MedSynth source (see :class:`medvl_jax.data.medsynth.MedSynthConfig`)."""
    return dict(kind="medsynth", weight=weight, medsynth_kind=kind, num_studies=num_studies,
                render_size=kwargs.pop("render_size", 128),
                volume_shape=kwargs.pop("volume_shape", (32, 64, 64)),
                seed=kwargs.pop("seed", 0), question_types=kwargs.pop("question_types", ()),
                **kwargs)


# --------------------------------------------------------------------------------------------
# Sources from config.
# --------------------------------------------------------------------------------------------

_SOURCE_FIELDS = {
    "medsynth": {"kind", "weight", "medsynth_kind", "num_studies", "render_size",
                 "volume_shape", "seed", "question_types"},
    "json": {"kind", "weight", "path", "image_root", "format", "allow_outside_root"},
    "tfds": {"kind", "weight", "name", "data_dir", "split", "to_example"},
}


def build_source(name: str, spec: dict, split: str, qa_per_example: int) -> sources.SourceSpec:
    """One configured source for ``split`` (train / val / test)."""
    kind = spec.get("kind")
    if kind not in _SOURCE_FIELDS:
        raise ValueError(f"data.sources.{name}.kind must be one of {sorted(_SOURCE_FIELDS)}, "
                         f"got {kind!r}")
    unknown = set(spec) - _SOURCE_FIELDS[kind]
    if unknown:
        raise ValueError(f"data.sources.{name}: unknown field(s) {sorted(unknown)} for a {kind} "
                         f"source; allowed: {sorted(_SOURCE_FIELDS[kind])}")
    weight = float(spec.get("weight", 1.0))
    if kind == "medsynth":
        from medvl_jax.data import medsynth
        cfg = medsynth.MedSynthConfig(
            kind=spec["medsynth_kind"], split=split, num_studies=int(spec["num_studies"]),
            image_size=int(spec["render_size"]), volume_shape=tuple(spec["volume_shape"]),
            seed=int(spec["seed"]))
        to_example = functools.partial(
            sources.medsynth_to_example, qa_per_example=qa_per_example,
            question_types=tuple(spec.get("question_types") or ()))
        return sources.SourceSpec(name, medsynth.MedSynthSource(cfg), to_example, weight)
    if kind == "json":
        src = sources.ConversationFile(spec["path"], spec.get("image_root"),
                                       spec.get("format", "auto"),
                                       allow_outside_root=bool(spec.get("allow_outside_root")))
        return sources.SourceSpec(name, src, lambda rec, rng: rec, weight)
    src = sources.tfds_source(spec["name"], spec.get("split", split), spec.get("data_dir"))
    if spec["name"].split("/")[0] == "medsynth" and not spec.get("to_example"):
        fn = functools.partial(sources.medsynth_to_example, qa_per_example=qa_per_example)
    else:
        fn = sources.resolve_callable(spec["to_example"])
    return sources.SourceSpec(name, src, fn, weight)


def _is_medsynth(spec: dict) -> bool:
    return spec.get("kind") == "medsynth" or (
        spec.get("kind") == "tfds" and str(spec.get("name", "")).split("/")[0] == "medsynth"
        and not spec.get("to_example"))


def question_examples(srcs, split: str, *, limit: int = 0) -> list[dict]:
    """Single-question examples of the named sources ``srcs`` (entries like those of
    ``data.sources``) for evaluation or mining, sources in name order: every question of each
    MedSynth study (of the entry's ``question_types``, if any), every record of a JSON
    conversation file or TFDS dataset (its final answer is the reference). ``limit`` > 0:
    the first ``limit`` records (studies) of each source. ``meta["source"]`` names the
    source."""
    out = []
    for name, spec in sorted(dict(srcs).items()):
        spec = dict(spec)
        built = build_source(name, spec, split, qa_per_example=1)
        n = len(built.records) if not limit else min(int(limit), len(built.records))
        types = tuple(spec.get("question_types") or ())
        for i in range(n):
            rec = built.records[i]
            if _is_medsynth(spec):
                exs = [ex for ex in sources.medsynth_questions(rec)
                       if not types or ex["meta"]["question_type"] in types]
            else:
                exs = [built.to_example(rec, np.random.default_rng(0))]
            for ex in exs:
                ex["meta"]["source"] = name
            out.extend(exs)
    return out


REPORT_PROMPT = "Write the radiology report."


def report_examples(srcs, split: str, *, limit: int = 0) -> list[dict]:
    """Report-generation examples of the named sources ``srcs``: one per MedSynth study
    (:data:`REPORT_PROMPT`, the study's report as the reference and ``meta["findings"]`` its
    structured findings, for clinical metrics) and one per record of a conversation source
    (its final answer as the reference). Every example's question type is ``report``."""
    out = []
    for name, spec in sorted(dict(srcs).items()):
        spec = dict(spec)
        built = build_source(name, spec, split, qa_per_example=1)
        n = len(built.records) if not limit else min(int(limit), len(built.records))
        for i in range(n):
            rec = built.records[i]
            if _is_medsynth(spec):
                qa = [{"question": REPORT_PROMPT, "answer": sources._text(rec["report"]),
                       "type": "report"}]
                ex = sources.medsynth_to_example({**rec, "qa": qa}, np.random.default_rng(0))
                ex["id"] = f"{ex['id']}/report"
                ex["meta"].update(findings=rec["findings"], options=[])
            else:
                ex = built.to_example(rec, np.random.default_rng(0))
                ex["meta"]["question_type"] = "report"
            ex["meta"]["source"] = name
            out.append(ex)
    return out


# --------------------------------------------------------------------------------------------
# Example → model inputs.
# --------------------------------------------------------------------------------------------

def _scan(cfg, key: str):
    """A scan-reading setting of the data section ``cfg``; the default when ``cfg`` predates
    the key (the data config saved with an older checkpoint)."""
    return cfg[key] if key in cfg else _scan_defaults()[key]


@functools.lru_cache(maxsize=1)
def _scan_defaults():
    return default_config()


def check_scan_config(cfg) -> None:
    """Raises ValueError naming the data key when a scan-reading setting is invalid."""
    windows = _scan(cfg, "ct_windows") or ()
    for w in [cfg.ct_window, *windows]:
        if len(tuple(w)) != 2 or float(tuple(w)[1]) <= 0:
            raise ValueError(f"data.ct_window / data.ct_windows: a window is (centre, width) "
                             f"with width > 0, got {tuple(w)}")
    if windows and len(windows) != cfg.channels:
        raise ValueError(f"data.ct_windows has {len(windows)} windows but data.channels = "
                         f"{cfg.channels}: one channel per window")
    clip = _scan(cfg, "hu_clip")
    if clip is not None and (len(tuple(clip)) != 2 or not float(clip[0]) < float(clip[1])):
        raise ValueError(f"data.hu_clip must be (lo, hi) with lo < hi, got {clip}")
    spacing = _scan(cfg, "target_spacing")
    if spacing is not None:
        if len(tuple(spacing)) != 3 or min(float(v) for v in spacing) <= 0:
            raise ValueError(f"data.target_spacing must be 3 positive (z, y, x) mm, got "
                             f"{spacing}")
        if cfg.volume_shape is None:
            raise ValueError("data.target_spacing resamples volumes; it needs data.volume_shape")
    if _scan(cfg, "nonfinite") not in preprocess.NONFINITE_POLICIES:
        raise ValueError(f"data.nonfinite must be one of {preprocess.NONFINITE_POLICIES}, got "
                         f"{_scan(cfg, 'nonfinite')!r}")


def image_ops(cfg, *, train: bool) -> Callable:
    """The preprocessing chain for one image after :func:`load_image`, built from the data
    config: volumes are resized to ``volume_shape`` (or, with ``target_spacing``, already
    resampled by :func:`load_image`, centre-cropped/padded to it with 0)."""
    check_scan_config(cfg)
    ops = []
    if cfg.volume_shape is not None:
        if _scan(cfg, "target_spacing") is not None:
            ops.append(preprocess.crop_or_pad(tuple(cfg.volume_shape), 0.0))
        else:
            ops.append(preprocess.resize_volume(tuple(cfg.volume_shape)))
    else:
        if cfg.pad_to_square:
            ops.append(preprocess.pad_to_square(0.0))
        ops.append(preprocess.resize(cfg.image_size))
    if train and cfg.augment:
        ops.append(preprocess.augment() if cfg.volume_shape is None
                   else preprocess.augment_volume())
    ops.append(preprocess.to_channels(cfg.channels))
    mean, std = cfg.normalise
    ops.append(preprocess.normalise(mean, std))
    return preprocess.compose(*ops)


def is_hu(pixels: np.ndarray, modality: str | None) -> bool:
    """Whether ``pixels`` are CT in Hounsfield units: modality "ct", not 8/16-bit unsigned
    (PNG/JPEG), and not already in [0, 1] (a CT slice saved as an image)."""
    if str(modality).lower() != "ct" or pixels.dtype in (np.uint8, np.uint16):
        return False
    finite = pixels[np.isfinite(pixels)] if np.issubdtype(pixels.dtype, np.floating) else pixels
    return finite.size > 0 and not (0.0 <= float(finite.min()) and float(finite.max()) <= 1.0)


def to_unit_range(pixels: np.ndarray, modality: str | None, ct_window, *, ct_windows=(),
                  hu: bool | None = None, where: str | None = None) -> np.ndarray:
    """Maps pixels to float32 in [0, 1].

    Integers are divided by their dtype's maximum (uint8, uint16); CT in Hounsfield units
    (``hu``, by default :func:`is_hu`) goes through ``ct_window`` = (centre, width), or with
    ``ct_windows`` through each window into one channel per window ([..., K]); other floats
    already in [0, 1] (windowed DICOM, unit-range PNG) are kept, and the rest are min-max
    scaled. A constant image outside [0, 1] (max == min: no contrast to stretch) becomes all
    zeros. Non-finite values are an error (DataError naming ``where``): :func:`load_image`
    applies ``data.nonfinite`` first.
    """
    pixels = np.asarray(pixels)
    if hu is None:
        hu = is_hu(pixels, modality)
    if pixels.dtype == np.uint8 and not hu:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16 and not hu:
        return pixels.astype(np.float32) / 65535.0
    preprocess.nonfinite(pixels, policy="error", where=where)
    x = pixels.astype(np.float32)
    if hu:
        if ct_windows:
            return preprocess.ct_windows(tuple(ct_windows))(x, None)
        return preprocess.ct_window(*ct_window)(x, None)
    lo, hi = float(x.min()), float(x.max())
    if 0.0 <= lo and hi <= 1.0:
        return x
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def read_file(path: str) -> readers.Image:
    """Reads an image file: 8/16-bit PNG/JPEG scaled to [0, 1]; DICOM CT (single file or
    series directory) in Hounsfield units; other DICOM files windowed by their own VOI (so in
    [0, 1]), other series in modality units; PALETTE COLOR DICOM as RGB in [0, 1]; NIfTI in
    its stored units."""
    kind = readers.image_kind(path)
    if kind == "png":
        return readers.read_image(path, unit_range=True)
    if kind == "nifti":
        return readers.read_image(path)
    if kind == "series":
        return readers.read_image(path, apply_voi=False, ct_in_hu=True)
    return readers.read_image(path, apply_voi=True, ct_in_hu=True)


def load_image(ref, cfg, *, modality: str | None = None, where: str | None = None
               ) -> np.ndarray:
    """One image of an example (a path, or an array) as float32 in [0, 1], by the data
    section ``cfg`` — the one place scans are turned into model input intensities:

    1. read (:func:`read_file`; ``modality`` applies when the file states none, e.g. NIfTI);
    2. non-finite values: ``data.nonfinite`` "error" raises DataError naming the file and how
       many values; "replace" puts ``data.nonfinite_value`` (in the units as read) there;
    3. CT in Hounsfield units (:func:`is_hu`) is clipped to ``data.hu_clip``;
    4. volumes are resampled to ``data.target_spacing`` (needs the reader's spacing);
    5. :func:`to_unit_range` with ``data.ct_window`` or ``data.ct_windows``.
    """
    if isinstance(ref, str) or hasattr(ref, "__fspath__"):
        where = str(ref)
        img = read_file(str(ref))
        pixels, spacing, modality = img.pixels, img.spacing, img.modality or modality
    else:
        pixels, spacing = np.asarray(ref), None
    pixels = preprocess.nonfinite(pixels, policy=_scan(cfg, "nonfinite"),
                                  value=float(_scan(cfg, "nonfinite_value")), where=where)
    hu = is_hu(pixels, modality)
    clip = _scan(cfg, "hu_clip")
    if hu and clip is not None:
        pixels = np.clip(pixels.astype(np.float32), float(clip[0]), float(clip[1]))
    target = _scan(cfg, "target_spacing")
    if spacing is not None:
        volume = len(spacing) == 3
    else:
        volume = pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4))
    if target is not None and cfg.volume_shape is not None and volume:
        if spacing is None or len(spacing) != 3:
            raise DataError("data.target_spacing is set but the volume's voxel spacing is "
                            "unknown (the file states none, or it is an array)", where=where,
                            reason="no_spacing")
        pixels, _ = preprocess.resample_to_spacing(pixels.astype(np.float32), spacing, target)
    # The HU decision is the one made on the values as read (before clipping/resampling).
    return to_unit_range(pixels, modality, cfg.ct_window, ct_windows=_scan(cfg, "ct_windows"),
                         hu=hu, where=where)


def decode_images(example: dict, cfg) -> list[np.ndarray]:
    """Reads image paths and scales every image of ``example`` to [0, 1] float32
    (:func:`load_image`)."""
    modality = example["meta"].get("modality")
    out = [load_image(ref, cfg, modality=modality, where=example["id"])
           for ref in example["images"]]
    want = 3 if cfg.volume_shape is not None else 2
    for arr in out:
        rgb = arr.ndim == want + 1 and arr.shape[-1] in (3, cfg.channels)
        if arr.ndim != want and not rgb:
            raise DataError(f"image of shape {arr.shape} in a pipeline of "
                            f"{'volumes' if want == 3 else '2D images'}",
                            where=example["id"], reason="image_rank")
    return out


def image_shape(cfg) -> tuple[int, ...]:
    """Shape of one preprocessed image of the data section ``cfg`` (no batch axis)."""
    spatial = tuple(cfg.volume_shape) if cfg.volume_shape is not None else (cfg.image_size,) * 2
    return spatial + (cfg.channels,)


@dataclasses.dataclass
class Featurizer:
    """Turns one example into fixed-shape model inputs (one call per example)."""
    cfg: Any
    tokenizer: Any
    train: bool

    def __post_init__(self):
        self.ops = image_ops(self.cfg, train=self.train)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token")

    def image_shape(self) -> tuple[int, ...]:
        return image_shape(self.cfg)

    def unpadded(self, example: dict, rng: np.random.Generator) -> dict:
        """The example's arrays at their own lengths: ``tokens``, ``input_mask``, ``mask_ar``,
        ``loss_mask`` ``[n]`` and ``images`` ``[k, ...]``, ``image_mask`` ``[k]`` (k images);
        what :mod:`medvl_jax.data.packing` packs."""
        c = self.cfg
        if len(example["images"]) > c.max_images:
            raise DataError(f"{len(example['images'])} images but data.max_images = "
                            f"{c.max_images}", where=example["id"], reason="too_many_images")
        images = [self.ops(x, rng) for x in decode_images(example, c)]
        for img in images:
            if img.shape != self.image_shape():
                raise DataError(f"preprocessed image has shape {img.shape}, expected "
                                f"{self.image_shape()}", where=example["id"],
                                reason="image_shape")
        enc = chat.encode(self.tokenizer, example["messages"], c.template,
                          num_image_tokens=c.num_image_tokens, num_images=len(images),
                          max_length=c.max_length, truncation=c.truncation,
                          prefix_lm=c.prefix_lm, where=example["id"])
        n = len(enc.tokens)
        return {
            "tokens": np.asarray(enc.tokens, np.int32),
            "input_mask": np.ones(n, bool),
            "mask_ar": np.asarray(enc.mask_ar, np.int32),
            "loss_mask": np.asarray(enc.loss_mask, np.int32),
            "images": np.asarray(images, np.float32).reshape((len(images),) + self.image_shape()),
            "image_mask": np.ones(len(images), bool),
        }

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        """The example padded to ``max_length`` tokens and ``max_images`` images."""
        c = self.cfg
        x = self.unpadded(example, rng)
        pad, k = c.max_length - len(x["tokens"]), len(x["images"])

        def padded(name, value):
            return np.pad(x[name], (0, pad), constant_values=value)

        image_arr = np.zeros((c.max_images,) + self.image_shape(), np.float32)
        image_arr[:k] = x["images"]
        return {
            "tokens": padded("tokens", self.pad_id),
            "input_mask": padded("input_mask", False),
            "mask_ar": padded("mask_ar", 1),
            "loss_mask": padded("loss_mask", 0),
            "images": image_arr,
            "image_mask": np.arange(c.max_images) < k,
        }


# --------------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------------

def build_dataset(cfg: ml_collections.ConfigDict, tokenizer, *, split: str = "train",
                  process_index: int = 0, process_count: int = 1,
                  skips: SkipCounter | None = None,
                  examples_per_batch: int | None = None) -> grain.IterDataset:
    """The batched grain dataset of this process for ``split``.

    With ``examples_per_batch`` the batches are lists of that many un-featurised examples
    (for tasks that build model inputs themselves, e.g. GRPO's rollouts).

    Each source is shuffled (reshuffled every epoch) and repeated forever with its own seed, the
    sources are mixed by weight, and process ``process_index`` of ``process_count`` takes every
    ``process_count``-th element — the processes' shards are disjoint and together cover the
    global batch. ``skips`` must be given when ``cfg.skip_bad_examples`` is set.
    """
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the "
                         f"{process_count} processes")
    if cfg.skip_bad_examples and skips is None:
        skips = SkipCounter(cfg.max_skip_fraction)
    train = split == "train"
    featurize = Featurizer(cfg, tokenizer, train=train)
    guard = skips if cfg.skip_bad_examples else None
    parts, weights = [], []
    for i, (name, spec) in enumerate(sorted(dict(cfg.sources).items())):
        src = build_source(name, dict(spec), split, cfg.qa_per_example)
        if len(src.records) == 0:
            raise ValueError(f"data.sources.{name} has no records")
        ds = grain.MapDataset.source(src.records)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + 7919 * i)
        ds = ds.repeat()
        ds = ds.random_map(guarded(src.to_example, guard, first_stage=True),
                           seed=cfg.seed + 104729 * i + 1)
        parts.append(ds)
        weights.append(src.weight)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds[process_index::process_count]
    if examples_per_batch is not None:
        def checked(ex, rng):  # Images read here too, so a bad one meets the guard.
            decode_images(ex, cfg)
            return ex

        ds = ds.random_map(guarded(checked, guard), seed=cfg.seed + 2)
        ds = ds.filter(lambda x: x is not None)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                    prefetch_buffer_size=cfg.prefetch)
                                  ).batch(examples_per_batch, drop_remainder=True, batch_fn=list)
    per_process = cfg.batch_size // process_count
    to_arrays = featurize.unpadded if cfg.pack else featurize
    ds = ds.random_map(guarded(to_arrays, guard), seed=cfg.seed + 2)
    ds = ds.filter(lambda x: x is not None)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                 prefetch_buffer_size=cfg.prefetch))
    if cfg.pack:
        it_ds = packing.pack(it_ds, max_length=cfg.max_length, max_images=cfg.max_images,
                             num_rows=per_process, seed=cfg.seed + 3)
    return it_ds.batch(per_process, drop_remainder=True)


def build_iterator(cfg, tokenizer, **kwargs):
    """``iter(build_dataset(...))``: a grain iterator with ``get_state`` / ``set_state``."""
    return iter(build_dataset(cfg, tokenizer, **kwargs))


MEDSYNTH_TOKENIZER = "medsynth"


def make_tokenizer(spec: str, *, cache_dir: str | None = None):
    """``"medsynth"`` → the small MedSynth BPE tokenizer (trained on first use, then cached);
    otherwise ``spec`` is a local directory holding a Hugging Face tokenizer."""
    from medvl_jax.data import tokenizer as tok

    if spec == MEDSYNTH_TOKENIZER:
        from medvl_jax.data import medsynth

        # 300 studies of each kind hold every word of the report and question templates; more
        # only slows the first run. The cache name changes with the corpus.
        return tok.cached_tokenizer("medsynth-c300", lambda: medsynth.corpus(300, seed=0),
                                    vocab_size=1024, cache_dir=cache_dir)
    return tok.load_tokenizer(spec)
