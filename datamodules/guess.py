"""The embedded guessing game: a simulated user (veRL's interactions; an environment's `respond`, docs/tools.md)
holds a secret number and answers each guess with "higher" or "lower" until the policy names it. Nothing in the
prompt gives the secret away, so whatever the policy gains over chance it gains from the user's messages. Built
locally like the other embedded tasks: no hub.
"""
from __future__ import annotations

import random

from datamodules.sources import Source
from datamodules.sums import CALCULATOR_TEMPLATE, chat_word_tokenizer, last_number


class Hints:
    """The user of `GuessTask`, one per response: it holds the record's `answer` as its secret and, after each of the
    policy's turns, reads the turn's last number as a guess and says "higher" or "lower", or ends the conversation
    (None) when the guess is right or there is none. Its reward (`modules.rewards.environment_reward`) is 1 where
    the policy's last guess is the secret: a conversation cut off by `max_user_turns` after a wrong guess earns 0.
    It counts the guesses made after a hint (`answered`) and those that moved the hint's way (`followed`).

    Example: reset(answer=6); respond([.., assistant "4"]) -> "higher"; respond([.., assistant "3"]) -> "higher";
    respond([.., assistant "6"]) -> None; get_reward() -> 1.0, answered 2, followed 1."""

    def __init__(self):
        self.reset(0)

    def reset(self, answer: int) -> None:
        self.secret, self.guess, self.hint, self.answered, self.followed = int(answer), None, None, 0, 0

    def respond(self, messages: list[dict]) -> str | None:
        last, self.guess = self.guess, last_number(messages[-1]["content"] or "")
        if self.hint is not None:
            self.answered += 1
            moved = 0 if self.guess is None else self.guess - last
            self.followed += moved > 0 if self.hint == "higher" else moved < 0
        if self.guess is None or self.guess == self.secret:
            self.hint = None
            return None
        self.hint = "higher" if self.guess < self.secret else "lower"
        return self.hint

    def get_reward(self) -> float:
        return float(self.guess == self.secret)


def guessed(completions: list, environments: list, log_metric=None, **kwargs) -> list[float]:
    """The guessing game's reward, each response's `Hints.get_reward()` (1 where its last guess is the secret), as a
    TRL-style reward function that also logs `followed`: of the guesses made after a hint, over the call's
    responses, the share that moved the hint's way (`train/followed`, `val/followed`; 0.5 for a policy that steps at
    random, 1 for one that follows every hint).

    Called as TRL calls a reward function (by keyword; `completions` unread).

    Example: two users, one with 2 guesses after a hint of which 1 followed, one with 1 of 1 -> followed 2/3."""
    answered = sum(env.answered for env in environments)
    if log_metric is not None and answered:
        log_metric("followed", sum(env.followed for env in environments) / answered)
    return [env.get_reward() for env in environments]


class GuessTask(Source):
    """The guessing game's records, `{prompt: [{user: "guess a number from 0 to 8"}], chosen, answer: <the secret>}`.

    For data `tools: {environment: datamodules.guess.Hints}` and the reward `datamodules.guess.guessed` (or
    `modules.rewards.environment_reward`): the secret is drawn uniformly from 0..`top`, and the prompt is the same
    for every record.

    A demonstration (`chosen`) is a conversation with `Hints`: a first guess drawn uniformly from 0..top, then, until
    it is right or `max_hints` hints have been given, the user's hint and a guess one away from the last. That step
    goes the hint's way with probability `follow`, otherwise the other way (or the hint's way at the ends of the
    range). At the default 0.5 the demonstrations show the game's form but not what the hints mean: an SFT policy
    guesses and steps at random, and RL has the meaning of "higher" and "lower" to learn from the user's messages (a
    policy that follows them from a middle first guess always wins within 4 hints at top 8).

    Args:
        num_train: training records.
        num_val: validation records.
        top: the largest secret.
        follow: the share of the demonstrations' steps that go the hint's way.
        max_hints: the most hints in a demonstration (set `max_user_turns` to match).
        seed: everything is a function of it.
        cache_dir: where the word-level tokenizer is saved.

    Example (follow 1): secret 6, first guess 4 -> chosen [assistant "4", user "higher", assistant "5", user
    "higher", assistant "6"]; first guess 6 -> chosen "6".
    """

    name = "embedded guessing game"

    def __init__(self, num_train: int = 3000, num_val: int = 200, top: int = 8, follow: float = 0.5,
                 max_hints: int = 4, seed: int = 0, cache_dir: str = "artifacts/tokenizers"):
        for name, value, least in (("num_train", num_train, 1), ("num_val", num_val, 1), ("top", top, 1),
                                   ("max_hints", max_hints, 0)):
            if value < least:
                raise ValueError(f"GuessTask: {name}={value}; expected at least {least}")
        if not 0 <= follow <= 1:
            raise ValueError(f"GuessTask: follow={follow}; expected a share in [0, 1]")
        self.num_train, self.num_val, self.top, self.follow = num_train, num_val, top, follow
        self.max_hints, self.seed, self.cache_dir = max_hints, seed, cache_dir

    def records(self, split: str) -> list[dict]:
        n, offset = (self.num_train, 0) if split == "train" else (self.num_val, 1_000_003)
        rng = random.Random(self.seed * 7919 + offset)
        return [self.record(rng, rng.randint(0, self.top)) for _ in range(n)]

    def record(self, rng: random.Random, secret: int) -> dict:
        """The record of `secret`, its demonstration drawn from `rng`."""
        guess, user, conversation = rng.randint(0, self.top), Hints(), []
        user.reset(secret)
        for _ in range(self.max_hints + 1):
            conversation.append({"role": "assistant", "content": str(guess)})
            hint = user.respond(conversation)
            if hint is None or len(conversation) > 2 * self.max_hints:
                break
            conversation.append({"role": "user", "content": hint})
            step = 1 if hint == "higher" else -1
            away = guess - step
            guess = away if rng.random() >= self.follow and 0 <= away <= self.top else guess + step
        chosen = conversation[0]["content"] if len(conversation) == 1 else conversation
        return {"prompt": [{"role": "user", "content": f"guess a number from 0 to {self.top}"}], "chosen": chosen,
                "answer": secret}

    def load(self, split: str) -> tuple[str, list[dict]]:
        return f"{self.name}[{split}]", self.records(split)

    def tokenizer(self) -> str:
        """A word-level tokenizer of the game's words and numbers with a chat template (trained once, cached)."""
        corpus = ["guess a number from to : higher lower", " ".join(str(i) for i in range(self.top + 1))]
        return chat_word_tokenizer(corpus, self.cache_dir, "guess", CALCULATOR_TEMPLATE)
