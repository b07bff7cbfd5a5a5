"""Reward functions for RL with verifiable rewards.

Every reward is a pure function ``f(prompts, completions, **example_fields) -> list[float]``
(one value per completion). Example fields are lists with one entry per completion:
``answer``, ``question_type``, ``options``, ``completion_lengths`` (tokens), …; a function
ignores the fields it does not use.

:func:`combine` builds the weighted sum of a config ``{name: weight}`` from a plain dict of
available functions (:func:`available` gives the standard ones).
"""
from __future__ import annotations

from typing import Callable, Mapping

from medvl_jax.rewards.accuracy import (AccuracyConfig, accuracy_reward, choice_letter,
                                        extract_answer, is_correct, make_accuracy_reward,
                                        parse_count, parse_size_mm, yes_no)
from medvl_jax.rewards.format import answer_format_reward, format_reward
from medvl_jax.rewards.length import length_penalty, make_length_penalty

RewardFn = Callable[..., list]


def available(*, max_tokens: int | None = None, buffer_tokens: int = 0,
              accuracy: AccuracyConfig = AccuracyConfig()) -> dict[str, RewardFn]:
    """The standard reward functions by name: ``format``, ``answer_format``, ``accuracy`` and,
    when ``max_tokens`` is given, ``length`` (the token-counted overlong penalty)."""
    fns: dict[str, RewardFn] = {"format": format_reward, "answer_format": answer_format_reward,
                                "accuracy": make_accuracy_reward(accuracy)}
    if max_tokens is not None:
        fns["length"] = make_length_penalty(max_tokens, buffer_tokens)
    return fns


def import_reward(path: str) -> RewardFn:
    """The reward function at ``'package.module:function'``: a reward defined outside this
    package, used by name through ``grpo.reward_functions`` = {name: path}."""
    import importlib

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {module_name!r} has no function {attr!r}")
    return fn


class Combined:
    """Weighted sum of named reward functions; call it like a reward function.

    :meth:`components` also returns each function's values (for logging reward per function).
    """

    def __init__(self, weights: Mapping[str, float], functions: Mapping[str, RewardFn]):
        self.weights = {str(k): float(v) for k, v in dict(weights).items()}
        self.functions = {k: functions[k] for k in self.weights}

    def components(self, prompts: list[str], completions: list[str],
                   **fields) -> tuple[list[float], dict[str, list[float]]]:
        """``(weighted totals, {name: values of that function})``."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions (give the prompt of "
                             f"every completion)")
        parts = {}
        for name, fn in self.functions.items():
            values = [float(v) for v in fn(prompts, completions, **fields)]
            if len(values) != n:
                raise ValueError(f"reward {name!r} returned {len(values)} values for {n} "
                                 f"completions")
            parts[name] = values
        totals = [sum(self.weights[k] * parts[k][i] for k in parts) for i in range(n)]
        return totals, parts

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        return self.components(prompts, completions, **fields)[0]


def combine(rewards_config: Mapping[str, float],
            functions: Mapping[str, RewardFn] | None = None) -> Combined:
    """The weighted sum of the rewards named in ``rewards_config`` ({name: weight}).

    ``functions``: the available functions by name (default :func:`available` without the
    length penalty). An unknown name is a KeyError listing the available ones.
    """
    functions = available() if functions is None else functions
    if not rewards_config:
        raise ValueError("the rewards config is empty: give at least one {name: weight}")
    for name in rewards_config:
        if name not in functions:
            raise KeyError(f"unknown reward {name!r}; available: {sorted(functions)}")
    return Combined(rewards_config, functions)


__all__ = ["AccuracyConfig", "Combined", "accuracy_reward", "answer_format_reward", "available",
           "choice_letter", "combine", "extract_answer", "format_reward", "import_reward",
           "is_correct", "length_penalty", "make_accuracy_reward", "make_length_penalty",
           "parse_count", "parse_size_mm", "yes_no"]
