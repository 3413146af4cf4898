"""RL stage end to end: sampling masks, a tiny fit, DDP with 2 processes, exact resume."""

import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules.backbone import BackboneSpec, build_causal_lm
from modules.sampling import SamplingConfig, sample
from tests.helpers import tiny_rl_config
from train import cli_main


def test_sampling_truncates_after_the_first_eos(sft_dir, tokenizer):
    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    with torch.no_grad():   # make EOS likely so that both kinds of rows occur
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight.mean(0) + 0.02 * model.lm_head.weight.std()
    prompts = ["write a review of the cafe :", "write a review of the zoo :"] * 8
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": p, "prompt_ids": encode_prompt(tokenizer, p)}
                                                  for p in prompts])
    torch.manual_seed(0)
    roll = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                  SamplingConfig(max_new_tokens=12), num_samples=2)
    assert len(roll) == 32 and roll.prompts[:2] == [prompts[0]] * 2
    resp, mask, eos = roll.response_ids, roll.response_mask, tokenizer.eos_token_id
    assert 0 < roll.has_eos.sum() < len(roll)
    for i in range(len(roll)):
        n = int(mask[i].sum())
        if roll.has_eos[i]:
            assert resp[i, n - 1] == eos and (resp[i, : n - 1] != eos).all()   # mask ends at the first EOS
        else:
            assert n == resp.shape[1]
        assert (resp[i, n:] == tokenizer.pad_token_id).all()                 # everything after is padding
        assert roll.responses[i] == tokenizer.decode(resp[i, : n], skip_special_tokens=True).strip()
    assert torch.equal(roll.attention_mask[:, roll.prompt_length:], mask)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_tiny_rl_fit_changes_the_policy_and_not_the_reference(tmp_path, sft_dir):
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir)])
    module = cli.model
    initial = build_causal_lm(BackboneSpec(pretrained=sft_dir), module.tokenizer).state_dict()
    policy, reference = module.policy.state_dict(), module.reference.state_dict()
    assert any(not torch.equal(policy[k], initial[k]) for k in initial)
    assert all(torch.equal(reference[k], initial[k]) for k in initial)
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/clipfrac", "train/ratio_mean", "train/kl", "train/reward", "perf/rollout_s",
                "perf/update_s", "perf/score_s", "perf/tokens_per_s"):
        assert key in metrics, key
    assert cli.trainer.global_step == 4 * 2 * 2  # 4 rollouts x 2 epochs x 2 minibatches
    frontier = next((tmp_path / "runs").rglob("frontier.csv")).read_text().splitlines()
    assert "val/kl" in frontier[0] and "val/win_rate" in frontier[0] and len(frontier) == 2


@pytest.mark.slow
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, sft_dir):
    straight = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="a.yaml", max_epochs=2)])
    first = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="b.yaml", max_epochs=1)])
    ckpt = str(tmp_path / "half.ckpt")
    first.trainer.save_checkpoint(ckpt)
    resumed = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="c.yaml", max_epochs=2),
                        "--ckpt_path", ckpt])
    a, c = params(straight.model), params(resumed.model)
    assert straight.trainer.global_step == resumed.trainer.global_step == 32
    assert any(not torch.equal(a[k], params(first.model)[k]) for k in a)  # the second half did something
    for key in a:
        assert torch.equal(a[key], c[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["p3o_v1", "ppo", "dpo", "rloo", "grpo"])
def test_every_objective_trains_in_the_same_module(tmp_path, sft_dir, name):
    config = tiny_rl_config(tmp_path, sft_dir, source=f"configs/quickstart/{name}.yaml")
    args = ["fit", "--config", config]
    if name == "ppo":
        args.append(f"--model.init_args.value_model.pretrained={sft_dir}")  # no reward export here
    cli = cli_main(args)
    initial = build_causal_lm(BackboneSpec(pretrained=sft_dir), cli.model.tokenizer).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in cli.model.policy.state_dict().items())
    assert "train/loss" in cli.trainer.callback_metrics
    k = cli.model.objective.responses_per_prompt
    assert cli.trainer.callbacks[0].samples == 16 * k   # 16 prompts, k responses each
    if name == "ppo":
        assert "train/vf_loss" in cli.trainer.callback_metrics and cli.model.value is not None


def test_rl_logprobs_are_zero_after_each_response_so_ratios_and_kl_stay_finite(sft_dir, tokenizer):
    """`RLModule.logprobs` returns the forward's logprobs on response tokens and exactly 0 after each response
    (as the sampler records pi_old), with no gradient there. Why it matters: two pad-position logprobs 200 nats
    apart make GRPO's k3 KL exp(200) = inf there, and inf x mask 0 = NaN in the loss; with 0 on both sides the
    KL there is 0 and the loss is finite."""
    from modules.batch import ObjectiveInput
    from modules.forward import response_logprobs
    from modules.objectives.grpo import GRPO
    from modules.rl import RLModule

    module = RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=lambda p, r: [0.0] * len(p), objective=GRPO(k=2))
    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                 for t in ["write a review of the cafe :"]])
    torch.manual_seed(0)
    roll = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                  SamplingConfig(max_new_tokens=6), num_samples=2)
    roll.response_mask[0, 2:] = 0                                  # as if response 0 had stopped after 2 tokens
    roll.attention_mask[0, roll.prompt_length + 2:] = 0
    logp = module.logprobs(model, roll)
    full = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length)
    mask = roll.response_mask.bool()
    assert torch.equal(logp[~mask], torch.zeros((~mask).sum().item()))
    assert torch.allclose(logp[mask], full[mask], atol=1e-5)
    logp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    rewards, L = torch.tensor([1.0, 0.0]), mask.shape[1]
    pads = lambda value: torch.where(mask, torch.zeros(2, L), torch.full((2, L), value))   # noqa: E731
    grpo = GRPO(k=2)
    for ref, finite in ((pads(0.0), True), (pads(200.0), False)):
        batch_in = ObjectiveInput(logp=torch.zeros(2, L), old_logp=torch.zeros(2, L), ref_logp=ref,
                                  mask=roll.response_mask, rewards=rewards, group_size=2)
        batch_in.extra = grpo.prepare(batch_in)
        assert bool(torch.isfinite(grpo(batch_in).loss)) == finite


def test_p3o_trains_with_activation_checkpointing_and_lora(tmp_path, sft_dir):
    """The backbone option end to end: LoRA adapters change, the frozen base and the reference (adapters off) do not."""
    config = tiny_rl_config(tmp_path, sft_dir, model={"policy": {"pretrained": sft_dir, "lora": {"r": 4},
                                                                 "activation_checkpointing": True}})
    cli = cli_main(["fit", "--config", config, "--trainer.limit_train_batches=2"])
    policy = cli.model.policy
    assert policy.get_base_model().model.layers[0].gradient_checkpointing
    initial = build_causal_lm(BackboneSpec(pretrained=sft_dir, lora={"r": 4}), cli.model.tokenizer).state_dict()
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, initial[k])}
    assert changed and all("lora_" in k for k in changed)
