"""The exact gradient of a minibatch's loss, computed one micro-batch's activations at a time.

An RL objective's loss reads every row of its minibatch at once: its normalisers are the minibatch's (token counts
for dapo/bnpo, means over pairs or groups, whitening). Splitting the forward into micro-batches of rows must not
split the loss. `accumulate` adds to the parameters' `.grad` the gradient of `loss(forward(every row))`, running
`forward` on one micro-batch at a time, in one of two ways:

- `separable=True` (the loss is a sum of per-group terms, each reading its own rows, over constants of the
  minibatch; `modules.objectives.base.Objective.separable_groups`): each micro-batch's forward with its graph, its
  rows put into the minibatch's tensors, the loss on the whole minibatch, backward. A micro-batch's rows get their
  exact gradient whatever the other rows hold: the micro-batches already done hold their detached results, the rest
  `initial` (pi_old). One forward per micro-batch, as one pass; the last micro-batch sees every row's current
  value, so its loss and metrics are the minibatch's.
- any loss: (1) every micro-batch's forward without a graph; (2) the loss on the whole minibatch, differentiated
  with respect to those tensors alone; (3) every micro-batch's forward again with its graph, backpropagating its rows
  of that gradient (the chain rule). Step (3) replays step (1)'s random state, so dropout masks match. With
  `reuse`, step (1)'s tensors are `initial` (the caller knows a forward would give them: no step since they were
  computed, no dropout), and step (1) is skipped.

Either way the gradient is that of one pass up to float rounding (`tests/test_microbatch.py`, every objective).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from modules.batch import ObjectiveOutput

Tensors = Sequence[torch.Tensor | None]     # what a forward returns: e.g. (logprobs, values or None), rows first


def accumulate(parts: list[torch.Tensor], forward: Callable[[torch.Tensor], Tensors], loss: Callable[..., ObjectiveOutput],
               backward: Callable[[torch.Tensor], None], initial: Tensors, separable: bool,
               reuse: bool = False, device: torch.device | None = None):
    """Add the gradient of `loss(*tensors)` to the parameters' `.grad`, where `tensors` are `forward` over every row
    of the minibatch, one micro-batch of rows (`parts`: index tensors, each row in one) at a time; returns the loss's
    output, its loss detached and its metrics those of the whole minibatch.

    `forward(rows)` gives a tuple of tensors for those rows (None where the minibatch has no such tensor);
    `initial` the same tuple for every row, detached (the rollout's pi_old and old values); `backward(loss)` adds a
    loss's gradient (`manual_backward`); `loss` may raise (a non-finite loss stops before its backward)."""
    if separable:
        current = [t.detach().clone() if t is not None else None for t in initial]
        for rows in parts:
            part = forward(rows)
            out = loss(*(t.index_put((rows,), p.to(t.dtype)) if t is not None else None for t, p in zip(current, part)))
            backward(out.loss)
            for t, p in zip(current, part):
                if t is not None:
                    t[rows] = p.detach()
        return ObjectiveOutput(out.loss.detach(), out.metrics)
    if reuse:
        states = [_rng_state(device)] * len(parts)
        leaves = [t.clone().requires_grad_() if t is not None else None for t in initial]
    else:
        states, outs = [], []
        with torch.no_grad():
            for rows in parts:
                states.append(_rng_state(device))
                outs.append(forward(rows))
        leaves = [_gathered(parts, ts) if ts[0] is not None else None for ts in zip(*outs)]
    out = loss(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out.loss, wanted, allow_unused=True))      # None: the loss ignores that tensor
    grads = [next(grads) if t is not None else None for t in leaves]
    for rows, state in zip(parts, states):
        _set_rng_state(state, device)
        terms = [(p * g[rows]).sum() for p, g in zip(forward(rows), grads) if p is not None and g is not None]
        if terms:                                           # (none: the loss reads no tensor with a gradient)
            backward(sum(terms))
    return ObjectiveOutput(out.loss.detach(), out.metrics)


def _gathered(parts: list[torch.Tensor], pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' results put back at their rows: one leaf tensor for the whole minibatch."""
    whole = pieces[0].new_empty((sum(len(rows) for rows in parts), *pieces[0].shape[1:]))
    for rows, piece in zip(parts, pieces):
        whole[rows] = piece
    return whole.requires_grad_()


def _rng_state(device: torch.device | None) -> tuple:
    cuda = device is not None and device.type == "cuda"
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None


def _set_rng_state(state: tuple, device: torch.device | None) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
