"""Test helpers: derive small configs from the shipped YAMLs."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import yaml

from train import derive_config


def derived_config(source: str, tmp_path: Path, override: dict, name: str = "config.yaml") -> str:
    """Write `source` deep-merged with `override` to tmp_path/name; returns the path."""
    return derive_config(source, override, tmp_path / name)


def tiny_rl_config(tmp_path: Path, sft_dir: str, source: str = "configs/quickstart/p3o.yaml", name: str = "rl.yaml",
                   extra_callbacks: list | None = None, **trainer) -> str:
    """The quickstart RL config shrunk to seconds: a tiny SFT export, the gold reward, 16 prompts."""
    config = yaml.safe_load(Path(source).read_text())
    callbacks = [cb for cb in config["trainer"]["callbacks"] if not cb["class_path"].endswith("HFExport")]
    callbacks += extra_callbacks or []
    for cb in callbacks:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(num_prompts=8, every_n_steps=None, show=0)
    override = {
        "trainer": {"max_steps": -1, "max_epochs": 1, "callbacks": callbacks, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}, **trainer},
        "model": {"init_args": {"policy": {"pretrained": sft_dir},
                                "reward": {"class_path": "datamodules.task.GoldReward"},
                                "sampling": {"max_new_tokens": 8}, "epochs": 2, "minibatch_groups": 2}},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 4,
                               "source": {"init_args": {"num_train": 16, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }
    return derived_config(source, tmp_path, override, name)


class ParamDigest(L.Callback):
    """Test callback: each rank saves its policy's flattened parameters and the prompts it rolled out."""

    def __init__(self, path: str):
        self.path, self.prompts, self.initial = path, [], None

    def on_train_start(self, trainer, pl_module):
        self.initial = torch.cat([p.detach().flatten() for p in pl_module.policy.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts += list(batch.prompts)

    def on_fit_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.policy.parameters()])
        torch.save({"params": flat, "initial": self.initial, "prompts": self.prompts},
                   f"{self.path}.rank{trainer.global_rank}.pt")
