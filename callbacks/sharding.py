"""Model calls made by callbacks outside `training_step` (rollouts, evaluation, export), under any strategy.

Lightning runs `training_step` inside the precision plugin's context (autocast for mixed precision). Rollouts
and evaluation call the models directly, so `outside_forward` enters the same context: pi_old from a rollout and
pi_theta from the update must be computed at the same precision (a bf16/fp32 mismatch alone moves the ratio
away from 1). Sharding needs nothing more here: each stage wraps its own models in FSDP
(`modules.backbone.shard`), `modules.sampling.sample` gathers an FSDP root's parameters around `generate`, and
DeepSpeed ZeRO-3 gathers every submodule's parameters when it is called. `full_parameters` gathers whole
parameters for the export.
"""
from __future__ import annotations

import contextlib

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy


def outside_forward(trainer: L.Trainer):
    """Enter around direct model calls (generation, scoring) made outside `training_step`."""
    return trainer.precision_plugin.forward_context()


def _outermost(module, cls) -> list:
    """The submodules of type `cls` not nested inside another one (each stage's FSDP roots)."""
    if isinstance(module, cls):
        return [module]
    return [found for child in module.children() for found in _outermost(child, cls)]


@contextlib.contextmanager
def full_parameters(trainer: L.Trainer):
    """Whole parameters on rank 0 for the export when they are sharded; every rank enters. No-op otherwise."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with contextlib.ExitStack() as stack:
            for root in _outermost(trainer.lightning_module, FullyShardedDataParallel):
                stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True))
            yield
    elif getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.lightning_module.parameters()), modifier_rank=None):
            yield
    else:
        yield
