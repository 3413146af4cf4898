"""`--help` explains every knob: each class a config names (and each of our classes nested in one) has a summary
line and a description of every argument, as jsonargparse reads them from the docstrings."""
import importlib
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from train import cli_main, main

OURS = ("modules", "datamodules", "callbacks")
EXTRA = ["modules.engines.Sampler", "modules.engines.MismatchCorrection", "modules.sampling.SamplingConfig",
         "modules.backbone.BackboneSpec", "datamodules.sources.FieldMap",   # nested without a class_path of their own
         "datamodules.sources.LocalFiles", "datamodules.formats.CarperTLDR",  # named by the README
         "datamodules.formats.Messages", "datamodules.formats.ImplicitPrompt",
         "modules.rewards.DifferenceOf", "modules.rewards.PromptShift",
         "modules.remote.RemoteReward", "modules.remote.RemotePairwiseReward", "modules.verifiable.Contains",
         "modules.verifiable.PythonTests"]


def _class_paths(node, out: set) -> set:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str) and value.split(".")[0] in OURS:
                out.add(value)
            _class_paths(value, out)
    elif isinstance(node, list):
        for value in node:
            _class_paths(value, out)
    return out


CLASSES = sorted(set().union(*(_class_paths(yaml.safe_load(p.read_text()), set())
                               for p in Path("configs").rglob("*.yaml"))) | set(EXTRA))


def _load(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_the_configs_name_our_classes():
    assert {"modules.rl.RLModule", "modules.objectives.p3o.P3O", "modules.engines.VLLM"} <= set(CLASSES)


@pytest.mark.parametrize("path", CLASSES)
def test_every_argument_has_help(path):
    cls = _load(path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    summary = (cls.__doc__ or "").strip().splitlines()
    assert summary and not summary[0].rstrip().endswith(":"), f"{path}: the docstring needs a summary line first"
    undocumented = [a.dest for a in parser._actions
                    if a.dest.startswith("x.") and not a.dest.endswith(".help")
                    and not (a.help or "").split("(type:")[0].strip()]
    assert not undocumented, f"{path}: no help for {undocumented}"


def test_help_request_reads_a_dotted_path_after_a_help_option_and_leaves_short_names_to_jsonargparse():
    from modules.cli_help import help_request
    assert help_request(["fit", "--model.init_args.reward.help", "modules.verifiable.AnswerMatch"]) == \
        ("model.init_args.reward", "modules.verifiable.AnswerMatch")
    assert help_request(["--config", "x.yaml", "--trainer.callbacks.help=callbacks.evaluation.Evaluation"]) == \
        ("trainer.callbacks", "callbacks.evaluation.Evaluation")
    assert help_request(["fit", "--model.init_args.objective.help", "P3O"]) is None      # jsonargparse's own
    assert help_request(["fit", "--model.init_args.objective.help", "--config", "x.yaml"]) is None
    assert help_request(["fit", "--help"]) is None


@pytest.mark.parametrize("field, path, options", [
    # a reward is typed Callable (a function is one too): jsonargparse had no help for it ("has no argument 'help'")
    ("model.init_args.reward", "modules.verifiable.AnswerMatch", ["field", "extract", "tolerance"]),
    ("model.init_args.reward", "modules.remote.RemoteReward", ["url", "timeout", "retries", "headers"]),
    ("model.init_args.reward", "modules.rewards.Composed", ["rewards", "weights"]),
    # with no config naming the stage, jsonargparse had none for the objective either
    ("model.init_args.objective", "modules.objectives.p3o.P3O", ["variant", "clip_eps", "kl_coef", "scale_q"]),
])
def test_help_names_every_argument_of_any_class_as_a_command_line_option(capsys, field, path, options):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", f"--{field}.help", path])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert f"Help for --{field}.help={path}" in out
    summary = " ".join(_load(path).__doc__.split("\n\n")[0].split())
    assert summary in " ".join(out.split())                     # the whole summary, not its first line only
    for name in options:
        assert f"--{field}.init_args.{name} " in out


def test_help_for_a_function_says_how_to_name_it_and_how_it_is_called(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.init_args.reward.help", "tests.test_help.exact_answer"])
    out = capsys.readouterr().out
    assert out.startswith("tests.test_help.exact_answer is a function: it takes no settings; name it by its path "
                          "alone, without init_args (reward: tests.test_help.exact_answer).\nIt is called as "
                          "exact_answer(prompts, responses, answer) -> list[float]\n\n1.0 where")


def exact_answer(prompts, responses, answer) -> list[float]:
    """1.0 where the response is the record's answer, else 0.0."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]


@pytest.mark.parametrize("path, line", [
    ("modules.verifiable.AnswerMatc", "error: --model.init_args.reward.help: modules.verifiable.AnswerMatc does not "
                                      "import (module 'modules.verifiable' has no attribute 'AnswerMatc')"),
    ("no_such.Reward", "error: --model.init_args.reward.help: no_such.Reward does not import (No module named "
                       "'no_such')"),
    ("tests.test_help.CLASSES", "error: --model.init_args.reward.help: tests.test_help.CLASSES is a list, not a class "
                                "or a function"),
])
def test_help_for_what_is_not_a_class_is_one_line(capsys, path, line):
    assert main(["fit", "--model.init_args.reward.help", path]) == 1
    assert capsys.readouterr().err.strip() == line
