"""MedSynth MAE: masked-image-modelling pretraining of the vision tower (CPU), 2D or 3D.

Command:

    python -m medvl_jax.train --config configs/medsynth_mae.py --workdir /tmp/medsynth_mae

The main job's vision tower (64x64 radiographs, 8x8 patches -> 64 tokens, 3-layer ViT of
width 128: the tower of configs/medsynth_classify.py and configs/medsynth_sft.py) trained as a
masked autoencoder (medvl_jax/tasks/mae.py, docs/mae.md): 75% of the patches removed per
radiograph, the tower encodes the other 16, a 2-layer decoder of width 128 predicts the pixels
of every patch, MSE on the masked ones against per-patch-normalised targets. Batch 128, 300
steps, AdamW lr 1e-3 (betas 0.9/0.95, weight decay 0.05, 40 warmup steps, cosine). At the end
a linear probe (logistic regression on the tower's mean-pooled tokens of all 64 patches, no
masking; evaluator ``probe``: fitted on 2,000 train studies, ROC-AUC and accuracy on 500 test
studies, eleven findings) is printed and written to <workdir>/results.json. The same probe on
the untrained tower (the same initial weights: train.seed picks them):

    python -m medvl_jax.train --config configs/medsynth_mae.py --workdir /tmp/medsynth_mae_0 \\
        --config.train.steps=0

Measured (2026-12-07, 2 CPU cores shared with other training jobs, so the timings are
noisy: 1.0 s/step under that load, 0.55 s/step in an idle stretch): 5.7 min wall with start-up
and evaluation; loss (1.0 = predicting each patch's mean) 0.93 (step 25) -> 0.60 (100) -> 0.49
(300). Probe, mean over the eleven labels, ROC-AUC / accuracy:

                        seed 0            seed 1 (train.seed=1, data.seed=1)
    MAE, 300 steps      0.678 / 74.4%     0.683 / 74.8%
    untrained tower     0.772 / 80.0%     0.754 / 80.2%

**MAE does not beat the untrained tower here**, on every label (seed 0, MAE vs untrained):
nodule 0.622 vs 0.735, effusion 0.758 vs 0.903, cardiomegaly 0.950 vs 0.999, nodule per lung
zone 0.57-0.69 vs 0.65-0.72, effusion per side 0.70-0.76 vs 0.91-0.92. What was tried
(seed 0, 300 steps, mean probe AUC; untrained 0.772): 600 steps 0.650; probe at steps
100/200/300 0.684/0.685/0.678 (the drop happens early); lr 3e-4 0.731; norm_pix_loss=False
0.682; both 0.721 (effusion 0.899, cardiomegaly 1.000, nodule 0.654); mask_ratio 0.5 0.682,
0.9 0.639; decoder_depth 4 0.680; patch_size 4 (256 tokens, 4.3 s/step) 0.606. Other
features of the 600-step tower (each layer's mean, mean+max, 2x2 region means, masked
evaluation) stay below the untrained tower's same features. Fine-tuning does not rescue it:
configs/medsynth_classify.py for 100 steps from this tower (``--config.vision_init``, both
with ``--config.model.vision.pos_init=sincos2d``) reaches mean AUC 0.882 over its nine labels
against 0.967 from the untrained tower (0.703 vs 0.878 with the tower frozen). The likely
reason (docs/mae.md): the loss is on masked patches only, so the tower keeps what predicts
its neighbours (the anatomy, the heart's border) and may drop what does not -- a 3-6 px
nodule cannot be predicted from the rest of the image, and ``norm_pix_loss`` takes each
patch's mean, an effusion's main signal, out of the targets -- while random features of the
patches keep the intensity statistics these findings are linear in.

The workdir is a vision tower for the other recipes: ``--config.vision_init=/tmp/medsynth_mae``
(or ``--config.vision_stage=configs/medsynth_mae.py``) on configs/medsynth_sft.py or
configs/medsynth_classify.py; the decoder is dropped.

Variants:

* ``:ct`` -- 3D: MedSynth chest CT volumes rendered at 16x64x64, tubelets of 4 slices x 8x8
  pixels (256 tokens, 64 visible), the same tower, batch 32, probe on ``nodule``. Measured
  (same day and machine, loaded): 1.2 s/step, 7.2 min; loss 0.99 -> 0.92 (step 100) -> 0.58
  (300); probe AUC / accuracy 0.886 / 80.6% against 0.905 / 82.2% untrained.
* ``:smoke`` / ``:ct_smoke`` -- a few steps on tiny data in seconds (used by tests).
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.data.medsynth import prompts
from medvl_jax.evaluate import evaluators
from medvl_jax.train import loop, optim

ARGS = (None, "smoke", "ct", "ct_smoke")


def vision(**changes) -> dict:
    """The tower of the MedSynth SFT and classify configs (so that it starts them)."""
    return {**dict(layout="siglip", image_size=64, patch_size=8, num_channels=1, width=128,
                   depth=3, num_heads=4, mlp_dim=512, token_merge=1, feature_layer=-1,
                   pos_init="sincos2d"), **changes}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ARGS:
        raise ValueError(f"configs/medsynth_mae.py: unknown argument {arg!r}; one of "
                         f"{[a for a in ARGS if a]}")
    smoke = arg in ("smoke", "ct_smoke")
    ct = arg in ("ct", "ct_smoke")
    c = ml_collections.ConfigDict()
    c.task = "mae"
    c.tokenizer = ""  # No text.

    c.data = pipeline.default_config()
    c.data.channels = 1
    if ct:
        shape = (8, 32, 32) if smoke else (16, 64, 64)
        c.data.sources = {"ct": pipeline.medsynth_source(  # Rendered at the model's shape.
            "ct", num_studies=32 if smoke else 8000, volume_shape=shape)}
        c.data.volume_shape = shape
        c.data.image_size = shape[1]
        c.model = ml_collections.ConfigDict({"vision": vision(
            image_size=shape[1], tubelet=2 if smoke else 4,
            **(dict(width=32, depth=1, mlp_dim=64) if smoke else {}))})
        probe_labels = ("nodule",)
    else:
        c.data.sources = {"cxr": pipeline.medsynth_source(
            "cxr", num_studies=64 if smoke else 20000, render_size=64)}
        c.data.image_size = 64
        c.model = ml_collections.ConfigDict({"vision": vision(
            **(dict(width=32, depth=1, mlp_dim=64) if smoke else {}))})
        probe_labels = ("nodule", "effusion", "cardiomegaly") + prompts.CXR_LABELS
    c.data.batch_size = 16 if smoke else (32 if ct else 128)

    # The whole section (medvl_jax/tasks/mae.py), so that --config.mae.X=... can set any field.
    c.mae = dict(mask_ratio=0.75, norm_pix_loss=True, decoder_width=128, decoder_depth=2,
                 decoder_heads=4, decoder_mlp_dim=512, predict_batch_size=250)
    if smoke:
        c.mae.update(decoder_width=32, decoder_depth=1, decoder_mlp_dim=64)

    # The probe: fitted on `train_limit` train studies, scored on `test` test studies.
    test, train = (16, 32) if smoke else (500, 2000)
    c.evals = {"probe": evaluators.entry(
        "linear_probe", evaluators.with_studies(c.data.sources, test), train_limit=train,
        labels=probe_labels)}

    c.optim = optim.default_config()
    c.optim.lr = 1e-3
    c.optim.b2 = 0.95               # MAE's AdamW betas and weight decay.
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 2 if smoke else 40

    c.train = loop.default_config()
    c.train.steps = 4 if smoke else 300
    c.train.log_every = 1 if smoke else 25
    c.train.checkpoint_every = 2 if smoke else 300
    return c
