"""The shared-prompt layouts: how a group of K responses to one prompt becomes one row (the prompt once, then each
response), with the attention mask and positions that make every response see exactly what it sees alone; the
packed variant that drops the padding; which models can run them; and how rows are split into micro-batches of
whole groups. Index and mask maths only: `modules.forward` runs the forward passes over these layouts.

Shapes: N = rows (groups of K consecutive rows share a prompt), G = N / K groups, P = prompt length, L = response
length, T' = the longest packed row.
"""
from __future__ import annotations

import torch

from modules.functional import last_token_index, position_ids_from_mask


def shared_prompt_layout(attention_mask: torch.Tensor, prompt_length: int, group_size: int):
    """Lay out groups of K responses that share a prompt as one row each: [prompt, response 1, ..., response K].

    The prompt is then computed once per group instead of K times; every response attends to the prompt and to
    its own earlier tokens only, at the positions it has in its own row, so each response token sees exactly
    what it sees in the (N, P + L) layout. attention_mask (N, P + L), rows i * K + k prompt-major, returns
    - `gather` (G, P + K L): column indices into the flattened (N * (P + L)) rows: packed = flat[gather];
    - `position_ids` (G, P + K L): the positions of the unpacked rows (`position_ids_from_mask`);
    - `allowed` (G, 1, P + K L, P + K L) bool: query i may attend key j (causal, real keys, own response or the
      prompt; every query sees at least itself, so a padded one stays finite);
    - `keep` (K L,): the packed columns whose outputs predict the response tokens, response-major: response k's
      token l is predicted at column P - 1 for l = 0, else at P + k L + l - 1.

    Example, P = 2, L = 2, K = 2, one group: columns [p0 p1 | a0 a1 | b0 b1], segments [0 0 1 1 2 2]. Query b0
    (column 4) sees p0, p1, b0 and not a0, a1; keep = [1, 2, 1, 4] (p1 predicts a0 and b0, a0 predicts a1, b0
    predicts b1).
    """
    N, T = attention_mask.shape
    P, K = prompt_length, group_size
    L, G = T - P, N // K
    device = attention_mask.device
    rows = torch.arange(G, device=device)[:, None] * K                                          # (G, 1) first row
    prompt_cols = rows * T + torch.arange(P, device=device)                                     # (G, P)
    response_cols = ((rows + torch.arange(K, device=device))[:, :, None] * T + P
                     + torch.arange(L, device=device)).reshape(G, K * L)                        # (G, K L)
    gather = torch.cat([prompt_cols, response_cols], 1)                                         # (G, P + K L)
    position_ids = position_ids_from_mask(attention_mask).flatten()[gather]
    real = attention_mask.flatten()[gather].bool()                                              # (G, P + K L)
    segment = torch.cat([torch.zeros(P, dtype=torch.long, device=device),
                         torch.arange(1, K + 1, device=device).repeat_interleave(L)])           # (P + K L,)
    col = torch.arange(P + K * L, device=device)
    causal = col[None, :] <= col[:, None]                                                       # (q, k)
    same = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])                     # (q, k)
    allowed = (causal & same)[None] & real[:, None, :] | torch.eye(P + K * L, dtype=torch.bool, device=device)
    starts = P + torch.arange(K, device=device)[:, None] * L                                   # (K, 1)
    keep = torch.cat([torch.full((K, 1), P - 1, device=device), starts + torch.arange(L - 1, device=device)], 1)
    return gather, position_ids, allowed[:, None], keep.flatten()


def packed_prompt_layout(attention_mask: torch.Tensor, prompt_length: int, group_size: int):
    """`shared_prompt_layout` without its padding: in each group's row the real tokens (the prompt's, then each
    response's) move to the front in order, and rows are as long as the group with the most real tokens (T').
    Every token keeps its position id and sees the same tokens, so the numbers are unchanged; padding left of the
    prompts and after each response's EOS is no longer computed. attention_mask (N, P + L) as there; returns
    - `gather` (G, T'): column indices into the flattened (N * (P + L)) rows: packed = flat[gather];
    - `position_ids` (G, T'); `allowed` (G, 1, T', T') bool, as in `shared_prompt_layout`;
    - `source` (N, L): the flat index into the (G * T') packed positions of the output that predicts response
      token (n, l); meaningful where that token is real (the last prompt token for l = 0, else token l - 1).

    Example, P = 2, L = 2, K = 2, one group, prompt [pad p1], response a = [a0 pad] (EOS at a0), b = [b0 b1]:
    the padded layout [pad p1 | a0 pad | b0 b1] packs to [p1 a0 b0 b1], gather [1, 2, 6, 7], positions
    [0, 1, 1, 2]; b1 sees p1, b0 and itself, b0 does not see a0; a0 and b0 are predicted by p1 (source 0), b1 by
    b0 (source 2).
    """
    gather, position_ids, allowed, keep = shared_prompt_layout(attention_mask, prompt_length, group_size)
    N, T = attention_mask.shape
    G, S = gather.shape
    real = attention_mask.flatten()[gather].bool()                                        # (G, S)
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices               # real slots first
    width = int(real.sum(1).max())
    column = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=order.device).expand(G, S))
    order = order[:, :width]                                                              # (G, T')
    allowed = allowed[:, 0].gather(1, order[:, :, None].expand(G, width, S))                 # (G, T', S)
    allowed = allowed.gather(2, order[:, None, :].expand(G, width, width))                  # (G, T', T')
    rows = torch.arange(G, device=order.device)[:, None] * width
    source = (rows + column[:, keep]).reshape(N, T - prompt_length)                       # (N, L), prompt-major
    return gather.gather(1, order), position_ids.gather(1, order), allowed[:, None], source


def packed_last_token(attention_mask: torch.Tensor, prompt_length: int, group_size: int,
                      gather: torch.Tensor) -> torch.Tensor:
    """The index into the flattened packed rows (`gather` of `packed_prompt_layout`, (G, T')) of each row's last
    real token: (N,). A row with no real response token ends on its prompt, which the group's first row holds.

    Example (`packed_prompt_layout`'s): mask [[0 1 1 0], [0 1 1 1]], P = 2, K = 2, gather [[1, 2, 6, 7]]: row 0
    ends at a0 (flat 2, packed 1), row 1 at b1 (flat 7, packed 3): [1, 3].
    """
    N, T = attention_mask.shape
    rows = torch.arange(N, device=attention_mask.device)
    last = last_token_index(attention_mask)                                               # (N,)
    owner = torch.where(last < prompt_length, rows - rows % group_size, rows)
    packed_at = torch.full((N * T,), -1, dtype=torch.long, device=gather.device)
    packed_at[gather.flatten()] = torch.arange(gather.numel(), device=gather.device)      # flat -> packed
    return packed_at[owner * T + last]


def micro_batch_groups(group_tokens: torch.Tensor, budget: int, parts: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ranges [start, end) of G groups, each holding at most `budget` real tokens (a group over the
    budget alone), then the part with the most groups split in half until there are `parts` of them (the same
    count on every rank; at most G).

    Example: group tokens [3, 4, 2, 6, 1], budget 7 -> [(0, 2), (2, 3), (3, 5)] (7, 2, 7 tokens: adding the next
    group would pass 7); with parts=4 the first part (2 groups) is halved -> [(0, 1), (1, 2), (2, 3), (3, 5)].
    """
    ranges, start, total = [], 0, 0
    for g, tokens in enumerate(group_tokens.tolist()):
        if g > start and total + tokens > budget:
            ranges.append((start, g))
            start, total = g, 0
        total += tokens
    ranges.append((start, len(group_tokens)))
    while parts is not None and len(ranges) < min(parts, len(group_tokens)):
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        a, b = ranges[i]
        ranges[i: i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return ranges


# Attention implementations that apply a custom 4D mask as given: a boolean one for SDPA, an additive one for eager.
CUSTOM_MASK_ATTENTION = {"sdpa": "bool", "eager": "additive"}

# Decoders whose attention is plain causal attention over position ids (rotary, partial rotary, or learned absolute
# positions: GPT-2, OPT), so that a custom mask with the same positions reproduces it exactly, and whose logits are
# their LM head applied to the last hidden states (no logit scaling or soft-capping: `modules.forward.splits_head`),
# each tested in tests/test_layout.py against the model's own logits. Mixture-of-experts decoders route each token on
# its own hidden state, so packing rows changes no token's experts. Sliding windows pass where rows fit in the window
# (`shares_prompts`). Gemma 3 soft-caps its logits where its config sets `final_logit_softcapping` (its checkpoints do
# not): then it shares prompts in the padded layout, with its own logits (`modules.forward.splits_head`). Others
# (ALiBi: BLOOM, Falcon-RW, so Falcon is out; bidirectional prefixes, logit scaling: Granite, Cohere; attention
# soft-capping: Gemma 2; linear attention: Qwen3.5, Qwen3-Next) keep the one-row-per-response layout and the model's
# own logits.
SHARED_PROMPT_MODELS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "olmo3", "phi3", "gemma3_text",
                        "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "glm4_moe",
                        "glm", "glm4", "ernie4_5", "exaone4", "apertus", "arcee", "helium", "ministral3", "seed_oss",
                        "starcoder2", "stablelm", "olmo", "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
                        "ernie4_5_moe", "minimax_m2",
                        "gpt_neox", "gemma", "phi", "nemotron", "persimmon", "gpt2", "opt")


def shares_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                   group_size: int) -> bool:
    """Whether `response_logprobs` can compute each group's prompt once. It needs all of:
    - a decoder of `SHARED_PROMPT_MODELS`, with an attention implementation that takes a custom mask;
    - no sliding window shorter than the rows (a window that long never cuts anything off);
    - a mixture of experts that does not compute its router's load-balancing loss in its forward
      (`output_router_logits`: that loss reads the attention mask as one flag per token);
    - whole groups, the K rows of each holding the same prompt (ids and mask)."""
    config = getattr(model, "config", None)
    N, K = input_ids.shape[0], group_size
    if (N % K or getattr(config, "model_type", None) not in SHARED_PROMPT_MODELS
            or getattr(config, "_attn_implementation", None) not in CUSTOM_MASK_ATTENTION
            or getattr(config, "output_router_logits", False)
            or input_ids.shape[1] > (window(config) or input_ids.shape[1])):
        return False
    grouped = torch.stack([input_ids[:, :prompt_length], attention_mask[:, :prompt_length]]).view(2, N // K, K, -1)
    return bool((grouped == grouped[:, :, :1]).all())


def window(config) -> int | None:
    """The sliding-window length in use, None without one (Qwen2/3 set a length but switch it off)."""
    if not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)


def custom_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """The boolean mask as the model's attention implementation takes it (additive: 0 or float32 min)."""
    if CUSTOM_MASK_ATTENTION[model.config._attn_implementation] == "additive":
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed
