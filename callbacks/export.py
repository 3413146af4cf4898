"""HFExport: the trained model as a plain Hugging Face directory when training ends, written so nothing is lost.

- The final checkpoint is written first (`callbacks.checkpoint.finish_checkpoints`), so a failed export never
  loses the trained weights.
- The export is atomic: the module writes into a temporary folder beside the target (`.<name>.partial-<pid>`),
  which then replaces the target whole. A failure (disk full, a file where a folder should be, non-finite
  weights) removes the temporary folder, leaves the previous export (or nothing) in place, and raises one
  `ExportError` line naming the folder, the cause and the checkpoint that holds the weights.
- A folder holds one export: the previous export (or any Hugging Face model folder) is replaced whole, so no file
  of an earlier export is left beside the new one; a folder holding anything else is refused before training
  starts, as is a target that cannot be written (a file in its path, no write permission).
- An interrupted run (Ctrl-C / SIGTERM through `StepCheckpoint`) does not write over the export.
- `python train.py fit ... --export_dir <folder>` sets `dirpath` from the command line.
Rank 0 writes; every rank gathers sharded parameters.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal

import lightning as L

from callbacks.checkpoint import finish_checkpoints, interrupted, saved_checkpoint
from callbacks.sharding import full_parameters

log = logging.getLogger(__name__)

MARKER = "export.json"                                        # written last: a folder with it is a whole export
MODEL_FILES = ("config.json", "adapter_config.json", MARKER)  # any of these: a model folder we may replace


class ExportError(RuntimeError):
    """The export cannot be written; the message names the folder, the cause and where the weights are."""


class HFExport(L.Callback):
    """Calls `pl_module.export(directory, merge_lora, final_dir)` when training ends, before the strategy tears down; every
    stage module implements `export`.

    Args:
        dirpath: the export folder (replaced whole by each export; `--export_dir` on the command line).
        merge_lora: False writes a LoRA model as adapter + base (see `modules.export.export_model`).
    """

    def __init__(self, dirpath: str, merge_lora: bool = True):
        self.dirpath, self.merge_lora = dirpath, merge_lora
        self.done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        problem = target_problem(self.dirpath)
        if problem:
            raise ExportError(f"HFExport: {problem}; set another folder with --export_dir (nothing was trained)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finish_checkpoints(trainer)
        stopped_by = interrupted(trainer)
        if stopped_by:
            self.done = True
            if trainer.is_global_zero:
                log.warning("%s: training did not finish, so %s was not written (resume with --ckpt_path %s)",
                            signal.Signals(stopped_by).name, self.dirpath, saved_checkpoint(trainer) or "<checkpoint>")
            return
        self.export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint that was already complete skips the train hooks: export its weights (the
        # way to finish a run whose export failed).
        if not self.done and trainer.ckpt_path:
            finish_checkpoints(trainer)
            self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.done = True
        failure = None
        if hasattr(pl_module, "before_export"):      # every rank: work the export needs that sharded models share
            pl_module.before_export()
        with full_parameters(trainer):
            if trainer.is_global_zero:
                try:
                    write_atomically(self.dirpath, lambda tmp: pl_module.export(tmp, self.merge_lora, self.dirpath),
                                     {"stage": type(pl_module).__name__, "checkpoint": saved_checkpoint(trainer),
                                      "training_batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed})
                    log.info("exported %s to %s", type(pl_module).__name__, self.dirpath)
                except Exception as err:  # noqa: BLE001 -- any cause; the weights are safe in the checkpoint
                    failure = f"{type(err).__name__}: {err}".splitlines()[0]
        trainer.strategy.barrier("hf_export")
        failure = trainer.strategy.broadcast(failure)
        if failure:
            where = saved_checkpoint(trainer)
            raise ExportError(f"export to {self.dirpath} failed ({failure}); the folder is unchanged; the trained "
                              + (f"weights are in {where} (run the same command with --ckpt_path {where} to export "
                                 "again)" if where else "weights were not saved (no StepCheckpoint in the callbacks)"))


def target_problem(directory: str) -> str | None:
    """Why `directory` cannot receive an export (None if it can): a file in its place or in its path, no write
    permission where it would be created, or a folder holding something other than a model."""
    if os.path.isdir(directory):
        entries = [e for e in os.listdir(directory) if not e.startswith(".")]
        if entries and not any(name in entries for name in MODEL_FILES):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            return (f"export folder {directory} holds something other than a model export ({shown}); an export "
                    "replaces its folder whole")
        parent = os.path.dirname(os.path.abspath(directory))
    elif os.path.exists(directory):
        return f"export folder {directory} is a file"
    else:
        parent = os.path.dirname(os.path.abspath(directory))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"export folder {directory} cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"export folder {directory} cannot be written: no write permission in {parent}"
    return None


def write_atomically(directory: str, write, record: dict) -> None:
    """Run `write(tmp)` on a fresh folder beside `directory`, add `export.json` (`record`), then replace
    `directory` whole by it. On any failure the temporary folder is removed and `directory` is untouched."""
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp, old = (os.path.join(parent, f".{name}.{kind}-{os.getpid()}") for kind in ("partial", "old"))
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        with open(os.path.join(tmp, MARKER), "w") as handle:
            json.dump({"written_by": "p3o-rlhf", **record}, handle, indent=2)
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(directory):
            os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)

