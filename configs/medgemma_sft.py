"""Fine-tune a converted Gemma 3 VLM (the MedGemma architecture) on MedSynth chest radiographs.

Commands (convert once, then train; DIRs are local paths):

    python -m medvl_jax.convert.from_hf --hf_dir /models/medgemma-4b-it --out /ckpt/medgemma
    python -m medvl_jax.train --config configs/medgemma_sft.py \
        --config.init_from=/ckpt/medgemma --workdir /tmp/medgemma_sft
    python -m medvl_jax.evaluate --config configs/medgemma_sft.py \
        --config.init_from=/ckpt/medgemma --checkpoint /tmp/medgemma_sft

Model, tokenizer, image size and image-token count (``mm_tokens_per_image``) come from the
checkpoint (medvl_jax.tasks.policy.resolve_config). Gemma 3 chat format (``data.template = "gemma"``),
causal text with bidirectional attention inside each image, stopping at ``<end_of_turn>``.
The data pipeline expands ``<image>`` placeholders into ``<image>`` tokens, so the
checkpoint's image token must be the tokenizer's ``<image>``: a checkpoint whose image token
is another one (Gemma 3's ``<image_soft_token>``) is refused at start with that message.
Results are not recorded yet.

`:smoke` runs 2 steps on tiny data (used by tests with a tiny converted model).
"""
import ml_collections

from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return sft.finetune_config(smoke=arg == "smoke", template="gemma", prefix_lm=False,
                                      max_length=384, lr=1e-5, steps=2000)
