"""Entry point: `python train.py fit --config configs/quickstart/sft.yaml`.

A LightningCLI in subclass mode for model and data: any LightningModule / LightningDataModule is selected by
`class_path`. The tokenizer location is derived from the datamodule and linked into the model.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from modules.backbone import missing_path


class RLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """A missing local model path stops here with one line naming the config field (and, for an export of
        another stage, the command that makes it) instead of a hub-id error deep inside transformers."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        problem = missing_path(config.as_dict() if hasattr(config, "as_dict") else dict(config))
        if problem:
            sys.exit(f"error: {problem}")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.trainer.strategy.root_device.type == "cpu":
            reuse_freed_memory()


def reuse_freed_memory() -> bool:
    """CPU training: let glibc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc serves blocks above its mmap threshold (128 KB, rising to at most 32 MB) from a fresh mmap and
    unmaps them on free, so blocks of 50-113 MB (logits over a 49k vocabulary, an embedding's gradient) pay page
    faults to zero their pages again on every step. `mallopt` with no
    mmap and no trimming reuses them (what jemalloc / tcmalloc, which PyTorch's CPU tuning guide recommends,
    do). Numbers are unchanged; the process keeps its peak memory mapped. Off with P3O_REUSE_FREED_MEMORY=0, and
    a no-op where libc is not glibc. Returns whether it was applied."""
    if os.environ.get("P3O_REUSE_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4                   # glibc <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


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


if __name__ == "__main__":
    cli_main()
