"""Export the trained model in Hugging Face format when fit ends (rank 0 only)."""
from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """Calls `pl_module.export(dirpath)` at the end of fit; every stage module implements `export`."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
            log.info("exported %s to %s", type(pl_module).__name__, self.dirpath)
        trainer.strategy.barrier("hf_export")
