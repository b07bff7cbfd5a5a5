"""Fine-tune a converted PaliGemma checkpoint on MedSynth chest radiographs.

Commands (convert once, then train; DIRs are local paths):

    python -m medvl_jax.convert.from_hf --hf_dir /models/paligemma-3b-pt-224 \
        --out /ckpt/paligemma
    python -m medvl_jax.train --config configs/paligemma_sft.py \
        --config.init_from=/ckpt/paligemma --workdir /tmp/paligemma_sft
    python -m medvl_jax.evaluate --config configs/paligemma_sft.py \
        --config.init_from=/ckpt/paligemma --checkpoint /tmp/paligemma_sft

Model, tokenizer, image size and image-token count come from the checkpoint
(medvl_jax.tasks.policy.resolve_config). PaliGemma is a prefix-LM: the prompt (image tokens and question)
attends bidirectionally (``data.prefix_lm``), the answer causally. It has no chat template of
its own; the prompt is wrapped in the Gemma turn markers its tokenizer already holds
(``data.template = "gemma"``), stopping at ``<end_of_turn>``. Full fine-tuning, lr 1e-5.
Results are not recorded yet.

`:smoke` runs 2 steps on tiny data (used by tests with a tiny converted model).
"""
import ml_collections

from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return sft.finetune_config(smoke=arg == "smoke", template="gemma", prefix_lm=True,
                                      max_length=384, lr=1e-5, steps=2000)
