"""Conversational data (TRL's format): prompts as lists of `{role, content}` messages through the chat template,
responses as one assistant message, and TRL-style rewards given completions as TRL gives them there."""
import json

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt, prompt_text
from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, LocalFiles
from modules.rewards import call_text_reward

# Every word below is in the review task's word-level vocabulary; the template adds ':' as the generation prompt.
TEMPLATE = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
CONVERSATION = [{"role": "system", "content": "the staff was friendly ."}, {"role": "user", "content": "the cafe"}]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, sft_dir):
    """The tiny SFT export with a chat template."""
    from transformers import AutoModelForCausalLM

    from modules.backbone import load_tokenizer
    from modules.export import save_pretrained

    tokenizer = load_tokenizer(sft_dir)
    tokenizer.chat_template = TEMPLATE
    path = str(tmp_path_factory.mktemp("chat") / "sft")
    save_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), tokenizer, path)
    return path


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_conversation_goes_through_the_chat_template_as_it_is(chat_dir):
    """A conversation's ids are the chat template's with the generation prompt; a text prompt stays one user turn;
    `prompt_text`'s docstring example."""
    from modules.backbone import load_tokenizer

    tokenizer = load_tokenizer(chat_dir)
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert encode_prompt(tokenizer, CONVERSATION) == expected
    assert tokenizer.decode(expected) == "the staff was friendly . the cafe :"
    assert encode_prompt(tokenizer, "the cafe") == encode_prompt(tokenizer, [{"role": "user", "content": "the cafe"}])
    assert prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "system: Be brief.\nuser: Hi"
    assert prompt_text("Hi") == "Hi"


def test_conversational_records_load_and_a_response_message_becomes_its_text(tmp_path, chat_dir):
    """Prompts as conversations, chosen / rejected as one assistant message each (TRL's conversational preference
    format): the records keep the conversation, the responses become text, and the ids are the template's."""
    rows = [{"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "the staff was friendly"}],
             "rejected": [{"role": "assistant", "content": "the cafe was"}]}] * 2
    data = PairDataModule(LocalFiles(write(tmp_path / "c.jsonl", rows)), tokenizer=chat_dir)
    data.setup("fit")
    example = data.splits["train"][0]
    assert example["prompt"] == CONVERSATION and example["chosen"] == "the staff was friendly"
    assert example["prompt_ids"] == encode_prompt(data.tokenizer, CONVERSATION)
    assert data.tokenizer.decode(example["chosen_ids"]) == "the staff was friendly <eos>"


@pytest.mark.parametrize("field, value, reason", [
    ("prompt", [], "an empty list of messages"),
    ("prompt", [{"role": "user"}], r"message 0 \(user\): content: expected text, got NoneType"),
    ("prompt", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
     r"message 0 \(user\): content: expected text, got list"),
    ("prompt", ["hello"], r"message 0: expected \{role: <text>, content: <text>\}, got 'hello'"),
    ("prompt", [{"role": "user", "content": " "}], r"message 0 \(user\): empty"),
    ("chosen", [{"role": "user", "content": "hi"}], r"a list of 1 items; expected a string, or one message \{role: "
                                                    r"assistant"),
    ("chosen", [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], r"a list of 2 items"),
    ("chosen", {"role": "assistant", "content": "a"}, r"expected a string or one assistant message, got dict"),
])
def test_a_malformed_conversation_is_one_line_naming_record_and_field(tmp_path, chat_dir, field, value, reason):
    rows = [{"prompt": "the cafe", "chosen": "good", "rejected": "bad"}, {"prompt": CONVERSATION, "chosen": "good",
                                                                         "rejected": "bad", field: value}]
    data = PairDataModule(LocalFiles(write(tmp_path / "c.jsonl", rows)), tokenizer=chat_dir)
    with pytest.raises(DataError, match=rf"c.jsonl: record 1: field '{field}': {reason}"):
        data.setup("fit")


def test_a_conversation_without_a_chat_template_is_one_line(tmp_path, sft_dir):
    rows = [{"prompt": CONVERSATION}] * 2
    data = PairDataModule(LocalFiles(write(tmp_path / "c.jsonl", rows)), tokenizer=sft_dir, prompts_only=True)
    with pytest.raises(DataError, match=r"c.jsonl: record 0: field 'prompt': a conversation \(a list of messages\) "
                                        r"needs a tokenizer with a chat template, and .* has none"):
        data.setup("fit")


def test_a_trl_reward_gets_conversational_completions_and_ours_gets_texts():
    """TRL gives a reward function on conversational data the prompts as message lists and each completion as
    `[{"role": "assistant", "content": text}]`; a reward written for texts gets the texts."""
    seen = {}

    def trl_reward(prompts, completions, **kwargs):
        seen["trl"] = (prompts, completions)
        return [0.0] * len(completions)

    def ours(prompts, responses):
        seen["ours"] = responses
        return [0.0] * len(responses)

    call_text_reward(trl_reward, [CONVERSATION], ["fine"], {})
    call_text_reward(ours, [CONVERSATION], ["fine"], {})
    assert seen["trl"] == ([CONVERSATION], [[{"role": "assistant", "content": "fine"}]]) and seen["ours"] == ["fine"]
    call_text_reward(trl_reward, ["the cafe"], ["fine"], {})
    assert seen["trl"] == (["the cafe"], ["fine"])


def conversational_length(prompts, completions, **kwargs):
    """A TRL-style reward for the end-to-end run: it refuses anything but TRL's conversational shapes."""
    assert all(isinstance(p, list) and p[0]["role"] == "system" for p in prompts), prompts
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions), completions
    return [float(len(c[0]["content"].split())) for c in completions]


def test_p3o_trains_on_conversational_prompts_end_to_end(tmp_path, chat_dir):
    """The quickstart P3O config on a file of conversations (a system turn, then the user's), a TRL-style reward
    that checks it gets TRL's conversational shapes, and an evaluation that shows the samples."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from tests.test_judges import evaluation
    from train import cli_main

    rows = [{"prompt": [CONVERSATION[0], {"role": "user", "content": f"the {place}"}]}
            for place in ("cafe", "hotel", "zoo", "park", "gym", "bar", "spa", "museum")]
    config = yaml.safe_load(open("configs/quickstart/p3o.yaml"))
    config["trainer"].update({"limit_train_batches": 2, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "callbacks": [
                                  {"class_path": "callbacks.rollout.OnPolicyRollout"},
                                  {"class_path": "callbacks.evaluation.Evaluation", "init_args": {
                                      "reward": "tests.test_conversations.conversational_length", "num_prompts": 4,
                                      "show": 2}}]})
    config["model"]["init_args"].update({"policy": {"pretrained": chat_dir}, "sampling": {"max_new_tokens": 8},
                                         "reward": "tests.test_conversations.conversational_length", "epochs": 1,
                                         "minibatch_groups": 2})
    path = write(tmp_path / "conversations.jsonl", rows)
    config["data"]["init_args"].update({"source": {"class_path": "datamodules.sources.LocalFiles",
                                                   "init_args": {"train": path, "val": path}},
                                        "tokenizer": chat_dir, "batch_size": 4, "max_prompt_length": 16})
    (tmp_path / "p3o.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(tmp_path / "p3o.yaml")])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert evaluation(cli).history[-1]["val/gold_reward"] >= 0
    initial = build_causal_lm(BackboneSpec(pretrained=chat_dir), cli.model.tokenizer).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in cli.model.policy.state_dict().items())


def test_an_evaluation_reward_or_judge_named_by_its_import_path_is_resolved_or_refused_in_one_line():
    """`reward: mymodule.function` in the Evaluation callback (an untyped field, which jsonargparse leaves a
    string): the function, as the RL module's reward is; before, a 'str' object is not callable traceback at the
    first evaluation."""
    from callbacks.evaluation import Evaluation
    from modules.checks import ConfigError

    found = Evaluation(reward="tests.test_conversations.conversational_length").reward
    assert callable(found) and found.__name__ == "conversational_length"
    with pytest.raises(ConfigError, match=r"Evaluation: judge='tests.test_conversations.nothing' does not import"):
        Evaluation(judge="tests.test_conversations.nothing")
    with pytest.raises(ConfigError, match=r"Evaluation: reward='tests.test_conversations.TEMPLATE' is a str, not "
                                          r"callable"):
        Evaluation(reward="tests.test_conversations.TEMPLATE")


def test_sft_trains_on_conversational_demonstrations_end_to_end(tmp_path, chat_dir):
    """The quickstart SFT config on records in TRL's conversational format, `chosen` as one assistant message
    (`chosen_only`): two epochs on 8 records train to a finite loss, the export is written, and each chosen message
    is read as its text."""
    from train import cli_main

    rows = [{"prompt": [CONVERSATION[0], {"role": "user", "content": f"the {place}"}],
             "chosen": [{"role": "assistant", "content": f"the {place} was friendly ."}]}
            for place in ("cafe", "hotel", "zoo", "park", "gym", "bar", "spa", "museum")]
    path = write(tmp_path / "demos.jsonl", rows)
    config = yaml.safe_load(open("configs/quickstart/sft.yaml"))
    config["trainer"].update({"max_epochs": 2, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "log_every_n_steps": 1, "callbacks": [
                                  {"class_path": "callbacks.export.HFExport",
                                   "init_args": {"dirpath": str(tmp_path / "export")}}]})
    config["model"]["init_args"]["backbone"] = {"pretrained": chat_dir}
    config["data"]["init_args"].update({"source": {"class_path": "datamodules.sources.LocalFiles",
                                                   "init_args": {"train": path, "val": path}},
                                        "tokenizer": chat_dir, "batch_size": 4, "chosen_only": True,
                                        "max_prompt_length": 16})
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(tmp_path / "sft.yaml")])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert (tmp_path / "export" / "config.json").exists()
    assert cli.datamodule.splits["train"][0]["chosen"] == "the cafe was friendly ."
