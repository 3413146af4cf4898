"""The shared-prompt layouts (`modules.layout`) on literal masks."""
import pytest
import torch

from modules import layout as L
from modules.backbone import BackboneSpec, build_causal_lm
from tests.helpers import TINY_SHAPE, grouped_rows, logprobs_and_grads


def test_shared_prompt_layout_on_one_group_with_a_padded_prompt_and_an_early_eos():
    """P = 2, L = 2, K = 2. Row a = [pad p1 a0 a1], row b = [pad p1 b0 pad] (b stopped after b0). Packed columns:
    [pad p1 | a0 a1 | b0 b1] = flat indices [0 1 | 2 3 | 6 7] (row b starts at 4).
    Positions are each row's own (cumsum of its mask - 1, clamped): a [0 0 1 2], b [0 0 1 1] -> [0 0 1 2 1 1].
    Attention (query rows, key columns): pad sees only itself; p1 sees p1; a0 sees p1 a0; a1 sees p1 a0 a1;
    b0 sees p1 b0 (not a's tokens); b1 (padding) sees p1 b0 and itself.
    keep: p1 predicts a0, a0 predicts a1, p1 predicts b0, b0 predicts b1 -> [1 2 1 4]."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    gather, positions, allowed, keep = L.shared_prompt_layout(mask, prompt_length=2, group_size=2)
    assert gather.tolist() == [[0, 1, 2, 3, 6, 7]]
    assert positions.tolist() == [[0, 0, 1, 2, 1, 1]]
    assert allowed.shape == (1, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [0, 1, 0, 0, 0, 0],
                                            [0, 1, 1, 0, 0, 0],
                                            [0, 1, 1, 1, 0, 0],
                                            [0, 1, 0, 0, 1, 0],
                                            [0, 1, 0, 0, 1, 1]]
    assert keep.tolist() == [1, 2, 1, 4]


def test_shared_prompt_layout_puts_each_group_in_its_own_row():
    """Two groups of K = 2, P = 1, L = 1, no padding: rows 0, 1 share prompt 0 and rows 2, 3 prompt 1. Each row of
    the (4, 2) input starts at 2 * row, so group 0 packs [0 | 1 3] and group 1 [4 | 5 7]; positions [0 1 1]."""
    gather, positions, allowed, keep = L.shared_prompt_layout(torch.ones(4, 2, dtype=torch.long), 1, 2)
    assert gather.tolist() == [[0, 1, 3], [4, 5, 7]]
    assert positions.tolist() == [[0, 1, 1], [0, 1, 1]]
    assert allowed[:, 0].int().tolist() == [[[1, 0, 0], [1, 1, 0], [1, 0, 1]]] * 2
    assert keep.tolist() == [0, 0]


def test_packed_prompt_layout_literal():
    """Docstring example: prompt [pad p1], response a = [a0 pad], b = [b0 b1] pack to [p1 a0 b0 b1]."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    gather, position_ids, allowed, source = L.packed_prompt_layout(mask, prompt_length=2, group_size=2)
    assert gather.tolist() == [[1, 2, 6, 7]] and position_ids.tolist() == [[0, 1, 1, 2]]
    assert allowed.shape == (1, 1, 4, 4)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0],     # p1
                                            [1, 1, 0, 0],     # a0: p1, itself
                                            [1, 0, 1, 0],     # b0: p1, itself (not a0)
                                            [1, 0, 1, 1]]     # b1: p1, b0, itself
    real = mask[:, 2:].bool()
    assert source[real].tolist() == [0, 0, 2]                 # a0 <- p1, b0 <- p1, b1 <- b0
    # two groups of different lengths: rows as long as the longer one, the shorter one's tail padded
    two = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]])
    gather, position_ids, allowed, source = L.packed_prompt_layout(two, prompt_length=2, group_size=2)
    assert gather.shape == (2, 5) and gather[0].tolist() == [0, 1, 2, 6, 7]
    assert gather[1, :3].tolist() == [9, 10, 14] and position_ids[1, :3].tolist() == [0, 1, 1]
    assert not allowed[1, 0, :3, 3:].any()                    # nobody attends to the padded tail
    assert source[two[:, 2:].bool()].tolist() == [1, 1, 3, 5, 5]   # the second row starts at packed index 5


def test_packed_last_token_literal():
    """Docstring example: rows ending at a0 and b1 of [p1 a0 b0 b1] read packed indices [1, 3]; in the two-group
    layout above, the second group starts at 5; a row with no response token reads its prompt's last token, which
    the group's first row holds."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    gather = L.packed_prompt_layout(mask, 2, 2)[0]
    assert L.packed_last_token(mask, 2, 2, gather).tolist() == [1, 3]
    two = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]])
    gather = L.packed_prompt_layout(two, 2, 2)[0]                  # [[p0 p1 a0 b0 b1], [p1 c0 d0 pad pad]]
    assert L.packed_last_token(two, 2, 2, gather).tolist() == [2, 4, 6, 7]
    empty = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])              # row 1: no response token
    gather = L.packed_prompt_layout(empty, 2, 2)[0]
    assert gather.tolist() == [[0, 1, 2]]
    assert L.packed_last_token(empty, 2, 2, gather).tolist() == [2, 1]


MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
MLA = {**MOE, "n_routed_experts": 4, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,   # DeepSeek's latent
       "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
       "num_key_value_heads": 2}                                            # attention: as many key/value heads
ARCHITECTURES = {                                     # (the tiny shape's extra fields each model type needs)
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {}, "smollm3": {}, "olmo2": {},
    "olmo3": {"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}, "phi3": {},
    "gemma3_text": {"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"], "head_dim": 16},
    "qwen2_moe": {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 32}, "qwen3_moe": {**MOE, "num_experts": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"]},
    "glm4_moe": {**MOE, "n_routed_experts": 4, "first_k_dense_replace": 1, "head_dim": 16, "n_group": 1, "topk_group": 1},
    "glm": {"head_dim": 16}, "glm4": {"head_dim": 16}, "helium": {"head_dim": 16}, "exaone4": {"sliding_window": 64},
    "deepseek_v2": MLA, "deepseek_v3": MLA, "glm4_moe_lite": MLA, "ernie4_5_moe": {**MOE, "moe_num_experts": 4},
    "minimax_m2": {**MOE, "num_local_experts": 4}, "gemma": {"head_dim": 16},
}


def tiny_model(tokenizer, model_type: str, attention: str = "sdpa", lora: bool = False, **extra):
    """A 2-layer random-init model of `model_type` at the tiny shape (a 1-head key/value: grouped-query attention)."""
    config = {**TINY_SHAPE, "model_type": model_type, "attn_implementation": attention, "num_key_value_heads": 1,
              "num_hidden_layers": 2, **ARCHITECTURES.get(model_type, {}), **extra}
    return build_causal_lm(BackboneSpec(config=config, lora={"r": 4} if lora else None), tokenizer)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("model_type,attention", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                                  ("qwen2", "sdpa"), ("qwen3", "eager"), ("llama-lora", "sdpa")] +
                         [(name, "sdpa") for name in L.SHARED_PROMPT_MODELS if name not in ("llama", "mistral", "qwen2",
                                                                                            "qwen3", "gpt_oss")] +
                         [("gpt_oss", "eager"), ("gpt_neox", "eager"), ("gpt2", "eager"), ("opt", "eager")])
def test_shared_prompt_logprobs_and_gradients_equal_one_row_per_response(tokenizer, model_type, attention, packed):
    """Each prompt computed once for its K = 3 responses (`group_size=3`) against one row per response: the same
    logprobs on every response token (1e-5) and the same gradient of their masked sum (1e-5 relative to the
    largest), for each decoder of `SHARED_PROMPT_MODELS` (dense and mixture-of-experts) and attention implementation
    that shares prompts, and a LoRA policy; packed (the default: padding dropped, the decoder sees fewer columns
    than the padded layout's P + K L) and padded (what a model partitioned by DeepSpeed ZeRO-3 runs; `prompt_layout:
    padded`). Both equal the model's own logits' (its forward on one row per response), so its LM head on its last
    hidden states is its logits. The packed path runs the LM head on the real response tokens only and returns
    exactly 0 after each response."""
    from modules.forward import lm_logits
    from modules.functional import token_logprobs
    from modules.layout import shares_prompts

    model = tiny_model(tokenizer, model_type.split("-")[0], attention, lora="lora" in model_type)
    ids, mask, response_mask = grouped_rows(tokenizer)
    assert model.config._attn_implementation == attention and shares_prompts(model, ids, mask, 5, 3)
    widths, head_rows = [], []
    model.get_decoder().register_forward_pre_hook(          # (GPT-2's own forward passes the ids positionally)
        lambda m, a, kw: widths.append((kw["input_ids"] if "input_ids" in kw else a[0]).shape[1]), with_kwargs=True)
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_rows.append(a[0].shape[:-1].numel()))
    (plain, plain_grad), (shared, shared_grad) = [
        logprobs_and_grads(model, ids, mask, response_mask, group_size=group_size, packed=packed) for group_size in (1, 3)]
    assert torch.isfinite(shared).all()
    assert torch.allclose(plain * response_mask, shared * response_mask, atol=1e-5, rtol=0)
    assert (plain_grad - shared_grad).abs().max() <= 1e-5 * plain_grad.abs().max()
    L = ids.shape[1] - 5
    real_per_group = (mask.view(-1, 3, ids.shape[1])[:, :, 5:].sum((1, 2)) + mask.view(-1, 3, ids.shape[1])[:, 0, :5].sum(1))
    assert widths[-1] == (int(real_per_group.max()) if packed else 5 + 3 * L)
    if packed:                                           # the LM head sees the real response tokens alone
        assert (shared[response_mask == 0] == 0).all() and head_rows[-1] == int(response_mask.sum())
    else:
        assert head_rows[-1] == 2 * 3 * L                # groups x K L predicting positions
    with torch.no_grad():
        own = token_logprobs(lm_logits(model, ids, mask)[:, 4:-1], ids[:, 5:], 0.7)
    assert torch.allclose(own * response_mask, shared * response_mask, atol=1e-5, rtol=0)


def test_a_model_whose_logits_are_not_its_head_on_its_states_would_fail_that_check(tokenizer, monkeypatch):
    """Why Granite (logits divided by `logits_scaling`) is not in `SHARED_PROMPT_MODELS`: listed, its logprobs from
    the head on the hidden states would differ from its own logits' by far more than the check's 1e-5, as they do
    from the one-row-per-response path that keeps its own logits (not listed, the default)."""
    from modules.forward import lm_logits, response_logprobs
    from modules.functional import token_logprobs

    model = tiny_model(tokenizer, "granite", logits_scaling=4.0)
    ids, mask, response_mask = grouped_rows(tokenizer)
    with torch.no_grad():
        own = token_logprobs(lm_logits(model, ids, mask)[:, 4:-1], ids[:, 5:], 0.7) * response_mask
        assert torch.allclose(response_logprobs(model, ids, mask, 5, 0.7, group_size=3) * response_mask, own, atol=1e-6)
        monkeypatch.setattr(L, "SHARED_PROMPT_MODELS", L.SHARED_PROMPT_MODELS + ("granite",))
        assert (response_logprobs(model, ids, mask, 5, 0.7, group_size=3) * response_mask - own).abs().max() > 1e-2


def test_a_soft_capped_gemma_3_shares_prompts_with_its_own_logits(tokenizer, monkeypatch):
    """Gemma 3 with `final_logit_softcapping` (its checkpoints leave it null): the head is not applied apart
    (`splits_head`), so its prompts are shared in the padded layout through its own forward, and its logprobs are
    its own soft-capped logits' (1e-5); with the head applied apart they would differ by more than 1e-2."""
    import modules.forward
    from modules.forward import lm_logits, response_logprobs, splits_head
    from modules.functional import token_logprobs

    model = tiny_model(tokenizer, "gemma3_text", final_logit_softcapping=0.02)   # (below the tiny logits)
    ids, mask, response_mask = grouped_rows(tokenizer)
    assert not splits_head(model) and splits_head(tiny_model(tokenizer, "gemma3_text"))
    with torch.no_grad():
        own = token_logprobs(lm_logits(model, ids, mask)[:, 4:-1], ids[:, 5:], 0.7) * response_mask
        assert torch.allclose(response_logprobs(model, ids, mask, 5, 0.7, group_size=3) * response_mask, own, atol=1e-5)
        monkeypatch.setattr(modules.forward, "splits_head", lambda model: True)
        assert (response_logprobs(model, ids, mask, 5, 0.7, group_size=3) * response_mask - own).abs().max() > 1e-2


def test_prompts_are_shared_only_where_the_layout_is_exact(tokenizer):
    """Falls back to one row per response when a group's rows hold different prompts, when groups are not whole,
    for a sliding window shorter than the rows, for an attention implementation that ignores custom masks, and for a
    mixture of experts that computes its router loss in its forward (`output_router_logits`)."""
    from modules.layout import shares_prompts

    ids, mask, _ = grouped_rows(tokenizer)
    llama = build_causal_lm(BackboneSpec(config={**TINY_SHAPE, "model_type": "llama"}), tokenizer)
    assert shares_prompts(llama, ids, mask, 5, 3)
    other = ids.clone()
    other[1, 4] += 1
    assert not shares_prompts(llama, other, mask, 5, 3)
    assert not shares_prompts(llama, ids[:5], mask[:5], 5, 3)
    for window, shared in ((8, False), (11, True)):
        mistral = build_causal_lm(BackboneSpec(config={**TINY_SHAPE, "model_type": "mistral",
                                                       "sliding_window": window}), tokenizer)
        assert shares_prompts(mistral, ids, mask, 5, 3) == shared
    llama.config._attn_implementation = "flash_attention_2"
    assert not shares_prompts(llama, ids, mask, 5, 3)
    assert shares_prompts(tiny_model(tokenizer, "qwen3_moe"), ids, mask, 5, 3)
    assert not shares_prompts(tiny_model(tokenizer, "qwen3_moe", output_router_logits=True), ids, mask, 5, 3)


def test_rl_module_shares_prompts_by_default_with_the_same_updates(tmp_path, sft_dir, monkeypatch):
    """The same tiny run (K = 2) with share_prompts on (the default) and off: the shared path runs (counted; packed,
    as the model is whole), and the weights after the first rollout agree within 1e-4."""
    import modules.forward
    from tests.helpers import tiny_rl_config
    from train import cli_main

    calls = []
    shared = modules.forward._packed_prompt_logprobs
    monkeypatch.setattr(modules.forward, "_packed_prompt_logprobs", lambda *a: calls.append(1) or shared(*a))
    weights = {}
    for share in (True, False):
        calls.clear()
        config = tiny_rl_config(tmp_path, sft_dir, name=f"share-{share}.yaml", model={"share_prompts": share},
                                limit_train_batches=1)
        cli = cli_main(["fit", "--config", config])
        weights[share] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
        assert len(calls) == (5 if share else 0)      # pi_ref + 2 epochs x 2 minibatches (pi_old: the sampler)
    assert (weights[True] - weights[False]).abs().max() < 1e-4


@pytest.mark.parametrize("model_type,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen3_moe", "sdpa"),
                                                  ("mixtral", "eager"), ("deepseek_v3", "sdpa"), ("exaone4", "sdpa"),
                                                  ("gpt_neox", "sdpa"), ("gpt2", "eager"), ("opt", "sdpa"),
                                                  ("gemma", "sdpa"), ("phi", "sdpa"), ("nemotron", "sdpa"),
                                                  ("persimmon", "sdpa")])
def test_shared_prompt_rewards_equal_one_row_per_response(tokenizer, model_type, attention):
    """A reward model (scalar head) scores K = 3 responses per prompt with each prompt computed once and no
    padding (the backbone sees 18 columns, not the padded layout's P + K L = 23): the same rewards (1e-5) as one row
    per response, read at each response's last real token (rows 1 and 4 stop early); dense, mixture of experts
    and DeepSeek's latent attention."""
    from modules.backbone import build_scorer
    from modules.forward import scorer_head, sequence_rewards

    config = {**TINY_SHAPE, "model_type": model_type, "attn_implementation": attention,
              **ARCHITECTURES.get(model_type, {})}
    scorer = build_scorer(BackboneSpec(config=config), tokenizer).eval()
    ids, mask, _ = grouped_rows(tokenizer)
    widths = []
    scorer_head(scorer)[0].register_forward_pre_hook(
        lambda m, a, kw: widths.append((kw["input_ids"] if "input_ids" in kw else a[0]).shape[1]), with_kwargs=True)
    with torch.no_grad():
        plain, shared = sequence_rewards(scorer, ids, mask), sequence_rewards(scorer, ids, mask, 5, 3)
    assert widths == [11, 18]                 # one row per response: P + L; packed: 18 real tokens, not P + K L = 23
    assert shared.shape == (6,) and not torch.allclose(plain, plain[:1].expand(6))
    assert torch.allclose(plain, shared, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_pythia_policy_trains_end_to_end_with_each_prompt_computed_once(tmp_path, sft_dir, monkeypatch):
    """The tiny RL config (P3O, K = 2) with a random-init GPT-NeoX policy, the architecture of the `hh/` and
    `tldr/` configs' Pythia-1B: it trains to a finite loss, and its logprob passes (pi_ref, the updates) go through
    the packed layout, each prompt computed once for its responses and the LM head in chunks (before, GPT-NeoX ran
    one row per response with its whole logits)."""
    import modules.forward as FW
    from tests.helpers import tiny_rl_config
    from train import cli_main

    shared, original = [], FW._packed_prompt_logprobs
    monkeypatch.setattr(FW, "_packed_prompt_logprobs", lambda model, *a, **kw: shared.append(model.config.model_type)
                        or original(model, *a, **kw))
    pythia = {**TINY_SHAPE, "model_type": "gpt_neox", "rotary_pct": 0.25}          # (Pythia: rotary on a quarter)
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, model={"policy": {"pretrained": None,
                                                                                           "config": pythia}})])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.policy.config.model_type == "gpt_neox" and len(shared) >= 8 and set(shared) == {"gpt_neox"}
