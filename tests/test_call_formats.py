"""Data tools `parser`: how a turn's text is read for calls. The default reads Hermes `<tool_call>` blocks (tested
in tests/test_tools.py); `datamodules.tools.json_calls` reads Llama 3.1 / 3.2 / 3.3's bare JSON calls, tested here
against Llama 3.2's own chat template (`tests/templates/llama3_2.jinja`, as meta-llama's checkpoints ship it) on a
tokenizer given Llama's special tokens; `datamodules.tools.xml_calls` reads Qwen3.5 / 3.6's XML calls, tested
against Qwen3.6's own template (`tests/templates/qwen3_6.jinja`, as Qwen's checkpoints ship it)."""
import pytest
import torch

from datamodules.collate import encode_prompt, pad
from datamodules.sources import DataError
from datamodules.tools import Tools, encode_trace, glm_calls, json_calls, parse_calls, schema_types, tool_suffix, typed, xml_calls
from modules.sampling import SamplingConfig, generate_with_tools
from tests.helpers import add, family_tokenizer, with_template
from tests.test_tools import hermes, scripted, tool_config, tool_dir  # noqa: F401  (fixtures)

LLAMA32 = open("tests/templates/llama3_2.jinja").read()
CALL = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


@pytest.fixture(scope="module")
def llama(hermes):  # noqa: F811
    """SmolLM2's tokenizer with Llama 3's header and end-of-turn tokens (EOS <|eot_id|>) and Llama 3.2's template."""
    tokenizer = with_template(hermes, LLAMA32)
    tokenizer.add_special_tokens({"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|python_tag|>"]})
    return tokenizer


def test_json_calls_reads_llamas_calls_and_says_what_is_wrong_with_a_bad_one():
    """The docstring's examples; `<|python_tag|>` and "arguments" read too, two calls joined by ";"; a JSON object
    that is no call, arguments that are no object and text after a call each give an error entry; Hermes blocks are
    not Llama's calls, nor Llama's Hermes'."""
    assert json_calls(CALL) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert json_calls("It is 5.") == []
    assert json_calls('{"name": "add", "parameters": {"a": 2')[0]["error"].startswith("the tool call is not JSON")
    assert json_calls('<|python_tag|>{"name": "a", "arguments": {}}; {"name": "b", "parameters": {"x": 1}}') == [
        {"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]
    assert json_calls('{"a": 1}') == [{"error": 'a tool call is a JSON object {"name": ..., "arguments": {...}}'}]
    assert json_calls('{"name": "a", "parameters": [1]}') == [
        {"name": "a", "error": "the arguments of a tool call are a JSON object"}]
    assert json_calls('{"name": "a", "parameters": {}} and 5')[1]["error"].startswith("text after a tool call")
    assert json_calls('<tool_call>{"name": "add", "arguments": {}}</tool_call>') == [] and parse_calls(CALL) == []


def test_llamas_template_writes_a_call_json_calls_reads_back_and_appends_its_results(llama):
    """Llama 3.2's template passes the data's checks (it renders the schemas, and a call turn the same whatever
    follows); a trace's call turn is the JSON it writes, which `json_calls` reads back as the call; the tool result
    comes back as Llama's ipython message (as JSON: its template's `is iterable` holds for a text too)."""
    tools = Tools(functions=[add], parser=json_calls)
    tools.check_template(llama)
    trace = [{"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5."}]
    ids, own = encode_trace(llama, "What is 2 + 3?", trace, tools.schemas)
    policy = llama.decode([t for t, o in zip(ids, own) if o])
    assert policy == CALL + "<|eot_id|>5.<|eot_id|>"
    assert tools.parse(policy.split("<|eot_id|>")[0]) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert llama.decode(tool_suffix(llama, [trace[1]])) == \
        "<|start_header_id|>ipython<|end_header_id|>\n\n\"5\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_a_rollout_runs_llamas_calls_with_its_parser_and_not_with_the_default(llama):
    """A scripted first turn writing Llama's JSON call: with `parser: json_calls` it runs, its result is appended
    and the policy answers; with the default (Hermes) parser the same turn is an answer and the response ends."""
    prompts = ["What is 2 + 3?"]
    for parser, roles in ((json_calls, ["assistant", "tool", "assistant"]), (None, ["assistant"])):
        tools = Tools(functions=[add], parser=parser)
        ids, mask = pad([encode_prompt(llama, p, tools.schemas) for p in prompts], llama.pad_token_id, "left")
        generate, calls = scripted(llama, [CALL, "It is 5."])
        roll = generate_with_tools(generate, tools, llama, ids, mask, prompts, SamplingConfig(max_new_tokens=200), 1)
        assert [m["role"] for m in roll.messages[0]] == roles, parser
        if parser is not None:
            assert roll.messages[0][1]["content"] == "5" and roll.timings["tools/calls"] == 1
            n = len(llama(CALL, add_special_tokens=False)["input_ids"]) + 1
            suffix = tool_suffix(llama, [roll.messages[0][1]])
            assert roll.response_ids[0, n:n + len(suffix)].tolist() == suffix
            assert roll.response_mask[0, n:n + len(suffix)].sum() == 0 and torch.all(roll.response_mask[0, :n] == 1)


def test_a_parser_that_is_not_callable_is_one_line():
    with pytest.raises(ValueError, match=r"^Tools: parser='json' is not callable; expected a function \(text\) -> "
                                         r"calls, e\.g\. datamodules\.tools\.json_calls$"):
        Tools(functions=[add], parser="json")


def test_the_parser_is_given_in_yaml_by_its_import_path(tmp_path, tool_dir):  # noqa: F811
    import yaml

    from train import cli_main

    config = yaml.safe_load(open(tool_config(tmp_path, tool_dir)))
    config["data"]["init_args"]["tools"]["parser"] = "datamodules.tools.json_calls"
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["--config", str(tmp_path / "rl.yaml")], run=False).datamodule.tools.parse is json_calls


QWEN36 = open("tests/templates/qwen3_6.jinja").read()
XML_CALL = ("<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n</function>\n"
            "</tool_call>")


@pytest.fixture(scope="module")
def qwen36(hermes):  # noqa: F811
    """SmolLM2's tokenizer (ChatML, EOS <|im_end|>) with Qwen3.6's own template."""
    return with_template(hermes, QWEN36)


def test_xml_calls_reads_qwen3_5s_calls_outside_the_reasoning():
    """The docstring's example, after a think block; a text value over two lines stays text; a call inside the
    reasoning is not read; a block without `<function=...>` is an error entry."""
    assert xml_calls("<think>\nadd them\n</think>\n\n" + XML_CALL) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    say = "<tool_call>\n<function=say>\n<parameter=text>\nhello\nworld\n</parameter>\n</function>\n</tool_call>"
    assert xml_calls(say) == [{"name": "say", "arguments": {"text": "hello\nworld"}}]
    assert xml_calls("<think>" + XML_CALL + "</think>\n\n5") == []
    assert xml_calls('<tool_call>{"name": "add"}</tool_call>')[0]["error"].startswith("a tool call is <function=NAME>")


def lookup(query: str, limit: int | None = None, exact: bool = False, tags: list[str] | None = None,
           weight: float = 1.0) -> str:
    """Look a text up; answers with the Python types of what it was given.

    Args:
        query: the text.
        limit: how many answers.
        exact: whether to match exactly.
        tags: which tags.
        weight: how much.
    """
    return repr([query, limit, exact, tags, weight])


class Library:
    """An environment whose tool takes a text."""

    def reset(self, **kwargs):
        return None

    def find(self, title: str) -> str:
        """Find a book.

        Args:
            title: its title.
        """
        return repr(title)


def test_typed_and_schema_types_read_a_value_as_its_schemas_type():
    """The docstrings' examples; a whole number given as a float; booleans "1", "0" and any case; a value no allowed
    type takes falls back to JSON, then text; non-finite numbers stay text (they are no JSON); an object or array
    type takes only a JSON value of that kind (vLLM takes any JSON value there: "5" for an array-or-string
    parameter is 5 to vLLM, "5" here); types repeat once, in the order found."""
    assert typed("5", ["string"]) == "5" and typed("5", ["integer"]) == 5 and typed("2.0", ["number"]) == 2
    assert typed("True", ["boolean"]) is True and typed("0", ["boolean"]) is False and typed("no", ["boolean"]) == "no"
    assert typed("null", ["integer", "null"]) is None and typed("five", ["integer"]) == "five"
    assert typed("[1, 2]", []) == [1, 2] and typed("2.5", ["integer"]) == 2.5 and typed("-3", ["number"]) == -3
    assert typed("1e999", ["number"]) == "1e999" and typed("[1e999]", ["array"]) == "[1e999]"
    assert typed("NaN", []) == "NaN" and typed('{"a": 1}', ["object"]) == {"a": 1}
    assert typed("5", ["array", "string"]) == "5" and typed("[5]", ["array", "string"]) == [5]
    assert isinstance(typed("2.0", ["number"]), int) and isinstance(typed("2.5", ["number"]), float)
    assert schema_types({"type": "integer"}) == ["integer"] and schema_types({}) == ["string"]
    assert schema_types({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == ["integer", "null"]
    assert schema_types({"enum": ["a", 1]}) == ["string", "integer"]
    assert schema_types({"type": ["integer", "string"], "enum": [1, True, None, 2.5, [], {}]}) == \
        ["integer", "string", "boolean", "null", "number", "array", "object"]


def test_xml_calls_reads_each_value_as_its_parameters_type_where_tools_give_schemas():
    """A text parameter whose value looks like JSON (a number, "true", "null", a list) reaches the tool as the text the
    policy wrote, where without schemas it would arrive as JSON; an integer, a boolean, a number and a list reach it
    typed; a tool the schemas lack, or a parameter its schema lacks, is read as before (JSON, else text). `Tools`
    gives the parser the schemas of the response's tools, an environment's methods' included, and a parser that
    takes no `schemas` keyword is called as before."""
    def call(function, **values):
        parameters = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
        return f"<tool_call>\n<function={function}>\n{parameters}</function>\n</tool_call>"

    schemas = Tools(functions=[lookup]).schemas
    text = call("lookup", query="2024", limit="3", exact="True", tags='["a", "b"]', weight="1.5")
    assert xml_calls(text, schemas)[0]["arguments"] == {"query": "2024", "limit": 3, "exact": True, "tags": ["a", "b"],
                                                       "weight": 1.5}
    assert xml_calls(text)[0]["arguments"] == {"query": 2024, "limit": 3, "exact": "True", "tags": ["a", "b"],
                                               "weight": 1.5}
    assert xml_calls(call("lookup", query="null", limit="null"), schemas)[0]["arguments"] == {"query": "null",
                                                                                              "limit": None}
    assert xml_calls(call("other", query="2024"), schemas)[0]["arguments"] == {"query": 2024}
    assert xml_calls(call("lookup", extra="7"), schemas)[0]["arguments"] == {"extra": 7}

    tools = Tools(functions=[lookup, add], environment=Library, parser=xml_calls)
    library = Library()
    turn = call("lookup", query="true", exact="1") + call("add", a="2", b="3") + call("find", title="1984")
    messages, failed = tools.call(tools.read(turn, library), library)
    assert [m["content"] for m in messages] == ["['true', None, True, None, 1.0]", "5", "'1984'"] and failed == 0
    seen = []
    Tools(functions=[lookup], parser=lambda text: seen.append(text) or []).read("hi")
    assert seen == ["hi"]


def test_qwen3_6s_template_takes_tools_and_with_preserve_thinking_a_user(qwen36):
    """Qwen3.6's own template writes every turn after the last user message with its think block, so tool results
    append to a generated turn as they are; a user message moves that boundary and is refused in one line, unless
    `chat_template_kwargs: {preserve_thinking: true}` (the template's own switch: every turn keeps its block). Its
    generation prompt opens the think block, so a turn starts inside it. The call a trace's turn is written with is
    read back by `xml_calls`, and the result comes back in Qwen's wrapping, opening the next turn's block."""
    from tests.test_user_turns import Tutor

    tools = Tools(functions=[add], parser=xml_calls)
    tools.check_template(qwen36)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it"):
        Tools(environment=Tutor).check_template(qwen36)
    Tools(environment=Tutor).check_template(qwen36, {"preserve_thinking": True})
    trace = [{"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5."}]
    ids, own = encode_trace(qwen36, "What is 2 + 3?", trace, tools.schemas)
    turns = qwen36.decode([t for t, o in zip(ids, own) if o]).split("<|im_end|>")
    assert turns[0] == "\n</think>\n\n" + XML_CALL and turns[1] == "\n</think>\n\n5."
    assert tools.parse(turns[0]) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert qwen36.decode(tool_suffix(qwen36, [trace[1]])) == \
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_a_rollout_runs_qwen3_5s_xml_calls_and_not_those_still_inside_the_think_block_the_prompt_opened(qwen36):
    """Qwen3.6's generation prompt opens the think block. A scripted first turn thinking, closing the block and
    writing the XML call: with `parser: xml_calls` it runs, its result is appended and the policy answers. A first
    turn that writes the call and ends without closing the block only thought of it: the response ends there. With
    `enable_thinking: false` the prompt closes the block itself, and the same unclosed turn's call runs. Each first
    turn's message holds its reasoning and calls as TRL parses them."""
    tools = Tools(functions=[add], parser=xml_calls)
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    for kwargs, turn, roles, message in (
            ({}, "add them\n</think>\n\n" + XML_CALL, ["assistant", "tool", "assistant"],
             {"content": "", "reasoning_content": "add them", "tool_calls": call}),
            ({}, "maybe " + XML_CALL, ["assistant"], {"content": "", "reasoning_content": "maybe " + XML_CALL}),
            ({"enable_thinking": False}, XML_CALL, ["assistant", "tool", "assistant"], {"content": "", "tool_calls": call})):
        ids, mask = pad([encode_prompt(qwen36, "What is 2 + 3?", tools.schemas, kwargs)], qwen36.pad_token_id, "left")
        assert qwen36.decode(ids[0]).endswith("<think>\n" if not kwargs else "</think>\n\n")
        generate, calls = scripted(qwen36, [turn, "It is 5."])
        roll = generate_with_tools(generate, tools, qwen36, ids, mask, ["What is 2 + 3?"],
                                   SamplingConfig(max_new_tokens=300), 1, template_kwargs=kwargs)
        assert [m["role"] for m in roll.messages[0]] == roles and roll.messages[0][0] == {"role": "assistant", **message}
        assert roll.timings["tools/calls"] == (len(roles) > 1) and len(calls) == len(roles) // 2 + 1


def test_only_a_prompt_that_ends_by_opening_the_think_block_starts_its_turns_inside_it(qwen36, hermes):  # noqa: F811
    """`_opening`'s examples: Qwen3.6's thinking prompt, its non-thinking one (the block closed), and a user
    message that mentions the tag just before a generation prompt that opens none (the Hermes template's)."""
    from modules.sampling import _opening

    def opens(tokenizer, text, **kwargs):
        return _opening(tokenizer, encode_prompt(tokenizer, text, None, kwargs))

    assert opens(qwen36, "What is 2 + 3?") == "<think>" and opens(qwen36, "What is 2 + 3?", enable_thinking=False) == ""
    assert opens(hermes, "What does <think> do?") == ""


GLM_OWN = open("tests/templates/glm4_moe.jinja").read()
GLM_TRAINING = open("configs/chat_templates/glm4_moe_training.jinja").read()
GLM_CALL = ("<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n<arg_key>b</arg_key>\n<arg_value>3"
            "</arg_value>\n</tool_call>")


def glm_tokenizer(hermes, template):  # noqa: F811
    """SmolLM2's tokenizer with GLM-4.5's turn tokens, EOS <|endoftext|>, the EOS ids of GLM-4.5's generation config
    (<|endoftext|>, <|user|>, <|observation|>) and `template`."""
    return family_tokenizer(hermes, template, ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                               "<|observation|>"], eos="<|endoftext|>",
                            stops=["<|endoftext|>", "<|user|>", "<|observation|>"])


@pytest.fixture(scope="module")
def glm(hermes):  # noqa: F811
    return glm_tokenizer(hermes, GLM_TRAINING)


def test_glm_calls_reads_glms_calls_typed_by_the_schemas():
    """The docstring's example, after a think block; a call without arguments; a text parameter keeps the text
    written; a call inside the reasoning is not read; a block without a name is an error entry."""
    from tests.test_call_formats import lookup

    assert glm_calls("<think>add them</think>\n" + GLM_CALL) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert glm_calls("<tool_call>ping</tool_call>") == [{"name": "ping", "arguments": {}}]
    text = "<tool_call>lookup<arg_key>query</arg_key><arg_value>2024</arg_value><arg_key>limit</arg_key><arg_value>3" \
           "</arg_value></tool_call>"
    schemas = Tools(functions=[lookup]).schemas
    assert glm_calls(text, schemas) == [{"name": "lookup", "arguments": {"query": "2024", "limit": 3}}]
    assert glm_calls("<think>" + GLM_CALL + "</think>5") == [] and xml_calls(GLM_CALL)[0].keys() == {"error"}
    assert glm_calls("<tool_call><arg_key>a</arg_key></tool_call>")[0]["error"].startswith("a tool call is the tool")


def test_glms_own_template_is_refused_and_the_training_one_writes_prompts_as_it_does(hermes, glm):  # noqa: F811
    """GLM-4.5's own template writes no stop token after an assistant turn (the next message's <|observation|> or
    <|user|> only when one follows), so tools and a simulated user are refused in one line naming the training
    template. That template takes both, writes every prompt as GLM's own does (system or not, tools or not,
    `enable_thinking` unset or false), and a conversation as GLM's own writes it but for the token that ends its
    last turn and the reasoning it keeps in earlier turns."""
    from tests.test_user_turns import Tutor

    own = glm_tokenizer(hermes, GLM_OWN)
    for tools in (Tools(functions=[add], parser=glm_calls), Tools(environment=Tutor)):
        with pytest.raises(DataError, match=r"writes no stop token \('<\|endoftext\|>', '<\|user\|>', '<\|observation"
                                            r"\|>'\) after an assistant turn, .*glm4_moe_training\.jinja for GLM-4\.5\)$"):
            tools.check_template(own)
        tools.check_template(glm)
    schemas = Tools(functions=[add]).schemas
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        for kwargs in ({}, {"enable_thinking": False}):
            for tools in (None, schemas):
                messages = system + [{"role": "user", "content": "What is 2 + 3?"}]
                assert [tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                                **kwargs) for tok in (glm, own)] == 2 * [own.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    talk = [{"role": "user", "content": "What is 2 + 3?"}, call, {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "It is 5."}]
    assert glm.apply_chat_template(talk, tokenize=False) == own.apply_chat_template(talk, tokenize=False) + "<|user|>"
    thought = [talk[0], {**call, "reasoning_content": "add them"}] + talk[2:] + [{"role": "user", "content": "Sure?"},
                                                                                {"role": "assistant", "content": "Yes."}]
    ours, theirs = (tok.apply_chat_template(thought, tokenize=False) for tok in (glm, own))
    assert theirs.count("<think>add them</think>") == 0 and ours.replace("<think>add them</think>", "<think></think>") \
        == theirs + "<|user|>"


def test_a_glm_trace_and_rollout_end_a_call_with_observation_and_an_answer_with_user(glm):
    """An SFT trace with GLM's training template is token for token the template's rendering of the whole
    conversation: the call turn ends with <|observation|>, the answer with <|user|>, both the policy's; the tool
    result follows without a second <|observation|>. A rollout whose scripted policy writes those turns (each with
    the stop token GLM's generation config ends it at) runs the call with `glm_calls` and lays the response out as
    the trace; its messages are the trace."""
    tools = Tools(functions=[add], parser=glm_calls)
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    trace = [call, {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    ids, own = encode_trace(glm, "What is 2 + 3?", trace, tools.schemas)
    whole = glm.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tools=tools.schemas)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert encode_prompt(glm, "What is 2 + 3?", tools.schemas) + ids == whole
    policy = glm.decode([t for t, o in zip(ids, own) if o])
    assert policy == "\n<think></think>\n" + GLM_CALL + "<|observation|>\n<think></think>\nIt is 5.<|user|>"
    assert glm.decode([t for t, o in zip(ids, own) if not o]) == "\n<tool_response>\n5\n</tool_response><|assistant|>"

    generate, calls = scripted(glm, ["\n<think></think>\n" + GLM_CALL + "<|observation|>",
                                     "\n<think></think>\nIt is 5.<|user|>"], end=False)
    prompt_ids, mask = pad([encode_prompt(glm, "What is 2 + 3?", tools.schemas)], glm.pad_token_id, "left")
    roll = generate_with_tools(generate, tools, glm, prompt_ids, mask, ["What is 2 + 3?"],
                               SamplingConfig(max_new_tokens=300), 1)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant"]
    assert roll.messages[0][1]["content"] == "5" and roll.has_eos.tolist() == [True] and len(calls) == 2
    assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + len(ids)].tolist() == ids
    assert roll.response_mask[0, :len(ids)].tolist() == own and roll.response_mask[0, len(ids):].sum() == 0
    assert roll.messages[0] == trace                      # (each turn's message as TRL parses it)


def test_nemotron_3s_own_template_takes_tools_and_a_user_and_lays_out_traces_as_it_writes_them(hermes):  # noqa: F811
    """NVIDIA Nemotron 3 Nano's own template (`tests/templates/nemotron_3_nano.jinja`) writes Qwen3.5's XML calls,
    keeps the reasoning of every turn after the last user message and ends each turn with <|im_end|>: tools pass the
    data's checks as they are. A simulated user's message would make it drop the reasoning of the turn before
    (`truncate_history_thinking`), where a rollout keeps what the policy generated: refused in one line, and taken
    with the template's own `truncate_history_thinking: false`. An SFT trace (thinking, each turn with its reasoning; or
    `enable_thinking: false`, without) is token for token the template's conversation, and `xml_calls` reads its
    call turn back (in thinking mode the generation prompt opens the think block, so the turn is read after it)."""
    from tests.test_user_turns import Tutor

    nemotron = with_template(hermes, open("tests/templates/nemotron_3_nano.jinja").read())
    tools = Tools(functions=[add], parser=xml_calls)
    tools.check_template(nemotron)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it.*"
                                        r"Nemotron 3's with \{truncate_history_thinking: false\}\)$"):
        Tools(environment=Tutor).check_template(nemotron)
    Tools(environment=Tutor).check_template(nemotron, {"truncate_history_thinking": False})
    call = {"role": "assistant", "content": "", "reasoning_content": "add them", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    trace = [call, {"role": "tool", "name": "add", "content": "5"},
             {"role": "assistant", "content": "It is 5.", "reasoning_content": "done"}]
    for kwargs, turns in (({}, trace), ({"enable_thinking": False},
                                        [{k: v for k, v in m.items() if k != "reasoning_content"} for m in trace])):
        ids, own = encode_trace(nemotron, "What is 2 + 3?", turns, tools.schemas, kwargs)
        whole = nemotron.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + turns,
                                             tools=tools.schemas, **kwargs)
        prompt = encode_prompt(nemotron, "What is 2 + 3?", tools.schemas, kwargs)
        assert prompt + ids == list(whole["input_ids"] if hasattr(whole, "keys") else whole)[:len(prompt) + len(ids)]
        first = nemotron.decode([t for t, o in zip(ids, own) if o]).split("<|im_end|>")[0]
        assert tools.parse(("<think>\n" if not kwargs else "") + first) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]


def add_trace(key: str) -> list[dict]:
    """A trace that calls add(2, 3) reasoning "Add them.", gets "5" and answers "It is 5." reasoning "Done.", each
    turn's reasoning under `key` (gpt-oss's and LFM2.5's `thinking`, Gemma 4's and Qwen3's `reasoning_content`)."""
    return [{"role": "assistant", "content": "", key: "Add them.", "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "It is 5.", key: "Done."}]


GPT_OSS_OWN = open("tests/templates/gpt_oss.jinja").read()
GPT_OSS_TRAINING = open("configs/chat_templates/gpt_oss_training.jinja").read()
NATIVE_CALL = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 2, "b": 3}'    # as gpt-oss writes it
TEMPLATE_CALL = ' to=functions.add<|channel|>commentary json<|message|>{"a": 2, "b": 3}'           # as its template does


def gpt_oss_tokenizer(hermes, template):  # noqa: F811
    """SmolLM2's tokenizer with gpt-oss's harmony tokens, EOS <|return|>, the EOS ids of gpt-oss's generation config
    (<|return|>, <|endoftext|>, <|call|>) and `template`."""
    return family_tokenizer(hermes, template, ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>",
                                               "<|constrain|>", "<|endoftext|>"], eos="<|return|>",
                            stops=["<|return|>", "<|endoftext|>", "<|call|>"])


@pytest.fixture(scope="module")
def gpt_oss(hermes):  # noqa: F811
    return gpt_oss_tokenizer(hermes, GPT_OSS_TRAINING)


def test_harmony_calls_reads_gpt_oss_calls_with_the_recipient_before_or_after_the_channel():
    """The docstring's example; the template's header order; a call after an analysis message; messages to nobody and
    to a built-in tool call nothing; a bare recipient is a function (vLLM's rule); arguments that are not a JSON
    object, or not finite, are an error entry naming the function."""
    from datamodules.tools import harmony_calls

    add_call = [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert harmony_calls(NATIVE_CALL) == add_call and harmony_calls(TEMPLATE_CALL) == add_call
    assert harmony_calls("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant" + NATIVE_CALL) == add_call
    assert harmony_calls("<|channel|>analysis<|message|>to=functions.add {}<|end|><|start|>assistant<|channel|>final"
                         "<|message|>5") == []
    assert harmony_calls("<|channel|>analysis to=python code<|message|>print(5)") == []
    assert harmony_calls("<|channel|>commentary to=add <|constrain|>json<|message|>{}") == [{"name": "add", "arguments": {}}]
    for body in ("add(2, 3)", "[2, 3]", '{"a": 1e999}'):
        assert harmony_calls(TEMPLATE_CALL.replace('{"a": 2, "b": 3}', body)) == [{"name": "add", "error": (
            f"the arguments of a call to add are a JSON object; got {body!r}")}]


def test_gpt_oss_own_template_takes_tools_and_the_training_one_writes_prompts_and_last_turns_as_it_does(hermes, gpt_oss):  # noqa: F811
    """gpt-oss's own template (`tests/templates/gpt_oss.jinja`) appends a tool result after <|call|> as a rollout
    does, so tools pass the data's checks as they are. It writes an earlier answer with <|end|> (the policy wrote
    <|return|>) and drops the analysis of a call once an answer follows: a simulated user is refused in one line,
    and so is an SFT trace whose call reasons, both naming the training template. That template takes both, writes
    every prompt as the original does (system or not, tools or not, any reasoning effort) and a conversation's last
    turn too; it differs from the original only where the original drops an analysis or ends an earlier answer
    with <|end|>."""
    from datamodules.tools import harmony_calls
    from tests.test_user_turns import Tutor

    own = gpt_oss_tokenizer(hermes, GPT_OSS_OWN)
    tools = Tools(functions=[add], parser=harmony_calls)
    tools.check_template(own)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it.*"
                                        r"GLM-4\.5's, gpt-oss's and Gemma 4's;"):
        Tools(environment=Tutor).check_template(own)
    Tools(environment=Tutor).check_template(gpt_oss)
    call = {"role": "assistant", "content": "", "thinking": "Add them.", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    trace = [call, {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    with pytest.raises(DataError, match=r"cannot be laid out as a rollout's \(a template that drops an earlier turn's "
                                        r"reasoning, as gpt-oss's does once an answer follows a call: .*\)$"):
        encode_trace(own, "What is 2 + 3?", trace, tools.schemas)

    for system in ([], [{"role": "system", "content": "Be brief."}]):
        for kwargs in ({}, {"reasoning_effort": "high"}):
            for schemas in (None, tools.schemas):
                messages = system + [{"role": "user", "content": "What is 2 + 3?"}]
                ours, theirs = (tok.apply_chat_template(messages, tools=schemas, add_generation_prompt=True,
                                                        tokenize=False, **kwargs) for tok in (gpt_oss, own))
                assert ours == theirs and ("namespace functions" in ours) == bool(schemas)
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    unreasoned = [{k: v for k, v in call.items() if k != "thinking"}] + trace[1:]
    for talk in (user + [{"role": "assistant", "content": "5", "thinking": "Add."}], user + [call], user + unreasoned):
        assert gpt_oss.apply_chat_template(talk, tokenize=False) == own.apply_chat_template(talk, tokenize=False)
    result = [{"role": "tool", "name": "add", "content": "5"}]
    assert tool_suffix(own, result) == tool_suffix(gpt_oss, result)
    ours, theirs = (tok.apply_chat_template(user + trace, tokenize=False) for tok in (gpt_oss, own))
    analysis = "<|start|>assistant<|channel|>analysis<|message|>Add them.<|end|>"
    assert ours.count(analysis) == 1 and ours.replace(analysis, "") == theirs
    again = user + trace + [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    ours, theirs = (tok.apply_chat_template(again, tokenize=False) for tok in (gpt_oss, own))
    assert ours.replace(analysis, "").replace("It is 5.<|return|>", "It is 5.<|end|>") == theirs


def test_a_gpt_oss_trace_and_rollout_are_laid_out_as_the_training_template_writes_the_conversation(gpt_oss):
    """An SFT trace with gpt-oss's training template (a call that reasons, its result, an answer that reasons, a
    user's question, another answer) is token for token the template's rendering of the conversation: the call
    ends with <|call|>, each answer with <|return|>, all the policy's; the tool result and the user's message are
    the suffixes a rollout appends. A rollout whose scripted policy writes the call as gpt-oss writes it (the
    recipient after the channel) runs it with `harmony_calls`, appends the result and ends at <|return|>; with the
    template's order of the header, its tokens are the trace's; either way its messages are the trace (each turn as
    TRL parses it: analysis as `thinking`, the call as `tool_calls`, the final message as content)."""
    from datamodules.tools import harmony_calls

    tools = Tools(functions=[add], parser=harmony_calls)
    trace = add_trace("thinking")
    ids, own = encode_trace(gpt_oss, "What is 2 + 3?", trace, tools.schemas)
    whole = gpt_oss.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tools=tools.schemas)
    prompt = encode_prompt(gpt_oss, "What is 2 + 3?", tools.schemas)
    assert prompt + ids == list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    first = "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant" + TEMPLATE_CALL + "<|call|>"
    answer = "<|channel|>analysis<|message|>Done.<|end|><|start|>assistant<|channel|>final<|message|>It is 5.<|return|>"
    assert gpt_oss.decode([t for t, o in zip(ids, own) if o]) == first + answer
    result = '<|start|>functions.add to=assistant<|channel|>commentary<|message|>"5"<|end|><|start|>assistant'
    assert gpt_oss.decode([t for t, o in zip(ids, own) if not o]) == result
    talk = trace + [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    longer, mask = encode_trace(gpt_oss, "What is 2 + 3?", talk, tools.schemas)
    whole = gpt_oss.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + talk, tools=tools.schemas)
    assert prompt + longer == list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert gpt_oss.decode([t for t, o in zip(longer, mask) if not o]).endswith(
        "<|start|>user<|message|>Sure?<|end|><|start|>assistant")

    prompt_ids, prompt_mask = pad([prompt], gpt_oss.pad_token_id, "left")
    for written in (first, first.replace(TEMPLATE_CALL, NATIVE_CALL)):
        generate, calls = scripted(gpt_oss, [written, answer], end=False)
        roll = generate_with_tools(generate, tools, gpt_oss, prompt_ids, prompt_mask, ["What is 2 + 3?"],
                                   SamplingConfig(max_new_tokens=300), 1)
        assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant"] and len(calls) == 2
        assert roll.messages[0][1]["content"] == "5" and roll.has_eos.tolist() == [True]
        assert roll.responses == ["It is 5."]                      # (the answer: `response_texts`)
        assert roll.messages[0] == trace                           # (each turn's messages as TRL parses them)
        n = int(roll.attention_mask[0, roll.prompt_length:].sum())
        tokens = roll.input_ids[0, roll.prompt_length:roll.prompt_length + n].tolist()
        assert (tokens == ids) == (written == first)
        assert gpt_oss.decode(tokens) == written + result + answer
        turns = [len(gpt_oss(text, add_special_tokens=False)["input_ids"]) for text in (written, answer)]
        assert roll.response_mask[0, :n].tolist() == [1] * turns[0] + [0] * (n - sum(turns)) + [1] * turns[1]


def test_gpt_oss_responses_are_final_messages_and_a_records_thinking_is_written_not_dropped(tmp_path, hermes, gpt_oss):  # noqa: F811
    """With gpt-oss a response given as text is its answer: written as the final message, as its template writes an
    answer (not bare text after `<|start|>assistant`), and a rollout's text is its last final message's
    (`answer_of`). A record's response given as one assistant message with `thinking` (gpt-oss) or
    `reasoning_content` (Qwen3) is written through the template with it, for SFT and for reward pairs, where it
    used to become its bare text (the reasoning dropped); the stage's text is the answer."""
    import json

    from datamodules.collate import answer_of, encode_response
    from datamodules.pairs import PairDataModule
    from datamodules.sources import LocalFiles
    from modules.sampling import response_texts

    user = [{"role": "user", "content": "What is 2 + 3?"}]
    for tok in (gpt_oss, gpt_oss_tokenizer(hermes, GPT_OSS_OWN)):
        whole = tok.apply_chat_template(user + [{"role": "assistant", "content": "It is 5."}], tokenize=True)
        assert encode_prompt(tok, user) + encode_response(tok, "It is 5.") == list(
            whole["input_ids"] if hasattr(whole, "keys") else whole)
    answer = "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>It is 5.<|return|>"
    assert answer_of(answer) == "It is 5." and answer_of("<|channel|>analysis<|message|>Add") == ""
    assert answer_of(TEMPLATE_CALL) == "" and answer_of("<|channel|>final<|message|> 5 <|end|><|start|>") == "5"
    rows = [gpt_oss(answer, add_special_tokens=False)["input_ids"], gpt_oss(NATIVE_CALL)["input_ids"]]
    assert response_texts(gpt_oss, rows) == ["It is 5.", ""]
    assert response_texts(hermes, [hermes("It is 5.<|im_end|>")["input_ids"]]) == ["It is 5."]

    qwen3 = with_template(hermes, open("tests/templates/qwen3.jinja").read())
    for name, tok, turn in (("gpt_oss", gpt_oss, {"thinking": "Add."}), ("qwen3", qwen3, {"reasoning_content": "Add."})):
        directory = tmp_path / name
        tok.save_pretrained(directory / "tok")
        chosen = [{"role": "assistant", "content": "It is 5.", **turn}]
        rows = [{"prompt": "What is 2 + 3?", "chosen": chosen, "rejected": "It is 6."}] * 2
        (directory / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for chosen_only in (True, False):
            data = PairDataModule(LocalFiles(str(directory / "r.jsonl")), tokenizer=str(directory / "tok"),
                                  chosen_only=chosen_only, max_prompt_length=400, max_length=500)
            data.setup("fit")
            example = data.splits["train"][0]
            whole = tok.apply_chat_template(user + chosen, tokenize=True)        # (Qwen3's: and a newline after)
            ids, whole = example["prompt_ids"] + example["chosen_ids"], list(whole["input_ids"] if hasattr(
                whole, "keys") else whole)
            assert ids == whole[:len(ids)] and len(whole) - len(ids) == (name == "qwen3")
            assert "Add." in tok.decode(example["chosen_ids"]) and example["chosen"] == "It is 5."
            if not chosen_only:
                assert example["rejected_ids"] == encode_response(data.tokenizer, "It is 6.")


GEMMA4_OWN = open("tests/templates/gemma4.jinja").read()
GEMMA4_TRAINING = open("configs/chat_templates/gemma4_training.jinja").read()
GEMMA4_CALL = "<|tool_call>call:add{a:2,b:3}<tool_call|>"


def gemma4_tokenizer(hermes, template):  # noqa: F811
    """SmolLM2's tokenizer with Gemma 4's turn, channel, call and string tokens, EOS <eos>, the EOS ids of Gemma 4's
    generation config (<eos>, <turn|>, <|tool_response>) and `template`."""
    return family_tokenizer(hermes, template, ["<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                               "<tool_response|>", '<|"|>', "<|channel>", "<channel|>", "<|tool>",
                                               "<tool|>", "<|think|>"], eos="<eos>", bos="<bos>",
                            stops=["<eos>", "<turn|>", "<|tool_response>"])


@pytest.fixture(scope="module")
def gemma4(hermes):  # noqa: F811
    return gemma4_tokenizer(hermes, GEMMA4_OWN)


def test_gemma4_calls_reads_gemmas_calls_after_its_reasoning_with_their_types():
    """The docstring's examples; text, lists, objects, null and booleans; two calls; a call in a thought block that
    is closed before the turn's call, or never closed; a call the model ends with <turn|> (vLLM's tolerance);
    arguments that are not Gemma's JSON (a bare word, a non-finite number) are an error entry naming the tool."""
    from datamodules.tools import gemma4_calls

    add_call = [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert gemma4_calls("<|channel>thought\nAdd them.<channel|>" + GEMMA4_CALL) == add_call
    assert gemma4_calls('<|tool_call>call:lookup{query:<|"|>2024, {x}<|"|>,limit:3,tags:[<|"|>a<|"|>,null],'
                        'opt:{deep:true,n:-2.5}}<tool_call|>') == [{"name": "lookup", "arguments": {
                            "query": "2024, {x}", "limit": 3, "tags": ["a", None], "opt": {"deep": True, "n": -2.5}}}]
    assert gemma4_calls("<|tool_call>call:ping{}<tool_call|>" + GEMMA4_CALL) == [{"name": "ping", "arguments": {}}] + add_call
    assert gemma4_calls("<|channel>thought\n" + GEMMA4_CALL + "<channel|>It is 5.") == []
    assert gemma4_calls("<|channel>thought\nmaybe " + GEMMA4_CALL) == []
    assert gemma4_calls("<|tool_call>call:add{a:2,b:3}") == add_call
    assert gemma4_calls(GEMMA4_CALL.replace("a:2", "a:two")) == [{"name": "add", "error": (
        "the arguments of a call to add are an object {key:value,...}, text between <|\"|> marks; got '{a:two,b:3}'")}]
    assert gemma4_calls(GEMMA4_CALL.replace("a:2", "a:1e999"))[0].keys() == {"name", "error"}
    assert gemma4_calls("It is 5.") == [] and parse_calls(GEMMA4_CALL) == []


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}])
def test_gemma4s_own_template_takes_tools_and_lays_out_a_trace_and_a_rollout_as_it_writes_the_conversation(gemma4, kwargs):
    """Gemma 4's own template (`tests/templates/gemma4.jinja`) ends a call with <|tool_response>, one of its
    generation config's EOS ids, and writes the result after it without a new turn: tools pass the data's checks as
    they are. An SFT trace (a call that reasons, its result, an answer that reasons) is token for token the
    template's conversation; in thinking mode the result is followed by an open thought block, so the answer's turn
    starts inside it. A rollout whose scripted policy writes those turns runs the call with `gemma4_calls`, ends the
    call's turn at <|tool_response> and the answer's at <turn|>, lays the response out as the trace, and its text
    leaves the reasoning out; its messages are the trace (each turn as TRL parses it)."""
    from datamodules.tools import gemma4_calls

    tools = Tools(functions=[add], parser=gemma4_calls)
    tools.check_template(gemma4, kwargs)
    thinking = bool(kwargs)
    result = [{"role": "tool", "name": "add", "content": "5"}]
    assert gemma4.decode(tool_suffix(gemma4, result, kwargs)) == \
        'response:add{value:<|"|>5<|"|>}<tool_response|>' + ("<|channel>thought\n" if thinking else "")
    trace = add_trace("reasoning_content")
    ids, own = encode_trace(gemma4, "What is 2 + 3?", trace, tools.schemas, kwargs)
    whole = gemma4.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tools=tools.schemas,
                                       **kwargs)
    prompt = encode_prompt(gemma4, "What is 2 + 3?", tools.schemas, kwargs)
    assert prompt + ids + gemma4("\n", add_special_tokens=False)["input_ids"] == list(
        whole["input_ids"] if hasattr(whole, "keys") else whole)
    first = "<|channel>thought\nAdd them.\n<channel|>" + GEMMA4_CALL + "<|tool_response>"
    answer = ("" if thinking else "<|channel>thought\n") + "Done.\n<channel|>It is 5.<turn|>"
    assert gemma4.decode([t for t, o in zip(ids, own) if o]) == first + answer

    prompt_ids, mask = pad([prompt], gemma4.pad_token_id, "left")
    generate, calls = scripted(gemma4, [first, answer], end=False)
    roll = generate_with_tools(generate, tools, gemma4, prompt_ids, mask, ["What is 2 + 3?"],
                               SamplingConfig(max_new_tokens=300), 1, template_kwargs=kwargs)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant"] and len(calls) == 2
    assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + len(ids)].tolist() == ids
    assert roll.response_mask[0, :len(ids)].tolist() == own and roll.has_eos.tolist() == [True]
    assert roll.responses == ['call:add{a:2,b:3}response:add{value:5}It is 5.'] and roll.messages[0] == trace


def test_a_gemma4_call_ended_with_eos_is_answered_after_the_token_its_template_writes(gemma4):
    """Gemma 4 ends a call with <eos> now and then instead of <|tool_response> (vLLM's `gemma4_utils`): the call
    runs, and the <eos> it generated is replaced by <|tool_response>, as context (outside `response_mask`), so the
    result follows what the template writes. The response is the trace's tokens; the mask is the trace's but at
    that token; the messages are the trace. `call_turn_end` names the token: Gemma 4's <|tool_response>."""
    from datamodules.tools import call_turn_end, gemma4_calls

    tools = Tools(functions=[add], parser=gemma4_calls)
    end = gemma4.convert_tokens_to_ids("<|tool_response>")
    assert call_turn_end(gemma4) == end
    trace = add_trace("reasoning_content")
    ids, own = encode_trace(gemma4, "What is 2 + 3?", trace, tools.schemas)
    prompt_ids, mask = pad([encode_prompt(gemma4, "What is 2 + 3?", tools.schemas)], gemma4.pad_token_id, "left")
    call = "<|channel>thought\nAdd them.\n<channel|>" + GEMMA4_CALL
    answer = "<|channel>thought\nDone.\n<channel|>It is 5.<turn|>"
    for stop in ("<|tool_response>", "<eos>"):
        generate, calls = scripted(gemma4, [call + stop, answer], end=False)
        roll = generate_with_tools(generate, tools, gemma4, prompt_ids, mask, ["What is 2 + 3?"],
                                   SamplingConfig(max_new_tokens=300), 1)
        at = ids.index(end)
        assert len(calls) == 2 and roll.messages[0] == trace
        assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + len(ids)].tolist() == ids
        written = roll.response_mask[0, :len(ids)].tolist()
        assert written == (own if stop == "<|tool_response>" else own[:at] + [0] + own[at + 1:])


def test_gemma4s_own_template_refuses_a_user_and_the_training_one_keeps_every_turns_reasoning(hermes, gemma4):  # noqa: F811
    """Gemma 4's own template writes a turn's reasoning only after the last user message: a simulated user is
    refused in one line. `configs/chat_templates/gemma4_training.jinja` writes every turn's: it takes one, writes
    prompts (system or not, tools or not, thinking or not) and the turns after the last user message as Gemma 4's
    own does, and differs from it only by the reasoning of earlier turns. A call inside an unclosed thought block is
    not run: in a first turn that opens the block, and in thinking mode in a turn after a tool result, whose
    context opens it."""
    from datamodules.tools import gemma4_calls
    from tests.test_user_turns import Tutor

    training = gemma4_tokenizer(hermes, GEMMA4_TRAINING)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it"):
        Tools(environment=Tutor).check_template(gemma4)
    Tools(environment=Tutor).check_template(training)
    assert gemma4.decode(tool_suffix(training, [{"role": "tool", "name": "add", "content": "5"}])).startswith("response:")
    schemas = Tools(functions=[add]).schemas
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        for kwargs in ({}, {"enable_thinking": True}):
            for tools in (None, schemas):
                messages = system + [{"role": "user", "content": "What is 2 + 3?"}]
                ours, theirs = (tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                        tokenize=False, **kwargs) for tok in (training, gemma4))
                assert ours == theirs
    talk = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5", "reasoning_content": "Add."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes.", "reasoning_content": "Yes."}]
    ours, theirs = (tok.apply_chat_template(talk, tokenize=False) for tok in (training, gemma4))
    thought = "<|channel>thought\nAdd.\n<channel|>"
    assert ours.count(thought) == 1 and ours.replace(thought, "") == theirs
    assert training.apply_chat_template(talk[2:], tokenize=False) == gemma4.apply_chat_template(talk[2:], tokenize=False)

    tools = Tools(functions=[add], parser=gemma4_calls)
    maybe = "maybe " + GEMMA4_CALL + "<|tool_response>"
    for kwargs, turns, roles in (({}, ["<|channel>thought\n" + maybe], ["assistant"]),
                                 ({"enable_thinking": True}, [GEMMA4_CALL + "<|tool_response>", maybe],
                                  ["assistant", "tool", "assistant"])):
        prompt_ids, mask = pad([encode_prompt(gemma4, "What is 2 + 3?", tools.schemas, kwargs)], gemma4.pad_token_id,
                               "left")
        generate, calls = scripted(gemma4, turns, end=False)
        roll = generate_with_tools(generate, tools, gemma4, prompt_ids, mask, ["What is 2 + 3?"],
                                   SamplingConfig(max_new_tokens=300), 1, template_kwargs=kwargs)
        assert [m["role"] for m in roll.messages[0]] == roles and len(calls) == len(turns)
        assert roll.timings["tools/calls"] == len(turns) - 1 and roll.has_eos.tolist() == [True]


LFM2_5 = open("tests/templates/lfm2_5.jinja").read()
LFM_CALL = "<|tool_call_start|>[add(a=2, b=3)]<|tool_call_end|>"


@pytest.fixture(scope="module")
def lfm(hermes):  # noqa: F811
    """SmolLM2's tokenizer (ChatML, EOS <|im_end|>) with LFM2.5's call tokens and its own template (TRL's
    `lfm2_2_5_v2.jinja`, as LiquidAI/LFM2.5-230M ships it)."""
    return family_tokenizer(hermes, LFM2_5, ["<|tool_call_start|>", "<|tool_call_end|>"], bos="<|startoftext|>")


def test_pythonic_calls_reads_lfm2s_python_calls_outside_the_reasoning():
    """The docstring's examples; JSON's literals and nested values; a dotted name; a call inside the reasoning is
    not read, an unclosed block is; what is not a list of keyword calls of literals is an error entry."""
    from datamodules.tools import pythonic_calls

    assert pythonic_calls(LFM_CALL) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    block = '<|tool_call_start|>[search(query="p3o", tags=["rl", None], opt={"x": null, "y": true}), ping()]'
    assert pythonic_calls(block + "<|tool_call_end|>") == pythonic_calls(block) == [
        {"name": "search", "arguments": {"query": "p3o", "tags": ["rl", None], "opt": {"x": None, "y": True}}},
        {"name": "ping", "arguments": {}}]
    assert pythonic_calls("<|tool_call_start|>[files.read(path='a', lines=(1, 2))]") == [
        {"name": "files.read", "arguments": {"path": "a", "lines": [1, 2]}}]
    assert pythonic_calls("<think>" + LFM_CALL + "</think>It is 5.") == [] and pythonic_calls("It is 5.") == []
    for body, error in (("[add(2, 3)]", "the call to add is not name(key=literal, ...): arguments are given by keyword"),
                        ("[add(a=x)]", "the call to add is not name(key=literal, ...): 'x' is not a literal"),
                        ("[add(a=1e999)]", "the call to add is not name(key=literal, ...): '1e309' is not a JSON value")):
        assert pythonic_calls(f"<|tool_call_start|>{body}<|tool_call_end|>") == [{"name": "add", "error": error}]
    for body in ("add(a=2)", "[]", "[add(a=2"):
        assert pythonic_calls(f"<|tool_call_start|>{body}<|tool_call_end|>") == [
            {"error": f"a tool call is a list of calls [name(key=value, ...)], got {body!r}"}]


def test_lfm2_5s_own_template_takes_tools_and_a_user_with_its_switch_and_lays_out_a_rollout_as_its_trace(lfm):
    """LFM2.5's own template ends every turn with <|im_end|> and writes a tool result as a `tool` turn: tools pass
    the data's checks as they are. It drops the reasoning of turns before the last user message: a simulated user
    is refused, and taken with its own `preserve_thinking: true`. An SFT trace (a call that reasons, its result, an
    answer that reasons) is token for token the template's conversation; a rollout whose scripted policy writes
    those turns runs the call with `pythonic_calls` and lays the response out as the trace, and its messages are the
    trace (each turn as TRL parses it)."""
    from datamodules.tools import pythonic_calls
    from tests.test_user_turns import Tutor

    tools = Tools(functions=[add], parser=pythonic_calls)
    tools.check_template(lfm)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it.*"
                                        r"Qwen3\.6's and LFM2\.5's own do with chat_template_kwargs "
                                        r"\{preserve_thinking: true\}"):
        Tools(environment=Tutor).check_template(lfm)
    Tools(environment=Tutor).check_template(lfm, {"preserve_thinking": True})
    trace = add_trace("thinking")
    ids, own = encode_trace(lfm, "What is 2 + 3?", trace, tools.schemas)
    whole = lfm.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tools=tools.schemas)
    prompt = encode_prompt(lfm, "What is 2 + 3?", tools.schemas)
    assert prompt + ids + lfm("\n", add_special_tokens=False)["input_ids"] == list(
        whole["input_ids"] if hasattr(whole, "keys") else whole)
    first, answer = "<think>Add them.</think>" + LFM_CALL, "<think>Done.</think>It is 5."
    assert lfm.decode([t for t, o in zip(ids, own) if o]) == f"{first}<|im_end|>{answer}<|im_end|>"
    assert lfm.decode([t for t, o in zip(ids, own) if not o]) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"

    prompt_ids, mask = pad([prompt], lfm.pad_token_id, "left")
    generate, calls = scripted(lfm, [first, answer])
    roll = generate_with_tools(generate, tools, lfm, prompt_ids, mask, ["What is 2 + 3?"],
                               SamplingConfig(max_new_tokens=300), 1)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant"] and len(calls) == 2
    assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + len(ids)].tolist() == ids
    assert roll.response_mask[0, :len(ids)].tolist() == own and roll.messages[0] == trace
