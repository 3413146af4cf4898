"""Mixtures of experts as policies: the router's load-balancing loss in the update (`RLModule router_aux_loss_coef`,
TRL 1.16's `router_aux_loss_coef`). Their logprob passes are tested with the dense decoders' in tests/test_layout.py."""
import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules.backbone import BackboneSpec
from modules.checks import ConfigError
from modules.forward import lm_logits, router_losses
from modules.objectives.p3o import P3O
from modules.rl import RLModule
from modules.sampling import SamplingConfig
from tests.helpers import TINY_SHAPE
from tests.test_layout import ARCHITECTURES
from tests.test_microbatch import PROMPTS


def moe_config(model_type: str) -> dict:
    """A tiny 2-layer random-init config of `model_type` (`tests.test_layout.ARCHITECTURES`' fields)."""
    return {**TINY_SHAPE, "model_type": model_type, "num_hidden_layers": 2, **ARCHITECTURES[model_type]}


QWEN3_MOE = moe_config("qwen3_moe")


def moe_module(tokenizer_path: str, tokenizer, coef: float, config: dict = QWEN3_MOE):
    """An RL module on a tiny random-init Qwen3-MoE policy, and a rollout of the 6 prompts x 2 responses."""
    from datamodules.task import GoldReward

    module = RLModule(BackboneSpec(config=config), tokenizer_path, reward=GoldReward(), objective=P3O(),
                      sampling=SamplingConfig(max_new_tokens=8), router_aux_loss_coef=coef)
    module.configure_model()
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                 for t in PROMPTS])
    torch.manual_seed(0)
    return module, module.make_rollout(batch)


def update_grads(module, roll, budget: int | None) -> tuple[torch.Tensor, dict]:
    """The parameters' gradient of one `backward_minibatch` in micro-batches of `budget` tokens, and its metrics."""
    module.micro_batch_tokens = budget
    for p in module.policy.parameters():
        p.grad = None
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    out = module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "test")
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()      # (ERNIE's bias:
                      for p in module.policy.parameters()]), out.metrics                        # not trained)


def hf_router_loss_grad(module, roll, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over `parts` of the model's own `aux_loss` (its forward with `output_router_logits`, one row per
    response, the 2D mask), and its gradient."""
    for p in module.policy.parameters():
        p.grad = None
    losses = [module.policy(input_ids=roll.input_ids[rows], attention_mask=roll.attention_mask[rows],
                            output_router_logits=True).aux_loss for rows in parts]
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                                     for p in module.policy.parameters()])


@pytest.mark.parametrize("model_type,budget", [("qwen3_moe", None), ("qwen3_moe", 30), ("ernie4_5_moe", 30),
                                               ("minimax_m2", 30)])
def test_the_router_loss_adds_its_coefficient_times_the_models_own_loss_averaged_over_the_forwards(
        task_tokenizer_path, tokenizer, model_type, budget):
    """The same rollout updated with router_aux_loss_coef 0 and 0.5: the gradients differ by 0.5 x the gradient of
    the model's own load-balancing loss (HF's forward, `output_router_logits`), averaged over the update's
    micro-batch forwards (one pass, or 30-token micro-batches: 3 or more), within float rounding; its value is
    logged (`router_aux_loss`). Positions ids aside, the model's forward is what the update runs on each
    micro-batch: one row per response, the 2D mask. Qwen3-MoE, ERNIE 4.5 MoE and MiniMax-M2."""
    plain, roll = moe_module(task_tokenizer_path, tokenizer, 0.0, moe_config(model_type))
    routed, _ = moe_module(task_tokenizer_path, tokenizer, 0.5, moe_config(model_type))
    routed.policy.load_state_dict(plain.policy.state_dict())
    base, base_metrics = update_grads(plain, roll, budget)
    grads, metrics = update_grads(routed, roll, budget)
    parts = routed.micro_batches(roll)
    assert len(parts) == 1 if budget is None else len(parts) >= 3
    value, aux = hf_router_loss_grad(routed, roll, parts)
    assert "router_aux_loss" not in base_metrics and torch.allclose(metrics["router_aux_loss"], value, atol=1e-6)
    assert aux.abs().max() > 0 and (grads - base - 0.5 * aux).abs().max() <= 1e-5 * grads.abs().max()
    assert not routed.policy.config.output_router_logits          # (switched on for the update's forwards alone)


def test_router_losses_collects_one_loss_per_forward_only_when_on(task_tokenizer_path, tokenizer):
    """`router_losses(model)`: each forward inside adds the model's aux loss; outside, or with `on=False`, none is
    computed; the config's switch is restored."""
    module, roll = moe_module(task_tokenizer_path, tokenizer, 0.0)
    with router_losses(module.policy) as seen:
        lm_logits(module.policy, roll.input_ids, roll.attention_mask)
        lm_logits(module.policy, roll.input_ids[:2], roll.attention_mask[:2])
    with router_losses(module.policy, on=False) as unseen:
        lm_logits(module.policy, roll.input_ids, roll.attention_mask)
    assert len(seen) == 2 and all(x.requires_grad and x > 0 for x in seen) and unseen == []
    assert not module.policy.config.output_router_logits


def test_a_router_loss_on_a_policy_without_one_is_one_line(task_tokenizer_path, tokenizer):
    """A dense policy (Llama), a mixture of experts whose HF model computes no such loss (DeepSeek-V3: its config
    has `output_router_logits` but no `router_aux_loss_coef`) or a negative coefficient: one line each."""
    for model_type, config in (("llama", {**TINY_SHAPE, "model_type": "llama"}), ("deepseek_v3", moe_config("deepseek_v3"))):
        with pytest.raises(ConfigError, match=rf"^RLModule: router_aux_loss_coef=0.1, but the policy \({model_type}\) is "
                                              r"not a mixture of experts with a router load-balancing loss"):
            moe_module(task_tokenizer_path, tokenizer, 0.1, config)
    with pytest.raises(ValueError, match=r"^RLModule: router_aux_loss_coef=-1.0; expected a finite number >= 0"):
        moe_module(task_tokenizer_path, tokenizer, -1.0)


@pytest.mark.slow
def test_a_mixture_of_experts_trains_end_to_end_with_its_router_loss(tmp_path, sft_dir):
    """The tiny RL config with a random-init Qwen3-MoE policy and router_aux_loss_coef 0.01: trains (a finite loss)
    and logs `train/router_aux_loss`, the load-balancing loss (the experts per token, 2, where routing is even)."""
    from tests.helpers import tiny_rl_config
    from train import cli_main

    config = tiny_rl_config(tmp_path, sft_dir, model={"policy": {"pretrained": None, "config": QWEN3_MOE},
                                                      "router_aux_loss_coef": 0.01})
    cli = cli_main(["fit", "--config", config])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 < float(metrics["train/router_aux_loss"]) < 4
