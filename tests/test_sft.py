"""SFT stage end to end: a tiny fit through the CLI changes the parameters and its export reloads."""
import pytest
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


def _demonstrations_config(tmp_path, sft_dir, stage: str, data: dict) -> str:
    """The tiny SFT (or reward) stage on a JSONL of {question, completion} demonstrations, with `data` set."""
    import json

    from tests.helpers import tiny_stage_config

    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"question": f"review the spa {i} :", "completion": "the staff was kind ."}) + "\n"
                            for i in range(16)))
    config_path = tiny_stage_config(tmp_path, stage, sft_dir, f"{stage}.yaml")
    config = yaml.safe_load(open(config_path))
    config["data"]["init_args"].update({"source": {"class_path": "datamodules.sources.LocalFiles",
                                                   "init_args": {"train": str(path), "val": str(path)}}, **data})
    yaml.safe_dump(config, open(config_path, "w"))
    return config_path


def test_sft_trains_on_demonstrations_without_a_rejected_response(tmp_path, sft_dir):
    """`chosen_only: true`: records {prompt, chosen} (here {question, completion} mapped by `fields`); the batches
    have no rejected side. Before, every record needed a rejected response, even for SFT."""
    data = {"chosen_only": True, "fields": {"prompt": "question", "chosen": "completion"}}
    cli = cli_main(["fit", "--config", _demonstrations_config(tmp_path, sft_dir, "sft", data)])
    assert cli.trainer.global_step == 4 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch.chosen is not None and batch.rejected is None and batch.chosen_text[0] == "the staff was kind ."


@pytest.mark.parametrize("stage, data, line", [
    ("sft", {"prompts_only": True, "fields": {"prompt": "question"}},
     "SFTModule trains on a chosen response; data prompts_only: true reads no response: set it false (records "
     "{prompt, chosen} need data chosen_only: true)"),
    ("reward", {"chosen_only": True, "fields": {"prompt": "question", "chosen": "completion"}},
     "RewardModule trains on chosen and rejected responses; data chosen_only: true reads a chosen response: set it "
     "false: records {prompt, chosen, rejected}"),
])
def test_a_stage_given_data_without_the_responses_it_trains_on_stops_in_one_line(tmp_path, sft_dir, capsys, stage,
                                                                                 data, line):
    """Before: SFT on prompts-only data died at its first batch with an AttributeError traceback."""
    from train import main

    assert main(["fit", "--config", _demonstrations_config(tmp_path, sft_dir, stage, data)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {line}"
