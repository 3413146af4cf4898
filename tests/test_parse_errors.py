"""modules/parse_errors.py: a config or command line jsonargparse refuses stops the run with one line naming the
field, the nearest valid key and where it was given (before: the 50-line usage, then a nested report of every
union alternative ending with the whole parsed config)."""
import pytest
import yaml

from modules.parse_errors import nearest, one_line, where_given
from train import cli_main

# jsonargparse 4.53's report for `model.init_args.sampling.temp` in a config (the last line, the whole parsed
# config, shortened): a union inside a union.
NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'modules.rl.RLModule':
        Parser key "sampling":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'modules.sampling.SamplingConfig'>, <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'modules.sampling.SamplingConfig':
                Option 'temp' is not accepted
            - Expected a <class 'NoneType'>
          Given value type: <class 'dict'>
          Given value: {'temperature': 1.0, 'temp': 0.5}
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'class_path': 'modules.rl.RLModule', 'init_args': {'sampling': {'temperature': 1.0, 'temp': 0.5}}}"""

# ... for `--model.init_args.objective=modules.objectives.p3o.P30` on the command line: the reason is a continuation
# line at the item's own text column.
IMPORT = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'modules.rl.RLModule':
        Parser key "objective":

          - Expected a path but modules.objectives.p3o.P30 either not accessible or invalid
          - Problem with given class_path 'modules.objectives.p3o.P30':
            module 'modules.objectives.p3o' has no attribute 'P30'
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='objective', val='modules.objectives.p3o.P30')"""

# ... for a misspelt callback argument: the field is inside a list.
LISTED = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'callbacks.evaluation.Evaluation':
        Option 'num_prompt' is not accepted
    - Not a valid subclass of Callback
      Subclass types expect one of:
      - a class path (str)
    - Expected a <class 'NoneType'>
  Given value type: <class 'list'>
  Given value: [{'class_path': 'callbacks.evaluation.Evaluation', 'init_args': {'num_prompt': 4}}]"""


def test_a_nested_report_becomes_the_field_the_reason_and_the_nearest_key():
    """The sampling block is a dataclass (no `init_args` in its path); 'temp' is short for 'temperature', which
    difflib alone does not find (ratio 0.53)."""
    assert one_line(NESTED, []) == ("model.init_args.sampling.temp: modules.sampling.SamplingConfig has no argument "
                                    "'temp'; did you mean 'temperature'?")
    assert one_line(IMPORT, []) == ("model.init_args.objective: modules.objectives.p3o.P30: module "
                                    "'modules.objectives.p3o' has no attribute 'P30'; did you mean 'P3O'?")
    assert one_line(LISTED, []) == ("trainer.callbacks[...].init_args.num_prompt: callbacks.evaluation.Evaluation has "
                                    "no argument 'num_prompt'; did you mean 'num_prompts'?")


def test_a_misspelt_option_of_the_parser_itself_is_compared_with_its_siblings_or_its_first_part():
    options = ("config", "seed_everything", "trainer.max_epochs", "trainer.max_steps", "model", "data")
    assert one_line("Subcommand 'fit' does not accept option 'trainer.max_epoch'", [], options) == \
        "trainer.max_epoch: not an option of train.py; did you mean 'max_epochs'?"
    assert one_line("unrecognized arguments: --modle.init_args.epochs=1", [], options) == \
        "modle: not an option of train.py; did you mean 'model'?"
    assert one_line("Subcommand 'fit' does not accept option 'seed_everythin'", [], options) == \
        "seed_everythin: not an option of train.py; did you mean 'seed_everything'?"


def test_nearest_prefers_difflib_then_a_key_it_shortens_and_otherwise_nothing():
    assert nearest("epoch", ("epochs", "seed")) == "epochs"
    assert nearest("temp", ("temperature", "top_p")) == "temperature"
    assert nearest("te", ("temperature",)) is None      # too short to guess from a prefix
    assert nearest("colour", ("shape", "size")) is None


def test_a_report_of_another_shape_is_printed_whole_on_one_line_without_the_given_value():
    """A newer jsonargparse may word its report otherwise: nothing of it is lost but the parsed config."""
    message = "Something new:\n  the reason\n  Given value: {'huge': 'config'}"
    assert one_line(message, []) == "Something new: the reason (see python train.py fit --help)"


def test_where_given_names_the_command_line_or_the_last_config_file_holding_the_field(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"model": {"init_args": {"epoch": 2}}}))
    second.write_text(yaml.safe_dump({"model": {"init_args": {"epochs": 2}}}))
    both = ["fit", "--config", str(first), "-c", str(second)]
    assert where_given("model.init_args.epoch", both) == f"in {first}"
    assert where_given("model.init_args.epochs", both) == f"in {second}"
    assert where_given("model.init_args.epoch", ["fit", "--model.epoch=2"]) == "on the command line"
    assert where_given("model.init_args.other", both) is None
    # a block named on the command line does not hide the file that holds the field itself
    assert where_given("model.init_args.epoch", [*both, "--model=modules.rl.RLModule"]) == f"in {first}"
    assert where_given("model.init_args.other", [*both, "--model=modules.rl.RLModule"]) == "on the command line"


@pytest.mark.parametrize("where, setting, line", [
    ("file", {"model": {"init_args": {"epoch": 2}}},
     "model.init_args.epoch: modules.rl.RLModule has no argument 'epoch'; did you mean 'epochs'?"),
    ("file", {"model": {"init_args": {"objective": {"init_args": {"clip": 0.3}}}}},
     "model.init_args.objective.init_args.clip: modules.objectives.p3o.P3O has no argument 'clip'; did you mean "
     "'clip_eps'?"),
    ("file", {"model": {"init_args": {"policy": {"lora_r": 4}}}},
     "model.init_args.policy.lora_r: modules.rl.RLModule's policy has no field 'lora_r'; did you mean 'lora'?"),
    ("file", {"data": {"init_args": {"batchsize": 4}}},
     "data.init_args.batchsize: datamodules.pairs.PairDataModule has no argument 'batchsize'; did you mean "
     "'batch_size'?"),
    ("file", {"trainer": {"max_epoch": 2}}, "trainer.max_epoch: not an option of train.py; did you mean 'max_epochs'?"),
    ("file", {"model": {"init_args": {"epochs": "two"}}}, "model.init_args.epochs: expected int, got 'two'"),
    ("line", "--model.init_args.objective.init_args.variant=v3",
     "model.init_args.objective.init_args.variant: expected Literal['v1', 'v2'], got 'v3'"),
    ("line", "--model.init_args.sampling.temp=0.5",
     "model.init_args.sampling.temp: modules.sampling.SamplingConfig has no argument 'temp'; did you mean "
     "'temperature'?"),
    ("line", "--trainer.max_epochz=2", "trainer.max_epochz: not an option of train.py; did you mean 'max_epochs'?"),
    # a prefix of an option: argparse took it for the option, silently (as no config file or init_args key is)
    ("line", "--trainer.max_epoch=2", "trainer.max_epoch: not an option of train.py; did you mean 'max_epochs'?"),
    ("line", "--seed_every=3", "seed_every: not an option of train.py; did you mean 'seed_everything'?"),
    ("line", "--trainer.precision=bf17", "trainer.precision: expected int or Literal['transformer-engine', "
     "'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', '32-true', '64-true'] or "
     "Literal['64', '32', '16', 'bf16'], got 'bf17'"),
    ("line", "--model.init_args.reward.init_args.paht=x",         # a class given for a Callable-typed argument
     "model.init_args.reward.init_args.paht: modules.rewards.RewardModel has no argument 'paht'; did you mean 'path'?"),
    ("line", "--model.init_args.optimizer=torch.optim.Adamw",
     "model.init_args.optimizer: torch.optim.Adamw: module 'torch.optim' has no attribute 'Adamw'; did you mean "
     "'AdamW'?"),
    ("line", "--trainer.callbacks+=callbacks.evaluation.Evaluaton",
     "trainer.callbacks: callbacks.evaluation.Evaluaton: module 'callbacks.evaluation' has no attribute 'Evaluaton'; "
     "did you mean 'Evaluation'?"),
])
def test_a_mistake_in_a_config_or_on_the_command_line_stops_with_one_line(tmp_path, capsys, where, setting, line):
    """Through the CLI, before anything is built: the line, then where the field was given; nothing else printed."""
    mine = tmp_path / "mine.yaml"
    if where == "file":
        mine.write_text(yaml.safe_dump(setting))
        args = ["fit", "--config", "configs/quickstart/p3o.yaml", "--config", str(mine)]
    else:
        args = ["fit", "--config", "configs/quickstart/p3o.yaml", setting]
    with pytest.raises(SystemExit) as stop:
        cli_main(args)
    origin = f"in {mine}" if where == "file" else "on the command line"
    assert str(stop.value) == f"error: {line} ({origin})"
    printed = capsys.readouterr()
    assert "usage:" not in printed.err and "Given value" not in printed.err


def test_jsonargparse_debug_gives_its_own_report(monkeypatch):
    """`JSONARGPARSE_DEBUG=true` (jsonargparse's switch) keeps its whole report, raised, for a bug in this module."""
    from jsonargparse import ArgumentError

    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    with pytest.raises(ArgumentError, match="Option 'epoch' is not accepted"):
        cli_main(["fit", "--config", "configs/quickstart/p3o.yaml", "--model.init_args.epoch=2"])


@pytest.mark.parametrize("text, line", [
    ("model:\n  init_args: {policy: {pretrained: x}\n", "not valid YAML: while parsing a flow mapping in \"{file}\", "
     "line 2, column 14 expected ',' or '}', but got '<stream end>' in \"{file}\", line 3, column 1"),
    ("trainer:\n\tmax_epochs: 1\n", "not valid YAML: while scanning for the next token found character '\\t' that "
     "cannot start any token in \"{file}\", line 2, column 1"),
    ("- a\n- b\n", "holds a list; expected a mapping of settings (trainer:, model:, data:, ...)"),
    ("", "is empty; expected a mapping of settings (trainer:, model:, data:, ...)"),
])
def test_a_config_file_that_is_not_a_mapping_of_settings_is_named_with_yamls_reason(tmp_path, text, line):
    """jsonargparse says "Problems parsing config: ..." without the file, and "Unexpected config: " with nothing
    else for an empty one."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", "configs/quickstart/p3o.yaml", "--config", str(mine)])
    assert str(stop.value) == f"error: --config {mine}: " + line.replace("{file}", str(mine))


def test_a_missing_config_file_is_named():
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", "no/such.yaml"])
    assert str(stop.value).startswith("error: --config: File does not exist:") and "no/such.yaml" in str(stop.value)
