"""modules/forward.py: the forward passes' shortcuts equal the plain computation: the LM head on response
positions only, the LM head in chunks (logprobs and gradients), the SFT loss in chunks."""
import pytest
import torch

from modules import functional as F
from modules.backbone import BackboneSpec, build_causal_lm
from modules.forward import lm_logits, response_logprobs
from tests.helpers import TINY_SHAPE, grouped_rows, logprobs_and_grads


def _full_logprobs(model, ids, mask, P):
    """The computation `response_logprobs` replaced: the LM head over every position, prompt ones discarded."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=F.position_ids_from_mask(mask),
                   use_cache=False).logits
    return F.token_logprobs(logits[:, P - 1: -1], ids[:, P:], 0.7)


def test_response_logprobs_run_the_lm_head_on_response_positions_only_with_the_same_numbers(tiny_spec, tokenizer):
    """Left-padded prompts (P = 5), 4 response tokens: logits_to_keep = 5 gives (B, 5, V) instead of (B, 9, V), and
    the logprobs equal the full computation's, for a plain and a LoRA model."""
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :1] = 0
    for spec in (tiny_spec, BackboneSpec(config=tiny_spec.config, lora={"r": 4})):
        model = build_causal_lm(spec, tokenizer).eval()
        with torch.no_grad():
            assert lm_logits(model, ids, mask, keep=5).shape == (3, 5, len(tokenizer))
            fast, full = response_logprobs(model, ids, mask, 5, 0.7), _full_logprobs(model, ids, mask, 5)
        assert fast.shape == (3, 4)
        assert torch.allclose(fast, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group_size", [1, 3], ids=["one-row-per-response", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_lm_head_logprobs_and_gradients_equal_the_whole_logits(tokenizer, group_size, lora, monkeypatch):
    """`response_logprobs` with the LM head in chunks of 4 tokens against chunk 0 (the whole logits): the same
    logprobs on every response token and the same gradient of their masked sum (1e-5), for a full and a LoRA
    policy, with one row per response and packed groups; the chunked path ran on every real response token."""
    import modules.functional

    calls = []
    plain_linear = modules.functional.linear_token_logprobs
    monkeypatch.setattr(modules.functional, "linear_token_logprobs",
                        lambda hidden, *a: calls.append((hidden.shape[0], a[4])) or plain_linear(hidden, *a))  # (a[4]: chunk)
    config = {**TINY_SHAPE, "model_type": "llama", "num_key_value_heads": 1}
    model = build_causal_lm(BackboneSpec(config=config, lora={"r": 4} if lora else None), tokenizer)
    ids, mask, response_mask = grouped_rows(tokenizer)
    (whole, whole_grad), (chunked, chunked_grad) = [
        logprobs_and_grads(model, ids, mask, response_mask, group_size=group_size, chunk=chunk) for chunk in (0, 4)]
    assert calls == [(int(response_mask.sum()), 4)]
    assert torch.allclose(whole * response_mask, chunked * response_mask, atol=1e-5, rtol=0)
    assert (whole_grad - chunked_grad).abs().max() <= 1e-5 * whole_grad.abs().max()


LINEAR = {"head_dim": 16, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
          "linear_num_value_heads": 2, "layer_types": ["linear_attention", "full_attention"]}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
LINEAR_FULL = ["linear_attention", "full_attention"]                  # a recurrent layer, then attention
HYBRIDS = {                                   # each family's recurrent layer beside an attention layer, tiny
    "qwen3_5_text": LINEAR, "qwen3_5_moe_text": {**LINEAR, **MOE}, "qwen3_next": {**LINEAR, **MOE},
    "lfm2": {"full_attn_idxs": [1]},                                             # (layer 0: a convolution)
    "nemotron_h": {"hybrid_override_pattern": "M*-", "num_hidden_layers": 3, "head_dim": 16, "mamba_num_heads": 4,
                   "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1},   # (Mamba, attention, MLP)
    "lfm2_moe": {**MOE, "num_experts": 4, "num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "kimi_linear": {**MOE, "num_local_experts": 4, "n_routed_experts": 4, "first_k_dense_replace": 1,
                    "layer_types": LINEAR_FULL, "linear_head_dim": 8, "linear_num_heads": 2, "num_key_value_heads": 2},
    "olmo_hybrid": {"layer_types": LINEAR_FULL, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                    "linear_key_head_dim": 8, "linear_value_head_dim": 8},
    "bailing_hybrid": {**MOE, "num_local_experts": 4, "layer_types": LINEAR_FULL, "layer_group_size": 2,
                       "num_key_value_heads": 2},
    "minimax": {"num_local_experts": 4, "num_experts_per_tok": 2, "layer_types": LINEAR_FULL},   # (lightning attention)
    "jamba": {"num_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 8,
              "use_mamba_kernels": False},                                  # (Mamba, attention)
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1},
}


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_hybrid_decoders_take_the_chunked_head_in_one_row_per_response(tokenizer, model_type):
    """Qwen3.5, Qwen3-Next, LFM2 (dense and MoE), Nemotron-H, Kimi Linear, OLMo Hybrid, Ling/Ring hybrid (`bailing_hybrid`),
    MiniMax-Text-01, Jamba and Bamba (`forward.RECURRENT_SPLIT_HEAD`, each listed one tested here): the
    chunked LM head (`splits_head`) but one row per response (`shares_prompts` is false: their linear-attention,
    convolution or Mamba layers carry state along a row). K = 3 responses per prompt, chunks of 4 tokens: the same
    logprobs as the model's own logits (1e-5) and the same gradient of their masked sum (1e-5 relative)."""
    from modules.forward import RECURRENT_SPLIT_HEAD, splits_head
    from modules.layout import shares_prompts

    assert set(HYBRIDS) == set(RECURRENT_SPLIT_HEAD)
    config = {**TINY_SHAPE, "model_type": model_type, "num_key_value_heads": 1, "num_hidden_layers": 2,
              **HYBRIDS[model_type]}
    model = build_causal_lm(BackboneSpec(config=config), tokenizer)
    ids, mask, response_mask = grouped_rows(tokenizer)
    assert splits_head(model) and not shares_prompts(model, ids, mask, 5, 3)
    model.zero_grad()
    own = F.token_logprobs(lm_logits(model, ids, mask)[:, 4:-1], ids[:, 5:], 0.7)
    (own * response_mask).sum().backward()
    own_grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    chunked, chunked_grad = logprobs_and_grads(model, ids, mask, response_mask, group_size=3, chunk=4)
    assert torch.allclose(own.detach() * response_mask, chunked * response_mask, atol=1e-5, rtol=0)
    assert own_grad.shape == chunked_grad.shape and (own_grad - chunked_grad).abs().max() <= 1e-5 * own_grad.abs().max()


def test_sft_loss_in_chunks_equals_cross_entropy_over_the_whole_logits(tokenizer):
    """SFT's loss through `target_logprobs` in chunks of 3 tokens against torch's cross-entropy on the full
    logits of the response tokens (prompt and padding masked), in value and gradient."""
    from modules.forward import target_logprobs

    torch.manual_seed(0)
    model = build_causal_lm(BackboneSpec(config={**TINY_SHAPE, "model_type": "llama"}), tokenizer)
    ids, mask, response_mask = grouped_rows(tokenizer)
    loss_mask = torch.cat([torch.zeros(ids.shape[0], 5, dtype=torch.long), response_mask], 1)
    losses, grads = [], []
    for chunk in (None, 3):
        model.zero_grad()
        if chunk is None:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=F.position_ids_from_mask(mask)).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            loss = F.masked_mean(nll, loss_mask[:, 1:])
        else:
            loss = F.response_only_nll(target_logprobs(model, ids, mask, loss_mask, chunk=chunk), loss_mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()
