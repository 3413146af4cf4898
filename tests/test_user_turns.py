"""A simulated user (veRL's interactions): an environment's `respond(messages)` answers each policy turn that ends
without a tool call with the user's next message, or None to end the conversation (`datamodules.tools.Tools`,
`modules.sampling.generate_with_tools`)."""
import json
import time

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt, pad
from datamodules.sources import DataError
from datamodules.tools import Tools, environment_methods, user_suffix
from modules.engines import Sampler
from modules.rewards import awaited, environment_reward
from modules.sampling import SamplingConfig, generate_with_tools, rollout_of
from tests.helpers import Counter
from tests.test_tools import hermes, scripted, sft_config, tool_config, tool_dir  # noqa: F401  (fixtures)

RETRY = "Not quite. Try again."


class Tutor:
    """A simulated user holding the record's `answer`: a turn without it gets RETRY, a turn with it ends the
    conversation. Its reward: 1 / the attempts it took (0 unsolved)."""

    def reset(self, answer: int = 5) -> None:
        self.answer, self.retries, self.solved, self.seen = str(answer), 0, False, []

    def respond(self, messages: list[dict]) -> str | None:
        self.seen.append([m["role"] for m in messages])
        if self.answer in messages[-1]["content"]:
            self.solved = True
            return None
        self.retries += 1
        return RETRY

    def get_reward(self) -> float:
        return 1.0 / (1 + self.retries) if self.solved else 0.0


class CountingTutor(Counter):
    """Counter's `add` tool, and a tutor that wants 5."""

    def respond(self, messages: list[dict]) -> str | None:
        return None if "5" in messages[-1]["content"] else RETRY


class AsyncTutor(Tutor):
    """The Tutor as a coroutine (a simulator that awaits a model or a server), its argument named otherwise."""

    async def respond(self, conversation: list[dict]) -> str | None:
        return Tutor.respond(self, conversation)


class Rude(Tutor):
    def respond(self, messages):
        raise ConnectionError("simulator down")


class Numeric(Tutor):
    def respond(self, messages):
        return 3


class Slow(Tutor):
    def respond(self, messages):
        time.sleep(5)


class Silent:
    def reset(self) -> None:
        pass


def test_user_suffix_is_what_the_template_puts_between_a_turn_and_the_next(hermes):  # noqa: F811
    """ChatML: after the turn's <|im_end|>, the user's message as a user turn and the next assistant header; the
    conversation rendered whole with the generation prompt ends with the same tokens."""
    suffix = hermes.decode(user_suffix(hermes, RETRY))
    assert suffix == f"\n<|im_start|>user\n{RETRY}<|im_end|>\n<|im_start|>assistant\n"
    whole = hermes.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"},
                                        {"role": "user", "content": RETRY}], add_generation_prompt=True, tokenize=False)
    assert whole.endswith("4<|im_end|>" + suffix)


def test_respond_is_not_a_tool_and_the_config_is_checked(hermes):  # noqa: F811
    """`respond` is no tool (nor are reset and get_reward); an environment that is only a simulated user needs no
    functions and its prompts carry no schemas, and its template is checked for user turns alone; max_user_turns
    below 0, and an environment with neither tools nor respond (and no functions), are one line each."""
    assert list(environment_methods(CountingTutor())) == ["add"]
    tutor = Tools(environment=Tutor)
    assert tutor.schemas == [] and tutor.user_classes == {Tutor}
    tutor.check_template(hermes)
    assert encode_prompt(hermes, "q", tutor.schemas) == encode_prompt(hermes, "q")
    assert Tools(environment=CountingTutor).user_classes == {CountingTutor}
    assert Tools(environment=Counter).user_classes == set()
    with pytest.raises(ValueError, match=r"^Tools: max_user_turns=-1; expected >= 0"):
        Tools(environment=Tutor, max_user_turns=-1)
    with pytest.raises(ValueError, match=r"^Tools: environment \S*Silent has no tool methods and no respond method, "
                                         r"and there are no functions: nothing for the policy to call or talk to$"):
        Tools(environment=Silent)


def prompts_and_ids(hermes, tools):  # noqa: F811
    prompts = ["What is 2 + 3?", "Add two and three."]
    ids, mask = pad([encode_prompt(hermes, p, tools.schemas) for p in prompts], hermes.pad_token_id, "left")
    return prompts, ids, mask


@pytest.mark.parametrize("tutor", [Tutor, AsyncTutor])
@pytest.mark.parametrize("max_user_turns", [1, 2])
def test_a_wrong_turn_gets_the_users_message_and_the_next_turn_answers_it(hermes, max_user_turns, tutor):  # noqa: F811
    """Every turn answers "4", "4", then "5" (scripted); the tutor wants 5 (prompt 0) or 4 (prompt 1). Prompt 1's
    responses end after their first turn (respond said None). Prompt 0's get RETRY as a user turn after each wrong
    turn, up to max_user_turns: with 2, their third turn says 5 and respond ends them; with 1, their second turn
    ("4") ends them, respond having seen it (its RETRY dropped). The user's messages are context (attention 1,
    response mask 0, logprob 0) between the turns, laid out as the chat template writes the conversation; respond
    saw the messages so far; the rollout counts the user's messages, and the reward reads the tutors. The same with
    an `async def respond` whose argument has another name (it is passed by position)."""
    tools = Tools(environment=tutor, max_user_turns=max_user_turns)
    generate, calls = scripted(hermes, ["4", "4", "5"])
    prompts, ids, mask = prompts_and_ids(hermes, tools)
    roll = generate_with_tools(generate, tools, hermes, ids, mask, prompts, SamplingConfig(max_new_tokens=200), 2,
                               {"answer": [5, 4]})
    turn = hermes("4", add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    suffix = user_suffix(hermes, RETRY)
    wrong = [{"role": "assistant", "content": "4"}, {"role": "user", "content": RETRY}]
    for row in (2, 3):
        assert roll.messages[row] == [{"role": "assistant", "content": "4"}]
        assert roll.environments[row].seen == [["assistant"]] and roll.environments[row].get_reward() == 1.0
    for row in (0, 1):
        env = roll.environments[row]
        if max_user_turns == 2:
            assert roll.messages[row] == wrong * 2 + [{"role": "assistant", "content": "5"}]
            assert env.seen == [["assistant"], ["assistant", "user", "assistant"],
                                ["assistant", "user", "assistant", "user", "assistant"]]
            assert env.get_reward() == pytest.approx(1 / 3)
        else:
            assert roll.messages[row] == wrong + [{"role": "assistant", "content": "4"}]
            assert env.seen == [["assistant"], ["assistant", "user", "assistant"]] and env.get_reward() == 0.0
        n = len(turn) + len(suffix)
        assert roll.response_ids[row, :n].tolist() == turn + suffix
        assert roll.response_mask[row, :len(turn)].all() and not roll.response_mask[row, len(turn):n].any()
        assert roll.attention_mask[row, roll.prompt_length:][:n].all() and (roll.old_logp[row, len(turn):n] == 0).all()
        assert roll.old_logp[row, :len(turn)].eq(-1).all() and roll.old_logp[row, n] == -1
        assert roll.has_eos[row]
    text = hermes.decode(roll.input_ids[0][roll.attention_mask[0].bool()])
    conversation = [{"role": "user", "content": prompts[0]}] + roll.messages[0]
    assert text == hermes.apply_chat_template(conversation, tokenize=False).rstrip("\n")
    assert roll.timings["tools/user_turns"] == 2 * max_user_turns and roll.timings["tools/calls"] == 0
    assert len(calls) == 1 + max_user_turns and all(n == 2 and same for n, same, _ in calls[1:])
    assert awaited(environment_reward(roll.prompts, roll.responses, roll.environments))[2:] == [1.0, 1.0]


def test_a_conversation_trace_is_laid_out_as_the_rollout_that_would_produce_it(hermes):  # noqa: F811
    """SFT on a conversation (assistant "4", user RETRY, assistant "4", user RETRY, assistant "5"): its tokens and
    the policy's mask are the response ids and mask of the tutored rollout whose turns said those words, the
    user's messages outside the mask."""
    from datamodules.tools import encode_trace

    tools = Tools(environment=Tutor, max_user_turns=2)
    prompts, ids, mask = prompts_and_ids(hermes, tools)
    roll = generate_with_tools(scripted(hermes, ["4", "4", "5"])[0], tools, hermes, ids, mask, prompts,
                               SamplingConfig(max_new_tokens=200), 1, {"answer": [5, 4]})
    trace = roll.messages[0]
    assert [m["role"] for m in trace] == ["assistant", "user", "assistant", "user", "assistant"]
    got, own = encode_trace(hermes, prompts[0], trace, tools.schemas)
    assert roll.response_ids[0, :len(got)].tolist() == got and roll.response_mask[0, :len(got)].tolist() == own
    assert len(got) == int(roll.attention_mask[0, roll.prompt_length:].sum()) and 0 in own
    assert hermes.decode([t for t, o in zip(got, own) if not o]).count(RETRY) == 2


@pytest.mark.slow
def test_sft_trains_on_every_assistant_turn_of_a_conversation_from_trls_messages_layout(tmp_path, tool_dir):  # noqa: F811
    """SFT from YAML on records in TRL's `messages` layout (`datamodules.formats.Messages`), no data tools: each
    record's assistant turns are in the loss mask, the user's second message is not, and the step is finite."""
    from train import cli_main

    rows = [{"messages": [{"role": "user", "content": f"What is 2 + {i}?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": RETRY}, {"role": "assistant", "content": str(2 + i)}]}
            for i in range(8)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"class_path": "datamodules.sources.LocalFiles", "init_args": {"train": str(path), "val": str(path)}}
    source = {"class_path": "datamodules.formats.Messages", "init_args": {"source": files}}
    cli = cli_main(["fit", "--config", sft_config(tmp_path, tool_dir, source, max_prompt_length=100, max_length=200)])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    example = cli.datamodule.splits["train"][0]
    batch = next(iter(cli.datamodule.train_dataloader()))
    P, tokenizer = len(example["prompt_ids"]), cli.datamodule.tokenizer
    trained = batch.chosen.loss_mask[0, P: P + len(example["chosen_ids"])].tolist()
    assert trained == example["chosen_own"]
    ids = example["chosen_ids"]
    assert tokenizer.decode([t for t, o in zip(ids, trained) if not o]).count(RETRY) == 1
    assert tokenizer.decode([t for t, o in zip(ids, trained) if o]).count(tokenizer.eos_token) == 2


def test_rounds_of_calls_and_user_turns_interleave_each_counted_per_response(hermes):  # noqa: F811
    """CountingTutor (the `add` tool, a tutor wanting 5), max_turns 1: turns CALL, "4", CALL, "5". The first call
    runs (round 1), "4" gets RETRY, the second call is past max_turns, so it ends the response unanswered, and
    respond is not asked about a turn that calls. Tool results and user messages alike are outside the mask."""
    from tests.helpers import ScriptedFirstTurn

    tools = Tools(environment=CountingTutor, max_turns=1)
    generate, calls = scripted(hermes, [ScriptedFirstTurn.CALL, "4", ScriptedFirstTurn.CALL, "5"])
    prompts, ids, mask = prompts_and_ids(hermes, tools)
    roll = generate_with_tools(generate, tools, hermes, ids, mask, prompts, SamplingConfig(max_new_tokens=300), 1)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant", "user", "assistant"]
    assert roll.messages[0][1]["content"] == "5" and roll.messages[0][-1] == ScriptedFirstTurn.CALL_MESSAGE
    assert roll.timings["tools/calls"] == 2 and roll.timings["tools/user_turns"] == 2 and len(calls) == 3
    own = hermes.decode(roll.response_ids[0][roll.response_mask[0].bool()])
    assert RETRY not in own and "<tool_response>" not in own and own.count("<tool_call>") == 2


def test_a_user_message_that_leaves_no_room_ends_the_response(hermes):  # noqa: F811
    """max_new_tokens bounds the whole response: with room for the first turn and the user's message but not one
    more token, the response is the first turn (respond was asked, the message is dropped, none counted)."""
    tools = Tools(environment=Tutor)
    turn = hermes("4", add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    budget = len(turn) + len(user_suffix(hermes, RETRY))
    generate, calls = scripted(hermes, ["4", "5"])
    prompts, ids, mask = prompts_and_ids(hermes, tools)
    roll = generate_with_tools(generate, tools, hermes, ids, mask, prompts, SamplingConfig(max_new_tokens=budget), 1)
    assert roll.messages[0] == [{"role": "assistant", "content": "4"}] and roll.environments[0].retries == 1
    assert roll.timings["tools/user_turns"] == 0 and len(calls) == 1
    roomy = generate_with_tools(scripted(hermes, ["4", "5"])[0], tools, hermes, ids, mask, prompts,
                                SamplingConfig(max_new_tokens=budget + 1), 1)
    assert [m["role"] for m in roomy.messages[0]] == ["assistant", "user", "assistant"]


@pytest.mark.parametrize("env, message", [
    (Rude, r"Rude: respond raised ConnectionError: simulator down$"),
    (Numeric, r"Numeric: respond returned a int; expected the user's next message as a text, or None to end the "
              r"conversation$"),
    (Slow, r"Slow: respond took more than timeout=0.2 s$")])
def test_a_simulator_that_fails_stops_the_rollout_in_one_line(hermes, env, message):  # noqa: F811
    """The simulator's failure is not the policy's (unlike a tool call's, which the policy is shown): one line."""
    tools = Tools(environment=env, timeout=0.2)
    prompts, ids, mask = prompts_and_ids(hermes, tools)
    with pytest.raises(DataError, match=r"^data tools environment \S*" + message):
        generate_with_tools(scripted(hermes, ["4"])[0], tools, hermes, ids, mask, prompts,
                            SamplingConfig(max_new_tokens=50), 1)


class ScriptedPupil(Sampler):
    """A test engine whose first turn is always "4" and whose later turns "5" (then EOS); its recorded logprobs
    are not the policy's (`exact = False`: pi_old comes from a forward pass)."""

    exact = False

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples=1,
                 record_logprobs=False, share_prompts=True, same_weights=False):
        row = tokenizer("5" if same_weights else "4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response = torch.tensor([row] * (len(prompt_ids) * num_samples), device=prompt_ids.device)
        return rollout_of(prompt_ids.repeat_interleave(num_samples, 0), prompt_mask.repeat_interleave(num_samples, 0),
                          response, prompts, num_samples, tokenizer,
                          torch.zeros(response.shape, device=response.device) if record_logprobs else None)


def tutored(completions, environments, **kwargs) -> list[float]:
    """TRL-style, for evaluation: the tutor's reward."""
    return [env.get_reward() for env in environments]


@pytest.mark.slow
def test_rl_with_a_simulated_user_runs_end_to_end_from_yaml(tmp_path, tool_dir):  # noqa: F811
    """P3O from YAML with the Tutor as the only environment (no functions): records want 5 (even) or 4 (odd); every
    first turn says 4, every later one 5. So odd prompts end at once (reward 1), even ones after one user turn
    (reward 1/2): 0.5 user turns and a reward of 0.75 per response, in training and in evaluation, which runs the
    same loop; the update is finite."""
    from tests.test_judges import evaluation
    from train import cli_main

    config = yaml.safe_load(open(tool_config(tmp_path, tool_dir, engine="tests.test_user_turns.ScriptedPupil")))
    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + {3 - i % 2}? ({i})"}], "answer": 5 - i % 2}
            for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config["data"]["init_args"].update({"tools": {"environment": "tests.test_user_turns.Tutor", "max_user_turns": 2},
                                        "reward_fields": ["answer"]})
    config["model"]["init_args"]["reward"] = "modules.rewards.environment_reward"
    config["trainer"]["callbacks"][1]["init_args"]["reward"] = "tests.test_user_turns.tutored"
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(tmp_path / "rl.yaml")])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert float(metrics["train/user_turns"]) == pytest.approx(0.5)
    assert float(metrics["train/reward"]) == pytest.approx(0.75)
    assert float(metrics["train/tool_calls"]) == 0
    last = evaluation(cli).history[-1]
    assert last["val/user_turns"] == pytest.approx(0.5) and last["val/gold_reward"] == pytest.approx(0.75)
