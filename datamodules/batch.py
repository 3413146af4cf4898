"""The data containers the shared datamodule yields. B = batch (pairs or prompts), P = prompt length,
T = full length. Lightning moves dataclasses to the device field by field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sequences:
    """Prompt + response token sequences with their masks."""

    input_ids: torch.Tensor       # (B, T) prompt then response; padding on either side
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    loss_mask: torch.Tensor       # (B, T) 1 on response tokens (EOS included), 0 on prompt and padding


@dataclass
class PairBatch:
    """What the shared datamodule yields. `chosen` / `rejected` are None for prompt-only data."""

    prompt_ids: torch.Tensor      # (B, P) left-padded prompts, ready for generation
    prompt_mask: torch.Tensor     # (B, P)
    prompts: list = field(default_factory=list)  # each prompt (B,): its text, or its conversation (messages)
    chosen: Sequences | None = None
    rejected: Sequences | None = None
    chosen_text: list[str] = field(default_factory=list)
    rejected_text: list[str] = field(default_factory=list)
    fields: dict[str, list] = field(default_factory=dict)  # the reward's record fields: name -> (B,) values

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]
