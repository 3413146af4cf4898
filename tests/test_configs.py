"""Every YAML under configs/ parses and instantiates (no training)."""
from pathlib import Path

import pytest

from train import cli_main

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if "presets" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_instantiates(config):
    cli = cli_main(["--config", config], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
