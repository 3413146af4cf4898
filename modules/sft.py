"""Supervised fine-tuning: next-token cross-entropy on response tokens only (prompt and padding masked)."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from datamodules.batch import PairBatch
from modules import functional as F
from modules import optimizers
from modules.backbone import BackboneSpec, autocast_dtype, build_causal_lm, load_tokenizer, use_data_template
from modules.checkpoints import TrainedOnlyCheckpoints
from modules.checks import check_positions, check_responses
from modules.export import export_model
from modules.forward import in_parts, micro_batch_ranges, target_logprobs
from modules.sharding import build_sharded, fsdp_mesh


class Perplexity(MeanMetric):
    """exp of the token-weighted mean NLL (what torchmetrics' Perplexity computes, without the logits)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class SFTModule(TrainedOnlyCheckpoints, L.LightningModule):
    """Supervised fine-tuning: the NLL of the `chosen` responses given their prompts.

    Args:
        backbone: how to build the policy (see `modules.backbone.BackboneSpec`).
        tokenizer: tokenizer location; linked from `data.tokenizer_path` by the CLI.
        optimizer: the optimizer factory (class_path + init_args, e.g. torch.optim.AdamW with lr).
        scheduler: a learning-rate scheduler factory, stepped every optimizer step (None: constant).
        logprob_chunk: tokens per LM-head chunk for the loss (`modules.forward.head_chunk`): None (default) keeps
            each chunk's fp32 logits under 2**24 values; 0 computes the whole (tokens, vocabulary) logits at once.
        micro_batch_tokens: run each batch's forward in micro-batches of rows with at most this many real tokens,
            each recomputed in the backward (`modules.forward.in_parts`): the activations of one micro-batch at a
            time, one more forward each; the loss and gradient of the whole batch. None (default): one pass.
    """

    def __init__(self, backbone: BackboneSpec, tokenizer: str, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, logprob_chunk: int | None = None,
                 micro_batch_tokens: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone, self.tokenizer_path = backbone, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.logprob_chunk, self.micro_batch_tokens = logprob_chunk, micro_batch_tokens
        self.tokenizer = load_tokenizer(tokenizer)
        self.policy = None
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    def configure_model(self) -> None:
        if self.policy is None:
            linears = autocast_dtype(self._trainer)     # (a LoRA base's linears: bf16 under bf16-mixed)
            self.policy = build_sharded(build_causal_lm, self.backbone, self.tokenizer, fsdp_mesh(self), linears)

    def setup(self, stage: str) -> None:
        use_data_template(self.tokenizer, self.trainer.datamodule)
        check_responses("SFTModule", self.trainer.datamodule, "chosen")

    def on_fit_start(self) -> None:
        if hasattr(self.trainer.datamodule, "max_length"):      # (the pair datamodule; None without one)
            length = self.trainer.datamodule.max_length
            check_positions("SFTModule", length, f"data max_length ({length})", {"policy": self.policy})

    def loss(self, batch: PairBatch) -> torch.Tensor:
        """Mean NLL of the response tokens; the LM head sees those positions alone, in chunks; the rows in
        micro-batches of `micro_batch_tokens`."""
        seq = batch.chosen
        ranges = micro_batch_ranges(seq.attention_mask.sum(-1), self.micro_batch_tokens, self.policy)
        logp = in_parts(lambda ids, mask, targets: target_logprobs(self.policy, ids, mask, targets,
                                                                   chunk=self.logprob_chunk),
                        ranges, seq.input_ids, seq.attention_mask, seq.loss_mask)    # (B, T - 1)
        return F.response_only_nll(logp, seq.loss_mask)

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        optimizers.log_learning_rate(self, len(batch))
        return loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        loss = self.loss(batch)
        tokens = batch.chosen.loss_mask[:, 1:].sum()
        self.val_loss.update(loss, weight=tokens)
        self.val_ppl.update(loss, weight=tokens)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=len(batch))
        self.log("val/perplexity", self.val_ppl, batch_size=len(batch))

    def configure_optimizers(self):
        return optimizers.configure(self.optimizer_factory, self.scheduler_factory, self.policy)

    def export(self, directory: str, merge_lora: bool = True, final_dir: str | None = None) -> None:
        """Policy + tokenizer in Hugging Face format (LoRA merged unless `merge_lora=False`)."""
        export_model(self.policy, self.backbone, self.tokenizer, directory, merge_lora, final_dir)
