"""Forward passes that turn sequences into numbers: response logprobs, values and scalar rewards.

Every forward uses position ids from the attention mask, so left padding does not shift positions.
"""
from __future__ import annotations

import torch

from modules import functional as F


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Causal-LM logits with position ids that ignore padding: (B, T, V), or (B, keep, V) for the last `keep`
    positions only (`logits_to_keep`: the LM head and its output are computed for those positions alone; the
    numbers are the same, the head's FLOPs and memory shrink by T / keep)."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=F.position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=keep).logits


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-token logprobs (B, L) of the response tokens input_ids[:, P:] given everything before them.

    Only the positions that predict a response token reach the LM head: P - 1 .. P + L - 2, the last L + 1
    positions minus the final one (the prompt positions before would be computed and thrown away)."""
    L = input_ids.shape[1] - prompt_length
    logits = lm_logits(model, input_ids, attention_mask, keep=L + 1)[:, :-1]   # (B, L, V): t predicts t + 1
    return F.token_logprobs(logits, input_ids[:, prompt_length:], temperature)  # (B, L)


def scorer_head(scorer):
    """(backbone, head) of an AutoModelForSequenceClassification (peft-wrapped or not)."""
    model = scorer.get_base_model() if hasattr(scorer, "get_base_model") else scorer
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise TypeError(f"{type(model).__name__}: no 'score' or 'classifier' head to read a reward from")
    return getattr(model, model.base_model_prefix), head


def token_scores(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: (B, T). Used for rewards (last token) and values."""
    backbone, head = scorer_head(scorer)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=F.position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()                     # (B, T)


def sequence_rewards(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward read at the last real token of each row, whatever the padding side. (B, T) -> (B,)."""
    return F.gather_last(token_scores(scorer, input_ids, attention_mask), attention_mask)


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
