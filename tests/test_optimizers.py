"""The stages' optimizers: fused AdamW, which the configs set, equals the per-tensor loop; 8-bit AdamW follows
AdamW, trains every stage, resumes bit-exactly and is refused under FSDP2 in one line; the schedulers step as
documented."""
import pytest
import torch

from modules.backbone import build_causal_lm


def same_steps(models: list, optimizers: list, steps: int) -> None:
    """`steps` optimizer steps of each model (of one shape) with its optimizer, from the same random gradients."""
    torch.manual_seed(0)
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()


def test_fused_adamw_matches_the_per_tensor_loop(tiny_spec, tokenizer):
    """Configs set AdamW(fused=True): one kernel over all tensors instead of a Python loop per tensor (its speed
    is in the end-to-end number of benchmarks/throughput.py, not timed here). Three steps from the same gradients
    give the same weights within float32 rounding."""
    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    same_steps(models, [torch.optim.AdamW(models[0].parameters(), lr=1e-2, foreach=False),
                        torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True)], 3)
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


EIGHT_BIT = {"class_path": "bitsandbytes.optim.AdamW8bit",     # (the tiny model's tensors are all under 4096 values)
             "init_args": {"lr": 1e-3, "betas": [0.9, 0.95], "min_8bit_size": 16}}


def test_8bit_adamw_follows_adamw_within_its_quantisation(tiny_spec, tokenizer):
    """bitsandbytes' AdamW8bit (`configs/presets/adamw_8bit.yaml`) holds both moments in uint8 and, from the same
    weights and gradients, moves the tiny model's weights as AdamW does within 2% (the norm of the difference of
    the two displacements over AdamW's; measured 0.9% after 5 steps)."""
    import bitsandbytes as bnb

    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    start = [p.detach().clone() for p in models[0].parameters()]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.0}
    optimizers = [torch.optim.AdamW(models[0].parameters(), **kwargs),
                  bnb.optim.AdamW8bit(models[1].parameters(), min_8bit_size=16, **kwargs)]
    same_steps(models, optimizers, 5)
    assert {v.dtype for s in optimizers[1].state.values() for k, v in s.items() if k.startswith("state")} == {torch.uint8}
    moved = [torch.cat([(p.detach() - s).flatten() for p, s in zip(m.parameters(), start)]) for m in models]
    assert (moved[1] - moved[0]).norm() <= 0.02 * moved[0].norm()


@pytest.mark.slow
def test_8bit_adamw_trains_rl_and_resumes_bit_exactly(tmp_path, sft_dir):
    """An RL run with 8-bit AdamW, killed (SIGKILL) and resumed from its last checkpoint, ends at the uninterrupted
    run's weights bit for bit (`tests/test_checkpoint.py`'s resume case); the checkpoint holds the 8-bit state."""
    from tests.test_checkpoint import _resume_case

    last = _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", model={"optimizer": EIGHT_BIT})
    state = torch.load(last, weights_only=False)["optimizer_states"][0]["state"]     # (bitsandbytes' layout)
    quantised = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
    assert state and {v.dtype for s in quantised for k, v in s.items() if k.startswith("state")} == {torch.uint8}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddp_cpu", "fsdp_cpu"])
def test_8bit_adamw_trains_under_ddp_and_under_fsdp2_stops_in_one_line(tmp_path, sft_dir, preset):
    """On 2 CPU processes: under DDP an RL run with 8-bit AdamW trains. bitsandbytes' step takes plain tensors, so
    under FSDP2 (sharded DTensor parameters) it failed deep inside its kernel after the first rollout; now the run
    stops before it, with one line naming the optimizer and what works."""
    import yaml

    from tests.helpers import run_train, tiny_rl_config

    trainer = yaml.safe_load(open(f"configs/presets/{preset}.yaml"))["trainer"]
    config = tiny_rl_config(tmp_path, sft_dir, model={"optimizer": EIGHT_BIT}, limit_train_batches=1, **trainer)
    proc = run_train(config, expect=0 if preset == "ddp_cpu" else 1)
    if preset == "ddp_cpu":
        assert "[eval after 1 batches]" in proc.stdout
    else:
        assert proc.stderr.strip().splitlines()[-1].startswith(
            "error: model.init_args.optimizer: bitsandbytes.optim.adamw.AdamW8bit steps plain tensors and FSDP2 shards")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_the_8bit_preset_trains_the_sft_and_reward_stages(tmp_path, sft_dir, stage):
    """`--config configs/presets/adamw_8bit.yaml` over the SFT and reward stages (the RL stage: the resume test
    above): their optimizer is AdamW8bit with the stage's learning rate, its moments uint8, the loss finite."""
    from tests.helpers import tiny_stage_config
    from train import cli_main

    config = tiny_stage_config(tmp_path, stage, sft_dir, f"{stage}.yaml", limit_train_batches=3)
    cli = cli_main(["fit", "--config", config, "--config", "configs/presets/adamw_8bit.yaml",
                    "--model.init_args.optimizer.min_8bit_size=16"])       # (the tiny model's tensors are small)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit" and cli.trainer.global_step == 3
    assert {v.dtype for s in optimizer.state.values() for k, v in s.items() if k.startswith("state")} == {torch.uint8}
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
