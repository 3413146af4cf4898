"""Rewards the RL stage can optimise. Any object works if it is one of:
  * `score(rollout, tokenizer) -> Tensor (N,)` (token-level access, e.g. `RewardModel`), or
  * a plain callable `(prompts: list[str], responses: list[str]) -> list[float]` (e.g. the embedded task's
    `datamodules.task.GoldReward`, or a rule-based reward of yours), selected by `class_path`, or
  * a *pairwise* reward: an object with `pairwise = True` called as `(prompts, responses_a, responses_b) ->
    list[float]`, the logit of P(a preferred over b) for each pair (`PairwiseReward`; `score_pairs`).
A callable may also take record fields by keyword (a verifiable reward's reference `answer`: `field_kwargs`),
and `Composed` sums several rewards with weights, each term logged. Verifiable rewards live in
`modules.verifiable`, rewards served over HTTP in `modules.remote`.
A reward or judge that holds a model of its own derives from `FrozenModel` (built once, frozen, sharded under FSDP2).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import random
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from datamodules.collate import pad, prompt_text
from modules.backbone import BackboneSpec, build_scorer, load_tokenizer
from modules.batch import Rollout
from modules.forward import score_texts, sequence_rewards

log = logging.getLogger(__name__)


class FrozenModel(nn.Module):
    """The base of every reward or judge that holds a model of its own (`RewardModel`, `PreferenceModel`,
    `modules.judges.LLMJudge`): the model is frozen, always in eval mode, and built once from `spec` with
    `builder` (`build_scorer` or `build_causal_lm`), when the stage calls `configure(mesh)` (the RL module for
    its reward, `callbacks.evaluation.Evaluation` for its judge), or else at the first use of `model`.

    Under FSDP2 (`mesh` given) the model is built whole on the first rank only, then sharded
    (`modules.sharding.build_sharded`): every forward is then a collective, so a subclass that runs its inputs in
    batches of its own goes through `batched`, which makes as many forwards on every rank."""

    builder: Callable = staticmethod(build_scorer)

    def __init__(self, spec: BackboneSpec, tokenizer):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer

    def configure(self, mesh=None, linears: torch.dtype | None = None) -> None:
        """Build the model, frozen, sharded over `mesh` (None: whole), its linear weights in the dtype `linears`
        when given (the dtype mixed precision computes them in: `modules.backbone.linears_in`). Nothing to do once
        built."""
        from modules.backbone import linears_in
        from modules.sharding import build_sharded

        if "model" not in self._modules:
            model = build_sharded(self.builder, self.spec, self.tokenizer, mesh)
            self._modules["model"] = linears_in(model.eval().requires_grad_(False), linears)

    @property
    def model(self) -> nn.Module:
        """The model, built whole at first use unless `configure` built it."""
        try:
            self.configure()
        except AttributeError as error:     # raised inside a property, it would read as "no attribute 'model'"
            raise RuntimeError(f"{self.spec.pretrained}: building the model of {qualified_name(self)} failed: "
                               f"{error}") from error
        return self._modules["model"]

    def train(self, mode: bool = True) -> "FrozenModel":
        return super().train(False)  # always frozen, eval mode

    def check_length(self, tokens: int, what: str) -> None:
        """A `RewardError` when an input of `tokens` tokens (`what`) is longer than the model's
        `max_position_embeddings`. Checked as each batch is built, because the texts a pairwise model or a judge reads
        (a prompt and two responses, a template) are only known from the rollout: past its positions a rotary
        model scores, silently, on positions it has never seen, and one with learned positions fails on an index."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and tokens > limit:
            raise RewardError(f"{qualified_name(self)} ({self.spec.pretrained}): {what} is {tokens} tokens, more than "
                              f"the model's max_position_embeddings ({limit}); lower model.init_args.sampling."
                              "max_new_tokens or data.init_args.max_prompt_length, or use a model with more positions")

    def batched(self, n: int, size: int, forward: Callable[[int, int], list[float]]) -> list[float]:
        """`forward(a, b)` (the model's numbers for rows [a, b)) over `n` rows in batches of at most `size` rows,
        concatenated. When the model is sharded every rank makes as many forwards (the most any rank needs): a rank
        whose rows have run out runs the model on one pad token, for the collectives, and keeps nothing.

        Example: n = 5, size = 2 -> forward(0, 2), forward(2, 4), forward(4, 5); with a sharded model and another
        rank that needs 4 batches, one pad-token forward follows."""
        from modules.sharding import forwards_on_every_rank

        model = self.model
        device = next(model.parameters()).device
        count, out = forwards_on_every_rank(-(-n // size), model, device), []
        for start in range(0, count * size, size):
            if start < n:
                out += forward(start, min(n, start + size))
            else:
                pad = torch.full((1, 1), self.tokenizer.pad_token_id, device=device)
                model(input_ids=pad, attention_mask=torch.ones_like(pad))
        return out


class RewardModel(FrozenModel):
    """A frozen reward-model export (AutoModelForSequenceClassification, num_labels=1).

    Args:
        path: export directory of the reward stage (or any such HF directory / hub id).
        normalize: return (r - mean) / std with the stats stored next to the export (`reward_stats.json`).
        clip: clip the (normalised) reward to [-clip, clip] (None = off).
        share_prompts: score a rollout's K responses to a prompt with the prompt computed once
            (`modules.forward.sequence_rewards` with the group size; same numbers up to float rounding).
        scoring: what the model reads of a response. "tokens", as the reward stage trains it: the prompt as the
            data encodes it, the response's tokens and its turn's stop token (a cut-off one without), read at that
            last token; from the rollout's token ids where the vocabularies match, else from its texts re-tokenized.
            "chat_template", as TRL's GRPOTrainer gives a reward model the rollout (and as reward models trained
            elsewhere are meant to be used, e.g. Skywork-Reward): the model's own chat template over the
            conversation, the prompt's messages then the response as an assistant message (with tools, its
            messages), read at the last token the template writes (plain prompt + response text without a
            template). Default (None): "tokens" where `path` holds `reward_stats.json` (the reward stage's export),
            else "chat_template".
        batch_size: responses per forward with "chat_template".
    With "tokens", when the reward model shares the policy's vocabulary, rollouts are scored from their token ids
    directly; otherwise their texts are re-tokenized with the reward model's own tokenizer.

    The scorer is built when the RL module's `configure_model` calls `configure(mesh)` (under FSDP2 whole on the
    first rank only, then sharded), or at the first use of `model` otherwise (`FrozenModel`).
    """

    def __init__(self, path: str, normalize: bool = True, clip: float | None = None, share_prompts: bool = True,
                 scoring: str | None = None, batch_size: int = 64):
        _check_scorer(path)
        super().__init__(BackboneSpec(pretrained=path), load_tokenizer(path))
        self.path, self.normalize, self.clip, self.share_prompts = path, normalize, clip, share_prompts
        stats_path = os.path.join(path, "reward_stats.json")
        if scoring not in (None, "tokens", "chat_template"):
            raise ValueError(f"RewardModel: scoring={scoring!r}; expected 'tokens' (as the reward stage trains), "
                             "'chat_template' (the model's own chat template, as TRL scores) or null (by the folder)")
        self.scoring = scoring or ("tokens" if os.path.exists(stats_path) else "chat_template")
        self.batch_size = batch_size
        self.mean, self.std = 0.0, 1.0
        if normalize:
            if not os.path.exists(stats_path):
                raise FileNotFoundError(f"{stats_path}: no reward statistics; export them with the reward stage "
                                        "or set normalize: false")
            stats = read_scale(stats_path, ("mean", "std"))
            self.mean, self.std = stats["mean"], stats["std"]
        self._shares_vocab: dict[int, bool] = {}

    def _same_vocab(self, tokenizer) -> bool:
        key = id(tokenizer)
        if key not in self._shares_vocab:
            self._shares_vocab[key] = tokenizer.get_vocab() == self.tokenizer.get_vocab()
        return self._shares_vocab[key]

    @torch.no_grad()
    def score(self, rollout: Rollout, tokenizer) -> torch.Tensor:
        if self.scoring == "chat_template":
            raw = torch.tensor(self.conversation_scores(rollout), device=rollout.input_ids.device)
        elif self._same_vocab(tokenizer):
            raw = sequence_rewards(self.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                                   rollout.group_size if self.share_prompts else 1)          # (N,)
        else:
            raw = score_texts(self.model, self.tokenizer, rollout.prompts, rollout.responses,
                              rollout.has_eos.tolist()).to(rollout.input_ids.device)
        reward = (raw - self.mean) / self.std
        return reward.clamp(-self.clip, self.clip) if self.clip else reward

    def conversation_scores(self, rollout: Rollout) -> list[float]:
        """Each response's raw reward read as TRL's GRPOTrainer reads a reward model's: the model's chat template
        over prompt + response (the prompt's messages, or its text as a user message, then the response as an
        assistant message, or its messages with tools), as text, tokenized without added special tokens, the
        reward at the last token; without a chat template the prompt's text followed by the response's."""
        tokenizer, rows = self.tokenizer, []
        for i, prompt in enumerate(rollout.prompts):
            if getattr(tokenizer, "chat_template", None):
                messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                completion = rollout.messages[i] if rollout.messages is not None else \
                    [{"role": "assistant", "content": rollout.responses[i]}]
                try:
                    text = tokenizer.apply_chat_template(messages + completion, tokenize=False)
                except Exception as error:           # (a template's raise_exception, a role it does not take)
                    raise RewardError(f"RewardModel ({self.path}): its chat template cannot write response {i}'s "
                                      f"conversation ({type(error).__name__}: {error}); set scoring: tokens") from None
            else:
                text = prompt_text(prompt) + rollout.responses[i]
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        device = next(self.model.parameters()).device

        def forward(a: int, b: int) -> list[float]:
            self.check_length(max(len(row) for row in rows[a:b]), "a conversation rendered by its chat template")
            ids, mask = pad(rows[a:b], tokenizer.pad_token_id, "right")
            return sequence_rewards(self.model, ids.to(device), mask.to(device)).float().tolist()
        return self.batched(len(rows), self.batch_size, forward)


def read_scale(path: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The calibration numbers an export stores (`keys` of the JSON file at `path`): each finite, `std` > 0; else a
    ValueError naming the file and the field (a NaN std, from a calibration of one prompt, made every reward NaN)."""
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as JSON ({err})") from None
    numbers = {}
    for key in keys:
        value = stats.get(key) if isinstance(stats, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (key == "std" and not value > 0):
            raise ValueError(f"{path}: {key} is {value!r}; expected a finite number{' > 0' if key == 'std' else ''} "
                             "(export the stage again: its calibration needs at least 2 prompts)")
        numbers[key] = float(value)
    return numbers


def _check_scorer(path: str) -> None:
    """A local folder given as a scalar reward model holds one: not a causal LM (an SFT or RL export: its score head
    would be random, and the run would train on noise) nor a pairwise preference model (its head scores pairs)."""
    from modules.preference_model import CONFIG_FILE

    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"RewardModel: {path} is a pairwise preference-model export; use "
                         "modules.rewards.PreferenceModel for it")
    config = Path(path, "config.json")
    architectures = (json.loads(config.read_text()).get("architectures") or []) if config.exists() else []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"RewardModel: {path} holds a {architectures[0]}, not a scorer (a ...ForSequenceClassification, "
                         "as the reward stage exports): its score head would be random")


class PromptShift(nn.Module):
    """Wraps any reward and adds a per-prompt offset: r'(x, y) = r(x, y) + delta(x), with
    delta(x) = scale * reward_std * z(x), z(x) a standard normal drawn from sha256(seed, prompt text). Responses
    to the same prompt get the same offset, whatever the batch, rank or run; `scale` is in units of the wrapped
    reward's std (`reward_std`: 1 for a normalised `RewardModel`, whose std on SFT samples is 1 by construction;
    for another reward pass its measured std).

    It tests the paper's claim: objectives that compare responses to the same prompt (P3O, RLOO, GRPO with group
    scaling, online DPO) see the same training signal whatever delta is; PPO's value function has to learn delta.

        reward:
          class_path: modules.rewards.PromptShift
          init_args:
            reward: {class_path: modules.rewards.RewardModel, init_args: {path: artifacts/quickstart/reward}}
            scale: 4.0

    Worked example (seed 0): z('a') = 1.3305 (sha256 of b'0\\x00a' seeding Python's Mersenne Twister, then gauss),
    so with scale 2 and reward_std 0.5 every response to 'a' gets delta = 2 * 0.5 * 1.3305 = 1.3305 added.

    Args:
        reward: the wrapped reward (any reward the RL module takes but a pairwise one).
        scale: the offset's size in units of `reward_std`.
        seed: seeds z(x) together with the prompt text.
        reward_std: the wrapped reward's std (1 for a normalised `RewardModel`).
    """

    def __init__(self, reward, scale: float = 1.0, seed: int = 0, reward_std: float = 1.0):
        super().__init__()
        if not (scale >= 0 and reward_std > 0):
            raise ValueError(f"PromptShift: expected scale >= 0 and reward_std > 0, got scale={scale}, "
                             f"reward_std={reward_std}")
        if is_pairwise(reward):
            raise ValueError(f"PromptShift: {qualified_name(reward)} is a pairwise reward; a per-prompt offset cancels "
                             "in every pair, so there is nothing to shift")
        self.reward, self.scale, self.seed, self.reward_std = reward, float(scale), int(seed), float(reward_std)

    def offset(self, prompt: str) -> float:
        """delta(prompt) = scale * reward_std * z(prompt)."""
        digest = hashlib.sha256(f"{self.seed}\0{prompt}".encode()).digest()
        return self.scale * self.reward_std * random.Random(digest).gauss(0.0, 1.0)

    @torch.no_grad()
    def score(self, rollout: Rollout, tokenizer) -> torch.Tensor:
        # The wrapped reward is scored and checked like any reward (one number per response, its class named);
        # NaN/inf pass through (as NaN) to the RL module's own check: stop, or the `nonfinite_reward` penalty.
        rewards, _ = score(self.reward, rollout, tokenizer, nonfinite=float("nan"))
        offsets = torch.tensor([self.offset(p) for p in rollout.prompts], dtype=torch.float32)
        return rewards + offsets.to(rewards.device)


class RewardError(ValueError):
    """A reward returned something other than one finite number per response."""


def score(reward, rollout: Rollout, tokenizer, nonfinite: float | None = None,
          parts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """(rewards (N,) float32 on the rollout's device, number of non-finite rewards replaced), for either kind of
    reward object, validated by `check`. `parts`: row indices of consecutive micro-batches, each scored in its own
    call of a token-level reward (`score(rollout, tokenizer)`: a reward model's forward); a text callable gets
    every response at once. Each part must return one number per response; the whole is then checked once, so an
    error names the response by its index in the rollout."""
    if isinstance(reward, Composed):
        values = reward.combine(rollout, tokenizer, nonfinite, parts)
    else:
        values = awaited(raw_values(reward, rollout, tokenizer, parts), f"reward {qualified_name(reward)}")
    rewards, replaced = check(values, reward, rollout, nonfinite)
    return rewards.to(rollout.input_ids.device), replaced


def raw_values(reward, rollout: Rollout, tokenizer, parts: list[torch.Tensor] | None = None):
    """What `reward` returns for `rollout`, unchecked: a text callable's list (an awaitable if it is `async`), or a
    token-level reward's tensor, over `parts` (`score`)."""
    if not hasattr(reward, "score"):
        return call_text_reward(reward, rollout.prompts, rollout.responses, rollout.fields, rollout.completion_ids,
                                rollout.messages, rollout.environments)
    with conversations_named(reward):
        if parts is None or len(parts) == 1:
            return reward.score(rollout, tokenizer)
        return torch.cat([as_numbers(reward.score(piece, tokenizer), reward, len(piece))
                          for piece in (rollout.select(rows) for rows in parts)])


@contextlib.contextmanager
def conversations_named(reward):
    """A reward model that re-encodes conversational prompts with a tokenizer that has no chat template: one line
    naming the reward (`datamodules.collate.NoChatTemplate`), not a traceback from inside it."""
    from datamodules.collate import NoChatTemplate

    try:
        yield
    except NoChatTemplate as error:
        raise RewardError(f"reward {qualified_name(reward)}: {error}") from None


_loop: asyncio.AbstractEventLoop | None = None
DEFAULT_TIMEOUT = 600.0         # seconds an async reward's call may take (RLModule reward_timeout)
TIMEOUT_KNOB = "model.init_args.reward_timeout"
_timeout: contextvars.ContextVar[tuple[float | None, str | None]] = contextvars.ContextVar(
    "reward_timeout", default=(DEFAULT_TIMEOUT, None))


@contextlib.contextmanager
def reward_timeout(seconds: float | None, knob: str | None = TIMEOUT_KNOB):
    """Within it, an async reward's (judge's, term's) call that has not finished after `seconds` is cancelled and a
    `RewardError` stops the run (None: no limit); its message names `knob`, the setting that sets the limit (None:
    none does). The RL module sets its `reward_timeout` around scoring, and the evaluation the RL module's around its
    rewards and judges; elsewhere (an SFT or reward stage's evaluation) `DEFAULT_TIMEOUT` applies, set by nothing."""
    token = _timeout.set((seconds, knob))
    try:
        yield
    finally:
        _timeout.reset(token)


def awaited(value, what: str = "reward"):
    """`value` itself, or its result when it is awaitable (what an `async def` reward returns): `awaited_all`."""
    return awaited_all([value], what)[0]


def awaited_all(values: list, what: str = "reward") -> list:
    """`values` with each awaitable one replaced by its result, the awaitables run concurrently. Every awaitable runs
    on one event loop that lives, in a daemon thread, as long as the process (as TRL runs async reward functions):
    a client an async reward made once (an HTTP session) stays bound to the loop it was made on. Awaitables that
    have not all finished within the `reward_timeout` in force are cancelled, and a `RewardError` names `what`
    (e.g. "reward mymodule.judge") instead of a run that hangs."""
    global _loop
    pending = [v for v in values if inspect.isawaitable(v)]
    if not pending:
        return list(values)
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="async rewards", daemon=True).start()

    async def gather():
        return await asyncio.gather(*pending)

    future, (seconds, knob) = asyncio.run_coroutine_threadsafe(gather(), _loop), _timeout.get()
    try:
        done = iter(future.result(timeout=seconds))
    except concurrent.futures.TimeoutError:
        future.cancel()                                    # (cancels the gathered calls on the loop)
        longer = (f"set {knob} (seconds, or null for no limit) if it needs longer, or give its client a timeout of its "
                  "own" if knob else "the limit outside the RL stage, which no setting changes; give its client a "
                  "timeout of its own")
        raise RewardError(f"{what}: an async call did not finish within {seconds:g} s; {longer}") from None
    return [next(done) if inspect.isawaitable(v) else v for v in values]


def check(values, reward, rollout: Rollout, nonfinite: float | None = None) -> tuple[torch.Tensor, int]:
    """Exactly one finite number per response, as a float32 tensor (N,); otherwise a `RewardError` naming the
    reward's class, what was expected and received, and the first offending prompt / response. With `nonfinite`
    set, NaN / inf rewards are replaced by that value (a penalty) instead. Returns (rewards, replaced count)."""
    name, n = qualified_name(reward), len(rollout)
    tensor = as_numbers(values, reward, n)
    return finite_or_replaced(tensor, nonfinite, lambda i, bad: (
        f"reward {name} returned {tensor[i].item()} for response {i} of {n} (prompt {rollout.prompts[i]!r}, "
        f"response {rollout.responses[i]!r}) and {bad - 1} more non-finite; expected finite numbers (set "
        "model.init_args.nonfinite_reward: <penalty> to replace them by a penalty instead)"))


def finite_or_replaced(tensor: torch.Tensor, nonfinite: float | None, error) -> tuple[torch.Tensor, int]:
    """(`tensor` with NaN / inf replaced by `nonfinite`, how many were); with `nonfinite` None, a `RewardError`
    whose message is `error(index of the first, count)` instead."""
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if not count:
        return tensor, 0
    if nonfinite is None:
        raise RewardError(error(int(bad.nonzero()[0]), count))
    return torch.where(bad, torch.full_like(tensor, nonfinite), tensor), count


def as_numbers(values, reward, n: int, unit: str = "response",
             why: str = "rewards would be misaligned with responses") -> torch.Tensor:
    """`values` as a float32 CPU tensor of shape (n,), one per `unit` (response, or pair for a pairwise reward),
    or a `RewardError` saying what came instead."""
    name = f"{'pairwise ' if unit == 'pair' else ''}reward {qualified_name(reward)}"
    if isinstance(values, (list, tuple)) and None in values:
        raise RewardError(f"{name} returned None for {unit} {list(values).index(None)} of {n}; expected a number "
                          "(None, 'does not apply', is for a term of modules.rewards.Composed, whose other terms "
                          "score that response)")
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(f"{name} returned {type(values).__name__} that is not a sequence of numbers "
                          f"({err}); expected {n} floats, one per {unit}") from None
    if tensor.shape != (n,):
        got = f"{tensor.numel()} values" if tensor.dim() == 1 else f"shape {tuple(tensor.shape)}"
        raise RewardError(f"{name} returned {got} for {n} {unit}s; expected one number per {unit} ({why})")
    return tensor


class PairwiseReward:
    """The pairwise reward interface: `reward(prompts, responses_a, responses_b) -> list[float]`, one number per
    pair, the logit of P(a preferred over b) (a Bradley-Terry margin). Subclass it (or set `pairwise = True` on
    your callable) and select it by `class_path` as the RL module's `reward`.

    The RL module asks it about every pair (i, j), i < j, of each group of K responses to a prompt: K (K - 1) / 2
    comparisons per prompt. P3O and online DPO use each pair's number directly (as r_i - r_j); the other
    objectives get per-response scores from the tournament (`tournament_scores`).

    A reward that is not antisymmetric by construction (`antisymmetric = False`, the default: an LLM judge, an API
    judge) is asked about each pair in both orders, and its position bias cancels: f = (f(a, b) - f(b, a)) / 2.
    Set `antisymmetric = True` on a reward whose f(b, a) is -f(a, b) exactly, and each pair is asked once."""

    pairwise = True
    antisymmetric = False

    def __call__(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        raise NotImplementedError


class DifferenceOf(PairwiseReward):
    """A pairwise reward from a scalar one: f(x, a, b) = r(x, a) - r(x, b) (the Bradley-Terry margin of r).

    Args:
        reward: a text reward `(prompts, responses) -> list[float]` (e.g. `datamodules.task.GoldReward`).
    """

    antisymmetric = True

    def __init__(self, reward: Callable):
        self.reward = reward

    def __call__(self, prompts, responses_a, responses_b):
        a, b = awaited_all([call_text_reward(self.reward, prompts, responses_a, {}),
                            call_text_reward(self.reward, prompts, responses_b, {})], f"reward {qualified_name(self.reward)}")
        return [x - y for x, y in zip(a, b)]


class PreferenceModel(FrozenModel, PairwiseReward):
    """A frozen pairwise preference-model export (`modules.preference_model.PreferenceModule`), as a pairwise reward
    or a judge: f(x, a, b) = g(x, a, b) - g(x, b, a), the logit of P(a preferred over b), antisymmetric exactly.
    Responses are scored as texts, each followed by EOS (the input the model was trained on).

    Args:
        path: export directory of the preference-model stage.
        normalize: multiply f by sqrt(2) / std, with the std of f over pairs of SFT samples stored in the export's
            `preference.json`: the spread of the difference of two normalised scalar rewards (`RewardModel`), so the
            RL configs' KL coefficients mean the same with either reward.
        batch_size: pairs per forward (both orders of each).
    Built by `configure(mesh)` (sharded under FSDP2) or at its first use (`FrozenModel`).
    """

    antisymmetric = True

    def __init__(self, path: str, normalize: bool = True, batch_size: int = 64):
        from modules.preference_model import CONFIG_FILE

        config = os.path.join(path, CONFIG_FILE)
        if not os.path.exists(config):
            raise FileNotFoundError(f"{path}: not a preference-model export (no {CONFIG_FILE}); train one with "
                                    "configs/quickstart/preference.yaml, or use modules.rewards.RewardModel for a "
                                    "scalar reward model")
        super().__init__(BackboneSpec(pretrained=path), load_tokenizer(path))
        self.path, self.normalize, self.batch_size = path, normalize, batch_size
        self.scale = math.sqrt(2) / read_scale(config, ("std",))["std"] if normalize else 1.0

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        from modules.preference_model import preferences, text_pair_inputs

        device = next(self.model.parameters()).device

        def forward(a: int, b: int) -> list[float]:
            ids, mask = text_pair_inputs(self.tokenizer, prompts[a:b], responses_a[a:b], responses_b[a:b])
            self.check_length(ids.shape[1], "a pair (prompt + a + EOS + b + EOS)")
            return (preferences(self.model, ids.to(device), mask.to(device)).float() * self.scale).tolist()

        return self.batched(len(prompts), self.batch_size, forward)


def order_debiased(forward: torch.Tensor, backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, agree) from a pairwise reward asked in both orders, forward = f(a, b) and backward = f(b, a):
    score = (f(a, b) - f(b, a)) / 2, a bias towards either position cancelled (> 0: a wins); agree: both orders
    name the same winner (f(a, b) > 0 and f(b, a) < 0, or f(a, b) <= 0 and f(b, a) >= 0).

    Example: f(a, b) = 1.5 (first position favoured by 1), f(b, a) = 0.5: score = 0.5 (a wins), agree = False."""
    return (forward - backward) / 2, (forward > 0) == (backward < 0)


def is_pairwise(reward) -> bool:
    return bool(getattr(reward, "pairwise", False))


def score_pairs(reward, rollout: Rollout, nonfinite: float | None = None) -> tuple[torch.Tensor, int, float | None]:
    """(M (N, K), non-finite count, order agreement) for a pairwise reward: M[i K + a, b] = f(x_i, y_a, y_b), the
    pairwise reward of response a over response b of group i; M[., b, a] = -M[., a, b] (a logit of P(a over b) is
    minus that of P(b over a)) and the diagonal is 0. Validated like a scalar reward: one finite number per pair,
    or a `RewardError` naming the reward, the pair and its texts (`nonfinite` replaces NaN / inf instead).

    A reward that declares `antisymmetric = True` is asked once per pair a < b, in one call; agreement is None.
    Any other (a judge) is asked, in one call, about every pair in both orders, and M[., a, b] = (f(a, b) -
    f(b, a)) / 2: a bias towards the first (or second) position cancels. Agreement is the fraction of pairs whose
    two orders name the same winner (`order_debiased`).

    Examples (K = 2, one prompt, r = [0.5, 2.0]): f = r(a) - r(b), antisymmetric: M = [[0, -1.5], [1.5, 0]].
    A judge f = r(a) - r(b) + 1 (the first position favoured by 1): f(0, 1) = -0.5, f(1, 0) = 2.5, so
    M[0, 1] = (-0.5 - 2.5) / 2 = -1.5, the same M, and agreement 1.0 (both orders say response 1 wins)."""
    from modules.objectives.p3o import group_pairs

    K, n = rollout.group_size, len(rollout)
    rows_a, rows_b = (rows.tolist() for rows in group_pairs(n, K))                 # every pair a < b of each group
    both = not getattr(reward, "antisymmetric", False)
    first, second = (rows_a + rows_b, rows_b + rows_a) if both else (rows_a, rows_b)
    fields = {name: [values[i] for i in first] for name, values in rollout.fields.items()}
    with conversations_named(reward):
        values = awaited(reward([rollout.prompts[i] for i in first], [rollout.responses[i] for i in first],
                                [rollout.responses[j] for j in second], **field_kwargs(reward, fields, pairwise=True)),
                         f"pairwise reward {qualified_name(reward)}")
    name = qualified_name(reward)
    asked = len(first)
    why = f"K = {K} responses per prompt: K (K - 1) / 2 pairs each" + (
        ", asked in both orders (the reward does not declare antisymmetric = True)" if both else "")
    tensor = as_numbers(values, reward, asked, "pair", why)
    tensor, replaced = finite_or_replaced(tensor, nonfinite, lambda p, bad: (
        f"pairwise reward {name} returned {tensor[p].item()} for pair {p} of {asked} (prompt "
        f"{rollout.prompts[first[p]]!r}, a {rollout.responses[first[p]]!r}, b {rollout.responses[second[p]]!r}) and "
        f"{bad - 1} more non-finite; expected finite numbers (set model.init_args.nonfinite_reward: <value> to "
        "replace them)"))
    agreement = None
    if both:
        tensor, agree = order_debiased(tensor[:len(rows_a)], tensor[len(rows_a):])
        agreement = agree.float().mean().item() if len(rows_a) else 1.0
    M = torch.zeros(n, K)
    M[rows_a, [j % K for j in rows_b]] = tensor
    M[rows_b, [i % K for i in rows_a]] = -tensor
    return M.to(rollout.input_ids.device), replaced, agreement


def tournament_scores(pair_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-response scores from pairwise rewards, for objectives that need one number per response: the win
    fraction, mean over the K - 1 opponents of sigmoid(M[a, b]) (in [0, 1]; 1/2 for a response as good as every
    other). (N, K) -> (N,). It costs the K (K - 1) / 2 comparisons per prompt that `score_pairs` asked.

    Example: M = [[0, -1.5], [1.5, 0]] -> [sigmoid(-1.5), sigmoid(1.5)] = [0.1824, 0.8176]."""
    K = group_size
    own = torch.arange(len(pair_rewards), device=pair_rewards.device) % K                  # (N,)
    wins = torch.sigmoid(pair_rewards)
    wins = wins.masked_fill(torch.nn.functional.one_hot(own, K).bool(), 0.0)
    return wins.sum(-1) / max(K - 1, 1)


POSITIONAL = {False: ("prompts", "responses"), True: ("prompts", "responses_a", "responses_b")}
IDS = "completion_ids"      # not a record field: each response's token ids, EOS included (TRL's `completion_ids`)
STATE = "trainer_state"     # not a record field either: the training's progress (TRL's `trainer_state`)
LOG_METRIC = "log_metric"   # nor this: TRL's `log_metric(name, value)`, a scalar the reward logs
LOG_EXTRA = "log_extra"     # nor this: TRL's `log_extra(column, values)`, a column of the samples shown
ENVS = "environments"       # nor this: TRL's `environments`, each response's tools environment instance
_state: contextvars.ContextVar = contextvars.ContextVar("trainer_state", default=None)
_logged: contextvars.ContextVar = contextvars.ContextVar("log_metric", default=None)
_extras: contextvars.ContextVar = contextvars.ContextVar("log_extra", default=None)
STAGES_ONLY = "which only the RL module's scoring and the evaluation give; called here without one"
NOT_GIVEN = {   # why a reward requiring one of these did not get it
    IDS: "(the responses' token ids), which its caller does not have: a pairwise reward or judge calls it with texts "
         "alone; use it as the RL stage's reward, a term of modules.rewards.Composed, or the evaluation reward",
    STATE: f"(TRL's: the training's progress), {STAGES_ONLY}", LOG_METRIC: f"(TRL's metric logger), {STAGES_ONLY}",
    LOG_EXTRA: f"(TRL's logger of extra columns), {STAGES_ONLY}",
    ENVS: "(TRL's: each response's environment instance), which only generation with a tools environment gives "
          "(data.init_args.tools.environment): the RL module's rollouts and its evaluation"}


@contextlib.contextmanager
def _collecting(var: contextvars.ContextVar, keep: bool):
    """Sets `var` to (a new dict, keep) for the duration and yields the dict (`reward_metrics`, `reward_extras`)."""
    collected: dict[str, list] = {}
    token = var.set((collected, keep))
    try:
        yield collected
    finally:
        var.reset(token)


def reward_extras(keep: bool = True):
    """Within it, a reward that takes `log_extra` (by name, or TRL-style with `**kwargs`) gets TRL's
    `log_extra(column, values)`, one value per response of its call; yields {column: [values]} (`keep=False`: dropped,
    for calls whose samples are not shown: an evaluation's reference samples). The evaluation shows the columns
    beside its samples (`show`), a rollout's samples table beside its responses (`OnPolicyRollout log_samples`;
    `Rollout.extras`, where there is one value per response)."""
    return _collecting(_extras, keep)


def _log_extra(collector: tuple[dict, bool], responses: int, column: str, values) -> None:
    columns, keep = collector
    if not isinstance(column, str) or not column:
        raise RewardError(f"log_extra({column!r}, ...): expected a column name (a non-empty string)")
    sized = hasattr(values, "__len__") and not isinstance(values, (str, bytes))
    if not sized or len(values) != responses:
        got = f"{len(values)} values" if sized else f"a {type(values).__name__}"
        raise RewardError(f"log_extra({column!r}, ...): expected one value per response ({responses}), got {got}")
    if keep:
        columns.setdefault(column, []).extend(values)


def reward_metrics(keep: bool = True):
    """Within it, a reward that takes `log_metric` (by name, or TRL-style with `**kwargs`) gets TRL's
    `log_metric(name, value)`; yields {name: [values]} of the calls (`keep=False`: a dict the values are dropped
    from, for the calls whose metrics are not reported, such as an evaluation's reference samples). The RL module
    logs each name's mean over a rollout and the processes as `train/<name>` (`metric_means`), the evaluation as
    `val/<name>`."""
    return _collecting(_logged, keep)


def _log_metric(collector: tuple[dict, bool], name: str, value) -> None:
    logged, keep = collector
    if not isinstance(name, str) or not name:
        raise RewardError(f"log_metric({name!r}, ...): expected a metric name (a non-empty string)")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RewardError(f"log_metric({name!r}, {value!r}): expected a number") from None
    if keep:
        logged.setdefault(name, []).append(number)


def metric_means(logged: dict[str, list[float]], over_ranks: Callable[[list[float], str], list[float]],
                 names: Callable[[list[str]], list[str]]) -> dict[str, float]:
    """{name: mean of every value logged under it} over the processes: `names` turns this process's names into every
    process's (in one order on all), `over_ranks` sums; a name one process did not log adds nothing there (TRL:
    total / count over the processes). Example: {"a": [1, 3]} here, {"a": [5], "b": [2]} elsewhere -> a 3, b 2."""
    every = names(sorted(logged))
    if not every:                                   # (the same on every process: nothing logged anywhere)
        return {}
    sums = over_ranks([x for name in every for x in (sum(logged.get(name, [])), len(logged.get(name, [])))], "sum")
    return {name: sums[2 * i] / sums[2 * i + 1] for i, name in enumerate(every) if sums[2 * i + 1] > 0}


@contextlib.contextmanager
def trainer_state(state):
    """Within it, a reward that takes `trainer_state` (by name, or a TRL-style one with `**kwargs`) gets `state`
    (`lightning_state`): the RL module sets it around scoring, the evaluation around its rewards."""
    token = _state.set(state)
    try:
        yield
    finally:
        _state.reset(token)


def lightning_state(trainer, steps_per_batch: int = 1):
    """TRL's `trainer_state` (a `transformers.TrainerState`) from a Lightning trainer, for reward functions that shape
    their reward by training progress: `global_step`, optimizer steps so far; `max_steps`, the run's (training
    batches of all epochs x `steps_per_batch`, or `trainer.max_steps` where smaller; -1 when neither bounds it);
    `epoch`, fractional (training batches done / batches per epoch); `num_train_epochs`.

    Example: 4 batches per epoch, 2 epochs, 4 optimizer steps per batch, after 5 batches: global_step 20,
    max_steps 32, epoch 1.25."""
    from transformers import TrainerState

    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    total = batches * epochs * steps_per_batch if math.isfinite(batches) and epochs and epochs > 0 else -1
    if trainer.max_steps and trainer.max_steps > 0:
        total = trainer.max_steps if total < 0 else min(total, trainer.max_steps)
    loop = trainer.fit_loop.epoch_loop          # batches done, as `callbacks.evaluation.batches_done` counts them
    done = loop._batches_that_stepped + int(loop.batch_progress.total.processed > loop.batch_progress.total.completed)
    epoch = done / batches if math.isfinite(batches) and batches > 0 else float(trainer.current_epoch)
    return TrainerState(global_step=trainer.global_step, max_steps=int(total), epoch=float(epoch),
                        num_train_epochs=epochs if epochs and epochs > 0 else 0,
                        is_world_process_zero=trainer.is_global_zero)


def call_text_reward(reward, prompts: list[str], responses: list[str], fields: dict[str, list],
                     ids: Callable[[], list[list[int]]] | list[list[int]] | None = None,
                     messages: list[list[dict]] | None = None, environments: list | None = None):
    """What a per-response text reward returns (an awaitable if it is `async`), called with the record fields it
    takes (`field_kwargs`): positionally as `reward(prompts, responses, **fields)`, or, for a reward function
    written for TRL (`trl_style`), by keyword as TRL's GRPOTrainer calls it: `reward(prompts=..., completions=...,
    completion_ids=..., **fields)` (`prompts` and `completion_ids` only if it takes them).

    `ids`: the responses' token ids up to and including EOS (`Rollout.completion_ids`, or a function giving them,
    called only for a reward that takes them), passed as `completion_ids=` to a reward that names that parameter
    (a length penalty such as `modules.verifiable.OverlongPenalty`) and to a TRL-style one with `**kwargs`. A
    reward that requires them where the caller has none (a pairwise reward's scalar reward) is a `RewardError`.

    On conversational data (prompts given as lists of messages) a TRL-style reward gets each completion as TRL
    gives it there, `[{"role": "assistant", "content": text}]`, or with tools `messages` (`Rollout.messages`: the
    assistant turns, parsed into content, reasoning and `tool_calls` as TRL parses them, and tool results in order,
    as TRL's tool loop gives them); any other reward gets texts (with
    tools, the whole response: turns and tool results as the policy saw them). With a tools environment, a reward
    that names `environments` (or a TRL-style one with `**kwargs`) gets each response's instance (`Rollout.
    environments`), as TRL passes them: `modules.rewards.environment_reward` reads their `get_reward()`.

    Example: TRL's `def accuracy(completions, answer, **kwargs)` is called as `accuracy(prompts=prompts,
    completions=responses, completion_ids=[...], answer=[...])`."""
    kwargs = field_kwargs(reward, fields)
    params = _parameters(reward) or []
    # what a reward may take besides its texts and fields: each made only for one that takes it (the loggers bound
    # to the collectors in force here, whichever thread an async reward's body runs on), or None where not given
    given = {IDS: lambda: ids() if callable(ids) else ids, STATE: _state.get,
             LOG_METRIC: lambda: _logged.get() and functools.partial(_log_metric, _logged.get()),
             LOG_EXTRA: lambda: _extras.get() and functools.partial(_log_extra, _extras.get(), len(responses)),
             ENVS: lambda: environments}
    for name, make in given.items():
        if not takes(reward, name):
            continue
        value = make()
        if value is not None:
            kwargs[name] = value
        elif any(p.name == name and p.default is inspect.Parameter.empty for p in params):
            raise RewardError(f"reward {qualified_name(reward)} takes {name} {NOT_GIVEN[name]}")
    if isinstance(reward, Composed):                              # (its terms get what this call was given)
        return reward(prompts, responses, messages=messages, **kwargs)
    if not trl_style(reward):
        return reward(prompts, responses, **kwargs)
    takes_prompts = any(p.name == "prompts" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if any(isinstance(prompt, list) for prompt in prompts):        # conversational data: TRL's completions
        responses = messages or [[{"role": "assistant", "content": response}] for response in responses]
    return reward(completions=responses, **({"prompts": prompts} if takes_prompts else {}), **kwargs)


def trl_style(reward) -> bool:
    """A per-response text reward written for TRL: its call names a parameter `completions` or `completion_ids`
    (and none `responses`), and takes its inputs by keyword (TRL's `get_soft_overlong_punishment` takes
    `completion_ids, **kwargs`)."""
    names = {p.name for p in _parameters(reward) or ()}
    return bool({"completions", IDS} & names) and "responses" not in names and not hasattr(reward, "score")


def takes(reward, name: str) -> bool:
    """Whether a text reward's call takes `completion_ids`, `trainer_state`, `log_metric`, `log_extra` or
    `environments` (`name`): it names that parameter, or it is written for TRL (`trl_style`) and takes `**kwargs`
    (TRL passes them all)."""
    params = _parameters(reward) or ()
    return any(p.name == name for p in params) or (
        trl_style(reward) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


def field_kwargs(reward, fields: dict[str, list], pairwise: bool = False) -> dict[str, list]:
    """The record fields (`PairDataModule reward_fields`: name -> one value per response, or per pair) that the
    call of a text `reward` takes by keyword: every one if it takes `**kwargs`, else those it names besides its
    texts (`prompts, responses`, `prompts, responses_a, responses_b`, or TRL's `prompts, completions`). A field it
    requires (no default) that `fields` lacks is a `RewardError` naming it.

    Example: `def correct(prompts, responses, answer)` with fields {answer: ["4", "4", "9", "9"], id: [...]} is
    called as `correct(prompts, responses, answer=["4", "4", "9", "9"])`; with fields {} it is refused."""
    params = _parameters(reward)
    if params is None:                      # no signature to read (a builtin): texts only
        return {}
    check_fields(reward, fields, pairwise)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(fields)
    return {name: values for name, values in fields.items() if name in {p.name for p in params}}


def check_fields(reward, names, pairwise: bool = False) -> None:
    """A `RewardError` naming what to set unless the record fields `names` hold every field `reward` requires
    (`required_fields`): the check `field_kwargs` makes at each call, and the stages make before the first rollout."""
    missing = [name for name in required_fields(reward, pairwise) if name not in set(names)]
    if missing:
        raise RewardError(f"reward {qualified_name(reward)} takes {', '.join(map(repr, missing))} by keyword, which "
                          f"no record field provides (fields given: {sorted(names) or 'none'}); set data.init_args."
                          f"reward_fields: [{', '.join(missing)}] and give every record that field")


def check_environments(reward, environment) -> None:
    """A `RewardError` before the first rollout where `reward` (or a term of a `Composed` one) requires
    `environments` and the data's tools have no `environment` to give them."""
    if environment is not None:
        return
    terms = reward.rewards.values() if isinstance(reward, Composed) else [reward]
    for term in terms:
        if any(p.name == ENVS and p.default is inspect.Parameter.empty for p in _parameters(term) or ()):
            raise RewardError(f"reward {qualified_name(term)} takes {ENVS} {NOT_GIVEN[ENVS]}; this data has none")


def required_fields(reward, pairwise: bool = False) -> list[str]:
    """The record fields a reward's call cannot do without: its `record_fields` attribute where it has one (a
    reward told the field's name in its settings, e.g. `modules.verifiable.AnswerMatch(field=...)`), else its
    parameters after the positional texts that have no default (a `Composed` reward: those of its terms). A
    token-level reward (`score(rollout, tokenizer)`) reads `rollout.fields` itself and requires none here."""
    if isinstance(reward, Composed):
        return sorted({name for term in reward.rewards.values() for name in required_fields(term)})
    if getattr(reward, "record_fields", None) is not None:      # a reward whose fields are its settings
        return list(reward.record_fields)
    params = _parameters(reward)
    if params is None or hasattr(reward, "score"):
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    later = [p for p in named if p.name not in ("prompts", "completions")] if not pairwise and trl_style(reward) \
        else named[len(POSITIONAL[pairwise]):]
    return [p.name for p in later if p.default is inspect.Parameter.empty and p.name not in NOT_GIVEN]


def _parameters(reward) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):
        return None


async def environment_reward(prompts: list, responses: list[str], environments: list) -> list[float]:
    """Each response's score from its own tools environment, its `get_reward()` (sync or `async`): TRL's reward
    owned by the environment (a game won, a sandbox's tests passed), read after the response from the state its
    calls left. The RL stage's reward, a term of `Composed`, or the evaluation reward, with data `tools:
    {environment: ...}` (`datamodules.tools.Tools`).

    Example: environments whose get_reward() return 1.0 and 0.0 -> [1.0, 0.0]."""
    values = []
    for environment in environments:
        get = getattr(environment, "get_reward", None)
        if not callable(get):
            raise RewardError(f"reward modules.rewards.environment_reward: the environment {type(environment).__module__}"
                              f".{type(environment).__qualname__} has no get_reward method; expected get_reward(self) "
                              "returning a number")
        value = get()
        values.append(await value if inspect.isawaitable(value) else value)
    return values


class Composed(nn.Module):
    """A weighted sum of per-response rewards: r = sum_k w_k r_k. Each term is logged: `train/reward_<name>` per
    rollout and `val/reward_<name>` in evaluation (the weighted sum is `train/reward`). Each term is validated as
    a reward of its own (one finite number per response; an error names the term), and a term that takes record
    fields gets its own (`field_kwargs`). As an evaluation reward (a text callable), its terms must be text
    callables too. On a dataset that mixes tasks, a term returns None for a response it does not apply to (TRL's
    convention): the response's reward is the weighted sum of the terms that apply, and each term is logged as its
    mean over the responses it applies to (`term_means`); a response no term applies to is an error.

    Args:
        rewards: name -> reward: any per-response reward (a text callable such as `modules.verifiable.AnswerMatch`,
            a `RewardModel`, a `modules.remote.RemoteReward`), by `class_path`. Names are letters, digits, `_`.
        weights: name -> weight (a term left out weighs 1).

    Example: terms correct in {0, 1} and format in {0, 1}, weights {correct: 1.0, format: 0.2}: a correct response
    in the wrong format gets 1.0, a wrong one in the right format 0.2, both right 1.2. Mixed: terms correct
    (maths records) and mentions (records with a keyword), weights {correct: 1, mentions: 0.5}, values [1, 0, None,
    None] and [None, None, 1, 0]: rewards [1, 0, 0.5, 0].
    """

    def __init__(self, rewards: dict[str, Callable], weights: dict[str, float] | None = None):
        super().__init__()
        weights = dict(weights or {})
        if not rewards:
            raise ValueError("Composed: rewards is empty; expected name -> reward for at least one term")
        bad = [name for name in rewards if not name.isidentifier()]
        unknown = sorted(set(weights) - set(rewards))
        if bad or unknown:
            problem = (f"term names {bad} are not names" if bad else
                       f"weights for {unknown} name no term of rewards {sorted(rewards)}")
            raise ValueError(f"Composed: {problem}; expected names of letters, digits and _, and weights keyed by "
                             "those names")
        for name, reward in rewards.items():
            if is_pairwise(reward) or not (callable(reward) or hasattr(reward, "score")):
                raise ValueError(f"Composed: term {name!r} ({qualified_name(reward)}) is "
                                 f"{'a pairwise reward' if is_pairwise(reward) else 'not callable'}; expected a "
                                 "per-response reward (a callable (prompts, responses) or a RewardModel)")
            if not math.isfinite(float(weights.get(name, 1.0))):
                raise ValueError(f"Composed: weights[{name!r}]={weights[name]}; expected a finite number")
        self.rewards = dict(rewards)
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.models = nn.ModuleDict({n: r for n, r in rewards.items() if isinstance(r, nn.Module)})  # moved, sharded

    def combine(self, rollout: Rollout, tokenizer, nonfinite: float | None = None,
                parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The weighted sum (N,) over `rollout`; each term (N,) goes to `rollout.reward_terms`, NaN where it does
        not apply. A term's NaN / inf stops the run (`nonfinite` None) naming the term, or makes the sum non-finite
        (then replaced as one). `async` terms are awaited together."""
        raw = self.gathered(lambda reward: raw_values(reward, rollout, tokenizer, parts))
        terms = {}
        for name, reward in self.rewards.items():
            with self.term(name):
                terms[name] = self.checked(raw[name], reward, rollout, nonfinite)
        rollout.reward_terms.update({name: values for name, (values, _) in terms.items()})
        return self.total(terms, rollout.prompts, rollout.responses)

    def forward(self, prompts: list[str], responses: list[str], completion_ids: list[list[int]] | None = None,
                messages: list[list[dict]] | None = None, environments: list | None = None, **fields) -> list[float]:
        """The weighted sum over texts (as an evaluation reward); every term must be a text callable. Its terms get
        the responses' `completion_ids` and, with tools, `messages` and `environments` where it is given them
        (`call_text_reward`), as in training."""
        for name, reward in self.rewards.items():
            if hasattr(reward, "score"):
                raise RewardError(f"{qualified_name(self)}: term {name!r} ({qualified_name(reward)}) scores token "
                                  "ids, not texts; as an evaluation reward every term must be a text callable")
        raw = self.gathered(lambda reward: call_text_reward(reward, prompts, responses, fields, completion_ids,
                                                            messages, environments))
        terms = {}
        for name, reward in self.rewards.items():
            with self.term(name):
                terms[name] = _numbers_or_none(raw[name], reward, len(responses))
        return self.total(terms, prompts, responses).tolist()

    def gathered(self, call) -> dict:
        """name -> what `call(term)` returned for each term (errors naming the term), the async ones awaited
        together."""
        raw = {}
        for name, reward in self.rewards.items():
            with self.term(name):
                raw[name] = call(reward)
        return dict(zip(raw, awaited_all(list(raw.values()), f"{qualified_name(self)} (terms {sorted(raw)})")))

    @contextlib.contextmanager
    def term(self, name: str):
        """A `RewardError` raised while scoring term `name` names the term."""
        try:
            yield
        except RewardError as error:
            raise RewardError(f"term {name!r} of {qualified_name(self)}: {error}") from None

    @staticmethod
    def checked(values, reward, rollout: Rollout, nonfinite: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N,), applies (N,)) of a term, on the rollout's device: NaN where it returned None (it does not
        apply), checked like any reward where it applies (non-finite: an error, or NaN with `nonfinite` set)."""
        numbers, applies = _numbers_or_none(values, reward, len(rollout))
        scored, _ = check(numbers, reward, rollout, None if nonfinite is None else float("nan"))
        device = rollout.input_ids.device
        return torch.where(applies, scored, float("nan")).to(device), applies.to(device)

    def total(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]], prompts: list[str],
              responses: list[str]) -> torch.Tensor:
        """sum_k w_k r_k over the terms that apply to each response (`terms`: name -> (values, applies)); a
        `RewardError` naming the first response no term applies to. A term's NaN where it applies (a non-finite
        value replaced) makes the sum NaN, to be replaced as one."""
        values, applies = next(iter(terms.values()))
        total, covered = torch.zeros_like(values), torch.zeros_like(applies)
        for name, (values, applies) in terms.items():
            total = total + torch.where(applies, self.weights[name] * values, 0.0)
            covered |= applies
        if not covered.all():
            i = int((~covered).nonzero()[0])
            raise RewardError(f"{qualified_name(self)}: no term applies to response {i} of {len(total)} (prompt "
                              f"{prompts[i]!r}, response {responses[i]!r}): each of {sorted(terms)} returned None for "
                              "it; give every record a field that one of the terms reads")
        return total


def _numbers_or_none(values, reward, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(numbers (n,) with 0 where `values` holds None, applies (n,) bool: not None) for a `Composed` term, whose
    None says that it does not apply to that response (TRL's convention for multi-task rewards)."""
    if isinstance(values, (list, tuple)) and len(values) == n:
        applies = torch.tensor([v is not None for v in values], dtype=torch.bool)
        return as_numbers([0.0 if v is None else v for v in values], reward, n), applies
    return as_numbers(values, reward, n), torch.ones(n, dtype=torch.bool)


def term_means(terms: dict[str, torch.Tensor], over_ranks=None) -> dict[str, float]:
    """Each composed reward term's mean over the responses it applies to (not NaN), over every process
    (`over_ranks`: sums [totals..., counts...] over them, or None in one process); a term that applies to no
    response anywhere is left out (every rank leaves it out alike).

    Example: {correct: [1, 0, nan, nan], runs: [nan, nan, 0.5, nan]} -> {correct: 0.5, runs: 0.5}."""
    names = list(terms)
    if not names:                           # (no composed reward: no collective either; every rank alike)
        return {}
    sums = [float(torch.nan_to_num(terms[n].float(), nan=0.0).sum()) for n in names]
    counts = [float((~torch.isnan(terms[n])).sum()) for n in names]
    totals = over_ranks(sums + counts) if over_ranks is not None else sums + counts
    return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names) if totals[len(names) + i] > 0}


def qualified_name(obj) -> str:
    """`module.Class` of an object (`module.function` of a function): how errors and warnings name a reward or an
    objective."""
    cls = obj if inspect.isfunction(obj) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
