"""Entry point: `python train.py fit --config configs/quickstart/sft.yaml`.

A LightningCLI in subclass mode for model and data: any LightningModule / LightningDataModule is selected by
`class_path`. The tokenizer location is derived from the datamodule and linked into the model.
"""
from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI


class RLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer_path", "model.init_args.tokenizer", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return RLHFCLI(args=args, run=run, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()
