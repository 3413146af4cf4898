"""The one generation routine (used by the rollout callback, evaluation and the stage reports), and its multi-turn
form with tools (`generate_with_tools`)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from datamodules.collate import GEMMA4_THOUGHT, answer_of, encode_prompt, harmony, pad, reasoning_marks, stop_ids
from datamodules.sources import DataError
from datamodules.tools import Tools, assistant_message, call_turn_end, tool_suffix, user_suffix
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
        min_p: keep the tokens at least min_p times as likely as the most likely one (0.0: off; TRL's and vLLM's
            `min_p`). Applied after the temperature and before top-k / top-p, in vLLM's order (HF's `generate`
            applies it after them: the same tokens unless top_p is set too).
        repetition_penalty: the logits of tokens already in the prompt or the response divided by it where positive,
            multiplied where not, before the temperature (1.0: off; TRL's, vLLM's and HF's `repetition_penalty`;
            greedy too). Only the choice is penalised: the logprobs the RL stage computes are the policy's own, as in
            TRL, so above 1 the rollouts are off the policy's distribution, as with top-k / top-p.
        max_new_tokens: the response budget in tokens.
        do_sample: False takes the most likely token (greedy).
        prepack_weights: on CPU, run the policy's linear layers through oneDNN with their weights reordered once
            per `sample` call (`prepacked_linears`); the same maths up to rounding, on by default, ignored elsewhere.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingConfig: min_p={self.min_p}; expected 0 <= min_p <= 1 (0: off)")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"SamplingConfig: repetition_penalty={self.repetition_penalty}; expected a finite number "
                             "> 0 (1: off; above 1 discourages repeats)")


class _Draw:
    """The token choice of each generation step, as the last logits processor: `generate` runs with
    `do_sample=False` and takes the argmax of what this returns (0 at the chosen token, -inf elsewhere).

    Sampling: the repetition penalty (`F.repetition_penalty`, over the prompt but its padding, `prompt_mask`, and the
    tokens generated so far), HF's temperature / min-p / top-k / top-p warpers (in vLLM's order), softmax, then one
    uniform per row through the inverse CDF (`F.inverse_cdf_sample`): the same categorical distribution as
    `torch.multinomial`, which on CPU draws an exponential variate for every vocabulary entry (`benchmarks/decode.py`
    times both). Greedy (`do_sample: false`): the argmax, after the repetition penalty.
    With `record`, it also keeps the sampler's own logprob of each chosen token, log_softmax(logits / T) of the raw
    logits (before the repetition penalty and min-p / top-k / top-p): the quantity `modules.forward.response_logprobs`
    computes (here from the KV-cached decode, equal up to float rounding). It always keeps the entropy of that
    distribution at each step, the policy's per-token entropy on its own samples (TRL's and veRL's `entropy`), from
    the same log_softmax (`F.token_logprobs_and_entropy`: 0.4 ms more a step at (16, 49152) on 2 cores, 0.5% of a
    135M-shape step, `benchmarks/decode.py`). Memory: one (N, V) distribution at a time."""

    def __init__(self, config: "SamplingConfig", record: bool, prompt_mask: torch.Tensor | None = None):
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.temperature, self.record, self.picked, self.entropies = config.temperature, record, [], []
        self.penalty, self.prompt_mask = config.repetition_penalty, prompt_mask      # (N, P) or None: no padding
        self.warpers = None
        if config.do_sample:
            self.warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)]
                                               + ([MinPLogitsWarper(config.min_p)] if config.min_p else [])
                                               + ([TopKLogitsWarper(config.top_k)] if config.top_k else [])
                                               + ([TopPLogitsWarper(config.top_p)] if config.top_p < 1.0 else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()                                                     # (N, V)
        chosen_from = logits
        if self.penalty != 1.0:
            valid = torch.ones_like(input_ids)
            if self.prompt_mask is not None:
                valid[:, :self.prompt_mask.shape[1]] = self.prompt_mask
            chosen_from = F.repetition_penalty(logits, input_ids, valid, self.penalty)
        if self.warpers is None:
            tokens = chosen_from.argmax(-1)                                         # (N,)
        else:
            probs = torch.softmax(self.warpers(input_ids, chosen_from), -1)
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
    """Draw `num_samples` responses per prompt; truncate each after its first stop token (`stop_ids`: EOS, the end of
    a turn, the model's generation config's EOS ids), called EOS below.

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
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer))
    was_training = model.training
    model.eval()
    try:
        with gathered(model):                                    # FSDP2: whole parameters, no collective per token
            draw = _Draw(config, record_logprobs, mask)
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
    (each repeated for its samples), `response` (N, L) the tokens drawn (anything after the first stop token,
    `stop_ids`, is ignored),
    `prompts` one text per prompt, `picked` (N, L) the engine's logprob of each drawn token and `entropy` (N, L) the
    entropy of the distribution it was drawn from (each None where the engine has none). Tokens after it become
    pad, their mask, logprobs and entropies 0; `responses` holds the decoded texts."""
    if response.shape[1] == 0:                                   # max_new_tokens = 0
        response = response.new_full((response.shape[0], 1), tokenizer.pad_token_id)
    stops = stop_ids(tokenizer)
    resp_mask = F.response_mask(response, stops)                 # (N, L)
    response = torch.where(resp_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = response_texts(tokenizer, [row[m.bool()].tolist() for row, m in zip(response, resp_mask)])
    return Rollout(
        input_ids=torch.cat([ids, response], 1),                 # (N, P + L)
        attention_mask=torch.cat([mask, resp_mask], 1),          # (N, P + L)
        response_mask=resp_mask,
        prompt_length=ids.shape[1],
        group_size=num_samples,
        prompts=[p for p in prompts for _ in range(num_samples)],
        responses=texts,
        has_eos=F.has_eos(response, stops),
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


@dataclass
class _Row:
    """One response being built: its tokens after the prompt, which are the policy's, and the policy's recorded
    logprob and entropy at each (0 on tool tokens)."""

    tokens: list[int]
    own: list[int]
    logp: list[float]
    entropy: list[float]
    messages: list[dict]            # its turns and results so far: the last, its latest turn, until results follow
    ended: bool                     # the last turn emitted EOS
    turn: str = ""                  # the latest turn's text, as the parser reads it
    read: list[dict] = dataclasses.field(default_factory=list)   # the calls in it
    calls: int = 0
    failed: int = 0
    rounds: int = 0                 # rounds of calls run
    user_turns: int = 0             # a simulated user's messages appended


def generate_with_tools(generate: Callable, tools: Tools, tokenizer, prompt_ids: torch.Tensor,
                        prompt_mask: torch.Tensor, prompts: list, config, num_samples: int,
                        fields: dict[str, list] | None = None, max_length: int | None = None,
                        template_kwargs: dict | None = None, **kwargs) -> Rollout:
    """The multi-turn rollout of `num_samples` responses per prompt, with `tools` (`datamodules.tools`, whose
    docstring describes the loop and the layout). `generate` is an engine's `generate(prompt_ids, prompt_mask,
    prompts, config, num_samples, same_weights=..., **kwargs)` (the model and tokenizer bound), called once for the
    first turns and once per round of calls (or user messages) for the responses that go on (one sample each, from
    prompt + the response so far, `same_weights=True`). Returns a Rollout laid out as any other, plus `messages`
    (each response as TRL's list of assistant, tool and user messages, each turn parsed as TRL parses it:
    `datamodules.tools.assistant_message`) and `timings["tools/calls"]`,
    `["tools/failed"]` and, with a simulated user, `["tools/user_turns"]` (sums over the rollout).

    With an environment (`Tools.environment`), each response's instance is reset first from its prompt and record
    `fields` (name -> one value per prompt); prompts whose reset returned a text are encoded again with it (and
    `Rollout.prompts` holds them so; such a prompt that leaves no room for `max_new_tokens` within `max_length`, the
    model's positions, is one line), every call runs on the response's own instance, and `Rollout.environments`
    holds the instances for the rewards. An environment that defines `respond` (a simulated user) is asked for the
    next user message after each turn that ended with EOS without a call; a message goes in as tool results do
    (`user_suffix`: context, outside `response_mask`), and the response's next turn is generated with the others
    that go on. Past `tools.max_user_turns` messages (or without room) the message is dropped and the response
    ends, so the simulator has seen every turn that ended with EOS without a call, the last one included. Rounds
    of calls are counted per response (at most `tools.max_turns` each), whatever user messages come between them.
    `template_kwargs` (the data's `chat_template_kwargs`) go to every rendering by the chat template."""
    environments = None
    if tools.environment is not None:
        environments, observed, names = tools.start(prompts, fields or {}, num_samples)
        if observed != list(prompts):
            prompts = observed
            ids = [encode_prompt(tokenizer, prompt, tools.schemas_for(name), template_kwargs)
                   for prompt, name in zip(prompts, names)]
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if max_length is not None and len(ids[longest]) + config.max_new_tokens > max_length:
                raise DataError(f"data tools environment {tools.environment_name(names[longest])}: reset's text makes prompt "
                                f"{longest} {len(ids[longest])} tokens, which leaves no room for max_new_tokens="
                                f"{config.max_new_tokens} in the model's {max_length} positions; shorten the text")
            prompt_ids, prompt_mask = _left_pad(ids, tokenizer.pad_token_id, prompt_ids.device)
    first = generate(prompt_ids, prompt_mask, prompts, config, num_samples, same_weights=False, **kwargs)
    budget, stops = config.max_new_tokens, stop_ids(tokenizer)
    env = lambda i: environments and environments[i]  # noqa: E731
    # A context that ends by opening the reasoning (Qwen3.5 / 3.6's and DeepSeek-R1's generation prompt, Gemma 4's
    # after a tool result in thinking mode) starts the turn inside it: the turn is read after that opening
    firsts = [_opening(tokenizer, ids[mask.bool()].tolist()) for ids, mask in zip(prompt_ids, prompt_mask)]
    rows = []
    for i in range(len(first)):
        keep = first.response_mask[i].bool()
        tokens = first.response_ids[i][keep].tolist()
        rows.append(_Row(tokens, [1] * len(tokens), _picked(first.old_logp, i, keep), _picked(first.entropy, i, keep),
                         [], bool(first.has_eos[i])))
        _add_turn(rows[i], tokens, firsts[i // num_samples], tokenizer, stops, tools, env(i))
    active = list(range(len(rows)))                       # the rows whose latest turn was just generated
    end = None                                            # the stop token the template writes after a call
    while True:
        going = []
        ended = [i for i in active if rows[i].ended]
        called = {i for i in ended if rows[i].read}
        calling = [i for i in ended if i in called and rows[i].rounds < tools.max_turns]
        answering = [i for i in ended if i not in called and environments is not None and tools.responds(environments[i])]
        outcomes = tools.call_all([rows[i].read for i in calling], [env(i) for i in calling])
        if calling and end is None:
            end = call_turn_end(tokenizer, template_kwargs)
        for i, (results, failed) in zip(calling, outcomes):
            row = rows[i]
            row.calls, row.failed, row.rounds = row.calls + len(results), row.failed + failed, row.rounds + 1
            suffix = tool_suffix(tokenizer, results, template_kwargs)
            if _append(row, results, suffix, budget):
                _end_as_written(row, len(row.tokens) - len(suffix) - 1, end, stops)
                going.append(i)
            else:                                          # no room: the response ends with its call, unanswered
                row.ended = False
        said = tools.respond_all([rows[i].messages for i in answering], [environments[i] for i in answering])
        for i, text in zip(answering, said):     # (past max_user_turns, or without room: the response ends here)
            if text is not None and rows[i].user_turns < tools.max_user_turns and \
                    _append(rows[i], [{"role": "user", "content": text}], user_suffix(tokenizer, text, template_kwargs),
                            budget):
                rows[i].user_turns += 1
                going.append(i)
        if not going:
            break
        going.sort()
        active = going
        contexts = [prompt_ids[i // num_samples][prompt_mask[i // num_samples].bool()].tolist() + rows[i].tokens
                    for i in going]
        ids, mask = _left_pad(contexts, tokenizer.pad_token_id, prompt_ids.device)
        room = max(budget - len(rows[i].tokens) for i in going)
        turn = generate(ids, mask, [prompts[i // num_samples] for i in going],
                        dataclasses.replace(config, max_new_tokens=room), 1, same_weights=True,
                        **{**kwargs, "share_prompts": False})
        for j, i in enumerate(going):
            row, left = rows[i], budget - len(rows[i].tokens)
            keep = turn.response_mask[j].bool()
            tokens = turn.response_ids[j][keep].tolist()[:left]
            row.tokens += tokens
            row.own += [1] * len(tokens)
            row.logp += _picked(turn.old_logp, j, keep)[:left]
            row.entropy += _picked(turn.entropy, j, keep)[:left]
            _add_turn(row, tokens, _opening(tokenizer, contexts[j]), tokenizer, stops, tools, env(i))
            row.ended = bool(turn.has_eos[j]) and len(tokens) == int(keep.sum())
    roll = _assemble(first, rows, tokenizer, stops)
    roll.environments = environments
    roll.timings.update({"tools/calls": float(sum(r.calls for r in rows)),
                         "tools/failed": float(sum(r.failed for r in rows))})
    if tools.user_classes:
        roll.timings["tools/user_turns"] = float(sum(r.user_turns for r in rows))
    return roll


def _append(row: _Row, messages: list[dict], suffix: list[int], budget: int) -> bool:
    """`messages` (tool results, or a user's message) and their `suffix` tokens appended to `row` as context outside
    the policy's tokens, if that leaves room for one more token within `budget`; whether they were."""
    if len(row.tokens) + len(suffix) >= budget:
        return False
    row.messages += messages
    row.tokens += suffix
    row.own += [0] * len(suffix)
    row.logp += [0.0] * len(suffix)
    row.entropy += [0.0] * len(suffix)
    return True


def _end_as_written(row: _Row, k: int, end: int, stops: list[int]) -> None:
    """A turn whose calls ran, ended at token `k` of `row` with another stop token than the one the chat template
    writes after a call (`end`), gets that one instead, as context (outside the policy's tokens): the results then
    follow what the template would have written, as the model saw in training. Gemma 4 ends a call with <eos> now
    and then instead of <|tool_response>, which opens the result (vLLM's `gemma4_utils` puts it back in the same
    way); a ChatML model may end one with <|endoftext|> instead of <|im_end|>."""
    if row.tokens[k] != end and row.tokens[k] in stops:
        row.tokens[k], row.own[k], row.logp[k], row.entropy[k] = end, 0, 0.0, 0.0


def _picked(values: torch.Tensor | None, row: int, keep: torch.Tensor) -> list[float]:
    return [0.0] * int(keep.sum()) if values is None else values[row][keep].tolist()


def _opening(tokenizer, ids: list[int]) -> str:
    """The reasoning's opening (`datamodules.collate.reasoning_marks`: "<think>", or Gemma 4's "<|channel>thought")
    where a context ends with it, else "": the turn generated after it starts inside the reasoning.

    Example: "...<|im_start|>assistant\n<think>\n" -> "<think>"; "...assistant\n<think>\n\n</think>\n\n" -> "";
    "... what does <think> do?<|im_end|>\n<|im_start|>assistant\n" -> ""; Gemma 4 in thinking mode after a tool
    result, "...<tool_response|><|channel>thought\n" -> "<|channel>thought"."""
    opening = reasoning_marks(tokenizer)[0]
    return opening if tokenizer.decode(ids[-16:], skip_special_tokens=False).rstrip().endswith(opening) else ""


def response_texts(tokenizer, rows: list[list[int]]) -> list[str]:
    """The texts of responses given as their real tokens, as rewards, judges and the logs read them: decoded without
    special tokens. Reasoning whose bounds are special tokens, lost in that text, is left out: with a harmony
    template (gpt-oss) the text is the answer alone (`datamodules.collate.answer_of`: its last final message's, as
    vLLM's `content`), with Gemma 4's every `<|channel>...<channel|>` block is dropped (an unclosed one to the end).

    Example (gpt-oss): ids of "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>
    It is 5.<|return|>" -> "It is 5." (without: "analysisAdd.assistantfinalIt is 5."); (Gemma 4) ids of
    "<|channel>thought\nAdd.<channel|>It is 5.<turn|>" -> "It is 5." (without: "thought\nAdd.It is 5.")."""
    if harmony(tokenizer):
        return [answer_of(text) for text in tokenizer.batch_decode(rows, skip_special_tokens=False)]
    if reasoning_marks(tokenizer) == GEMMA4_THOUGHT:
        opening, closing = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
        rows = [_outside(row, opening, closing) for row in rows]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _outside(ids: list[int], opening: int, closing: int) -> list[int]:
    """`ids` without the spans from each `opening` to its `closing` id, both included (to the end if unclosed).

    Example: [5, O, 6, C, 7, O, 8] -> [5, 7]."""
    kept, inside = [], False
    for token in ids:
        if inside:
            inside = token != closing
        elif token == opening:
            inside = True
        else:
            kept.append(token)
    return kept


def _add_turn(row: _Row, tokens: list[int], opened: str, tokenizer, stops: list[int], tools: Tools,
              environment) -> None:
    """A new turn of `row`: `row.turn`, its text as the parser reads it (special tokens kept, as a template may make
    `<tool_call>` one; its stop token, one of `stops`, dropped; after the reasoning's opening where its context
    `opened` it), `row.read`, the calls in it, and its message appended (`datamodules.tools.assistant_message`)."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    row.turn = opened + tokenizer.decode(tokens, skip_special_tokens=False)
    row.read = tools.read(row.turn, environment)
    row.messages.append(assistant_message(tokenizer, row.turn, row.read, tools.parse))


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad(rows, pad_id, "left")
    return ids.to(device), mask.to(device)


def _assemble(first: Rollout, rows: list[_Row], tokenizer, stops: list[int]) -> Rollout:
    """The Rollout of the built rows: the first turns' prompts, responses right-padded to the longest."""
    width = max(1, max(len(r.tokens) for r in rows))
    N, device = len(rows), first.input_ids.device
    response = torch.full((N, width), tokenizer.pad_token_id, dtype=torch.long)
    real, own = torch.zeros(N, width, dtype=torch.long), torch.zeros(N, width, dtype=torch.long)
    logp, entropy = torch.zeros(N, width), torch.zeros(N, width)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        response[i, :n] = torch.tensor(row.tokens, dtype=torch.long)
        real[i, :n] = 1
        own[i, :n] = torch.tensor(row.own, dtype=torch.long)
        logp[i, :n], entropy[i, :n] = torch.tensor(row.logp), torch.tensor(row.entropy)
    texts = response_texts(tokenizer, [r.tokens for r in rows])
    prompt_ids, prompt_mask = first.input_ids[:, :first.prompt_length], first.attention_mask[:, :first.prompt_length]
    return Rollout(
        input_ids=torch.cat([prompt_ids, response.to(device)], 1),
        attention_mask=torch.cat([prompt_mask, real.to(device)], 1),
        response_mask=own.to(device),
        prompt_length=first.prompt_length,
        group_size=first.group_size,
        prompts=first.prompts,
        responses=texts,
        has_eos=torch.tensor([r.own[-1:] == [1] and r.tokens[-1] in stops for r in rows], device=first.has_eos.device),
        old_logp=None if first.old_logp is None else logp.to(device),
        entropy=None if first.entropy is None else entropy.to(device),
        sampler_logp=None,
        timings=dict(first.timings),
        messages=[r.messages for r in rows],
    )
