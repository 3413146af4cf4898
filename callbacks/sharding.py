"""Model calls made by callbacks outside `training_step` (rollouts, evaluation, export), under any strategy.

Lightning runs `training_step` inside the precision plugin's context (autocast for mixed precision). Rollouts
and evaluation call the models directly, so `outside_forward` enters the same context: pi_old from a rollout and
pi_theta from the update must be computed at the same precision (a bf16/fp32 mismatch alone moves the ratio
away from 1). Sharding needs nothing more here: each stage shards its own models with FSDP2
(`modules.sharding`), `modules.sampling.sample` gathers a sharded policy's parameters around generation, and
DeepSpeed ZeRO-3 gathers every submodule's parameters when it is called. `full_parameters` gathers whole
parameters for the export.
"""
from __future__ import annotations

import contextlib

import lightning as L

from modules.sharding import full_state_dicts


def outside_forward(trainer: L.Trainer):
    """Enter around direct model calls (generation, scoring) made outside `training_step`."""
    return trainer.precision_plugin.forward_context()


@contextlib.contextmanager
def full_parameters(trainer: L.Trainer):
    """Whole parameters on rank 0 for the export when they are sharded; every rank enters. No-op otherwise."""
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.lightning_module.parameters()), modifier_rank=None):
            yield
    else:
        with full_state_dicts(trainer.lightning_module, trainer.global_rank):
            yield
