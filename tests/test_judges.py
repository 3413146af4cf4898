"""Pairwise judges: both orders cancel position bias (literal numbers), the LLM judge reads its two label tokens,
and the evaluation logs a judge's win rate beside the gold reward (a judge built from the gold reward agrees
with the gold win rate exactly)."""
from pathlib import Path

import pytest
import torch
import yaml

from modules.judges import LLMJudge, both_orders, win_rate
from modules.rewards import PairwiseReward, RewardError
from tests.helpers import ScoreTable, tiny_rl_config
from train import cli_main


def test_both_orders_cancel_a_position_bias_and_report_agreement():
    """The docstring's example: f(a, b) = 1.5 and f(b, a) = 0.5 (r(a) - r(b) = 0.5, bias 1): score 0.5, disagree.
    With r(c) - r(d) = 2: f = 3 and -1, score 2, agree."""
    judge = ScoreTable({"a": 0.5, "b": 0.0, "c": 2.0, "d": 0.0}, bias=1.0)
    score, agree = both_orders(judge, ["p", "p"], ["a", "c"], ["b", "d"])
    assert score.tolist() == [0.5, 2.0] and agree.tolist() == [False, True]
    assert win_rate(torch.tensor([2.0, 0.0, -1.0])).item() == pytest.approx(0.5)


def test_a_judge_returning_the_wrong_count_or_nan_is_named():
    class Short(PairwiseReward):
        def __call__(self, prompts, a, b):
            return [0.0]

    class NaN(PairwiseReward):
        def __call__(self, prompts, a, b):
            return [float("nan")] * len(a)

    with pytest.raises(RewardError, match="Short returned 1 values for 2 pairs"):
        both_orders(Short(), ["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match="judge .*NaN returned nan for pair 0 of 2"):
        both_orders(NaN(), ["p", "q"], ["a", "b"], ["c", "d"])


def test_a_pairwise_model_given_more_tokens_than_its_positions_stops_with_one_line(sft_dir, preference_dir):
    """The tiny models have 128 positions. Two responses of 60 words each (a token per word) fit a scalar reward
    model's prompt + response, but not a judge's question or a preference model's prompt + a + EOS + b + EOS: a
    `RewardError` naming the class, the model, the length and the settings to lower. Before: the rotary model read
    positions it was never trained on, silently."""
    from modules.rewards import PreferenceModel

    long = " ".join(["great"] * 60)
    judge = LLMJudge(sft_dir, labels=("great", "awful"), batch_size=2)
    judge(["write a review of the cafe :"], ["great ."], ["bad ."])                   # short ones are read
    with pytest.raises(RewardError, match=r"^modules\.judges\.LLMJudge \(.*\): a question \(the template with the "
                                          r"prompt and both responses\) is \d+ tokens, more than the model's "
                                          r"max_position_embeddings \(128\); lower model\.init_args\.sampling\."
                                          r"max_new_tokens"):
        judge(["write a review of the cafe :"], [long], [long])
    preference = PreferenceModel(preference_dir, normalize=False)
    preference(["write a review of the cafe :"], ["great ."], ["bad ."])
    with pytest.raises(RewardError, match=r"^modules\.rewards\.PreferenceModel \(.*\): a pair \(prompt \+ a \+ EOS "
                                          r"\+ b \+ EOS\) is 1[2-9]\d tokens, more than"):
        preference(["write a review of the cafe :"], [long], [long])


def test_the_llm_judge_is_the_logit_of_its_two_labels_after_the_template(sft_dir, tokenizer):
    from datamodules.collate import encode_prompt

    judge = LLMJudge(sft_dir, labels=("great", "awful"), batch_size=2)
    prompts, a, b = ["write a review of the cafe :"] * 3, ["the food was great .", "ok .", "bad"], ["bad", "x", "ok ."]
    got = judge(prompts, a, b)
    for p, x, y, value in zip(prompts, a, b, got):
        ids = torch.tensor([encode_prompt(tokenizer, judge.template.format(prompt=p, a=x, b=y))])
        with torch.no_grad():
            logp = judge.model(input_ids=ids).logits[0, -1].log_softmax(-1)
        want = logp[judge.label_ids[0]] - logp[judge.label_ids[1]]
        assert value == pytest.approx(want.item(), abs=1e-5)          # left padding in a batch changes nothing
    with pytest.raises(ValueError, match="label 'A' .* must be one known token"):
        LLMJudge(sft_dir)                                              # 'A' is unknown to the task's word vocabulary
    with pytest.raises(ValueError, match="no {b}"):
        LLMJudge(sft_dir, template="{prompt} {a}", labels=("great", "awful"))


@pytest.mark.parametrize("template, labels, message", [
    ("{prompt} {a} {b} {score}", ("great", "awful"), "the template has {score}; only {prompt}, {a} and {b} are filled"),
    ("{prompt} {a} {b} {}", ("great", "awful"), "the template has {}; only"),
    ("{prompt} {a} {b} }", ("great", "awful"), "the template is not a format string (Single '}' encountered"),
    ("{prompt} {a} {b}", ("great", "great"), "labels 'great' and 'great' are the same token of the judge's tokenizer"),
], ids=["unknown_field", "positional_field", "lone_brace", "same_label"])
def test_a_judge_that_cannot_give_a_verdict_is_refused_when_built(sft_dir, template, labels, message):
    """Before: a template with another field or a lone brace raised KeyError / IndexError / ValueError at the first
    evaluation (a traceback); two labels of one token gave 0 for every pair, a judge win rate of 1/2 with
    nothing said. A literal brace written {{ }} is fine."""
    import re

    with pytest.raises(ValueError, match="^LLMJudge: " + re.escape(message)):
        LLMJudge(sft_dir, template=template, labels=labels)
    LLMJudge(sft_dir, template="{{json}} {prompt} {a} {b}", labels=("great", "awful"))


def with_judge(config: str, judge: dict) -> str:
    data = yaml.safe_load(Path(config).read_text())
    for cb in data["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"]["judge"] = judge
    Path(config).write_text(yaml.safe_dump(data))
    return config


def evaluation(cli):
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")


def test_evaluation_samples_several_responses_per_prompt(sft_dir, tmp_path):
    """`samples_per_prompt: 4`: the gold reward is the mean over 4 samples of each of the 8 prompts, the best of each
    prompt's 4 at least as high on average, and the judge, KL and win rate run on the 32 row-aligned pairs (the gold
    reward as judge: its win rate is the gold one). Fewer than 1 sample is refused."""
    from callbacks.evaluation import Evaluation

    gold_judge = {"class_path": "modules.rewards.DifferenceOf",
                  "init_args": {"reward": {"class_path": "datamodules.task.GoldReward"}}}
    config = with_judge(tiny_rl_config(tmp_path, sft_dir, evaluation={"samples_per_prompt": 4}), gold_judge)
    cli = cli_main(["fit", "--config", config, "--trainer.limit_train_batches=1"])
    end = evaluation(cli).history[-1]
    assert evaluation(cli).samples_per_prompt == 4
    assert end["val/gold_best_of_n"] > end["val/gold_reward"]        # (the samples of a prompt differ in gold)
    assert end["val/judge_win_rate"] == pytest.approx(end["val/win_rate"]) and end["val/judge_agreement"] == 1.0
    with pytest.raises(ValueError, match=r"Evaluation: samples_per_prompt=0; expected at least 1"):
        Evaluation(samples_per_prompt=0)


def test_evaluation_logs_the_judges_win_rate_beside_the_gold_one(sft_dir, tmp_path):
    gold_judge = {"class_path": "modules.rewards.DifferenceOf",
                  "init_args": {"reward": {"class_path": "datamodules.task.GoldReward"}}}
    cli = cli_main(["fit", "--config", with_judge(tiny_rl_config(tmp_path, sft_dir), gold_judge)])
    end = evaluation(cli).history[-1]
    # the gold reward as a judge: score = g(a) - g(b), so its win rate is the gold win rate, and both orders agree
    assert end["val/judge_win_rate"] == pytest.approx(end["val/win_rate"]) and end["val/judge_agreement"] == 1.0
    assert "val/gold_reward" in end


def test_evaluation_uses_a_preference_model_judge_and_a_pairwise_reward_without_gold(sft_dir, preference_dir,
                                                                                      tmp_path):
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "modules.rewards.PreferenceModel",
                                                                 "init_args": {"path": preference_dir}}})
    data = yaml.safe_load(Path(config).read_text())
    for cb in data["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"]["reward"] = None                       # no gold: the pairwise reward judges
            cb["init_args"]["judge"] = {"class_path": "modules.rewards.PreferenceModel",
                                        "init_args": {"path": preference_dir}}
    Path(config).write_text(yaml.safe_dump(data))
    end = evaluation(cli_main(["fit", "--config", config])).history[-1]
    assert 0 <= end["val/judge_win_rate"] <= 1 and 0 <= end["val/judge_agreement"] <= 1
    # the same model as reward and judge: the same both-order verdicts
    assert end["val/win_rate"] == pytest.approx(end["val/judge_win_rate"]) and "val/gold_reward" not in end


def test_an_async_judge_is_awaited_in_both_orders_and_as_a_pairwise_reward():
    """An `async def` judge (an API judge over an async client): `both_orders` and `score_pairs` await it and get
    the same numbers as from the same judge written synchronously (the docstring's example)."""
    from modules.rewards import score_pairs
    from tests.test_pairwise import _rollout

    table = ScoreTable({"a": 0.5, "b": 0.0, "c": 2.0, "d": 0.0}, bias=1.0)

    class AsyncJudge(PairwiseReward):
        async def __call__(self, prompts, a, b):
            return table(prompts, a, b)

    score, agree = both_orders(AsyncJudge(), ["p", "p"], ["a", "c"], ["b", "d"])
    assert score.tolist() == [0.5, 2.0] and agree.tolist() == [False, True]
    M, _, agreement = score_pairs(AsyncJudge(), _rollout(["a", "b"], 2))
    assert torch.allclose(M, torch.tensor([[0.0, 0.5], [-0.5, 0.0]])) and agreement == 0.0
