"""Pure tensor maths shared by every stage. No models, no tokenizers, no logging.

Shapes: B = batch, T = sequence length, V = vocabulary. Masks are 0/1 tensors of the shape of the values.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    mask = mask.to(values.dtype)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1.0)


def moments(values: torch.Tensor, mask: torch.Tensor | None = None,
            sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(count, mean, variance) of the entries of `values` where `mask` is 1 (every entry without one); the variance
    over the count (no Bessel's correction). `sum_over`, a function summing a tensor over the processes (each calls
    it at the same point), makes them those of every process's entries together (two sums); None: these alone.

    Example: values [1, 2, 3, 6], mask [1, 1, 1, 0]: count 3, mean 2, variance (1 + 0 + 1) / 3 = 0.6667. Split over
    two processes, [1, 2] on one and [3, 6] with mask [1, 0] on the other, each gets the same three numbers."""
    mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    sum_over = sum_over or (lambda t: t)
    count, total = sum_over(torch.stack([mask.sum(), masked_sum(values, mask)]))
    mean = total / count.clamp(min=1.0)
    return count, mean, sum_over(masked_sum((values - mean) ** 2, mask)) / count.clamp(min=1.0)


def mean_std(values: torch.Tensor, sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the std (Bessel's correction) of every entry of `values`, over every process's with `sum_over`
    (`moments`).

    Example: [1, 2, 3] -> (2, sqrt(2 / 2) = 1); [1, 2] here and [3] in another process: (2, 1) in both."""
    count, mean, var = moments(values, sum_over=sum_over)
    return mean, (var * count / (count - 1)).sqrt()


def standardize(values: torch.Tensor, eps: float = 1e-4,
                sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(values - mean) / (std + eps) over every entry (every process's with `sum_over`; `mean_std`).

    Example: [2, -2, 1, -1]: mean 0, std sqrt(10 / 3) = 1.8257, so [1.0954, -1.0954, 0.5477, -0.5477] (eps aside)."""
    mean, std = mean_std(values, sum_over)
    return (values - mean) / (std + eps)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(values - mean) / std over the masked entries (std with Bessel's correction); over every process's masked
    entries with `sum_over` (`moments`)."""
    n, mean, var = moments(values, mask, sum_over)
    n = n.clamp(min=2.0)
    var = var * n / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: cumsum(mask) - 1, clamped at 0. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from `probs` (B, V) with `uniforms` (B,) in [0, 1): the first index whose cumulative
    probability exceeds u * total (float64 cumsum). Exactly the categorical distribution, from one uniform per row;
    an index of probability 0 is never returned (u at the top edge maps to the last index of positive probability).

    Example: probs [0.25, 0.25, 0.5] have cumulative [0.25, 0.5, 1.0]; u = 0.1 -> 0, u = 0.25 -> 1 (0.25 is not
    above 0.25), u = 0.4 -> 1, u = 0.5 -> 2, u = 0.999 -> 2. probs [0, 0.5, 0, 0.5, 0]: u = 0 -> 1, u = 0.5 -> 3,
    u = 1 -> 3 (the last positive index, not 4). Unnormalised [2, 6] (total 8): u = 0.24 -> 0, u = 0.26 -> 1.
    """
    cdf = probs.double().cumsum(-1)                                      # (B, V)
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]              # (B, 1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)     # (B,) first cdf > target
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)   # (B,)
    return torch.minimum(index, last_positive)


def repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019; HF's `RepetitionPenaltyLogitsProcessor`, vLLM's
    `repetition_penalty`): the logit of every token that occurs among `ids` (B, T) at a position where `valid` (B, T)
    is 1 (a prompt's padding is not text) is divided by `penalty` where positive and multiplied by it where not.
    logits (B, V) -> (B, V).

    Example: logits [[2, -1, 0.5, 3]], ids [[0, 1, 3]] with valid [[1, 1, 0]] (token 3 only at a padded position),
    penalty 2 -> [[1, -2, 0.5, 3]]: tokens 0 and 1 occurred, 2 did not, 3 only as padding."""
    seen = torch.zeros(logits.shape, dtype=torch.long, device=logits.device).scatter_add_(-1, ids, valid.long()) > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whatever the padding side. (B, T) -> (B,)."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last real token of b]. values (B, T) or (B, T, H) -> (B,) or (B, H)."""
    idx = last_token_index(attention_mask)                       # (B,)
    return values[torch.arange(values.shape[0], device=values.device), idx]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t] | <t) from next-token logits aligned with labels.

    logits (B, T, V) are the model's outputs at positions 0..T-1 and `labels` (B, T) the tokens they predict
    (the caller shifts). Logits are divided by the sampling temperature first, so the logprobs are those of the
    distribution the sampler drew from. Returns (B, T) in float32.

    One log_softmax then a gather, whose backward is one fused kernel over (B, T, V) (`picked - logsumexp`, the
    same values within 2e-6, takes several passes). T = 1 skips the division (x / 1 is x).
    """
    logits = logits.float()                                     # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v of distributions given by their log-probabilities: (..., V) -> (...). A token of
    log-probability -inf (masked out) adds 0.

    Example: log [1/2, 1/4, 1/4] -> 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2 = 1.0397; log [1, 0, 0] -> 0.

    At a -inf the log-probability is read as 0 (0 x 0 = 0), so the gradient there is 0 too: a clamp to the most
    negative float gave the same values, but its product's gradient, -p x incoming x (-3.4e38), overflowed to inf
    for an incoming gradient above 1 in size, and exp's backward made 0 x inf = NaN."""
    return -row_dot(logp.exp(), logp.masked_fill(logp == float("-inf"), 0.0))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v b_v over the last dimension, (..., V) x (..., V) -> (...), in the inputs' dtype. Outside autocast:
    under bf16 autocast `torch.linalg.vecdot` rounds both float32 inputs to bf16 and returns bf16 (an entropy of
    4.5 nats then comes on a grid of 1/32, and ties).

    Example: [[1, 2, 3]] . [[4, 5, 6]] = [32]."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.linalg.vecdot(a, b)


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(`token_logprobs(logits, labels, temperature)`, the `entropy` of each distribution softmax(logits / T)),
    from one log_softmax: what the sampler records at each step (the logprob of the token drawn and the entropy of
    the distribution it was drawn from, before top-k / top-p). logits (..., V), labels (...) -> two (...) float32.

    Example: logits [0, -log 2, -log 2] (probabilities [1/2, 1/4, 1/4]), label 1, T = 1: (log 1/4, 1.5 log 2) =
    (-1.3863, 1.0397)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy(logp)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          temperature: float = 1.0, chunk: int = 0,
                          with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, labels, temperature)` for the rows of `hidden` (M, H) with labels
    (M,) -> (M,) float32, where the LM head's logits (M, V) never exist whole when `chunk` > 0. `with_entropy`:
    also the `entropy` of each row's distribution softmax(logits / T), (M,) float32, differentiable too
    (`token_logprobs_and_entropy`; an entropy bonus's gradient).

    Forward: `chunk` rows at a time, keeping only each row's logprob (and entropy). Backward: the logits are
    computed again and differentiated on the spot, in float32 by the same chunks of rows (the weight's and bias's
    gradients summed over chunks in place), and where the matmuls run in 16 bits (autocast, 16-bit weights) by
    slices of the vocabulary over all rows, as TRL's chunked head (`_ChunkedLinearLogprobs._backward_by_vocab`).
    Peak memory is a few tiles of chunk x V values and the weight's float32 gradient, instead of (M, V) logits
    several times. The same ops as the plain computation row by row: equal up to
    float rounding (`tests/test_functional.py`). `chunk` 0 (or >= M) is the plain computation.

    Example: hidden [[1, 0], [0, 1]], weight [[1, 0], [0, 1], [0, 0]] (V = 3), no bias, labels [0, 2], T = 1:
    logits [[1, 0, 0], [0, 1, 0]], logsumexp = log(e + 2) = 1.5514 in both rows, so logprobs
    [1 - 1.5514, 0 - 1.5514] = [-0.5514, -1.5514], with any chunk size; probabilities (e, 1, 1) / (e + 2) in
    both rows, so both entropies log(e + 2) - e / (e + 2) = 1.5514 - 0.5761 = 0.9753.
    """
    if chunk <= 0 or chunk >= hidden.shape[0]:
        logits = F.linear(hidden, weight, bias)
        if with_entropy:
            return token_logprobs_and_entropy(logits, labels, temperature)
        return token_logprobs(logits, labels, temperature)
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, labels, temperature, chunk, with_entropy)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """`linear_token_logprobs` in chunks of rows, its backward written out (no autograd graph per chunk).

    With z = (h W^T + b) / T, log p = log_softmax(z), the outputs of a row are log p_y and H = -sum_v p_v log p_v.
    Given their incoming gradients a and e: d log p_y / dz = onehot_y - p and dH / dz = -p (log p + H), so
    dL/dz = a onehot_y - p (a + e (log p + H)), and dL/d(logits) = dL/dz / T. In place over one chunk's log p, that
    is one (chunk, V) tensor (two with the entropy: p beside it), where autograd's graph of the same ops held
    three (five). Then grad h = G W, grad W += G^T h, grad b += the sum of G's rows (G = dL/d(logits)). In 16 bits
    the same formulas run by slices of the vocabulary (`_backward_by_vocab`), log p from the forward's log Z.

    Example (the docstring's of `linear_token_logprobs`), row 0: p = (e, 1, 1) / (e + 2) = (0.5761, 0.2119,
    0.2119), log p = (-0.5514, -1.5514, -1.5514), H = 0.9753; a = 1, e = 0: dL/dz = (1 - 0.5761, -0.2119, -0.2119)
    = (0.4239, -0.2119, -0.2119); a = 0, e = 1: dL/dz = -p (log p + H) = -p (0.4239, -0.5761, -0.5761) =
    (-0.2442, 0.1221, 0.1221). Each sums to 0, as every row of dL/dz does. With hidden = I, grad W = G^T h puts
    row 0's dL/dz in W's first column (`tests/test_entropy.py`)."""

    @staticmethod
    def _logits(h, w, b, temperature) -> torch.Tensor:
        """z = (h W^T + b) / T of one chunk, (chunk, V) float32 (the division in place: the logits are this
        function's own)."""
        logits = F.linear(h, w, b).float()
        if temperature != 1.0:
            logits.div_(temperature)
        return logits

    @staticmethod
    def _logp(h, w, b, temperature) -> torch.Tensor:
        """log_softmax((h W^T + b) / T) of one chunk, (chunk, V) float32: the same ops as `token_logprobs`."""
        return torch.log_softmax(_ChunkedLinearLogprobs._logits(h, w, b, temperature), dim=-1)

    @staticmethod
    def _entropy_(logp) -> tuple[torch.Tensor, torch.Tensor]:
        """(`entropy(logp)` (chunk,), p = exp(log p) (chunk, V)), log p's -inf clamped in place to the most negative
        float (p = 0 there: 0 x min = 0, the same values), so no second (chunk, V) tensor is made for it."""
        p = logp.exp()
        return -row_dot(p, logp.clamp_(min=torch.finfo(logp.dtype).min)), p

    @staticmethod
    def _dtype(autocast: dict, hidden, weight) -> torch.dtype:
        """The dtype the head's matmuls run in: autocast's where it is on, else the inputs' promoted."""
        return autocast["dtype"] if autocast["enabled"] else torch.promote_types(hidden.dtype, weight.dtype)

    @staticmethod
    def _by_vocab(dtype: torch.dtype) -> bool:
        """Whether the backward goes by slices of the vocabulary (`_backward_by_vocab`): where the matmuls do not
        run in float32."""
        return dtype != torch.float32

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk, with_entropy):
        device = hidden.device.type
        ctx.autocast = {"device_type": device, "enabled": torch.is_autocast_enabled(device),
                        "dtype": torch.get_autocast_dtype(device)}
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        dtype = _ChunkedLinearLogprobs._dtype(ctx.autocast, hidden, weight)
        by_vocab = _ChunkedLinearLogprobs._by_vocab(dtype)
        # In 16 bits the head is cast once for all chunks, as autocast would: autocast caches the cast of a weight
        # that requires grad only, so a frozen head (the reference's, LoRA's) was cast again for every chunk (at
        # 151,936 x 2,048, 1,024 tokens: 4.8 s against 2.4 on 2 CPU cores). The same values.
        w, b = (weight.to(dtype), None if bias is None else bias.to(dtype)) if by_vocab else (weight, bias)
        logps, entropies, log_z = [], [], []
        for h, y in zip(hidden.split(chunk), labels.split(chunk)):
            z = _ChunkedLinearLogprobs._logits(h, w, b, temperature)                         # (chunk, V)
            logp = torch.log_softmax(z, dim=-1)
            logps.append(logp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
            if by_vocab:     # log Z = z - log p in any column: the largest's (softmax keeps the order)
                log_z.append(z.amax(-1) - logp.amax(-1))
            del z
            if with_entropy:
                entropies.append(_ChunkedLinearLogprobs._entropy_(logp)[0])
            del logp
        logp, entropy = torch.cat(logps), (torch.cat(entropies) if with_entropy else None)          # each (M,)
        ctx.save_for_backward(hidden, weight, bias, labels, torch.cat(log_z) if by_vocab else None,
                              entropy if by_vocab else None)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, log_z, entropy = ctx.saved_tensors
        if log_z is not None:
            return _ChunkedLinearLogprobs._backward_by_vocab(ctx, grad_logp, grad_entropy)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w, e = weight.float(), grad_entropy if ctx.with_entropy else None        # (float32 here: no autocast)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, y = hidden[rows], labels[rows]
            grad = _ChunkedLinearLogprobs._logp(h, weight, bias, ctx.temperature)                # log p (chunk, V)
            grad = _ChunkedLinearLogprobs._dlogits_(grad, y, grad_logp[rows], ctx.temperature,
                                                   None if e is None else e[rows])
            if need_b:
                grad_b += grad.sum(0)
            if need_h:
                grad_h[rows] = grad @ w                                         # (chunk, H)
            if need_w:
                grad_w.addmm_(grad.t(), h.float())                              # in place: no (V, H) temporary
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None)

    @staticmethod
    def _dlogits_(logp, y, grad_logp, temperature, grad_entropy=None, entropy=None, offset: int = 0) -> torch.Tensor:
        """dL/d(logits) from log p (rows, columns) float32, in place: -p a, or -(e p (log p + H) + a p) with an
        entropy gradient e (H: `entropy` of each row, or from log p's rows, which must then be whole), then + a at
        each row's label y where it falls in these columns (which start at vocabulary index `offset`; a row whose
        label is elsewhere adds 0 to a column of its own: no device sync to find the rows), then / T."""
        a = grad_logp.float().unsqueeze(-1)                                                    # (rows, 1)
        if grad_entropy is not None:
            if entropy is None:
                entropy, p = _ChunkedLinearLogprobs._entropy_(logp)
            else:
                p = logp.clamp_(min=torch.finfo(logp.dtype).min).exp()
            logp.add_(entropy.unsqueeze(-1)).mul_(p).mul_(grad_entropy.float().unsqueeze(-1)).add_(p.mul_(a)).neg_()
            del p
        else:
            logp.exp_().mul_(-a)                                                # -p a
        column = y - offset
        inside = (column >= 0) & (column < logp.shape[1])
        logp.scatter_add_(-1, column.clamp(0, logp.shape[1] - 1).unsqueeze(-1), a * inside.unsqueeze(-1))
        if temperature != 1.0:
            logp.div_(temperature)                                              # dL/d(logits)
        return logp

    @staticmethod
    def _backward_by_vocab(ctx, grad_logp, grad_entropy=None):
        """The backward where the matmuls run in bf16 (or fp16: autocast, or 16-bit weights), by slices of the
        vocabulary over all M rows at once (as TRL 1.16's chunked LM head), where the fp32 backward goes by chunks
        of rows over the whole vocabulary. Each slice's logits z are computed again; log p = z - log Z with the
        forward's log Z of each row (and its entropy H), so no row needs its whole vocabulary at once. Then
        grad W[slice] = G^T h is one matmul over all rows (each element rounded to 16 bits once, as autograd's; by
        chunks of rows it was rounded once per chunk, and a 16-bit (V, H) product was made per chunk), grad h sums
        G W[slice] over the slices in float32, and W is cast to 16 bits one slice at a time (no whole 16-bit copy).
        Peak: the float32 (V, H) weight gradient, as autograd's, plus a few (M, slice) tiles of `chunk` x V values.
        Equal to the whole logits' gradient within 16-bit rounding (`tests/test_functional.py`)."""
        hidden, weight, bias, labels, log_z, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = _ChunkedLinearLogprobs._dtype(ctx.autocast, hidden, weight)
        M, V = hidden.shape[0], weight.shape[0]
        step = max(1, ctx.chunk * V // max(M, 1))                              # columns: chunk x V values a tile
        h = hidden.to(dtype)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.empty(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        e = grad_entropy if ctx.with_entropy else None
        for start in range(0, V, step):
            cols = slice(start, start + step)
            w = weight[cols].to(dtype)                                          # (S, H)
            grad = _ChunkedLinearLogprobs._logits(h, w, None if bias is None else bias[cols].to(dtype),
                                                  ctx.temperature)
            grad = _ChunkedLinearLogprobs._dlogits_(grad.sub_(log_z.unsqueeze(-1)), labels, grad_logp,   # log p (M, S)
                                                   ctx.temperature, e, entropy, offset=start)
            if need_b:
                grad_b[cols] = grad.sum(0)
            grad = grad.to(dtype)
            if need_h:
                grad_h += (grad @ w).float()                                    # (M, H)
            if need_w:
                grad_w[cols] = grad.t() @ h                                     # (S, H)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top: float,
                      pool: torch.Tensor | None = None) -> torch.Tensor:
    """The "forking" tokens of Wang et al. 2025 ("Beyond the 80/20 rule"; TRL's `top_entropy_quantile` rho): the
    tokens of `mask` whose `entropy` is at least the (1 - top) quantile (linear interpolation, `quantile`) of
    the entropies in `pool` (default: those under `mask`; the RL module passes every process's). (N, L) -> (N, L)
    bool. top = 1 keeps every masked token (the threshold is the smallest entropy), top = 0 those at the largest.

    Example: entropy [[0.1, 2.0, 0.5], [1.0, 3.0, 9.9]], mask [[1, 1, 1], [1, 1, 0]], top 0.4: the pool is
    [0.1, 2.0, 0.5, 1.0, 3.0], sorted [0.1, 0.5, 1.0, 2.0, 3.0]; its 0.6 quantile sits at position 0.6 x 4 = 2.4,
    1.0 + 0.4 (2.0 - 1.0) = 1.4; so [[0, 1, 0], [0, 1, 0]] (2.0 and 3.0; 9.9 is outside the mask)."""
    mask = mask.bool()
    pool = entropy[mask] if pool is None else pool
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    return (entropy >= quantile(pool.float(), 1.0 - top)) & mask


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values, q)` (linear interpolation) of a 1-D tensor of any size, from two order statistics
    (`torch.kthvalue`): torch's refuses more than 2**24 values (16.8M, e.g. every process's trained tokens of 512
    responses of 32k tokens). Computed as torch computes it (the rank q (n - 1) in the values' dtype, then `lerp`),
    so equal to it up to that size; above it the rank is taken in float64 (float32 no longer holds every integer).
    NaN if any value is NaN, as torch's.

    Example: [3, 1, 4, 2], q 0.5: rank 0.5 x 3 = 1.5, between the 2nd and 3rd smallest (2 and 3): 2.5; q 1: 4."""
    n = values.numel()
    if n == 0:
        raise ValueError("quantile of no values")
    if torch.isnan(values).any():
        return values.new_tensor(float("nan"))
    dtype = values.dtype if n <= 2 ** 24 else torch.float64
    rank = torch.tensor(q, dtype=dtype) * (n - 1)
    below, above = min(int(rank.floor()), n - 1), min(int(rank.ceil()), n - 1)
    low = torch.kthvalue(values, below + 1).values
    high = low if above == below else torch.kthvalue(values, above + 1).values
    return torch.lerp(low, high, (rank - below).to(values.dtype).to(values.device))


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level log-probability: sum of token logprobs over the response mask. (B, T) -> (B,)."""
    return masked_sum(token_logps, mask, dim=-1)


def response_mask(response_ids: torch.Tensor, eos_token_id: int | list[int] | None,
                  pad_token_id: int | None = None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it. (B, L) -> (B, L). `eos_token_id`: one
    id or several (a model's stop tokens, `datamodules.collate.stop_ids`), the first of any ending the response.

    Without an EOS the whole row counts, except `pad_token_id` positions when the pad id is not an EOS id.

    Example: [[5, 2, 7], [5, 9, 7]] with EOS [2, 9] -> [[1, 1, 0], [1, 1, 0]]; with EOS 2 -> [[1, 1, 0], [1, 1, 1]].
    """
    eos = _ids(eos_token_id)
    if not eos:
        mask = torch.ones_like(response_ids, dtype=torch.long)
    else:
        is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device)).long()   # (B, L)
        eos_before = is_eos.cumsum(-1) - is_eos                  # EOS strictly before t
        mask = (eos_before == 0).long()
    if pad_token_id is not None and pad_token_id not in eos:
        mask = mask * (response_ids != pad_token_id).long()
    return mask


def has_eos(response_ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """Whether each row emitted an EOS (any of several ids). (B, L) -> (B,) bool."""
    eos = _ids(eos_token_id)
    if not eos:
        return torch.zeros(response_ids.shape[0], dtype=torch.bool, device=response_ids.device)
    return torch.isin(response_ids, torch.tensor(eos, device=response_ids.device)).any(-1)


def _ids(eos_token_id: int | list[int] | None) -> list[int]:
    return [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "k1+", "k3+")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-sample estimate of KL(pi || ref) from samples of pi, given log pi and log ref. Elementwise.

    k1 = log(pi/ref) (unbiased, can be negative); k2 = 0.5 * log(pi/ref)^2; k3 = (r - 1) - log r with
    r = ref/pi (unbiased, always >= 0). veRL's `kl_loss_type` names two more: 'low_var_kl' is k3 with log r clamped
    to [-20, 20] and the result to [-10, 10] (veRL's default for its KL loss, which veRL also calls k3); a '+' (k1+,
    k3+) keeps the value of k1 or of veRL's k3 (low_var_kl) and takes the gradient of k2, (logp - ref) d logp, the
    unbiased gradient of the reverse KL (a straight-through estimator, as veRL's).

    Example, logp - ref = 1: k1 1, k2 0.5, k3 e^-1 - 1 + 1 = 0.3679, with gradients d/d logp 1, 1, 1 - e^-1 = 0.6321;
    k1+ and k3+ the values of k1 and k3 with gradient 1 (k2's). At logp - ref = -30: k3 e^30 - 31, low_var_kl and
    k3+ 10 (low_var_kl's gradient 0: clamped; k3+'s -30, k2's)."""
    log_ratio = logp - ref_logp
    if estimator.endswith("+") and estimator in KL_ESTIMATORS:
        value = kl_penalty(logp, ref_logp, "k1" if estimator == "k1+" else "low_var_kl")
        gradient = 0.5 * log_ratio**2
        return gradient - gradient.detach() + value.detach()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "low_var_kl":
        clamped = log_ratio.clamp(-20.0, 20.0)
        return (torch.expm1(-clamped) + clamped).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def response_only_nll(target_logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the target tokens.

    target_logp (B, T-1): log p(token t + 1 | tokens <= t) at positions 0..T-2 (`modules.forward.target_logprobs`);
    loss_mask (B, T) marks the *target* tokens (response tokens, EOS included), so position t counts where
    loss_mask[:, t + 1] is 1: prompt and padding never count.
    """
    return masked_mean(-target_logp, loss_mask[:, 1:])


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(r_w - r_l). (B,), (B,) -> scalar."""
    return -F.logsigmoid(chosen - rejected).mean()


PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")


def preference_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_tokens: torch.Tensor,
                    rejected_tokens: torch.Tensor, ref_chosen_logp: torch.Tensor | None = None,
                    ref_rejected_logp: torch.Tensor | None = None, loss: str = "sigmoid", beta: float = 0.1,
                    gamma: float = 0.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline preference optimisation on (chosen, rejected) pairs: (per-pair loss (B,), margin h (B,)).

    Inputs are sequence logprobs summed over response tokens (B,): the policy's, the reference's (not read by
    'simpo'), and the response token counts n. As in TRL 1.16 (`DPOTrainer` 'sigmoid' and 'ipo'; SimPO from the
    experimental `CPOTrainer` 'simpo'):
      'sigmoid' (DPO):  h = (lp_c - ref_c) - (lp_r - ref_r)
                        loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (ls: conservative DPO)
      'ipo':            h = (lp_c - ref_c) / n_c - (lp_r - ref_r) / n_r   (per-token, TRL's length normalisation)
                        loss = (h - 1 / (2 beta))^2
      'simpo':          h = lp_c / n_c - lp_r / n_r - gamma / beta        (no reference)
                        loss as 'sigmoid'
    h > 0 means the policy prefers the chosen response (more than the reference does, for DPO and IPO).

    Example: lp_c = -4, lp_r = -6, ref_c = ref_r = -5, n_c = 2, n_r = 4, beta = 0.5:
      sigmoid: h = 1 - (-1) = 2, loss = -log sigmoid(1) = 0.31326; with ls = 0.1:
               0.9 * 0.31326 + 0.1 * -log sigmoid(-1) = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326;
      ipo:     h = 1/2 + 1/4 = 0.75, loss = (0.75 - 1)^2 = 0.0625;
      simpo (gamma 0.5): h = -2 + 1.5 - 1 = -1.5, loss = -log sigmoid(-0.75) = 1.13687.
    """
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"preference_loss: loss={loss!r}; expected one of {PREFERENCE_LOSSES}")
    n_c, n_r = chosen_tokens.to(chosen_logp.dtype).clamp(min=1), rejected_tokens.to(rejected_logp.dtype).clamp(min=1)
    if loss == "simpo":
        h = chosen_logp / n_c - rejected_logp / n_r - gamma / beta
    else:
        if ref_chosen_logp is None or ref_rejected_logp is None:
            raise ValueError(f"preference_loss: loss={loss!r} needs the reference's logprobs")
        chosen_ratio, rejected_ratio = chosen_logp - ref_chosen_logp, rejected_logp - ref_rejected_logp
        h = chosen_ratio / n_c - rejected_ratio / n_r if loss == "ipo" else chosen_ratio - rejected_ratio
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2, h
    per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return per_pair, h


def best_of_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """The largest value of each group of `group_size` consecutive entries: (N,) -> (N / group_size,). For 0 / 1
    rewards of n samples per prompt, whether any is right (pass@n).

    Example: [0, 1, 0, 0, 0, 0, 0, 0], groups of 4 -> [1, 0] (mean 0.5); [0.2, 0.7, -1, 0.1], groups of 2 -> [0.7, 0.1]."""
    return values.view(-1, group_size).max(-1).values


def group_ties(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / K,) bool: whether each group's (K consecutive entries') rewards are all equal, within float
    tolerance: a group that gives a comparison-based objective no reward signal, only the KL term.
    Example: [1, 1, 0, 1, 0, 0], K = 2 -> groups (1, 1), (0, 1), (0, 0) -> [True, False, True]."""
    groups = rewards.float().view(-1, group_size)
    return torch.isclose(groups.max(-1).values, groups.min(-1).values)


def tied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fraction of groups whose rewards are all equal (`group_ties`; TRL's `frac_reward_zero_std`).
    Example: [1, 1, 0, 1, 0, 0], K = 2 -> 2/3."""
    return group_ties(rewards, group_size).float().mean()


def pair_ties(pair_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) pairwise rewards M[i K + a, b] -> (N / K,) bool: whether every pair of each group ties (M = 0 within
    float tolerance): `group_ties` for a pairwise reward, whose win fractions may also be equal when pairs do not
    tie (a cycle a > b > c > a).
    Example: K = 2, M = [[0, 0], [0, 0], [0, -1.5], [1.5, 0]] -> [True, False]."""
    groups = pair_rewards.float().reshape(-1, group_size * group_size)
    return torch.isclose(groups, torch.zeros_like(groups)).all(-1)


def kept_groups(informative: torch.Tensor, count: int) -> torch.Tensor:
    """The indices (ascending) of `count` groups out of (G,) `informative` flags: the first `count` informative
    ones in order, then, if fewer are, the first of the others (DAPO's dynamic sampling, within one batch).
    Example: [F, T, F, T, T], count 2 -> [1, 3]; count 4 -> [0, 1, 3, 4] (0 fills in); count 9 -> all five."""
    order = torch.argsort((~informative).to(torch.int8), stable=True)     # informative first, each in order
    return order[:count].sort().values


def clip_fraction(ratio: torch.Tensor, eps: float, mask: torch.Tensor | None = None,
                  eps_high: float | None = None) -> torch.Tensor:
    """Fraction of entries with ratio outside [1 - eps, 1 + eps_high] (eps_high None: eps), optionally over a mask."""
    high = eps if eps_high is None else eps_high
    clipped = ((ratio < 1.0 - eps) | (ratio > 1.0 + high)).float()
    return clipped.mean() if mask is None else masked_mean(clipped, mask)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps: float,
                      dual_clip: float | None = None, eps_high: float | None = None) -> torch.Tensor:
    """PPO's clipped surrogate min(rho * A, clamp(rho, 1 - eps, 1 + eps_high) * A), rho = exp(log_ratio),
    eps_high = eps unless given. Elementwise.

    `eps_high` is DAPO's clip-higher (Yu et al., arXiv 2503.14476; TRL's `epsilon_high`, veRL's `clip_ratio_high`):
    for A > 0 only the upper bound is ever active, so a larger eps_high lets a token the policy made unlikely gain
    more probability per update, against entropy collapse. Example: A = 1, rho = 1.25: eps 0.2 gives 1.2 (clipped,
    gradient 0); eps_high 0.28 gives 1.25 (gradient rho A = 1.25). A = -1, rho = 0.75: both give -0.8 (the lower
    bound, 1 - eps).

    rho is exp of the *unclamped* log-ratio, so the active branch's gradient is the formula's for every input
    whose exp does not overflow float32 (log-ratio < ~88.7; beyond that the loss is non-finite and the RL
    module's guard stops the update before the optimizer step). With log rho = 21 and A = -1 the unclipped branch
    is active and d/d(log rho) = A * rho = -e^21 = -1.32e9: a clamp of the log-ratio at 20 would make it 0.

    `dual_clip` (c > 1, Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", off by default):
    for A < 0 the surrogate is bounded below by c * A, so a huge ratio on a bad token stops pushing once
    rho > c (gradient 0 there) instead of growing without bound.
    """
    ratio = log_ratio.exp()
    surrogate = torch.min(advantages * ratio, advantages * ratio.clamp(1 - eps, 1 + (eps if eps_high is None else eps_high)))
    if dual_clip is not None:
        surrogate = torch.where(advantages < 0, torch.max(surrogate, dual_clip * advantages), surrogate)
    return surrogate


def off_policy_keep(logp: torch.Tensor, sampled_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL 1.16's `get_off_policy_mask`): (N, 1), 1 to keep a response,
    0 to leave its policy term out: kept where A >= 0 or the mean over its tokens of sampled_logp - logp (a KL
    estimate from the policy that sampled it to the current one; NaN counts 0) is at most `threshold`. Detached.

    Example: threshold 0.5, per-token differences [0.6, 0.6] -> mean 0.6: A = -1 drops it, A = +1 keeps it;
    [0.4, 0.4] -> 0.4: kept either way."""
    gap = (sampled_logp - logp.detach()).nan_to_num(nan=0.0)
    mean = (gap * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean <= threshold)).to(gap.dtype)        # (float: a rollout's mask is an integer one)


def cispo_surrogate(logp: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor,
                    max_ratio: float) -> torch.Tensor:
    """CISPO's surrogate (MiniMax-M1, arXiv 2506.13585; TRL 1.16's `loss_type="cispo"`): sg[min(rho, max_ratio)] * A
    * logp, elementwise. The importance weight is clipped and detached, never the token: every token keeps a
    gradient, sg[min(rho, max)] * A * grad logp, where PPO's clip zeroes it outside the trust region.

    Example: logp -1, A = 1: rho = 2, max 5 -> value -2, gradient 2 (PPO at eps 0.2: clipped, gradient 0);
    rho = 6 -> value -5, gradient 5."""
    return log_ratio.detach().exp().clamp(max=max_ratio) * advantages * logp


def sapo_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float = 1.0,
                   tau_neg: float = 1.05) -> torch.Tensor:
    """SAPO's soft-gated surrogate (Soft Adaptive Policy Optimization, arXiv 2511.20347; TRL 1.16's
    `loss_type="sapo"`): sigmoid(tau (rho - 1)) * 4 / tau * A, tau = tau_pos where A > 0, else tau_neg. In place of a
    hard clip, a smooth gate: its gradient, 4 sigmoid'(tau (rho - 1)) rho A grad logp, is the policy gradient A grad
    logp at rho = 1 and fades as rho leaves 1.

    Example: A = 1, rho = 1 -> value 2 (sigmoid(0) * 4), gradient in log rho 1; rho = e^0.5 (tau 1) -> value
    4 sigmoid(0.6487) = 2.6269, gradient 4 sigmoid'(0.6487) e^0.5 = 1.4867; A = -1, rho = 1 -> value -4 / 2.1 =
    -1.9048 (tau 1.05), gradient -1."""
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    return torch.sigmoid(tau * (log_ratio.exp() - 1)) * 4 / tau * advantages


@torch.no_grad()
def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                  log_sampler_weights: torch.Tensor | None = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's sequence weights (Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693; TRL 1.16's
    `get_gamma_weights`): phi(w) = e^lam w^k e^(-lam w), phi(1) = 1, with w = exp(sum_t log(pi / pi_old)) the
    response's sequence ratio (each token's log-ratio clamped to [-20, 20], the sum to [log 1e-8, 20]), times its
    mismatch correction (`log_sampler_weights` summed, each clamped alike) where there is one; (k, lam) = (k_pos,
    lambda_pos) where A >= 0, else (k_neg, lambda_neg). Detached (a gradient scale); NaN / inf -> 0. (N, L) -> (N, 1).

    Example: sum of log-ratios log 2 (w = 2): A >= 0 -> e^3 * 4 * e^-6 = 4 e^-3 = 0.19915; A < 0 -> e^2 * 8 * e^-4 =
    8 e^-2 = 1.08268; w = 1 -> 1 either way."""
    floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if log_sampler_weights is not None:
        log_w = log_w + (log_sampler_weights.clamp(floor, 20.0) * mask).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def mismatch_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, level: str = "sequence",
                     mode: str = "mask", low: float | None = None, high: float | None = 3.0) -> torch.Tensor:
    """Importance weights of the sampler/trainer gap, pi_old / pi_sampler, bounded (TRL 1.16's
    `vllm_importance_sampling_mode`, veRL's rollout IS). All (N, L); returns (N, L), 0 outside `mask`.

    d_t = (old_t - sampler_t) m_t. 'token': w_t = exp(d_t); 'sequence': w = exp(sum_t d_t) on every token of the row.
    'truncate': clamp(w, low, high); 'mask': w where low <= w <= high, else 0. None = no bound on that side.

    Example: old = [[-1.0, -2.0]], sampler = [[-1.5, -1.0]], mask = [[1, 1]], high = 3:
      d = [0.5, -1.0]; token: w = [e^0.5, e^-1] = [1.6487, 0.3679] (both kept, truncate or mask);
      sequence: w = e^-0.5 = 0.6065 on both tokens. With high = 1.5, token/truncate gives [1.5, 0.3679] and
      token/mask [0, 0.3679]; with sequence d = [2.0, 0.0] (w = e^2 = 7.389), truncate 3 gives 3, mask gives 0.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"mismatch_weights: level must be 'token' or 'sequence', got {level!r}")
    mask = mask.to(old_logp.dtype)
    diff = (old_logp - sampler_logp) * mask                                          # (N, L)
    log_w = diff if level == "token" else diff.sum(-1, keepdim=True).expand_as(diff)
    w = log_w.exp()
    if mode == "truncate":
        w = w.clamp(min=low, max=high)
    elif mode == "mask":
        keep = torch.ones_like(w, dtype=torch.bool)
        if low is not None:
            keep &= w >= low
        if high is not None:
            keep &= w <= high
        w = w * keep
    else:
        raise ValueError(f"mismatch_weights: mode must be 'truncate' or 'mask', got {mode!r}")
    return w * mask


def sequence_weight(token_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One weight per response from per-token weights: their mean over the response (for sequence-level weights,
    which are equal on every token, that weight itself). (N, L) -> (N,); an empty response gets 1.

    Example: weights [[0.5, 1.5, 0], [0, 0, 0]], mask [[1, 1, 0], [0, 0, 0]] -> [1.0, 1.0]."""
    mask = mask.to(token_weights.dtype)
    count = mask.sum(-1)
    return torch.where(count > 0, masked_sum(token_weights, mask, -1) / count.clamp(min=1), torch.ones_like(count))
