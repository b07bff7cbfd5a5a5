"""Fine-tune a converted LLaVA checkpoint, LLaVA-Med style, on MedSynth or a LLaVA-Med file.

Two stages (LLaVA-Med): ``stage1`` aligns the projector alone (vision tower and language
model frozen, lr 2e-3) on image/caption or QA pairs; the default, stage 2, tunes projector and
language model (vision tower frozen, lr 2e-5), starting from stage 1's workdir or directly from the converted checkpoint. Commands:

    python -m medvl_jax.convert.from_hf --hf_dir /models/llava-interleave-qwen-0.5b-hf \
        --out /ckpt/llava
    python -m medvl_jax.train --config configs/llava_sft.py:stage1 \
        --config.init_from=/ckpt/llava --workdir /tmp/llava_stage1
    python -m medvl_jax.train --config configs/llava_sft.py \
        --config.init_from=/tmp/llava_stage1 --workdir /tmp/llava_stage2
    python -m medvl_jax.evaluate --config configs/llava_sft.py \
        --config.init_from=/ckpt/llava --checkpoint /tmp/llava_stage2

Arguments (comma-separated): ``stage1``; ``smoke`` (2 steps on tiny data, used by tests);
``llava_med``: train on a LLaVA-Med conversation file instead of MedSynth, given with
``--config.data.sources.llava_med.path=FILE.json`` (images relative to the file, or
``--config.data.sources.llava_med.image_root=DIR``), evaluated during and after training on a
held-out file of the same format, ``--config.evals.test.data.llava_med.path=TEST.json``
(``--config.evals.test.every=N`` for every N steps), scored by LLaVA-Med's ``run_eval.py``
rules.

Model, tokenizer, image size and image-token count come from the checkpoint
(medvl_jax.tasks.policy.resolve_config). Chat format ``qwen2`` (ChatML with Qwen2's default system
prompt), for LLaVA models on a Qwen2 language model; set ``--config.data.template=llama3`` (or
``chatml``) for others: the template's markers must be tokens of the checkpoint's tokenizer.
Results are not recorded yet.
"""
import ml_collections

from medvl_jax.evaluate import evaluators
from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"stage1", "smoke", "llava_med"}
    if unknown:
        raise ValueError(f"configs/llava_sft.py: unknown argument(s) {sorted(unknown)}; "
                         f"known: llava_med, smoke, stage1")
    stage1 = "stage1" in args
    c = sft.finetune_config(smoke="smoke" in args, template="qwen2", prefix_lm=False,
                            max_length=1024, lr=2e-3 if stage1 else 2e-5,
                            steps=1000 if stage1 else 3000)
    if "llava_med" in args:
        c.data.sources = {"llava_med": dict(kind="json", weight=1.0, path="", image_root=None,
                                            format="llava")}
        # The held-out file (--config.evals.test.data.llava_med.path=...), scored as
        # LLaVA-Med's run_eval.py does.
        c.evals = {"test": evaluators.entry("vqa", {"llava_med": dict(
            kind="json", path="", image_root=None, format="llava")}, protocol="llava_med",
            batch_size=16, max_new_tokens=64)}
    # Stage 1: projector only. Stage 2: everything but the vision tower.
    c.optim.freeze = "^(vision|decoder)/" if stage1 else "^vision/"
    if stage1:
        c.optim.warmup_steps = 1 if "smoke" in args else 30
    return c
