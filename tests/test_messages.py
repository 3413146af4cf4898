"""A rollout's assistant messages (`Rollout.messages`: what a TRL-style reward and a simulated user get) are TRL's:
`datamodules.tools.assistant_message` against transformers' `parse_response` with TRL 1.16's response templates
(the dicts below, copied from `trl/chat_template_utils.py`, Apache-2.0), the parse TRL's GRPOTrainer gives every
turn of a tool rollout, family by family. The rollouts of each family's own template are checked in
tests/test_call_formats.py (their messages are the trace they lay out)."""
from types import SimpleNamespace

import pytest
from transformers.utils.chat_parsing import parse_response

from datamodules import tools
from datamodules.tools import assistant_message, parse_calls, split_reasoning

ADD = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
TEXT = {"name": "text"}     # (TRL's value parser of XML-inline arguments on transformers >= 5.15: typed by the tools)

QWEN3 = {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n", "fields": {
    "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
    "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                   "transform": {"type": "function", "function": "{content}"}},
    "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"}}}
QWEN3_5 = {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n", "fields": {
    "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
    "tool_calls": {"open_pattern": r"<tool_call>\s*<function=(?P<name>[^\n>]+)>", "close_pattern": r"</tool_call>\s*",
                   "repeats": True, "content": "xml-inline",
                   "content_args": {"tag_pattern": r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>",
                                    "value_parser": TEXT},
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
    "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"}}}
GLM4_MOE = {"defaults": {"role": "assistant"}, "start_anchor": "<|assistant|>", "fields": {
    "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
    "tool_calls": {"open_pattern": r"<tool_call>(?P<name>\S+)\n?", "close_pattern": r"</tool_call>\s*",
                   "repeats": True, "content": "xml-inline",
                   "content_args": {"tag_pattern": r"<arg_key>(?P<key>[^<]+)</arg_key>\s*\n<arg_value>(?P<value>.*?)"
                                                   r"</arg_value>", "value_parser": TEXT},
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
    "content": {"close_pattern": r"<\|user\|>\s*|$", "content": "text"}}}
LLAMA3 = {"defaults": {"role": "assistant"}, "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
          "fields": {
    "tool_calls": {"open_pattern": r'\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*',
                   "close_pattern": r"\}<\|eot_id\|>\s*", "repeats": True, "content": "json",
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
    "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"}}}
GPT_OSS = {"defaults": {"role": "assistant"}, "start_anchor": "<|start|>assistant", "fields": {
    "thinking": {"open": "<|channel|>analysis<|message|>", "close_pattern": r"<\|end\|>\s*", "content": "text"},
    "content": {"open": "<|channel|>final<|message|>", "close_pattern": r"<\|return\|>\s*", "content": "text"},
    "tool_calls": {"open_pattern": r"to=functions\.(?P<name>\S+?)<\|channel\|>commentary\s+json<\|message\|>",
                   "close_pattern": r"<\|call\|>\s*", "repeats": True, "content": "json",
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}}}}
_ATOM = r"[^\[\]{}'\"]|'[^']*'|\"[^\"]*\""
_NESTED = _ATOM
for _ in range(3):
    _NESTED = rf"{_ATOM}|[\[{{](?:{_NESTED})*[\]}}]"
LFM2_5 = {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n", "fields": {
    "thinking": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
    "tool_calls": {"open_pattern": r"(?:<\|tool_call_start\|>\[|,\s*)(?P<name>\w+)\(",
                   "close_pattern": r"\)(?:\]<\|tool_call_end\|>)?\s*", "repeats": True, "content": "xml-inline",
                   "content_args": {"tag_pattern": rf"(?P<key>\w+)=(?P<value>'[^']*'|[\[{{](?:{_NESTED})*[\]}}]|[^,)]*)",
                                    "value_parser": {"name": "json", "args": {"string_delims": [["'", "'"]],
                                                                             "allow_non_json": True}}},
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
    "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"}}}
GEMMA4 = {"defaults": {"role": "assistant"}, "start_anchor_pattern": r"(?:<\|turn>model\n|<tool_response\|>)", "fields": {
    "reasoning_content": {"open": "<|channel>thought\n", "close_pattern": r"<channel\|>\s*", "content": "text"},
    "tool_calls": {"open_pattern": r"<\|tool_call>call:(?P<name>\w+)", "close_pattern": r"<tool_call\|>\s*",
                   "repeats": True, "content": "json",
                   "content_args": {"string_delims": [['<|"|>', '<|"|>']], "unquoted_keys": True},
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
    "content": {"close_pattern": r"(?:<turn\|>|<\|tool_response>|<eos>)\s*|$", "content": "text"}}}

# Each family: (its chat template, its parser, its response template, [(the generation prompt's end, a turn as the
# policy writes it, its stop token)]). The stand-in tokenizers need only the chat template's markers.
QWEN3_OWN = open("tests/templates/qwen3.jinja").read()
HERMES = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
XML = "<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n</function>\n</tool_call>"
GLM = ("<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n<arg_key>b</arg_key>\n<arg_value>3</arg_value>\n"
       "</tool_call>")
CHATML = "<|im_start|>assistant\n"
FAMILIES = {
    "qwen3": (QWEN3_OWN, parse_calls, QWEN3, [
        (CHATML, "<think>\nAdd them.\n</think>\n\nLet me add.\n" + HERMES, "<|im_end|>"),
        (CHATML, "<think>\nAdd them.\n</think>\n\n" + HERMES + "\n" + HERMES.replace('"a": 2', '"a": 4'), "<|im_end|>"),
        (CHATML, "<think>\n\n</think>\n\nIt is 5.", "<|im_end|>"),
        (CHATML, "It is 5.", "<|im_end|>"),
        (CHATML, "<think>\nShould I <tool_call>?", "")]),                      # (cut off in its reasoning)
    "qwen3.5 thinking": (open("tests/templates/qwen3_6.jinja").read(), tools.xml_calls, QWEN3_5, [
        (CHATML + "<think>\n", "Add them.\n</think>\n\n" + XML, "<|im_end|>"),
        (CHATML + "<think>\n", "Done.\n</think>\n\nIt is 5.", "<|im_end|>")]),
    "glm-4.5": (open("tests/templates/glm4_moe.jinja").read(), tools.glm_calls, GLM4_MOE, [
        ("<|assistant|>", "<think>Add them.</think>\n" + GLM, ""),     # (TRL's keeps <|observation|> as content)
        ("<|assistant|>", "<think>Done.</think>\nIt is 5.", "<|user|>")]),
    "llama 3.2": (open("tests/templates/llama3_2.jinja").read(), tools.json_calls, LLAMA3, [
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", '{"name": "add", "parameters": {"a": 2, "b": 3}}',
         "<|eot_id|>"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", "It is 5.", "<|eot_id|>")]),
    "gpt-oss": (open("tests/templates/gpt_oss.jinja").read(), tools.harmony_calls, GPT_OSS, [
        ("<|start|>assistant", "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant to=functions.add"
                               '<|channel|>commentary json<|message|>{"a": 2, "b": 3}', "<|call|>"),
        ("<|start|>assistant", "<|channel|>analysis<|message|>Done.<|end|><|start|>assistant<|channel|>final"
                               "<|message|>It is 5.", "<|return|>")]),
    "lfm2.5": (open("tests/templates/lfm2_5.jinja").read(), tools.pythonic_calls, LFM2_5, [
        (CHATML, "<think>Add them.</think>Sure. <|tool_call_start|>[add(a=2, b=3)]<|tool_call_end|>", "<|im_end|>"),
        (CHATML, "<think>Done.</think>It is 5.", "<|im_end|>")]),
    "gemma 4": (open("tests/templates/gemma4.jinja").read(), tools.gemma4_calls, GEMMA4, [
        ("<|turn>model\n", "<|channel>thought\nAdd them.\n<channel|><|tool_call>call:add{a:2,b:3}<tool_call|>",
         "<|tool_response>"),
        ("<|turn>model\n", "<|channel>thought\nDone.\n<channel|>It is 5.", "<turn|>"),
        ("<|turn>model\n", "It is 5.", "<turn|>")]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_turns_message_is_the_one_trl_parses_from_it(family):
    """Every turn's message equals `parse_response(turn + stop token, TRL's response template, prefix=the prompt's
    end, tools=the schemas)`, once an empty content is left out as TRL leaves it out: reasoning under the family's
    field, content without reasoning or calls, calls as TRL's `tool_calls`. A turn that starts inside the reasoning
    its prompt opened is read after that opening, as a rollout reads it (`modules.sampling._opening`)."""
    template, parser, response_template, turns = FAMILIES[family]
    tokenizer = SimpleNamespace(chat_template=template)
    schemas = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    for prefix, turn, stop in turns:
        text = ("<think>" if prefix.endswith("<think>\n") else "") + turn
        calls = parser(text, schemas=schemas) if parser in (tools.xml_calls, tools.glm_calls) else parser(text)
        ours = assistant_message(tokenizer, text, calls, parser)
        theirs = parse_response(turn + stop, response_template, prefix=prefix, tools=schemas)
        assert {key: value for key, value in ours.items() if value != ""} == theirs, (family, turn)
        assert ("tool_calls" in ours) == bool(calls)


def test_assistant_message_works_out_its_docstrings_examples_and_keeps_what_it_cannot_read():
    """The docstring's examples; a call the parser could not read is left out of `tool_calls` (its error result
    follows as a tool message), its markup out of the content; a parser of one's own keeps its markup in the
    content; `split_reasoning`'s examples."""
    qwen3 = SimpleNamespace(chat_template=QWEN3_OWN)
    gpt_oss = SimpleNamespace(chat_template=FAMILIES["gpt-oss"][0])
    text = "<think>\nAdd them.\n</think>\n\nLet me add.\n" + HERMES
    assert assistant_message(qwen3, text, parse_calls(text)) == {
        "role": "assistant", "content": "Let me add.", "reasoning_content": "Add them.", "tool_calls": [ADD]}
    assert assistant_message(qwen3, "<think>\nAdd", []) == {"role": "assistant", "content": "", "reasoning_content": "Add"}
    harmony = "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>5"
    assert assistant_message(gpt_oss, harmony, tools.harmony_calls(harmony), tools.harmony_calls) == {
        "role": "assistant", "content": "5", "thinking": "Add."}
    bad = "Let me add. <tool_call>add(2, 3)</tool_call>"
    assert parse_calls(bad)[0]["error"] and assistant_message(qwen3, bad, parse_calls(bad)) == {
        "role": "assistant", "content": "Let me add."}
    mine = lambda text: [{"name": "add", "arguments": {"a": 2, "b": 3}}] if "ADD" in text else []  # noqa: E731
    assert assistant_message(qwen3, "Sure. ADD", mine("ADD"), mine) == {
        "role": "assistant", "content": "Sure. ADD", "tool_calls": [ADD]}
    assert split_reasoning("<think>\nAdd.\n</think>\n\nIt is 5.", "<think>", "</think>") == ("\nAdd.\n", "\n\nIt is 5.")
    assert split_reasoning("Add.</think>5", "<think>", "</think>") == ("Add.", "5")
    assert split_reasoning("<think>Add", "<think>", "</think>") == ("Add", "")
    assert split_reasoning("It is 5.", "<think>", "</think>") == ("", "It is 5.")
