"""Tools environments (`datamodules.tools.Tools environment`; TRL's `environment_factory`): one stateful instance
per response, reset from its record, whose methods are the tools its calls run on, read by the reward afterwards
(`modules.rewards.environment_reward`, TRL's `environments`)."""
import json

import pytest
import torch
import yaml

from datamodules.collate import encode_prompt, pad
from datamodules.sources import DataError, Episodes
from datamodules.tools import Tools, environment_methods, observed
from modules.rewards import RewardError, awaited, call_text_reward, environment_reward
from modules.sampling import SamplingConfig, generate_with_tools
from tests.helpers import Counter, Episode, ScriptedToolCalls, episode_base, first_trace_call
from tests.test_tools import hermes, tool_config, tool_dir  # noqa: F401  (fixtures)


class Quiet(Counter):
    """Takes every record field and the prompt, returns no observation, and scores asynchronously."""

    def reset(self, **kwargs) -> None:
        self.seen, self.base, self.calls = kwargs, 0, 0

    async def get_reward(self) -> float:
        return 2.0


class Moody(Counter):
    """Gives each instance a different observation: responses to one prompt would not share their prompt."""

    def reset(self, base: int = 0) -> str:
        return f" {id(self)}"


class NeedsSecret(Counter):
    def reset(self, secret: str) -> None:
        pass


class NoReset:
    pass


class Numeric(Counter):
    def reset(self, base: int = 0) -> int:
        return 3


def test_observed_appends_to_the_last_message_and_leaves_the_record_alone():
    """The docstring's examples, and the record's own prompt is not changed."""
    assert observed("guess the code", " It has 2 digits.") == "guess the code It has 2 digits."
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert observed(conversation, " x") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi x"}]
    assert conversation[-1]["content"] == "hi"


def test_an_environments_public_methods_are_its_tools_and_the_config_is_checked():
    """Tools are the public methods but reset / get_reward, schemas from their docstrings; one instance is built at
    once (it is probed); a name both a function and a method have, a class without reset or that cannot be built,
    and a reset keyword no record field gives are each one line."""
    tools = Tools(environment=Counter)
    assert list(environment_methods(Counter())) == ["add"]
    assert [s["function"]["name"] for s in tools.schemas] == ["add"]
    assert tools.schemas[0]["function"]["description"] == "Add two numbers to the start."
    assert len(tools.pools[None]) == 1
    from tests.helpers import add

    with pytest.raises(ValueError, match=r"the functions and environment methods \['add', 'add'\] repeat a name"):
        Tools(functions=[add], environment=Counter)
    with pytest.raises(ValueError, match=r"environment \S*test_environments.NoReset has no reset method"):
        Tools(environment=NoReset)
    with pytest.raises(ValueError, match=r"functions is empty and no environment is given"):
        Tools()

    class Broken(Counter):
        def __init__(self):
            raise OSError("no server")

    with pytest.raises(ValueError, match=r"Broken\(\) raised OSError: no server; expected a class built with no "):
        Tools(environment=Broken)
    Tools(environment=NeedsSecret).check_fields(["secret", "answer"])
    with pytest.raises(DataError, match=r"environment \S*test_environments.NeedsSecret: reset takes 'secret', which "
                                        r"no record field provides \(fields given: \['answer'\]\); set data.init_args."
                                        r"reward_fields: \[secret\]"):
        Tools(environment=NeedsSecret).check_fields(["answer"])
    Tools(environment=Counter).check_fields([])                      # (base has a default)


def test_start_resets_one_instance_per_response_with_the_keywords_reset_takes():
    """K = 2 responses to each of 2 prompts: 4 instances, reset with the record field `base` (Counter names it) or
    with every field and the prompt (`**kwargs`); the observation goes after the prompt; the pool is reused by the
    next rollout (no new instance), grown only when a rollout needs more; what reset gets wrong is one line."""
    tools = Tools(environment=Counter)
    built = Counter.built
    envs, prompts, _ = tools.start(["p0", [{"role": "user", "content": "p1"}]], {"base": [3, 10], "id": ["a", "b"]}, 2)
    assert [e.base for e in envs] == [3, 3, 10, 10] and len({id(e) for e in envs}) == 4
    assert prompts == ["p0 Start from 3.", [{"role": "user", "content": "p1 Start from 10."}]]
    again, _, _ = tools.start(["q"], {"base": [1]}, 2)
    assert again == envs[:2] and [e.base for e in again] == [1, 1] and Counter.built == built + 3
    quiet = Tools(environment=Quiet)
    envs, prompts, _ = quiet.start(["p0"], {"base": [3], "id": ["a"]}, 1)
    assert envs[0].seen == {"prompt": "p0", "base": 3, "id": "a"} and prompts == ["p0"]
    assert awaited(environment_reward(["p0"], ["r"], envs)) == [2.0]
    with pytest.raises(DataError, match=r"Moody: reset gave the 2 responses to prompt 0 different texts .* the text must "
                                        r"follow from the record alone"):
        Tools(environment=Moody).start(["p"], {}, 2)
    with pytest.raises(DataError, match=r"Numeric: reset returned a int; expected None or a text"):
        Tools(environment=Numeric).start(["p"], {}, 1)
    with pytest.raises(DataError, match=r"Counter: reset\(prompt 0\) raised ValueError: invalid literal"):
        Tools(environment=Counter).start(["p"], {"base": ["x"]}, 1)


def test_each_responses_calls_run_on_its_own_instance_and_the_reward_reads_it(hermes, tool_dir):  # noqa: F811
    """The scripted engine makes even responses call `add(2, 3)`: each runs on its own instance, so its result is its
    prompt's base + 5 (5 and 15); the prompts were encoded again with their observations (the rollout's prompt ids
    and `prompts` say so); `environments` are the instances, and `environment_reward` (TRL's `get_reward`) and a TRL
    reward taking `environments` read them, also after `select`. A text that leaves no room for the response in the
    model's positions is one line."""
    from modules.backbone import BackboneSpec, build_causal_lm

    model = build_causal_lm(BackboneSpec(pretrained=tool_dir), hermes)
    tools = Tools(environment=Counter, max_turns=1)
    prompts = ["What is 2 + 3?", "Add two and three."]
    ids, mask = pad([encode_prompt(hermes, p, tools.schemas) for p in prompts], hermes.pad_token_id, "left")
    engine = ScriptedToolCalls()
    torch.manual_seed(1)
    roll = generate_with_tools(lambda *a, **k: engine.generate(model, hermes, *a, **k), tools, hermes, ids, mask,
                               prompts, SamplingConfig(max_new_tokens=80), 2, {"base": [0, 10]},
                               record_logprobs=True, share_prompts=True)
    seen = [observed(p, f" Start from {b}.") for p, b in zip(prompts, (0, 10))]
    assert roll.prompts == [seen[0], seen[0], seen[1], seen[1]]
    want, _ = pad([encode_prompt(hermes, p, tools.schemas) for p in seen], hermes.pad_token_id, "left")
    width = want.shape[1]
    assert roll.prompt_length == width
    torch.testing.assert_close(roll.input_ids[::2, :width], want)
    assert [m[1]["content"] for m in (roll.messages[0], roll.messages[2])] == ["5", "15"]
    assert [e.calls for e in roll.environments] == [1, 0, 1, 0]
    assert [e.base for e in roll.environments] == [0, 0, 10, 10]
    assert awaited(environment_reward(roll.prompts, roll.responses, roll.environments)) == [1.0, 0.0, 1.0, 0.0]

    def trl_reward(completions, environments, **kwargs):
        return [float(e.base) for e in environments]

    assert call_text_reward(trl_reward, roll.prompts, roll.responses, {}, None, None, roll.environments) == [0, 0, 10, 10]
    assert roll.select(torch.tensor([2, 3])).environments == roll.environments[2:]
    with pytest.raises(RewardError, match=r"environment tests.helpers.ScriptedToolCalls has no get_reward method"):
        awaited(environment_reward(["p"], ["r"], [engine]))
    with pytest.raises(DataError, match=rf"Counter: reset's text makes prompt \d {width} tokens, which leaves no room for "
                                        rf"max_new_tokens=80 in the model's {width + 79} positions"):
        generate_with_tools(lambda *a, **k: engine.generate(model, hermes, *a, **k), tools, hermes, ids, mask,
                            prompts, SamplingConfig(max_new_tokens=80), 2, {"base": [0, 10]}, width + 79)


def environment_config(tmp_path, tool_dir, objective: str = "p3o") -> str:  # noqa: F811
    """`tests.test_tools.tool_config` with the Counter environment as the tools, records carrying `base` (each
    prompt's) and a demonstration, and `environment_reward` as the training reward; a TRL reward reading
    `environments` evaluates."""
    path = tool_config(tmp_path, tool_dir, objective)
    config = yaml.safe_load(open(path))
    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}], "chosen": "5", "base": i} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config["data"]["init_args"].update({"tools": {"environment": "tests.helpers.Counter", "max_turns": 1},
                                        "reward_fields": ["base"], "prompts_only": False, "chosen_only": True})
    config["model"]["init_args"]["reward"] = "modules.rewards.environment_reward"
    config["trainer"]["callbacks"][1]["init_args"]["reward"] = "tests.test_environments.result_is_base_plus_5"
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "rl.yaml")


def result_is_base_plus_5(completions, environments, base, **kwargs) -> list[float]:
    """TRL-style: 1 where the response's environment was called and the tool message is its base + 5."""
    return [float(e.calls == 1 and e.base == b and any(m["role"] == "tool" and m["content"] == str(b + 5) for m in c))
            for c, e, b in zip(completions, environments, base)]


@pytest.mark.slow
def test_rl_with_an_environment_runs_end_to_end_from_yaml(tmp_path, tool_dir):  # noqa: F811
    """P3O from YAML with the Counter environment: every rollout resets an instance per response from its record,
    half the responses call (scripted), the environment's own reward pays those, and the evaluation samples through
    the same loop with a TRL reward that reads the instances (not the demonstrations, which ran in no environment).
    A reset keyword the records lack stops the run before the first rollout, in one line; so does a reward that
    takes `environments` with tools but no environment."""
    from tests.test_judges import evaluation
    from train import cli_main

    path = environment_config(tmp_path, tool_dir)
    cli = cli_main(["fit", "--config", path])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert float(metrics["train/tool_calls"]) == pytest.approx(0.5)
    assert float(metrics["train/reward"]) == pytest.approx(0.5)
    last = evaluation(cli).history[-1]
    assert last["val/gold_reward"] == pytest.approx(0.5) and last["val/tool_calls"] == pytest.approx(0.5)
    assert "val/demo_gold_reward" not in last
    config = yaml.safe_load(open(path))
    config["data"]["init_args"]["tools"]["environment"] = "tests.test_environments.NeedsSecret"
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError, match=r"NeedsSecret: reset takes 'secret', which no record field provides"):
        cli_main(["fit", "--config", str(tmp_path / "secret.yaml")])
    config["data"]["init_args"]["tools"] = {"functions": ["tests.helpers.add"], "max_turns": 1}
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RewardError, match=r"^reward modules.rewards.environment_reward takes environments \(TRL's: each "
                                          r"response's environment instance\), which only generation with a tools "
                                          r"environment gives .*; this data has none$"):
        cli_main(["fit", "--config", str(tmp_path / "none.yaml")])


def test_the_register_task_writes_traces_whose_calls_leave_the_sum_in_the_register(tmp_path):
    """RegisterSumTask: about tool_share of the demonstrations are traces of one turn calling add(a) then add(b),
    results a and a + b, then "done". The tokenizer renders the environment's tool; a trace's call turn, decoded as
    a rollout decodes it and run on a fresh Register reset from its record, gives the trace's results and a reward
    of 1; a direct answer leaves the register at 0 (reward 0), as does a wrong call."""
    from datamodules.sums import Register, RegisterSumTask

    task = RegisterSumTask(num_train=400, num_val=10, tool_share=0.5, cache_dir=str(tmp_path))
    records = task.records("train")
    traces = [r for r in records if isinstance(r["chosen"], list)]
    assert 0.4 < len(traces) / len(records) < 0.6
    a, b = (int(word) for word in traces[0]["prompt"][0]["content"].split()[1::2])
    assert [c["function"]["arguments"] for c in traces[0]["chosen"][0]["tool_calls"]] == [{"n": a}, {"n": b}]
    assert [m["content"] for m in traces[0]["chosen"][1:]] == [str(a), str(a + b), "done"]
    tools = Tools(environment=Register, max_turns=1)
    example, _, call = first_trace_call(task, tools, reward_fields=["answer"], max_length=40)
    (register,), _, _ = tools.start([example["prompt"]], {"answer": [example["fields"]["answer"]]}, 1)
    results, failed = tools.call(tools.read(call, register), register)
    assert failed == 0 and [m["content"] for m in results] == [m["content"] for m in example["chosen"][1:3]]
    assert awaited(environment_reward([], [], [register])) == [1.0]
    (register,), _, _ = tools.start([example["prompt"]], {"answer": [example["fields"]["answer"]]}, 1)
    assert register.total == 0 and register.get_reward() == 0.0
    register.add(example["fields"]["answer"] + 1)
    assert register.get_reward() == 0.0


def test_several_environments_each_record_its_own_tools_instances_and_reset(tmp_path, hermes, tool_dir):  # noqa: F811
    """TRL's dict of environments: {count: Counter, register: Register}. Each record names its own in `environment`
    (added to the reward fields), and its prompt carries that environment's tools only; an unknown name is one line
    naming the record. A rollout resets an instance of each prompt's kind (with its own keywords, not
    `environment`), the pools apart; a call runs on its response's environment: `add(a, b)` works on a Counter and
    is an error result on a Register, whose `add` takes `n`."""
    from datamodules.pairs import PairDataModule
    from datamodules.sources import LocalFiles
    from datamodules.sums import Register
    from modules.backbone import BackboneSpec, build_causal_lm

    tools = Tools(environment={"count": Counter, "register": Register}, max_turns=1)
    assert tools.multi and {n: [s["function"]["parameters"]["required"] for s in tools.schemas_for(n)]
                            for n in ("count", "register")} == {"count": [["a", "b"]], "register": [["n"]]}
    rows = [{"prompt": "What is 2 + 3?", "environment": "count", "base": 10, "answer": 5},
            {"prompt": "Add 2 and 3.", "environment": "register", "base": 0, "answer": 5}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PairDataModule(LocalFiles(str(path), str(path)), tokenizer=tool_dir, tools=tools, prompts_only=True,
                          reward_fields=["base", "answer"], max_length=400, max_prompt_length=300)
    assert data.reward_fields == ("base", "answer", "environment")
    data.setup("fit")
    texts = {e["fields"]["environment"]: hermes.decode(e["prompt_ids"]) for e in data.splits["val"]}
    assert '"a"' in texts["count"] and '"n"' not in texts["count"] and '"n"' in texts["register"]
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], {**rows[1], "environment": "chess"}]))
    with pytest.raises(DataError, match=r"record 1: field 'environment': 'chess' is not one of data tools environment "
                                        r"\['count', 'register'\]"):
        PairDataModule(LocalFiles(str(path), str(path)), tokenizer=tool_dir, tools=tools, prompts_only=True,
                       reward_fields=["base", "answer"], max_length=400, max_prompt_length=300).setup("fit")

    model = build_causal_lm(BackboneSpec(pretrained=tool_dir), hermes)
    prompts = [r["prompt"] for r in rows]
    ids, mask = pad([encode_prompt(hermes, p, tools.schemas_for(r["environment"])) for p, r in zip(prompts, rows)],
                    hermes.pad_token_id, "left")
    fields = {"environment": ["count", "register"], "base": [10, 0], "answer": [5, 5]}
    engine = ScriptedToolCalls()
    roll = generate_with_tools(lambda *a, **k: engine.generate(model, hermes, *a, **k), tools, hermes, ids, mask,
                               prompts, SamplingConfig(max_new_tokens=80), 2, fields, record_logprobs=True)
    assert [type(e).__name__ for e in roll.environments] == ["Counter", "Counter", "Register", "Register"]
    assert roll.environments[0].base == 10 and roll.environments[2].target == 5
    assert roll.messages[0][1]["content"] == "15"
    assert "unexpected keyword argument" in roll.messages[2][1]["content"] and roll.timings["tools/failed"] == 1
    assert len(tools.pools["count"]) == 2 and len(tools.pools["register"]) == 2
    again, _, names = tools.start(["p", "q"], {"environment": ["register", "register"], "base": [0, 0],
                                               "answer": [1, 2]}, 2)
    assert names == ["register", "register"] and again[:2] == tools.pools["register"][:2]
    assert len(tools.pools["register"]) == 4 and len(tools.pools["count"]) == 2


def test_episodes_give_empty_prompts_that_only_an_environment_may_write(tool_dir):  # noqa: F811
    """`Episodes` (TRL's dataset-free mode): numbered records with an empty user message, held-out ones numbered on
    from the training ones. Their empty prompts are bad records in one line without a tools environment or in SFT
    (which runs none), and pass in RL with one; reset then writes each prompt (the same task for the K responses to
    a record, drawn from its episode), and a reset that leaves a prompt empty stops the run in one line."""
    from datamodules.pairs import PairDataModule

    source = Episodes(num_train=3, num_val=2)
    assert source.load("train") == ("episodes (train)", [{"prompt": [{"role": "user", "content": ""}], "episode": i}
                                                         for i in range(3)])
    assert [r["episode"] for r in source.load("val")[1]] == [3, 4] and source.first_index("val") == 3
    with pytest.raises(ValueError, match=r"^Episodes: num_val=0; expected at least 1$"):
        Episodes(num_val=0)
    plain = PairDataModule(source, tokenizer=tool_dir, prompts_only=True, reward_fields=["episode"])
    with pytest.raises(DataError, match=r"^episodes \(val\): record 3: field 'prompt': message 0 \(user\): empty"):
        plain.records("val")
    written = PairDataModule(source, tokenizer=tool_dir, prompts_only=True, reward_fields=["episode"],
                             tools=Tools(environment=Episode))
    assert written.records("val")[1][1] == {"prompt": [{"role": "user", "content": ""}], "fields": {"episode": 4}}
    chosen = PairDataModule(source, tokenizer=tool_dir, chosen_only=True, tools=Tools(environment=Episode))
    with pytest.raises(DataError, match=r"record 0: field 'prompt': message 0 \(user\): empty"):
        chosen.records("train")                                          # (SFT runs no environment)

    empty = [{"role": "user", "content": ""}]
    instances, prompts, _ = Tools(environment=Episode).start([empty, empty], {"episode": [7, 8]}, 2)
    assert prompts == [[{"role": "user", "content": f"What is 2 + 3, from {episode_base(n)}?"}] for n in (7, 8)]
    assert [e.base for e in instances] == [episode_base(7)] * 2 + [episode_base(8)] * 2 and episode_base(7) != episode_base(8)
    with pytest.raises(DataError, match=r"^data tools environment \S*Quiet: reset\(prompt 0\) "
                                        r"returned None and the prompt is empty \(as datamodules.sources.Episodes gives "
                                        r"it\); expected the task's text, which becomes the prompt$"):
        Tools(environment=Quiet).start([empty], {}, 2)


def episode_answered(prompts, completions, environments, episode, **kwargs) -> list[float]:
    """TRL-style: 1 where the prompt is its episode's task, the instance was reset from the episode, and every tool
    result is the instance's base + 5."""
    return [float(p[-1]["content"] == f"What is 2 + 3, from {episode_base(n)}?" and e.base == episode_base(n) and
                  all(m["content"] == str(e.base + 5) for m in c if m["role"] == "tool"))
            for p, c, e, n in zip(prompts, completions, environments, episode)]


@pytest.mark.slow
def test_rl_on_episodes_runs_end_to_end_from_yaml(tmp_path, tool_dir):  # noqa: F811
    """P3O from YAML on `Episodes` with the `Episode` environment writing every prompt: half the responses call
    (scripted) on their own instance, the environment's reward pays those, and the evaluation, on held-out
    episodes, gets the prompts reset wrote, with each record's episode."""
    from tests.test_judges import evaluation
    from train import cli_main

    config = yaml.safe_load(open(tool_config(tmp_path, tool_dir)))
    config["data"]["init_args"].update({
        "source": {"class_path": "datamodules.sources.Episodes", "init_args": {"num_train": 8, "num_val": 4}},
        "tools": {"environment": "tests.helpers.Episode", "max_turns": 1}, "reward_fields": ["episode"],
        "prompts_only": True})
    config["model"]["init_args"]["reward"] = "modules.rewards.environment_reward"
    config["trainer"]["callbacks"][1]["init_args"]["reward"] = "tests.test_environments.episode_answered"
    (tmp_path / "episodes.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(tmp_path / "episodes.yaml")])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert float(metrics["train/tool_calls"]) == pytest.approx(0.5) and float(metrics["train/reward"]) == pytest.approx(0.5)
    assert evaluation(cli).history[-1]["val/gold_reward"] == pytest.approx(1.0)
