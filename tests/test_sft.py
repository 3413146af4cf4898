"""SFT stage end to end: a tiny fit through the CLI changes the parameters and its export reloads."""
import torch
import yaml

from modules.backbone import build_causal_lm
from tests.helpers import derived_config
from train import cli_main


def tiny_sft_config(tmp_path) -> str:
    base = yaml.safe_load(open("configs/quickstart/sft.yaml"))
    callbacks = base["trainer"]["callbacks"]
    callbacks[0]["init_args"]["dirpath"] = str(tmp_path / "sft")
    callbacks[1]["init_args"]["num_prompts"] = 4
    return derived_config("configs/quickstart/sft.yaml", tmp_path, {
        "trainer": {"max_epochs": 1, "limit_train_batches": 6, "limit_val_batches": 2, "callbacks": callbacks,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "data": {"init_args": {"source": {"init_args": {"num_train": 200, "num_val": 16,
                                                       "cache_dir": str(tmp_path / "tok")}}}},
    }, "sft.yaml")


def test_tiny_sft_fit_changes_parameters_and_export_reloads(tmp_path, capsys):
    cli = cli_main(["fit", "--config", tiny_sft_config(tmp_path)])
    module = cli.model
    before = build_causal_lm(module.backbone, module.tokenizer)  # same seed -> the initial weights
    changed = [n for n, p in module.policy.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert len(changed) > 0.9 * len(before.state_dict())
    assert "train/loss" in cli.trainer.callback_metrics and "val/perplexity" in cli.trainer.callback_metrics
    assert "gold_reward=" in capsys.readouterr().out  # the end-of-fit report

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    for name, p in model.state_dict().items():
        assert torch.equal(p, module.policy.state_dict()[name]), name
    ids = tok("write a review of the cafe :", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*"))
