"""medvl_jax checkpoint -> Hugging Face checkpoint directory (loadable with ``from_pretrained``).

    python -m medvl_jax.convert.to_hf --checkpoint DIR --out DIR [--dtype bfloat16]
        [--max_shard_gb 5]

DIR is a converted checkpoint or a training workdir (its newest step; LoRA merged). A missing
or corrupt checkpoint, or a model without a Hugging Face counterpart, is reported as one
``error:`` line with exit code 2 (``--verbose`` adds the traceback).

Writes safetensors (sharded with an index when larger than ``--max_shard_gb``), config.json
(the original HF config stored in the checkpoint, else one built from our config),
generation_config.json and the tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import ml_dtypes
import numpy as np

from medvl_jax import cli_errors
from medvl_jax.convert import checkpoint_io, hf_io
from medvl_jax.convert import decoders as dec
from medvl_jax.convert import text as text_conv
from medvl_jax.convert import vlm as vlm_conv
from medvl_jax.models.vlm import VLMConfig

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export(checkpoint: str, out_dir: str, *, dtype: str | None = None,
           max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes the checkpoint at ``checkpoint`` as a Hugging Face directory ``out_dir``."""
    from medvl_jax.convert import workdir

    checkpoint = workdir.resolve(checkpoint)
    model, params, meta = checkpoint_io.load_checkpoint(checkpoint)
    config, family = model.config, meta["family"]
    if family == checkpoint_io.NATIVE_VLM:
        raise checkpoint_io.CheckpointError(f"{checkpoint}: no Hugging Face export: "
                                            f"{meta.get('hf_export_error')}")
    np_dtype = None if dtype is None else _DTYPES[dtype]
    hf_config = meta.get("hf_config")
    if family in text_conv.ARCHITECTURES:
        text_conv.save_hf_text(params, config, out_dir, hf_config=hf_config, dtype=np_dtype)
    elif isinstance(config, VLMConfig):
        fam = vlm_conv.ARCHITECTURES[family]
        vlm_conv.save_hf_vlm(params, config, out_dir, family=fam, hf_config=hf_config,
                             dtype=np_dtype)
    else:
        fam = dec.ARCHITECTURES[family][0]
        dec.save_hf_decoder(params, config, out_dir, family=fam, hf_config=hf_config,
                            dtype=np_dtype, max_shard_bytes=max_shard_bytes)
    tok = checkpoint_io.tokenizer_dir(checkpoint)
    if tok is not None:
        hf_io.copy_side_files(tok, out_dir)
        text_conv.copy_tokenizer_files(tok, out_dir)
    if family in text_conv.ARCHITECTURES:
        return  # encoders: no generation config
    if not os.path.exists(os.path.join(out_dir, "generation_config.json")):
        cfg = hf_config or {}
        text = cfg.get("text_config", cfg)
        gen = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if text.get(k) is not None}
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)


@cli_errors.handle_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: a user error, on one line)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="medvl_jax checkpoint directory")
    ap.add_argument("--out", required=True, help="output Hugging Face directory")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="cast tensors on export (default: keep)")
    ap.add_argument("--max_shard_gb", type=float, default=5.0)
    cli_errors.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise cli_errors.UserError(f"--max_shard_gb={args.max_shard_gb}: must be a finite "
                                   f"number > 0")
    export(args.checkpoint, args.out, dtype=args.dtype,
           max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote Hugging Face checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
