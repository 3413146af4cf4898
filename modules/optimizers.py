"""The optimizer (and learning-rate scheduler) of the SFT, reward, preference-model and offline DPO stages; the
learning rate every stage logs as `train/lr`."""
from __future__ import annotations

from torch import nn

from modules.checks import ConfigError


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
    optimizer = checked(optimizer_factory([p for p in model.parameters() if p.requires_grad]))
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}


def checked(optimizer):
    """`optimizer`, or one line where it cannot step the parameters it was given: bitsandbytes' optimizers (the 8-bit
    AdamW of `configs/presets/adamw_8bit.yaml`) take plain tensors, not FSDP2's sharded parameters (DTensor), on
    which their step fails deep inside its kernel."""
    from torch.distributed.tensor import DTensor

    if type(optimizer).__module__.startswith("bitsandbytes") and any(
            isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        raise ConfigError(f"model.init_args.optimizer: {name} steps plain tensors and FSDP2 shards the parameters "
                          "(DTensor); under FSDP2 use torch.optim.AdamW (its state is sharded with the parameters), "
                          "or bitsandbytes' optimizer on one process or under DDP")
    return optimizer
