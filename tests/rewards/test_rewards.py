"""Reward functions on hand-built cases."""
import pytest

from medvl_jax import rewards


def acc(completions, answers, qtype, options=None, **kw):
    n = len(completions)
    fn = rewards.make_accuracy_reward(rewards.AccuracyConfig(**kw)) if kw else \
        rewards.accuracy_reward
    return fn([""] * n, completions, answer=answers, question_type=[qtype] * n,
              options=None if options is None else [options] * n)


def test_format_rewards():
    good = "<think>the nodule is left</think>\n<answer>left</answer>"
    cases = [good, " <think>x</think><answer>a</answer> ", "<answer>left</answer>",
             "<think>x</think><answer></answer>", "<think>x</think><answer>a</answer> extra",
             "<think>x</think><answer>a</answer><answer>b</answer>",
             "<think>x<think>y</think><answer>a</answer>", "left"]
    assert rewards.format_reward([""] * len(cases), cases) == [1, 1, 0, 0, 0, 0, 0, 0]
    assert rewards.answer_format_reward([""] * len(cases), cases) == [0, 0, 1, 0, 0, 0, 0, 0]


def test_closed_yes_no():
    comps = ["yes", "Yes.", "no", "normal", "yes and no", "not seen", "<answer>No</answer>",
             "There is no effusion", "nothing"]
    assert acc(comps, ["no"] * len(comps), "closed") == [0, 0, 1, 0, 0, 0, 1, 1, 0]
    assert acc(["yes", "yes and no", "Yes, there is."], ["yes"] * 3, "closed") == [1, 0, 1]


def test_multiple_choice():
    opts = ["left", "right", "both sides", "no effusion"]
    comps = ["C", "(c)", "C.", "c", "C. both sides", "answer: C", "The answer is (C)",
             "both sides", "<think>hmm</think><answer>(C)</answer>", "B", "the answer is a",
             "the answer is a nodule", "(B) or (C)"]
    got = acc(comps, ["C"] * len(comps), "multiple_choice", opts)
    assert got[:9] == [1] * 9
    assert got[9:] == [0, 0, 0, 0]


def test_counting_and_size():
    assert acc(["2", "two", "There are 2 nodules.", "3", "none"], ["2"] * 5, "counting") == \
        [1, 1, 1, 0, 0]
    assert acc(["none", "0"], ["0", "0"], "counting") == [1, 1]
    exact = dict(size_abs_tol=0.0, size_rel_tol=0.0)
    comps = ["18 mm", "18mm", "1.8 cm", "17 mm", "about 18", "large"]
    assert acc(comps, ["18 mm"] * 6, "size", **exact) == [1, 1, 1, 0, 1, 0]
    assert acc(comps, ["18 mm"] * 6, "size", size_abs_tol=1.0, size_rel_tol=0.0) == \
        [1, 1, 1, 1, 1, 0]
    assert acc(["14 mm"], ["18 mm"], "size", size_abs_tol=1.0, size_rel_tol=0.0) == [0]


def test_box_and_exact():
    ref = "[10, 10, 30, 30]"
    assert acc(["[10, 10, 30, 30]", "[12, 11, 31, 30]", "[40, 40, 60, 60]", "[1, 2]"],
               [ref] * 4, "box") == [1, 1, 0, 0]
    assert acc(["[10, 10, 30, 30]", "[12, 11, 31, 30]"], [ref] * 2, "box",
               iou_threshold=0.95) == [1, 0]
    assert acc(["Grown.", "the grown", "stable"], ["grown"] * 3, "progression") == [1, 1, 0]
    # No question type: normalised exact match.
    assert rewards.accuracy_reward(["q"], ["<answer> Left </answer>"], answer=["left"]) == [1.0]


def test_length_penalty_counts_tokens():
    comps = ["a" * 1000, "b", "c", "d"]  # Characters do not matter, tokens do.
    got = rewards.length_penalty([""] * 4, comps, completion_lengths=[10, 60, 70, 90],
                                 max_tokens=80, buffer_tokens=20)
    assert got == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="completion_lengths"):
        rewards.length_penalty([""], ["x"], max_tokens=8)


def test_combine():
    fns = rewards.available(max_tokens=8, buffer_tokens=4)
    combined = rewards.combine({"accuracy": 1.0, "format": 0.5, "length": 1.0}, fns)
    comps = ["<think>x</think><answer>yes</answer>", "yes", "no"]
    totals, parts = combined.components(["q"] * 3, comps, answer=["yes"] * 3,
                                        question_type=["closed"] * 3,
                                        completion_lengths=[4, 6, 9])
    assert parts == {"accuracy": [1, 1, 0], "format": [1, 0, 0], "length": [0, -0.5, -1]}
    assert totals == [1.5, 0.5, -1.0]
    assert combined(["q"] * 3, comps, answer=["yes"] * 3, question_type=["closed"] * 3,
                    completion_lengths=[4, 6, 9]) == totals
    with pytest.raises(KeyError, match="available"):
        rewards.combine({"acuracy": 1.0}, fns)
    with pytest.raises(ValueError, match="one entry per completion"):
        rewards.accuracy_reward(["q"], ["yes"], answer="yes")


def short_answer(prompts, completions, **_):
    """A reward defined outside medvl_jax.rewards (used by test_reward_from_a_module)."""
    return [1.0 if len(c) <= 3 else 0.0 for c in completions]


def test_reward_from_a_module():
    """A reward named in grpo.reward_functions is imported; the config validates with its name
    in grpo.rewards, and the task's weighted sum uses it."""
    import ml_collections

    from medvl_jax import config as config_lib
    from medvl_jax.data import pipeline
    from medvl_jax.tasks import grpo
    from medvl_jax.train import run

    assert rewards.import_reward("tests.rewards.test_rewards:short_answer") is short_answer
    for bad in ("tests.rewards.test_rewards", "tests.rewards.nope:f",
                "tests.rewards.test_rewards:nope"):
        with pytest.raises(ValueError, match="reward"):
            rewards.import_reward(bad)

    config = ml_collections.ConfigDict(
        config_lib.load_config("configs/medsynth_sft.py:smoke", {}).to_dict())
    del config["sft"]
    config.task = "grpo"
    config.data.pack = False  # GRPO builds its own batches.
    config.grpo = grpo.GRPOTask.default_config()
    config.evals = {}
    config.grpo.update(group_size=2, rewards={"accuracy": 1.0, "short": 0.5},
                       reward_functions={"short": "tests.rewards.test_rewards:short_answer"})
    run.validate(config)
    task = grpo.GRPOTask(config, pipeline.make_tokenizer(config.tokenizer))
    total, parts = task.reward_fn.components(["q", "q"], ["yes", "maybe"],
                                             answer=["yes", "yes"],
                                             question_type=["closed", "closed"],
                                             options=[[], []], completion_lengths=[1, 1])
    assert parts["short"] == [1.0, 0.0] and parts["accuracy"] == [1.0, 0.0]
    assert total == [1.5, 0.0]
    config.grpo.reward_functions = {"accuracy": "tests.rewards.test_rewards:short_answer"}
    with pytest.raises(ValueError, match="built-in"):
        grpo.GRPOTask(config, pipeline.make_tokenizer(config.tokenizer))


@pytest.mark.parametrize("qtype", ["closed", "multiple_choice", "counting", "size", "box",
                                   "open", None])
def test_empty_prediction_is_never_right(qtype):
    from medvl_jax.rewards import accuracy

    assert accuracy.is_correct("", "yes", qtype) is False
    assert acc(["<answer></answer>", "<answer> </answer>"], ["yes", "yes"], qtype) == [0.0, 0.0]
    with pytest.raises(ValueError, match="empty reference"):
        accuracy.is_correct("", " ", qtype)
