"""The embedded verifiable task: small sums, each record with its reference `answer`, for rewards that check a
response instead of scoring it (`modules.verifiable.AnswerMatch`). Built locally like the review task: no hub.
"""
from __future__ import annotations

import random

from datamodules.sources import Source
from datamodules.task import cached_word_tokenizer


class SumTask(Source):
    """Records `{prompt: "add 3 and 4 :", chosen, rejected, answer: 7}`.

    The demonstration (`chosen`) is the right sum with probability `accuracy`, otherwise off by 1 or 2, so SFT on
    it gives a policy that is right about that often, and RL on the verifiable reward has the rest to gain.
    `rejected` is always wrong and differs from `chosen`. Train and val are independent draws of the same sums.

    Args:
        num_train: training records.
        num_val: validation records.
        max_operand: operands are drawn from 0..max_operand (at 9, the quickstart's 2-layer SFT policy learns too
            little of the sums for RL to sharpen: 0.33-0.41 held-out accuracy, at best 0.47 after P3O).
        accuracy: the share of demonstrations that are right.
        seed: everything is a function of it.
        cache_dir: where the word-level tokenizer is saved.
    """

    name = "embedded sum task"

    def __init__(self, num_train: int = 2000, num_val: int = 200, max_operand: int = 5, accuracy: float = 0.5,
                 seed: int = 0, cache_dir: str = "artifacts/tokenizers"):
        for name, value, least in (("num_train", num_train, 1), ("num_val", num_val, 1), ("max_operand", max_operand, 1)):
            if value < least:
                raise ValueError(f"SumTask: {name}={value}; expected at least {least}")
        if not 0 <= accuracy <= 1:
            raise ValueError(f"SumTask: accuracy={accuracy}; expected a share in [0, 1]")
        self.num_train, self.num_val, self.max_operand, self.accuracy = num_train, num_val, max_operand, accuracy
        self.seed, self.cache_dir = seed, cache_dir

    def wrong(self, rng: random.Random, total: int, besides: int | None = None) -> int:
        """A wrong sum off by 1 or 2 (never negative, never `besides`)."""
        options = [total + d for d in (-2, -1, 1, 2) if total + d >= 0 and total + d != besides]
        return rng.choice(options)

    def records(self, split: str) -> list[dict]:
        n, offset = (self.num_train, 0) if split == "train" else (self.num_val, 1_000_003)
        rng = random.Random(self.seed * 7919 + offset)
        out = []
        for _ in range(n):
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            chosen = a + b if rng.random() < self.accuracy else self.wrong(rng, a + b)
            rejected = self.wrong(rng, a + b, besides=chosen)
            out.append({"prompt": f"add {a} and {b} :", "chosen": str(chosen), "rejected": str(rejected),
                        "answer": a + b})
        return out

    def load(self, split: str) -> tuple[str, list[dict]]:
        return f"{self.name}[{split}]", self.records(split)

    def tokenizer(self) -> str:
        """A word-level tokenizer over the task's words and numbers (trained once, cached on disk)."""
        corpus = ["add and :", " ".join(str(i) for i in range(2 * self.max_operand + 3))]
        return cached_word_tokenizer(corpus, self.cache_dir, "sums")
