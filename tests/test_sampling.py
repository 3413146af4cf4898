"""modules/sampling.py: our sampler draws from the policy's (warped) distribution, records the raw logprobs a
forward gives, computes each prompt once for its K responses, and truncates after the first EOS."""

import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt
from modules import functional as F
from modules.backbone import BackboneSpec, build_causal_lm
from modules.forward import lm_logits, response_logprobs
from modules.sampling import SamplingConfig, sample


def sampler_case(device: str, spec, tokenizer, atol: float) -> None:
    """On `device`: pi_old recorded while sampling (T = 0.7, left-padded prompts of different lengths, 4 samples
    each, top-k 5 so that the warpers change what is drawn but not the recorded logits / T) equals
    `response_logprobs` over the finished rollout on every response token within `atol` (KV-cached decode vs one
    full forward), and so does the entropy recorded at each step (within 10 `atol`); greedy responses equal
    transformers' `generate` up to each row's EOS. `tests/test_gpu.py` runs it on CUDA."""
    model = build_causal_lm(spec, tokenizer).to(device).eval()
    texts = ["write a review of the cafe :", "write a review of the hotel , please :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)} for t in texts])
    ids, mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
    torch.manual_seed(0)
    roll = sample(model, tokenizer, ids, mask, batch.prompts,
                  SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=12), num_samples=4, record_logprobs=True)
    assert roll.input_ids.device.type == torch.device(device).type
    with torch.no_grad():
        forward = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 0.7)
    assert roll.old_logp.shape == forward.shape == roll.response_mask.shape
    assert torch.allclose(roll.old_logp, forward * roll.response_mask, atol=atol, rtol=0)
    assert (roll.old_logp[roll.response_mask.bool()] < 0).all()
    with torch.no_grad():      # the entropy recorded at each step: that of softmax(logits / T) of a full forward
        logits = lm_logits(model, roll.input_ids, roll.attention_mask)[:, roll.prompt_length - 1: -1]
    entropy = F.entropy(torch.log_softmax(logits.float() / 0.7, -1)) * roll.response_mask
    assert torch.allclose(roll.entropy, entropy, atol=10 * atol, rtol=0) and (entropy[roll.response_mask.bool()] > 0).all()
    greedy = sample(model, tokenizer, ids, mask, batch.prompts, SamplingConfig(do_sample=False, max_new_tokens=8))
    reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                               pad_token_id=tokenizer.pad_token_id)
    P = ids.shape[1]
    n = min(greedy.input_ids.shape[1], reference.shape[1]) - P
    rows = greedy.response_mask[:, :n].bool()
    assert rows.any()
    assert torch.equal(greedy.input_ids[:, P:P + n][rows], reference[:, P:P + n][rows])


def test_the_samplers_logprobs_equal_a_forward_pass_over_the_rollout(tiny_spec, tokenizer):
    """`sampler_case` on the CPU: within float32 rounding (1e-5)."""
    sampler_case("cpu", tiny_spec, tokenizer, atol=1e-5)


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


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_reads(tiny_spec, tokenizer):
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and leaves `forward` in 5.40):
    `cache_kwarg` gives "past_key_values" below 5.24 and "cache" from it on; a sample with the shared prompt cache
    (a forward and a `generate` that each take it) warns about neither name."""
    import warnings

    from modules.sampling import cache_kwarg

    assert [cache_kwarg(v) for v in ("5.17.0", "5.23.0", "5.24.0", "5.24.0.dev0", "6.0.0")] == \
        ["past_key_values"] * 2 + ["cache"] * 3
    model = build_causal_lm(tiny_spec, tokenizer).eval()
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                  for t in ["write a review of the cafe :", "a review :"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
               SamplingConfig(max_new_tokens=4), num_samples=2)
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


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


def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_top_one():
    """min_p 0.2 at T = 1 on probabilities [0.5, 0.3, 0.15, 0.05]: the threshold is 0.2 x 0.5 = 0.1, so the last token
    goes and the others keep their ratios, [0.5, 0.3, 0.15] / 0.95 = [0.526, 0.316, 0.158, 0]. Drawn over 40000 rows
    the frequencies match within 0.01, the removed token is never drawn, and the recorded logprob is still the raw
    log_softmax (before the filter). With top_k 2 as well, the two most likely tokens remain (min-p and top-k
    commute). With top_p the order counts: on [0.4, 0.3, 0.2, 0.1], min_p 0.3 (threshold 0.12) then top_p 0.75
    (vLLM's order) removes 0.1, then 0.2 (renormalised 0.222, within the 0.25 top-p drops) and keeps two tokens,
    where top_p first would keep three. min_p outside [0, 1] is one line."""
    from modules.sampling import SamplingConfig, _Draw

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(40_000, 1)
    ids = torch.zeros(40_000, 1, dtype=torch.long)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    torch.manual_seed(0)
    draw = _Draw(SamplingConfig(min_p=0.2), record=True)
    tokens = draw(ids, logits.clone()).argmax(-1)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, expected, atol=0.01) and freq[3] == 0
    assert torch.allclose(draw.result(tokens[:, None])[:, 0], logits[0].log_softmax(-1)[tokens], atol=1e-6)
    both = _Draw(SamplingConfig(min_p=0.2, top_k=2), record=False)
    assert set(both(ids, logits.clone()).argmax(-1).tolist()) == {0, 1}
    ordered = _Draw(SamplingConfig(min_p=0.3, top_p=0.75), record=False)
    assert set(ordered(ids, torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(40_000, 1)).argmax(-1).tolist()) == {0, 1}
    with pytest.raises(ValueError, match=r"^SamplingConfig: min_p=1.5; expected 0 <= min_p <= 1 \(0: off\)$"):
        SamplingConfig(min_p=1.5)


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


def test_sampling_truncates_after_the_first_eos(sft_dir, tokenizer):
    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    with torch.no_grad():   # make EOS likely so that both kinds of rows occur
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight.mean(0) + 0.02 * model.lm_head.weight.std()
    prompts = ["write a review of the cafe :", "write a review of the zoo :"] * 8
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": p, "prompt_ids": encode_prompt(tokenizer, p)}
                                                  for p in prompts])
    torch.manual_seed(0)
    roll = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                  SamplingConfig(max_new_tokens=12), num_samples=2)
    assert len(roll) == 32 and roll.prompts[:2] == [prompts[0]] * 2
    resp, mask, eos = roll.response_ids, roll.response_mask, tokenizer.eos_token_id
    assert 0 < roll.has_eos.sum() < len(roll)
    for i in range(len(roll)):
        n = int(mask[i].sum())
        if roll.has_eos[i]:
            assert resp[i, n - 1] == eos and (resp[i, : n - 1] != eos).all()   # mask ends at the first EOS
        else:
            assert n == resp.shape[1]
        assert (resp[i, n:] == tokenizer.pad_token_id).all()                 # everything after is padding
        assert roll.responses[i] == tokenizer.decode(resp[i, : n], skip_special_tokens=True).strip()
    assert torch.equal(roll.attention_mask[:, roll.prompt_length:], mask)


def test_repetition_penalty_of_the_docstring_and_as_hf_computes_it():
    """`F.repetition_penalty`'s example, worked out: tokens 0 and 1 occurred (2 / 2 = 1, -1 x 2 = -2), 2 did not,
    3 only at a padded position; and on random logits with every position valid, HF's
    `RepetitionPenaltyLogitsProcessor` (penalties above and below 1). A penalty of 0 or below is one line."""
    from transformers import RepetitionPenaltyLogitsProcessor

    got = F.repetition_penalty(torch.tensor([[2.0, -1.0, 0.5, 3.0]]), torch.tensor([[0, 1, 3]]),
                               torch.tensor([[1, 1, 0]]), 2.0)
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    torch.manual_seed(0)
    logits, ids = torch.randn(4, 50), torch.randint(0, 50, (4, 30))
    for penalty in (1.3, 0.7):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.allclose(F.repetition_penalty(logits, ids, torch.ones_like(ids), penalty), hf, atol=1e-6)
    with pytest.raises(ValueError, match=r"^SamplingConfig: repetition_penalty=0.0; expected a finite number > 0"):
        SamplingConfig(repetition_penalty=0.0)


def test_the_sampler_penalises_repeats_as_hf_generate_does_and_records_the_policys_own_logprobs(tiny_spec, tokenizer):
    """Greedy with repetition_penalty 1.5 through `sample` equals HF's `generate(repetition_penalty=1.5)` on an
    unpadded prompt, and differs from greedy without it (the tiny model repeats itself); at T = 0.7 the recorded
    logprobs are still the policy's own (a forward's, the penalty left out). On left-padded prompts, a row's padding
    is not text: with a penalty below 1 (repeats favoured) each row draws what its prompt alone draws."""
    model = build_causal_lm(tiny_spec, tokenizer).eval()

    def batch_of(texts):
        return PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)}
                                                     for t in texts])

    one = batch_of(["write a review of the cafe :"])
    config = SamplingConfig(do_sample=False, max_new_tokens=16, repetition_penalty=1.5)
    ours = sample(model, tokenizer, one.prompt_ids, one.prompt_mask, one.prompts, config)
    hf = model.generate(input_ids=one.prompt_ids, attention_mask=one.prompt_mask, do_sample=False, max_new_tokens=16,
                        repetition_penalty=1.5, pad_token_id=tokenizer.pad_token_id)
    n = int(ours.response_mask[0].sum())
    assert torch.equal(ours.input_ids[0, one.prompt_ids.shape[1]:][:n], hf[0, one.prompt_ids.shape[1]:][:n])
    plain = sample(model, tokenizer, one.prompt_ids, one.prompt_mask, one.prompts,
                   SamplingConfig(do_sample=False, max_new_tokens=16))
    assert not torch.equal(plain.input_ids, ours.input_ids)
    torch.manual_seed(0)
    roll = sample(model, tokenizer, one.prompt_ids, one.prompt_mask, one.prompts,
                  SamplingConfig(temperature=0.7, max_new_tokens=12, repetition_penalty=1.5), 4, record_logprobs=True)
    with torch.no_grad():
        forward = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 0.7)
    assert torch.allclose(roll.old_logp, forward * roll.response_mask, atol=1e-4, rtol=0)
    texts = ["write a review of the cafe :", "the hotel , please , write a long review of it :"]
    both = batch_of(texts)
    favour = SamplingConfig(do_sample=False, max_new_tokens=12, repetition_penalty=0.3)
    padded = sample(model, tokenizer, both.prompt_ids, both.prompt_mask, both.prompts, favour)
    assert both.prompt_mask[0].min() == 0                                     # the first row is padded
    for i, text in enumerate(texts):
        alone = batch_of([text])
        solo = sample(model, tokenizer, alone.prompt_ids, alone.prompt_mask, alone.prompts, favour)
        assert padded.responses[i] == solo.responses[0], i
