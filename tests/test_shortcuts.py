"""Work reductions keep the maths: each shortcut against the computation it replaces."""
import pytest
import torch

from modules import functional as F
from modules.backbone import BackboneSpec, build_causal_lm
from modules.forward import lm_logits, response_logprobs
from tests.conftest import TINY

TINY_SHAPE = {k: v for k, v in TINY.items() if k != "model_type"}


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


def test_the_samplers_logprobs_equal_a_forward_pass_over_the_rollout(tiny_spec, tokenizer):
    """pi_old recorded while sampling (T = 0.7, left-padded prompts of different lengths, 4 samples each, top-k 5
    so that the warpers change what is drawn but not the recorded logits / T) equals `response_logprobs` over the
    finished rollout on every response token, within float32 rounding (KV-cached decode vs one full forward)."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.sampling import SamplingConfig, sample

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    texts = ["write a review of the cafe :", "write a review of the hotel , please :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)} for t in texts])
    torch.manual_seed(0)
    roll = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                  SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=12), num_samples=4, record_logprobs=True)
    with torch.no_grad():
        forward = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 0.7)
    assert roll.old_logp.shape == forward.shape == roll.response_mask.shape
    assert torch.allclose(roll.old_logp, forward * roll.response_mask, atol=1e-5, rtol=0)
    assert (roll.old_logp[roll.response_mask.bool()] < 0).all()


@pytest.mark.slow
def test_rl_module_takes_pi_old_from_the_sampler_at_fp32_and_from_a_forward_pass_when_asked(tmp_path, sft_dir):
    """The same tiny run with old_logprobs 'sampler' (the fp32 default) and 'forward': the rollouts' pi_old agree
    within float rounding, so the first rollout's updates agree too (weights within 1e-4 after rollout 1)."""
    from tests.helpers import tiny_rl_config
    from train import cli_main

    weights = {}
    for source in ("sampler", "forward"):
        config = tiny_rl_config(tmp_path, sft_dir, name=f"{source}.yaml", model={"old_logprobs": source},
                                limit_train_batches=1)
        cli = cli_main(["fit", "--config", config])
        assert cli.model.logprobs_from_sampler == (source == "sampler")
        weights[source] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
    assert (weights["sampler"] - weights["forward"]).abs().max() < 1e-4


def test_fused_adamw_matches_the_per_tensor_loop(tiny_spec, tokenizer):
    """Configs set AdamW(fused=True): one kernel over all tensors instead of a Python loop per tensor (its speed
    is in the end-to-end number of benchmarks/throughput.py, not timed here). Three steps from the same gradients
    give the same weights within float32 rounding."""
    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    optimizers = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, foreach=False),
                  torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True)]
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_clipping_scales_by_the_norm_the_update_computed_exactly_as_lightning_clips(tmp_path, sft_dir, monkeypatch):
    """`update` computes the gradient norm once (for the non-finite check and train/grad_norm) and clips with it
    (`clip_grads_with_norm_`); Lightning's path computes it again (`clip_grad_norm_`). With a max norm small enough
    that every step clips, one rollout through each path ends with bit-equal weights."""
    import modules.rl
    from tests.helpers import tiny_rl_config
    from train import cli_main

    weights = {}
    for path in ("direct", "lightning"):
        if path == "lightning":
            monkeypatch.setattr(modules.rl, "PLAIN_GRADIENTS", ())
        config = tiny_rl_config(tmp_path, sft_dir, name=f"{path}.yaml", model={"max_grad_norm": 1e-3},
                                limit_train_batches=1)
        cli = cli_main(["fit", "--config", config])
        assert cli.trainer.callback_metrics["train/grad_norm"] > 1e-3           # so the clipping was active
        weights[path] = torch.cat([p.detach().flatten() for p in cli.model.policy.parameters()])
    assert torch.equal(weights["direct"], weights["lightning"])


def test_bf16_mixed_on_cpu_with_fused_adamw_and_clipping_keeps_logprobs_within_its_tolerance(tmp_path, sft_dir):
    """bf16 autocast on CPU (`configs/presets/bf16.yaml`; CPUs with native bf16 matmul run it faster, see the
    README's speed section) with the configs' fused AdamW and gradient clipping: Lightning's mixed-precision
    plugin refused to clip for a fused optimizer (RuntimeError) although bf16 has no loss scaler.
    Tolerance: autocast rounds every matmul's inputs to bf16 (8 significant bits: relative error <= 2^-9 ~ 0.002
    per rounding), so a logprob moves by a few times 0.002 x the size of the logits. On the tiny model (logits of
    order 1) the rollout's pi_ref logprobs differ from fp32 by a mean of 3e-4 and a max of 9e-4 nats (measured);
    we accept a mean of 3e-3 and a max of 3e-2 nats. pi_old and pi_ref come from forward passes
    under the same autocast as the update ('auto'), so the first minibatch's ratios are 1 up to the same rounding."""
    from lightning.pytorch.callbacks import LambdaCallback

    from tests.helpers import tiny_rl_config
    from train import cli_main

    config = tiny_rl_config(tmp_path, sft_dir, model={"optimizer": {"init_args": {"fused": True}}},
                            precision="bf16-mixed", limit_train_batches=1)
    cli = cli_main(["--config", config], run=False)
    kept = []
    cli.trainer.callbacks.append(LambdaCallback(   # after OnPolicyRollout: keeps the rollout
        on_train_batch_start=lambda trainer, module, *args: kept.append(module.rollout)))
    cli.model.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in cli.model.policy.parameters()])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model, roll = cli.model, kept[0]
    assert not model.logprobs_from_sampler
    after = torch.cat([p.detach().flatten() for p in model.policy.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    mask = roll.response_mask.bool()
    with model.reference_model() as ref, torch.no_grad():
        fp32 = response_logprobs(ref, roll.input_ids, roll.attention_mask, roll.prompt_length, model.sampling.temperature)
    err = (roll.ref_logp - fp32)[mask].abs()
    assert err.mean() < 3e-3 and err.max() < 3e-2, (err.mean(), err.max())


def _grouped_rows(tokenizer, K: int = 3):
    """Two prompts (the first left-padded by 2) x K responses of 6 tokens; response 1 stops after 3 tokens and
    response 4 after 1 (EOS, then padding): the layouts that differ from one row per response."""
    torch.manual_seed(0)
    prompts = torch.randint(3, 40, (2, 5)).repeat_interleave(K, 0)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[:K, :2] = 0
    responses = torch.randint(3, 40, (2 * K, 6))
    response_mask = torch.ones_like(responses)
    response_mask[1, 3:] = 0
    response_mask[4, 1:] = 0
    responses[response_mask == 0] = tokenizer.pad_token_id
    return torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1), response_mask


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("model_type,attention", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                                  ("qwen2", "sdpa"), ("qwen3", "eager"), ("llama-lora", "sdpa")])
def test_shared_prompt_logprobs_and_gradients_equal_one_row_per_response(tokenizer, model_type, attention, packed):
    """Each prompt computed once for its K = 3 responses (`group_size=3`) against one row per response: the same
    logprobs on every response token (1e-5) and the same gradient of their masked sum (1e-5 relative to the
    largest), for each decoder and attention implementation that shares prompts, and a LoRA policy; packed (the
    default: padding dropped, the decoder sees fewer columns than the padded layout's P + K L) and padded (what a
    model partitioned by DeepSpeed ZeRO-3 runs; `prompt_layout: padded`). The packed path runs the LM head on the real
    response tokens only and returns exactly 0 after each response."""
    from modules.layout import shares_prompts

    config = {**TINY_SHAPE, "model_type": model_type.split("-")[0], "attn_implementation": attention,
              "num_key_value_heads": 1}
    if model_type == "mistral":
        config["sliding_window"] = None
    model = build_causal_lm(BackboneSpec(config=config, lora={"r": 4} if "lora" in model_type else None), tokenizer)
    ids, mask, response_mask = _grouped_rows(tokenizer)
    assert model.config._attn_implementation == attention and shares_prompts(model, ids, mask, 5, 3)
    widths, head_rows = [], []
    model.get_decoder().register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_rows.append(a[0].shape[:-1].numel()))
    results = []
    for group_size in (1, 3):
        model.zero_grad()
        logp = response_logprobs(model, ids, mask, 5, 0.7, group_size=group_size, packed=packed)
        (logp * response_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach(), grads))
    (plain, plain_grad), (shared, shared_grad) = results
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


def test_prompts_are_shared_only_where_the_layout_is_exact(tokenizer):
    """Falls back to one row per response when a group's rows hold different prompts, when groups are not whole,
    for a sliding window shorter than the rows, and for an attention implementation that ignores custom masks."""
    from modules.layout import shares_prompts

    ids, mask, _ = _grouped_rows(tokenizer)
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


def test_sampling_computes_each_prompt_once_and_draws_the_same_responses(tiny_spec, tokenizer):
    """K = 4 samples of 2 left-padded prompts, from the same random state with share_prompts on (the default) and
    off: the shared run's first forward is the prompts' prefill, 2 rows of P - 1 tokens (not 8 rows of P); both
    runs draw the same tokens and record the same logprobs (1e-5)."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.sampling import SamplingConfig, sample

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    texts = ["write a review of the cafe :", "write a review of the hotel , please :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)} for t in texts])
    P = batch.prompt_ids.shape[1]
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    rolls = {}
    for share in (True, False):
        shapes.clear()
        torch.manual_seed(0)
        rolls[share] = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                              SamplingConfig(temperature=0.7, max_new_tokens=10), num_samples=4, record_logprobs=True,
                              share_prompts=share)
        assert shapes[:2] == ([(2, P - 1), (8, 1)] if share else [(8, P), (8, 1)])
    assert torch.equal(rolls[True].input_ids, rolls[False].input_ids)
    assert torch.allclose(rolls[True].old_logp, rolls[False].old_logp, atol=1e-5, rtol=0)


def test_cpu_runs_reuse_freed_memory_unless_switched_off(monkeypatch, tmp_path, sft_dir):
    """The CLI applies `reuse_freed_memory` when the trainer runs on CPU. On Linux/glibc it returns True (both
    mallopt calls accepted), with P3O_REUSE_FREED_MEMORY=0 it does nothing and returns False."""
    import train
    from tests.helpers import tiny_rl_config

    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: calls.append(1) or True)
    train.cli_main(["--config", tiny_rl_config(tmp_path, sft_dir)], run=False)
    assert calls == [1]
    monkeypatch.undo()
    assert train.reuse_freed_memory() is (train.sys.platform.startswith("linux"))
    monkeypatch.setenv("P3O_REUSE_FREED_MEMORY", "0")
    assert train.reuse_freed_memory() is False


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rewards_equal_one_row_per_response(tokenizer, attention):
    """A reward model (scalar head) scores K = 3 responses per prompt with each prompt computed once and no
    padding (the backbone sees 18 columns, not the padded layout's P + K L = 23): the same rewards (1e-5) as one row
    per response, read at each response's last real token (rows 1 and 4 stop early)."""
    from modules.backbone import build_scorer
    from modules.forward import scorer_head, sequence_rewards

    scorer = build_scorer(BackboneSpec(config={**TINY_SHAPE, "attn_implementation": attention}), tokenizer).eval()
    ids, mask, _ = _grouped_rows(tokenizer)
    widths = []
    scorer_head(scorer)[0].register_forward_pre_hook(
        lambda m, a, kw: widths.append((kw["input_ids"] if "input_ids" in kw else a[0]).shape[1]), with_kwargs=True)
    with torch.no_grad():
        plain, shared = sequence_rewards(scorer, ids, mask), sequence_rewards(scorer, ids, mask, 5, 3)
    assert widths == [11, 18]                 # one row per response: P + L; packed: 18 real tokens, not P + K L = 23
    assert shared.shape == (6,) and not torch.allclose(plain, plain[:1].expand(6))
    assert torch.allclose(plain, shared, atol=1e-5, rtol=0)


def test_the_sampler_draws_from_the_warped_distribution_and_records_the_raw_logprobs():
    """`_Draw` (inverse CDF instead of torch.multinomial): over 40000 rows of the same 6 logits at T = 0.7, top-k 4,
    top-p 0.9, the token frequencies match HF's warped softmax within 0.01, tokens the warpers remove are never
    drawn, generate's argmax of the returned scores is the drawn token, and the recorded logprob is
    log_softmax(logits / T) at it (before top-k / top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from modules.sampling import SamplingConfig, _Draw

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.9]]).repeat(40_000, 1)
    ids = torch.zeros(40_000, 1, dtype=torch.long)
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(4), TopPLogitsWarper(0.9)])
    expected = torch.softmax(warp(ids, logits.clone()), -1)[0]
    assert (expected == 0).sum() >= 2                                   # the warpers removed some tokens
    torch.manual_seed(0)
    draw = _Draw(SamplingConfig(temperature=0.7, top_k=4, top_p=0.9), record=True)
    scores = draw(ids, logits.clone())
    tokens = scores.argmax(-1)
    assert (scores == 0).sum(-1).eq(1).all()
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert torch.allclose(freq, expected, atol=0.01) and (freq[expected == 0] == 0).all()
    raw = torch.log_softmax(logits[0] / 0.7, -1)
    assert torch.allclose(draw.result(tokens[:, None])[:, 0], raw[tokens], atol=1e-6)
    greedy = _Draw(SamplingConfig(do_sample=False), record=False)
    assert (greedy(ids[:2], logits[:2].clone()).argmax(-1) == 0).all()


def test_prepacked_linears_give_the_same_forward_and_draws_and_apply_only_to_cpu_fp32(tiny_spec, tokenizer):
    """Inside `prepacked_linears` a tiny model's logits equal the plain forward's within 1e-5 (Llama, Llama + LoRA,
    Qwen2 for linears with a bias), the
    layers' own forwards come back afterwards, and `sample` draws identical tokens from the same random state with
    `prepack_weights` on and off (recorded logprobs within 1e-5). Under CPU bf16 autocast, and for bf16 weights, it
    computes in bf16 like the plain forward (logits within 0.02 at a scale of ~0.5) where oneDNN has bf16 kernels and
    does not apply where it has none; under fp16 autocast it changes nothing."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.cpu import prepacked_linears
    from modules.sampling import SamplingConfig, sample

    ids = torch.randint(3, 40, (3, 7))
    patched = lambda model: [m for m in model.modules() if "forward" in m.__dict__]  # noqa: E731
    qwen2 = BackboneSpec(config={**TINY_SHAPE, "model_type": "qwen2", "num_key_value_heads": 1})
    for spec in (tiny_spec, BackboneSpec(config=tiny_spec.config, lora={"r": 4}), qwen2):
        model = build_causal_lm(spec, tokenizer).eval()
        if spec is qwen2:                                           # random biases (they start at 0)
            biases = [m.bias for m in model.modules() if type(m) is torch.nn.Linear and m.bias is not None]
            assert biases and [torch.nn.init.normal_(b) for b in biases]
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with prepacked_linears(model, 3):
                assert len(patched(model)) == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
                fast = model(input_ids=ids).logits
        assert patched(model) == [] and torch.allclose(fast, plain, atol=1e-5, rtol=0)

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    texts = ["write a review of the cafe :", "write a review of the hotel , please :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)} for t in texts])
    rolls = {}
    for prepack in (True, False):
        torch.manual_seed(0)
        rolls[prepack] = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                                SamplingConfig(temperature=0.7, max_new_tokens=10, prepack_weights=prepack),
                                num_samples=4, record_logprobs=True)
    assert torch.equal(rolls[True].input_ids, rolls[False].input_ids)
    assert torch.allclose(rolls[True].old_logp, rolls[False].old_logp, atol=1e-5, rtol=0)

    # bf16 prepacking needs oneDNN's bf16 kernels (AVX512-BF16 / AMX); on CPUs without them it must not apply.
    n_linears = sum(type(m) is torch.nn.Linear for m in model.modules()) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(input_ids=ids).logits
            with prepacked_linears(model, 3):
                assert len(patched(model)) == n_linears
                fast = model(input_ids=ids).logits
        assert fast.dtype == plain.dtype and (fast.float() - plain.float()).abs().max() < 0.02
        with torch.autocast("cpu", dtype=torch.float16), prepacked_linears(model, 3):
            assert patched(model) == []
        model.to(torch.bfloat16)
        plain = model(input_ids=ids).logits
        with prepacked_linears(model, 3):
            assert len(patched(model)) == n_linears
            fast = model(input_ids=ids).logits
        assert fast.dtype == torch.bfloat16 and (fast.float() - plain.float()).abs().max() < 0.02
    assert patched(model) == []


def test_sample_draws_the_first_token_from_the_policys_distribution(tiny_spec, tokenizer):
    """End to end through `sample` and HF's `generate`: 20000 one-token samples of one prompt at T = 0.5, top-k 20;
    each token's frequency matches softmax(top-k(logits / T)) at the prompt's last position within 4.5 standard
    errors (+1e-3), and no token outside the top 20 is drawn."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.sampling import SamplingConfig, sample

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    text = "write a review of the cafe :"
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": text, "prompt_ids": encode_prompt(tokenizer, text)}])
    with torch.no_grad():
        logits = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask).logits[0, -1] / 0.5
    top = logits.topk(20)
    expected = torch.zeros_like(logits).index_put_((top.indices,), torch.softmax(top.values, -1))
    torch.manual_seed(0)
    roll = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                  SamplingConfig(temperature=0.5, top_k=20, max_new_tokens=1), num_samples=20_000)
    first = roll.input_ids[:, roll.prompt_length]
    freq = torch.bincount(first, minlength=len(logits)).float() / len(first)
    assert (freq[expected == 0] == 0).all()
    assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / len(first)).sqrt() + 1e-3).all()


def test_a_checkpoints_own_sampling_defaults_do_not_change_what_sample_draws(tiny_spec, tokenizer):
    """A generation_config.json with do_sample / temperature / top-k / top-p (as hub checkpoints ship) changes
    nothing: `SamplingConfig` alone decides, so the same random state draws the same tokens."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.sampling import SamplingConfig, sample

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    text = "write a review of the cafe :"
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": text, "prompt_ids": encode_prompt(tokenizer, text)}])
    draws = []
    for defaults in ({}, {"do_sample": True, "temperature": 0.3, "top_k": 2, "top_p": 0.5}):
        for key, value in defaults.items():
            setattr(model.generation_config, key, value)
        torch.manual_seed(0)
        draws.append(sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                            SamplingConfig(max_new_tokens=6), num_samples=8).input_ids)
    assert torch.equal(draws[0], draws[1])


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
                        lambda hidden, *a: calls.append((hidden.shape[0], a[-1])) or plain_linear(hidden, *a))
    config = {**TINY_SHAPE, "model_type": "llama", "num_key_value_heads": 1}
    model = build_causal_lm(BackboneSpec(config=config, lora={"r": 4} if lora else None), tokenizer)
    ids, mask, response_mask = _grouped_rows(tokenizer)
    results = []
    for chunk in (0, 4):
        model.zero_grad()
        logp = response_logprobs(model, ids, mask, 5, 0.7, group_size=group_size, chunk=chunk)
        (logp * response_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach(), grads))
    (whole, whole_grad), (chunked, chunked_grad) = results
    assert calls == [(int(response_mask.sum()), 4)]
    assert torch.allclose(whole * response_mask, chunked * response_mask, atol=1e-5, rtol=0)
    assert (whole_grad - chunked_grad).abs().max() <= 1e-5 * whole_grad.abs().max()


def test_sft_loss_in_chunks_equals_cross_entropy_over_the_whole_logits(tokenizer):
    """SFT's loss through `target_logprobs` in chunks of 3 tokens against torch's cross-entropy on the full
    logits of the response tokens (prompt and padding masked), in value and gradient."""
    from modules.forward import target_logprobs

    torch.manual_seed(0)
    model = build_causal_lm(BackboneSpec(config={**TINY_SHAPE, "model_type": "llama"}), tokenizer)
    ids, mask, response_mask = _grouped_rows(tokenizer)
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


@pytest.mark.parametrize("group_size", [1, 3], ids=["one-row-per-response", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_logprobs_and_gradients(tokenizer, lora, group_size):
    """`BackboneSpec(activation_checkpointing=True)` against the same model without it, in training mode: the same
    logprobs and gradients (1e-6 relative), for a full and a LoRA policy, one row per response and packed groups;
    each layer is entered twice with it (forward, then again in the backward) and once without."""
    config = {**TINY_SHAPE, "model_type": "llama", "num_hidden_layers": 2}
    ids, mask, response_mask = _grouped_rows(tokenizer)
    results = []
    for checkpointing in (False, True):
        spec = BackboneSpec(config=config, lora={"r": 4} if lora else None, activation_checkpointing=checkpointing)
        model = build_causal_lm(spec, tokenizer).train()
        calls = []
        model.get_decoder().layers[0].input_layernorm.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        logp = response_logprobs(model, ids, mask, 5, 0.7, group_size=group_size)
        (logp * response_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach(), grads, len(calls)))
    (plain, plain_grad, plain_calls), (ckpt, ckpt_grad, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert torch.allclose(plain * response_mask, ckpt * response_mask, atol=1e-6, rtol=0)
    assert (plain_grad - ckpt_grad).abs().max() <= 1e-6 * plain_grad.abs().max()
