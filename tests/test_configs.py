"""Every YAML under configs/ parses and instantiates (no training).

Configs that start from earlier stages' exports (artifacts/quickstart/...) are pointed at tiny stand-ins.
"""
from pathlib import Path

import pytest

from train import cli_main

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if "presets" not in p.parts)


@pytest.fixture(scope="module")
def reward_dir(sft_dir, tmp_path_factory):
    from modules.backbone import BackboneSpec
    from modules.reward import RewardModule

    module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir)
    module.configure_model()
    path = str(tmp_path_factory.mktemp("rm") / "reward")
    module.export(path)
    return path


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_instantiates(config, sft_dir, reward_dir, tmp_path):
    text = Path(config).read_text()
    text = text.replace("artifacts/quickstart/sft", sft_dir).replace("artifacts/quickstart/reward", reward_dir)
    local = tmp_path / Path(config).name
    local.write_text(text)
    cli = cli_main(["--config", str(local)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    cli.model.configure_model()
    assert next(cli.model.parameters()).numel() > 0
