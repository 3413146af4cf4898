"""Reward model stage: Bradley-Terry on (prompt, chosen, rejected), scalar head at the last real token.

Loss: -log sigmoid(r(x, y_w) - r(x, y_l)) (+ optional centering: center_coef * mean r^2, as in
Eisenstein et al. 2023 "Helping or herding"). Chosen and rejected are scored in one forward pass.
After training the reward is calibrated on responses sampled from the SFT policy on held-out prompts; its mean and
std are exported with the model (`reward_stats.json`) so the RL stage can use (r - mean) / std.
"""
from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAccuracy

from datamodules.batch import PairBatch
from datamodules.collate import stack_pair, turn_end_id
from modules import functional as F
from modules import optimizers
from modules.backbone import BackboneSpec, autocast_dtype, build_scorer, load_tokenizer, use_data_template
from modules.checkpoints import TrainedOnlyCheckpoints
from modules.checks import check_calibration_prompts, check_positions, check_responses
from modules.export import export_model
from modules.forward import in_parts, micro_batch_ranges, sequence_rewards
from modules.sampling import SamplingConfig, sample_policy
from modules.sharding import build_sharded, fsdp_mesh

STATS_FILE = "reward_stats.json"

# Written into the export as README.md, with {PATH} the export folder; tests/test_reward_model.py runs this code as written.
USAGE = """\
# Reward model exported by p3o-rlhf

A Bradley-Terry reward: `AutoModelForSequenceClassification` with one label, read at the last token.
It was trained on **prompt + response + end of turn**: score a response with the token the chat template ends an
assistant turn with appended (EOS for most models; `end` below), as without it the reward is read at a position the
model never learnt to score. The prompt goes through the tokenizer's chat
template when it has one; the response is encoded without special tokens. `reward_stats.json` holds the mean and
std of the reward on samples of the SFT policy: `(reward - mean) / std` is the normalised reward the RL stage uses.

```python
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = {PATH}   # this folder
end = {END}   # the token that ends a response
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
stats = json.load(open(f"{path}/reward_stats.json"))

def reward(prompt: str, response: str) -> float:
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    ids = ids + tok(response, add_special_tokens=False)["input_ids"] + [end]
    with torch.no_grad():
        raw = model(input_ids=torch.tensor([ids])).logits[0, 0].item()   # one unpadded sequence at a time
    return (raw - stats["mean"]) / stats["std"]
```
"""


class RewardModule(TrainedOnlyCheckpoints, L.LightningModule):
    """Reward model training: a Bradley-Terry loss on (chosen, rejected) pairs, then calibration on policy samples.

    Args:
        backbone: the scorer's backbone, usually `pretrained: <SFT export>`.
        tokenizer: linked from the datamodule.
        optimizer: the optimizer factory (class_path + init_args).
        scheduler: a learning-rate scheduler factory, stepped every optimizer step (None: constant).
        center_coef: weight of the reward-centering penalty (0 = off).
        calibration_policy: causal LM whose samples calibrate the reward (default: `backbone.pretrained`).
        calibration_prompts: held-out prompts used for calibration.
        sampling: how the calibration prompts are sampled.
        micro_batch_tokens: score each batch in micro-batches of pairs with at most this many real tokens (chosen
            + rejected), each recomputed in the backward (`modules.forward.in_parts`): the activations of one
            micro-batch at a time, one more forward each; the loss and gradient of the whole batch. None
            (default): one pass.
    """

    def __init__(self, backbone: BackboneSpec, tokenizer: str, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, center_coef: float = 0.0,
                 calibration_policy: str | None = None, calibration_prompts: int = 128,
                 sampling: SamplingConfig | None = None, micro_batch_tokens: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone, self.center_coef = backbone, center_coef
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = load_tokenizer(tokenizer)
        self.calibration_policy = calibration_policy or backbone.pretrained
        if self.calibration_policy is None:       # (else the export, after training, fails for want of it)
            raise ValueError("RewardModule: a random-init backbone (config) gives no default calibration_policy; set "
                             "model.init_args.calibration_policy to the causal LM whose samples set the reward's "
                             "scale (the SFT export): the export stores that scale")
        self.calibration_prompts, self.sampling = calibration_prompts, sampling or SamplingConfig()
        self.scorer, self.micro_batch_tokens = None, micro_batch_tokens
        self.calibration: dict | None = None
        self.val_accuracy, self.val_margin, self.val_rewards = BinaryAccuracy(), MeanMetric(), CatMetric()

    def configure_model(self) -> None:
        if self.scorer is None:
            linears = autocast_dtype(self._trainer)     # (a LoRA base's linears: bf16 under bf16-mixed)
            self.scorer = build_sharded(build_scorer, self.backbone, self.tokenizer, fsdp_mesh(self), linears)

    def setup(self, stage: str) -> None:
        use_data_template(self.tokenizer, self.trainer.datamodule)
        check_responses("RewardModule", self.trainer.datamodule, "pairs")

    def on_fit_start(self) -> None:
        if hasattr(self.trainer.datamodule, "max_length"):      # (the pair datamodule; None without one)
            length = self.trainer.datamodule.max_length
            check_positions("RewardModule", length, f"data max_length ({length})", {"reward model": self.scorer})
            check_calibration_prompts("RewardModule", self.trainer.datamodule)

    def pair_rewards(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), from one forward pass over the 2B sequences (one per micro-batch of
        pairs with `micro_batch_tokens`)."""
        both = stack_pair(batch.chosen, batch.rejected, self.tokenizer.pad_token_id)        # (2B, T)
        ids, mask = both.input_ids, both.attention_mask
        B = len(ids) // 2
        ranges = micro_batch_ranges(mask[:B].sum(-1) + mask[B:].sum(-1), self.micro_batch_tokens, self.scorer)

        def pairs(chosen_ids, chosen_mask, rejected_ids, rejected_mask):            # (b, 2): r_chosen, r_rejected
            rewards = sequence_rewards(self.scorer, torch.cat([chosen_ids, rejected_ids]),
                                       torch.cat([chosen_mask, rejected_mask]))
            return rewards.view(2, -1).T

        rewards = in_parts(pairs, ranges, ids[:B], mask[:B], ids[B:], mask[B:])          # (B, 2)
        return rewards[:, 0], rewards[:, 1]

    def pair_margins(self, batch: PairBatch) -> torch.Tensor:
        """r_chosen - r_rejected (B,): > 0 where the model prefers the chosen response."""
        chosen, rejected = self.pair_rewards(batch)
        return chosen - rejected

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_rewards(batch)
        loss = F.bradley_terry_loss(chosen, rejected)
        if self.center_coef:
            loss = loss + self.center_coef * torch.cat([chosen, rejected]).pow(2).mean()
        self.log_dict({"train/loss": loss, "train/accuracy": (chosen > rejected).float().mean()},
                      prog_bar=True, batch_size=len(batch))
        optimizers.log_learning_rate(self, len(batch))
        return loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        chosen, rejected = self.pair_rewards(batch)
        self.val_accuracy.update(torch.sigmoid(chosen - rejected), torch.ones_like(chosen, dtype=torch.long))
        self.val_margin.update(chosen - rejected)
        self.val_rewards.update(torch.cat([chosen, rejected]))
        self.log("val/loss", F.bradley_terry_loss(chosen, rejected), batch_size=len(batch), sync_dist=True)
        self.log_dict({"val/accuracy": self.val_accuracy, "val/margin": self.val_margin}, prog_bar=True,
                      batch_size=len(batch))

    def on_validation_epoch_end(self) -> None:
        rewards = self.val_rewards.compute()        # (every process's rewards: the same numbers on every rank)
        self.log_dict({"val/reward_mean": rewards.mean(), "val/reward_std": rewards.std()}, sync_dist=True)
        self.val_rewards.reset()

    def configure_optimizers(self):
        return optimizers.configure(self.optimizer_factory, self.scheduler_factory, self.scorer)

    @torch.no_grad()
    def calibrate(self, examples: list[dict], seed: int = 0) -> dict:
        """Sample one response per held-out prompt from the calibration policy; store reward mean / std."""
        if self.calibration is None:
            if self.calibration_policy is None:
                raise ValueError("RewardModule: set calibration_policy (a causal LM) to calibrate the reward")
            roll = sample_policy(self.calibration_policy, self.tokenizer, examples[: self.calibration_prompts],
                                 self.sampling, seed=seed, device=self.device)
            rewards = sequence_rewards(self.scorer, roll.input_ids, roll.attention_mask).float().cpu()
            self.calibration = {"prompts": roll.prompts, "responses": roll.responses, "rewards": rewards,
                                "mean": rewards.mean().item(), "std": rewards.std().clamp(min=1e-6).item()}
        return self.calibration

    def before_export(self) -> None:
        """On every rank before rank 0 exports (`callbacks.export.HFExport`): the calibration the export stores,
        whose scoring forwards a sharded scorer needs every rank for; under the run's precision context, as the
        scorer trained (bf16-mixed: autocast, which a base held in bf16 needs)."""
        if self.calibration is None and self._trainer is not None and self.trainer.datamodule is not None:
            with self.trainer.precision_plugin.forward_context():
                self.calibrate(self.trainer.datamodule.splits["val"])

    def export(self, directory: str, merge_lora: bool = True, final_dir: str | None = None) -> None:
        """AutoModelForSequenceClassification (num_labels=1) + tokenizer + reward_stats.json + README.md (its code
        names `final_dir`, the folder the export ends up in, default `directory`)."""
        export_model(self.scorer, self.backbone, self.tokenizer, directory, merge_lora, final_dir)
        stats = {"mean": 0.0, "std": 1.0, "n": 0, "source": "uncalibrated"}
        if self.calibration is None:
            self.before_export()
        if self.calibration is not None:
            stats = {"mean": self.calibration["mean"], "std": self.calibration["std"],
                     "n": len(self.calibration["rewards"]), "source": f"samples of {self.calibration_policy}"}
        stats["input"] = "prompt (chat template if any) + response + end of turn; see README.md"
        with open(os.path.join(directory, STATS_FILE), "w") as handle:
            json.dump(stats, handle, indent=2)
        with open(os.path.join(directory, "README.md"), "w") as handle:
            handle.write(USAGE.replace("{PATH}", json.dumps(final_dir or directory))
                         .replace("{END}", str(turn_end_id(self.tokenizer))))
        read_last_token_when_pad_is_eos(directory, self.tokenizer)



def read_last_token_when_pad_is_eos(directory: str, tokenizer) -> None:
    """transformers reads a sequence classifier at the last token that is not `pad_token_id`; when padding is
    EOS, that is the token *before* the closing EOS, a silently wrong reward. Saving `pad_token_id: null` makes
    plain transformers read the last token of an unpadded sequence and refuse padded batches (loud, not wrong).
    Our own loading sets the pad token again from the tokenizer and reads rewards through the attention mask."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    config["pad_token_id"] = None
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)
