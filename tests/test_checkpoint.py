"""callbacks/checkpoint.py: checkpoints on a cadence of training batches (rollouts in RL) that fires, and exact
mid-epoch resume: after SIGKILL, after Ctrl-C, for every stage, and on 2 processes under FSDP2."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from modules.checks import ConfigError
from tests.helpers import run_train, tiny_rl_config, tiny_stage_config
from train import cli_main


def test_rl_checkpoints_fire_every_n_rollouts_and_at_the_end(tmp_path, sft_dir):
    """4 rollouts of 4 optimizer steps each: a global_step cadence of 3 would fire at step 3, 6, ... never on a
    rollout boundary; every_n_batches: 3 saves after rollout 3, then once more when training ends."""
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"every_n_batches": 3},
                            extra_callbacks=[{"class_path": "tests.helpers.RecordingCheckpoint"}])
    cli = cli_main(["fit", "--config", config])
    recorder = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RecordingCheckpoint")
    assert recorder.saves == [3, 4]
    assert next((tmp_path / "runs").rglob("checkpoints/last.ckpt")).exists()


def _digest(path: Path, rank: int = 0) -> dict:
    return torch.load(f"{path}.rank{rank}.pt")


def _resume_case(tmp_path, sft_dir, devices: int, interrupt: str, stage: str = "rl", strategy=None,
                 accelerator: str = "cpu", model: dict | None = None, sharded_too: bool = False,
                 deterministic: bool | str = False, precision: str = "32-true") -> Path:
    """Uninterrupted: 2 epochs of R rollouts (SFT / reward stages: R training batches). Interrupted when rollout
    R + 1 (the second of the second epoch) starts: SIGKILL dies at once, leaving last.ckpt of the rollout before
    (saved after every rollout); SIGINT finishes that rollout, saves and exits 130. Resumed from last.ckpt: bit-equal
    weights, and the resumed run trains on exactly the remaining batches. The checkpoint holds the trained weights
    alone (`modules.checkpoints`): an RL run's reference (or LoRA base) is only in its digest of frozen weights.
    `strategy`: DDP by default on several processes (FSDP2 gathers no frozen weight to rank 0 to save);
    `accelerator` 'gpu': the RL runs on CUDA (`tests/test_gpu.py`); `model`: RL module settings; `sharded_too`: the
    interruption and the resume again with `strategy` writing distributed checkpoints (a folder of shards, frozen
    weights included); `deterministic`: the trainer's (Lightning: torch's deterministic kernels, 'warn' where one has
    none); `precision`: the trainer's. Returns last.ckpt."""
    extra = {"devices": devices, "strategy": "ddp"} if devices > 1 else {}
    extra["precision"] = precision
    if strategy:
        extra["strategy"] = strategy
    if accelerator != "cpu":
        extra["accelerator"] = accelerator
    if deterministic:
        extra["deterministic"] = deterministic
    rollouts = (4 if stage == "rl" else 8) // devices   # 16 prompts (32 records) / (4 per batch x ranks)

    def config(name, callbacks, every=1):
        checkpoint = {"dirpath": str(tmp_path / name), "every_n_batches": every}
        if stage != "rl":
            return tiny_stage_config(tmp_path, stage, sft_dir, f"{name}.yaml", callbacks, checkpoint, max_epochs=2,
                                     precision=precision)
        return tiny_rl_config(tmp_path, sft_dir, name=f"{name}.yaml", max_epochs=2, extra_callbacks=callbacks,
                              checkpoint=checkpoint, model=model, **extra)

    digest = lambda name: [{"class_path": "tests.helpers.ParamDigest",  # noqa: E731
                            "init_args": {"path": str(tmp_path / name)}}]
    at = rollouts + 1                             # second epoch, second batch
    # One CPU process: the uninterrupted and the resumed runs go in this one (the same numbers: each run seeds
    # everything it draws), the killed run in its own. Otherwise every run through train.py's launcher.
    # (`deterministic` sets a process-wide torch flag: never in this one)
    in_process = devices == 1 and not strategy and accelerator == "cpu" and not deterministic
    run = (lambda cfg, *args: cli_main(["fit", "--config", cfg, *args])) if in_process else run_train
    gathered = tmp_path / "gathered.jsonl"
    run(config("straight", digest("straight") + [{"class_path": "tests.helpers.GatheredFrozen",
                                                  "init_args": {"path": str(gathered)}}], every=0))
    if strategy:          # FSDP2 gathers no frozen weight to rank 0 to save it (`FSDP2Strategy`), but a moved reference
        names = [json.loads(line) for line in gathered.read_text().splitlines()]
        if (model or {}).get("ref_sync_steps"):
            assert len(names) == 1 and names[0] and all(n.startswith("reference.") for n in names[0]), names
        else:
            assert names == [[]]
    kill = [{"class_path": "tests.helpers.KillAt", "init_args": {"at": at, "signal": interrupt}}]
    # SIGKILL: dies at once (the last save was after the previous rollout); SIGINT: finishes rollout `at`, saves, stops.
    run_train(config("killed", kill, every=1 if interrupt == "SIGKILL" else 0), expect=-9 if interrupt == "SIGKILL" else 130)
    last = tmp_path / "killed" / "last.ckpt"
    assert last.exists()
    saved = torch.load(last, weights_only=False)
    loader = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == [{"epoch": 1, "batches": 1 if interrupt == "SIGKILL" else 2}]    # mid-epoch
    assert sorted(saved["state_dict"]) == saved["trained_keys"] and not set(saved["state_dict"]) & set(saved["frozen_digest"])
    assert stage != "rl" or (model or {}).get("ref_sync_steps") or any(      # (a moved reference is saved instead)
        k.startswith(("reference.", "policy.base_model")) for k in saved["frozen_digest"])
    run(config("resumed", digest("resumed"), every=0), "--ckpt_path", str(last))
    resumed = ["resumed"]
    if sharded_too:       # `save_distributed_checkpoint`: last.ckpt is a folder with one shard per rank
        extra["strategy"] = {**strategy, "init_args": {**strategy.get("init_args", {}), "save_distributed_checkpoint": True}}
        run_train(config("killed_sharded", kill, every=1 if interrupt == "SIGKILL" else 0),
                  expect=-9 if interrupt == "SIGKILL" else 130)
        folder = tmp_path / "killed_sharded" / "last.ckpt"
        assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == devices, list(folder.iterdir())
        run(config("resumed_sharded", digest("resumed_sharded"), every=0), "--ckpt_path", str(folder))
        resumed.append("resumed_sharded")
    for rank in range(devices):
        a = _digest(tmp_path / "straight", rank)
        assert not torch.equal(a["params"], a["initial"])
        for name in resumed:
            b = _digest(tmp_path / name, rank)
            assert torch.equal(a["params"], b["params"]), f"rank {rank}: {name} weights differ from the uninterrupted run"
            assert a["prompts"][-len(b["prompts"]):] == b["prompts"]      # the resumed run saw the remaining batches
    return last


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_checkpoint_resumes_bit_exactly(tmp_path, sft_dir):
    """With the adaptive entropy bonus on (its target above any entropy here: the coefficient rises every step), whose
    state the checkpoint must carry: a resume that restarted it would apply none on its first step."""
    last = _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL",
                        model={"entropy_coef": 0.01, "entropy_target": 100.0})
    state = torch.load(last, weights_only=False)["state_dict"]
    assert float(state["entropy_control.coef"]) > 0.01 and float(state["entropy_control.last"]) < 100


@pytest.mark.slow
def test_ctrl_c_finishes_the_rollout_saves_and_resumes_bit_exactly(tmp_path, sft_dir):
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGINT")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sft_and_reward_stages_resume_bit_exactly_after_a_mid_epoch_sigkill(tmp_path, sft_dir, stage):
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", stage=stage)


@pytest.mark.slow
def test_a_lora_policy_under_bf16_mixed_resumes_bit_exactly(tmp_path, sft_dir):
    """Its base held in bf16 (`modules.backbone.linears_in`): the checkpoint holds the fp32 adapters and their
    optimizer state, the digest of the frozen base is checked on resume, and the resumed run's adapters equal the
    uninterrupted run's bit for bit."""
    last = _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", precision="bf16-mixed",
                        model={"policy": {"lora": {"r": 4, "lora_alpha": 8}}})
    state = torch.load(last, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state if k.startswith("policy.")), sorted(state)[:5]


@pytest.mark.slow
def test_sigkill_mid_epoch_resume_is_bit_exact_under_two_processes_with_fsdp2(tmp_path, sft_dir):
    """Two processes (every rank's sampling RNG and prompt shard restored, as under DDP, whose callbacks are the
    same), FSDP2: the checkpoint holds the trained weights and optimizer state gathered on rank 0; resumed, each
    rank takes its shards back. Again with `save_distributed_checkpoint: true` (a folder with one shard per rank,
    the frozen weights included: its loader asks for every key). With the adaptive entropy bonus on, as in the
    one-process case: its two buffers (the same on every rank, from every process's tokens) come back in both
    kinds of checkpoint, or the resumed first step would differ."""
    last = _resume_case(tmp_path, sft_dir, devices=2, interrupt="SIGKILL", model={"entropy_coef": 0.01, "entropy_target": 100.0},
                        strategy={"class_path": "modules.sharding.FSDP2Strategy"}, sharded_too=True)
    state = torch.load(last, weights_only=False)["state_dict"]
    assert float(state["entropy_control.coef"]) > 0.01 and float(state["entropy_control.last"]) < 100


@pytest.mark.slow
def test_a_qlora_run_checkpoints_its_adapters_alone_and_refuses_other_frozen_weights(tmp_path, sft_dir, reward_dir):
    """QLoRA P3O (a 4-bit base with LoRA) scored by a reward-stage export: the checkpoint holds the adapters alone,
    besides the objective's statistics (the base, its quantization state and the reward model are only in its digest
    of frozen weights), and a SIGKILL resume is bit-exact; before, the quantization state's entries were in it and a
    resume stopped on them as unexpected keys. Resumed with another reward model (the same export, its head
    changed), the run stops before training with one line naming the reward model's head; before, the checkpoint's
    copy of the reward model silently replaced the configured one."""
    from safetensors.torch import load_file, save_file

    model = {"policy": {"quantization": "4bit", "lora": {"r": 4, "lora_alpha": 8}},
             "reward": {"class_path": "modules.rewards.RewardModel", "init_args": {"path": reward_dir,
                                                                                  "normalize": False}}}
    last = _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", model=model)
    saved = torch.load(last, weights_only=False)
    weights = [k for k in saved["state_dict"] if not k.startswith("objective.")]      # (the objective's statistics)
    assert weights and all("lora_" in k for k in weights), weights
    assert {k.split(".")[0] for k in saved["frozen_digest"]} == {"policy", "reward"}
    other = tmp_path / "other-reward"
    shutil.copytree(reward_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    config = tiny_rl_config(tmp_path, sft_dir, name="other.yaml",
                            model={**model, "reward": {**model["reward"], "init_args": {"path": str(other),
                                                                                          "normalize": False}}})
    with pytest.raises(ConfigError, match=r"^the frozen weights differ from the checkpoint's at reward.model.score.weight "
                                          r"\(sum, norm: checkpoint \(.*resume with the models the checkpoint was written with$"):
        cli_main(["fit", "--config", config, "--ckpt_path", str(last)])


def test_the_frozen_digest_is_the_sum_and_norm_of_each_frozen_parameter():
    """The docstring's example: [[1, 2], [2, 0]] -> (5, 3); trained parameters and buffers are not in it, and every
    name of a frozen parameter is left out of a checkpoint (a tied one under both), with what a 4-bit weight saves
    beside it."""
    from modules.checkpoints import frozen_digest, frozen_names, is_frozen

    module = torch.nn.Module()
    module.frozen = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 0.0]]), requires_grad=False)
    module.trained = torch.nn.Parameter(torch.ones(3))
    module.inner = torch.nn.Module()
    module.inner.tied = module.frozen
    module.register_buffer("steps", torch.tensor(7.0))
    assert frozen_digest(module) == {"frozen": (5.0, 3.0)}
    assert frozen_names(module) == {"frozen", "inner.tied"}
    assert is_frozen("w", {"w"}) and is_frozen("w.absmax", {"w"}) and is_frozen("w.quant_state.nf4", {"w"})
    assert not is_frozen("w2", {"w"}) and not is_frozen("a.w", {"w"})


@pytest.mark.slow
def test_a_resume_runs_on_the_configs_settings_warns_of_each_change_and_refuses_another_stage(tmp_path, sft_dir,
                                                                                              caplog):
    """Lightning parses the settings saved in the checkpoint over the config. Before: a resume with
    `--model.init_args.epochs=1` and a lower temperature ran on the checkpoint's 2 epochs and temperature 1.0 without
    a word, and an SFT config given an RL checkpoint became an RL run ("the following arguments are required:
    reward, objective"). Now the config decides, each changed setting is named, and another stage's checkpoint
    stops the run in one line."""
    import logging

    first = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="a.yaml", max_epochs=1)])
    assert first.trainer.global_step == 16                         # 4 rollouts x 2 epochs x 2 minibatches
    ckpt = str(tmp_path / "half.ckpt")
    first.trainer.save_checkpoint(ckpt)
    with caplog.at_level(logging.WARNING):
        resumed = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="b.yaml", max_epochs=2),
                            "--ckpt_path", ckpt, "--model.init_args.epochs=1",
                            "--model.init_args.sampling.temperature=0.5"])
    assert resumed.model.epochs == 1 and resumed.model.sampling.temperature == 0.5
    assert resumed.trainer.global_step == 16 + 4 * 1 * 2
    assert (f"warning: --ckpt_path {ckpt}: this run's settings differ from those of the run that wrote it "
            "(model.init_args.sampling.temperature: 1.0 -> 0.5; model.init_args.epochs: 2 -> 1)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):             # the same settings: not a word
        cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, name="c.yaml", max_epochs=1),
                  "--ckpt_path", ckpt])
    assert "differ" not in caplog.text
    with pytest.raises(ConfigError, match=rf"^--ckpt_path {ckpt}: a checkpoint of modules.rl.RLModule; this config "
                                          r"trains modules.sft.SFTModule: use the config that wrote it"):
        cli_main(["fit", "--config", tiny_stage_config(tmp_path, "sft", sft_dir, "sft.yaml"), "--ckpt_path", ckpt])


def test_a_checkpoint_of_a_renamed_stage_is_the_same_stage():
    """A checkpoint written under the deprecated alias `modules.reward.RewardModule` resumes under the config's
    `modules.reward_model.RewardModule` (one class); another class, or one that does not import, is not the same."""
    from modules.checkpoints import _same_class

    assert _same_class("modules.reward.RewardModule", "modules.reward_model.RewardModule")
    assert not _same_class("modules.rl.RLModule", "modules.sft.SFTModule")
    assert not _same_class("no_such_package.Stage", "modules.sft.SFTModule")
