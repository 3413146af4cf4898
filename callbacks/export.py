"""Export the trained model in Hugging Face format when training ends (rank 0 writes; every rank gathers)."""
from __future__ import annotations

import logging

import lightning as L

from callbacks.sharding import full_parameters

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """Calls `pl_module.export(dirpath, merge_lora)` when training ends, before the strategy tears down; every
    stage module implements `export`.

    merge_lora: False writes a LoRA model as adapter + base (see `modules.backbone.export_model`).
    """

    def __init__(self, dirpath: str, merge_lora: bool = True):
        self.dirpath, self.merge_lora = dirpath, merge_lora

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with full_parameters(trainer):
            if trainer.is_global_zero:
                pl_module.export(self.dirpath, self.merge_lora)
                log.info("exported %s to %s", type(pl_module).__name__, self.dirpath)
        trainer.strategy.barrier("hf_export")
