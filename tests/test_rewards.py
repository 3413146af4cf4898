"""modules/rewards.py: what a reward returns is checked (one finite number per response, or the run stops naming
the reward), and non-finite rewards are replaced by the chosen penalty and counted."""
import re
from pathlib import Path

import pytest
import torch

from datamodules.collate import encode_prompt, pad
from modules.backbone import BackboneSpec
from modules.batch import Rollout
from modules.rewards import RewardError, check
from tests.helpers import tiny_rl_config
from train import cli_main


def rollout_of(n: int) -> Rollout:
    return Rollout(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3, dtype=torch.long),
                   response_mask=torch.ones(n, 1, dtype=torch.long), prompt_length=2, group_size=2,
                   prompts=[f"prompt {i}" for i in range(n)], responses=[f"response {i}" for i in range(n)],
                   has_eos=torch.ones(n, dtype=torch.bool))


class Scorer:
    pass


@pytest.mark.parametrize("values, message", [
    ([0.1, float("nan"), 0.3, float("inf")], r"reward \S*Scorer returned nan for response 1 of 4 \(prompt 'prompt 1', "
                                             r"response 'response 1'\) and 1 more non-finite"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], r"returned 5 values for 4 responses; expected one number per response"),
    ([0.1, 0.2, 0.3], r"returned 3 values for 4 responses"),
    ([[0.1], [0.2], [0.3], [0.4]], r"returned shape \(4, 1\) for 4 responses"),
    (["good", "bad", "ok", "fine"], r"not a sequence of numbers"),
])
def test_reward_check_rejects_what_is_not_one_finite_number_per_response(values, message):
    with pytest.raises(RewardError, match=message):
        check(values, Scorer(), rollout_of(4))


def test_reward_check_replaces_non_finite_rewards_by_the_chosen_penalty():
    rewards, replaced = check([0.1, float("nan"), float("-inf"), 0.4], Scorer(), rollout_of(4), nonfinite=-2.0)
    assert replaced == 2 and torch.equal(rewards, torch.tensor([0.1, -2.0, -2.0, 0.4]))


@pytest.mark.parametrize("mode, message", [("nan", "returned nan for response 1"), ("inf", "returned inf"),
                                           ("extra", "returned 9 values for 8 responses"),
                                           ("short", "returned 7 values for 8 responses")])
@pytest.mark.slow
def test_a_bad_reward_callable_stops_the_run_before_any_update(tmp_path, sft_dir, mode, message):
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "tests.helpers.BadReward",
                                                                 "init_args": {"mode": mode}}})
    with pytest.raises(RewardError, match="tests.helpers.BadReward " + message):
        cli_main(["fit", "--config", config])


def test_nonfinite_reward_penalty_is_applied_and_counted(tmp_path, sft_dir):
    config = tiny_rl_config(tmp_path, sft_dir, model={"nonfinite_reward": -1.0, "reward": {
        "class_path": "tests.helpers.BadReward", "init_args": {"mode": "nan"}}})
    cli = cli_main(["fit", "--config", config])
    assert cli.trainer.callback_metrics["train/nonfinite_rewards"] == 1.0   # one per rollout (response 1)
    assert all(torch.isfinite(p).all() for p in cli.model.policy.parameters())


def _scalars(root, tag: str) -> list[float]:
    """The values of `tag` in the one TensorBoard run under `root`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = {path.parent for path in Path(root).rglob("events.out.tfevents*")}
    events = EventAccumulator(str(run))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.slow
def test_under_two_processes_each_warning_is_said_once_counting_every_process(tmp_path, sft_dir):
    """DDP on 2 CPU processes: every process reads the config and the data and builds the models, and each scores
    its own rollouts. A config warning and the evaluation's left-out prompts are said once; the non-finite rewards
    replaced are summed over both processes, in the warning (said once) and in `train/nonfinite_rewards`.
    `BadReward` makes response 1 of each call NaN: per rollout one on each process, 2 of 2 x 4 prompts x K = 2
    responses; at the evaluation (7 prompts: 3 per process, one sample each) 2 of 6. Before: every line twice, each
    with its own process's count (1 of 8)."""
    from tests.helpers import run_train

    config = tiny_rl_config(tmp_path, sft_dir, evaluation={"num_prompts": 7}, devices=2, strategy="ddp",
                            model={"nonfinite_reward": -1.0, "minibatch_groups": 99,
                                   "reward": {"class_path": "tests.helpers.BadReward", "init_args": {"mode": "nan"}}})
    err = run_train(config).stderr
    assert err.count("minibatch_groups=99 is more than the 4 prompts") == 1, err[-3000:]
    assert err.count("Evaluation: 7 prompts over 2 processes; the last 1 are left out") == 1
    replaced = re.findall(r"rewards were NaN or inf", err)
    assert err.count("2 of 16 rewards were NaN or inf") == 2 and err.count("2 of 6 rewards were NaN or inf") == 1
    assert len(replaced) == 3, err[-3000:]
    logged = _scalars(tmp_path / "runs", "train/nonfinite_rewards")
    assert logged == [2.0, 2.0], logged


def test_a_frozen_model_is_built_once_frozen_and_runs_its_batches_in_order(reward_dir):
    """`FrozenModel` (here a `RewardModel`): nothing is built until `model` (or `configure`) is used, then once, frozen
    and in eval mode whatever `train()` asks; `batched` over 5 rows, 2 per forward, calls forward(0, 2),
    forward(2, 4), forward(4, 5) and concatenates their numbers (the docstring's example; unsharded: no extra
    forward)."""
    from modules.rewards import RewardModel

    reward = RewardModel(reward_dir, normalize=False)
    assert "model" not in reward._modules and not list(reward.parameters())
    model = reward.model
    assert reward.model is model and not model.training and not any(p.requires_grad for p in reward.parameters())
    assert not reward.train().model.training
    calls = []
    out = reward.batched(5, 2, lambda a, b: calls.append((a, b)) or list(range(a, b)))
    assert calls == [(0, 2), (2, 4), (4, 5)] and out == [0, 1, 2, 3, 4]
    assert reward.batched(0, 2, lambda a, b: calls.append((a, b))) == [] and len(calls) == 3


def test_a_reward_model_path_that_holds_no_scorer_is_refused(sft_dir, preference_dir, reward_dir):
    """An SFT export (a causal LM) as the reward: before, a fresh random score head scored the rollouts and the run
    trained on noise (with `normalize: false`; with normalize, it stopped on the missing statistics). A preference
    model's head scores pairs: it is named, with the class that reads it."""
    from modules.rewards import RewardModel

    with pytest.raises(ValueError, match=rf"^RewardModel: {sft_dir} holds a LlamaForCausalLM, not a scorer"):
        RewardModel(sft_dir, normalize=False)
    with pytest.raises(ValueError, match=r"is a pairwise preference-model export; use modules.rewards.PreferenceModel"):
        RewardModel(preference_dir, normalize=False)
    RewardModel(reward_dir, normalize=False)


@pytest.mark.parametrize("stats, message", [
    ('{"mean": 0.1, "std": NaN}', "std is nan; expected a finite number > 0"),
    ('{"mean": 0.1, "std": 0}', "std is 0; expected a finite number > 0"),
    ('{"std": 1.0}', "mean is None; expected a finite number"),
    ('{"mean": 0.1, "std"', "not readable as JSON"),
], ids=["nan_std", "zero_std", "no_mean", "broken"])
def test_an_export_whose_scale_is_not_a_number_is_refused_naming_the_file(reward_dir, tmp_path, stats, message):
    """Before: a reward-stage export calibrated on one prompt stored std NaN (the std of one score), and every
    reward of the RL run became NaN; a file without `mean` or with broken JSON stopped it with a KeyError /
    JSONDecodeError traceback. Now the file and the field, in one line (`read_scale`). The quickstart reward
    export itself reads as written."""
    import shutil

    from modules.rewards import RewardModel, read_scale

    assert set(read_scale(f"{reward_dir}/reward_stats.json", ("mean", "std"))) == {"mean", "std"}
    shutil.copytree(reward_dir, tmp_path / "reward")
    (tmp_path / "reward" / "reward_stats.json").write_text(stats)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/reward/reward_stats.json: {re.escape(message)}"):
        RewardModel(str(tmp_path / "reward"))


async def async_length(prompts, responses):
    """An `async def` reward (TRL's async reward functions): the length of each response."""
    import asyncio

    await asyncio.sleep(0)
    return [float(len(r)) for r in responses]


class AsyncClient:
    """An async reward holding state bound to an event loop (as an HTTP session is): it records the loop of each
    call."""

    def __init__(self):
        self.loops = []

    async def __call__(self, prompts, responses):
        import asyncio

        self.loops.append(asyncio.get_running_loop())
        return [1.0] * len(responses)


def test_an_async_reward_is_awaited_on_one_loop_that_outlives_each_call():
    from modules.rewards import score

    rewards, _ = score(async_length, rollout_of(2), tokenizer=None)
    assert rewards.tolist() == [10.0, 10.0]                  # "response 0"
    client = AsyncClient()
    for _ in range(2):
        score(client, rollout_of(2), tokenizer=None)
    assert client.loops[0] is client.loops[1] and not client.loops[0].is_closed()


def test_async_terms_of_a_composed_reward_run_concurrently():
    """Each term waits (up to 10 s) for the other to have started: awaited one after the other, the first would
    time out; together, both finish at once."""
    import asyncio

    from modules.rewards import Composed, score

    started = {}

    def term(me: str, other: str):
        async def reward(prompts, responses):
            started.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(started.setdefault(other, asyncio.Event()).wait(), timeout=10)
            return [1.0] * len(responses)
        return reward

    rewards, _ = score(Composed({"a": term("a", "b"), "b": term("b", "a")}), rollout_of(2), tokenizer=None)
    assert rewards.tolist() == [2.0, 2.0]


class AsyncLength:
    """`async_length` as a class (an evaluation reward is given by class_path)."""

    async def __call__(self, prompts, responses):
        return await async_length(prompts, responses)


def test_an_async_reward_trains_end_to_end_as_the_evaluation_reward_too(tmp_path, sft_dir):
    config_path = tiny_rl_config(tmp_path, sft_dir, model={"reward": {"class_path": "tests.test_rewards.AsyncClient"}},
                                 evaluation={"reward": {"class_path": "tests.test_rewards.AsyncLength"}})
    cli = cli_main(["fit", "--config", config_path])
    assert cli.trainer.callback_metrics["train/reward"] == 1.0
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation").history[-1]
    assert evaluation["val/gold_reward"] > 0


def test_a_reward_model_from_elsewhere_reads_the_conversation_through_its_own_chat_template(reward_dir, sft_dir,
                                                                                         tmp_path):
    """A reward model without the reward stage's `reward_stats.json` (one trained elsewhere) is scored as TRL's
    GRPOTrainer scores one (`scoring: chat_template`): its own chat template over [user prompt, assistant
    response] as text, tokenized without added special tokens, read at the last token, one response at a time
    here as TRL's code reads it. The reward stage's export (and `scoring: tokens`) keeps prompt ids + response ids
    + EOS, where this template's trailing "." would be missing: the numbers differ. A bad value is one line."""
    import shutil

    from modules.backbone import build_causal_lm, load_tokenizer
    from modules.rewards import RewardModel
    from modules.sampling import SamplingConfig, sample

    other = tmp_path / "elsewhere"
    shutil.copytree(reward_dir, other)
    (other / "reward_stats.json").unlink()
    tokenizer = load_tokenizer(str(other))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + ' . ' }}{% endfor %}"
    tokenizer.save_pretrained(str(other))
    reward = RewardModel(str(other), normalize=False)
    assert reward.scoring == "chat_template" and RewardModel(reward_dir).scoring == "tokens"

    policy_tokenizer = load_tokenizer(sft_dir)
    policy = build_causal_lm(BackboneSpec(pretrained=sft_dir), policy_tokenizer)
    prompts = ["write a review of the cafe :", "write a review of the park :"]
    ids, mask = pad([encode_prompt(policy_tokenizer, p) for p in prompts], policy_tokenizer.pad_token_id, "left")
    roll = sample(policy, policy_tokenizer, ids, mask, prompts, SamplingConfig(max_new_tokens=6), num_samples=2)
    trl = []
    for prompt, response in zip(roll.prompts, roll.responses):        # TRL 1.16 grpo_trainer.py, _calculate_rewards
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        inputs = tokenizer(text=[text], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        trl.append(reward.model(**inputs).logits[0, 0].item())
    assert torch.allclose(reward.score(roll, policy_tokenizer), torch.tensor(trl), atol=1e-5)
    tokens = RewardModel(str(other), normalize=False, scoring="tokens").score(roll, policy_tokenizer)
    assert not torch.allclose(tokens, torch.tensor(trl), atol=1e-3)
    strict = RewardModel(str(other), normalize=False)
    strict.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RewardError, match=r"^RewardModel \(.*elsewhere\): its chat template cannot write response 0's "
                                          r"conversation \(TemplateError: roles must alternate\); set scoring: tokens$"):
        strict.score(roll, policy_tokenizer)
    with pytest.raises(ValueError, match=r"^RewardModel: scoring='chat'; expected 'tokens' \(as the reward stage trains\), "
                                         r"'chat_template' \(the model's own chat template, as TRL scores\) or null"):
        RewardModel(str(other), normalize=False, scoring="chat")
