"""Direct preference optimisation (DPO) of a VLM on chosen / rejected answers.

Each example is a preference pair for one prompt (image + question): the chosen and the
rejected answer, each with its own images (the same images for a text or mistake pair; clean
vs. corrupted images for a visual pair, see medvl_jax.data.preferences). Mistake pairs are
mined before training (:meth:`DPOTask.mine_mistakes`): the starting model's own wrong answers
are the rejected ones. The loss is :func:`medvl_jax.tasks.rl_losses.dpo_loss` of the
sequence log-probs (sums over the answer tokens) under the policy and the reference, with
``dpo.beta``, ``dpo.label_smoothing``, RPO's NLL term on the chosen answers
(``dpo.nll_weight``) and, with ``dpo.use_weights``, the per-pair weights of the batch
(``dpo.pair_weights`` by pair kind).

The reference policy is the model the run started from (``config.init_from``), frozen:

* with LoRA on (``config.lora.rank > 0``) it is the base model inside the train state
  (the params without their ``lora`` factors): no second copy, sharded like the state;
* otherwise it is a constant pytree held by the policy: ``reference_params`` given at
  construction, else read from ``config.init_from`` (a training workdir or a converted
  checkpoint) on first use (also when a run resumes, so the reference stays the starting
  point), or, from scratch, the run's initial weights, computed when the task is built. It is replicated as a constant of the jitted step, which suits models that fit on
  one device;
* a batch that carries ``ref_chosen_logp`` / ``ref_rejected_logp`` ``[B]`` (precomputed
  offline) uses those instead, and no reference forward pass is run.

Evaluation is declared in ``config.evals``; a ``vqa`` evaluator with ``compare_start`` also
answers with the reference (the "before" column).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.tasks import base, rl_losses
from medvl_jax.tasks.answers import Answerer
from medvl_jax.tasks.policy import Policy, resolve_config

SIDES = ("chosen", "rejected")
_INPUTS = ("tokens", "input_mask", "mask_ar", "loss_mask", "images")


class DPOTask(base.Task):
    """A :class:`~medvl_jax.tasks.policy.Policy` and the DPO loss on preference pairs."""

    name = "dpo"
    outputs = frozenset({"text"})

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *, start=None,
                 reference_params=None):
        super().__init__(config, tokenizer, start=start)
        d = config.dpo
        if d.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {d.beta}")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        self.policy = Policy(config, tokenizer, start=start, reference_params=reference_params)
        if (start is None and reference_params is None and not self.policy.lora
                and not config.get("init_from")):
            # From scratch the reference is the run's initial weights: computed now, since
            # the loss (traced) cannot compute it.
            self.policy.reference_params()
        self.answerer = Answerer(self.policy)
        self.model_config = self.policy.model_config

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        """The ``dpo`` section of a config."""
        c = ml_collections.ConfigDict()
        c.beta = 0.1
        c.label_smoothing = 0.0        # Conservative DPO: assumed label-flip probability.
        c.use_weights = True           # Weighted mean over pairs with the batch's "weight".
        c.pair_weights = {"text": 1.0, "visual": 1.0, "mistake": 1.0}  # Weight per pair kind.
        c.visual_fraction = 0.5        # Share of visual pairs (when a study allows one).
        # Share of pairs whose rejected answer is the starting model's own mistake, mined
        # before training: `mistake_samples` answers at `mistake_temperature` (0: one greedy
        # answer) to each question of `mistake_studies` training records per source of
        # data.sources. Sample: greedy mistakes cover only the questions the model gets
        # wrong, and DPO on those alone teaches it to leave its usual answers, right ones
        # included (docs/post_training.md).
        c.mistake_fraction = 0.0
        c.mistake_studies = 1000
        c.mistake_samples = 4
        c.mistake_temperature = 1.0
        c.mistake_batch_size = 64      # Questions answered per batch while mining.
        c.mistake_max_new_tokens = 16
        # RPO: + nll_weight * the chosen answers' mean token NLL, which keeps DPO from
        # lowering the likelihood of the right answers along with the wrong ones (0: plain).
        c.nll_weight = 0.0
        return c

    @classmethod
    def resolve_config(cls, config, start):
        return resolve_config(config, start)

    # --- parameters --------------------------------------------------------------------------

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch of ``batch_size`` pairs."""
        one = self.policy.dummy_batch(batch_size)
        out = {f"{s}_{k}": one[k] for s in SIDES for k in _INPUTS}
        out["image_mask"] = one["image_mask"]
        out["weight"] = np.ones((batch_size,), np.float32)
        return out

    def init(self, rng, batch):
        """Policy parameters (LoRA factors included when on)."""
        return self.policy.init(rng, {k: batch[f"chosen_{k}"] for k in _INPUTS})

    def model_params(self, params):
        return self.policy.model_params(params)

    def pretrained_params(self):
        return self.policy.pretrained_params()

    def reference_params(self, params=None):
        return self.policy.reference_params(params)

    # --- loss ------------------------------------------------------------------------------

    def sequence_logprobs(self, params, batch, rng=None, *, reference: bool = False):
        """``(chosen [B], rejected [B])`` answer log-probs of a batch, both sides in one
        forward pass of 2B rows (see :meth:`Policy.sequence_logprobs`)."""
        joint = {k: jnp.concatenate([jnp.asarray(batch[f"chosen_{k}"]),
                                     jnp.asarray(batch[f"rejected_{k}"])])
                 for k in _INPUTS}
        seq = self.policy.sequence_logprobs(params, joint, rng, reference=reference)
        b = batch["chosen_tokens"].shape[0]
        return seq[:b], seq[b:]

    def loss(self, params, batch, rng):
        """``(loss, metrics)`` of a batch of pairs (see the module docstring)."""
        d = self.config.dpo
        pc, pr = self.sequence_logprobs(params, batch, rng)
        if "ref_chosen_logp" in batch:
            rc, rr = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        else:
            rc, rr = self.sequence_logprobs(params, batch, reference=True)
        weights = batch["weight"] if d.use_weights else None
        lengths = (jnp.asarray(batch["chosen_loss_mask"]) * jnp.asarray(
            batch["chosen_input_mask"]))[:, 1:].sum(axis=1)
        loss, metrics = rl_losses.dpo_loss(pc, pr, rc, rr, beta=float(d.beta),
                                           label_smoothing=float(d.label_smoothing),
                                           weights=weights, nll_weight=float(d.nll_weight),
                                           chosen_lengths=lengths)
        metrics.update(chosen_logp=pc.mean(), rejected_logp=pr.mean())
        return loss, metrics

    def count_tokens(self, local_batch) -> int:
        """Real tokens of both sides of the pairs."""
        return int(sum(np.asarray(local_batch[f"{s}_input_mask"]).sum() for s in SIDES))

    def generate_texts(self, model_params, examples, *, batch_size, max_new_tokens,
                       temperature=0.0, rng=None):
        return self.answerer.generate_texts(model_params, examples, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens,
                                            temperature=temperature, rng=rng)

    # --- data --------------------------------------------------------------------------------

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's batches of preference pairs (medvl_jax.data.preferences)."""
        from medvl_jax.data import preferences

        d = config.dpo
        mistakes = None
        if d.mistake_fraction > 0:
            mistakes = self.mine_mistakes(process_index=process_index,
                                          process_count=process_count)
        return iter(preferences.build_dataset(
            config.data, self.tokenizer, visual_fraction=float(d.visual_fraction),
            weights=dict(d.pair_weights), mistakes=mistakes,
            mistake_fraction=float(d.mistake_fraction), split="train",
            process_index=process_index, process_count=process_count, skips=skips))

    def mine_mistakes(self, *, process_index: int = 0, process_count: int = 1) -> list[dict]:
        """Mistake pairs (medvl_jax.data.preferences.mistake_pairs) of this process's share of
        the questions of ``dpo.mistake_studies`` training records per source of
        ``data.sources`` (every question of a MedSynth study): the starting model answers each
        ``dpo.mistake_samples`` times at ``dpo.mistake_temperature`` (0: once, greedily), and
        every answer scored wrong becomes a rejected answer (a frequent mistake, several
        pairs). Sampling keys are fixed by ``train.seed``, so a resumed run mines the same
        pairs."""
        from medvl_jax.data import pipeline, preferences

        d = self.config.dpo
        k, temperature = int(d.mistake_samples), float(d.mistake_temperature)
        if k < 1 or temperature < 0 or (temperature == 0 and k != 1):
            raise ValueError(f"dpo.mistake_samples={k}, dpo.mistake_temperature={temperature}:"
                             " need samples >= 1, temperature >= 0, and one sample when greedy")
        if not self.policy.lora:
            start = self.reference_params()
        elif self.start is not None:  # The LoRA base: the checkpoint's weights.
            start = self.policy.pretrained_params()
        else:
            raise ValueError("dpo.mistake_fraction > 0 mines the starting model's mistakes: "
                             "set config.init_from")
        sources = {n: s for n, s in dict(self.config.data.sources).items()
                   if s["kind"] != "preferences"}
        questions = pipeline.question_examples(sources, "train", limit=int(d.mistake_studies))
        if not questions:
            raise ValueError("dpo.mistake_fraction > 0 mines mistakes on the questions of "
                             "data.sources, and it has no question source (set "
                             "dpo.mistake_fraction=0 for preference files)")
        jobs = [ex for ex in questions[process_index::process_count] for _ in range(k)]
        key = jax.random.fold_in(jax.random.key(int(self.config.train.seed)), process_index)

        def progress(done, total):
            if done % 10 == 0 or done == total:
                print(f"mining mistakes: {done}/{total} batches", flush=True)
        rows = self.answerer.scored_answers(
            start, jobs, batch_size=int(d.mistake_batch_size),
            max_new_tokens=int(d.mistake_max_new_tokens), temperature=temperature, rng=key,
            progress=progress)
        pairs = preferences.mistake_pairs(jobs, rows,
                                          weight=float(d.pair_weights.get("mistake", 1.0)))
        score = float(np.mean([r["score"] for r in rows])) if rows else 0.0
        print(f"mined {len(pairs)} mistake pairs from {len(jobs)} answers to "
              f"{len(jobs) // k} training questions (the starting model's score "
              f"{100 * score:.1f}%)", flush=True)
        return pairs


TASK = DPOTask
