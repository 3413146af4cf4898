"""Data `chat_template` (TRL's `chat_template_path`, veRL's `custom_chat_template`): a template in place of the
tokenizer's, in the stage and its export; and `configs/chat_templates/qwen3_training.jinja`, Qwen3's template
for rollouts with tools or a simulated user. `tests/templates/qwen3.jinja` is Qwen3's own template, as its
checkpoints ship it (Qwen/Qwen3-0.6B's tokenizer_config.json)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt
from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, LocalFiles
from datamodules.tools import Tools, encode_trace, tool_suffix, user_suffix
from tests.helpers import RecordsContexts, ScriptedToolCalls, add, with_template
from tests.test_tools import hermes, tool_config, tool_dir  # noqa: F401  (fixtures)

QWEN3 = Path("tests/templates/qwen3.jinja").read_text()
TRAINING_PATH = "configs/chat_templates/qwen3_training.jinja"
TRAINING = Path(TRAINING_PATH).read_text()
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
RESULT = {"role": "tool", "name": "add", "content": "5"}
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3(hermes):  # noqa: F811
    """SmolLM2's tokenizer (ChatML, EOS <|im_end|>) with Qwen3's own template."""
    return with_template(hermes, QWEN3)


@pytest.fixture(scope="module")
def training(hermes):  # noqa: F811
    """The same tokenizer with the training variant."""
    return with_template(hermes, TRAINING)


def test_qwen3s_template_is_refused_with_tools_or_a_user_in_one_line_naming_the_fix(qwen3):
    """Qwen3's own template writes an assistant turn with an empty think block when it is the last one, without
    it when a tool result or a user message follows, so neither can be appended to a generated turn."""
    from tests.test_user_turns import Tutor

    for tools, what in ((Tools(functions=[add]), "a tool result"), (Tools(environment=Tutor), "a user message")):
        with pytest.raises(DataError, match=rf"^the chat template of \S+ renders an assistant turn differently when "
                                            rf"{what} follows it, so {what} cannot be appended to a generated turn; "
                                            r"set data chat_template to a template that renders earlier turns the same "
                                            r"whatever follows them \(configs/chat_templates/ has Qwen3's, "
                                            r"Qwen3\.5's, GLM-4\.5's, gpt-oss's and Gemma 4's; Qwen3\.6's and "
                                            r"LFM2\.5's own do with chat_template_kwargs "
                                            r"\{preserve_thinking: true\}, Nemotron 3's with "
                                            r"\{truncate_history_thinking: false\}\)$"):
            tools.check_template(qwen3)


def test_the_training_template_appends_qwen3s_tool_and_user_messages(training):
    """With the training variant, the checks pass, and the suffixes are Qwen3's own wrapping of a tool result and of
    a user message (and with enable_thinking false, the empty think block that opens the next turn)."""
    from tests.test_user_turns import Tutor

    Tools(functions=[add]).check_template(training)
    Tools(environment=Tutor).check_template(training)
    assert training.decode(tool_suffix(training, [RESULT])) == \
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert training.decode(user_suffix(training, "Try again.")) == \
        "\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"
    off = {"enable_thinking": False}
    assert training.decode(tool_suffix(training, [RESULT], off)).endswith("<|im_start|>assistant\n" + EMPTY_THINK)


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2 + 3?"}
LAST_TURNS = [{"role": "assistant", "content": "5"},
              {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
              {"role": "assistant", "content": "5", "reasoning_content": "add them"},
              CALL]


@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_the_training_template_writes_prompts_and_last_turns_as_qwen3s_own(qwen3, training, tools, thinking):
    """A prompt (a user message, after a system one or not; with tool schemas or not; enable_thinking unset, true or
    false) and a conversation's last assistant turn (an answer, one with its reasoning in its text or in
    `reasoning_content`, a call) are written by the training variant exactly as by Qwen3's own; so is a multi-step
    tool conversation whose earlier turns have reasoning."""
    kw = {"tools": Tools(functions=[add]).schemas if tools else None,
          **({} if thinking is None else {"enable_thinking": thinking})}
    for prompt in ([USER], [SYSTEM, USER]):
        same = [qwen3.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kw),
                training.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kw)]
        assert same[0] == same[1]
        for last in LAST_TURNS:
            whole = [t.apply_chat_template(prompt + [last], tokenize=False, **kw) for t in (qwen3, training)]
            assert whole[0] == whole[1]
    steps = [USER, {**CALL, "reasoning_content": "call add"}, RESULT, {"role": "assistant", "content": "5"}]
    assert qwen3.apply_chat_template(steps, tokenize=False, **kw) == training.apply_chat_template(steps, tokenize=False,
                                                                                                   **kw)


def test_the_training_template_keeps_the_think_block_where_qwen3s_drops_it(qwen3, training):
    """Where they differ, and why: a call turn followed by its result is written with its empty think block (as it
    was generated after the prompt), where Qwen3's own drops it; so is an answer before a later user message."""
    for conversation in ([USER, CALL, RESULT], [USER, {"role": "assistant", "content": "4"},
                                                {"role": "user", "content": "Try again."}]):
        ours, theirs = (t.apply_chat_template(conversation, tokenize=False) for t in (training, qwen3))
        assert ours.count(EMPTY_THINK) == 1 and theirs.count(EMPTY_THINK) == 0
        assert ours.replace(EMPTY_THINK, "") == theirs


def test_a_trace_with_the_training_template_is_laid_out_with_qwen3s_think_blocks(training):
    """SFT on a tool-use trace with the training variant: each assistant turn with its empty think block and EOS
    (the policy's), Qwen3's tool wrapping between (not)."""
    schemas = Tools(functions=[add]).schemas
    ids, own = encode_trace(training, "What is 2 + 3?", [CALL, RESULT, {"role": "assistant", "content": "5."}], schemas)
    policy = training.decode([t for t, o in zip(ids, own) if o])
    assert policy == (EMPTY_THINK + '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
                      "<|im_end|>" + EMPTY_THINK + "5.<|im_end|>")
    assert training.decode([t for t, o in zip(ids, own) if not o]) == training.decode(tool_suffix(training, [RESULT]))


def write(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_data_reads_a_file_or_the_template_itself_and_says_what_is_wrong_in_one_line(tmp_path, tool_dir):  # noqa: F811
    """A file's template and the same text given inline render the prompts alike (and replace the tokenizer's); a
    missing file and a template Jinja cannot compile are one line each."""
    path = write(tmp_path, [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "4"}] * 2)
    prompts = []
    for template in (TRAINING_PATH, TRAINING):
        data = PairDataModule(LocalFiles(path), tokenizer=tool_dir, max_prompt_length=200, max_length=300,
                              chat_template=template)
        data.setup("fit")
        assert data.tokenizer.chat_template == TRAINING
        prompts.append(data.splits["train"][0]["prompt_ids"])
    assert prompts[0] == prompts[1] == encode_prompt(data.tokenizer, "What is 2 + 3?")
    with pytest.raises(ValueError, match=r"^PairDataModule: chat_template 'nowhere\.jinja': No such file or directory; "
                                         r"expected a Jinja chat template file \(or the template itself, holding "):
        PairDataModule(LocalFiles(path), chat_template="nowhere.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(DataError, match=r"^data chat_template: line 2: unexpected '}'$"):
        PairDataModule(LocalFiles(path), tokenizer=tool_dir, chat_template=str(broken)).setup("fit")


class RecordingToolCalls(RecordsContexts, ScriptedToolCalls):
    """ScriptedToolCalls that records the decoded context of each later turn."""

    contexts: list[str] = []


@pytest.mark.slow
def test_rl_with_tools_on_qwen3s_training_template_end_to_end_and_its_export_keeps_it(tmp_path, tool_dir):  # noqa: F811
    """P3O from YAML with data tools and `chat_template: configs/chat_templates/qwen3_training.jinja` over a
    tokenizer whose own template is another: the rollouts' later turns see Qwen3's tool wrapping of the result, the
    reward sees the results, the step is finite, and the export's tokenizer carries the training template."""
    from tests.test_chat_template import RecordingToolCalls as Recording  # (the class the config names, by that path)
    from train import cli_main

    config = yaml.safe_load(open(tool_config(tmp_path, tool_dir, engine="tests.test_chat_template.RecordingToolCalls")))
    config["data"]["init_args"].update({"chat_template": TRAINING_PATH, "max_prompt_length": 260, "max_length": 330})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    Recording.contexts = []
    cli = cli_main(["fit", "--config", str(tmp_path / "rl.yaml")])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and float(metrics["train/reward"]) == pytest.approx(0.5)
    assert Recording.contexts and all(
        c.endswith(ScriptedToolCalls.CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>"
                   "<|im_end|>\n<|im_start|>assistant\n") and "# Tools" in c for c in Recording.contexts)
    from transformers import AutoTokenizer

    assert cli.model.tokenizer.chat_template == TRAINING
    cli.model.export(str(tmp_path / "export"))
    assert AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == TRAINING


def test_sft_on_tool_traces_with_the_template_trains_on_its_layout_and_exports_it(tmp_path, tool_dir, training):  # noqa: F811
    """SFT from YAML on tool-use traces with `chat_template` (the policy's own template another): the records are
    encoded with the training variant, the step is finite, and the export carries the template the RL stage then
    reads from it."""
    from transformers import AutoTokenizer

    from tests.test_tools import sft_config
    from train import cli_main

    trace = [CALL, RESULT, {"role": "assistant", "content": "5."}]
    path = write(tmp_path, [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}], "chosen": trace}
                            for i in range(8)])
    source = {"class_path": "datamodules.sources.LocalFiles", "init_args": {"train": path, "val": path}}
    cli = cli_main(["fit", "--config", sft_config(tmp_path, tool_dir, source, max_prompt_length=260, max_length=360,
                                                  tools={"functions": ["tests.helpers.add"]},
                                                  chat_template=TRAINING_PATH)])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    example = cli.datamodule.splits["train"][0]
    prompt = [{"role": "user", "content": "What is 2 + 3? (0)"}]
    schemas = Tools(functions=[add]).schemas
    assert example["prompt_ids"] == encode_prompt(training, prompt, schemas)
    assert (example["chosen_ids"], example["chosen_own"]) == encode_trace(training, prompt, trace, schemas)
    cli.model.export(str(tmp_path / "export"))
    assert AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == TRAINING


@pytest.mark.parametrize("variant", ["think", "nothink"])
def test_qwen3_5s_training_templates_take_a_user_and_write_what_qwen3_5s_own_write(hermes, variant):  # noqa: F811
    """Qwen3.5's own templates (`tests/templates/qwen3_5_<variant>.jinja`) take tools (tool results do not move the
    last user message) but refuse a simulated user; the training variants take both. They write prompts (system or
    not, tools or not, `enable_thinking` unset / true / false) and conversations whose assistant turns all follow the
    last user message (answers, reasoning, calls, a multi-step tool exchange) exactly as Qwen3.5's own, and an
    answer before a later user message with its (empty) think block, where Qwen3.5's own drops it."""
    from tests.test_user_turns import Tutor

    own = with_template(hermes, Path(f"tests/templates/qwen3_5_{variant}.jinja").read_text())
    ours = with_template(hermes, Path(f"configs/chat_templates/qwen3_5_{variant}_training.jinja").read_text())
    Tools(functions=[add]).check_template(own)
    with pytest.raises(DataError, match=r"renders an assistant turn differently when a user message follows it"):
        Tools(environment=Tutor).check_template(own)
    Tools(functions=[add]).check_template(ours)
    Tools(environment=Tutor).check_template(ours)
    for tools in (None, Tools(functions=[add]).schemas):
        for thinking in (None, True, False):
            kw = {"tools": tools, **({} if thinking is None else {"enable_thinking": thinking})}
            for prompt in ([USER], [SYSTEM, USER]):
                assert own.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kw) == \
                    ours.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kw)
                for tail in [[last] for last in LAST_TURNS] + [[{**CALL, "reasoning_content": "add"}, RESULT,
                                                                {"role": "assistant", "content": "5"}]]:
                    assert own.apply_chat_template(prompt + tail, tokenize=False, **kw) == \
                        ours.apply_chat_template(prompt + tail, tokenize=False, **kw)
    earlier = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Try again."}]
    theirs, mine = own.apply_chat_template(earlier, tokenize=False), ours.apply_chat_template(earlier, tokenize=False)
    assert mine.count(EMPTY_THINK) == 1 and theirs.count(EMPTY_THINK) == 0
