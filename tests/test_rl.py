"""modules/rl.py end to end: a tiny fit, every objective in one module, exact resume, pi_old from the sampler or a
forward pass, gradient clipping, bf16-mixed on CPU, and a non-finite update stopped before its step."""

import math

import pytest
import torch
import yaml

from datamodules.collate import PairCollator, encode_prompt
from modules.backbone import BackboneSpec, build_causal_lm
from modules.forward import response_logprobs
from modules.rl import NonFiniteError
from modules.sampling import SamplingConfig, sample
from tests.helpers import RecordRollouts, tiny_rl_config
from train import cli_main


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
                "perf/update_s", "perf/score_s", "perf/tokens_per_s", "train/entropy"):
        assert key in metrics, key
    assert 0 < metrics["train/entropy"] < math.log(len(module.tokenizer))      # nats per token, below uniform's
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation")
    assert 0 < evaluation.history[-1]["val/entropy"] < math.log(len(module.tokenizer))
    assert cli.trainer.global_step == 4 * 2 * 2  # 4 rollouts x 2 epochs x 2 minibatches
    frontier = next((tmp_path / "runs").rglob("frontier.csv")).read_text().splitlines()
    assert "val/kl" in frontier[0] and "val/win_rate" in frontier[0] and len(frontier) == 2



@pytest.mark.slow
def test_max_steps_counts_optimizer_steps_and_ends_with_the_rollout_that_reaches_it(tmp_path, sft_dir):
    """`trainer.max_steps` is Lightning's count of optimizer steps: 4 per rollout here (2 epochs x 2 minibatches), so
    5 ends after the second rollout (8 steps), never inside one; the rollouts are `limit_train_batches`."""
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, max_steps=5)])
    assert cli.trainer.global_step == 8
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.current.completed == 2

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
    """Each shipped objective trains the tiny run from its quickstart config (PPO with its value model), and no
    gradient is left allocated after the last update."""
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
    # no gradient is held after an update (it would sit through the next rollout: the policy's size again)
    assert all(p.grad is None for p in cli.model.parameters())


@pytest.mark.parametrize("options, logged", [
    ({"loss_type": "vespo", "off_policy_mask": 0.0, "kl_bias_correction": True}, ["vespo_weight_mean", "off_policy_masked"]),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, ["clipfrac"]),
    ({"loss_type": "sapo"}, []), ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, ["clipfrac"]),
], ids=["vespo-opsm-unbiased-kl", "cispo-sequence", "sapo", "luspo"])
def test_grpos_trl_options_train_end_to_end_from_a_config(tmp_path, sft_dir, options, logged):
    """TRL 1.16's GRPO options given in the config (`--config` YAML, parsed by jsonargparse against GRPO's typed
    arguments) train the tiny run on real rollouts (integer masks, micro-batches) and log their metrics."""
    config = tiny_rl_config(tmp_path, sft_dir, source="configs/quickstart/grpo.yaml",
                            model={"objective": {"init_args": options}})
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and all(f"train/{name}" in metrics for name in logged)
    assert all(getattr(cli.model.objective, k) == v for k, v in options.items() if hasattr(cli.model.objective, k))


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


@pytest.mark.slow
def test_rl_module_takes_pi_old_from_the_sampler_at_fp32_and_from_a_forward_pass_when_asked(tmp_path, sft_dir):
    """The same tiny run with old_logprobs 'sampler' (the fp32 default) and 'forward': the rollouts' pi_old agree
    within float rounding, so the first rollout's updates agree too (weights within 1e-4 after rollout 1)."""
    from tests.helpers import tiny_rl_config
    from train import cli_main

    weights = {}
    for source in ("sampler", "forward"):
        config = tiny_rl_config(tmp_path, sft_dir, name=f"{source}.yaml", model={"old_logprobs": source},
                                limit_train_batches=1)
        cli = cli_main(["fit", "--config", config])
        assert cli.model.logprobs_from_sampler == (source == "sampler")
        weights[source] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
    assert (weights["sampler"] - weights["forward"]).abs().max() < 1e-4


def test_clipping_scales_by_the_norm_the_update_computed_exactly_as_lightning_clips(tmp_path, sft_dir, monkeypatch):
    """`update` computes the gradient norm once (for the non-finite check and train/grad_norm) and clips with it
    (`clip_grads_with_norm_`); Lightning's path computes it again (`clip_grad_norm_`). With a max norm small enough
    that every step clips, one rollout through each path ends with bit-equal weights."""
    import modules.rl
    from tests.helpers import tiny_rl_config
    from train import cli_main

    weights = {}
    for path in ("direct", "lightning"):
        if path == "lightning":
            monkeypatch.setattr(modules.rl, "PLAIN_GRADIENTS", ())
        config = tiny_rl_config(tmp_path, sft_dir, name=f"{path}.yaml", model={"max_grad_norm": 1e-3},
                                limit_train_batches=1)
        cli = cli_main(["fit", "--config", config])
        assert cli.trainer.callback_metrics["train/grad_norm"] > 1e-3           # so the clipping was active
        weights[path] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
    assert torch.equal(weights["direct"], weights["lightning"])


def fit_keeping_rollouts(config: str):
    """`train.py fit --config config` in this process; (the CLI, each rollout as the updates received it)."""
    from lightning.pytorch.callbacks import LambdaCallback

    cli = cli_main(["--config", config], run=False)
    kept = []
    cli.trainer.callbacks.append(LambdaCallback(   # after OnPolicyRollout: keeps the rollout
        on_train_batch_start=lambda trainer, module, *args: kept.append(module.rollout)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, kept


def test_bf16_mixed_on_cpu_with_fused_adamw_and_clipping_keeps_logprobs_within_its_tolerance(tmp_path, sft_dir):
    """bf16 autocast on CPU (`configs/presets/bf16.yaml`; CPUs with native bf16 matmul run it faster, see the
    README's speed section) with the configs' fused AdamW and gradient clipping: Lightning's mixed-precision
    plugin refused to clip for a fused optimizer (RuntimeError) although bf16 has no loss scaler.
    Tolerance: autocast rounds every matmul's inputs to bf16 (8 significant bits: relative error <= 2^-9 ~ 0.002
    per rounding), so a logprob moves by a few times 0.002 x the size of the logits. On the tiny model (logits of
    order 1) the rollout's pi_ref logprobs differ from fp32 by a mean of 3e-4 and a max of 9e-4 nats (measured);
    we accept a mean of 3e-3 and a max of 3e-2 nats. pi_old and pi_ref come from forward passes
    under the same autocast as the update ('auto'), so the first minibatch's ratios are 1 up to the same rounding.
    The frozen reference holds its linear weights in bf16 (`modules.backbone.linears_in`), and its pi_ref equals,
    bit for bit, what the fp32 reference (the SFT export) computes under the same autocast."""
    config = tiny_rl_config(tmp_path, sft_dir, model={"optimizer": {"init_args": {"fused": True}}},
                            precision="bf16-mixed", limit_train_batches=1)
    cli, kept = fit_keeping_rollouts(config)
    model, roll = cli.model, kept[0]
    assert not model.logprobs_from_sampler
    reference = build_causal_lm(BackboneSpec(pretrained=sft_dir), model.tokenizer).eval()    # (the policy's start)
    before = torch.cat([p.detach().flatten() for p in reference.parameters()])
    after = torch.cat([p.detach().flatten() for p in model.policy.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    embedding = model.reference.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and {m.weight.dtype for m in model.reference.modules()
                                                 if type(m) is torch.nn.Linear} == {torch.bfloat16}
    mask = roll.response_mask.bool()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(roll.ref_logp, model.logprobs(reference, roll))
        fp32 = response_logprobs(reference, roll.input_ids, roll.attention_mask, roll.prompt_length,
                                 model.sampling.temperature)
    err = (roll.ref_logp - fp32)[mask].abs()
    assert err.mean() < 3e-3 and err.max() < 3e-2, (err.mean(), err.max())


@pytest.mark.slow
def test_bf16_mixed_keeps_the_reward_models_linears_in_bf16_with_the_same_rewards(tmp_path, sft_dir, reward_dir):
    """Under bf16-mixed the RL module builds its reward model with bf16 linear weights (`FrozenModel.configure`,
    `modules.backbone.linears_in`): the rollout's rewards equal, bit for bit, those of the same reward-stage export
    built in fp32 and run under the same autocast."""
    from modules.rewards import RewardModel

    config = tiny_rl_config(tmp_path, sft_dir, precision="bf16-mixed", limit_train_batches=1, model={
        "reward": {"class_path": "modules.rewards.RewardModel", "init_args": {"path": reward_dir, "normalize": False}}})
    cli, kept = fit_keeping_rollouts(config)
    linears = {m.weight.dtype for m in cli.model.reward.model.modules() if type(m) is torch.nn.Linear}
    assert linears == {torch.bfloat16}
    fp32 = RewardModel(reward_dir, normalize=False)
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(kept[0].rewards, fp32.score(kept[0], cli.model.tokenizer).float())


def test_bf16_mixed_holds_a_lora_policys_base_in_bf16_and_exports_it_merged_into_the_fp32_base(tmp_path, sft_dir):
    """A LoRA policy under bf16-mixed (`modules.backbone.linears_in`): its base linears hold bf16 and its adapters
    fp32; the rollout's pi_ref (the base, adapters off) equals, bit for bit, what the fp32 SFT export computes under
    the same autocast; only the adapters train; and the export is the adapters merged into the fp32 base, exactly as
    the same adapters over a fresh fp32 build of the policy merge."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = {"r": 4, "lora_alpha": 8}
    config = tiny_rl_config(tmp_path, sft_dir, model={"policy": {"pretrained": sft_dir, "lora": lora}},
                            precision="bf16-mixed", limit_train_batches=1)
    cli, kept = fit_keeping_rollouts(config)
    policy, tokenizer = cli.model.policy, cli.model.tokenizer
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    start = build_causal_lm(BackboneSpec(pretrained=sft_dir, lora=lora), tokenizer)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, start.state_dict()[k].to(v.dtype))}
    assert changed and all("lora_" in k for k in changed)
    reference = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer).eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(kept[0].ref_logp, cli.model.logprobs(reference, kept[0]))
    cli.model.export(str(tmp_path / "export"))
    set_peft_model_state_dict(start, get_peft_model_state_dict(policy))
    expected = start.merge_and_unload().state_dict()
    written = load_file(tmp_path / "export" / "model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float32}
    assert all(torch.equal(v, expected[k]) for k, v in written.items())


@pytest.mark.slow
def test_bf16_mixed_with_the_lm_head_in_chunks_trains_through_its_vocabulary_sliced_backward(tmp_path, sft_dir,
                                                                                          monkeypatch):
    """bf16-mixed on CPU with `logprob_chunk: 4` (the tiny 94-token vocabulary is never chunked by default) and an
    entropy bonus: the LM head's logprobs and entropies run chunked inside a real run, packed layout, micro-batches,
    activation checkpointing and all, and every update's head backward goes by slices of the vocabulary (the bf16
    path of `F._ChunkedLinearLogprobs`, the one a 151,936-token vocabulary takes); the run trains to a finite loss
    and logs the entropy it trained on."""
    from modules import functional as F

    calls, by_vocab = [], F._ChunkedLinearLogprobs._backward_by_vocab
    monkeypatch.setattr(F._ChunkedLinearLogprobs, "_backward_by_vocab",
                        staticmethod(lambda ctx, *grads: calls.append(ctx.chunk) or by_vocab(ctx, *grads)))
    config = tiny_rl_config(tmp_path, sft_dir, model={"logprob_chunk": 4, "entropy_coef": 0.01,
                                                      "micro_batch_tokens": 64}, precision="bf16-mixed")
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 < float(metrics["train/update_entropy"]) < math.log(94)
    assert calls and set(calls) == {4} and len(calls) >= cli.trainer.global_step


@pytest.mark.slow
@pytest.mark.parametrize("mode, what", [("loss", "non-finite loss"), ("grad", "non-finite gradient norm")])
def test_a_nonfinite_update_stops_before_the_step_keeping_the_last_good_checkpoint(tmp_path, sft_dir, mode, what):
    """Rollout 2 (the third) breaks: the run raises before that rollout's first optimizer step; last.ckpt, written
    after every rollout, holds the finite state after rollout 1; the export is never written."""
    export = tmp_path / "export"
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"dirpath": str(tmp_path / "ckpt"), "every_n_batches": 1},
                            extra_callbacks=[{"class_path": "tests.helpers.BreakAfter", "init_args": {"at": 2, "mode": mode}},
                                             {"class_path": "callbacks.export.HFExport", "init_args": {"dirpath": str(export)}}])
    with pytest.raises(NonFiniteError, match=f"P3O: {what} .* at rollout 2, epoch 0, minibatch 0; the optimizer step "
                                             "was skipped"):
        cli_main(["fit", "--config", config])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 * 2 * 2          # 2 rollouts x 2 epochs x 2 minibatches
    policy = {k: v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    assert policy and all(torch.isfinite(v).all() for v in policy.values())
    assert not export.exists()


def test_log_samples_writes_a_rollouts_first_responses_and_rewards_as_text(tmp_path, sft_dir):
    """`OnPolicyRollout(log_samples: 3, log_every_n_rollouts: 2)` over 4 rollouts: `train/samples` at the first and
    the third, each the Markdown table of that rollout's first 3 responses with their training rewards (the K = 2
    responses to its first prompt, then one to the second); `samples_table` works its example out; a negative
    count is one line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.evaluation import samples_table
    from callbacks.rollout import OnPolicyRollout

    assert samples_table([("Hi", "Hello|there\nfriend", 0.5, {})]) == \
        "| reward | prompt | response |\n|---|---|---|\n| +0.500 | Hi | Hello\\|there<br>friend |"
    with pytest.raises(ValueError, match=r"^OnPolicyRollout: log_samples=-1, log_every_n_rollouts=1; expected"):
        OnPolicyRollout(log_samples=-1)
    path = tiny_rl_config(tmp_path, sft_dir, extra_callbacks=[{"class_path": "tests.helpers.RecordRollouts"}])
    config = yaml.safe_load(open(path))
    [rollout] = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("OnPolicyRollout")]
    rollout["init_args"] = {"log_samples": 3, "log_every_n_rollouts": 2}
    (tmp_path / "logged.yaml").write_text(yaml.safe_dump(config))
    RecordRollouts.seen = []
    cli = cli_main(["fit", "--config", str(tmp_path / "logged.yaml")])
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    logged = events.Tensors("train/samples/text_summary")
    assert len(RecordRollouts.seen) == 4 and [event.step for event in logged] == [0, 2]
    for event, rows in zip(logged, RecordRollouts.seen[::2]):
        assert event.tensor_proto.string_val[0].decode() == samples_table(rows[:3])
