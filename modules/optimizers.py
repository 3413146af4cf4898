"""The optimizer (and learning-rate scheduler) of the SFT, reward, preference-model and offline DPO stages; the
learning rate every stage logs as `train/lr`."""
from __future__ import annotations

from torch import nn


def learning_rate(module) -> float | None:
    """The learning rate of the step under way (the first parameter group's), which every stage logs as `train/lr`
    (as TRL logs `learning_rate`); None outside a trainer."""
    if module._trainer is None or not module.trainer.optimizers:
        return None
    return float(module.trainer.optimizers[0].param_groups[0]["lr"])


def log_learning_rate(module, batch_size: int) -> None:
    """`train/lr` from a stage's `training_step` (automatic optimization: the scheduler steps after it)."""
    lr = learning_rate(module)
    if lr is not None:
        module.log("train/lr", lr, batch_size=batch_size)


def configure(optimizer_factory, scheduler_factory, model: nn.Module):
    """What `LightningModule.configure_optimizers` returns: the optimizer over `model`'s trainable parameters (LoRA:
    the adapters), and the scheduler, if any, stepped every optimizer step."""
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}
