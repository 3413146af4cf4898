"""`RLModule(ref_sync_steps, ref_sync_alpha)`: the reference moved towards the policy during training (TR-DPO, TRL's
`sync_ref_model`; alpha 1: ProRL's reference reset), and kept in checkpoints."""
import lightning as L
import pytest
import torch

from modules.backbone import BackboneSpec
from modules.objectives.p3o import P3O
from modules.rl import RLModule
from tests.helpers import tiny_rl_config
from tests.test_checkpoint import _resume_case
from train import cli_main, main


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_a_sync_moves_each_reference_weight_alpha_of_the_way_to_the_policy(sft_dir):
    """ref <- alpha policy + (1 - alpha) ref: with the policy at p + 1 and the reference at p, alpha 0.6 puts the
    reference at p + 0.6 exactly (within float rounding), tied weights included; alpha 1 at the policy."""
    module = RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=lambda p, r: [0.0] * len(r), objective=P3O(),
                      ref_sync_steps=1, ref_sync_alpha=0.6)
    module.configure_model()
    start = flat(module.reference)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(1.0)
    module.sync_reference()
    torch.testing.assert_close(flat(module.reference), start + 0.6)
    module.ref_sync_alpha = 1.0
    module.sync_reference()
    assert torch.equal(flat(module.reference), flat(module.policy))
    assert not any(p.requires_grad for p in module.reference.parameters())


class References(L.Callback):
    """Records (policy, reference) after every rollout."""

    def __init__(self):
        self.after, self.start = [], None

    def on_train_start(self, trainer, pl_module):
        self.start = flat(pl_module.reference)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append((pl_module.global_step, flat(pl_module.policy), flat(pl_module.reference)))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_reference_syncs_after_each_rollout_whose_updates_reach_the_count(tmp_path, sft_dir, alpha):
    """The tiny run: 4 rollouts of 4 optimizer steps (2 epochs x 2 minibatches), ref_sync_steps 6: the counts 6 and
    12 are reached in rollouts 2 and 3, so the reference moves after those two (alpha 1: to the policy as it is then),
    and stays as it was after the others (the first: the SFT policy)."""
    config = tiny_rl_config(tmp_path, sft_dir, model={"ref_sync_steps": 6, "ref_sync_alpha": alpha})
    cli = cli_main(["--config", config], run=False)
    seen = References()
    cli.trainer.callbacks.append(seen)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = [step for step, _, _ in seen.after]
    assert steps == [4, 8, 12, 16]
    (_, p1, r1), (_, p2, r2), (_, p3, r3), (_, p4, r4) = seen.after
    assert torch.equal(r1, seen.start)
    assert not torch.equal(p1, r1)
    torch.testing.assert_close(r2, alpha * p2 + (1 - alpha) * r1)
    torch.testing.assert_close(r3, alpha * p3 + (1 - alpha) * r2)
    assert torch.equal(r4, r3) and not torch.equal(p4, r4)


def test_ref_sync_settings_are_checked(tmp_path, sft_dir, task_tokenizer_path, capsys):
    """ref_sync_steps < 1 and alpha outside (0, 1] are refused at construction; with LoRA (whose reference is its
    base, no copy) the run stops in one line."""
    reward = lambda p, r: [0.0] * len(r)  # noqa: E731
    with pytest.raises(ValueError, match=r"RLModule: ref_sync_steps=0; expected optimizer steps >= 1, or null"):
        RLModule(None, task_tokenizer_path, reward=reward, objective=P3O(), ref_sync_steps=0)
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"RLModule: ref_sync_alpha=.*; expected 0 < alpha <= 1"):
            RLModule(None, task_tokenizer_path, reward=reward, objective=P3O(), ref_sync_alpha=alpha)
    config = tiny_rl_config(tmp_path, sft_dir, model={"ref_sync_steps": 4, "policy": {"lora": {"r": 4}}})
    assert main(["fit", "--config", config]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: RLModule: ref_sync_steps moves the reference copy towards the policy; a LoRA policy's reference is its "
        "base weights (no copy): train without LoRA, or without ref_sync_steps")


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["one-process", "fsdp2"])
def test_a_moved_reference_is_checkpointed_and_a_sigkill_resume_is_bit_exact(tmp_path, sft_dir, sharded):
    """ref_sync_steps 4 (after every rollout; 2 under FSDP2 on 2 processes, whose rollouts are half as long), alpha
    0.5: the checkpoint holds the reference (gathered whole under FSDP2; no longer in the digest of frozen weights)
    and the SIGKILL resume's weights equal the uninterrupted run's. A resume that rebuilt the reference from the SFT
    export would train against another KL anchor and end elsewhere."""
    model = {"ref_sync_steps": 2 if sharded else 4, "ref_sync_alpha": 0.5}
    last = _resume_case(tmp_path, sft_dir, devices=2 if sharded else 1, interrupt="SIGKILL", model=model,
                        strategy={"class_path": "modules.sharding.FSDP2Strategy"} if sharded else None)
    saved = torch.load(last, weights_only=False)
    assert any(k.startswith("reference.") for k in saved["state_dict"])
    assert not any(k.startswith("reference.") for k in saved["frozen_digest"])


def test_resuming_a_checkpoint_without_the_reference_with_ref_sync_is_one_line(tmp_path, sft_dir, capsys):
    """A checkpoint of a run without `ref_sync_steps` holds no reference: resumed with it set, the run stops before
    training in one line naming the missing reference weights and the setting."""
    config = tiny_rl_config(tmp_path, sft_dir, checkpoint={"dirpath": str(tmp_path / "ckpt"), "every_n_batches": 1})
    assert main(["fit", "--config", config]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", config, "--model.init_args.ref_sync_steps=4",
                 f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint's trained weights are not this run's: ") and "reference." in last
    assert last.endswith("resume with the config that wrote it (same model, LoRA settings, objective and "
                         "ref_sync_steps)")
