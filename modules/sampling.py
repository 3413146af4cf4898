"""The one generation routine: used by the rollout callback, evaluation and the stage reports."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from modules import functional as F
from modules.batch import Rollout
from modules.cpu import prepacked_linears
from modules.sharding import gathered, is_partitioned


def cache_kwarg(version: str | None = None) -> str:
    """The keyword that hands a KV cache to a model's `forward` and to `generate` under transformers `version`
    (default: the installed one): `cache` since 5.24, which renamed `past_key_values` (the old name still works
    there but warns, and leaves `forward` in 5.40); the floor, 5.17, knows only `past_key_values`.
    `cache_kwarg("5.23.0")` -> "past_key_values", `cache_kwarg("5.24.0")` -> "cache"."""
    from transformers import __version__

    major, minor = (int(part) for part in (version or __version__).split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


@dataclass
class SamplingConfig:
    """Sampling settings of rollouts and evaluation (the paper samples at T = 1 with no filter).

    Args:
        temperature: divides the logits when sampling, and in every logprob the RL stage computes.
        top_p: nucleus filter (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        max_new_tokens: the response budget in tokens.
        do_sample: False takes the most likely token (greedy).
        prepack_weights: on CPU, run the policy's linear layers through oneDNN with their weights reordered once
            per `sample` call (`prepacked_linears`); the same maths up to rounding, on by default, ignored elsewhere.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    do_sample: bool = True
    prepack_weights: bool = True

    def __post_init__(self):
        """Values the warpers would refuse at the first rollout, after the models are built (or, for top_p > 1,
        silently treat as off): refused here, as the config is read."""
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"SamplingConfig: temperature={self.temperature}; expected a finite number > 0 (it also "
                             "divides every logprob; do_sample: false samples greedily)")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"SamplingConfig: top_p={self.top_p}; expected 0 <= top_p <= 1 (1: off)")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig: top_k={self.top_k}; expected >= 0 (0: off)")


class _Draw:
    """The token choice of each generation step, as the last logits processor: `generate` runs with
    `do_sample=False` and takes the argmax of what this returns (0 at the chosen token, -inf elsewhere).

    Sampling: HF's temperature / top-k / top-p warpers, softmax, then one uniform per row through the inverse CDF
    (`F.inverse_cdf_sample`): the same categorical distribution as `torch.multinomial`, which on CPU draws an
    exponential variate for every vocabulary entry (`benchmarks/decode.py` times both). Greedy
    (`do_sample: false`): the argmax.
    With `record`, it also keeps the sampler's own logprob of each chosen token, log_softmax(logits / T) of the raw
    logits (before top-k / top-p): the quantity `modules.forward.response_logprobs` computes (here from the
    KV-cached decode, equal up to float rounding). It always keeps the entropy of that distribution at each step,
    the policy's per-token entropy on its own samples (TRL's and veRL's `entropy`), from the same log_softmax
    (`F.token_logprobs_and_entropy`: 0.4 ms more a step at (16, 49152) on 2 cores, 0.5% of a 135M-shape step,
    `benchmarks/decode.py`). Memory: one (N, V) distribution at a time."""

    def __init__(self, config: "SamplingConfig", record: bool):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.temperature, self.record, self.picked, self.entropies = config.temperature, record, [], []
        self.warpers = None
        if config.do_sample:
            self.warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)]
                                               + ([TopKLogitsWarper(config.top_k)] if config.top_k else [])
                                               + ([TopPLogitsWarper(config.top_p)] if config.top_p < 1.0 else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()                                                     # (N, V)
        if self.warpers is None:
            tokens = logits.argmax(-1)                                              # (N,)
        else:
            probs = torch.softmax(self.warpers(input_ids, logits), -1)
            tokens = F.inverse_cdf_sample(probs, torch.rand(len(probs), device=probs.device))
        picked, entropy = F.token_logprobs_and_entropy(logits, tokens, self.temperature)    # (N,) each
        self.entropies.append(entropy)
        if self.record:
            self.picked.append(picked)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)

    def result(self, response: torch.Tensor) -> torch.Tensor:
        """(N, L) logprobs of `response` (N, L), the generated tokens (steps that `generate` undid are dropped)."""
        return self._steps(self.picked, response)

    def entropy(self, response: torch.Tensor) -> torch.Tensor:
        """(N, L) entropy of the distribution each token of `response` was drawn from."""
        return self._steps(self.entropies, response)

    @staticmethod
    def _steps(values: list[torch.Tensor], response: torch.Tensor) -> torch.Tensor:
        if not values:
            return response.new_zeros(response.shape, dtype=torch.float32)
        return torch.stack(values[:response.shape[1]], 1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str],
           config: SamplingConfig, num_samples: int = 1, record_logprobs: bool = False,
           share_prompts: bool = True) -> Rollout:
    """Draw `num_samples` responses per prompt; truncate each after its first EOS.

    prompt_ids / prompt_mask (B, P) must be left-padded. Returns a Rollout of N = B * num_samples rows,
    prompt-major (row i * K + k is the k-th sample for prompt i), tokens after the first EOS set to pad.
    `record_logprobs`: also fill `old_logp` (N, L) with the sampler's logprobs of the sampled tokens (0 after the
    response), which saves the pi_old forward pass.
    `share_prompts` (K > 1, parameters not partitioned by DeepSpeed): each prompt's KV cache (all but its last
    token) is computed once and repeated for its K samples instead of K times (`_prompt_cache`); `generate`
    continues from it. A model sharded by FSDP2 is gathered for the duration (`modules.sharding.gathered`).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    ids = prompt_ids.repeat_interleave(num_samples, 0)           # (N, P)
    mask = prompt_mask.repeat_interleave(num_samples, 0)         # (N, P)
    # `_Draw` makes the choice; HF's neutral sampling values keep a checkpoint's own (generation_config.json) from
    # being merged in, where they would only draw a warning
    gen = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=config.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        with gathered(model):                                    # FSDP2: whole parameters, no collective per token
            draw = _Draw(config, record_logprobs)
            partitioned = is_partitioned(model)                  # DeepSpeed ZeRO-3: every rank runs every step
            shared = share_prompts and num_samples > 1 and prompt_ids.shape[1] > 1 and not partitioned
            prepacked = prepacked_linears(model, len(ids)) if config.prepack_weights else contextlib.nullcontext()
            with prepacked:
                cache = _prompt_cache(model, prompt_ids, prompt_mask, num_samples) if shared else None
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **{cache_kwarg(): cache},
                                     logits_processor=LogitsProcessorList([draw]), synced_gpus=partitioned)  # (N, P + L')
    finally:
        model.train(was_training)
    response = out[:, ids.shape[1]:]                             # (N, L')
    picked = draw.result(response) if record_logprobs else None   # (N, L') of the tokens as drawn
    return rollout_of(ids, mask, response, prompts, num_samples, tokenizer, picked, draw.entropy(response))


def rollout_of(ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor, prompts: list[str], num_samples: int,
               tokenizer, picked: torch.Tensor | None = None, entropy: torch.Tensor | None = None) -> Rollout:
    """The `Rollout` of generated tokens, whatever engine drew them: `ids` / `mask` (N, P) the left-padded prompts
    (each repeated for its samples), `response` (N, L) the tokens drawn (anything after the first EOS is ignored),
    `prompts` one text per prompt, `picked` (N, L) the engine's logprob of each drawn token and `entropy` (N, L) the
    entropy of the distribution it was drawn from (each None where the engine has none). Tokens after the first
    EOS become pad, their mask, logprobs and entropies 0; `responses` holds the decoded texts."""
    if response.shape[1] == 0:                                   # max_new_tokens = 0
        response = response.new_full((response.shape[0], 1), tokenizer.pad_token_id)
    resp_mask = F.response_mask(response, tokenizer.eos_token_id)  # (N, L)
    response = torch.where(resp_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response * resp_mask + (1 - resp_mask) * tokenizer.pad_token_id,
                                   skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([ids, response], 1),                 # (N, P + L)
        attention_mask=torch.cat([mask, resp_mask], 1),          # (N, P + L)
        response_mask=resp_mask,
        prompt_length=ids.shape[1],
        group_size=num_samples,
        prompts=[p for p in prompts for _ in range(num_samples)],
        responses=[t.strip() for t in texts],
        has_eos=F.has_eos(response, tokenizer.eos_token_id),
        old_logp=None if picked is None else _fit(picked, response.shape[1]) * resp_mask,
        entropy=None if entropy is None else _fit(entropy, response.shape[1]) * resp_mask,
    )


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """(N, L) -> (N, length): cut, or padded with zeros on the right."""
    return torch.nn.functional.pad(x[:, :length], (0, max(0, length - x.shape[1])))


def _prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int):
    """The KV cache of every prompt but its last token (B rows), repeated for its K samples (N = B K rows):
    `generate` then runs only the last prompt token and the new ones. Keys and values are those of `generate`'s
    own prefill (same positions, same mask), computed once per prompt instead of K times."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = prompt_mask[:, :-1]
    model(input_ids=prompt_ids[:, :-1], attention_mask=mask, position_ids=F.position_ids_from_mask(mask),
          **{cache_kwarg(): cache}, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(num_samples)
    return cache


@torch.no_grad()
def sample_policy(path: str, tokenizer, examples: list[dict], config: SamplingConfig, num_samples: int = 1,
                  seed: int = 0, device: torch.device | str = "cpu") -> Rollout:
    """`num_samples` responses per prompt of encoded `examples` from the causal LM at `path`, under `seed` (the
    caller's random stream untouched): the SFT samples that calibrate the reward and preference models."""
    from datamodules.collate import PairCollator
    from modules.backbone import BackboneSpec, build_causal_lm

    policy = build_causal_lm(BackboneSpec(pretrained=path), tokenizer).to(device)
    collated = PairCollator(tokenizer.pad_token_id)(examples)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sample(policy, tokenizer, collated.prompt_ids.to(device), collated.prompt_mask.to(device),
                      collated.prompts, config, num_samples=num_samples)
