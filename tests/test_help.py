"""`--help` explains every knob: each class a config names (and each of our classes nested in one) has a summary
line and a description of every argument, as jsonargparse reads them from the docstrings."""
import importlib
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

OURS = ("modules", "datamodules", "callbacks")
EXTRA = ["modules.engines.Sampler", "modules.engines.MismatchCorrection", "modules.sampling.SamplingConfig",
         "modules.backbone.BackboneSpec", "datamodules.sources.FieldMap",   # nested without a class_path of their own
         "datamodules.sources.LocalFiles", "datamodules.formats.CarperTLDR",  # named by the README
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
