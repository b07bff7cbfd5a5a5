"""Sequence packing: several examples per row of ``data.max_length`` tokens.

Short examples (one question, a short answer) waste most of a padded row. With ``data.pack``
the featurised examples are packed first-fit (grain's ``FirstFitPackIterDataset``) into rows of
``max_length`` tokens and ``max_images`` image slots; a row is closed when the next example does
not fit in any open row (by tokens or by image slots). Each packed row carries

    segment_ids  [L]  1, 2, ... per example in the row, 0 on padding
    positions    [L]  each example's token positions, counted from 0

and the model keeps attention inside a segment (``medvl_jax.models.masks.make_attn_mask``) and
uses the per-segment positions for its rotary embeddings, so a packed example sees exactly what
it would see alone. Images are packed in the same order as their examples' tokens, which is the
order the VLM splices image features into the image-token positions.

``data.max_images`` is the number of image slots per packed row; an example may not have more.
The packer's state (open rows, position in the source) is part of the iterator state that
checkpoints save, so resume stays exact.
"""
from __future__ import annotations

import grain
import grain.experimental as grain_exp
import numpy as np

TOKEN_KEYS = ("tokens", "input_mask", "mask_ar", "loss_mask")
IMAGE_KEYS = ("images", "image_mask")


def _to_row(packed: dict) -> dict:
    """grain's packed element → the model's batch row (masks as bool, ids and positions)."""
    return {
        "tokens": packed["tokens"],
        "input_mask": packed["input_mask"].astype(bool),
        "mask_ar": packed["mask_ar"],
        "loss_mask": packed["loss_mask"],
        "images": packed["images"],
        "image_mask": packed["image_mask"].astype(bool),
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
    }


def pack(ds: grain.IterDataset, *, max_length: int, max_images: int, num_rows: int,
         seed: int = 0) -> grain.IterDataset:
    """Packs a dataset of :meth:`Featurizer.unpadded` examples into rows (see module doc).

    ``num_rows`` rows are filled at a time (one per-process batch is a good choice: the rows of
    a batch then come from consecutive examples, as without packing); they are shuffled with
    ``seed`` when emitted.
    """
    lengths = {k: max_length for k in TOKEN_KEYS}
    lengths.update({k: max_images for k in IMAGE_KEYS})
    packed = grain_exp.FirstFitPackIterDataset(ds, length_struct=lengths,
                                               num_packing_bins=num_rows, seed=seed,
                                               shuffle_bins=True)
    return packed.map(_to_row)

