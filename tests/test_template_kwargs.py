"""Data `chat_template_kwargs` (TRL's `chat_template_kwargs`, veRL's `apply_chat_template_kwargs`): further
variables for the chat template wherever it renders the policy's conversations (prompts, SFT traces, tool results
and a simulated user's messages in rollouts), e.g. Qwen3's `enable_thinking: false`."""
import json

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt, pad
from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, LocalFiles
from datamodules.tools import Tools, encode_trace, tool_suffix, user_suffix
from modules.sampling import SamplingConfig, generate_with_tools
from tests.helpers import HERMES_TEMPLATE, RecordsContexts, add, with_template
from tests.test_tools import hermes, scripted, tool_config, tool_dir  # noqa: F401  (fixtures)
from tests.test_user_turns import RETRY, ScriptedPupil, Tutor

# Qwen3's switch, written into the Hermes template: with enable_thinking false every assistant turn, the one the
# generation prompt opens included, starts with an empty think block, so the policy answers at once. (Qwen3's own
# template drops the block from turns before the last user message, so it cannot lay out several turns as one
# rollout: the data stops on that in one line, as for any template that rewrites earlier turns.)
SKIP = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
THINKING = (HERMES_TEMPLATE
            .replace("{% if add_generation_prompt %}<|im_start|>assistant\n", "{% if add_generation_prompt %}"
                     "<|im_start|>assistant\n" + SKIP)
            .replace("<|im_start|>assistant\n{{ message.content }}", "<|im_start|>assistant\n" + SKIP
                     + "{{ message.content }}")
            .replace("{% else %}<|im_start|>{{ message.role }}\n", "{% else %}<|im_start|>{{ message.role }}\n"
                     "{% if message.role == 'assistant' %}" + SKIP + "{% endif %}"))
EMPTY_THINK = "<think>\n\n</think>\n\n"
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def thinking(hermes):  # noqa: F811
    return with_template(hermes, THINKING)


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory, tool_dir, thinking):  # noqa: F811
    """The tiny tool policy with the thinking template."""
    from transformers import AutoModelForCausalLM

    from modules.export import save_pretrained

    path = str(tmp_path_factory.mktemp("thinking") / "sft")
    save_pretrained(AutoModelForCausalLM.from_pretrained(tool_dir), thinking, path)
    return path


def test_every_rendering_gets_the_variables(thinking):
    """The prompt, a tool result's suffix and a user message's suffix each end with the empty think block with
    enable_thinking false, and are otherwise the template's plain rendering."""
    plain, off = encode_prompt(thinking, "What is 2 + 3?"), encode_prompt(thinking, "What is 2 + 3?", None, OFF)
    assert thinking.decode(off) == thinking.decode(plain) + EMPTY_THINK
    for suffix in (lambda kw: user_suffix(thinking, RETRY, kw),
                   lambda kw: tool_suffix(thinking, [{"role": "tool", "name": "add", "content": "5"}], kw)):
        assert thinking.decode(suffix(OFF)) == thinking.decode(suffix(None)) + EMPTY_THINK


def test_a_trace_with_the_variables_is_laid_out_as_the_rollout_with_them(thinking):
    """A tutored rollout with enable_thinking false (every turn's context opened by the empty think block) has the
    tokens and mask of the SFT trace of its conversation encoded with the same variables."""
    tools = Tools(environment=Tutor, max_user_turns=2)
    prompts = ["What is 2 + 3?", "Add two and three."]
    ids, mask = pad([encode_prompt(thinking, p, tools.schemas, OFF) for p in prompts], thinking.pad_token_id, "left")
    roll = generate_with_tools(scripted(thinking, ["4", "4", "5"])[0], tools, thinking, ids, mask, prompts,
                               SamplingConfig(max_new_tokens=200), 1, {"answer": [5, 4]}, template_kwargs=OFF)
    got, own = encode_trace(thinking, prompts[0], roll.messages[0], tools.schemas, OFF)
    assert roll.response_ids[0, :len(got)].tolist() == got and roll.response_mask[0, :len(got)].tolist() == own
    assert thinking.decode([t for t, o in zip(got, own) if not o]).count(EMPTY_THINK) == 2
    assert encode_trace(thinking, prompts[0], roll.messages[0], tools.schemas)[0] != got


def write(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_data_renders_prompts_and_traces_with_them(tmp_path, thinking_dir, thinking):
    """PairDataModule(chat_template_kwargs): its prompt ids are the template's with the variables, and so are an
    SFT trace's, with tools (the schemas checked with them too)."""
    trace = [{"role": "assistant", "content": "4"}, {"role": "user", "content": RETRY},
             {"role": "assistant", "content": "5"}]
    path = write(tmp_path, [{"prompt": "What is 2 + 3?", "chosen": trace}] * 2)
    for tools in (None, Tools(functions=[add])):
        data = PairDataModule(LocalFiles(path), tokenizer=thinking_dir, chosen_only=True, max_prompt_length=200,
                              max_length=300, tools=tools, chat_template_kwargs=OFF)
        data.setup("fit")
        example = data.splits["train"][0]
        schemas = tools.schemas if tools else None
        assert example["prompt_ids"] == encode_prompt(thinking, "What is 2 + 3?", schemas, OFF)
        assert thinking.decode(example["prompt_ids"]).endswith(EMPTY_THINK)
        ids, own = encode_trace(thinking, "What is 2 + 3?", trace, schemas, OFF)
        assert example["chosen_ids"] == ids and example["chosen_own"] == own


def test_variables_that_would_change_nothing_or_clash_are_one_line(tmp_path, thinking_dir, task_tokenizer_path):
    path = write(tmp_path, [{"prompt": "the cafe", "chosen": "good", "rejected": "bad"}] * 2)
    with pytest.raises(ValueError, match=r"^PairDataModule: chat_template_kwargs sets \['add_generation_prompt', "
                                         r"'tools'\], which the stages set themselves; expected the template's own"):
        PairDataModule(LocalFiles(path), chat_template_kwargs={"tools": [], "add_generation_prompt": False})
    with pytest.raises(DataError, match=r"^data chat_template_kwargs: the chat template of \S+ never reads "
                                        r"\['enable_thinkng'\]; expected names it uses \(it reads \[.*"
                                        r"'enable_thinking'.*\]\)$"):
        PairDataModule(LocalFiles(path), tokenizer=thinking_dir, chat_template_kwargs={"enable_thinkng": False}).setup()
    with pytest.raises(DataError, match=r"^data chat_template_kwargs: tokenizer \S+ has no chat template, so "
                                        r"\['enable_thinking'\] would change nothing"):
        PairDataModule(LocalFiles(path), tokenizer=task_tokenizer_path, chat_template_kwargs=OFF).setup()


class ThinkingPupil(RecordsContexts, ScriptedPupil):
    """ScriptedPupil that records the decoded context of each of its later turns."""

    contexts: list[str] = []


@pytest.mark.slow
def test_rl_rollouts_render_the_users_messages_with_them_end_to_end(tmp_path, thinking_dir):
    """P3O from YAML with `chat_template_kwargs: {enable_thinking: false}` and the Tutor: the turn after a user
    message sees the empty think block where the prompt opens the first turn and again where the user's message
    opens its own."""
    from tests.test_template_kwargs import ThinkingPupil as Pupil  # (the class the config names, by that path)
    from train import cli_main

    config = yaml.safe_load(open(tool_config(tmp_path, thinking_dir, engine="tests.test_template_kwargs.ThinkingPupil")))
    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}], "answer": 5} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config["data"]["init_args"].update({"tools": {"environment": "tests.test_user_turns.Tutor", "max_user_turns": 1},
                                        "reward_fields": ["answer"], "chat_template_kwargs": OFF})
    config["model"]["init_args"]["reward"] = "modules.rewards.environment_reward"
    config["trainer"]["callbacks"][1]["init_args"]["reward"] = "tests.test_user_turns.tutored"
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    Pupil.contexts = []
    cli = cli_main(["fit", "--config", str(tmp_path / "rl.yaml")])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert Pupil.contexts and all(
        c.count(EMPTY_THINK) == 2 and c.endswith(f"{RETRY}<|im_end|>\n<|im_start|>assistant\n{EMPTY_THINK}")
        for c in Pupil.contexts)


# Qwen3's behaviour, written small: an assistant turn after the last user message carries an empty think block, an
# earlier one does not, so a user message after a turn rewrites that turn.
REWRITES = ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = "
            "loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == "
            "'assistant' and loop.index0 > ns.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
            "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_a_template_that_rewrites_earlier_turns_takes_single_turns_and_refuses_several_in_one_line(hermes):  # noqa: F811
    """With such a template (Qwen3's kind), enable_thinking false opens the prompt's turn with the empty block, and
    a single response is laid out as the template writes it; a simulated user's message cannot be appended to a
    generated turn (its rendering would rewrite that turn), which stops in one line, at the data's check."""
    tokenizer = with_template(hermes, REWRITES)
    assert tokenizer.decode(encode_prompt(tokenizer, "q", None, OFF)).endswith("assistant\n" + EMPTY_THINK)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"}],
                                          tokenize=False)
    assert whole == tokenizer.decode(encode_prompt(tokenizer, "q", None, OFF)) + "4<|im_end|>\n"
    with pytest.raises(DataError, match=r"^the chat template of \S+ renders an assistant turn differently when a user "
                                        r"message follows it, so a user message cannot be appended to a generated "
                                        r"turn; set data chat_template to"):
        Tools(environment=Tutor).check_template(tokenizer, OFF)
