"""The optimizer (and learning-rate scheduler) of the SFT, reward, preference-model and offline DPO stages."""
from __future__ import annotations

from torch import nn


def configure(optimizer_factory, scheduler_factory, model: nn.Module):
    """What `LightningModule.configure_optimizers` returns: the optimizer over `model`'s trainable parameters (LoRA:
    the adapters), and the scheduler, if any, stepped every optimizer step."""
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}
