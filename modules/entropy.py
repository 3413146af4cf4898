"""The entropy bonus's coefficient (`RLModule entropy_coef`): a constant, or adapted after every optimizer step
towards a target entropy (`entropy_target`: Skywork-OR1's adaptive entropy control, TRL's `use_adaptive_entropy`).
Its state is two buffers, so a checkpoint holds it and a resume continues it exactly."""
from __future__ import annotations

import math

import torch
from torch import nn


class EntropyControl(nn.Module):
    """The coefficient c of the loss's entropy bonus, L - c H.

    Constant (`target` None): c = `coef` throughout. Adaptive (`target` set, in nats): c starts at `coef`, and after
    each optimizer step, given that step's mean entropy H over every process's trained tokens, c <- min(c + delta,
    high) if H <= target, else max(c - delta, low); the loss applies c only while the last step's H was at or below
    the target (0 before the first step), as TRL 1.16 does. `enabled`: whether the update computes entropies at all.

    Example: coef 0.01, target 0.2, delta 0.005, low 0, high 1: applied 0 (no step yet); a step at H = 0.1 -> c =
    0.015, applied 0.015; then H = 0.5 -> c = 0.01, applied 0; then H = 0.5 twice more -> c = 0.005, then 0
    (clamped at low)."""

    def __init__(self, coef: float = 0.0, target: float | None = None, delta: float = 0.005, low: float = 0.0,
                 high: float = 1.0):
        super().__init__()
        self.target, self.delta, self.low, self.high = target, delta, low, high
        self.enabled = coef != 0 or target is not None
        adaptive = target is not None                  # (a constant's state is its config: nothing to checkpoint)
        self.register_buffer("coef", torch.tensor(float(coef), dtype=torch.float64), persistent=adaptive)
        self.register_buffer("last", torch.tensor(math.inf, dtype=torch.float64), persistent=adaptive)

    def applied(self) -> float:
        """The coefficient of this step's loss."""
        if self.target is not None and not self.last <= self.target:
            return 0.0
        return float(self.coef)

    @torch.no_grad()
    def step(self, entropy: float) -> None:
        """After an optimizer step whose mean entropy was `entropy`: the adaptive update (nothing when constant)."""
        if self.target is None:
            return
        moved = self.coef + self.delta if entropy <= self.target else self.coef - self.delta
        self.coef.copy_(moved.clamp(self.low, self.high))
        self.last.fill_(entropy)
