"""The stages' optimizers: fused AdamW, which the configs set, equals the per-tensor loop; the schedulers step as documented."""
import pytest
import torch

from modules.backbone import build_causal_lm


def test_fused_adamw_matches_the_per_tensor_loop(tiny_spec, tokenizer):
    """Configs set AdamW(fused=True): one kernel over all tensors instead of a Python loop per tensor (its speed
    is in the end-to-end number of benchmarks/throughput.py, not timed here). Three steps from the same gradients
    give the same weights within float32 rounding."""
    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    optimizers = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, foreach=False),
                  torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True)]
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage, steps", [("sft", 3), ("reward", 3), ("rl", 2)])
def test_the_scheduler_is_stepped_every_optimizer_step_and_by_rl_once_per_rollout(tmp_path, sft_dir, stage, steps):
    """`model.init_args.scheduler` (here StepLR, step_size 1, gamma 0.5: the rate halves at every step of the
    scheduler). SFT and the reward stage, 3 batches: 3 optimizer steps, 3 scheduler steps, lr 1e-3 x 0.5^3. RL, 2
    rollouts of 2 epochs x 2 minibatches (8 optimizer steps): 2 scheduler steps, lr x 0.5^2, as the RL module's
    docstring says. Each stage logs the rate its step (RL: its rollout's updates) ran at as `train/lr`."""
    from tests.helpers import tiny_rl_config, tiny_stage_config
    from train import cli_main

    scheduler = ["--model.init_args.scheduler=torch.optim.lr_scheduler.StepLR",
                 "--model.init_args.scheduler.step_size=1", "--model.init_args.scheduler.gamma=0.5",
                 "--model.init_args.optimizer.lr=1e-3"]
    config = (tiny_rl_config(tmp_path, sft_dir, limit_train_batches=2) if stage == "rl" else
              tiny_stage_config(tmp_path, stage, sft_dir, f"{stage}.yaml", limit_train_batches=3))
    cli = cli_main(["fit", "--config", config, *scheduler])
    assert cli.trainer.global_step == (8 if stage == "rl" else 3)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** steps, rel=1e-9)
    # train/lr: the rate of the last step (SFT: 1e-3 x 0.5^2 before its third scheduler step) or rollout (RL: 0.5^1)
    assert float(cli.trainer.callback_metrics["train/lr"]) == pytest.approx(1e-3 * 0.5 ** (steps - 1), rel=1e-6)
