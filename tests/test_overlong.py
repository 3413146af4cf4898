"""Responses cut off at the length limit: `RLModule(mask_truncated)` (DAPO's overlong filtering, TRL's
`mask_truncated_completions`), `modules.verifiable.OverlongPenalty` (DAPO's soft overlong punishment), and the
`completion_ids` a reward may take (TRL's name for the responses' token ids)."""
import pytest
import torch

from modules.batch import ObjectiveInput, Rollout
from modules.objectives.dpo import OnlineDPO
from modules.objectives.grpo import GRPO
from modules.objectives.p3o import P3O
from modules.objectives.ppo import PPO
from modules.objectives.rloo import RLOO
from modules.rewards import Composed, DifferenceOf, RewardError, call_text_reward, score
from modules.verifiable import AnswerMatch, OverlongPenalty
from tests.helpers import tiny_rl_config
from tests.test_microbatch import _same_update, rollout_module
from train import cli_main


def test_loss_mask_is_the_response_mask_less_the_rows_not_trained():
    """`ObjectiveInput.loss_mask`'s example: mask [[1, 1, 0], [1, 1, 1]], trained [True, False]."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch = ObjectiveInput(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3), mask=mask,
                           rewards=torch.zeros(2), group_size=2, trained=torch.tensor([True, False]))
    assert batch.loss_mask().tolist() == [[1, 1, 0], [0, 0, 0]]
    batch.trained = None
    assert batch.loss_mask() is mask


def test_overlong_penalty_is_dapos_soft_punishment():
    """The docstring's example, L = 100, B = 20: lengths 80 -> 0, 90 -> -0.5, 95 -> -0.75, 100 -> -1, 101 -> -1;
    B = 0: 0 up to L, -1 beyond; bad settings are one line."""
    lengths = [1, 80, 81, 90, 95, 100, 101, 150]
    ids = [[5] * n for n in lengths]
    assert OverlongPenalty(100, 20)(["p"] * 8, ["r"] * 8, ids) == [0.0, 0.0, -0.05, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert OverlongPenalty(100, 0)(["p"] * 8, ["r"] * 8, ids) == [0.0] * 6 + [-1.0, -1.0]
    for bad in [(0, 0), (10, 11), (10, -1)]:
        with pytest.raises(ValueError, match=r"OverlongPenalty: max_tokens=.*expected max_tokens >= 1 and 0 <= buffer"):
            OverlongPenalty(*bad)


def test_overlong_penalty_equals_trls():
    rewards = pytest.importorskip("trl.rewards")
    ids = [[3] * n for n in range(1, 40)]
    for L, B in [(32, 8), (32, 0), (20, 20)]:
        assert OverlongPenalty(L, B)([""] * len(ids), [""] * len(ids), ids) == \
            rewards.get_soft_overlong_punishment(L, B)(completion_ids=ids)


EOS = 9


def rollout_with_ids() -> Rollout:
    """Two prompts x 2 responses of up to 4 tokens (prompt length 2): rows end at their first EOS (9), or not at all
    (row 3: cut off). completion_ids: [[4, 9], [5, 6, 7, 9], [8, 9], [1, 2, 3, 4]]."""
    response = torch.tensor([[4, EOS, 0, 0], [5, 6, 7, EOS], [8, EOS, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.cat([torch.ones(4, 2, dtype=torch.long), response], 1)
    return Rollout(ids, torch.cat([torch.ones(4, 2, dtype=torch.long), mask], 1), mask, prompt_length=2,
                   group_size=2, prompts=["a", "a", "b", "b"], responses=["x", "xyz", "y", "wxyz"],
                   has_eos=torch.tensor([True, True, True, False]), fields={"answer": ["1", "1", "2", "2"]})


def test_a_reward_gets_the_responses_token_ids_up_to_their_eos():
    """`Rollout.completion_ids` (EOS included, nothing after it), given as `completion_ids=` to our rewards that
    name it, to TRL-style functions (TRL passes it to every reward function: `**kwargs`, or by name), and by a
    `Composed` reward to its terms; never to one that does not take it."""
    roll = rollout_with_ids()
    assert roll.completion_ids() == [[4, 9], [5, 6, 7, 9], [8, 9], [1, 2, 3, 4]]
    seen = {}

    def trl_length(completion_ids, **kwargs):                       # TRL's signature for a length reward
        seen["trl_length"] = kwargs
        return [float(len(ids)) for ids in completion_ids]

    def trl_accuracy(completions, answer, **kwargs):               # TRL's signature: gets the ids in kwargs
        seen["trl_accuracy"] = kwargs["completion_ids"]
        return [1.0] * len(completions)

    def ours(prompts, responses, **fields):                        # ours: fields only, no ids
        seen["ours"] = fields
        return [0.0] * len(responses)

    assert score(trl_length, roll, None)[0].tolist() == [2.0, 4.0, 2.0, 4.0]
    assert set(seen["trl_length"]) == {"prompts", "completions", "answer"}
    score(trl_accuracy, roll, None)
    assert seen["trl_accuracy"] == roll.completion_ids()
    score(ours, roll, None)
    assert seen["ours"] == {"answer": ["1", "1", "2", "2"]}
    composed = Composed({"correct": AnswerMatch(field="answer"), "length": OverlongPenalty(4, 2), "trl": trl_length},
                        weights={"correct": 0.0, "trl": 0.0})
    assert score(composed, roll, None)[0].tolist() == [0.0, -1.0, 0.0, -1.0]
    assert roll.reward_terms["length"].tolist() == [0.0, -1.0, 0.0, -1.0]
    assert composed(roll.prompts, roll.responses, completion_ids=[[1], [1, 2, 3], [1], []], answer=["1"] * 4) == \
        [0.0, -0.5, 0.0, 0.0]


def test_a_reward_that_needs_token_ids_where_there_are_none_is_one_line():
    """A pairwise reward calls its scalar reward with texts alone; a reward that requires the ids says so."""
    with pytest.raises(RewardError, match=r"^reward modules.verifiable.OverlongPenalty takes completion_ids \(the "
                                          r"responses' token ids\), which its caller does not have"):
        DifferenceOf(OverlongPenalty(4, 2))(["p"], ["a"], ["b"])
    assert call_text_reward(lambda prompts, responses, completion_ids=None: [completion_ids is None], ["p"], ["a"],
                            {}) == [True]


@pytest.mark.parametrize("name", ["completion_ids", "trainer_state"])
def test_completion_ids_and_trainer_state_are_not_record_field_names(name):
    from datamodules.pairs import PairDataModule
    from datamodules.sources import LocalFiles

    with pytest.raises(ValueError, match=rf"reward_fields=\['{name}'\]; expected distinct names other than"):
        PairDataModule(LocalFiles("unused.jsonl"), tokenizer="unused", reward_fields=[name])


def objective(name: str):
    return {"p3o-k2": P3O, "p3o-k4": lambda: P3O(k=4), "p3o-tokenwise": lambda: P3O(k=4, avg_tokenwise=True),
            "dpo": OnlineDPO, "rloo-k4": lambda: RLOO(k=4), "ppo": lambda: PPO(kl_estimator="k3"),
            "grpo": lambda: GRPO(k=4), "grpo-dapo": lambda: GRPO(k=4, loss_type="dapo"),
            "grpo-bnpo": lambda: GRPO(k=2, loss_type="bnpo"), "grpo-dr": lambda: GRPO(k=4, loss_type="dr_grpo"),
            "gspo": lambda: GRPO(k=4, importance_sampling_level="sequence"),
            "grpo-cispo": lambda: GRPO(k=4, loss_type="cispo", cispo_max=1.02),
            "grpo-sapo": lambda: GRPO(k=2, loss_type="sapo"),
            "grpo-luspo": lambda: GRPO(k=4, loss_type="luspo", importance_sampling_level="sequence"),
            "grpo-vespo": lambda: GRPO(k=4, loss_type="vespo")}[name]()


def module_with_truncated(sft_dir, tokenizer, name: str):
    """A real rollout of 6 prompts; every third response counted as cut off (`has_eos` False), so each group
    has responses on both sides."""
    made = objective(name)
    module, roll = rollout_module(sft_dir, tokenizer, "ppo" if name == "ppo" else "p3o", made.responses_per_prompt,
                                  share_prompts=True, lora=False, perturb=False)
    module.objective = made
    if name == "ppo":
        made.responses_per_prompt = 2
    roll.has_eos = torch.arange(len(roll)) % 3 != 1
    return module, roll


def gradients(module, roll, mask_truncated: bool, reference_mask: torch.Tensor | None = None):
    """(loss, d loss / d logp, d loss / d values or None) at a fixed logp near pi_old. `reference_mask`: the
    objective alone on a batch whose mask is that (TRL's way: the cut-off rows' mask zeroed), option off."""
    module.mask_truncated = mask_truncated
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    generator = torch.Generator().manual_seed(0)
    logp = (roll.old_logp + 0.05 * torch.randn(roll.old_logp.shape, generator=generator) * roll.response_mask)
    logp.requires_grad_()
    values = torch.randn(roll.response_mask.shape, generator=generator).requires_grad_() if module.value else None
    trained = module.trained_rows(roll)
    counted = roll.response_mask if trained is None else roll.response_mask * trained[:, None]
    batch = module.objective_input(roll, logp, extra, values, float(counted.sum()))
    if reference_mask is not None:
        batch.mask, batch.tokens_per_rank = reference_mask, float(reference_mask.sum())
    out = module.objective(batch)
    grads = torch.autograd.grad(out.loss, [logp] + ([values] if values is not None else []))
    return out.loss.detach(), grads[0], grads[1] if values is not None else None


NAMES = ["p3o-k2", "p3o-k4", "p3o-tokenwise", "dpo", "rloo-k4", "ppo", "grpo", "grpo-dapo", "grpo-bnpo", "grpo-dr",
         "gspo", "grpo-cispo", "grpo-sapo", "grpo-luspo", "grpo-vespo"]


@pytest.mark.parametrize("name", NAMES)
def test_cut_off_responses_carry_no_gradient_and_the_rest_train_as_without_the_option(sft_dir, tokenizer, name):
    """With `mask_truncated`, no gradient reaches a cut-off response's logprobs (or PPO's values) and every other
    number is as without the option: P3O, online DPO and RLOO (means over pairs and responses) give the same loss
    and the same gradient on the other rows; the token-level means and counts leave the cut-off tokens out, so PPO's
    and P3O-tokenwise's gradients are those without the option times (all tokens / kept tokens), and GRPO's (every
    loss type, GSPO too) equal TRL's `mask_truncated_completions`: the objective with the cut-off rows' mask zeroed
    (and DAPO's token count over the rest)."""
    module, roll = module_with_truncated(sft_dir, tokenizer, name)
    cut = ~roll.has_eos
    loss, grad, value_grad = gradients(module, roll, mask_truncated=True)
    assert grad[cut].abs().max() == 0 and grad[~cut].abs().max() > 0
    if value_grad is not None:
        assert value_grad[cut].abs().max() == 0 and value_grad[~cut].abs().max() > 0
    kept = roll.response_mask * roll.has_eos[:, None]
    if name.startswith(("grpo", "gspo")):
        _, expected, _ = gradients(module, roll, mask_truncated=False, reference_mask=kept)
        assert torch.allclose(grad, expected, atol=1e-7, rtol=1e-5)
        return
    plain_loss, plain, plain_value = gradients(module, roll, mask_truncated=False)
    scale = float(roll.response_mask.sum() / kept.sum()) if name in ("ppo", "p3o-tokenwise") else 1.0
    assert torch.allclose(grad[~cut], scale * plain[~cut], atol=1e-7, rtol=1e-5)
    if value_grad is not None:
        assert torch.allclose(value_grad[~cut], scale * plain_value[~cut], atol=1e-7, rtol=1e-5)
    if scale == 1.0:
        assert torch.allclose(loss, plain_loss, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["p3o-k4", "ppo", "grpo-dapo"])
def test_an_update_that_masks_cut_off_responses_is_exact_in_micro_batches(sft_dir, tokenizer, name):
    module, roll = module_with_truncated(sft_dir, tokenizer, name)
    module.mask_truncated = True
    with torch.no_grad():          # (the policy away from pi_old: ratios and clipping are not trivial)
        for p in module.policy.parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    _same_update(module, roll)


@pytest.mark.parametrize("name", ["p3o-k2", "ppo", "grpo-dapo", "grpo-bnpo"])
def test_a_minibatch_of_cut_off_responses_alone_is_a_finite_step_with_no_gradient(sft_dir, tokenizer, name):
    """Early in a run every response may hit the limit: the loss is finite (0 for GRPO's token means; no division by
    a zero token count), the backward runs (every rank must take it), and every gradient is 0."""
    module, roll = module_with_truncated(sft_dir, tokenizer, name)
    roll.has_eos = torch.zeros(len(roll), dtype=torch.bool)
    module.mask_truncated = True
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    out = module.backward_minibatch(roll, extra, 0.0, "test")
    assert torch.isfinite(out.loss)
    grads = [p.grad for m in (module.policy, module.value) if m is not None for p in m.parameters()]
    assert grads and all(g is None or g.abs().max() == 0 for g in grads)


def test_a_run_that_masks_cut_off_responses_and_penalises_length_end_to_end(tmp_path, sft_dir):
    """P3O with `mask_truncated` on a composed reward with DAPO's overlong penalty (fed the sampled token ids), and
    the overlong penalty as the evaluation reward: trains on the responses that end, and logs the term."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from tests.test_judges import evaluation
    from train import cli_main

    penalty = {"class_path": "modules.verifiable.OverlongPenalty", "init_args": {"max_tokens": 40, "buffer": 16}}
    reward = {"class_path": "modules.rewards.Composed", "init_args": {"rewards": {
        "gold": {"class_path": "datamodules.task.GoldReward"}, "length": penalty}}}
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": reward, "mask_truncated": True,
                                                      "sampling": {"max_new_tokens": 40}},
                            evaluation={"reward": penalty})
    cli = cli_main(["fit", "--config", config, "--trainer.limit_train_batches=2"])
    metrics = cli.trainer.callback_metrics
    assert cli.model.mask_truncated and -1.0 <= float(metrics["train/reward_length"]) <= 0.0
    assert 0.0 < float(metrics["train/eos_rate"]) < 1.0 and torch.isfinite(metrics["train/loss"])
    assert -1.0 <= evaluation(cli).history[-1]["val/gold_reward"] <= 0.0
    initial = build_causal_lm(BackboneSpec(pretrained=sft_dir), cli.model.tokenizer).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in cli.model.policy.state_dict().items())


def test_a_rollout_cut_off_everywhere_is_said_once(sft_dir, tokenizer, caplog):
    """With `mask_truncated`, a rollout whose every response hit the limit trains on nothing: one warning per run
    (not one per rollout), none when a response ended."""
    module, roll = module_with_truncated(sft_dir, tokenizer, "p3o-k2")
    module.mask_truncated = True
    with caplog.at_level("WARNING", logger="modules.rl"):
        module.warn_if_all_cut_off(roll)
        assert not caplog.records
        roll.has_eos = torch.zeros(len(roll), dtype=torch.bool)
        module.warn_if_all_cut_off(roll)
        module.warn_if_all_cut_off(roll)
    assert len(caplog.records) == 1
    assert "mask_truncated: every response of rollout 0 reached sampling.max_new_tokens=8 before EOS" in caplog.text


def test_a_trl_reward_that_requires_trls_trainer_arguments_is_told_what_is_passed():
    """A TRL reward requiring `environments` (TRL's tool environments) is not taken for a record field ("set
    data.init_args.reward_fields: [environments]"); called where no tools environment gives them, it is one line
    (with one: tests/test_environments.py; `log_metric`, `log_extra`: tests/test_trl_arguments.py).
    `trainer_state` is passed (TRL's progress, `lightning_state`): inside the stages' scoring (`trainer_state(...)`) a
    reward naming it, or TRL-style with `**kwargs`, gets it; called outside, one that requires it is one line, one
    with a default gets None; a reward of ours with `**fields` never gets it."""
    from modules.rewards import check_fields, trainer_state

    def logging_reward(completions, environments, **kwargs):
        return [0.0] * len(completions)

    def curriculum(completions, trainer_state, **kwargs):
        return [float(trainer_state.global_step)] * len(completions)

    def tolerant(completions, trainer_state=None, **kwargs):
        return [float(trainer_state is None)] * len(completions)

    def trl_kwargs(completions, **kwargs):
        return [float(kwargs["trainer_state"].global_step)] * len(completions)

    def ours(prompts, responses, **fields):
        assert "trainer_state" not in fields
        return [0.0] * len(responses)

    check_fields(logging_reward, [])
    with pytest.raises(RewardError, match=r"takes environments \(TRL's: each response's environment instance\), which "
                                          r"only generation with a tools environment gives"):
        call_text_reward(logging_reward, ["p"], ["r"], {})
    check_fields(curriculum, [])
    with pytest.raises(RewardError, match=r"takes trainer_state \(TRL's: the training's progress\), which only the RL "
                                          r"module's scoring and the evaluation give"):
        call_text_reward(curriculum, ["p"], ["r"], {})
    assert call_text_reward(tolerant, ["p"], ["r"], {}) == [1.0]
    from transformers import TrainerState

    with trainer_state(TrainerState(global_step=7)):
        assert call_text_reward(curriculum, ["p"], ["r"], {}) == [7.0]
        assert call_text_reward(trl_kwargs, ["p"], ["r"], {}) == [7.0]
        assert call_text_reward(tolerant, ["p"], ["r"], {}) == [0.0]
        assert call_text_reward(ours, ["p"], ["r"], {}) == [0.0]


def test_a_trl_reward_gets_the_trainer_state_in_training_and_evaluation(tmp_path, sft_dir):
    """The tiny run, 4 rollouts of 4 optimizer steps (2 epochs x 2 minibatches) with `progress_reward` as the RL
    reward and the evaluation's (6 prompts): each rollout's scoring sees the steps before it (0, 4, 8, 12), the run's
    16 and the fractional epoch (0, 0.25, 0.5, 0.75); the evaluation at the end (its samples, the reference's, the
    demonstrations) sees 16 steps of 16, epoch 1."""
    from tests.helpers import SEEN_STATES

    SEEN_STATES.clear()
    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": "tests.helpers.progress_reward"},
                            evaluation={"reward": "tests.helpers.progress_reward", "num_prompts": 6})
    cli_main(["fit", "--config", config])
    assert {"training", "evaluation"} == {where for where, *_ in SEEN_STATES}, SEEN_STATES
    training = [state for where, *state in SEEN_STATES if where == "training"]
    assert training == [[0, 16, 0.0], [4, 16, 0.25], [8, 16, 0.5], [12, 16, 0.75]], SEEN_STATES
    evaluation = [state for where, *state in SEEN_STATES if where == "evaluation"]
    assert evaluation and all(state == [16, 16, 1.0] for state in evaluation), SEEN_STATES
