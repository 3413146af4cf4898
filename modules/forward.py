"""Forward passes that turn sequences into numbers: response logprobs, values and scalar rewards.

Every forward uses position ids from the attention mask, so left padding does not shift positions.
"""
from __future__ import annotations

import contextlib

import torch

from modules import functional as F
from modules import layout
from modules.backbone import scalar_head
from modules.sharding import forwards_on_every_rank, is_partitioned


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int | torch.Tensor = 0,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM logits with position ids that ignore padding: (B, T, V), or (B, keep, V) for the last `keep`
    positions only (`logits_to_keep`: the LM head and its output are computed for those positions alone; the
    numbers are the same, the head's FLOPs and memory shrink by T / keep). A 1D tensor `keep` names the positions;
    `position_ids` default to those of the (2D) mask."""
    if position_ids is None:
        position_ids = F.position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=keep).logits


# Values of fp32 logits one LM-head chunk may hold (64 MB): `chunk=None` means this many divided by the vocabulary.
LOGITS_PER_CHUNK = 2**24


def head_chunk(chunk: int | None, vocab_size: int) -> int:
    """Rows per LM-head chunk: `chunk` as given (0 = the whole logits at once), or by default the rows whose fp32
    logits fit in `LOGITS_PER_CHUNK` values (341 rows at SmolLM2's 49,152 tokens, 110 at Qwen's 151,936)."""
    return max(1, LOGITS_PER_CHUNK // vocab_size) if chunk is None else chunk


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                      temperature: float = 1.0, group_size: int = 1, chunk: int | None = None,
                      packed: bool = True, entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs (B, L) of the response tokens input_ids[:, P:] given everything before them; with
    `entropy`, also the entropy (B, L) of each of those tokens' distributions (softmax of the logits / T, as the
    sampler records it), from the same logits and differentiable (an entropy bonus's gradient).

    Only the positions that predict a response token reach the LM head: P - 1 .. P + L - 2, the last L + 1
    positions minus the final one (the prompt positions before would be computed and thrown away). Where the
    model's logits are its LM head applied to the decoder's hidden states (`splits_head`), the head sees the real
    response tokens alone (positions after a response's EOS are exactly 0) and runs in chunks of `chunk` tokens
    (`head_chunk`; `F.linear_token_logprobs`): the (tokens, vocabulary) logits never exist whole, in the forward or
    the backward. Elsewhere the whole logits are computed (finite values after the EOS).

    `group_size` K > 1 (rows i * K + k share prompt i): where `layout.shares_prompts` allows it, the prompt is computed
    once per group, and padding not at all (`layout.packed_prompt_layout`): G rows of at most P + K L real tokens
    instead of N = G K rows of P + L. The same numbers on every
    real token up to float rounding, with fewer FLOPs (K = 2, P = 42, L = 32, no padding: 0.72x the tokens).
    Models partitioned by DeepSpeed ZeRO-3, whose LM head cannot be applied apart from the model's forward, keep
    the padding (`layout.shared_prompt_layout`; finite values after the EOS), as every model does with `packed=False`.
    Every consumer masks the positions after the EOS."""
    if group_size > 1 and layout.shares_prompts(model, input_ids, attention_mask, prompt_length, group_size):
        if packed and splits_head(model):
            return _packed_prompt_logprobs(model, input_ids, attention_mask, prompt_length, temperature, group_size,
                                           chunk, entropy)
        return _shared_prompt_logprobs(model, input_ids, attention_mask, prompt_length, temperature, group_size,
                                       entropy)
    targets = torch.zeros_like(attention_mask)
    targets[:, prompt_length:] = attention_mask[:, prompt_length:]
    out = target_logprobs(model, input_ids, attention_mask, targets, temperature, chunk, entropy)
    return tuple(x[:, prompt_length - 1:] for x in out) if entropy else out[:, prompt_length - 1:]


def target_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, chunk: int | None = None,
                    entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(input_ids[:, t + 1] | <= t) at the positions t whose next token is a target (`targets[:, t + 1]` = 1):
    (B, T - 1), exactly 0 elsewhere (with `entropy`, also the entropy of each of those distributions, 0
    elsewhere). The LM head sees those positions alone, in chunks where `splits_head` allows (see
    `response_logprobs`). SFT's loss and every response logprob come from here."""
    wanted = targets[:, 1:].bool()                                                           # (B, T - 1)
    if not splits_head(model):
        first = int(wanted.any(0).nonzero()[0]) if wanted.any() else wanted.shape[1] - 1
        logits = lm_logits(model, input_ids, attention_mask, keep=input_ids.shape[1] - first)[:, :-1]
        labels = input_ids[:, first + 1:]
        out = F.token_logprobs_and_entropy(logits, labels, temperature) if entropy else \
            (F.token_logprobs(logits, labels, temperature),)                                # (B, T - 1 - first) each
        out = tuple(torch.nn.functional.pad(x, (first, 0)).masked_fill(~wanted, 0.0) for x in out)
        return out if entropy else out[0]
    hidden = decoder_states(model, input_ids, attention_mask, F.position_ids_from_mask(attention_mask))  # (B, T, H)
    out = head_logprobs(causal_lm_parts(model)[1], hidden[:, :-1][wanted], input_ids[:, 1:][wanted], temperature,
                        chunk, entropy)
    return _scattered(out, wanted)                                                           # (B, T - 1)


def _scattered(values: torch.Tensor | tuple[torch.Tensor, ...], where: torch.Tensor):
    """Per-position tensors of `where`'s shape holding `values` (one per True position, in order), 0 elsewhere; a
    tuple of them for a tuple."""
    if isinstance(values, tuple):
        return tuple(_scattered(v, where) for v in values)
    return values.new_zeros(where.shape).masked_scatter(where, values)


def micro_batch_ranges(tokens: torch.Tensor, budget: int | None, model) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most `budget` real tokens each (`tokens` (B,): each row's; a row over the
    budget alone; `layout.micro_batch_groups`), as many on every rank when `model` is sharded (every forward is then a
    collective): the most any rank needs. `budget` None: one range of every row."""
    if budget is None:
        return [(0, len(tokens))]
    count = forwards_on_every_rank(len(layout.micro_batch_groups(tokens, budget)), model, tokens.device)
    return layout.micro_batch_groups(tokens, budget, count)


def in_parts(fn, ranges: list[tuple[int, int]], *tensors: torch.Tensor) -> torch.Tensor:
    """`fn` applied to the rows of `tensors` range by range, its outputs concatenated along rows. With gradients
    on, each range runs checkpointed (`torch.utils.checkpoint`, non-reentrant): its activations are dropped after
    its forward and recomputed, one range at a time, in the backward. So at most one range's activations exist at
    once, for one more forward per range; values and gradients are those of `fn` on all rows at once, up to float
    rounding (any loss computed on the concatenated output keeps its normalisers whole)."""
    if len(ranges) == 1:
        return fn(*tensors)
    from torch.utils.checkpoint import checkpoint

    run = (lambda *part: checkpoint(fn, *part, use_reentrant=False)) if torch.is_grad_enabled() else fn
    return torch.cat([run(*(t[a:b] for t in tensors)) for a, b in ranges])


def head_logprobs(head, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  chunk: int | None = None, entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logprobs (M,) of `labels` (M,) under the LM head applied to `hidden` (M, H) (with `entropy`, also each
    row's entropy): in chunks of `head_chunk` rows for a plain Linear head with more rows than that
    (`F.linear_token_logprobs`); otherwise the head is called on all rows at once (a LoRA-adapted or quantized
    head, or few rows)."""
    rows = head_chunk(chunk, head.weight.shape[0]) if type(head) is torch.nn.Linear else 0
    if 0 < rows < hidden.shape[0]:
        return F.linear_token_logprobs(hidden, head.weight, head.bias, labels, temperature, rows, entropy)
    if entropy:
        return F.token_logprobs_and_entropy(head(hidden), labels, temperature)
    return F.token_logprobs(head(hidden), labels, temperature)


# Hybrid decoders whose logits are their LM head on the last hidden states, but whose linear-attention (Qwen3.5,
# Qwen3-Next, Kimi Linear, OLMo Hybrid, Ling's bailing_hybrid, MiniMax-Text-01), convolution (LFM2, LFM2-MoE) or Mamba
# (Nemotron-H: Nemotron 3, Jamba, Bamba) layers carry state along a row, so a group's
# responses cannot share one: the chunked head serves them in one row per response (tested for each against the
# model's own logits, tests/test_forward.py).
RECURRENT_SPLIT_HEAD = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "lfm2", "nemotron_h", "lfm2_moe", "kimi_linear",
                        "olmo_hybrid", "bailing_hybrid", "jamba", "bamba", "minimax")


def splits_head(model) -> bool:
    """Whether the model's logits are its LM head applied to its decoder's last hidden states, callable apart:
    a model of `layout.SHARED_PROMPT_MODELS` or `RECURRENT_SPLIT_HEAD` (no logit scaling in between) without a final
    soft-capping of its logits (Gemma 3's `final_logit_softcapping`, null in its checkpoints) whose parameters are not
    partitioned by DeepSpeed (an FSDP2 root keeps its LM head gathered after its forward: `modules.sharding`)."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in layout.SHARED_PROMPT_MODELS + RECURRENT_SPLIT_HEAD
            and getattr(config, "final_logit_softcapping", None) is None and not is_partitioned(model))


def _shared_prompt_logprobs(model, input_ids, attention_mask, prompt_length, temperature, group_size, entropy):
    N, T = input_ids.shape
    L = T - prompt_length
    gather, position_ids, allowed, keep = layout.shared_prompt_layout(attention_mask, prompt_length, group_size)
    packed = input_ids.flatten()[gather]                                                      # (G, P + K L)
    logits = lm_logits(model, packed, layout.custom_mask(model, allowed), keep, position_ids)       # (G, K L, V)
    score = F.token_logprobs_and_entropy if entropy else F.token_logprobs
    return score(logits.reshape(N, L, -1), input_ids[:, prompt_length:], temperature)


def _packed_prompt_logprobs(model, input_ids, attention_mask, prompt_length, temperature, group_size, chunk, entropy):
    gather, position_ids, allowed, source = layout.packed_prompt_layout(attention_mask, prompt_length, group_size)
    hidden = decoder_states(model, input_ids.flatten()[gather], layout.custom_mask(model, allowed), position_ids)  # (G, T', H)
    real = attention_mask[:, prompt_length:].bool()                                          # (N, L)
    head = causal_lm_parts(model)[1]
    out = head_logprobs(head, hidden.flatten(0, 1)[source[real]], input_ids[:, prompt_length:][real], temperature,
                        chunk, entropy)                                                      # (real tokens,)
    return _scattered(out, real)                                                             # (N, L)


def decoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H), the LM head's input, from the model's own forward with the head
    applied to one position only: calling the model (not its decoder alone) is what lets FSDP2 gather and
    reduce the root's parameters (embeddings, final norm, head)."""
    decoder = causal_lm_parts(model)[0]
    with _output_of(decoder) as seen:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    return seen[0].last_hidden_state


@contextlib.contextmanager
def router_losses(model, on: bool = True):
    """Within it, every forward of `model` (a mixture of experts: its config has `output_router_logits`) computes
    its router load-balancing loss (the architecture's own `load_balancing_loss_func`, over the real tokens of its
    attention mask), collected in the yielded list, one per forward, with its graph. Switching the router logits on
    makes `layout.shares_prompts` keep one row per response (a packed row's mask is not one flag per token), so
    each loss is the one that forward has on one row per response. `on=False`: nothing changes, the list stays
    empty."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not on:
        yield []
        return
    seen, before = [], base.config.output_router_logits
    base.config.output_router_logits = True
    handle = base.register_forward_hook(lambda mod, args, out: seen.append(out.aux_loss)
                                        if getattr(out, "aux_loss", None) is not None else None)
    try:
        yield seen
    finally:
        handle.remove()
        base.config.output_router_logits = before


@contextlib.contextmanager
def _output_of(module: torch.nn.Module):
    """Collects `module`'s forward outputs while active (a list, filled in call order)."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def causal_lm_parts(model):
    """(decoder, LM head) of a causal LM (peft-wrapped or not): the hidden states and the head applied to them
    give the model's logits for the decoders of `layout.SHARED_PROMPT_MODELS`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def scorer_head(scorer):
    """(backbone, head) of an AutoModelForSequenceClassification (peft-wrapped or not)."""
    model = scorer.get_base_model() if hasattr(scorer, "get_base_model") else scorer
    head = scalar_head(model)
    if head is None:
        raise TypeError(f"{type(model).__name__}: no 'score' or 'classifier' head to read a reward from")
    return getattr(model, model.base_model_prefix), head


def token_scores(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head applied at every position: (B, T). Used for rewards (last token) and values.
    `position_ids` default to those of the (2D) mask."""
    if position_ids is None:
        position_ids = F.position_ids_from_mask(attention_mask)
    with _output_of(scorer_head(scorer)[1]) as seen:     # the model's own forward, for FSDP2 (`decoder_states`)
        scorer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return seen[0].squeeze(-1).float()                         # (B, T)


def sequence_rewards(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0,
                     group_size: int = 1) -> torch.Tensor:
    """Reward read at the last real token of each row, whatever the padding side. (B, T) -> (B,).

    A rollout's rows (`prompt_length` P, `group_size` K > 1: rows i * K + k share prompt i) are scored with each
    prompt computed once per group and no padding where `layout.shares_prompts` allows it (`layout.packed_prompt_layout`, as
    in `response_logprobs`; the scalar head is applied apart from the backbone, so this holds for every scorer),
    each reward read at its row's last real token in the packed rows (`layout.packed_last_token`)."""
    if not (group_size > 1 and layout.shares_prompts(scorer, input_ids, attention_mask, prompt_length, group_size)):
        return F.gather_last(token_scores(scorer, input_ids, attention_mask), attention_mask)
    gather, position_ids, allowed, _ = layout.packed_prompt_layout(attention_mask, prompt_length, group_size)
    scores = token_scores(scorer, input_ids.flatten()[gather], layout.custom_mask(scorer, allowed), position_ids)
    return scores.flatten()[layout.packed_last_token(attention_mask, prompt_length, group_size, gather)]   # (N,)


@torch.no_grad()
def score_texts(scorer, tokenizer, prompts: list[str], responses: list[str], has_eos: list[bool] | None = None,
                batch_size: int = 64) -> torch.Tensor:
    """Rewards (N,) of (prompt, response) texts, tokenized through the shared collation path.

    `has_eos[i] = False` scores response i without a closing EOS, as a cut-off sample is scored from its ids.
    """
    from datamodules.collate import encode_prompt, encode_response, sequences

    device = next(scorer.parameters()).device
    has_eos = [True] * len(responses) if has_eos is None else list(has_eos)
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = range(i, min(i + batch_size, len(prompts)))
        seq = sequences([encode_prompt(tokenizer, prompts[j]) for j in rows],
                        [encode_response(tokenizer, responses[j], has_eos[j]) for j in rows], tokenizer.pad_token_id)
        out.append(sequence_rewards(scorer, seq.input_ids.to(device), seq.attention_mask.to(device)))
    return torch.cat(out).float()
