"""The one tokenization and collation path: prompt/response boundaries, truncation, padding and masks.

Prompts go through the tokenizer's chat template when it has one (a single user turn plus the generation
prompt); otherwise they are encoded as plain text. A prompt may also be a conversation, TRL's conversational
format: a list of `{role, content}` messages (a system turn, earlier turns), which goes through the chat template
as it is. A response is encoded without special tokens and followed by the token the chat template ends an
assistant turn with (`turn_end_id`: EOS for most models, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`), so prompt +
response concatenate at the token level with no boundary effects. A generated response ends at the first of the
model's stop tokens (`stop_ids`: that one, EOS and its generation config's).
"""
from __future__ import annotations

import re

import torch

from datamodules.batch import PairBatch, Sequences


class NoChatTemplate(ValueError):
    """A conversation given to a tokenizer without a chat template."""


def encode_prompt(tokenizer, prompt: str | list[dict], tools: list[dict] | None = None,
                  template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids ending with the generation prompt: a text as one user turn through the chat template (plain text
    without one), a conversation (a list of `{role, content}` messages) through the chat template as it is
    (`NoChatTemplate` without one). `tools`: JSON schemas the template renders (`datamodules.tools.Tools.schemas`);
    `template_kwargs`: further variables of the template (data `chat_template_kwargs`, e.g. Qwen3's
    `enable_thinking`)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list):
        if not template:
            raise NoChatTemplate("a conversation (a list of messages) needs a tokenizer with a chat template, and "
                                 f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} has none")
        messages = prompt
    elif template:
        messages = [{"role": "user", "content": prompt}]
    else:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, tools=tools or None,
                                        **(template_kwargs or {}))
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as text, for display and text templates (an LLM judge's question): itself, or a conversation's
    messages one per line as `role: content`.

    Example: [{role: system, content: "Be brief."}, {role: user, content: "Hi"}] -> "system: Be brief.\nuser: Hi"."""
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt


def encode_response(tokenizer, text: str, eos: bool = True) -> list[int]:
    """Response ids followed by the end of a turn (`turn_end_id`; `eos=False` for a response that was cut before
    emitting one). With a harmony template (gpt-oss) a text is the answer, written as its final message.

    Example (gpt-oss): "It is 5." -> ids of "<|channel|>final<|message|>It is 5.<|return|>"."""
    text = HARMONY_ANSWER + text if harmony(tokenizer) else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = turn_end_id(tokenizer)
    return ids + ([end] if eos and end is not None else [])


PROBE = "p3o turn end probe"
HARMONY_ANSWER = "<|channel|>final<|message|>"


def harmony(tokenizer) -> bool:
    """Whether the chat template writes OpenAI's harmony format (gpt-oss), where a turn is messages in channels
    (analysis, commentary, final) and the answer is the final message: a response's text is that message's
    (`answer_of`), and a response given as text is written as one (`encode_response`)."""
    return HARMONY_ANSWER in (getattr(tokenizer, "chat_template", None) or "")


def answer_of(text: str) -> str:
    """The answer in a harmony response decoded with its special tokens: the text of its last final message (vLLM's
    `content`), "" where it has none (cut off while reasoning, or ended by a call).

    Example: "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>It is 5.<|return|>"
    -> "It is 5."; "<|channel|>analysis<|message|>Add" -> ""."""
    if HARMONY_ANSWER not in text:
        return ""
    return re.split(r"<\|(?:end|return|call|endoftext)\|>", text.rsplit(HARMONY_ANSWER, 1)[1], maxsplit=1)[0].strip()


GEMMA4_THOUGHT = ("<|channel>thought", "<channel|>")


def reasoning_marks(tokenizer) -> tuple[str, str]:
    """The opening and closing of a turn's reasoning in the tokenizer's chat template: Gemma 4's thought block
    (`<|channel>thought` ... `<channel|>`), else `<think>` ... `</think>` (Qwen3, DeepSeek-R1, SmolLM3, GLM, LFM2.5).
    gpt-oss reasons in messages instead (`harmony`)."""
    return GEMMA4_THOUGHT if GEMMA4_THOUGHT[0] in (getattr(tokenizer, "chat_template", None) or "") else \
        ("<think>", "</think>")


def reasoning_field(tokenizer) -> str:
    """The message field that holds an assistant turn's reasoning, as the chat template reads it: `thinking` where
    it reads `message.thinking` (gpt-oss, LFM2.5), else `reasoning_content` (Qwen3, GLM, Gemma 4, Nemotron 3); the
    names TRL's parsed messages use for those families."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "thinking" if re.search(r"message\.thinking|message\[['\"]thinking['\"]\]", template) else "reasoning_content"


def turn_end_id(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant turn's text (whitespace between allowed): how a
    response ends in training data and in a trace. ChatML's `<|im_end|>` and Llama 3's `<|eot_id|>` (their EOS),
    Gemma's `<end_of_turn>` and Phi-3's `<|end|>` (not their EOS). EOS where the tokenizer has no chat template or
    the template writes no special token there. Worked out once per template (kept on the tokenizer).

    Example: Gemma 3's template writes "<start_of_turn>model\nHi<end_of_turn>\n" -> the id of "<end_of_turn>";
    SmolLM2's "<|im_start|>assistant\nHi<|im_end|>\n" -> the id of "<|im_end|>" (its EOS)."""
    template = getattr(tokenizer, "chat_template", None)
    key = (template, tokenizer.eos_token_id, len(tokenizer))
    known = tokenizer.__dict__.get("_p3o_turn_end")
    if known is not None and known[0] == key:
        return known[1]
    end = tokenizer.eos_token_id
    if template:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": PROBE}], tokenize=False)
        except Exception:                          # (a template that takes no such conversation: EOS)
            text = ""
        at = text.rfind(PROBE)
        rest = text[at + len(PROBE):].lstrip() if at >= 0 else ""
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                        if t.special}
        written = next((s for s in sorted(specials, key=len, reverse=True) if s and rest.startswith(s)), None)
        if written is not None:
            end = tokenizer.convert_tokens_to_ids(written)
    tokenizer.__dict__["_p3o_turn_end"] = (key, end)
    return end


def stop_ids(tokenizer) -> list[int]:
    """The tokens a generated response ends at (TRL 1.16, vLLM and HF `generate` stop at each of a model's EOS ids):
    `turn_end_id`, EOS, and the EOS ids of the model's generation config where its tokenizer was loaded with one
    (`modules.backbone.load_tokenizer` keeps them as `generation_eos_ids`). Without them a Gemma or Phi-3 turn would
    run past its end-of-turn token.

    Example: Gemma 3 (EOS "<eos>" 1, generation config [1, 106]) -> [106, 1]; SmolLM2 -> [2]."""
    ids = [turn_end_id(tokenizer), tokenizer.eos_token_id, *getattr(tokenizer, "generation_eos_ids", ())]
    return list(dict.fromkeys(i for i in ids if i is not None))


def pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to (B, max_len) on `side`; returns (ids, mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              own: list[list[int] | None] | None = None) -> Sequences:
    """Right-padded prompt + response sequences with the loss mask on the response tokens; `own[i]` (a tool-use
    trace's, `datamodules.tools.encode_trace`) limits row i's to the policy's tokens."""
    ids, mask = pad([p + r for p, r in zip(prompts, responses)], pad_id, "right")
    loss_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        trained = own[i] if own is not None and own[i] is not None else [1] * len(r)
        loss_mask[i, len(p): len(p) + len(r)] = torch.tensor(trained, dtype=loss_mask.dtype)
    return Sequences(ids, mask, loss_mask)


def stack_pair(chosen: Sequences, rejected: Sequences, pad_id: int) -> Sequences:
    """Chosen rows then rejected rows, right-padded to one width: (2B, T), so a pair is scored in one forward."""
    width = max(chosen.input_ids.shape[1], rejected.input_ids.shape[1])
    grow = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return Sequences(*(torch.cat([grow(getattr(chosen, f), v), grow(getattr(rejected, f), v)])
                       for f, v in (("input_ids", pad_id), ("attention_mask", 0), ("loss_mask", 0))))


class PairCollator:
    """Collates encoded examples ({prompt_ids, chosen_ids?, rejected_ids?, prompt, ...}) into a PairBatch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> PairBatch:
        prompts = [e["prompt_ids"] for e in examples]
        prompt_ids, prompt_mask = pad(prompts, self.pad_token_id, "left")
        batch = PairBatch(prompt_ids, prompt_mask, prompts=[e["prompt"] for e in examples],
                          fields={name: [e["fields"][name] for e in examples] for name in examples[0].get("fields", {})})
        if "chosen_ids" in examples[0]:
            batch.chosen = sequences(prompts, [e["chosen_ids"] for e in examples], self.pad_token_id,
                                     [e.get("chosen_own") for e in examples])
            batch.chosen_text = [e["chosen"] for e in examples]
        if "rejected_ids" in examples[0]:
            batch.rejected = sequences(prompts, [e["rejected_ids"] for e in examples], self.pad_token_id)
            batch.rejected_text = [e["rejected"] for e in examples]
        return batch
