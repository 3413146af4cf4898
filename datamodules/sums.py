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
        return [self.record(rng, rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)) for _ in range(n)]

    def record(self, rng: random.Random, a: int, b: int) -> dict:
        """The record of `a + b`, its demonstrations drawn from `rng`."""
        chosen = a + b if rng.random() < self.accuracy else self.wrong(rng, a + b)
        rejected = self.wrong(rng, a + b, besides=chosen)
        return {"prompt": f"add {a} and {b} :", "chosen": str(chosen), "rejected": str(rejected), "answer": a + b}

    def load(self, split: str) -> tuple[str, list[dict]]:
        return f"{self.name}[{split}]", self.records(split)

    def tokenizer(self) -> str:
        """A word-level tokenizer over the task's words and numbers (trained once, cached on disk)."""
        corpus = ["add and :", " ".join(str(i) for i in range(2 * self.max_operand + 3))]
        return cached_word_tokenizer(corpus, self.cache_dir, "sums")


def add(a: int, b: int) -> int:
    """Add two whole numbers: the calculator of `CalculatorSumTask`.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def final_answer(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 where the last number of the response's final assistant turn is the record's answer, else 0.0 (a TRL
    reward function, on conversational prompts: each completion its list of messages, tool results among them). It
    reads the final turn alone, so a response that stops after a tool's result is not paid for the tool's number.

    Example: [[{assistant: "<tool_call>...</tool_call>"}, {tool: "7"}, {assistant: "7"}]], answer [7] -> [1.0]."""
    out = []
    for messages, want in zip(completions, answer):
        text = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        said = last_number(text)
        out.append(float(said is not None and said == int(want)))
    return out


def last_number(text: str) -> int | None:
    """The last whole number written as a word of its own in `text`, or None (the embedded tasks' answers).

    Example: "3 or 4" -> 4; "no idea" -> None."""
    numbers = [word for word in text.split() if word.isdigit()]
    return int(numbers[-1]) if numbers else None


# The calculator task's chat template: word-level, every token space-separated; the call is Hermes JSON.
CALCULATOR_TEMPLATE = (
    "{% if tools %}tools{% for t in tools %} {{ t.function.name }}{% endfor %} :{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{% if m.content %} {{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %} <tool_call> {\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}} </tool_call>{% endfor %} <eos>"
    "{% elif m.role == 'tool' %} result {{ m.content }} :"
    "{% else %} {{ m.content }} :{% endif %}{% endfor %}")


# The register task's: the same, each argument's value a word of its own (`{"n": 23 } }`, still JSON), so a call
# copies the prompt's number token rather than mapping it to a token such as `23}}`.
REGISTER_TEMPLATE = CALCULATOR_TEMPLATE.replace(
    "{{ c.function.arguments | tojson }}}",
    "{% for k, v in c.function.arguments.items() %}{{ '{' if loop.first else ',' }}\"{{ k }}\": {{ v }}{% endfor %} } }")


class CalculatorSumTask(SumTask):
    """Sums too large to learn by heart, with a calculator: conversational records `{prompt: [{user: "add 23 and 48"}],
    chosen, answer: 71}` for data `tools: {functions: [datamodules.sums.add]}` (docs/tools.md).

    A demonstration (`chosen`) is, with probability `tool_share`, a tool-use trace: a call of `add` with the two
    numbers, its result, and the result as the answer; otherwise a direct answer, right with probability `accuracy`
    (else off by 1 or 2). SFT on them gives a policy that calls the calculator about `tool_share` of the time; RL
    on `final_answer` has the rest to gain by calling it more. Its word-level tokenizer carries a chat template that
    renders the tools, the calls and the results (`CALCULATOR_TEMPLATE`).

    Args:
        num_train: training records.
        num_val: validation records.
        max_operand: operands are drawn from 0..max_operand.
        accuracy: the share of direct answers that are right.
        tool_share: the share of demonstrations that call the calculator.
        seed: everything is a function of it.
        cache_dir: where the tokenizer is saved.
    """

    name = "embedded calculator sum task"
    template = CALCULATOR_TEMPLATE

    def __init__(self, num_train: int = 3000, num_val: int = 200, max_operand: int = 30, accuracy: float = 0.5,
                 tool_share: float = 0.5, seed: int = 0, cache_dir: str = "artifacts/tokenizers"):
        super().__init__(num_train, num_val, max_operand, accuracy, seed, cache_dir)
        if not 0 <= tool_share <= 1:
            raise ValueError(f"CalculatorSumTask: tool_share={tool_share}; expected a share in [0, 1]")
        self.tool_share = tool_share

    def record(self, rng: random.Random, a: int, b: int) -> dict:
        if rng.random() < self.tool_share:
            call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
            chosen = [{"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "name": "add", "content": str(a + b)},
                      {"role": "assistant", "content": str(a + b)}]
        else:
            chosen = str(a + b if rng.random() < self.accuracy else self.wrong(rng, a + b))
        return {"prompt": [{"role": "user", "content": f"add {a} and {b}"}], "chosen": chosen, "answer": a + b}

    def tokenizer(self) -> str:
        """The word-level tokenizer of every word, number and call fragment the task writes, with its chat template
        (trained once, cached on disk)."""
        return self.word_tokenizer("calculator", '{"a": "b":')

    def word_tokenizer(self, name: str, words: str) -> str:
        """The tokenizer `name` of the calls' words, the task's own `words` (its arguments' keys), and every number
        up to twice the largest operand, with the task's chat `template`."""
        top = 2 * self.max_operand + 2
        numbers = range(top + 1)
        corpus = [f"tools add : and result <tool_call> </tool_call> {{\"name\": \"add\", \"arguments\": {words}",
                  " ".join(f"{i} {i}, {i}}}}}" for i in numbers)]
        return chat_word_tokenizer(corpus, self.cache_dir, name, self.template)


def chat_word_tokenizer(corpus: list[str], cache_dir: str, name: str, template: str) -> str:
    """The directory of the word-level tokenizer of `corpus` (`datamodules.task.cached_word_tokenizer`) with the chat
    `template` (an embedded task's conversational prompts)."""
    from modules.backbone import load_tokenizer

    path = cached_word_tokenizer(corpus, cache_dir, name)
    tokenizer = load_tokenizer(path)
    if tokenizer.chat_template != template:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path)
    return path


class Register:
    """A register the policy adds numbers to, one per response (a tools environment, TRL's `environment_factory`):
    the environment of `RegisterSumTask`. Its `add` keeps a running total across the response's calls, and the
    reward (`modules.rewards.environment_reward`) is whether the total is the record's answer when the response ends.

    Example: reset(answer=71); add(23) -> 23; add(48) -> 71; get_reward() -> 1.0 (after add(70) alone: 0.0)."""

    def __init__(self):
        self.total, self.target = 0, None

    def reset(self, answer: int) -> None:
        self.total, self.target = 0, int(answer)

    def add(self, n: int) -> int:
        """Add a number to the register and return its total.

        Args:
            n: the number to add.
        """
        self.total += int(n)
        return self.total

    def get_reward(self) -> float:
        return float(self.total == self.target)


class RegisterSumTask(CalculatorSumTask):
    """Sums with a register (a tools environment): conversational records `{prompt: [{user: "add 23 and 48"}],
    chosen, answer: 71}` for data `tools: {environment: datamodules.sums.Register}` and the reward
    `modules.rewards.environment_reward` (docs/tools.md).

    A demonstration is, with probability `tool_share`, a tool-use trace: one turn calling `add` twice (the first
    number, then the second), the register's totals as results (23, then 71), and "done"; otherwise a direct
    answer, right with probability `accuracy`. A direct answer leaves the register at 0 and earns nothing: only a
    response whose calls leave the sum in the register is paid, so RL has the calls to learn, and the state to keep
    (the second call's result is the first's plus its own). Same arguments as `CalculatorSumTask`.
    """

    name = "embedded register sum task"
    template = REGISTER_TEMPLATE

    def record(self, rng: random.Random, a: int, b: int) -> dict:
        if rng.random() < self.tool_share:
            calls = [{"type": "function", "function": {"name": "add", "arguments": {"n": n}}} for n in (a, b)]
            chosen = [{"role": "assistant", "content": "", "tool_calls": calls},
                      {"role": "tool", "name": "add", "content": str(a)},
                      {"role": "tool", "name": "add", "content": str(a + b)},
                      {"role": "assistant", "content": "done"}]
        else:
            chosen = str(a + b if rng.random() < self.accuracy else self.wrong(rng, a + b))
        return {"prompt": [{"role": "user", "content": f"add {a} and {b}"}], "chosen": chosen, "answer": a + b}

    def tokenizer(self) -> str:
        """The word-level tokenizer of the register's calls, results and "done", with `REGISTER_TEMPLATE` (trained
        once, cached on disk)."""
        return self.word_tokenizer("register", '{"n": } done')
