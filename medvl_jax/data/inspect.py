"""Look at what a config feeds the model: decoded examples, token counts and an image grid.

    python -m medvl_jax.data.inspect --config configs/medsynth_sft.py [--split train]
        [--num 8] [--out /tmp/medvl_inspect.png] [--config.data.image_size=96]

Prints, per example: id, images (shapes), the conversation, the answer, the question type and
the token counts (total / image / trained-on), then writes a PNG grid of the preprocessed
images (middle slice for volumes) to look at.

A bad record (a missing or corrupt image, a conversation that does not fit) stops it with one
``error:`` line naming the record (``file:line``) and exit code 2, as training would stop;
with ``--config.data.skip_bad_examples=True`` it is skipped instead, as training would skip it,
and the skipped records are listed with their reasons at the end. ``--verbose`` adds the
traceback of an error.
"""
from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
from PIL import Image as PILImage

from medvl_jax import cli_errors
from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.data.errors import DataError


def _to_uint8(img: np.ndarray, mean: float, std: float) -> np.ndarray:
    """A preprocessed image [..., C] back to a displayable 2D uint8 (middle slice of volumes)."""
    x = img * std + mean
    if x.ndim == 4:
        x = x[x.shape[0] // 2]
    x = x[..., 0] if x.shape[-1] != 3 else x
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def image_grid(images: list[np.ndarray], cols: int = 4) -> PILImage.Image:
    """Tiles equally sized uint8 images (gray or RGB) into one picture."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im[..., None] if im.ndim == 2 else im
    return PILImage.fromarray(grid)


def _record_where(record, example=None) -> str | None:
    """``file:line`` (or ``file[i]``, or the id) of a record, from the example made of it."""
    for x in (example, record):
        if isinstance(x, dict):
            meta = x.get("meta") if isinstance(x.get("meta"), dict) else {}
            where = meta.get("where") or x.get("where") or x.get("id")
            if where:
                return str(where)
    return None


def _located(err: DataError, where: str | None) -> DataError:
    """``err`` with the record's location in front unless its message already names it."""
    if where is None or where in str(err):
        return err
    out = DataError(str(err), where=where, reason=err.reason)
    out.__cause__ = err
    return out


@cli_errors.handle_errors
def main(argv=None) -> int:
    """Command-line entry point; returns the exit code (2: a user error or a bad record
    without ``data.skip_bad_examples``, reported on one line)."""
    p = argparse.ArgumentParser(description="Print decoded examples of a config's data.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=8, help="examples shown per source")
    p.add_argument("--out", default="medvl_inspect.png", help="PNG grid of the images")
    cli_errors.add_verbose_flag(p)
    with cli_errors.user_input():
        overrides, rest = config_lib.parse_overrides(argv)
    args = p.parse_args(rest)
    with cli_errors.user_input():
        cfg = config_lib.load_config(args.config, overrides)
        for key in ("data", "tokenizer"):
            if key not in cfg:
                raise config_lib.ConfigError(f"{args.config}: the config has no {key!r}")
        config_lib.check_values(cfg)
    dcfg = cfg.data
    skip = bool(dcfg.get("skip_bad_examples", False))
    skipped: list[str] = []
    reasons: collections.Counter[str] = collections.Counter()
    tokenizer = pipeline.make_tokenizer(cfg.tokenizer)
    featurize = pipeline.Featurizer(dcfg, tokenizer, train=args.split == "train")
    shown, rng = [], np.random.default_rng(dcfg.seed)
    for name, spec in sorted(dict(dcfg.sources).items()):
        src = pipeline.build_source(name, dict(spec), args.split, dcfg.qa_per_example)
        print(f"== source {name}: {src.records!r} (weight {src.weight})")
        done = 0
        for i in range(len(src.records)):
            if done >= args.num:
                break
            record, ex = src.records[i], None
            try:
                ex = src.to_example(record, rng)
                feats = featurize(ex, rng)
            except DataError as e:
                err = _located(e, _record_where(record, ex))
                if not skip:
                    raise err from e
                skipped.append(str(err))
                reasons[err.reason] += 1
                continue
            done += 1
            n_tok = int(feats["input_mask"].sum())
            n_img = int((feats["tokens"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
            print(f"-- {ex['id']}  images: {[tuple(np.shape(x)) for x in ex['images']]} -> "
                  f"{feats['images'].shape[1:]}  tokens: {n_tok}/{dcfg.max_length} "
                  f"(image {n_img}, trained-on {int(feats['loss_mask'].sum())})  "
                  f"type: {ex['meta'].get('question_type', '')}")
            for m in ex["messages"]:
                print(f"   {m['role']:>9}: {m['content']!r}")
            mean, std = dcfg.normalise
            shown += [_to_uint8(img, mean, std) for img, ok in
                      zip(feats["images"], feats["image_mask"]) if ok]
    if skipped:
        print(f"skipped {len(skipped)} bad record(s) (data.skip_bad_examples): "
              + ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())))
        for message in skipped:
            print(f"   {message}")
    if shown:
        image_grid(shown).save(args.out)
        print(f"wrote {len(shown)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
