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
* otherwise it is a constant pytree held by the task: ``reference_params`` given at
  construction, else loaded from ``config.init_from`` on first use (also when a run resumes,
  so the reference stays the starting point). It is replicated as a constant of the jitted
  step, which suits models that fit on one device;
* a batch that carries ``ref_chosen_logp`` / ``ref_rejected_logp`` ``[B]`` (precomputed
  offline) uses those instead, and no reference forward pass is run.

Evaluation is the SFT task's: greedy answers to MedSynth questions, scored per question type.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax.models import lora as lora_lib
from medvl_jax.tasks import losses, rl_losses, sft

SIDES = ("chosen", "rejected")
_INPUTS = ("tokens", "input_mask", "mask_ar", "loss_mask", "images")


def default_config() -> ml_collections.ConfigDict:
    """The ``dpo`` section of a config."""
    c = ml_collections.ConfigDict()
    c.beta = 0.1
    c.label_smoothing = 0.0        # Conservative DPO: assumed label-flip probability.
    c.use_weights = True           # Weighted mean over pairs with the batch's "weight".
    c.pair_weights = {"text": 1.0, "visual": 1.0, "mistake": 1.0}  # Weight of each pair kind.
    c.visual_fraction = 0.5        # Share of visual pairs (when a study allows one).
    # Share of pairs whose rejected answer is the starting model's own mistake, mined before
    # training: `mistake_samples` answers at `mistake_temperature` (0: one greedy answer) to
    # each question of `mistake_studies` training studies per source. Sample: greedy
    # mistakes cover only the questions the model gets wrong, and DPO on those alone teaches
    # it to leave its usual answers, right ones included (docs/post_training.md).
    c.mistake_fraction = 0.0
    c.mistake_studies = 1000
    c.mistake_samples = 4
    c.mistake_temperature = 1.0
    # RPO: + nll_weight * the chosen answers' mean token NLL, which keeps DPO from lowering
    # the likelihood of the right answers along with the wrong ones (0: plain DPO).
    c.nll_weight = 0.0
    c.eval_studies = 100           # As sft.eval_studies; 0 = no evaluation.
    c.eval_batch_size = 64
    c.eval_max_new_tokens = 16
    return c


def sequence_logprobs(logits: jnp.ndarray, tokens: jnp.ndarray,
                      mask: jnp.ndarray) -> jnp.ndarray:
    """Sum of ``log p(token)`` over the tokens where ``mask`` is 1: ``[B, L, V] -> [B]``."""
    lp = losses.token_logprobs(logits, tokens)
    return (lp * mask[:, 1:].astype(jnp.float32)).sum(axis=1)


class DPOTask:
    """Policy model + DPO loss; the shared loop does the rest."""

    name = "dpo"

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *,
                 reference_params=None):
        self.config = config
        d = config.dpo
        if d.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {d.beta}")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        # The model, LoRA and evaluation are the SFT task's; it reads its eval settings from
        # an sft section, filled here from the dpo one.
        view = ml_collections.ConfigDict(config.to_dict())
        view.sft = sft.default_config()
        for k in ("eval_studies", "eval_batch_size", "eval_max_new_tokens"):
            view.sft[k] = d[k]
        self.policy = sft.SFTTask(view, tokenizer)
        self.tokenizer = tokenizer
        self.model = self.policy.model
        self.model_config = self.policy.model_config
        self.lora_config = self.policy.lora_config
        self._reference = reference_params

    # --- parameters --------------------------------------------------------------------------

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch of ``batch_size`` pairs."""
        one = self.policy.dummy_batch(batch_size)
        out = {f"{s}_{k}": one[k] for s in SIDES for k in _INPUTS}
        out["image_mask"] = one["image_mask"]
        out["weight"] = np.ones((batch_size,), np.float32)
        return out

    def init(self, rng, batch):
        """Policy parameters (as the SFT task's, LoRA factors included when on)."""
        return self.policy.init(rng, {k: batch[f"chosen_{k}"] for k in _INPUTS})

    def model_params(self, params):
        """Plain model params (LoRA merged), for sampling and export."""
        return self.policy.model_params(params)

    def reference_params(self, params=None):
        """The frozen reference's plain model params (see the module docstring): the base of
        ``params`` with LoRA on, else the constant given at construction or ``init_from``'s."""
        if lora_lib.enabled(self.lora_config):
            if params is None:
                raise ValueError("with LoRA on, the reference is the base of the params: "
                                 "pass params")
            base, _ = lora_lib.split(params)
            return jax.lax.stop_gradient(base)
        if self._reference is None:
            directory = self.config.get("init_from") or ""
            if not directory:
                raise ValueError("DPO needs a reference model: set config.init_from to the "
                                 "checkpoint the run starts from (a converted or exported "
                                 "directory), or pass reference_params")
            from medvl_jax.tasks import pretrained

            self._reference = pretrained.load_params(directory, self)
        self._reference = jax.tree.map(np.asarray, self._reference)
        return self._reference

    # --- loss ------------------------------------------------------------------------------

    def sequence_logprobs(self, params, batch, rng=None, *, reference: bool = False):
        """``(chosen [B], rejected [B])`` answer log-probs of a batch, both sides in one forward
        pass of 2B rows. ``params``: the task's params; ``reference``: use the reference model
        (``params`` are then only read for the LoRA base)."""
        joint = {k: jnp.concatenate([jnp.asarray(batch[f"chosen_{k}"]),
                                     jnp.asarray(batch[f"rejected_{k}"])])
                 for k in _INPUTS}
        if reference:
            ref = self.reference_params(params)
            logits, _ = self.model.apply({"params": ref}, joint["tokens"], joint["images"],
                                         input_mask=joint["input_mask"],
                                         mask_ar=joint["mask_ar"])
            logits = jax.lax.stop_gradient(logits)
        else:
            logits = self.policy.apply(params, joint, rng)
        mask = joint["loss_mask"] * joint["input_mask"]
        seq = sequence_logprobs(logits, joint["tokens"], mask)
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

    # --- data and evaluation -----------------------------------------------------------------

    def data_iterator(self, config, *, process_index: int, process_count: int):
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
            process_index=process_index, process_count=process_count))

    def mine_mistakes(self, *, process_index: int = 0, process_count: int = 1) -> list[dict]:
        """Mistake pairs (medvl_jax.data.preferences.mistake_pairs) of this process's share of
        the questions of ``dpo.mistake_studies`` training studies per source: the starting
        model (``init_from``) answers each ``dpo.mistake_samples`` times at
        ``dpo.mistake_temperature`` (0: once, greedily, as in evaluation), and every answer
        scored wrong becomes a rejected answer (a frequent mistake, several pairs). Sampling
        keys are fixed by ``train.seed``, so a resumed run mines the same pairs."""
        from medvl_jax.data import preferences
        from medvl_jax.tasks import pretrained

        d = self.config.dpo
        k, temperature = int(d.mistake_samples), float(d.mistake_temperature)
        if k < 1 or temperature < 0 or (temperature == 0 and k != 1):
            raise ValueError(f"dpo.mistake_samples={k}, dpo.mistake_temperature={temperature}:"
                             " need samples >= 1, temperature >= 0, and one sample when greedy")
        if not lora_lib.enabled(self.lora_config):
            start = self.reference_params()
        elif self.config.get("init_from"):  # The LoRA base: the checkpoint's weights.
            start = pretrained.load_params(self.config.init_from, self)
        else:
            raise ValueError("dpo.mistake_fraction > 0 mines the starting model's mistakes: "
                             "set config.init_from")
        questions = self.policy.eval_examples("train", int(d.mistake_studies))
        if not questions:
            raise ValueError("dpo.mistake_fraction > 0 mines mistakes on the questions of the "
                             "medsynth sources, and data.sources has none with questions "
                             "(set dpo.mistake_fraction=0 for preference files)")
        jobs = [ex for ex in questions[process_index::process_count] for _ in range(k)]
        key = jax.random.fold_in(jax.random.key(int(self.config.train.seed)), process_index)

        def progress(done, total):
            if done % 10 == 0 or done == total:
                print(f"mining mistakes: {done}/{total} batches", flush=True)
        result = self.policy.evaluate_model(start, "train", examples=jobs, progress=progress,
                                            temperature=temperature, rng=key)
        pairs = preferences.mistake_pairs(jobs, result.get("predictions", []),
                                          weight=float(d.pair_weights.get("mistake", 1.0)))
        print(f"mined {len(pairs)} mistake pairs from {len(jobs)} answers to "
              f"{len(jobs) // k} training questions (the starting model's score "
              f"{100 * result.get('overall', 0.0):.1f}%)", flush=True)
        return pairs

    def evaluate(self, params, split: str = "test", *, progress=None) -> dict:
        """Per-question-type MedSynth scores, as :meth:`SFTTask.evaluate`. On the test split
        the same questions are also answered by the reference model (``before``: the
        starting weights) and by the trained model without its images (``no_image``: what
        the text alone gets right), so the table shows what the run changed and whether it
        came from reading the images."""
        after = self.policy.evaluate(params, split, progress=progress)
        if split != "test" or not after:
            return after
        strip = ("predictions",)
        before = self.policy.evaluate_model(self.reference_params(params), split)
        blind = self.policy.evaluate(params, split, condition="no_image")
        return {**after, "before": {k: v for k, v in before.items() if k not in strip},
                "no_image": {k: v for k, v in blind.items() if k not in strip}}

    def report(self, results: dict, workdir: str) -> None:
        """Prints the before/after table (see :meth:`evaluate`) at the end of a run."""
        if "before" not in results:
            return
        print(comparison_table(results))


def comparison_table(results: dict) -> str:
    """The test table of a preference/RL run: per question type, the reference model's score
    (before), the trained model's (after), the change, and the trained model's score without
    images (no image)."""
    before, blind = results["before"]["per_type"], results["no_image"]["per_type"]
    lines = [f"{'question type':<18}{'n':>6}{'before':>9}{'after':>9}{'change':>9}"
             f"{'no image':>10}", "(scores in %, change in points)"][::-1]
    rows = [(t, v) for t, v in results["per_type"].items()]
    rows.append(("overall", {"score": results["overall"], "n": results["num_questions"]}))
    for t, v in rows:
        b = results["before"]["overall"] if t == "overall" else before[t]["score"]
        n = results["no_image"]["overall"] if t == "overall" else blind[t]["score"]
        lines.append(f"{t:<18}{v['n']:>6}{100 * b:>8.1f}%{100 * v['score']:>8.1f}%"
                     f"{100 * (v['score'] - b):>+9.1f}{100 * n:>9.1f}%")
    return "\n".join(lines)
