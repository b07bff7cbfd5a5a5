"""GRPO (group relative policy optimisation) of a VLM with verifiable rewards.

One iteration: for ``B / G`` prompts (image + question), sample ``G`` completions each with the
KV-cache sampler (LEFT-padded prompts, images carried through), score them with the reward
functions (``grpo.rewards`` = {name: weight}, see medvl_jax.rewards), normalise the rewards
within each group (:func:`rl_losses.group_advantages`), and compute, with the trainer's
forward pass, the log-probs of the sampled tokens under the current policy (``old_logp``)
and, when ``grpo.beta > 0``, under the frozen reference. That is :meth:`GRPOTask.rollout`, a
host-side function of the current params, run outside the jitted update. Then ``grpo.mu``
updates of :meth:`GRPOTask.loss` (the clipped surrogate with k3 KL) use the same rollout batch.

The policy, its reference (the model the run started from: the LoRA base with LoRA on, else
``reference_params`` / ``config.init_from``) and answer sampling are the shared
:class:`~medvl_jax.tasks.policy.Policy` and :class:`~medvl_jax.tasks.answers.Answerer`.

A rollout batch (all arrays; ``P`` = ``data.max_length`` prompt tokens, ``T`` =
``grpo.max_new_tokens``)::

    tokens, input_mask, mask_ar   [B, P + T]   prompt (left-padded) + completion
    images                        [B, N, H, W, C]
    completion_mask               [B, T]       1 on generated tokens (stop token included)
    old_logp, ref_logp            [B, T]       trainer log-probs at rollout time (policy, ref)
    sampler_logp                  [B, T]       the sampler's log-probs of the same tokens
    advantages                    [B]
    reward, reward_<name>         [B]          total and per-function rewards

The shared loop drives it through two task members: ``prepare_batch(params, local_prompts,
rng)`` (here :meth:`rollout`) turns the data iterator's prompts into a rollout batch with the
current params, and ``updates_per_batch`` (``grpo.mu``) steps reuse it. With gradient
accumulation, ``token_mean`` divides by the completion tokens of the whole batch
(:meth:`GRPOTask.global_stats`), not of each microbatch.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvl_jax import rewards as rewards_lib
from medvl_jax.tasks import base, rl_losses
from medvl_jax.tasks.answers import Answerer
from medvl_jax.tasks.policy import Policy, resolve_config


class GRPOTask(base.Task):
    """A :class:`~medvl_jax.tasks.policy.Policy`, rollouts, rewards and the GRPO loss."""

    name = "grpo"
    outputs = frozenset({"text"})
    open_keys = ("rewards", "reward_functions")

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, *, start=None,
                 reference_params=None):
        super().__init__(config, tokenizer, start=start)
        g = config.grpo
        if g.aggregation not in rl_losses.AGGREGATIONS:
            raise ValueError(f"grpo.aggregation must be one of {rl_losses.AGGREGATIONS}, got "
                             f"{g.aggregation!r}")
        if g.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative within a "
                             f"group), got {g.group_size}")
        if config.data.batch_size % g.group_size:
            raise ValueError(f"data.batch_size={config.data.batch_size} is not a multiple of "
                             f"grpo.group_size={g.group_size}")
        if g.mu < 1:
            raise ValueError(f"grpo.mu must be >= 1, got {g.mu}")
        self.policy = Policy(config, tokenizer, start=start, reference_params=reference_params)
        self.answerer = Answerer(self.policy)
        self.model_config = self.policy.model_config
        functions = rewards_lib.available(max_tokens=int(g.max_new_tokens),
                                          buffer_tokens=int(g.length_buffer))
        for name, path in dict(g.reward_functions).items():
            if name in functions:
                raise ValueError(f"grpo.reward_functions.{name}: {name!r} is a built-in reward")
            functions[name] = rewards_lib.import_reward(path)
        self.reward_fn = rewards_lib.combine(dict(g.rewards), functions)
        self._timings: dict = {}  # Rollout phase times since the last host_metrics().

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        """The ``grpo`` section of a config."""
        c = ml_collections.ConfigDict()
        c.group_size = 4               # G completions per prompt; data.batch_size = prompts*G.
        c.max_new_tokens = 16
        c.temperature = 1.0
        c.top_k = 0
        c.top_p = 1.0
        c.mu = 1                       # Updates per rollout batch (old_logp fixed over them).
        c.eps_low = 0.2
        c.eps_high = 0.28              # DAPO clip-higher; equal to eps_low for PPO/GRPO.
        c.beta = 0.04                  # k3 KL weight; 0 skips the reference.
        c.aggregation = "token_mean"   # token_mean (DAPO) | sequence_mean (GRPO) | dr_grpo
        c.scale = "std"                # std (GRPO) | none (Dr.GRPO)
        c.ddof = 0
        c.adv_eps = 1e-6
        c.rewards = {"accuracy": 1.0, "length": 0.0}  # {name: weight}, rewards.available
        # More rewards by name: {name: "package.module:function"}, weighted in ``rewards``.
        c.reward_functions = ml_collections.ConfigDict()
        c.length_buffer = 4            # Tokens of the soft overlong penalty before the end.
        return c

    @classmethod
    def resolve_config(cls, config, start):
        return resolve_config(config, start)

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps on each rollout batch (``grpo.mu``)."""
        return int(self.config.grpo.mu)

    # --- parameters --------------------------------------------------------------------------

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a rollout batch of ``batch_size`` completions."""
        one = self.policy.dummy_batch(batch_size)
        t = int(self.config.grpo.max_new_tokens)
        b, p = one["tokens"].shape
        z = np.zeros((b, t), np.float32)
        out = {"tokens": np.pad(one["tokens"], ((0, 0), (0, t))),
               "input_mask": np.ones((b, p + t), bool), "mask_ar": np.ones((b, p + t), np.int32),
               "images": one["images"], "completion_mask": np.ones((b, t), np.int32),
               "old_logp": z, "ref_logp": z, "sampler_logp": z,
               "advantages": np.zeros((b,), np.float32), "reward": np.zeros((b,), np.float32)}
        for name in self.reward_fn.functions:
            out[f"reward_{name}"] = np.zeros((b,), np.float32)
        return out

    def init(self, rng, batch):
        """Policy parameters for a rollout batch of this shape."""
        p = self.config.data.max_length
        return self.policy.init(rng, {"tokens": batch["tokens"][:, :p],
                                      "images": batch["images"],
                                      "input_mask": batch["input_mask"][:, :p],
                                      "mask_ar": batch["mask_ar"][:, :p]})

    def model_params(self, params):
        return self.policy.model_params(params)

    def pretrained_params(self):
        return self.policy.pretrained_params()

    def reference_params(self, params=None):
        return self.policy.reference_params(params)

    def generate_texts(self, model_params, examples, *, batch_size, max_new_tokens,
                       temperature=0.0, rng=None):
        return self.answerer.generate_texts(model_params, examples, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens,
                                            temperature=temperature, rng=rng)

    # --- rollout (host side, outside the jitted update) --------------------------------------

    def rollout(self, params, examples: list[dict], rng) -> dict:
        """A rollout batch (module docstring) for ``examples`` (single-question examples with
        ``meta.answer`` / ``meta.question_type``): ``G`` sampled completions each,
        consecutive. Called with the current params before each group of ``grpo.mu``
        updates."""
        g = self.config.grpo
        gs, t = int(g.group_size), int(g.max_new_tokens)
        # Wall time per phase (host_metrics). The previous update runs asynchronously until
        # its params are needed here, so waiting for them is update time.
        t0 = time.perf_counter()
        jax.block_until_ready(params)
        t1 = time.perf_counter()
        prompts = self.answerer.prompt_batch(examples)  # LEFT-padded to data.max_length.
        rep = {k: np.repeat(v, gs, axis=0) for k, v in prompts.items()}
        model_params = self.model_params(params)
        out = self.answerer.decode(model_params, rep, t, temperature=float(g.temperature),
                                   top_k=int(g.top_k), top_p=float(g.top_p), rng=rng)
        lengths = np.asarray(out.lengths)
        t2 = time.perf_counter()
        cmask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        batch = {"tokens": np.concatenate([rep["tokens"], out.tokens], 1).astype(np.int32),
                 "input_mask": np.concatenate([rep["input_mask"], cmask.astype(bool)], 1),
                 "mask_ar": np.concatenate([rep["mask_ar"], np.ones_like(cmask)], 1),
                 "images": rep["images"], "completion_mask": cmask,
                 "sampler_logp": np.asarray(out.logprobs, np.float32)}
        args = (batch["tokens"], batch["images"], batch["input_mask"], batch["mask_ar"])
        logp_fn = self.policy.jitted_completion_logprobs
        batch["old_logp"] = np.asarray(logp_fn(model_params, *args), np.float32)
        batch["ref_logp"] = (np.asarray(logp_fn(self.reference_params(params), *args),
                                        np.float32) if g.beta > 0
                             else np.zeros_like(batch["old_logp"]))
        t3 = time.perf_counter()
        texts = self.answerer.texts(out)  # Stop token removed; lengths in tokens.
        fields = {"answer": [ex["meta"]["answer"] for ex in examples for _ in range(gs)],
                  "question_type": [ex["meta"]["question_type"] for ex in examples
                                    for _ in range(gs)],
                  "options": [ex["meta"].get("options") or [] for ex in examples
                              for _ in range(gs)],
                  "completion_lengths": [int(n) for n in out.lengths]}
        questions = [ex["messages"][0]["content"] for ex in examples for _ in range(gs)]
        total, parts = self.reward_fn.components(questions, texts, **fields)
        batch["reward"] = np.asarray(total, np.float32)
        for name, values in parts.items():
            batch[f"reward_{name}"] = np.asarray(values, np.float32)
        batch["advantages"] = np.asarray(rl_losses.group_advantages(
            jnp.asarray(batch["reward"]), gs, scale=g.scale, ddof=int(g.ddof),
            eps=float(g.adv_eps)))
        t4 = time.perf_counter()
        for key, dt in (("update", t1 - t0), ("sample", t2 - t1), ("logp", t3 - t2),
                        ("reward", t4 - t3)):
            self._timings[key] = self._timings.get(key, 0.0) + dt
        self._timings["rollouts"] = self._timings.get("rollouts", 0) + 1
        self._timings["tokens"] = self._timings.get("tokens", 0) + int(lengths.sum())
        return batch

    def rollout_plan(self) -> dict:
        g = self.config.grpo
        one = self.policy.dummy_batch(1)
        return {"max_new_tokens": int(g.max_new_tokens),
                "prompt": {k: one[k] for k in ("tokens", "input_mask", "mask_ar", "images")},
                "reference_on_device": float(g.beta) > 0 and not self.policy.lora}

    def prepare_batch(self, params, local_data, rng) -> dict:
        """The loop's hook: a rollout batch of the current params for a list of prompts."""
        return self.rollout(params, local_data, rng)

    def host_metrics(self) -> dict:
        """Where the rollout time went since the last call: seconds per rollout spent waiting
        for the previous update (``time_update_s``), sampling (``time_sample_s``), in the
        old/reference log-prob passes (``time_logp_s``) and computing rewards
        (``time_reward_s``), and sampled tokens per second of sampling
        (``rollout_tokens_per_s``)."""
        tm, self._timings = self._timings, {}
        n = tm.get("rollouts", 0)
        if not n:
            return {}
        out = {f"time_{k}_s": tm[k] / n for k in ("update", "sample", "logp", "reward")}
        out["rollout_tokens_per_s"] = tm["tokens"] / max(tm["sample"], 1e-9)
        return out

    # --- loss (inside the jitted update) -----------------------------------------------------

    def global_stats(self, batch) -> dict:
        """The completion tokens of the whole global batch (``token_mean``'s denominator)."""
        return {"batch_completion_tokens": jnp.asarray(batch["completion_mask"],
                                                       jnp.float32).sum()}

    def loss(self, params, batch, rng):
        """``(loss, metrics)`` of a rollout (micro)batch: :func:`rl_losses.grpo_loss` plus
        reward, accuracy, completion length (tokens), entropy and the sampler-trainer
        log-prob gap."""
        g = self.config.grpo
        p, t = int(self.config.data.max_length), int(g.max_new_tokens)
        logits = self.policy.apply(params, batch, rng)
        logp = self.policy.completion_logprobs(logits, batch["tokens"], p, t)
        mask = batch["completion_mask"].astype(jnp.float32)
        token_norm = None
        if "batch_completion_tokens" in batch:  # Whole batch / microbatches (grad_accum).
            token_norm = batch["batch_completion_tokens"] / int(self.config.optim.grad_accum)
        loss, metrics = rl_losses.grpo_loss(
            logp, batch["old_logp"], batch["ref_logp"] if g.beta > 0 else None,
            batch["advantages"], mask, eps_low=float(g.eps_low), eps_high=float(g.eps_high),
            beta=float(g.beta), aggregation=g.aggregation,
            max_len=t if g.aggregation == "dr_grpo" else None, token_norm=token_norm)
        n = jnp.maximum(mask.sum(), 1.0)
        comp_logits = jax.lax.stop_gradient(logits[:, p - 1:p - 1 + t].astype(jnp.float32))
        logq = jax.nn.log_softmax(comp_logits, axis=-1)
        entropy = -(jnp.exp(logq) * logq).sum(-1)
        gap = jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logp"])
        metrics.update(
            entropy=(entropy * mask).sum() / n,
            sampler_logp_gap=(gap * mask).sum() / n,
            sampler_logp_gap_max=jnp.where(mask > 0, gap, 0.0).max(),
            completion_length=mask.sum(1).mean(),
            reward=batch["reward"].mean())
        for name in self.reward_fn.functions:
            metrics[f"reward_{name}"] = batch[f"reward_{name}"].mean()
        return loss, metrics

    # --- data --------------------------------------------------------------------------------

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's prompts: lists of ``data.batch_size / (G * processes)``
        single-question examples of the configured sources (``data.qa_per_example`` must be
        1), checkpointable like every grain iterator; :meth:`prepare_batch` turns each list
        into a rollout batch."""
        from medvl_jax.data import pipeline

        if config.data.qa_per_example != 1:
            raise ValueError("GRPO prompts are single questions: set data.qa_per_example=1")
        gs = int(self.config.grpo.group_size)
        per_process = config.data.batch_size // process_count
        if per_process % gs:
            raise ValueError(f"data.batch_size / processes = {per_process} is not a multiple of "
                             f"grpo.group_size={gs}")
        return iter(pipeline.build_dataset(config.data, self.tokenizer, split="train",
                                           process_index=process_index,
                                           process_count=process_count, skips=skips,
                                           examples_per_batch=per_process // gs))


TASK = GRPOTask
