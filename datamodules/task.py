"""The embedded preference task: short reviews, a gold sentiment reward, Bradley-Terry labels.

Runs with no network. Prompts ask for a review of a place; responses are sentences from a small grammar over
sentiment-bearing words ("the food was really great but the staff was rude ."). The gold reward is
vaderSentiment's compound score of the response (an independent lexicon scorer that no model of ours defines)
minus a repetition penalty, so it lies in about [-1, 1]. Preference labels are sampled from Bradley-Terry on the
gold reward with a temperature, so they are noisy the way human labels are: the reward model must learn the
preference from the labels, it never sees the scorer. Everything is deterministic given the seed.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import re

from datamodules.sources import Source

PLACES = ["cafe", "hotel", "museum", "bakery", "restaurant", "cinema", "gym", "park", "library", "bar",
          "shop", "theater", "beach", "zoo", "market", "spa"]
SUBJECTS = ["food", "service", "room", "staff", "price", "music", "view", "coffee", "bed", "menu", "owner",
            "location", "decor", "wifi", "parking", "show"]
POSITIVE = ["good", "great", "excellent", "lovely", "friendly", "nice", "amazing", "wonderful", "clean",
            "fresh", "perfect", "pleasant", "helpful", "beautiful", "fantastic"]
NEGATIVE = ["bad", "terrible", "awful", "dirty", "rude", "slow", "boring", "poor", "horrible", "cold",
            "noisy", "ugly", "disappointing", "nasty", "stale"]
NEUTRAL = ["ok", "average", "small", "quiet", "busy", "plain", "simple", "new", "old", "standard"]
INTENSIFIERS = ["", "", "", "very", "really", "quite", "not", "so"]
JOINERS = ["and", "but", ","]
VERBS = ["was", "is", "seemed"]


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_reward(prompt: str, response: str, repetition_weight: float = 0.5, max_words: int | None = None,
                length_weight: float = 0.02) -> float:
    """Gold reward of a response: VADER compound sentiment, minus `repetition_weight` x repeated-word fraction,
    minus (when `max_words` is set) a brevity term `length_weight` x words beyond `max_words`, capped at 1.

    The prompt does not change the score (it is part of the signature so any task's gold reward fits).
    Empty responses score 0: neutral.
    """
    words = response.split()
    if not words:
        return 0.0
    repeated = 1.0 - len({w.lower().strip(".,!?") or w for w in words}) / len(words)  # "Great." repeats "great"
    score = _analyzer().polarity_scores(response)["compound"] - repetition_weight * repeated
    if max_words is not None:
        score -= min(1.0, length_weight * max(0, len(words) - max_words))
    return score


class GoldReward:
    """The gold reward as a batch callable: `reward(prompts, responses) -> list[float]` (select by class_path).

    Args:
        repetition_weight: subtracted per unit of repeated-word fraction (`gold_reward`).
        max_words: responses longer than this lose `length_weight` per extra word, capped at 1 (None: no limit).
        length_weight: the brevity term's weight per word beyond `max_words`.
    """

    def __init__(self, repetition_weight: float = 0.5, max_words: int | None = None, length_weight: float = 0.02):
        self.repetition_weight, self.max_words, self.length_weight = repetition_weight, max_words, length_weight

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [gold_reward(p, r, self.repetition_weight, self.max_words, self.length_weight)
                for p, r in zip(prompts, responses)]


def place_of(prompt: str) -> str:
    """The place a review prompt asks about ("write a review of the spa :" -> "spa"): each record's `place` field,
    for a verifiable check that the review names it (`modules.verifiable.Contains`)."""
    return next(place for place in PLACES if re.search(rf"\b{place}\b", prompt))


class ReviewTask(Source):
    """Source of `{prompt, chosen, rejected}` records for the embedded task, plus its word-level tokenizer.

    Args:
        num_train: training records.
        num_val: validation records (their prompts are disjoint draws from another seed).
        seed: everything is a function of it.
        positive_rate: probability that an adjective is drawn from the positive list.
        negative_rate: probability that an adjective is drawn from the negative list (the rest are neutral). The
            defaults lean negative so that SFT on `chosen` sits near zero gold reward, well inside [-1, 1]: room
            for RL to improve.
        max_clauses: responses have 1..max_clauses clauses.
        label_temperature: Bradley-Terry temperature on the gold reward difference
            (P(a preferred) = sigmoid((g_a - g_b) / T)); larger = noisier labels.
        cache_dir: where the trained tokenizer is saved (keyed by a hash of its training text).
    """

    def __init__(self, num_train: int = 2000, num_val: int = 200, seed: int = 0, positive_rate: float = 0.3,
                 negative_rate: float = 0.45, max_clauses: int = 3, label_temperature: float = 0.2,
                 cache_dir: str = "artifacts/tokenizers"):
        if not (0 <= positive_rate and 0 <= negative_rate and positive_rate + negative_rate <= 1):
            raise ValueError("ReviewTask: positive_rate + negative_rate must lie in [0, 1]")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("max_clauses", max_clauses)):
            if value < 1:
                raise ValueError(f"ReviewTask: {name}={value}; expected at least 1")
        if not label_temperature > 0:
            raise ValueError(f"ReviewTask: label_temperature={label_temperature}; expected > 0 (it divides the gold "
                             "reward difference)")
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.positive_rate, self.negative_rate = positive_rate, negative_rate
        self.max_clauses, self.label_temperature, self.cache_dir = max_clauses, label_temperature, cache_dir

    name = "embedded review task"

    def prompt(self, rng: random.Random) -> str:
        return f"write a review of the {rng.choice(PLACES)} :"

    def response(self, rng: random.Random) -> str:
        clauses = []
        for i in range(rng.randint(1, self.max_clauses)):
            u = rng.random()
            pool = POSITIVE if u < self.positive_rate else NEGATIVE if u < self.positive_rate + self.negative_rate else NEUTRAL
            words = ["the", rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(INTENSIFIERS), rng.choice(pool)]
            if i:
                clauses.append(rng.choice(JOINERS))
            clauses.append(" ".join(w for w in words if w))
        return " ".join(clauses) + " ."

    def _draws(self, split: str, limit: int | None = None):
        """(prompt, a, b, u) per record of 'train' or 'val', in order: two distinct responses and the uniform draw
        that decides the label (`records`). With `limit`, only the first `limit` (each is drawn after the ones
        before it, so the rest need not be drawn)."""
        n, offset = (self.num_train, 0) if split == "train" else (self.num_val, 1_000_003)
        rng = random.Random(self.seed * 7919 + offset)
        for _ in range(n if limit is None else min(n, limit)):
            prompt, a, b = self.prompt(rng), self.response(rng), self.response(rng)
            while b == a:
                b = self.response(rng)
            yield prompt, a, b, rng.random()

    def records(self, split: str, limit: int | None = None) -> list[dict]:
        """Deterministic records for 'train' or 'val' (the first `limit` with `limit`): a wins with Bradley-Terry
        probability sigmoid((gold(a) - gold(b)) / label_temperature)."""
        out = []
        for prompt, a, b, u in self._draws(split, limit):
            margin = (gold_reward(prompt, a) - gold_reward(prompt, b)) / self.label_temperature
            a_wins = u < 1.0 / (1.0 + math.exp(-margin))
            out.append({"prompt": prompt, "chosen": a if a_wins else b, "rejected": b if a_wins else a,
                        "place": place_of(prompt)})
        return out

    def load(self, split: str) -> tuple[str, list[dict]]:
        return f"{self.name}[{split}]", self.records(split)

    def load_prompts(self, split: str) -> tuple[str, list[dict]]:
        """The prompts of `load(split)`, in order, without labelling their responses (no gold reward computed)."""
        return f"{self.name}[{split}]", [{"prompt": prompt, "place": place_of(prompt)} for prompt, *_ in self._draws(split)]

    def corpus(self) -> list[str]:
        words = PLACES + SUBJECTS + POSITIVE + NEGATIVE + NEUTRAL + [w for w in INTENSIFIERS if w] + JOINERS + VERBS
        fixed = "write a review of the : ."
        return [fixed, " ".join(words)] + [r["prompt"] + " " + r["chosen"] for r in self.records("train", limit=200)]

    def tokenizer(self) -> str:
        """Train (once, cached on disk) a word-level tokenizer on the task text; returns its directory."""
        return cached_word_tokenizer(self.corpus(), self.cache_dir, "reviews")


def cached_word_tokenizer(corpus: list[str], cache_dir: str, name: str) -> str:
    """The directory of a word-level tokenizer trained on `corpus` (`train_word_tokenizer`), trained once and kept
    under `cache_dir` as `<name>-<hash of the corpus>`."""
    key = hashlib.sha1("\n".join(corpus).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{name}-{key}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        train_word_tokenizer(corpus, path)
    return path


def train_word_tokenizer(corpus: list[str], path: str) -> None:
    """A whitespace word-level tokenizer (HF `tokenizers`) saved as a standard PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")
    tmp = f"{path}.tmp{os.getpid()}"
    fast.save_pretrained(tmp)
    os.replace(tmp, path) if not os.path.exists(path) else None


CHAT_PROMPTS = ["Write a one-sentence review of the {place}.", "In one sentence, what did you think of the {place}?",
                "Give a short review of a {place} you visited.", "Review the {place} briefly."]


class ChatReviewTask(ReviewTask):
    """The review task phrased for a chat model: English instructions and sentence-cased reviews.

    Used with SmolLM2-135M-Instruct (configs/smollm2/): its own tokenizer and chat template, so `tokenizer()`
    is not offered: set the datamodule's `tokenizer`. Pair it with `GoldReward(max_words=...)` so that the
    instruct model's long, upbeat answers do not saturate the gold reward.
    """

    name = "embedded chat review task"

    def prompt(self, rng: random.Random) -> str:
        return rng.choice(CHAT_PROMPTS).format(place=rng.choice(PLACES))

    def response(self, rng: random.Random) -> str:
        text = super().response(rng)[: -len(" .")].replace(" ,", ",")
        return text[0].upper() + text[1:] + "."

    def tokenizer(self) -> None:   # chat prompts need the model's own tokenizer (data tokenizer: ...)
        return None
