"""End-of-training report for the reward and preference-model stages, measured against the task's gold reward.

On held-out pairs: accuracy against the sampled labels and against the gold ordering (pairs with equal gold
reward excluded), from the module's `pair_margins(batch)` (> 0: chosen preferred). On fresh samples of the SFT
policy (the calibration samples): for a scalar reward model, the Spearman correlation between its reward and the
gold reward; for a pairwise model, its accuracy on the gold ordering of pairs of samples (the comparisons RL asks
of it). Printed and logged under `report/`.
"""
from __future__ import annotations

import lightning as L
import torch
from torchmetrics.functional import spearman_corrcoef

from callbacks.checkpoint import finish_checkpoints, interrupted
from callbacks.evaluation import batches_done
from callbacks.sharding import outside_forward
from datamodules.batch import PairBatch


class RewardReport(L.Callback):
    """After reward or preference-model training: accuracy against the labels and the gold ordering on held-out
    pairs, and (scalar reward models) the correlation with the gold reward on the calibration samples (see the
    module docstring).

    Args:
        gold: the gold reward, a callable `(prompts, responses) -> list[float]` (None: labels only).
        max_pairs: held-out pairs scored at most.
    """

    def __init__(self, gold=None, max_pairs: int = 1000):
        self.gold, self.max_pairs = gold, max_pairs
        self.metrics: dict[str, float] = {}

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank computes the report (sharded models need every rank in each forward); rank 0 logs it.
        finish_checkpoints(trainer)      # the weights are saved before work that could fail
        if interrupted(trainer):
            return
        with outside_forward(trainer):
            m = self.report(trainer, pl_module)
        self.metrics = m
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics(m, step=batches_done(trainer))
        print("[reward report] " + "  ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in m.items()))

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        margins, texts = [], ([], [], [])
        for batch in trainer.datamodule.val_dataloader():
            batch: PairBatch = trainer.strategy.batch_to_device(batch, pl_module.device)
            margins.append(pl_module.pair_margins(batch).float().cpu())
            texts[0].extend(batch.prompts), texts[1].extend(batch.chosen_text), texts[2].extend(batch.rejected_text)
            if sum(map(len, margins)) >= self.max_pairs:
                break
        margin = torch.cat(margins)
        n = len(margin)
        m = {"report/label_accuracy": (margin > 0).float().mean().item()}
        if self.gold is not None:
            gc = torch.tensor(self.gold(texts[0][:n], texts[1][:n]))
            gr = torch.tensor(self.gold(texts[0][:n], texts[2][:n]))
            keep = gc != gr
            m["report/gold_order_accuracy"] = ((margin > 0) == (gc > gr))[keep].float().mean().item()
        cal = pl_module.calibrate(trainer.datamodule.splits["val"])
        if "pair_margins" in cal:                   # a pairwise model: pairs of SFT samples, ordered as gold does
            if self.gold is not None:
                ga = torch.tensor(self.gold(cal["prompts"], cal["responses_a"]))
                gb = torch.tensor(self.gold(cal["prompts"], cal["responses_b"]))
                keep = ga != gb
                m["report/sample_gold_order_accuracy"] = \
                    ((cal["pair_margins"] > 0) == (ga > gb))[keep].float().mean().item()
            m["report/calibration_std"] = cal["std"]
            return m
        if self.gold is not None:
            gold = torch.tensor(self.gold(cal["prompts"], cal["responses"]), dtype=torch.float32)
            m["report/spearman_gold"] = spearman_corrcoef(cal["rewards"].float(), gold).item()
            m["report/sft_gold_reward"] = gold.mean().item()
        m["report/calibration_mean"], m["report/calibration_std"] = cal["mean"], cal["std"]
        return m
