"""Tool use in rollouts (`datamodules.tools`, `modules.sampling.generate_with_tools`; TRL's `tools`): parsing and
running calls, the tool results' tokens, the multi-turn rollout's layout (the policy's tokens trained, the tool
results context only), GAE across a tool result, and runs end to end from a YAML config."""
import asyncio
import json
import threading
import time

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt, pad, turn_end_id
from datamodules.sources import DataError
from datamodules.tools import Tools, call_blocks, parse_calls, run_call, tool_suffix
from modules.sampling import generate_with_tools
from tests.conftest import TINY
from tests.helpers import HERMES_TEMPLATE, ScriptedToolCalls, add, first_trace_call


def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "done"


async def later(x: int) -> int:
    """Return x after a pause.

    Args:
        x: the value.
    """
    await asyncio.sleep(0.01)
    return x


def broken(x: int) -> int:
    """Divide by zero.

    Args:
        x: the value.
    """
    return x // 0


@pytest.fixture(scope="module")
def hermes():
    """SmolLM2's tokenizer with a Hermes-style template (its own ignores tools)."""
    from benchmarks.harness import TOKENIZER
    from modules.backbone import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory, hermes) -> str:
    """A tiny random-weight policy with that tokenizer, exported as the SFT stage does (room for the tool schemas)."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.export import save_pretrained

    path = str(tmp_path_factory.mktemp("tools") / "sft")
    torch.manual_seed(0)
    save_pretrained(build_causal_lm(BackboneSpec(config={**TINY, "max_position_embeddings": 512}), hermes), hermes, path)
    return path


def test_parse_calls_reads_each_block_and_says_what_is_wrong_with_a_bad_one():
    text = ('First <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> then '
            '<tool_call> {"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"} </tool_call>'
            '<tool_call>add(2, 3)</tool_call><tool_call>[1]</tool_call>'
            '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>')
    calls = parse_calls(text)
    assert calls[:2] == [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {"a": 1, "b": 1}}]
    assert calls[2] == {"error": "the tool call is not JSON (Expecting value at character 0)"}
    assert "JSON object" in calls[3]["error"] and "name" not in calls[3]
    assert calls[4] == {"name": "add", "error": "the arguments of a tool call are a JSON object"}
    assert parse_calls("no call here") == [] and parse_calls("<tool_call>{}") == []     # (an unclosed block)


def test_calls_inside_the_reasoning_are_not_calls():
    """The docstring's examples: a call after `</think>` is read, one inside the think block (or in a block never
    closed) is not; a turn without think tags is read whole."""
    assert call_blocks("<think>or <tool_call>A</tool_call>?</think><tool_call>B</tool_call>") == ["B"]
    assert call_blocks("<think>\n<tool_call>A</tool_call>") == []
    assert call_blocks("<tool_call>A</tool_call>") == ["A"]
    assert call_blocks("</think>\n\n<tool_call>A</tool_call>") == ["A"]      # (DeepSeek-R1: `<think>` in the prompt)
    assert parse_calls("<think>" + ScriptedToolCalls.CALL + "</think>5") == []


def test_a_turn_that_only_thinks_of_a_call_ends_and_one_that_calls_after_thinking_runs_it(hermes):
    """Two rows, the first turn thinking of `add` and answering, the second thinking and then calling: the first
    response ends with its turn (no tool message), the second gets the result and answers."""
    tools = Tools(functions=[add])
    thought = f"<think>maybe {ScriptedToolCalls.CALL}</think>"
    generate, calls = scripted(hermes, [thought + "It is 5.", "The sum is 5."])
    ids, mask = pad([encode_prompt(hermes, "q", tools.schemas)], hermes.pad_token_id, "left")
    from modules.sampling import SamplingConfig

    roll = generate_with_tools(generate, tools, hermes, ids, mask, ["q"], SamplingConfig(max_new_tokens=300), 1)
    assert [m["role"] for m in roll.messages[0]] == ["assistant"] and roll.timings["tools/calls"] == 0
    assert len(calls) == 1
    generate, calls = scripted(hermes, ["<think>add them</think>" + ScriptedToolCalls.CALL, "The sum is 5."])
    roll = generate_with_tools(generate, tools, hermes, ids, mask, ["q"], SamplingConfig(max_new_tokens=300), 1)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "assistant"]
    assert roll.messages[0][1]["content"] == "5" and roll.timings["tools/calls"] == 1


def test_run_call_returns_the_result_or_an_error_for_the_policy():
    tools = {f.__name__: f for f in (add, slow, later, broken)}
    assert run_call({"name": "add", "arguments": {"a": 2, "b": 3}}, tools, 5) == ("add", "5", True)
    assert run_call({"name": "later", "arguments": {"x": 7}}, tools, 5) == ("later", "7", True)    # async
    name, text, ok = run_call({"name": "mul", "arguments": {}}, tools, 5)
    assert (name, ok) and json.loads(text) == {"error": "no tool named mul; the tools are add, slow, later, broken"}
    assert not ok
    assert json.loads(run_call({"name": "broken", "arguments": {"x": 1}}, tools, 5)[1]) == {
        "error": "ZeroDivisionError: integer division or modulo by zero"}
    assert "TypeError" in run_call({"name": "add", "arguments": {"a": 1}}, tools, 5)[1]     # a missing argument
    t0 = time.perf_counter()
    assert json.loads(run_call({"name": "slow", "arguments": {"seconds": 3}}, tools, 0.2)[1]) == {
        "error": "the call took more than 0.2 s"}
    assert time.perf_counter() - t0 < 2
    assert run_call({"error": "bad"}, tools, 5) == ("unknown", '{"error": "bad"}', False)


def test_tools_config_is_checked_in_one_line(hermes, sft_dir):
    from modules.backbone import load_tokenizer

    with pytest.raises(ValueError, match="functions is empty"):
        Tools(functions=[])
    with pytest.raises(ValueError, match="max_turns=0"):
        Tools(functions=[add], max_turns=0)
    with pytest.raises(ValueError, match="repeat a name"):
        Tools(functions=[add, add])

    def undocumented(a):
        return a

    with pytest.raises(ValueError, match="undocumented.*docstring"):
        Tools(functions=[undocumented])
    tools = Tools(functions=[add])
    tools.check_template(hermes)
    smollm2 = load_tokenizer(hermes.name_or_path)                     # its own template ignores `tools`
    with pytest.raises(DataError, match="does not render tool schemas"):
        tools.check_template(smollm2)
    with pytest.raises(DataError, match="has no chat template"):
        tools.check_template(load_tokenizer(sft_dir))


def test_tool_suffix_is_what_the_template_puts_between_a_turn_and_the_next(hermes):
    """After the call's EOS: the rest of that line, the tool message as the template wraps it, then the next
    assistant header."""
    suffix = tool_suffix(hermes, [{"role": "tool", "name": "add", "content": "5"}])
    assert hermes.decode(suffix) == "\n<|im_start|>user\n<tool_response>5</tool_response><|im_end|>\n<|im_start|>assistant\n"
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}]}
    whole = hermes.apply_chat_template([{"role": "user", "content": "q"}, call, {"role": "tool", "name": "add", "content": "5"}],
                                       add_generation_prompt=True, tokenize=False)
    assert whole.endswith(hermes.decode(suffix))


def rollout(hermes, model, max_new_tokens: int, max_turns: int = 2, num_samples: int = 2):
    tools = Tools(functions=[add], max_turns=max_turns)
    prompts = ["What is 2 + 3?", "Add two and three."]
    ids, mask = pad([encode_prompt(hermes, p, tools.schemas) for p in prompts], hermes.pad_token_id, "left")
    engine = ScriptedToolCalls()
    from modules.sampling import SamplingConfig

    torch.manual_seed(1)
    return generate_with_tools(lambda *a, **k: engine.generate(model, hermes, *a, **k), tools, hermes, ids, mask,
                               prompts, SamplingConfig(max_new_tokens=max_new_tokens), num_samples,
                               record_logprobs=True, share_prompts=True)


def test_a_tool_rollout_trains_on_the_policys_tokens_and_conditions_on_the_results(hermes, tool_dir):
    """Even rows call `add` (scripted), odd ones answer. A calling row's response is its call, the tool result and a
    sampled turn: attention over all of it, the response mask over the call and the sampled turn only; the sampled
    turn's recorded logprobs equal a trainer forward over the whole sequence (so pi_old from the sampler stays
    exact); the messages are TRL's (assistant, tool, assistant)."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.forward import response_logprobs

    model = build_causal_lm(BackboneSpec(pretrained=tool_dir), hermes)
    roll = rollout(hermes, model, max_new_tokens=80)
    call = hermes(ScriptedToolCalls.CALL, add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    suffix = tool_suffix(hermes, [{"role": "tool", "name": "add", "content": "5"}])
    real = roll.attention_mask[:, roll.prompt_length:]
    for row in (0, 2):
        n_call, n_tool = len(call), len(suffix)
        assert roll.response_ids[row, :n_call].tolist() == call
        assert roll.response_ids[row, n_call:n_call + n_tool].tolist() == suffix
        assert roll.response_mask[row, :n_call].all() and not roll.response_mask[row, n_call:n_call + n_tool].any()
        sampled = int(real[row].sum()) - n_call - n_tool
        assert sampled > 0 and roll.response_mask[row, n_call + n_tool:].sum() == sampled
        assert roll.messages[row][:2] == [ScriptedToolCalls.CALL_MESSAGE,
                                          {"role": "tool", "name": "add", "content": "5"}]
        assert [m["role"] for m in roll.messages[row]] == ["assistant", "tool", "assistant"]
        assert "<tool_response>5</tool_response>" in roll.responses[row]      # the text reward sees the result too
        logp = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 1.0).detach()
        later = slice(n_call + n_tool, n_call + n_tool + sampled)
        torch.testing.assert_close(roll.old_logp[row, later], logp[row, later], atol=1e-4, rtol=0)
        assert (roll.old_logp[row, n_call:n_call + n_tool] == 0).all()
    for row in (1, 3):
        answer = hermes("5", add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
        assert roll.response_ids[row, :len(answer)].tolist() == answer
        assert torch.equal(roll.response_mask[row], real[row]) and real[row].sum() == len(answer)
        assert roll.messages[row] == [{"role": "assistant", "content": "5"}] and roll.has_eos[row]
    assert roll.timings["tools/calls"] == 2 and roll.timings["tools/failed"] == 0
    assert roll.completion_ids()[0] == roll.response_ids[0, :int(real[0].sum())].tolist()   # (tool results included)
    kept = roll.select(torch.tensor([2, 3]))
    assert kept.messages == roll.messages[2:]


def test_a_result_that_leaves_no_room_ends_the_response_with_its_call(hermes, tool_dir):
    """max_new_tokens bounds the whole response, tool results included (TRL's max_completion_length): with room for
    the call but not the result plus one token, the response is the call alone, as emitted (EOS and all)."""
    from modules.backbone import BackboneSpec, build_causal_lm

    model = build_causal_lm(BackboneSpec(pretrained=tool_dir), hermes)
    call = hermes(ScriptedToolCalls.CALL, add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    suffix = tool_suffix(hermes, [{"role": "tool", "name": "add", "content": "5"}])
    roll = rollout(hermes, model, max_new_tokens=len(call) + len(suffix))
    assert roll.attention_mask[0, roll.prompt_length:].sum() == len(call) and roll.has_eos[0]
    assert roll.messages[0] == [ScriptedToolCalls.CALL_MESSAGE]
    roomy = rollout(hermes, model, max_new_tokens=len(call) + len(suffix) + 1)
    assert roomy.attention_mask[0, roomy.prompt_length:].sum() == len(call) + len(suffix) + 1
    assert roomy.response_mask[0].sum() == len(call) + 1 and not roomy.has_eos[0]    # (one token, then out of room)


def test_gae_skips_the_tool_results_between_the_policys_tokens():
    """The docstring's example, and a response with a gap equals the same response without it (GAE over the
    policy's tokens alone)."""
    from modules.objectives.ppo import gae

    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]]), torch.tensor([[1, 0, 1]]), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0.0, 1.0]]))
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 7), torch.randn(2, 7)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    for row in range(2):
        own = mask[row].bool()
        dense_adv, dense_ret = gae(rewards[row][own][None], values[row][own][None], torch.ones(1, int(own.sum())), 0.9, 0.8)
        torch.testing.assert_close(adv[row][own], dense_adv[0])
        torch.testing.assert_close(ret[row][own], dense_ret[0])
        assert (adv[row][~own] == 0).all()


def correct_after_tool(completions, **kwargs) -> list[float]:
    """A TRL-style reward on conversational prompts: 1 when a tool was called and its result was 5."""
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
    return [float(any(m["role"] == "tool" and m["content"] == "5" for m in c)) for c in completions]


def tool_config(tmp_path, tool_dir, objective: str = "p3o", engine: str = "tests.helpers.ScriptedToolCalls",
                callbacks: list | None = None, **trainer) -> str:
    """The quickstart `objective` config on 8 conversational prompts with `data.tools` (`add`, one round), the scripted
    engine, the TRL-style `correct_after_tool` as training and evaluation reward; its path."""
    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}]} for i in range(8)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load(open(f"configs/quickstart/{objective}.yaml"))
    config["trainer"].update({"limit_train_batches": 2, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "callbacks": [
                                  {"class_path": "callbacks.rollout.OnPolicyRollout"},
                                  {"class_path": "callbacks.evaluation.Evaluation", "init_args": {
                                      "reward": "tests.test_tools.correct_after_tool", "num_prompts": 4, "show": 2}},
                                  *(callbacks or [])], **trainer})
    config["model"]["init_args"].update({"policy": {"pretrained": tool_dir}, "sampling": {"max_new_tokens": 64},
                                         "reward": "tests.test_tools.correct_after_tool", "epochs": 1,
                                         "minibatch_groups": 2, "engine": {"class_path": engine}})
    if objective == "ppo":
        config["model"]["init_args"]["value_model"] = {"pretrained": tool_dir}
    config["data"]["init_args"].update({"source": {"class_path": "datamodules.sources.LocalFiles",
                                                   "init_args": {"train": str(path), "val": str(path)}},
                                        "tokenizer": tool_dir, "batch_size": 4, "max_prompt_length": 200,
                                        "max_length": 264, "tools": {"functions": ["tests.helpers.add"], "max_turns": 1}})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "rl.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["p3o", "ppo", "grpo", "rloo", "dpo"])
def test_rl_with_tools_runs_end_to_end_from_yaml(tmp_path, tool_dir, objective):
    """The quickstart config on conversational prompts with `data.tools`: every rollout runs the tools (half the
    responses call `add`), the TRL-style reward sees the tool messages, training logs the calls, and evaluation
    samples through the same loop."""
    from tests.test_judges import evaluation
    from train import cli_main

    cli = cli_main(["fit", "--config", tool_config(tmp_path, tool_dir, objective)])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert float(metrics["train/tool_calls"]) == pytest.approx(0.5)           # (the scripted engine: even rows call)
    assert float(metrics["train/tool_failures"]) == 0
    assert float(metrics["train/reward"]) == pytest.approx(0.5)          # the reward saw the calling rows' tool messages
    last = evaluation(cli).history[-1]
    assert last["val/gold_reward"] == pytest.approx(0.5) and last["val/tool_calls"] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_may_run_different_numbers_of_turns(tmp_path, tool_dir, strategy):
    """2 CPU processes under DDP or FSDP2, only rank 0's responses calling the tool: rank 0 generates two turns per
    rollout, rank 1 one. Under FSDP2 the policy is gathered once for all of a rollout's turns (`RLModule.generate`;
    without that, a collective is left unmatched and the run stops): the run finishes, both ranks end with the same
    trained weights."""
    from tests.helpers import run_train

    digest = str(tmp_path / "digest")
    config = tool_config(tmp_path, tool_dir, engine="tests.helpers.RankZeroToolCalls",
                         callbacks=[{"class_path": "tests.helpers.ParamDigest", "init_args": {"path": digest}}],
                         devices=2, accelerator="cpu",
                         strategy="ddp" if strategy == "ddp" else {"class_path": "modules.sharding.FSDP2Strategy"})
    run_train(config, timeout=300)
    ranks = [torch.load(f"{digest}.rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]) and not torch.equal(ranks[0]["params"], ranks[0]["initial"])


TRACE = [{"role": "assistant", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
         {"role": "tool", "name": "add", "content": "5"},
         {"role": "assistant", "content": "The sum is 5."}]


def test_a_trace_is_laid_out_as_the_rollout_that_would_produce_it(hermes, tool_dir):
    """SFT on a tool-use trace: its call turn, the tool suffix and its answer, with the policy's tokens marked, are
    the tokens and the response mask of a rollout whose policy wrote that call (the scripted engine's) and then that
    answer."""
    from datamodules.tools import encode_trace
    from modules.backbone import BackboneSpec, build_causal_lm

    ids, own = encode_trace(hermes, "What is 2 + 3?", TRACE, Tools(functions=[add]).schemas)
    call = hermes(ScriptedToolCalls.CALL, add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    suffix = tool_suffix(hermes, [{"role": "tool", "name": "add", "content": "5"}])
    answer = hermes("The sum is 5.", add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    assert ids == call + suffix + answer
    assert own == [1] * len(call) + [0] * len(suffix) + [1] * len(answer)
    roll = rollout(hermes, build_causal_lm(BackboneSpec(pretrained=tool_dir), hermes), max_new_tokens=80)
    n = len(call) + len(suffix)
    assert roll.response_ids[0, :n].tolist() == ids[:n] and roll.response_mask[0, :n].tolist() == own[:n]


def test_sft_trains_on_the_assistant_turns_of_tool_use_traces(tmp_path, tool_dir):
    """An SFT run from YAML on traces (`chosen_only`, data tools): the batches' loss mask covers the assistant's turns
    and not the tool result, and it trains to a finite loss."""
    from train import cli_main

    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}], "chosen": TRACE} for i in range(8)]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"class_path": "datamodules.sources.LocalFiles", "init_args": {"train": str(path), "val": str(path)}}
    cli = cli_main(["fit", "--config", sft_config(tmp_path, tool_dir, source, max_prompt_length=200, max_length=300,
                                                  tools={"functions": ["tests.helpers.add"]})])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    example = cli.datamodule.splits["train"][0]
    batch = next(iter(cli.datamodule.train_dataloader()))
    P = len(example["prompt_ids"])
    trained = batch.chosen.loss_mask[0, P: P + len(example["chosen_ids"])].tolist()
    assert trained == example["chosen_own"] and 0 in trained and example["chosen"] == TRACE


def sft_config(tmp_path, tool_dir, source: dict, **data) -> str:
    """The quickstart SFT config, one epoch on `source` with `tool_dir`'s tiny policy and tokenizer (batches of 4,
    `chosen_only`), `data` merged into the data's arguments; its path."""
    config = yaml.safe_load(open("configs/quickstart/sft.yaml"))
    config["trainer"].update({"max_epochs": 1, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "log_every_n_steps": 1, "callbacks": []})
    config["model"]["init_args"]["backbone"] = {"pretrained": tool_dir}
    config["data"]["init_args"].update({"source": source, "tokenizer": tool_dir, "batch_size": 4, "chosen_only": True,
                                        **data})
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "sft.yaml")


@pytest.mark.parametrize("chosen, settings, reason", [
    (TRACE, {}, "a tool-use trace .* needs data tools"),
    (TRACE, {"tools": Tools(functions=[add])}, r"multi-turn traces are SFT demonstrations \(data chosen_only: true\)"),
    ([TRACE[0], TRACE[2], TRACE[1], TRACE[2]], {}, "a list of 4 items; expected a string, or one message"),
    ([{"role": "assistant", "tool_calls": "add(2, 3)"}, TRACE[1], TRACE[2]], {},
     r"message 0 \(assistant\): tool_calls: expected \[\{\"type\": \"function\""),
    ([TRACE[0], {"role": "tool", "content": 5}, TRACE[2]], {}, r"message 1 \(tool\): content: expected text, got int"),
    ([TRACE[0], TRACE[1], {"role": "assistant", "content": " "}], {}, r"message 2 \(assistant\): empty"),
])
def test_a_malformed_trace_is_one_line_naming_record_and_field(tmp_path, tool_dir, chosen, settings, reason):
    from datamodules.pairs import PairDataModule
    from datamodules.sources import LocalFiles

    rows = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"prompt": "What is 2 + 3?", "chosen": chosen, "rejected": "6"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PairDataModule(LocalFiles(str(path)), tokenizer=tool_dir, max_prompt_length=200, max_length=300,
                          **settings)
    with pytest.raises(DataError, match=rf"t.jsonl: record 1: field 'chosen': {reason}"):
        data.setup("fit")


def test_final_answer_reads_the_last_number_of_the_final_assistant_turn():
    from datamodules.sums import final_answer

    call = {"role": "assistant", "content": ScriptedToolCalls.CALL}
    completions = [[call, {"role": "tool", "name": "add", "content": "7"}, {"role": "assistant", "content": "it is 7"}],
                   [call, {"role": "tool", "name": "add", "content": "7"}, {"role": "assistant", "content": ""}],
                   [{"role": "assistant", "content": "6 or 7 ."}], [{"role": "assistant", "content": "8"}]]
    assert final_answer(completions, [7, 7, 7, 7]) == [1.0, 0.0, 1.0, 0.0]    # (the tool's 7 pays nothing alone)


def test_the_calculator_task_writes_traces_a_rollout_would_parse(tmp_path):
    """CalculatorSumTask: about tool_share of the demonstrations are traces whose call is add(a, b) and whose answer
    is its result; the others direct answers, right about `accuracy` of the time; its tokenizer's template renders
    the tools, and a trace's call turn, decoded as a rollout decodes it, parses back to the call."""
    from datamodules.sums import CalculatorSumTask, add
    from datamodules.tools import parse_calls

    task = CalculatorSumTask(num_train=1000, num_val=10, tool_share=0.5, accuracy=0.5, cache_dir=str(tmp_path))
    records = task.records("train")
    traces = [r for r in records if isinstance(r["chosen"], list)]
    assert 0.45 < len(traces) / len(records) < 0.55
    direct = [r for r in records if not isinstance(r["chosen"], list)]
    assert 0.4 < sum(int(r["chosen"]) == r["answer"] for r in direct) / len(direct) < 0.6
    a, b = (int(word) for word in traces[0]["prompt"][0]["content"].split()[1::2])
    assert traces[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"a": a, "b": b}
    assert traces[0]["chosen"][1:] == [{"role": "tool", "name": "add", "content": str(a + b)},
                                       {"role": "assistant", "content": str(a + b)}] and traces[0]["answer"] == a + b
    example, _, text = first_trace_call(task, Tools(functions=[add], max_turns=1), max_length=28)
    (parsed,) = parse_calls(text)
    a, b = (int(word) for word in example["prompt"][0]["content"].split()[1::2])
    assert parsed == {"name": "add", "arguments": {"a": a, "b": b}}


def test_a_composed_reward_passes_the_messages_to_its_terms_in_evaluation():
    """As an evaluation reward (`call_text_reward` over texts), a `Composed` hands its TRL-style terms each
    response's messages, as training does (`raw_values`)."""
    from modules.rewards import Composed, call_text_reward

    messages = [[{"role": "assistant", "content": ScriptedToolCalls.CALL}, {"role": "tool", "name": "add", "content": "5"},
                 {"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "5"}]]
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    reward = Composed(rewards={"tool": correct_after_tool}, weights={"tool": 2.0})
    assert call_text_reward(reward, prompts, ["a", "b"], {}, None, messages) == [2.0, 0.0]
    assert call_text_reward(correct_after_tool, prompts, ["a", "b"], {}, None, messages) == [1.0, 0.0]


def scripted(hermes, turns: list[str], end: bool = True):
    """A `generate` whose n-th call answers every context with `turns[n]` (then the end of a turn, `turn_end_id`: EOS
    for most templates; `end=False`: each turn writes its own stop token), recorded logprobs -1."""
    from modules.sampling import rollout_of

    calls = []

    def generate(ids, mask, prompts, config, num_samples, same_weights=False, **kwargs):
        text = turns[len(calls)]
        calls.append((len(ids), same_weights, config.max_new_tokens))
        row = hermes(text, add_special_tokens=False)["input_ids"] + ([turn_end_id(hermes)] if end else [])
        response = torch.tensor([row] * (len(ids) * num_samples))
        return rollout_of(ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0), response,
                          prompts, num_samples, hermes, -torch.ones(response.shape))
    return generate, calls


@pytest.mark.parametrize("max_turns", [1, 2])
def test_rounds_of_calls_stop_at_max_turns_and_a_turn_may_call_twice(hermes, max_turns):
    """Every turn but the third calls `add` twice: each round runs both calls and appends both results as one suffix.
    With max_turns 2 the third turn (the answer) ends the response; with max_turns 1 the second turn's calls are not
    run and it ends the response. Later turns are one sample per response, from its own context, same weights."""
    tools = Tools(functions=[add], max_turns=max_turns)
    twice = ScriptedToolCalls.CALL + ScriptedToolCalls.CALL.replace('"a": 2', '"a": 4')
    generate, calls = scripted(hermes, [twice, twice, "The sums are 5 and 7."])
    prompts = ["q1", "q2"]
    ids, mask = pad([encode_prompt(hermes, p, tools.schemas) for p in prompts], hermes.pad_token_id, "left")
    from modules.sampling import SamplingConfig

    roll = generate_with_tools(generate, tools, hermes, ids, mask, prompts, SamplingConfig(max_new_tokens=400), 2)
    results = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "7"}]
    turn = hermes(twice, add_special_tokens=False)["input_ids"] + [hermes.eos_token_id]
    suffix = tool_suffix(hermes, results)
    assert [m["role"] for m in roll.messages[0]] == ["assistant", "tool", "tool"] * max_turns + ["assistant"]
    both = ScriptedToolCalls.CALL_MESSAGE["tool_calls"] + [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 4, "b": 3}}}]
    assert roll.messages[0][1:3] == results and roll.messages[0][-1] == (
        {"role": "assistant", "content": "The sums are 5 and 7."} if max_turns == 2 else
        {"role": "assistant", "content": "", "tool_calls": both})
    assert roll.timings["tools/calls"] == 4 * 2 * max_turns and roll.timings["tools/failed"] == 0
    assert roll.response_ids[0, :len(turn) + len(suffix)].tolist() == turn + suffix
    assert roll.response_mask[0, len(turn):len(turn) + len(suffix)].sum() == 0
    assert roll.old_logp[0][roll.response_mask[0].bool()].eq(-1).all() and roll.old_logp[0][len(turn)] == 0
    assert calls[0] == (2, False, 400) and all(n == 4 and same for n, same, _ in calls[1:])
    assert len(calls) == 1 + max_turns and calls[1][2] == 400 - len(turn) - len(suffix)      # (the rows' room)


class InFlight:
    """How many `wait` calls run at once, and the most so far."""

    lock, now, most = threading.Lock(), 0, 0


def wait(x: int) -> int:
    """Wait 50 ms and return x.

    Args:
        x: the value.
    """
    with InFlight.lock:
        InFlight.now += 1
        InFlight.most = max(InFlight.most, InFlight.now)
    time.sleep(0.05)
    with InFlight.lock:
        InFlight.now -= 1
    return x


def test_concurrency_runs_responses_calls_at_once_with_the_same_outcomes():
    """8 responses, each calling `wait` twice in one turn and adding to its own register twice: with concurrency 4
    several responses' calls are in flight at once, with 1 never more than one; the outcomes are the same, in the
    responses' order, and each response's calls ran in its order (its register's second total is its first plus
    10)."""
    from datamodules.sums import Register

    def turn(i: int) -> str:
        calls = [{"name": "wait", "arguments": {"x": i}}, {"name": "add", "arguments": {"n": i}},
                 {"name": "add", "arguments": {"n": 10}}, {"name": "wait", "arguments": {"x": -i}}]
        return " ".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)

    outcomes = {}
    for concurrency in (1, 4):
        tools = Tools(functions=[wait], environment=Register, concurrency=concurrency)
        registers, _, _ = tools.start([f"p{i}" for i in range(8)], {"answer": list(range(8))}, 1)
        InFlight.most = 0
        outcomes[concurrency] = tools.call_all([tools.read(turn(i), r) for i, r in enumerate(registers)], registers)
        assert (InFlight.most > 1) == (concurrency > 1), (concurrency, InFlight.most)
    assert outcomes[1] == outcomes[4]
    assert [[m["content"] for m in results] for results, _ in outcomes[4]] == [
        [str(i), str(i), str(i + 10), str(-i)] for i in range(8)]
    with pytest.raises(ValueError, match=r"Tools: concurrency=0; expected >= 1"):
        Tools(functions=[wait], concurrency=0)
