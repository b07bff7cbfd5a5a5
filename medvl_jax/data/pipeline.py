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
from medvl_jax.data.errors import DataError, SkipCounter


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
    c.augment = False               # Train-time photometric + small affine augmentation.
    c.normalise = (0.5, 0.5)        # (mean, std) applied last.
    c.qa_per_example = 1            # MedSynth: question/answer turns per example.
    c.skip_bad_examples = False     # Drop (and count) bad examples instead of failing.
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
    "json": {"kind", "weight", "path", "image_root", "format"},
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
                                       spec.get("format", "auto"))
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

def image_ops(cfg, *, train: bool) -> Callable:
    """The preprocessing chain for one image, built from the data config."""
    ops = []
    if cfg.volume_shape is not None:
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


def to_unit_range(pixels: np.ndarray, modality: str | None, ct_window) -> np.ndarray:
    """Maps pixels to float32 in [0, 1].

    Integers are divided by their dtype's maximum (uint8, uint16); CT in Hounsfield units
    (int16, or floats outside [0, 1] with modality "ct") goes through ``ct_window``; other floats
    already in [0, 1] (windowed DICOM, unit-range PNG) are kept, and the rest are min-max scaled.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    x = pixels.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if 0.0 <= lo and hi <= 1.0:
        return x
    if str(modality).lower() == "ct":
        return preprocess.ct_window(*ct_window)(x, None)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def read_file(path: str) -> readers.Image:
    """Reads an image file: 8/16-bit PNG/JPEG scaled to [0, 1], DICOM windowed by its VOI
    (so in [0, 1]), NIfTI in its stored units."""
    if path.lower().endswith((".png", ".jpg", ".jpeg")):
        return readers.read_image(path, unit_range=True)
    return readers.read_image(path)


def decode_images(example: dict, cfg) -> list[np.ndarray]:
    """Reads image paths and scales every image of ``example`` to [0, 1] float32."""
    out = []
    modality = example["meta"].get("modality")
    for ref in example["images"]:
        if isinstance(ref, str):
            img = read_file(ref)
            out.append(to_unit_range(img.pixels, img.modality or modality, cfg.ct_window))
        else:
            out.append(to_unit_range(np.asarray(ref), modality, cfg.ct_window))
    want = 3 if cfg.volume_shape is not None else 2
    for arr in out:
        rgb = arr.ndim == want + 1 and arr.shape[-1] == 3
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


def guarded(fn: Callable, skips: SkipCounter | None) -> Callable:
    """Wraps ``fn(x, rng)``: DataErrors are counted and the example dropped (returns None)."""

    def call(x, rng):
        try:
            return fn(x, rng)
        except DataError as e:
            if skips is None:
                raise
            skips.add(e)
            return None

    return call


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
        skips = SkipCounter()
    train = split == "train"
    featurize = Featurizer(cfg, tokenizer, train=train)
    parts, weights = [], []
    for i, (name, spec) in enumerate(sorted(dict(cfg.sources).items())):
        src = build_source(name, dict(spec), split, cfg.qa_per_example)
        if len(src.records) == 0:
            raise ValueError(f"data.sources.{name} has no records")
        ds = grain.MapDataset.source(src.records)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed + 7919 * i)
        ds = ds.repeat()
        guard = skips if cfg.skip_bad_examples else None
        ds = ds.random_map(guarded(src.to_example, guard), seed=cfg.seed + 104729 * i + 1)
        parts.append(ds)
        weights.append(src.weight)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds[process_index::process_count]
    if examples_per_batch is not None:
        ds = ds.filter(lambda x: x is not None)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                    prefetch_buffer_size=cfg.prefetch)
                                  ).batch(examples_per_batch, drop_remainder=True, batch_fn=list)
    per_process = cfg.batch_size // process_count
    to_arrays = featurize.unpadded if cfg.pack else featurize
    ds = ds.random_map(guarded(lambda ex, rng: ex and to_arrays(ex, rng),
                                skips if cfg.skip_bad_examples else None),
                       seed=cfg.seed + 2)
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
