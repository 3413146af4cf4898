"""The one generation routine: used by the rollout callback, evaluation and the stage reports."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from modules import functional as F
from modules.batch import Rollout


@dataclass
class SamplingConfig:
    """Sampling settings. `top_k: 0` and `top_p: 1.0` disable those filters (the paper samples at T = 1)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    do_sample: bool = True


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str],
           config: SamplingConfig, num_samples: int = 1) -> Rollout:
    """Draw `num_samples` responses per prompt; truncate each after its first EOS.

    prompt_ids / prompt_mask (B, P) must be left-padded. Returns a Rollout of N = B * num_samples rows,
    prompt-major (row i * K + k is the k-th sample for prompt i), tokens after the first EOS set to pad.
    """
    from transformers import GenerationConfig

    ids = prompt_ids.repeat_interleave(num_samples, 0)           # (N, P)
    mask = prompt_mask.repeat_interleave(num_samples, 0)         # (N, P)
    gen = GenerationConfig(do_sample=config.do_sample, temperature=config.temperature if config.do_sample else None,
                           top_p=config.top_p if config.do_sample else None,
                           top_k=config.top_k if config.do_sample else None, max_new_tokens=config.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        with _fsdp_root_gathered(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                                 synced_gpus=is_sharded(model))          # (N, P + L')
    finally:
        model.train(was_training)
    P = ids.shape[1]
    response = out[:, P:]                                        # (N, L')
    if response.shape[1] == 0:                                   # max_new_tokens = 0
        response = out.new_full((out.shape[0], 1), tokenizer.pad_token_id)
    resp_mask = F.response_mask(response, tokenizer.eos_token_id)  # (N, L)
    response = torch.where(resp_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response * resp_mask + (1 - resp_mask) * tokenizer.pad_token_id,
                                   skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([ids, response], 1),                 # (N, P + L)
        attention_mask=torch.cat([mask, resp_mask], 1),          # (N, P + L)
        response_mask=resp_mask,
        prompt_length=P,
        group_size=num_samples,
        prompts=[p for p in prompts for _ in range(num_samples)],
        responses=[t.strip() for t in texts],
        has_eos=F.has_eos(response, tokenizer.eos_token_id),
    )


def _fsdp_root_gathered(model):
    """`generate` on an FSDP-wrapped model runs the inner model's forward, skipping the wrapper's own unshard:
    gather the root-level parameters (embeddings, head, norms) for it. Nested units (decoder layers) gather their
    own when called. A no-op for any other model."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


def is_sharded(model) -> bool:
    """True when parameters are sharded across ranks (FSDP, DeepSpeed ZeRO-3): every rank must then keep
    calling forward until all ranks finish generating (`synced_gpus`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) or getattr(m, "_is_fsdp_managed_module", False)
               for m in model.modules()) or any(hasattr(p, "ds_id") for p in model.parameters())
