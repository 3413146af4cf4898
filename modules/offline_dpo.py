"""Offline preference optimisation stage: DPO, IPO or SimPO on the `{prompt, chosen, rejected}` pairs, no sampling.

The policy starts from the SFT export; the reference is a frozen copy of it (the policy with its adapters
disabled under LoRA). Each batch scores chosen and rejected in one forward of the policy and one of the
reference; the loss is `modules.functional.preference_loss`. With `callbacks.evaluation.Evaluation` the stage logs
the same KL-reward frontier points as the RL stage (KL against the reference, gold reward, win rate).
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from datamodules.batch import PairBatch, Sequences
from datamodules.collate import stack_pair
from modules import functional as F
from modules import optimizers
from modules.backbone import (
    BackboneSpec,
    autocast_dtype,
    build_causal_lm,
    load_tokenizer,
    reference_of,
    use_data_template,
)
from modules.batch import Rollout
from modules.checkpoints import TrainedOnlyCheckpoints
from modules.checks import check_positions, check_responses
from modules.export import export_model
from modules.forward import in_parts, micro_batch_ranges, response_logprobs, target_logprobs
from modules.sampling import SamplingConfig
from modules.sharding import build_with_reference, fsdp_mesh


class OfflineDPOModule(TrainedOnlyCheckpoints, L.LightningModule):
    """Offline DPO / IPO / SimPO: the policy learns the preference pairs directly, with no reward model.

    Args:
        policy: the policy backbone, usually `pretrained: <SFT export>` (optionally with `lora`).
        tokenizer: linked from the datamodule.
        loss: 'sigmoid' (DPO), 'ipo' or 'simpo' (reference-free, length-normalised;
            `modules.functional.preference_loss` gives each formula).
        beta: the inverse temperature of the implicit reward (IPO: its regularisation tau).
        simpo_gamma: SimPO's target margin gamma (the logit is shifted by gamma / beta; TRL's `simpo_gamma`).
        label_smoothing: the probability that a label is flipped (conservative DPO; 'sigmoid' and 'simpo').
        optimizer: the optimizer factory (class_path + init_args).
        scheduler: a learning-rate scheduler factory, stepped every optimizer step (None: constant).
        sampling: how `callbacks.evaluation.Evaluation` samples this policy.
        logprob_chunk: tokens per LM-head chunk (`modules.forward.head_chunk`): None (default) keeps each chunk's
            fp32 logits under 2**24 values; 0 computes the whole (tokens, vocabulary) logits at once.
        micro_batch_tokens: run each batch in micro-batches of pairs with at most this many real tokens (chosen +
            rejected), each recomputed in the backward (`modules.forward.in_parts`): the loss and gradient of the
            whole batch. None (default): one pass.
    """

    def __init__(self, policy: BackboneSpec, tokenizer: str, loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid",
                 beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
                 optimizer: OptimizerCallable = torch.optim.AdamW, scheduler: LRSchedulerCallable | None = None,
                 sampling: SamplingConfig | None = None, logprob_chunk: int | None = None,
                 micro_batch_tokens: int | None = None):
        super().__init__()
        if loss not in F.PREFERENCE_LOSSES:
            raise ValueError(f"OfflineDPOModule: loss={loss!r}; expected one of {F.PREFERENCE_LOSSES}")
        if not beta > 0 or not 0 <= label_smoothing < 0.5:
            raise ValueError(f"OfflineDPOModule: expected beta > 0 and 0 <= label_smoothing < 0.5, got beta={beta}, "
                             f"label_smoothing={label_smoothing}")
        self.save_hyperparameters()
        self.policy_spec, self.loss_type, self.beta = policy, loss, beta
        self.simpo_gamma, self.label_smoothing = simpo_gamma, label_smoothing
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sampling = sampling or SamplingConfig()
        self.logprob_chunk, self.micro_batch_tokens = logprob_chunk, micro_batch_tokens
        self.tokenizer = load_tokenizer(tokenizer)
        self.policy = self.reference = None
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        if self.policy is None:
            linears = autocast_dtype(self._trainer)
            self.policy, self.reference = build_with_reference(      # reference None: LoRA's base
                build_causal_lm, self.policy_spec, self.tokenizer, fsdp_mesh(self), linears)

    def setup(self, stage: str) -> None:
        use_data_template(self.tokenizer, self.trainer.datamodule)
        check_responses("OfflineDPOModule", self.trainer.datamodule, "pairs")

    def on_fit_start(self) -> None:
        if hasattr(self.trainer.datamodule, "max_length"):      # (the pair datamodule; None without one)
            length = self.trainer.datamodule.max_length
            check_positions("OfflineDPOModule", length, f"data max_length ({length})", {"policy": self.policy})

    def reference_model(self):
        """The frozen reference policy, as a context: the copy, or the LoRA policy with its adapters disabled."""
        return reference_of(self.policy, self.reference)

    def sequence_logprobs(self, model, pairs: Sequences) -> torch.Tensor:
        """Summed response logprobs (2B,) of chosen-then-rejected rows, in micro-batches of pairs."""
        B = len(pairs.input_ids) // 2
        tokens = pairs.attention_mask[:B].sum(-1) + pairs.attention_mask[B:].sum(-1)
        ranges = micro_batch_ranges(tokens, self.micro_batch_tokens, model)

        def pair_logps(chosen_ids, chosen_mask, chosen_targets, rejected_ids, rejected_mask, rejected_targets):
            ids, mask = torch.cat([chosen_ids, rejected_ids]), torch.cat([chosen_mask, rejected_mask])
            targets = torch.cat([chosen_targets, rejected_targets])
            logp = target_logprobs(model, ids, mask, targets, chunk=self.logprob_chunk)    # (2b, T - 1)
            return F.masked_sum(logp, targets[:, 1:], -1).view(2, -1).T                     # (b, 2)

        parts = [t for rows in (slice(None, B), slice(B, None))
                 for t in (pairs.input_ids[rows], pairs.attention_mask[rows], pairs.loss_mask[rows])]
        logps = in_parts(pair_logps, ranges, *parts)                                          # (B, 2)
        return torch.cat([logps[:, 0], logps[:, 1]])

    def pair_loss(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, per-pair margin h (B,), sequence logprobs (2B,)) of a batch of preference pairs."""
        pairs = stack_pair(batch.chosen, batch.rejected, self.tokenizer.pad_token_id)           # (2B, T)
        logp = self.sequence_logprobs(self.policy, pairs)
        ref = [None, None]
        if self.loss_type != "simpo":
            with torch.no_grad(), self.reference_model() as reference:
                ref = self.sequence_logprobs(reference, pairs).chunk(2)
        counts = pairs.loss_mask[:, 1:].sum(-1).chunk(2)
        per_pair, margin = F.preference_loss(*logp.chunk(2), *counts, *ref, loss=self.loss_type, beta=self.beta,
                                             gamma=self.simpo_gamma, label_smoothing=self.label_smoothing)
        return per_pair.mean(), margin, logp

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        loss, margin, logp = self.pair_loss(batch)
        chosen, rejected = logp.detach().chunk(2)
        self.log_dict({"train/loss": loss, "train/accuracy": (margin > 0).float().mean(),
                       "train/margin": margin.mean(), "train/logp_chosen": chosen.mean(),
                       "train/logp_rejected": rejected.mean()}, prog_bar=True, batch_size=len(batch))
        optimizers.log_learning_rate(self, len(batch))
        return loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        loss, margin, _ = self.pair_loss(batch)
        self.val_loss.update(loss, weight=len(batch))
        self.val_accuracy.update((margin > 0).float().mean(), weight=len(batch))
        self.val_margin.update(margin.mean(), weight=len(batch))
        self.log_dict({"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/margin": self.val_margin},
                      prog_bar=True, batch_size=len(batch))

    def logprobs(self, model, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        """Per-token response logprobs (N, L) of sampled responses, 0 after each response (for the evaluation's
        KL against the reference)."""
        T = self.sampling.temperature if temperature is None else temperature
        logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, T,
                                 chunk=self.logprob_chunk)
        return logp.masked_fill(~rollout.response_mask.bool(), 0.0)

    def configure_optimizers(self):
        return optimizers.configure(self.optimizer_factory, self.scheduler_factory, self.policy)

    def export(self, directory: str, merge_lora: bool = True, final_dir: str | None = None) -> None:
        """Policy + tokenizer in Hugging Face format (LoRA merged unless `merge_lora=False`)."""
        export_model(self.policy, self.policy_spec, self.tokenizer, directory, merge_lora, final_dir)
