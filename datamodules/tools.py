"""Tools a task offers (TRL's GRPOTrainer `tools`): Python functions the policy may call while it answers.

The data module renders the functions' JSON schemas into every prompt through the tokenizer's chat template
(`apply_chat_template(..., tools=...)`), for every stage; the RL module's generation (its rollouts and its
evaluation samples) runs them (`modules.sampling.generate_with_tools`):
  1. every response generates a turn;
  2. a turn that ended with EOS and holds tool calls (by default in the Hermes format that the Qwen2.5 / Qwen3,
     SmolLM3 and Hermes templates render, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, outside its
     reasoning, `parse_calls`; Qwen3.5's XML with `xml_calls`, Llama 3's JSON with `json_calls`, GLM's with
     `glm_calls`, gpt-oss's harmony messages with `harmony_calls`, Gemma 4's with `gemma4_calls`, LFM2's Python
     calls with `pythonic_calls`: the tools' `parser`) has them run
     (`run_call`); their results become `tool` messages, rendered by the chat template together with the next
     assistant header (`tool_suffix`) and appended to the response;
  3. those responses generate their next turn, and so on, until no new turn calls a tool, `max_turns` rounds of
     calls have run, or a response has no room left.
With an environment that defines `respond` (a simulated user, veRL's interactions), a turn that ended with EOS
without calling a tool is shown to it: a text it returns becomes a `user` message, rendered after the turn's EOS
with the next assistant header (`user_suffix`), and the response goes on to its next turn; None ends the response.
It sees every such turn, the last one included (its state can score the conversation): a message past
`max_user_turns` is dropped, and the response ends.

A rollout's response is then every turn and every tool result in order. `attention_mask` covers all of it,
`response_mask` only the policy's own tokens (each turn up to and including its EOS): the tool results are context
the policy is conditioned on, never trained on, and not counted in the KL or the length (TRL's `tool_mask`); so
are a simulated user's messages.
`max_new_tokens` bounds the whole response, tool results included (TRL's `max_completion_length`): a tool result
(or a user message) that would leave no room for one more token is not appended, and that response ends there.

A call that fails (malformed JSON, an unknown tool, wrong arguments, an exception, more than `timeout` seconds)
gives the policy `{"error": "..."}` as its result, as TRL does; the share of failed calls is logged
(`train/tool_failures`), beside the calls per response (`train/tool_calls`).

With an `environment` (TRL's `environment_factory`), each response gets its own instance of a class whose public
methods are further tools, so its calls act on state that lasts the whole response (a game, a sandbox, a
database): before the first turn each instance's `reset` is called with the record's prompt and fields, and a text
it returns is appended to the last user message of that response's prompt; after the response, a reward may read
the instance (TRL's `environments`, e.g. `modules.rewards.environment_reward`, its `get_reward()`).

EOS above is any of the model's stop tokens (`datamodules.collate.stop_ids`: EOS, the token the chat template ends
a turn with, the generation config's EOS ids). A demonstration given as a multi-turn trace (SFT) is laid out the
same way, its tool results and user messages
outside the loss (`encode_trace`). docs/tools.md is the user's guide.
"""
from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from datamodules.collate import answer_of, harmony, reasoning_field, reasoning_marks, stop_ids
from datamodules.sources import DataError

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
GLM_NAME = re.compile(r"\s*([^\s<]+)")
GLM_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
HARMONY_RECIPIENT = re.compile(r"to=([^\s<]+)")
GEMMA4_CALL = re.compile(r"<\|tool_call>call:([\w.\-]+)(\{.*?\})(?=<tool_call\|>|<turn\|>|$)", re.DOTALL)
GEMMA4_STRING = '<|"|>'
PYTHONIC_CALL = re.compile(r"<\|tool_call_start\|>(.*?)(?:<\|tool_call_end\|>|$)", re.DOTALL)
HARMONY_BUILTINS = ("assistant", "python", "browser", "container")


@dataclass
class Tools:
    """Python functions the policy may call (TRL's `tools`), each given in YAML by its import path
    (`mypackage.tools.calculator`), and/or an environment class whose methods it may call. Their names, type hints
    and Google-style docstrings make the JSON schemas rendered into every prompt (`transformers.utils.
    get_json_schema`); each may be `async def`.

    Args:
        functions: the tools, by import path.
        environment: a class, by import path, built with no arguments (TRL's `environment_factory`): one instance
            per response, reused across rollouts ("construct once, reset often"). It defines `reset(self, ...)`,
            called before each response with the keywords it names among `prompt` (the record's) and the data's
            `reward_fields` (all of them if it takes `**kwargs`), returning None or a text appended to the last
            user message; every other public method is a tool acting on that instance (`get_reward`, if defined,
            is not: `modules.rewards.environment_reward` reads it). The K responses to a prompt must get the same
            text, as they answer the same prompt. Or several, `{name: class}` (TRL's dict): each record names its
            own in its `environment` field (read as a reward field), and its prompt carries that one's tools only.
            An environment may also be a simulated user (veRL's interactions): `respond(self, messages)`, if
            defined, is not a tool but is called with the response's messages so far (TRL's list of assistant,
            tool and user messages) whenever a turn ends with EOS and calls no tool, and returns the user's next
            message as a text (the policy answers it in a further turn) or None (the conversation ends).
        max_turns: rounds of tool calls per response (TRL's `max_tool_calling_iterations`); the turn after the
            last round is the policy's final answer.
        max_user_turns: messages a simulated user (an environment's `respond`) may add per response (veRL's
            `max_user_turns`); the turn after the last one ends the response (respond still sees it; what it
            returns then is dropped).
        timeout: seconds a call may take; a slower one gives the policy an error result (and is counted as a
            failure). A synchronous function that ignores it keeps running in its thread.
        concurrency: responses whose calls run at once, each in a thread of its own (a response's own calls run in
            order): for tools that wait (a remote sandbox, a search API), so a round of calls takes about the
            slowest call rather than their sum. 1 (the default, as TRL) runs them one after another; above 1 the
            functions must be safe to call from several threads at once (environment instances are per response).
            A simulated user's `respond` calls run the same way, each within `timeout` seconds.
        parser: how a turn's text is read for calls, by import path: a function (text) -> [{"name", "arguments"} or
            {"error": why} (a malformed call, answered with that error)], none for a turn that calls nothing; one
            that takes a `schemas` keyword is given the JSON schemas of the tools the response may call.
            `datamodules.tools.parse_calls` (the default): the Hermes `<tool_call>` blocks of Qwen2.5 / Qwen3,
            SmolLM3 and Hermes models; `datamodules.tools.xml_calls`: Qwen3-Coder / Qwen3.5 / Qwen3.6's
            `<tool_call><function=...><parameter=...>` blocks, each value read as its schema's type;
            `datamodules.tools.json_calls`: Llama 3.1 / 3.2 / 3.3's bare JSON `{"name": ..., "parameters": {...}}`;
            `datamodules.tools.glm_calls`: GLM-4.5 to 5's `<tool_call>NAME<arg_key>...<arg_value>...` blocks;
            `datamodules.tools.harmony_calls`: gpt-oss's messages addressed `to=functions.NAME`;
            `datamodules.tools.gemma4_calls`: Gemma 4's `<|tool_call>call:NAME{...}<tool_call|>` blocks;
            `datamodules.tools.pythonic_calls`: LFM2 / LFM2.5's `<|tool_call_start|>[name(key=value)]` lists.
            The chat template must write a call the way the parser reads it.
    """

    functions: list[Callable] = field(default_factory=list)
    environment: type | dict[str, type] | None = None
    max_turns: int = 4
    max_user_turns: int = 4
    timeout: float = 30.0
    concurrency: int = 1
    parser: Callable[[str], list[dict]] | None = None

    def __post_init__(self):
        if not self.functions and self.environment is None:
            raise ValueError("Tools: functions is empty and no environment is given; expected at least one function "
                              "(an import path, e.g. mypackage.tools.calculator) or an environment class")
        for fn in self.functions:
            if not callable(fn):
                raise ValueError(f"Tools: functions holds {fn!r}, which is not callable; expected functions")
        if self.max_turns < 1:
            raise ValueError(f"Tools: max_turns={self.max_turns}; expected >= 1 (rounds of tool calls per response)")
        if self.max_user_turns < 0:
            raise ValueError(f"Tools: max_user_turns={self.max_user_turns}; expected >= 0 (a simulated user's "
                              "messages per response)")
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"Tools: timeout={self.timeout}; expected a finite number of seconds > 0")
        if self.concurrency < 1:
            raise ValueError(f"Tools: concurrency={self.concurrency}; expected >= 1 (responses whose calls run at once)")
        if self.parser is not None and not callable(self.parser):
            raise ValueError(f"Tools: parser={self.parser!r} is not callable; expected a function (text) -> calls, "
                             "e.g. datamodules.tools.json_calls")
        self.parse: Callable[[str], list[dict]] = self.parser or parse_calls
        try:
            self.parse_schemas = "schemas" in inspect.signature(self.parse).parameters
        except (TypeError, ValueError):                  # a callable without a signature Python can read
            self.parse_schemas = False
        classes = self.environment if isinstance(self.environment, dict) else \
            {} if self.environment is None else {None: self.environment}
        if isinstance(self.environment, dict) and not self.environment:
            raise ValueError("Tools: environment is an empty mapping; expected {name: class, ...} or one class")
        self.classes: dict[str | None, type] = classes
        self.names = {cls: name for name, cls in classes.items()}    # environment class -> its name (None: the one)
        self.pools = {name: [self._new_environment(name)] for name in classes}   # (each probed at once)
        self.by_name = {fn.__name__: fn for fn in self.functions}
        self.tool_schemas = {}                                     # environment name -> the schemas its prompts carry
        self.method_names = {}                                     # environment class -> its tools' names
        for name in classes or [None]:
            methods = list(environment_methods(self.pools[name][0]).values()) if classes else []
            if classes:
                self.method_names[classes[name]] = [fn.__name__ for fn in methods]
            names = [fn.__name__ for fn in self.functions + methods]
            if len(set(names)) < len(names):
                raise ValueError(f"Tools: the functions and environment methods {names} repeat a name; the policy "
                                  "calls a tool by its name")
            self.tool_schemas[name] = [schema_of(fn) for fn in self.functions + methods]
        self.schemas = [schema for schemas in self.tool_schemas.values() for schema in schemas]
        self.reset_takes = {name: _keywords(pool[0].reset) for name, pool in self.pools.items()}
        self.user_classes = {cls for name, cls in classes.items() if callable(getattr(self.pools[name][0], "respond", None))}
        for name, schemas in self.tool_schemas.items():
            if not schemas and classes.get(name) not in self.user_classes:
                raise ValueError(f"Tools: environment {self.environment_name(name)} has no tool methods and no respond "
                                  "method, and there are no functions: nothing for the policy to call or talk to")

    @property
    def multi(self) -> bool:
        """Several environments, each record choosing its own by its `environment` field (TRL's dict)."""
        return isinstance(self.environment, dict)

    def environment_name(self, name: str | None = None) -> str:
        """The class path of environment `name` (the one environment's for None), for messages."""
        cls = self.classes[name]
        return f"{cls.__module__}.{cls.__qualname__}"

    def _new_environment(self, name: str | None):
        where = self.environment_name(name)
        try:
            instance = self.classes[name]()
        except Exception as error:
            raise ValueError(f"Tools: environment {where}() raised {type(error).__name__}: {error}; expected a class "
                              "built with no arguments") from None
        if not callable(getattr(instance, "reset", None)):
            raise ValueError(f"Tools: environment {where} has no reset method; expected reset(self, ...) returning "
                              "None or a text appended to the prompt")
        return instance

    def schemas_for(self, environment: str | None = None) -> list[dict]:
        """The schemas a prompt carries: the functions' and those of its record's `environment` (with several);
        an unknown name is a DataError naming it."""
        if not self.multi:
            return self.schemas
        if environment not in self.tool_schemas:
            raise DataError(f"field 'environment': {environment!r} is not one of data tools environment "
                            f"{sorted(self.tool_schemas)}")
        return self.tool_schemas[environment]

    def check_fields(self, names) -> None:
        """A DataError naming what to set unless `prompt` and the record fields `names` (the data's
        `reward_fields`) hold every keyword each environment's `reset` requires; checked before the first rollout."""
        for name, (required, _) in self.reset_takes.items():
            if missing := [key for key in required if key != "prompt" and key not in set(names)]:
                raise DataError(f"data tools environment {self.environment_name(name)}: reset takes "
                                f"{', '.join(map(repr, missing))}, which no record field provides (fields given: "
                                f"{sorted(names) or 'none'}); set data.init_args.reward_fields: [{', '.join(missing)}] "
                                "and give every record that field")

    def start(self, prompts: list, fields: dict[str, list], num_samples: int) -> tuple[list, list, list]:
        """Reset one environment per response (`num_samples` per prompt, prompt-major; with several, of the kind its
        record's `environment` field names): (the instances, each prompt with its observation appended to its last
        user message or as it was where `reset` returned None, each prompt's environment name). A reset that
        raises, returns something other than a text, or gives the responses to one prompt different texts stops the
        run in one line naming the environment."""
        names = [fields["environment"][i] if self.multi else None for i in range(len(prompts))]
        handed = dict.fromkeys(self.pools, 0)                 # instances of each environment given out so far
        envs, out = [], []
        for i, prompt in enumerate(prompts):
            name = names[i]
            if name not in self.pools:
                raise DataError(f"data tools: prompt {i}'s record field 'environment' is {name!r}, not one of "
                                f"{sorted(self.pools)}")
            pool, where = self.pools[name], self.environment_name(name)
            while len(pool) < handed[name] + num_samples:
                pool.append(self._new_environment(name))
            mine = pool[handed[name]:handed[name] + num_samples]
            handed[name] += num_samples
            given = {"prompt": prompt, **{key: values[i] for key, values in fields.items()
                                          if not (self.multi and key == "environment")}}
            taken = self.reset_takes[name][1]
            kwargs = given if taken is None else {key: value for key, value in given.items() if key in taken}
            seen = []
            for env in mine:
                try:
                    observation = env.reset(**kwargs)
                except Exception as error:
                    raise DataError(f"data tools environment {where}: reset(prompt {i}) raised "
                                    f"{type(error).__name__}: {error}") from None
                if observation is not None and not isinstance(observation, str):
                    raise DataError(f"data tools environment {where}: reset returned a "
                                    f"{type(observation).__name__}; expected None or a text to append to the prompt")
                if observation is None and not _text(prompt).strip():
                    raise DataError(f"data tools environment {where}: reset(prompt {i}) returned None and the prompt is "
                                    "empty (as datamodules.sources.Episodes gives it); expected the task's text, "
                                    "which becomes the prompt")
                seen.append(observation)
            if any(o != seen[0] for o in seen):
                raise DataError(f"data tools environment {where}: reset gave the {num_samples} responses to prompt {i} "
                                f"different texts ({seen[0]!r}, ...); they answer the same prompt, so the text must "
                                "follow from the record alone (seed any randomness from it)")
            envs += mine
            out.append(prompt if seen[0] is None else observed(prompt, seen[0]))
        return envs, out, names

    def check_template(self, tokenizer, template_kwargs: dict | None = None) -> None:
        """A chat template that does not render the schemas (SmolLM2's, Llama 3's basic one), or that cannot render
        a tool result (a simulated user's message, where an environment responds) after an assistant turn, stops
        here in one line. `template_kwargs`: the data's `chat_template_kwargs`."""
        kw = template_kwargs or {}
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data tools: tokenizer {name!r} has no chat template, which tools need (their schemas "
                              "go into every prompt, their results are rendered as tool messages)")
        if self.user_classes:
            user_suffix(tokenizer, "x", kw)
        if not self.schemas:
            return
        user = [{"role": "user", "content": "x"}]
        with_tools = tokenizer.apply_chat_template(user, tools=self.schemas, add_generation_prompt=True, tokenize=False,
                                                   **kw)
        plain = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **kw)
        if with_tools == plain or self.schemas[0]["function"]["name"] not in with_tools:
            raise DataError(f"data tools: the chat template of {name!r} does not render tool schemas (it ignores "
                              "`tools`); use a tokenizer whose template does (Qwen2.5 / Qwen3, SmolLM3, Hermes)")
        tool_suffix(tokenizer, [{"role": "tool", "name": self.schemas[0]["function"]["name"], "content": "1"}], kw)

    def read(self, text: str, environment=None) -> list[dict]:
        """The calls in a turn's `text` as the parser reads them, given (where it takes them) the schemas of the
        tools the response's `environment` offers."""
        schemas = self.tool_schemas[self.names.get(type(environment))]
        return self.parse(text, schemas=schemas) if self.parse_schemas else self.parse(text)

    def call(self, calls: list[dict], environment=None) -> tuple[list[dict], int]:
        """Run a turn's `calls` (as `read` gives them), on the response's `environment` instance for its methods:
        ([tool message per call], failed calls)."""
        by_name = self.by_name if environment is None else {
            **self.by_name, **{name: getattr(environment, name) for name in self.method_names[type(environment)]}}
        messages, failed = [], 0
        for call in calls:
            name, result, ok = run_call(call, by_name, self.timeout)
            messages.append({"role": "tool", "name": name, "content": result})
            failed += not ok
        return messages, failed

    def call_all(self, calls: list[list[dict]], environments: list) -> list[tuple[list[dict], int]]:
        """`call` for each response's latest turn's `calls[i]` on its `environments[i]` (None without),
        `concurrency` responses at a time; the outcomes in the order given."""
        return self._each(self.call, calls, environments)

    def responds(self, environment) -> bool:
        """Whether `environment` (a response's instance, or None) is a simulated user: its class defines `respond`."""
        return environment is not None and type(environment) in self.user_classes

    def respond(self, messages: list[dict], environment) -> str | None:
        """A simulated user's next message to a response whose messages so far are `messages` (the last, the
        policy's turn that ended without a call): its `environment`'s `respond(messages)`, a text or None (the
        conversation ends). One that raises, takes more than `timeout` seconds or returns anything else stops the
        run in one line naming the environment (the policy did nothing wrong: the simulator did)."""
        where = f"{type(environment).__module__}.{type(environment).__qualname__}"
        try:
            message = _run(environment.respond, {}, self.timeout, ([dict(m) for m in messages],))
        except concurrent.futures.TimeoutError:
            raise DataError(f"data tools environment {where}: respond took more than timeout={self.timeout:g} s") from None
        except Exception as error:
            raise DataError(f"data tools environment {where}: respond raised {type(error).__name__}: {error}") from None
        if message is not None and not isinstance(message, str):
            raise DataError(f"data tools environment {where}: respond returned a {type(message).__name__}; expected "
                            "the user's next message as a text, or None to end the conversation")
        return message

    def respond_all(self, conversations: list[list[dict]], environments: list) -> list[str | None]:
        """`respond` for each response's `conversations[i]` on its `environments[i]`, `concurrency` at a time; the
        messages in the order given."""
        return self._each(self.respond, conversations, environments)

    def _each(self, fn: Callable, firsts: list, environments: list) -> list:
        if self.concurrency == 1 or len(firsts) < 2:
            return [fn(first, env) for first, env in zip(firsts, environments)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, firsts, environments))


def environment_methods(instance) -> dict[str, Callable]:
    """An environment instance's tools: its public methods but `reset` and `get_reward` (TRL's rule) and `respond`
    (a simulated user's), by name."""
    return {name: method for name, method in inspect.getmembers(instance, predicate=inspect.ismethod)
            if not name.startswith("_") and name not in ("reset", "get_reward", "respond")}


def _keywords(fn: Callable) -> tuple[list[str], list[str] | None]:
    """(the keywords `fn` requires, every keyword it takes: None for any, with `**kwargs`).

    Example: def reset(self, secret, prompt=None) -> (["secret"], ["secret", "prompt"])."""
    params = list(inspect.signature(fn).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in named if p.default is inspect.Parameter.empty]
    return required, None if any(p.kind is p.VAR_KEYWORD for p in params) else [p.name for p in named]


def observed(prompt: str | list[dict], observation: str) -> str | list[dict]:
    """`prompt` with an environment's `observation` appended to its last message's text (TRL's rule), the record's
    own prompt left as it was.

    Example: "guess the code" + " It has 2 digits." -> "guess the code It has 2 digits."; [{user: "hi"}] + " x" ->
    [{user: "hi x"}]."""
    if isinstance(prompt, str):
        return prompt + observation
    return prompt[:-1] + [{**prompt[-1], "content": (prompt[-1].get("content") or "") + observation}]


def _text(prompt: str | list[dict]) -> str:
    """A prompt's text, its last message's for a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1].get("content") or ""


def schema_of(fn: Callable) -> dict:
    """The JSON schema of `fn` that chat templates render (`transformers.utils.get_json_schema`), or one line saying
    what its docstring lacks."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as error:
        raise ValueError(f"Tools: function {getattr(fn, '__module__', '?')}.{fn.__name__}: {error} (a tool needs "
                          "type hints and a Google-style docstring with an Args section)") from None


def call_blocks(text: str, blocks: re.Pattern = CALL, opening: str = "<think>", closing: str = "</think>") -> list:
    """The bodies of a turn's `<tool_call>` blocks (or those `blocks` finds) outside its reasoning: after the last
    `closing` (Qwen3's, DeepSeek-R1's, SmolLM3's and LFM2.5's `</think>`, Gemma 4's `<channel|>`; a call the policy
    only thinks about is not run, as with TRL's and vLLM's reasoning parsers), none where an `opening` is never
    closed, all of them in a turn without those tags.

    Example: '<think>or <tool_call>A</tool_call>?</think><tool_call>B</tool_call>' -> ['B']; '<think>
    <tool_call>A</tool_call>' -> []; '<tool_call>A</tool_call>' -> ['A']."""
    if closing in text:
        text = text.rsplit(closing, 1)[1]
    elif opening in text:
        return []
    return blocks.findall(text)


def parse_calls(text: str) -> list[dict]:
    """The tool calls in a turn's text (`call_blocks`): each `<tool_call>` block's JSON as `{"name", "arguments"}`,
    or `{"error": why}` for a block that is not such JSON.

    Example: 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' ->
    [{"name": "add", "arguments": {"a": 2, "b": 3}}]; '<tool_call>add(2, 3)</tool_call>' -> [{"error": "..."}]."""
    calls = []
    for body in call_blocks(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as error:
            calls.append({"error": f"the tool call is not JSON ({error.msg} at character {error.pos})"})
            continue
        calls.append(_call_of(call))
    return calls


def _call_of(call) -> dict:
    """A decoded call's `{"name", "arguments"}`, or `{"error": why}` (with its name where it has one)."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return {"error": 'a tool call is a JSON object {"name": ..., "arguments": {...}}'}
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):                         # some templates render the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return {"name": call["name"], "error": "the arguments of a tool call are a JSON object"}
    return {"name": call["name"], "arguments": arguments}


def xml_calls(text: str, schemas: list[dict] | None = None) -> list[dict]:
    """The tool calls of Qwen3-Coder, Qwen3.5 and Qwen3.6: `<tool_call>` blocks outside the reasoning (as
    `parse_calls` reads them, `call_blocks`), each holding `<function=NAME>` and a `<parameter=KEY>` block per
    argument. A value is text; where `schemas` (the tools' JSON schemas, as `Tools` passes them) give the
    parameter's type, it is read as that type (`typed`, vLLM's rule for these calls), else as JSON where it parses
    (the templates write every value but text as JSON) and as text where it does not.

    Example: '<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n
    </function>\n</tool_call>' -> [{"name": "add", "arguments": {"a": 2, "b": 3}}]; the same call to a tool whose
    schema types `a` as a string -> {"a": "2", "b": 3}; a block without `<function=...>` -> [{"error": "..."}]."""
    calls = []
    for body in call_blocks(text):
        function = XML_FUNCTION.search(body)
        if function is None:
            calls.append({"error": "a tool call is <function=NAME> holding <parameter=KEY>VALUE</parameter> blocks"})
            continue
        name = function[1].strip()
        calls.append({"name": name, "arguments": _arguments(name, XML_PARAMETER.findall(function[2]), schemas)})
    return calls


def glm_calls(text: str, schemas: list[dict] | None = None) -> list[dict]:
    """The tool calls of GLM-4.5 (tested with its template; 4.6, 4.7 and 5 write them the same way): `<tool_call>`
    blocks outside the reasoning (`call_blocks`), each the tool's name then an `<arg_key>KEY</arg_key>` and
    `<arg_value>VALUE</arg_value>` per argument (vLLM's `glm45` / `glm47` parsers). Values are read as `xml_calls`
    reads them: as their schema's type where `schemas` give it.

    Example: '<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n<arg_key>b</arg_key>\n<arg_value>3
    </arg_value>\n</tool_call>' -> [{"name": "add", "arguments": {"a": 2, "b": 3}}]; a block that starts with no name
    -> [{"error": "..."}]."""
    calls = []
    for body in call_blocks(text):
        name = GLM_NAME.match(body)
        if name is None:
            calls.append({"error": "a tool call is the tool's name, then <arg_key>KEY</arg_key><arg_value>VALUE"
                                   "</arg_value> per argument"})
            continue
        calls.append({"name": name[1], "arguments": _arguments(name[1], GLM_ARGUMENT.findall(body), schemas)})
    return calls


def _arguments(name: str, pairs: list[tuple[str, str]], schemas: list[dict] | None) -> dict:
    """A call's (key, value text) pairs as its arguments, each value `typed` as tool `name`'s schema types it."""
    properties = next((schema["function"].get("parameters", {}).get("properties", {}) for schema in schemas or []
                       if schema["function"]["name"] == name), {})
    pairs = [(key.strip(), value) for key, value in pairs]
    return {key: typed(value, schema_types(properties[key]) if key in properties else []) for key, value in pairs}


def schema_types(schema: dict) -> list[str]:
    """The JSON types a parameter's schema allows: its `type` (one or a list), those of its `enum` values and of
    its `anyOf` / `oneOf` / `allOf` choices; ["string"] where it names none (vLLM's `extract_types_from_schema`).

    Example: {"type": "integer"} -> ["integer"]; {"anyOf": [{"type": "integer"}, {"type": "null"}]} ->
    ["integer", "null"]; {"enum": ["a", 1]} -> ["string", "integer"]; {} -> ["string"]."""
    found = [schema["type"]] if isinstance(schema.get("type"), str) else list(schema.get("type") or [])
    for value in schema.get("enum") or []:
        found.append("null" if value is None else "boolean" if isinstance(value, bool) else
                     "integer" if isinstance(value, int) else "number" if isinstance(value, float) else
                     "string" if isinstance(value, str) else "array" if isinstance(value, list) else "object")
    for choice in (c for key in ("anyOf", "oneOf", "allOf") for c in schema.get(key) or []):
        found += schema_types(choice) if isinstance(choice, dict) else []
    return list(dict.fromkeys(found)) or ["string"]


def typed(value: str, types: list[str]) -> object:
    """A parameter's text `value` read as the first of `types` it is, in the order null, integer, number, boolean,
    object, array, string (vLLM's `coerce_to_schema_type`): null is "null"; a number is a finite float, an integer
    where it is whole; a boolean is "true"/"1" or "false"/"0" (any case); an object or array is JSON. Where none
    fits, or `types` is empty, JSON where it parses to a finite value, else the text.

    Example: typed("5", ["string"]) -> "5"; typed("5", ["integer"]) -> 5; typed("2.0", ["number"]) -> 2;
    typed("True", ["boolean"]) -> True; typed("null", ["integer", "null"]) -> None; typed("five", ["integer"]) ->
    "five"; typed("[1, 2]", []) -> [1, 2]."""
    kinds = set(types)
    if "null" in kinds and value.lower() == "null":
        return None
    for kind in ("integer", "number", "boolean", "object", "array", "string"):
        if kind not in kinds:
            continue
        if kind == "string":
            return value
        if kind == "integer" and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return int(number) if number == int(number) else number
        if kind == "boolean" and value.strip().lower() in ("true", "1", "false", "0"):
            return value.strip().lower() in ("true", "1")
        if kind in ("object", "array"):
            parsed = _finite_json(value)
            if isinstance(parsed, dict if kind == "object" else list):     # (vLLM takes any JSON value here)
                return parsed
    parsed = _finite_json(value)
    return value if parsed is _NOT_JSON else parsed


_NOT_JSON = object()


def _finite_json(value: str) -> object:
    """`value` as JSON, or `_NOT_JSON` where it is not JSON or holds a non-finite number (1e999, NaN)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return _NOT_JSON
    return parsed if _finite(parsed) else _NOT_JSON


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, dict)):
        return all(map(_finite, value.values() if isinstance(value, dict) else value))
    return True


def json_calls(text: str) -> list[dict]:
    """The tool calls of a Llama 3.1 / 3.2 / 3.3 turn (vLLM's `llama3_json` parser): its text, after an optional
    `<|python_tag|>`, is a JSON object `{"name": ..., "parameters": {...}}` ("arguments" is read too), or several
    joined by ";"; a turn that does not start with "{" calls nothing, and one that does but holds no such call is
    answered with an error (the policy's system prompt asks for that JSON to call). Each as `parse_calls` gives it.

    Example: '{"name": "add", "parameters": {"a": 2, "b": 3}}' -> [{"name": "add", "arguments": {"a": 2, "b": 3}}];
    'It is 5.' -> []; '{"name": "add", "parameters": {"a": 2' -> [{"error": "the tool call is not JSON (...)"}]."""
    body = text.strip()
    body = body[len("<|python_tag|>"):].lstrip() if body.startswith("<|python_tag|>") else body
    if not body.startswith("{"):
        return []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            call, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError as error:
            return calls + [{"error": f"the tool call is not JSON ({error.msg} at character {error.pos})"}]
        if isinstance(call, dict) and "parameters" in call and "arguments" not in call:
            call = {**call, "arguments": call.pop("parameters")}
        calls.append(_call_of(call))
        rest = body[at:].lstrip()
        if rest and not rest.startswith(";"):
            return calls + [{"error": f"text after a tool call: {rest[:40]!r}; expected another call after ';' or "
                                      "nothing"}]
        at = len(body) - len(rest.lstrip(";").lstrip())
    return calls


def harmony_calls(text: str) -> list[dict]:
    """The tool calls of gpt-oss (OpenAI's harmony format): each message of the turn addressed to a function, in
    whatever channel, its text the call's JSON arguments (vLLM's harmony parser, openai_harmony's messages). A turn
    is the text after the generation prompt `<|start|>assistant`, messages joined by `<|end|><|start|>assistant`;
    a message is a header, `<|message|>`, then its text. The recipient is `to=functions.NAME` (a bare `to=NAME` too,
    unless a built-in tool: python, browser, container), written after the channel as the model writes it
    (`<|channel|>commentary to=functions.add <|constrain|>json`) or before it as gpt-oss's template does
    (` to=functions.add<|channel|>commentary json`). Messages to nobody (analysis, final) call nothing.

    Example: '<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>commentary
    to=functions.add <|constrain|>json<|message|>{"a": 2, "b": 3}' -> [{"name": "add", "arguments": {"a": 2, "b":
    3}}]; '<|channel|>final<|message|>5' -> []; arguments that are not JSON -> [{"name": ..., "error": "..."}]."""
    calls = []
    for message in text.split("<|start|>"):
        header, marker, body = message.partition("<|message|>")
        recipient = HARMONY_RECIPIENT.search(header) if marker else None
        name = recipient[1].removeprefix("functions.") if recipient else ""
        if not name or (not recipient[1].startswith("functions.") and name.split(".")[0] in HARMONY_BUILTINS):
            continue
        body = re.split(r"<\|(?:end|call|return)\|>", body, maxsplit=1)[0].strip()
        calls.append(_object_call(name, _finite_json(body), "a JSON object", body))
    return calls


def _object_call(name: str, arguments, expected: str, written: str) -> dict:
    """`{"name", "arguments"}` where `arguments` is an object of finite values, else `{"name", "error"}` saying
    what was `expected` and what was `written`."""
    if isinstance(arguments, dict) and _finite(arguments):
        return {"name": name, "arguments": arguments}
    return {"name": name, "error": f"the arguments of a call to {name} are {expected}; got {written[:40]!r}"}


def gemma4_calls(text: str) -> list[dict]:
    """The tool calls of Gemma 4: `<|tool_call>call:NAME{ARGUMENTS}<tool_call|>` blocks after its reasoning (the
    last `<channel|>` that closes a `<|channel>thought` block; none where one is never closed, as `call_blocks`
    reads `<think>`). The arguments are Gemma's JSON: keys bare, text between `<|"|>` marks (transformers' parser,
    `parse_content(..., "json", {"unquoted_keys": True, "string_delims": ...})`, as its chat parsing and TRL read
    them), so a value keeps its type; vLLM's parser gives every bare value as text.

    Example: '<|channel>thought\nAdd them.<channel|><|tool_call>call:add{a:2,b:3}<tool_call|>' -> [{"name": "add",
    "arguments": {"a": 2, "b": 3}}]; 'call:lookup{query:<|"|>2024<|"|>}' in that block -> {"query": "2024"}; a
    block whose arguments are not that JSON -> [{"name": ..., "error": "..."}]."""
    from transformers.utils.chat_parsing.content_parsers import parse_content

    calls = []
    for name, body in call_blocks(text, GEMMA4_CALL, "<|channel>", "<channel|>"):
        try:
            arguments = parse_content(body, "json", {"unquoted_keys": True, "string_delims": [[GEMMA4_STRING] * 2]})
        except ValueError:
            arguments = None
        calls.append(_object_call(name, arguments, 'an object {key:value,...}, text between <|"|> marks', body))
    return calls


def pythonic_calls(text: str) -> list[dict]:
    """The tool calls of LFM2 / LFM2.5 (Liquid AI): a `<|tool_call_start|>[name(key=value, ...), ...]
    <|tool_call_end|>` block outside the reasoning (`call_blocks`), a Python list of calls with keyword arguments
    whose values are Python literals (JSON's true, false and null read too), as vLLM's `lfm2` parser reads them.
    A block that is not such a list is one error entry; a call with an argument that is no literal (or no keyword),
    an error entry naming it. vLLM also repairs some malformed text (a raw newline or an unescaped quote inside a
    string, a leading zero), and reads a block that holds no list of calls (`[]`, `add(a=2)`) as no call; here
    both are errors the policy is answered with.

    Example: '<|tool_call_start|>[add(a=2, b=3)]<|tool_call_end|>' -> [{"name": "add", "arguments": {"a": 2, "b":
    3}}]; '[search(query="p3o", tags=["rl"]), ping()]' in that block -> two calls; '[add(2, 3)]' -> [{"name":
    "add", "error": "..."}]."""
    calls = []
    for body in call_blocks(text, PYTHONIC_CALL):
        try:
            tree = ast.parse(body.strip(), mode="eval").body
        except (SyntaxError, ValueError):
            tree = None
        if not isinstance(tree, ast.List) or not tree.elts or not all(isinstance(e, ast.Call) for e in tree.elts):
            calls.append({"error": f"a tool call is a list of calls [name(key=value, ...)], got {body.strip()[:40]!r}"})
            continue
        for call in tree.elts:
            name = ast.unparse(call.func)
            try:
                if not isinstance(call.func, (ast.Name, ast.Attribute)):
                    raise ValueError("its name is not a (dotted) name")
                if call.args or any(keyword.arg is None for keyword in call.keywords):
                    raise ValueError("arguments are given by keyword")
                calls.append({"name": name, "arguments": {k.arg: _literal(k.value) for k in call.keywords}})
            except ValueError as error:
                calls.append({"name": name, "error": f"the call to {name} is not name(key=literal, ...): {error}"})
    return calls


def _literal(node) -> object:
    """A Python literal's value (`ast.literal_eval`), JSON's true / false / null read as True / False / None, a
    tuple as a list; else a ValueError. Example: the node of [1, null, (2, true)] -> [1, None, [2, True]]."""
    names = {"true": True, "false": False, "null": None}
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(key, ast.Constant) for key in node.keys):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{ast.unparse(node)[:40]!r} is not a literal") from None
    if not _finite(value) or not isinstance(value, (str, int, float, bool, type(None))):
        raise ValueError(f"{ast.unparse(node)[:40]!r} is not a JSON value")
    return value


CALL_MARKUP = {parse_calls: CALL, xml_calls: CALL, glm_calls: CALL, pythonic_calls: PYTHONIC_CALL,
               gemma4_calls: re.compile(GEMMA4_CALL.pattern + r"(?:<tool_call\|>)?", re.DOTALL)}
HARMONY_ANALYSIS = re.compile(r"<\|channel\|>analysis<\|message\|>(.*?)(?=<\|(?:end|call|return)\|>|$)", re.DOTALL)


def assistant_message(tokenizer, text: str, calls: list[dict], parser: Callable | None = None) -> dict:
    """A policy's turn as the message TRL's tool loop gives rewards (transformers' `parse_response` with TRL 1.16's
    response templates): `{"role": "assistant", "content": ...}`, the content being the turn's text outside its
    reasoning and its calls (gpt-oss: its final message's text), stripped ("" where there is none); the reasoning
    under the field the chat template reads (`datamodules.collate.reasoning_field`: `thinking` for gpt-oss and
    LFM2.5, else `reasoning_content`) where there is any; `tool_calls` as TRL's `[{"type": "function", "function":
    {"name", "arguments"}}]` where the turn calls. `text` is the turn decoded with its special tokens, without its
    stop token, after the reasoning opening its context ended with (a turn that starts inside the reasoning);
    `calls` is what `parser` (None: `parse_calls`) read of it. A call the parser could not read is not in
    `tool_calls` (its error result follows as a tool message). The parsers here have their call markup taken out
    of the content; a parser of your own leaves it there, and a Llama 3 turn that calls has no content.

    Example (Qwen3): '<think>\nAdd them.\n</think>\n\nLet me add.\n<tool_call>\n{"name": "add", "arguments": {"a":
    2, "b": 3}}\n</tool_call>' -> {"role": "assistant", "content": "Let me add.", "reasoning_content": "Add them.",
    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}; '<think>\nAdd'
    (cut off) -> {"role": "assistant", "content": "", "reasoning_content": "Add"}; (gpt-oss) '<|channel|>analysis
    <|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>5' -> {"role": "assistant", "content": "5",
    "thinking": "Add."}."""
    parser = parser or parse_calls
    if harmony(tokenizer):
        reasoning, content = "\n".join(part.strip() for part in HARMONY_ANALYSIS.findall(text)), answer_of(text)
    else:
        reasoning, content = split_reasoning(text, *reasoning_marks(tokenizer))
        if parser is json_calls and calls:
            content = ""
        elif parser in CALL_MARKUP:
            content = CALL_MARKUP[parser].sub("", content)
    message = {"role": "assistant", "content": content.strip()}
    if reasoning.strip():
        message[reasoning_field(tokenizer)] = reasoning.strip()
    read = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls if "arguments" in c]
    if read:
        message["tool_calls"] = read
    return message


def split_reasoning(text: str, opening: str, closing: str) -> tuple[str, str]:
    """(reasoning, the rest) of a turn's text: the reasoning runs from its `opening` (or the start) to the last
    `closing`, or to the end where the turn opens it and never closes it.

    Example: "<think>\nAdd.\n</think>\n\nIt is 5." -> ("\nAdd.\n", "\n\nIt is 5."); "Add.</think>5" -> ("Add.", "5");
    "<think>Add" -> ("Add", ""); "It is 5." -> ("", "It is 5.")."""
    if closing in text:
        before, _, after = text.rpartition(closing)
        head, opened, reasoning = before.partition(opening)
        return (reasoning, head + after) if opened else (before, after)
    head, opened, reasoning = text.partition(opening)
    return reasoning, head


def run_call(call: dict, by_name: dict[str, Callable], timeout: float) -> tuple[str, str, bool]:
    """(tool name, result text, succeeded) of one parsed call. The result is the function's return value as text
    (JSON for dicts and lists), or `{"error": ...}` when the call fails in any way.

    Example: {"name": "add", "arguments": {"a": 2, "b": 3}} with add(a, b) = a + b -> ("add", "5", True);
    {"name": "mul", ...} where there is no `mul` -> ("mul", '{"error": "no tool named mul; the tools are add"}', False).
    """
    name = call.get("name") or "unknown"
    if "error" in call:
        return name, json.dumps({"error": call["error"]}), False
    fn = by_name.get(name)
    if fn is None:
        return name, json.dumps({"error": f"no tool named {name}; the tools are {', '.join(by_name)}"}), False
    try:
        result = _run(fn, call["arguments"], timeout)
    except concurrent.futures.TimeoutError:
        return name, json.dumps({"error": f"the call took more than {timeout:g} s"}), False
    except Exception as error:                        # the policy's call went wrong: it learns from the message
        return name, json.dumps({"error": f"{type(error).__name__}: {error}"}), False
    text = result if isinstance(result, str) else json.dumps(result, default=str) \
        if isinstance(result, (dict, list)) else str(result)
    return name, text, True


def _run(fn: Callable, arguments: dict, timeout: float, args: tuple = ()):
    """fn(*args, **arguments) within `timeout` seconds (a coroutine function awaited), else TimeoutError."""
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(asyncio.wait_for(fn(*args, **arguments), timeout))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args, **arguments).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def call_turn_end(tokenizer, template_kwargs: dict | None = None) -> int:
    """The stop token the chat template writes after an assistant turn that calls a tool, before the results (the
    one `tool_suffix` follows): Gemma 4's `<|tool_response>` (which opens the result), GLM-4.5's `<|observation|>`,
    ChatML's `<|im_end|>`. A template that writes none is refused as in `tool_suffix`."""
    prefix, end = _ended_turn(tokenizer, _call_turn("f"), "a tool result", template_kwargs)
    return prefix[end]


def _call_turn(name: str) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}


def tool_suffix(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Token ids that follow an assistant turn's EOS to give it `messages` (tool results) and open the next
    assistant turn: the chat template's rendering of [user, assistant with a call, *messages] with the generation
    prompt, less that of [user, assistant with a call] cut after its last EOS (TRL's `_get_tool_suffix_ids`);
    `template_kwargs`, the data's `chat_template_kwargs`, go to every rendering.

    Example (ChatML): [{"role": "tool", "content": "5"}] -> ids of "\\n<|im_start|>tool\\n5<|im_end|>\\n
    <|im_start|>assistant\\n" (the template's own tool wrapping, e.g. Qwen's <tool_response>, included)."""
    return _suffix(tokenizer, _call_turn(messages[0]["name"]), messages, "a tool result", template_kwargs)


def user_suffix(tokenizer, text: str, template_kwargs: dict | None = None) -> list[int]:
    """Token ids that follow an assistant turn's EOS to give it a user message `text` (a simulated user's, an
    environment's `respond`) and open the next assistant turn, as `tool_suffix` does for tool results. The turn it
    follows reasons (`<think>...</think>` in its text, as a thinking policy's turns do, and the message fields
    templates write reasoning from: `reasoning_content`, gpt-oss's `thinking`), so a template that drops an earlier
    turn's reasoning once a user message follows it (Qwen3's, Nemotron 3's by default, Gemma 4's) is refused.

    Example (ChatML): "Try again." -> ids of "\\n<|im_start|>user\\nTry again.<|im_end|>\\n<|im_start|>assistant\\n"."""
    turn = {"role": "assistant", "content": "<think>\nr\n</think>\n\ny", "reasoning_content": "r", "thinking": "r"}
    return _suffix(tokenizer, turn, [{"role": "user", "content": text}], "a user message", template_kwargs)


def _suffix(tokenizer, turn: dict, messages: list[dict], what: str, template_kwargs: dict | None = None) -> list[int]:
    """The chat template's rendering of [user, `turn`, *messages] with the generation prompt, less that of [user,
    `turn`] cut after the stop token that ends the turn (the first of `stop_ids` after the user message, as the
    policy's turn ends at the first; TRL's `_get_tool_suffix_ids` cuts after the last EOS, which misses Phi-3's
    <|end|> before the <|endoftext|> that closes a conversation). A
    template that writes none after the turn (GLM-4.5's own: the next message's token only when one follows) is
    refused: the stop token the policy generated would be followed by another."""
    kw = template_kwargs or {}
    name = getattr(tokenizer, 'name_or_path', 'the tokenizer')
    prefix, end = _ended_turn(tokenizer, turn, what, template_kwargs)
    prefix = prefix[:end + 1]
    full = _ids(tokenizer.apply_chat_template([{"role": "user", "content": "x"}, turn] + messages,
                                              add_generation_prompt=True, tokenize=True, **kw))
    if full[:len(prefix)] != prefix:
        raise DataError(f"the chat template of {name!r} "
                          f"renders an assistant turn differently when {what} follows it, so {what} cannot "
                          "be appended to a generated turn; set data chat_template to a template that renders earlier "
                          "turns the same whatever follows them (configs/chat_templates/ has Qwen3's, Qwen3.5's, "
                          "GLM-4.5's, gpt-oss's and Gemma 4's; Qwen3.6's and LFM2.5's own do with chat_template_kwargs "
                          "{preserve_thinking: true}, Nemotron 3's with {truncate_history_thinking: false})")
    return full[len(prefix):]


def _ended_turn(tokenizer, turn: dict, what: str, template_kwargs: dict | None = None) -> tuple[list[int], int]:
    """The chat template's rendering of [user, `turn`] and the index of the stop token that ends the turn (the first
    of `stop_ids` after the user message), or the line that refuses a template writing none (see `_suffix`)."""
    head = [{"role": "user", "content": "x"}, turn]
    kw = template_kwargs or {}
    asked = _ids(tokenizer.apply_chat_template(head[:1], add_generation_prompt=False, tokenize=True, **kw))
    prefix = _ids(tokenizer.apply_chat_template(head, add_generation_prompt=False, tokenize=True, **kw))
    stops = stop_ids(tokenizer)
    ends = [i for i, t in enumerate(prefix) if t in stops and i >= len(asked)]     # (the turn's, not the user's)
    if not ends:
        written = ", ".join(map(repr, tokenizer.convert_ids_to_tokens(stops)))
        raise DataError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')!r} writes no stop "
                        f"token ({written}) after an assistant turn, so {what} cannot be appended to a generated turn; "
                        "set data chat_template to a template that ends every assistant turn with one "
                        "(configs/chat_templates/glm4_moe_training.jinja for GLM-4.5)")
    return prefix, ends[0]


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def encode_trace(tokenizer, prompt: str | list[dict], messages: list[dict], schemas: list[dict] | None,
                 template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """A multi-turn trace as a response (SFT on demonstrations of tool use or of a conversation): its token ids and
    which are the policy's (1) rather than a tool's or the user's (0). Each assistant turn is its text as the chat
    template writes it after the conversation so far (content, then its `tool_calls` in the template's format),
    tokenized as a response is (`datamodules.collate.encode_response`), then the stop token the template writes after
    it (EOS for most models, Gemma's `<end_of_turn>`, GLM's `<|observation|>` after a call); each run of tool results
    is the
    `tool_suffix` a rollout appends, each user message the `user_suffix` a simulated user's gets. So a trace's tokens
    and masks are those of the rollout that would produce it (tested), and SFT trains on the assistant's turns.
    `template_kwargs`: the data's `chat_template_kwargs`, for every rendering.

    Example (Hermes template): [assistant calling add(2, 3), tool "5", assistant "5."] -> ids of
    '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' + EOS (1s), of the suffix
    '\\n<|im_start|>user\\n<tool_response>5</tool_response><|im_end|>\\n<|im_start|>assistant\\n' (0s), of '5.' + EOS (1s);
    [assistant "4", user "Try again.", assistant "5"] -> ids of '4' + EOS (1s),
    '\\n<|im_start|>user\\nTry again.<|im_end|>\\n<|im_start|>assistant\\n' (0s), '5' + EOS (1s)."""
    context = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    ids, own, i = [], [], 0
    while i < len(messages):
        if messages[i]["role"] == "assistant":
            message = {**messages[i], "content": messages[i].get("content") or ""}
            text, end = _turn(tokenizer, context, message, schemas, template_kwargs)
            turn = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
            ids, own, context, i = ids + turn, own + [1] * len(turn), context + [message], i + 1
            continue
        if messages[i]["role"] == "user":
            said = [{"role": "user", "content": messages[i]["content"]}]
            suffix, i = user_suffix(tokenizer, said[0]["content"], template_kwargs), i + 1
        else:
            said = []
            while i < len(messages) and messages[i]["role"] == "tool":
                said.append({"role": "tool", "name": messages[i].get("name") or "tool", "content": messages[i]["content"]})
                i += 1
            suffix = tool_suffix(tokenizer, said, template_kwargs)
        ids, own, context = ids + suffix, own + [0] * len(suffix), context + said
    return ids, own


def _turn(tokenizer, context: list[dict], message: dict, schemas: list[dict] | None,
          template_kwargs: dict | None = None) -> tuple[str, int]:
    """(the text the chat template writes for assistant `message` after `context` and its generation prompt, the
    stop token it ends the turn with): the first of `stop_ids` it writes there (GLM's <|observation|> after a call,
    <|user|> after an answer; EOS or the end of a turn for most)."""
    kw = template_kwargs or {}
    before = tokenizer.apply_chat_template(context, tools=schemas, add_generation_prompt=True, tokenize=False, **kw)
    after = tokenizer.apply_chat_template(context + [message], tools=schemas, tokenize=False, **kw)
    stops = stop_ids(tokenizer)
    found = [(after.find(token, len(before)), i) for token, i in zip(tokenizer.convert_ids_to_tokens(stops), stops)]
    found = sorted((at, i) for at, i in found if at >= 0) if after.startswith(before) else []
    if not found:
        written = ", ".join(map(repr, tokenizer.convert_ids_to_tokens(stops)))
        raise DataError("the chat template does not write an assistant turn as the generation prompt followed by "
                        f"the turn and a stop token ({written}), so a trace's turns cannot be laid out as a rollout's "
                        "(a template that drops an earlier turn's reasoning, as gpt-oss's does once an answer follows "
                        "a call: set data chat_template to one of configs/chat_templates/)")
    return after[len(before):found[0][0]], found[0][1]
