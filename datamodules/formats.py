"""Adapters from public data layouts to `{prompt, chosen, rejected}` (preference data) or to `{prompt, chosen,
<reward fields>}` (a verifiable task: `GSM8K`'s answer, `MBPP`'s tests).

Each adapter wraps another source (a `HubDataset`, `LocalFiles`, ...) and converts its rows. A row that cannot
be converted becomes `{"_invalid": (field, reason)}`, which validation turns into a DataError naming the record
and field, or a counted skip with `skip_invalid: true`.

    source:
      class_path: datamodules.formats.AnthropicHH
      init_args:
        source: {class_path: datamodules.sources.HubDataset, init_args: {name: Anthropic/hh-rlhf}}
"""
from __future__ import annotations

import re

from datamodules.sources import Source, _conversation_problem

ASSISTANT = "\n\nAssistant:"


class _Adapter(Source):
    """Converts the rows of another source to `{prompt, chosen, rejected}`.

    Args:
        source: the source whose rows are converted (`datamodules.sources.HubDataset`, `LocalFiles`, ...).
    """

    def __init__(self, source: Source):
        self.source = source

    @property
    def name(self) -> str:
        return getattr(self.source, "name", type(self.source).__name__)

    def load(self, split: str) -> tuple[str, list[dict]]:
        origin, rows = self.source.load(split)
        return origin, [self.convert(row) for row in rows]

    def first_index(self, split: str) -> int:
        return self.source.first_index(split)

    def convert(self, row) -> dict:
        raise NotImplementedError


def _text(row, key):
    value = row.get(key) if isinstance(row, dict) else None
    return value if isinstance(value, str) else None


class AnthropicHH(_Adapter):
    """`Anthropic/hh-rlhf`: full transcripts in `chosen` / `rejected`. The prompt is the shared prefix up to and
    including the last "\\n\\nAssistant:"; the responses are the remainders (stripped)."""

    def convert(self, row) -> dict:
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        if chosen is None:
            return {"_invalid": ("chosen", "missing or not a string")}
        if rejected is None:
            return {"_invalid": ("rejected", "missing or not a string")}
        cut = chosen.rfind(ASSISTANT)
        if cut < 0:
            return {"_invalid": ("chosen", "no '\\n\\nAssistant:' turn")}
        prompt = chosen[: cut + len(ASSISTANT)]
        if not rejected.startswith(prompt):
            # the transcripts diverge before the last assistant turn: cut at the last turn they share
            shared = _common_prefix(chosen, rejected)
            cut = shared.rfind(ASSISTANT)
            if cut < 0:
                return {"_invalid": ("rejected", "shares no '\\n\\nAssistant:' turn with 'chosen'")}
            prompt = shared[: cut + len(ASSISTANT)]
        return {"prompt": prompt, "chosen": chosen[len(prompt):].strip(), "rejected": rejected[len(prompt):].strip()}


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def tldr_prompt(subreddit: str | None, title: str | None, post: str) -> str:
    """The usual TL;DR prompt layout (Stiennon et al. 2020)."""
    return f"SUBREDDIT: r/{subreddit or ''}\nTITLE: {title or ''}\nPOST: {post}\nTL;DR:"


class SummarizeFromFeedback(_Adapter):
    """`openai/summarize_from_feedback`, config `comparisons`: `info` (post or article, title, subreddit), two
    `summaries` [{text}], and `choice` (the index of the preferred summary)."""

    def convert(self, row) -> dict:
        info = row.get("info") if isinstance(row, dict) else None
        if not isinstance(info, dict):
            return {"_invalid": ("info", "missing or not an object")}
        post = _text(info, "post") or _text(info, "article")
        if not post:
            return {"_invalid": ("info.post", "missing or empty (nor an 'article')")}
        summaries = row.get("summaries")
        if not isinstance(summaries, list) or len(summaries) != 2 or not all(_text(s, "text") for s in summaries):
            return {"_invalid": ("summaries", "expected two objects with a 'text' string")}
        choice = row.get("choice")
        if choice not in (0, 1):
            return {"_invalid": ("choice", f"expected 0 or 1, got {choice!r}")}
        return {"prompt": tldr_prompt(info.get("subreddit"), info.get("title"), post),
                "chosen": summaries[choice]["text"].strip(), "rejected": summaries[1 - choice]["text"].strip()}


class CarperTLDR(_Adapter):
    """`CarperAI/openai_summarize_comparisons`: `prompt` (SUBREDDIT/TITLE/POST) and `chosen` / `rejected`
    beginning with "TL;DR:". The "TL;DR:" cue moves into the prompt so responses are the summaries alone."""

    CUE = "TL;DR:"

    def convert(self, row) -> dict:
        out = {}
        for key in ("prompt", "chosen", "rejected"):
            value = _text(row, key)
            if value is None:
                return {"_invalid": (key, "missing or not a string")}
            out[key] = value
        prompt = out["prompt"].rstrip()
        if not prompt.endswith(self.CUE):
            prompt = f"{prompt}\n{self.CUE}"
        strip = lambda s: s.strip()[len(self.CUE):].strip() if s.strip().startswith(self.CUE) else s.strip()  # noqa
        return {"prompt": prompt, "chosen": strip(out["chosen"]), "rejected": strip(out["rejected"])}


CALCULATOR = re.compile(r"<<[^<>]*>>")


class Messages(_Adapter):
    """TRL's conversational language-modelling layout, one list of messages per record (`{messages: [{role,
    content}, ...]}`, as UltraChat's): the prompt is every message before the first assistant turn, `chosen` the
    rest, from that turn on. One assistant message is read as its text; a longer rest is a multi-turn trace, and SFT
    (data `chosen_only: true`) trains on every assistant turn, the user's messages and tool results being context
    (TRL's `assistant_only_loss`). The record's other fields are kept (for `reward_fields`).

    Args:
        source: the source whose rows are converted.
        field: the field holding the messages.

    Example: {messages: [system "Be brief.", user "Hi", assistant "Hello!", user "2 + 2?", assistant "4"], id: 7} ->
    {prompt: [system "Be brief.", user "Hi"], chosen: [assistant "Hello!", user "2 + 2?", assistant "4"], id: 7}.
    """

    def __init__(self, source: Source, field: str = "messages"):
        super().__init__(source)
        self.field = field

    def convert(self, row) -> dict:
        messages = row.get(self.field) if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return {"_invalid": (self.field, "missing, empty, or not a list of {role, content} messages")}
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if first is None:
            return {"_invalid": (self.field, "no assistant message (nothing to train on)")}
        if first == 0:
            return {"_invalid": (self.field, "starts with an assistant message; expected the user's turn (or a "
                                             "system one) first")}
        for offset, part, what in ((0, messages[:first], "the prompt"), (first, messages[first:], "the response")):
            problem = _conversation_problem(part, response=offset > 0)
            if problem:
                return {"_invalid": (self.field, f"{what} (messages {offset} on): {problem}")}
        rest = {key: value for key, value in row.items() if key != self.field}
        return {**rest, "prompt": messages[:first], "chosen": messages[first:]}


class ImplicitPrompt(_Adapter):
    """TRL's implicit-prompt preference layout (its `extract_prompt`), as in `trl-lib/ultrafeedback_binarized`: `chosen`
    and `rejected` are whole conversations, the prompt being the messages they share before they part. Gives
    `{prompt: the shared messages, chosen: the rest of chosen, rejected: the rest of rejected}`; the record's other
    fields are kept. A record whose own `prompt` is of the same kind as its `chosen` (both conversations, or both
    texts) is kept as it is; a text `prompt` beside conversations (HuggingFaceH4/ultrafeedback_binarized's) gives way
    to the extracted one (TRL's `maybe_extract_prompt`).

    Args:
        source: the source whose rows are converted.

    Example: {chosen: [user "What color is the sky?", assistant "It is blue."], rejected: [user "What color is the
    sky?", assistant "It is green."]} -> {prompt: [user "What color is the sky?"], chosen: [assistant "It is blue."],
    rejected: [assistant "It is green."]}.
    """

    def convert(self, row) -> dict:
        if isinstance(row, dict) and row.get("prompt") is not None and \
                isinstance(row["prompt"], list) == isinstance(row.get("chosen"), list):
            return row
        for key in ("chosen", "rejected"):
            value = row.get(key) if isinstance(row, dict) else None
            if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
                return {"_invalid": (key, "expected a conversation, a list of {role, content} messages (TRL's implicit "
                                          "prompt); text transcripts go through datamodules.formats.AnthropicHH")}
        chosen, rejected = row["chosen"], row["rejected"]
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        if shared == 0:
            return {"_invalid": ("chosen", "shares no first message with 'rejected': no prompt to extract")}
        if shared == len(chosen) or shared == len(rejected):
            return {"_invalid": ("rejected" if shared == len(rejected) else "chosen",
                                 "ends where the other one's shared messages end: no response after the prompt")}
        return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


class GSM8K(_Adapter):
    """`openai/gsm8k` (config `main`): `question`, and `answer`, a worked solution ending in "#### <number>". Gives
    `{prompt: question + instruction, chosen: the solution, answer: the number}`: SFT on the solutions (data
    `chosen_only: true`), then RL on the questions (`prompts_only: true`) with `reward_fields: [answer]` and a
    verifiable reward such as `modules.verifiable.AnswerMatch(field: answer)`.

    Args:
        source: the source whose rows are converted.
        instruction: appended to each question (after a blank line); empty for none.
        strip_calculator: drop the dataset's calculator annotations from the solutions ("48/2 = <<48/2=24>>24"
            -> "48/2 = 24").

    Example: {question: "Natalia sold 48 clips ... How many clips did she sell?", answer: "... = <<48+24=72>>72
    clips.\\n#### 72"} -> {prompt: "Natalia sold ... sell?\\n\\n" + instruction, chosen: "... = 72
    clips.\\n#### 72", answer: "72"}.
    """

    INSTRUCTION = "Solve it step by step; end with #### and the final number."

    def __init__(self, source: Source, instruction: str = INSTRUCTION, strip_calculator: bool = True):
        super().__init__(source)
        self.instruction, self.strip_calculator = instruction, strip_calculator

    def convert(self, row) -> dict:
        question, solution = _text(row, "question"), _text(row, "answer")
        if not question or not question.strip():
            return {"_invalid": ("question", "missing, empty or not a string")}
        if solution is None or "####" not in solution:
            return {"_invalid": ("answer", "missing, not a string, or without '#### <final answer>'")}
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not final:
            return {"_invalid": ("answer", "nothing after '####'")}
        if self.strip_calculator:
            solution = CALCULATOR.sub("", solution)
        prompt = question.strip() + (f"\n\n{self.instruction}" if self.instruction else "")
        return {"prompt": prompt, "chosen": solution.strip(), "answer": final}


class MBPP(_Adapter):
    """`google-research-datasets/mbpp` (config `full` or `sanitized`): a task (`text`; `prompt` in `sanitized`), its
    reference `code`, three asserts (`test_list`) and their set-up (`test_setup_code`; `test_imports` in
    `sanitized`). Gives `{prompt: the task, the first `shown_tests` asserts (they name the function and show a call)
    and the instruction, chosen: the code in a ```python block, tests: [set-up + assert, ...]}`: SFT on the code
    (data `chosen_only: true`), then RL on the tasks (`prompts_only: true`) with `reward_fields: [tests]` and
    `modules.verifiable.PythonTests(field: tests)`.

    Args:
        source: the source whose rows are converted.
        shown_tests: how many of the asserts the prompt shows (the MBPP paper's prompt shows all 3; a reward on
            tests the policy has seen invites answers that special-case them).
        instruction: appended to the prompt (after a blank line); empty for none.

    Example (shown_tests 1): {text: "Write a function to find the minimum cost path ...", code: "R = 3\\r\\ndef
    min_cost(cost, m, n): ...", test_list: ["assert min_cost(...) == 8", ...], test_setup_code: ""} -> {prompt:
    "Write a function ... path ...\\nYour code should pass this test:\\nassert min_cost(...) == 8\\n\\n" +
    instruction, chosen: "```python\\nR = 3\\ndef min_cost(cost, m, n): ...\\n```", tests: the 3 asserts}.
    """

    INSTRUCTION = "Write the Python code in a ```python block."

    def __init__(self, source: Source, shown_tests: int = 1, instruction: str = INSTRUCTION):
        if shown_tests < 0:
            raise ValueError(f"MBPP: shown_tests={shown_tests}; expected 0 or more")
        super().__init__(source)
        self.shown_tests, self.instruction = shown_tests, instruction

    def convert(self, row) -> dict:
        task, code = _text(row, "text") or _text(row, "prompt"), _text(row, "code")
        tests = row.get("test_list") if isinstance(row, dict) else None
        if not task or not task.strip():
            return {"_invalid": ("text", "missing, empty or not a string (nor a 'prompt')")}
        if not code or not code.strip():
            return {"_invalid": ("code", "missing, empty or not a string")}
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            return {"_invalid": ("test_list", "expected a non-empty list of asserts (strings)")}
        imports = row.get("test_imports") or []          # (sanitized: a list of import lines)
        setup = "\n".join([_text(row, "test_setup_code") or "", *(i for i in imports if isinstance(i, str))]).strip()
        shown = tests[: self.shown_tests]
        prompt = task.strip()
        if shown:
            prompt += f"\nYour code should pass {'this test' if len(shown) == 1 else 'these tests'}:\n" + "\n".join(shown)
        prompt += f"\n\n{self.instruction}" if self.instruction else ""
        code = code.replace("\r\n", "\n").strip()
        return {"prompt": prompt, "chosen": f"```python\n{code}\n```",
                "tests": [f"{setup}\n{test}" if setup else test for test in tests]}
