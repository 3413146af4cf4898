"""Record fields for rewards (`PairDataModule reward_fields` -> batch -> rollout -> the reward's keyword
arguments) and `modules.rewards.Composed`, a weighted sum of rewards with each term logged."""
import json

import pytest
import torch
import yaml

from datamodules.collate import PairCollator
from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, LocalFiles
from modules.batch import Rollout
from modules.rewards import Composed, RewardError, field_kwargs, required_fields, score, score_pairs
from modules.verifiable import AnswerMatch, PatternMatch
from tests.helpers import tiny_rl_config
from train import cli_main


def rollout(responses: list[str], group_size: int = 2) -> Rollout:
    n = len(responses)
    return Rollout(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3, dtype=torch.long),
                   response_mask=torch.ones(n, 1, dtype=torch.long), prompt_length=2, group_size=group_size,
                   prompts=[f"prompt {i // group_size}" for i in range(n)], responses=responses,
                   has_eos=torch.ones(n, dtype=torch.bool))


def correct(prompts, responses, answer):
    return [float(r == a) for r, a in zip(responses, answer)]


def anything(prompts, responses, **fields):
    return [float(len(fields))] * len(responses)


def texts_only(prompts, responses):
    return [1.0] * len(responses)


def optional(prompts, responses, answer=None, level=1):
    return [float(answer is not None) + level] * len(responses)


def test_field_kwargs_gives_each_reward_the_fields_its_call_takes():
    fields = {"answer": ["4", "9"], "id": [1, 2]}
    assert field_kwargs(correct, fields) == {"answer": ["4", "9"]}
    assert field_kwargs(anything, fields) == fields
    assert field_kwargs(texts_only, fields) == {}
    assert field_kwargs(optional, {"id": [1, 2]}) == {}          # defaults: nothing required
    assert field_kwargs(len, fields) == {}                        # no signature to read
    assert required_fields(correct) == ["answer"] and required_fields(optional) == []
    assert required_fields(AnswerMatch(field="solution")) == ["solution"]
    with pytest.raises(RewardError, match=r"reward \S+correct takes 'answer' by keyword, which no record field "
                                          r"provides \(fields given: \['id'\]\); set data.init_args.reward_fields: "
                                          r"\[answer\]"):
        field_kwargs(correct, {"id": [1, 2]})


def test_rollout_fields_repeat_per_response_and_follow_a_selection():
    roll = rollout(["a", "b", "c", "d"]).with_fields({"answer": ["x", "y"]})
    assert roll.fields == {"answer": ["x", "x", "y", "y"]}
    assert roll.select(torch.tensor([3, 0])).fields == {"answer": ["y", "x"]}


def test_a_text_reward_and_a_pairwise_one_get_the_fields_of_their_rows():
    roll = rollout(["4", "5", "9", "9"]).with_fields({"answer": ["4", "9"]})
    rewards, _ = score(correct, roll, tokenizer=None)
    assert rewards.tolist() == [1.0, 0.0, 1.0, 1.0]

    class Pairwise:
        pairwise, antisymmetric = True, True

        def __call__(self, prompts, responses_a, responses_b, answer):
            return [float(a == x) - float(b == x) for a, b, x in zip(responses_a, responses_b, answer)]

    M, _, _ = score_pairs(Pairwise(), roll)
    assert M.tolist() == [[0.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_composed_sums_weighted_terms_and_keeps_each_term():
    """Docstring example: correct in {0, 1}, format in {0, 1}, weights {correct: 1.0, format: 0.2}: a correct
    response in the wrong format gets 1.0, a wrong one in the right format 0.2, both right 1.2, neither 0."""
    reward = Composed({"correct": AnswerMatch(), "format": PatternMatch(r"\d+", full=True)},
                      weights={"correct": 1.0, "format": 0.2})
    roll = rollout(["it is 4", "5", "4", "none"]).with_fields({"answer": ["4", "4"]})
    rewards, _ = score(reward, roll, tokenizer=None)
    assert torch.allclose(rewards, torch.tensor([1.0, 0.2, 1.2, 0.0]))
    assert roll.reward_terms["correct"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert roll.reward_terms["format"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert required_fields(reward) == ["answer"]
    assert reward(roll.prompts, roll.responses, **roll.fields) == pytest.approx([1.0, 0.2, 1.2, 0.0])


def test_composed_names_the_term_that_fails_and_a_penalty_replaces_the_whole_sum():
    nan_second = lambda prompts, responses: [1.0, float("nan")]  # noqa: E731
    reward = Composed({"ok": texts_only, "shaky": nan_second})
    with pytest.raises(RewardError, match=r"term 'shaky' of modules.rewards.Composed: reward \S+ returned nan for "
                                          r"response 1 of 2"):
        score(reward, rollout(["a", "b"]), tokenizer=None)
    rewards, replaced = score(reward, rollout(["a", "b"]), tokenizer=None, nonfinite=-3.0)
    assert rewards.tolist() == [2.0, -3.0] and replaced == 1
    with pytest.raises(RewardError, match=r"term 'ok' of \S+: reward \S+ returned 3 values for 2 responses"):
        score(Composed({"ok": lambda p, r: [1.0, 2.0, 3.0]}), rollout(["a", "b"]), tokenizer=None)


@pytest.mark.parametrize("kwargs, message", [
    ({"rewards": {}}, "rewards is empty"),
    ({"rewards": {"a b": texts_only}}, r"term names \['a b'\] are not names"),
    ({"rewards": {"a": texts_only}, "weights": {"b": 1.0}}, r"weights for \['b'\] name no term of rewards \['a'\]"),
    ({"rewards": {"a": texts_only}, "weights": {"a": float("nan")}}, r"weights\['a'\]=nan; expected a finite number"),
    ({"rewards": {"a": 3}}, r"term 'a' \(builtins.int\) is not callable"),
])
def test_composed_refuses_what_it_cannot_sum(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Composed(**kwargs)


def records(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_datamodule_keeps_the_reward_fields_and_names_a_record_without_one(tmp_path, task_tokenizer_path):
    rows = [{"prompt": f"what is {i} plus {i}", "answer": 2 * i, "note": "x"} for i in range(6)]
    path = records(tmp_path / "maths.jsonl", rows)
    dm = PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, prompts_only=True,
                        reward_fields=["answer"], batch_size=3)
    dm.setup()
    batch = PairCollator(dm.tokenizer.pad_token_id)(dm.splits["train"][:3])
    assert batch.fields == {"answer": [0, 2, 4]}
    rows[4].pop("answer")
    records(tmp_path / "maths.jsonl", rows)
    with pytest.raises(DataError, match=r"maths.jsonl: record 4: field 'answer': missing; data reward_fields names "
                                        r"it for the reward \(the record has fields \['note', 'prompt'\]\)"):
        PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, prompts_only=True,
                       reward_fields=["answer"]).setup()
    with pytest.raises(ValueError, match=r"reward_fields=\['responses'\]; expected distinct names other than prompts"):
        PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, reward_fields=["responses"])


def maths_config(tmp_path, sft_dir, reward_fields: list | None, evaluate_answers: bool = True) -> str:
    """The tiny P3O run on a JSONL of sums with answers: Composed(correct + 0.2 format), evaluated by AnswerMatch."""
    rows = [{"prompt": f"the sum of {i} and {i + 1}", "answer": 2 * i + 1} for i in range(16)]
    path = records(tmp_path / "sums.jsonl", rows)
    config_path = tiny_rl_config(tmp_path, sft_dir)
    config = yaml.safe_load(open(config_path))
    config["data"]["init_args"]["source"] = {"class_path": "datamodules.sources.LocalFiles",
                                             "init_args": {"train": path, "val": path}}
    config["data"]["init_args"]["reward_fields"] = reward_fields
    config["model"]["init_args"]["reward"] = {"class_path": "modules.rewards.Composed", "init_args": {
        "rewards": {"correct": {"class_path": "modules.verifiable.AnswerMatch"},
                    "format": {"class_path": "modules.verifiable.PatternMatch", "init_args": {"pattern": r"\d"}}},
        "weights": {"format": 0.2}}}
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("Evaluation"):
            callback["init_args"]["reward"] = {"class_path": "modules.verifiable.AnswerMatch"} if evaluate_answers else None
    yaml.safe_dump(config, open(config_path, "w"))
    return config_path


def test_a_composed_verifiable_reward_trains_p3o_end_to_end_with_each_term_logged(tmp_path, sft_dir):
    cli = cli_main(["fit", "--config", maths_config(tmp_path, sft_dir, ["answer"])])
    metrics = cli.trainer.callback_metrics
    terms = [metrics[f"train/reward_{name}"] for name in ("correct", "format")]
    assert torch.isclose(metrics["train/reward"], terms[0] + 0.2 * terms[1], atol=1e-6)
    assert 0.0 <= metrics["train/tied_groups"] <= 1.0          # pairs whose rewards tie: no reward signal
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation").history[-1]
    assert {"val/gold_reward", "val/reward", "val/reward_correct", "val/reward_format"} <= set(evaluation)
    assert abs(evaluation["val/reward"] - evaluation["val/reward_correct"] - 0.2 * evaluation["val/reward_format"]) < 1e-6


@pytest.mark.parametrize("evaluate_answers, named", [(True, "modules.verifiable.AnswerMatch"),   # the evaluation's
                                                     (False, "modules.rewards.Composed")])     # the training reward
def test_a_reward_field_the_data_does_not_keep_stops_the_run_before_any_rollout(tmp_path, sft_dir, capsys,
                                                                                evaluate_answers, named):
    from train import main

    assert main(["fit", "--config", maths_config(tmp_path, sft_dir, None, evaluate_answers)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: reward {named} takes 'answer' by keyword, which no record field provides (fields "
                       "given: none); set data.init_args.reward_fields: [answer] and give every record that field"), err


@pytest.mark.slow
def test_a_composed_reward_holding_a_reward_model_resumes_bit_exactly_without_saving_it(tmp_path, sft_dir, reward_dir):
    """The reward model inside `Composed` is a frozen model of the RL module like a reward model alone: built and
    moved with it, left out of the checkpoint (only in its digest of frozen weights), and a SIGKILL resume is
    bit-exact."""
    from tests.test_checkpoint import _resume_case

    model = {"reward": {"class_path": "modules.rewards.Composed", "init_args": {
        "rewards": {"preference": {"class_path": "modules.rewards.RewardModel",
                                   "init_args": {"path": reward_dir, "normalize": False}},
                    "gold": {"class_path": "datamodules.task.GoldReward"}},
        "weights": {"preference": 0.5}}}}
    last = _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", model=model)
    saved = torch.load(last, weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("reward.")]
    assert any(k.startswith("reward.models.preference.model.") for k in saved["frozen_digest"])


@pytest.mark.slow
def test_a_composed_terms_reward_model_too_short_for_the_rollouts_stops_before_training(tmp_path, sft_dir, reward_dir,
                                                                                     capsys):
    """As for a reward model alone (`modules.checks.check_positions`), each term's model is checked, by its name."""
    import shutil

    from train import main

    short = tmp_path / "short-reward"
    shutil.copytree(reward_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    model = {"reward": {"class_path": "modules.rewards.Composed", "init_args": {"rewards": {
        "gold": {"class_path": "datamodules.task.GoldReward"},
        "preference": {"class_path": "modules.rewards.RewardModel", "init_args": {"path": str(short), "normalize": False}}}}}}
    assert main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, model=model)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: RLModule: data max_prompt_length (12) + model sampling.max_new_tokens (8) = 20 tokens per sequence, "
        "more than the reward model preference's max_position_embeddings (16); lower them")


def test_a_judge_asked_in_both_orders_gets_the_record_fields_of_its_pairs():
    """A judge that knows the answer: f(a, b) = [a right] - [b right]; asked in both orders, the score is the same."""
    from modules.judges import both_orders

    def judge(prompts, responses_a, responses_b, answer):
        return [float(a == x) - float(b == x) for a, b, x in zip(responses_a, responses_b, answer)]

    score, agree = both_orders(judge, ["p", "q"], ["4", "8"], ["5", "9"], {"answer": ["4", "9"]})
    assert score.tolist() == [1.0, -1.0] and agree.all()
    with pytest.raises(RewardError, match="takes 'answer' by keyword"):
        both_orders(judge, ["p"], ["4"], ["5"])


def right_sum(prompts, responses, answer):
    """A reward written as a plain function, given by its import path."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]


def test_a_plain_function_by_its_import_path_is_a_reward_that_reads_fields(tmp_path, sft_dir):
    config = maths_config(tmp_path, sft_dir, ["answer"])
    cli = cli_main(["fit", "--config", config, "--model.init_args.reward=tests.test_reward_fields.right_sum"])
    reward = cli.model.reward
    assert (reward.__module__, reward.__name__) == ("tests.test_reward_fields", "right_sum")
    assert "train/reward" in cli.trainer.callback_metrics


def run_both_stages(tmp_path, sft_dir, family: str, adapter: str, rows: list, sft_max_length: int, p3o_trainer=None):
    """configs/<family>/sft.yaml then p3o.yaml, as written but for the hub: the model (the tiny SFT export), the data
    (`rows`, a local file in the hub dataset's layout, read by `datamodules.formats.<adapter>`) and their sizes.
    Returns the two stages' CLIs (after fit); each stage's export is under tmp_path (sft/, p3o/)."""
    from train import derive_config

    path = records(tmp_path / f"{family}.jsonl", rows)
    source = {"class_path": f"datamodules.formats.{adapter}", "init_args": {
        "instruction": "", "source": {"class_path": "datamodules.sources.LocalFiles",
                                      "init_args": {"train": path, "val": path}}}}
    small = {"accelerator": "cpu", "precision": "32-true", "logger": False, "enable_progress_bar": False}

    def callbacks(stage: str) -> list:          # no checkpoints; the export under tmp_path; a small evaluation
        return [{**cb, "init_args": {**cb.get("init_args", {}), **(
            {"dirpath": str(tmp_path / stage)} if "Export" in cb["class_path"] else
            {"num_prompts": 4, "sampling": {"max_new_tokens": 8}} if "Evaluation" in cb["class_path"] else {})}}
            for cb in yaml.safe_load(open(f"configs/{family}/{stage}.yaml"))["trainer"]["callbacks"]
            if "Checkpoint" not in cb["class_path"]]

    sft = derive_config(f"configs/{family}/sft.yaml", {
        "trainer": {**small, "max_epochs": 1, "callbacks": callbacks("sft")},
        "model": {"init_args": {"backbone": {"pretrained": sft_dir}}},
        "data": {"init_args": {"source": source, "tokenizer": sft_dir, "batch_size": 8, "max_length": sft_max_length,
                               "max_prompt_length": 64}}}, tmp_path / "sft.yaml")
    sft_cli = cli_main(["fit", "--config", sft])
    p3o = derive_config(f"configs/{family}/p3o.yaml", {
        "trainer": {**small, "limit_train_batches": 2, **(p3o_trainer or {}), "callbacks": callbacks("p3o")},
        "model": {"init_args": {"policy": {"pretrained": str(tmp_path / "sft")}, "sampling": {"max_new_tokens": 8}}},
        "data": {"init_args": {"source": source, "tokenizer": str(tmp_path / "sft"), "batch_size": 2,
                               "max_length": 72, "max_prompt_length": 64}}}, tmp_path / "p3o.yaml")
    return sft_cli, cli_main(["fit", "--config", p3o])


@pytest.mark.slow
def test_the_gsm8k_configs_run_end_to_end_on_a_local_file_in_gsm8ks_layout(tmp_path, sft_dir):
    """configs/gsm8k/sft.yaml then p3o.yaml on a local file in openai/gsm8k's layout (`run_both_stages`). SFT on
    solutions alone (chosen_only), then P3O with 4 responses per question on Composed(AnswerMatch + PatternMatch)."""
    from tests.test_formats import GSM

    rows = [{"question": f"{q['question']} ({i})", "answer": q["answer"]} for i in range(8) for q in GSM]
    sft, cli = run_both_stages(tmp_path, sft_dir, "gsm8k", "GSM8K", rows, sft_max_length=120)
    assert sft.datamodule.chosen_only and sft.trainer.global_step == 2 and (tmp_path / "sft" / "config.json").exists()
    metrics = cli.trainer.callback_metrics
    assert cli.model.objective.responses_per_prompt == 4 and (tmp_path / "p3o" / "config.json").exists()
    composed = metrics["train/reward_correct"] + 0.1 * metrics["train/reward_format"]
    missing_eos = 1.0 * (1 - metrics["train/eos_rate"])           # the config's missing_eos_penalty, on the last rollout
    assert torch.isclose(metrics["train/reward"], composed - missing_eos, atol=1e-6)


@pytest.mark.slow
def test_the_mbpp_configs_run_end_to_end_on_a_local_file_in_mbpps_layout(tmp_path, sft_dir):
    """configs/mbpp/sft.yaml then p3o.yaml on a local file in MBPP's layout (`run_both_stages`): SFT on the fenced
    reference code, evaluated by PythonTests; then P3O with 4 responses per task on PythonTests(partial)."""
    from tests.test_formats import MBPP_FULL

    rows = [{**MBPP_FULL[0], "task_id": i, "text": f"{MBPP_FULL[0]['text']} ({i})"} for i in range(8)]
    sft, cli = run_both_stages(tmp_path, sft_dir, "mbpp", "MBPP", rows, sft_max_length=128,
                               p3o_trainer={"max_epochs": 1})
    assert sft.datamodule.chosen_only and (tmp_path / "sft" / "config.json").exists()
    evaluation = next(cb for cb in sft.trainer.callbacks if type(cb).__name__ == "Evaluation")
    assert 0.0 <= evaluation.history[-1]["val/gold_reward"] <= 1.0
    assert evaluation.history[-1]["val/demo_gold_reward"] == 1.0       # the reference code passes its tests
    assert cli.model.objective.responses_per_prompt == 4 and (tmp_path / "p3o" / "config.json").exists()
    assert "train/reward" in cli.trainer.callback_metrics


def test_a_composed_term_returning_none_does_not_apply_and_the_others_score_that_response():
    """A maths record (answer "4") and a coding-style record (keyword "spa", no answer), 2 responses each. correct
    applies to rows 0-1 (1, 0), mentions to rows 2-3 (1, 0); weights {correct: 1, mentions: 0.5}:
    rewards [1, 0, 0.5, 0]; each term NaN where it does not apply; its logged mean over the rows it applies to."""
    from modules.rewards import term_means
    from modules.verifiable import Contains

    reward = Composed({"correct": AnswerMatch(), "mentions": Contains("keyword")}, weights={"mentions": 0.5})
    roll = rollout(["4", "5", "the spa", "a room"]).with_fields({"answer": ["4", None], "keyword": [None, "spa"]})
    rewards, _ = score(reward, roll, tokenizer=None)
    assert rewards.tolist() == [1.0, 0.0, 0.5, 0.0]
    correct, mentions = roll.reward_terms["correct"], roll.reward_terms["mentions"]
    assert correct[:2].tolist() == [1.0, 0.0] and correct[2:].isnan().all()
    assert mentions[:2].isnan().all() and mentions[2:].tolist() == [1.0, 0.0]
    assert term_means(roll.reward_terms) == {"correct": 0.5, "mentions": 0.5}
    assert reward(roll.prompts, roll.responses, **roll.fields) == [1.0, 0.0, 0.5, 0.0]      # as an evaluation reward


def test_term_means_over_the_responses_a_term_applies_to_and_over_every_process():
    """Docstring example; with two processes (`over_ranks` doubling as a stand-in for the sum of two identical
    ranks) the means are unchanged; a term that applies nowhere is left out."""
    from modules.rewards import term_means

    nan = float("nan")
    terms = {"correct": torch.tensor([1.0, 0.0, nan, nan]), "runs": torch.tensor([nan, nan, 0.5, nan]),
             "never": torch.tensor([nan] * 4)}
    assert term_means(terms) == {"correct": 0.5, "runs": 0.5}
    assert term_means(terms, over_ranks=lambda values: [2 * v for v in values]) == {"correct": 0.5, "runs": 0.5}
    assert term_means({}, over_ranks=lambda values: pytest.fail("no reduce without terms")) == {}


def test_none_is_refused_outside_a_composed_reward_and_where_no_term_applies():
    reward = Composed({"correct": AnswerMatch()})
    roll = rollout(["4", "5", "x", "y"]).with_fields({"answer": ["4", None]})
    with pytest.raises(RewardError, match=r"modules.rewards.Composed: no term applies to response 2 of 4 \(prompt "
                                          r"'prompt 1', response 'x'\): each of \['correct'\] returned None for it"):
        score(reward, roll, tokenizer=None)
    with pytest.raises(RewardError, match=r"reward modules.verifiable.AnswerMatch returned None for response 2 of 4; "
                                          r"expected a number \(None, 'does not apply', is for a term of "
                                          r"modules.rewards.Composed"):
        score(AnswerMatch(), roll, tokenizer=None)


def test_a_non_finite_term_where_it_applies_is_not_taken_for_does_not_apply():
    """With a penalty set, a NaN where a term applies makes the sum NaN, replaced by the penalty (counted); a None
    elsewhere leaves the other term's value."""
    shaky = lambda prompts, responses: [float("nan"), None, 1.0, None]  # noqa: E731
    reward = Composed({"shaky": shaky, "flat": lambda prompts, responses: [None, 2.0, None, 2.0]})
    rewards, replaced = score(reward, rollout(["a", "b", "c", "d"]), tokenizer=None, nonfinite=-3.0)
    assert rewards.tolist() == [-3.0, 2.0, 1.0, 2.0] and replaced == 1


def test_optional_fields_keep_records_without_them_as_none_and_the_rules_skip_them(tmp_path, task_tokenizer_path):
    from modules.verifiable import Contains, PythonTests

    rows = [{"prompt": "what is 2 plus 2", "answer": 4}, {"prompt": "write f", "tests": "assert f() == 1"},
            {"prompt": "what is 1 plus 1", "answer": 2, "tests": None}]
    path = records(tmp_path / "mixed.jsonl", rows)
    dm = PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, prompts_only=True,
                        reward_fields=["answer", "tests"], optional_fields=["answer", "tests"], batch_size=3)
    dm.setup()
    batch = PairCollator(dm.tokenizer.pad_token_id)(dm.splits["train"])
    assert batch.fields == {"answer": [4, None, 2], "tests": [None, "assert f() == 1", None]}
    responses = ["4", "def f():\n    return 1", "3"]
    assert AnswerMatch()(batch.prompts, responses, answer=batch.fields["answer"]) == [1.0, None, 0.0]
    assert PythonTests()(batch.prompts, responses, tests=batch.fields["tests"]) == [None, 1.0, None]
    assert Contains("tests")(batch.prompts, responses, tests=batch.fields["tests"])[::2] == [None, None]
    with pytest.raises(DataError, match=r"mixed.jsonl: record 1: field 'answer': missing"):   # required unless optional
        PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, prompts_only=True,
                       reward_fields=["answer", "tests"], optional_fields=["tests"]).setup()
    with pytest.raises(ValueError, match=r"optional_fields names \['id'\], which reward_fields \['answer'\] does not"):
        PairDataModule(LocalFiles(path, val=path), tokenizer=task_tokenizer_path, reward_fields=["answer"],
                       optional_fields=["id"])


def test_a_mixed_dataset_trains_p3o_with_each_term_scoring_its_own_records(tmp_path, sft_dir):
    """Sums with an answer and reviews with a keyword in one file: Composed(AnswerMatch + Contains), each term
    logged as its mean over the records it applies to, in training and in evaluation (gold: the same Composed)."""
    rows = [row for i, place in enumerate(("spa", "bar", "pool", "gym") * 2)            # alternating
            for row in ({"prompt": f"the sum of {i} and {i + 1}", "answer": 2 * i + 1},
                        {"prompt": f"write about the {place} {i}", "keyword": place})]
    path = records(tmp_path / "mixed.jsonl", rows)
    config_path = tiny_rl_config(tmp_path, sft_dir)
    config = yaml.safe_load(open(config_path))
    config["data"]["init_args"].update(source={"class_path": "datamodules.sources.LocalFiles",
                                               "init_args": {"train": path, "val": path}},
                                       reward_fields=["answer", "keyword"], optional_fields=["answer", "keyword"])
    composed = {"class_path": "modules.rewards.Composed", "init_args": {"rewards": {
        "correct": {"class_path": "modules.verifiable.AnswerMatch"},
        "mentions": {"class_path": "modules.verifiable.Contains", "init_args": {"field": "keyword"}}}}}
    config["model"]["init_args"]["reward"] = composed
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("Evaluation"):
            callback["init_args"]["reward"] = composed
    yaml.safe_dump(config, open(config_path, "w"))
    cli = cli_main(["fit", "--config", config_path])
    metrics = cli.trainer.callback_metrics
    assert {"train/reward_correct", "train/reward_mentions"} <= set(metrics)
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation").history[-1]
    assert {"val/reward_correct", "val/reward_mentions"} <= set(evaluation)
    assert all(0.0 <= evaluation[f"val/reward_{name}"] <= 1.0 for name in ("correct", "mentions"))


def trl_accuracy(completions, answer, **kwargs):
    """A reward function as written for TRL's GRPOTrainer: texts and dataset columns by keyword."""
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]


def trl_prompt_length(prompts, completions):
    return [float(len(p.split())) for p in prompts]


def test_a_reward_function_written_for_trl_is_called_as_trl_calls_it():
    """`def f(completions, answer, **kwargs)` (TRL's convention) was called positionally, as f(prompts, responses):
    completions got the prompts and answer the responses, a TypeError ('multiple values for argument'). Now a call
    that names `completions` gets the texts by keyword, and its fields as any reward's."""
    from modules.rewards import call_text_reward, trl_style

    roll = rollout(["4", "5", "9", "9"]).with_fields({"answer": ["4", "9"]})
    assert trl_style(trl_accuracy) and not trl_style(correct)
    assert required_fields(trl_accuracy) == ["answer"] and required_fields(trl_prompt_length) == []
    assert score(trl_accuracy, roll, tokenizer=None)[0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert call_text_reward(trl_prompt_length, ["a b", "c"], ["x", "y"], {}) == [2.0, 1.0]
    both = Composed({"right": trl_accuracy, "ours": correct}, weights={"ours": 0.5})
    assert score(both, roll, tokenizer=None)[0].tolist() == [1.5, 0.0, 1.5, 1.5]
    assert both(roll.prompts, roll.responses, **roll.fields) == [1.5, 0.0, 1.5, 1.5]     # as an evaluation reward
    with pytest.raises(RewardError, match=r"takes 'answer' by keyword, which no record field provides"):
        score(trl_accuracy, rollout(["4", "5"]), tokenizer=None)


def test_a_trl_reward_function_by_its_import_path_trains_and_evaluates(tmp_path, sft_dir):
    config = maths_config(tmp_path, sft_dir, ["answer"])
    cli = cli_main(["fit", "--config", config, "--model.init_args.reward=tests.test_reward_fields.trl_accuracy"])
    assert "train/reward" in cli.trainer.callback_metrics


def test_an_async_reward_that_does_not_finish_in_time_is_cancelled_and_named(task_tokenizer_path):
    """`reward_timeout`: a call still running after it is cancelled and the run stops with one line naming the
    reward (where it would hang); the loop stays usable, and within a longer limit the same reward finishes."""
    import asyncio
    import time

    from modules.rewards import reward_timeout
    from modules.rl import RLModule

    cancelled = []

    async def slow(prompts, responses):
        try:
            await asyncio.sleep(float(prompts[0].split()[-1]) / 10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return [1.0] * len(responses)

    roll = rollout(["a", "b"])
    roll.prompts = ["wait 50", "wait 50"]                # 5 s
    start = time.perf_counter()
    with reward_timeout(0.3), pytest.raises(RewardError, match=r"^reward \S*slow: an async call did not finish "
                                                               r"within 0.3 s; set model.init_args.reward_timeout"):
        score(slow, roll, None)
    assert time.perf_counter() - start < 3
    for _ in range(100):                                 # (the cancellation lands on the loop's thread)
        if cancelled:
            break
        time.sleep(0.01)
    assert cancelled
    with reward_timeout(0.3, knob=None), pytest.raises(RewardError, match=r"^reward \S*slow: an async call did not "
                                                                          r"finish within 0.3 s; the limit outside the "
                                                                          r"RL stage, which no setting changes; give"):
        score(slow, roll, None)                          # (an SFT stage's evaluation: no setting to name)
    roll.prompts = ["wait 1", "wait 1"]                  # 0.1 s
    with reward_timeout(5):
        assert score(slow, roll, None)[0].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"RLModule: reward_timeout=0; expected seconds > 0, or null"):
        RLModule(policy=None, tokenizer=task_tokenizer_path, reward=slow, objective=None, reward_timeout=0)


async def sleepy(prompts, responses):
    """An async reward that takes 5 s."""
    import asyncio

    await asyncio.sleep(5)
    return [0.0] * len(responses)


def test_the_rl_stage_stops_on_an_async_reward_past_its_reward_timeout(tmp_path, sft_dir):
    """`model.init_args.reward_timeout: 0.2` and a reward that takes 5 s: the first rollout's scoring stops the run
    with the line naming the reward, instead of waiting (for ever, for a call that never returns)."""
    from tests.helpers import tiny_rl_config
    from train import cli_main

    config = tiny_rl_config(tmp_path, sft_dir, model={"reward": "tests.test_reward_fields.sleepy", "reward_timeout": 0.2})
    with pytest.raises(RewardError, match=r"^reward tests.test_reward_fields.sleepy: an async call did not finish "
                                          r"within 0.2 s"):
        cli_main(["fit", "--config", config])


def test_gdpo_normalises_the_composed_terms_of_a_run_apart(tmp_path, sft_dir):
    """GRPO-4 with `multi_objective_aggregation: normalize_then_sum` (GDPO) on the composed sums reward (correct + 0.2
    format): it trains end to end, and the advantages of a rollout are `decoupled_advantages` of its two terms in
    the composed reward's order with their weights, not GRPO's of the sum."""
    from modules.objectives.grpo import decoupled_advantages, group_normalized_advantages

    config_path = maths_config(tmp_path, sft_dir, ["answer"])
    config = yaml.safe_load(open(config_path))
    config["model"]["init_args"]["objective"] = {"class_path": "modules.objectives.grpo.GRPO", "init_args": {
        "k": 4, "multi_objective_aggregation": "normalize_then_sum"}}
    yaml.safe_dump(config, open(config_path, "w"))
    seen = []
    import modules.objectives.grpo as grpo

    prepare = grpo.GRPO.prepare
    grpo.GRPO.prepare = lambda self, batch: seen.append(batch) or prepare(self, batch)
    try:
        cli = cli_main(["fit", "--config", config_path])
    finally:
        grpo.GRPO.prepare = prepare
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = seen[0]
    assert batch.reward_terms.shape == (len(batch.rewards), 2) and batch.reward_weights.tolist() == pytest.approx([1, 0.2])
    assert torch.allclose(batch.rewards, batch.reward_terms[:, 0] + 0.2 * batch.reward_terms[:, 1])
    advantages = prepare(cli.model.objective, batch)["advantages"]
    assert torch.allclose(advantages, decoupled_advantages(batch.reward_terms, batch.reward_weights, 4))
    plain = group_normalized_advantages(batch.rewards, 4)
    assert not torch.allclose(advantages, plain, atol=1e-3) or torch.allclose(plain, torch.zeros_like(plain))


def test_p3o_normalize_terms_trains_on_each_terms_scaled_differences(tmp_path, sft_dir):
    """P3O with `normalize_terms` on the composed sums reward (correct + 0.2 format): it trains end to end, and the
    rewards whose differences it trains on are `normalized_term_rewards` of the rollout's two terms with their weights."""
    from modules.objectives.p3o import P3O, normalized_term_rewards

    config_path = maths_config(tmp_path, sft_dir, ["answer"])
    config = yaml.safe_load(open(config_path))
    config["model"]["init_args"]["objective"]["init_args"]["normalize_terms"] = True
    yaml.safe_dump(config, open(config_path, "w"))
    seen, prepare = [], P3O.prepare
    P3O.prepare = lambda self, batch: seen.append((batch, prepare(self, batch))) or seen[-1][1]
    try:
        cli = cli_main(["fit", "--config", config_path])
    finally:
        P3O.prepare = prepare
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch, extra = seen[0]
    assert batch.reward_terms.shape == (len(batch.rewards), 2) and batch.reward_weights.tolist() == pytest.approx([1, 0.2])
    assert torch.equal(extra["term_rewards"], normalized_term_rewards(batch.reward_terms, batch.reward_weights, 2))


@pytest.mark.parametrize("options, message", [
    ({}, "so the reward must be a modules.rewards.Composed of named terms; got datamodules.task.GoldReward"),
    ({"composed": True, "missing_eos_penalty": 1.0}, "so missing_eos_penalty and nonfinite_reward"),
    ({"composed": True, "nonfinite_reward": -1.0}, "so missing_eos_penalty and nonfinite_reward")])
@pytest.mark.parametrize("objective", ["gdpo", "p3o"])
def test_per_term_normalisation_needs_a_composed_reward_and_nothing_that_shifts_its_sum(sft_dir, options, message,
                                                                                      objective):
    """GDPO and P3O's `normalize_terms` read the composed reward's terms: any other reward, or an option that
    changes their sum, is one line."""
    from datamodules.task import GoldReward
    from modules.backbone import BackboneSpec
    from modules.objectives.grpo import GRPO
    from modules.objectives.p3o import P3O
    from modules.rl import RLModule

    options = dict(options)                             # (the parameter is shared by both objectives' cases)
    reward = Composed({"gold": GoldReward()}) if options.pop("composed", False) else GoldReward()
    built = GRPO(multi_objective_aggregation="normalize_then_sum") if objective == "gdpo" else P3O(normalize_terms=True)
    with pytest.raises(ValueError, match=message):
        RLModule(BackboneSpec(pretrained=sft_dir), sft_dir, reward=reward, objective=built, **options)
