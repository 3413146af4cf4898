"""Entry point: `python train.py fit --config configs/quickstart/sft.yaml`.

A LightningCLI in subclass mode for model and data: any LightningModule / LightningDataModule is selected by
`class_path`. The tokenizer location is derived from the datamodule and linked into the model; `--export_dir`
sets the export folder (the `HFExport` callback's `dirpath`).

Exit codes of `python train.py`: 0 the run finished; 1 an error a user can fix, printed as one line
(`error: ...`: a config field, a data record, a reward, an export, a checkpoint); 130 / 143 training was stopped by
SIGINT / SIGTERM (128 + the signal): the checkpoint is saved and the export was not written.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()            # while the libraries import (see below)

import copy
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from callbacks.checkpoint import interrupted
from callbacks.export import ExportError, HFExport
from callbacks.rollout import OnPolicyRollout
from datamodules.sources import DataError
from modules.checkpoints import resume_check
from modules.checks import ConfigError, command_line_problem, config_problem, config_warnings
from modules.cli_help import class_help, help_request
from modules.cpu import reuse_freed_memory, sharded_allocator_warning
from modules.engines import SamplerMismatchError
from modules.parse_errors import one_line
from modules.process import exit_process, peer_failure
from modules.rewards import RewardError, qualified_name
from modules.rl import NonFiniteError

if __name__ == "__main__":
    # The imports above leave ~650,000 objects that live as long as the process. While they import, the collector
    # walks all objects it tracks over and over as their number grows: about 2 s of a run's CPU here, a fifth of
    # its start-up. Frozen, they stay out of every later walk too; what it costs is the few MB of garbage the
    # imports made, kept for the process's life (`tests/test_process.py`).
    gc.freeze()
    gc.enable()

log = logging.getLogger("train")
# Errors at a boundary the user controls; their message is the whole story (`main` prints it as one line).
USER_ERRORS = (ConfigError, DataError, ExportError, RewardError, NonFiniteError, SamplerMismatchError)
# What a class built from the config raises about the values it was given (`P3O(k=1)`, `BackboneSpec` with both
# `pretrained` and `config`, `Trainer(devices=0)`, a tokenizer folder it cannot read).
SETTING_ERRORS = (ValueError, OSError, MisconfigurationException)


def chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from (or during), outermost first: jsonargparse re-raises a
    constructor's error inside its own (`raise ... from`), once per level of the config it was building."""
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        out.append(err)
        seen.add(id(err))
        err = err.__cause__ if err.__cause__ is not None or err.__suppress_context__ else err.__context__
    return out


def root_cause(err: BaseException) -> BaseException:
    """The first exception of the chain that ends in `err`."""
    return chain(err)[-1]


def ours(err: BaseException) -> BaseException | None:
    """The outermost of this project's errors (`USER_ERRORS`: a message written to be the whole story) in the chain
    that ends in `err`, or None. Below it may lie the library errors it explains (a hub out of reach: transformers'
    OSError over huggingface_hub's, over httpx's)."""
    return next((e for e in chain(err) if isinstance(e, USER_ERRORS)), None)


class Parser(LightningArgumentParser):
    """LightningCLI's parser, but a config or command line it refuses (a misspelt key, a value of the wrong type, a
    class path that does not import) stops the run with one line (`modules.parse_errors`), not the usage and the
    whole parsed config. `JSONARGPARSE_DEBUG=true` gives jsonargparse's own report."""
    given: list[str] = []       # the arguments being parsed (to say which file or option held the field)

    def __init__(self, *args, **kwargs):
        # argparse would take a unique prefix of an option for the option (`--trainer.max_epoch=2` as max_epochs),
        # where a misspelt key in a config, or under `--model.init_args`, is refused: refused everywhere alike
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and os.environ.get("JSONARGPARSE_DEBUG", "").lower() != "true":
            parser = getattr(ex, "subcommand_parser", None) or self    # (the subcommand's, with its options)
            sys.exit(f"error: {one_line(message, Parser.given, tuple(a.dest for a in parser._actions))}")
        super().error(message, ex)


class RLHFCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        # Each stage takes its optimizer and scheduler as init arguments (`model.init_args.optimizer`, `.scheduler`):
        # no second way through LightningCLI's `--optimizer` / `--lr_scheduler`, which would replace the stage's
        # `configure_optimizers` (the RL stage's holds the value model's parameters too).
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer", apply_on="instantiate")
        parser.add_argument("--export_dir", type=Optional[str], default=None,
                            help="Where the HFExport callback writes the trained model (overrides its dirpath).")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """`fit` and `validate`: no stage has a test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def before_fit(self) -> None:
        """The RL stage (manual optimization: several optimizer steps per rollout) without its rollout callback, or
        with trainer settings for automatic optimization, which Lightning would refuse with a traceback and its
        advice to switch: what to set instead."""
        if self.model.automatic_optimization:
            return
        if not any(isinstance(cb, OnPolicyRollout) for cb in self.trainer.callbacks):
            raise ConfigError("trainer.callbacks: the RL stage needs callbacks.rollout.OnPolicyRollout, which samples "
                              "its rollouts; add it")
        if self.trainer.accumulate_grad_batches != 1:
            raise ConfigError(f"trainer.accumulate_grad_batches: {self.trainer.accumulate_grad_batches}; the RL stage "
                              "makes one optimizer step per minibatch of model.init_args.minibatch_groups prompts and "
                              "accumulates its micro-batches (model.init_args.micro_batch_tokens) itself: set those")
        if self.trainer.gradient_clip_val:
            raise ConfigError(f"trainer.gradient_clip_val: {self.trainer.gradient_clip_val}; the RL stage clips the "
                              "gradient norm itself: set model.init_args.max_grad_norm")

    def before_validate(self) -> None:
        if not is_overridden("validation_step", self.model):
            raise ConfigError(
                f"validate: {qualified_name(self.model)} has no validation loop: it evaluates (callbacks.evaluation."
                "Evaluation) during fit, every_n_batches and at the end. To evaluate an export on its own, validate "
                "it as an SFT policy: python train.py validate --config configs/quickstart/sft.yaml "
                "--model.init_args.backbone='{pretrained: <export>, config: null}'")

    def _parse_ckpt_path(self) -> None:
        """Lightning parses the settings saved in `--ckpt_path`'s checkpoint over the config: the checkpoint's model
        class and each of its settings would replace the config's and the command line's without a word. Here the
        config decides (it always names the stage): a checkpoint of another stage stops the run in one line, and the
        settings that differ from those of the run that wrote the checkpoint are warned about."""
        config = self._run_config()
        path = config.get("ckpt_path")
        if not path or not Path(path).is_file():                    # (a sharded checkpoint is a folder)
            return
        problem, differences = resume_check(path, config.get("model") or {})
        if problem:
            raise ConfigError(problem)
        if differences:
            rank_zero_only(log.warning)(
                "warning: --ckpt_path %s: this run's settings differ from those of the run that wrote it (%s); it goes "
                "on with this run's, so it does not repeat the interrupted run exactly", path, "; ".join(differences))

    def parse_arguments(self, parser, args) -> None:
        """A command-line null that jsonargparse would misread stops here, in one line (`command_line_problem`); a
        `--<field>.help <class path>` prints that class's arguments and exits."""
        given = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []   # (not a dict)
        if problem := command_line_problem(list(given)):
            sys.exit(f"error: {problem}")
        if request := help_request(list(given)):      # `--<field>.help <class path>` for any field (`cli_help`)
            print(class_help(*request))
            sys.exit(0)
        Parser.given = list(given)
        super().parse_arguments(parser, args)

    def _run_config(self) -> dict:
        """The parsed config of the subcommand being run (the whole config without one), as a dict."""
        subcommand = self.config.get("subcommand")      # (read before LightningCLI sets `self.subcommand`)
        config = self.config.get(subcommand, self.config) if subcommand else self.config
        return config.as_dict() if hasattr(config, "as_dict") else dict(config)

    def before_instantiate_classes(self) -> None:
        """Settings that cannot work (a missing local model path, epochs 0, a negative learning rate, ...) stop
        here with one line naming the config field, before anything is built; doubtful ones are warned about."""
        config = self._run_config()
        problem = config_problem(config)
        if problem:
            sys.exit(f"error: {problem}")
        for warning in config_warnings(config):       # every process reads the config: said by the first
            rank_zero_only(log.warning)("warning: %s", warning)

    def instantiate_classes(self) -> None:
        """A constructor's complaint about its settings stops the run with its own message as one line, not
        jsonargparse's stack trace with the whole parsed config; other errors keep their traceback."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = ours(err) or root_cause(err)
            if isinstance(cause, (*USER_ERRORS, *SETTING_ERRORS)):
                raise ConfigError(" ".join(str(cause).split())) from err
            raise
        export_dir = self._run_config().get("export_dir")
        if export_dir is not None:
            exports = [cb for cb in self.trainer.callbacks if isinstance(cb, HFExport)]
            if not exports:
                sys.exit("error: --export_dir: the config has no callbacks.export.HFExport to write the export")
            for callback in exports:
                callback.dirpath = export_dir
        if self.trainer.strategy.root_device.type == "cpu":
            if not isinstance(self.trainer.strategy, ModelParallelStrategy):
                reuse_freed_memory()
            elif (warning := sharded_allocator_warning()) and self.trainer.global_rank == 0:
                log.warning("warning: %s", warning)


class _NoAdverts(logging.Filter):
    """Drops Lightning's litlogger advert (an INFO line on every run that says nothing about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


# Warnings that say nothing actionable about a run of this project: frozen and dropout-free models are in eval mode
# on purpose; the RL stage's val split feeds the Evaluation callback, not a validation_step; a torch 2.13
# deprecation inside Lightning's own code.
QUIET = (r"Found \d+ module\(s\) in eval mode", r"You passed in a `val_dataloader` but have no `validation_step`",
         r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def quiet_output() -> None:
    """Keep the console to what a user reads: drop the warnings above, Lightning's litlogger advert and
    transformers' per-file progress bars (loading and writing a 100 KB model)."""
    import warnings

    from transformers.utils import logging as hf_logging

    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _NoAdverts) for f in handler.filters):
            handler.addFilter(_NoAdverts())
    hf_logging.disable_progress_bar()


def cli_main(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_output()
    return RLHFCLI(args=args, run=run, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_kwargs={"overwrite": True})


def merge_config(base: dict, override: dict) -> dict:
    """Deep merge for deriving configs (benchmarks, tests). A dict naming a different `class_path` replaces the
    entry; lists replace lists (so `trainer.callbacks` is given whole)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        same_class = isinstance(old, dict) and value.get("class_path", old.get("class_path")) == old.get("class_path") \
            if isinstance(value, dict) else False
        if same_class:
            out[key] = merge_config(old, value)
        else:
            out[key] = value
    return out


def derive_config(source: str, override: dict, path: str | Path) -> str:
    """Write the YAML `source` deep-merged with `override` to `path`; returns the path."""
    config = merge_config(yaml.safe_load(Path(source).read_text()), override)
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def main(args: list[str] | None = None) -> int:
    """`python train.py ...`: the exit code (see the module docstring); user errors print one line."""
    try:
        cli = cli_main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if (line := peer_failure(err)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    signum = interrupted(cli.trainer) if cli.subcommand == "fit" else None
    return 128 + signum if signum else 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:                   # not a user's error: the traceback, then the same exit as any run's
        traceback.print_exc()
        code = 1
    exit_process(code)
