"""Pairwise preference-model stage: antisymmetric by construction, micro-batches equal one pass, a tiny fit learns
the pairs, the export's README code gives the same preferences as `modules.rewards.PreferenceModel`, the stage
reports against labels and gold through the CLI, and P3O trains on the export (SFT -> pairwise model -> P3O)."""
import re

import pytest
import torch
import yaml

from datamodules.collate import PairCollator, encode_prompt, encode_response
from modules.backbone import BackboneSpec
from modules.preference_model import PreferenceModule
from modules.rewards import PreferenceModel, score_pairs
from tests.helpers import derived_config, tiny_rl_config
from train import cli_main

ROWS = [(f"write a review of the {place} :", f"the {s} was great .", f"the {s} was awful .")
        for place in ("cafe", "hotel", "park", "zoo") for s in ("food", "staff", "view", "room")]


def batch_of(tokenizer, rows):
    return PairCollator(tokenizer.pad_token_id)([
        {"prompt": p, "prompt_ids": encode_prompt(tokenizer, p), "chosen": c, "rejected": r,
         "chosen_ids": encode_response(tokenizer, c), "rejected_ids": encode_response(tokenizer, r)}
        for p, c, r in rows])


def swapped(batch):
    return type(batch)(batch.prompt_ids, batch.prompt_mask, batch.prompts, batch.rejected, batch.chosen,
                       batch.rejected_text, batch.chosen_text)


def module(sft_dir, **kwargs) -> PreferenceModule:
    m = PreferenceModule(BackboneSpec(pretrained=sft_dir), sft_dir, **kwargs)
    m.configure_model()
    return m


def test_the_preference_is_antisymmetric_by_construction(sft_dir, tokenizer):
    m, batch = module(sft_dir), batch_of(tokenizer, ROWS[:5])
    with torch.no_grad():
        f, f_swapped = m.pair_margins(batch), m.pair_margins(swapped(batch))
        same = m.pair_margins(batch_of(tokenizer, [(p, c, c) for p, c, _ in ROWS[:5]]))
    assert torch.all(f != 0)                        # a random head still has an opinion ...
    assert torch.equal(f_swapped, -f)               # ... exactly mirrored when the responses swap places
    assert torch.equal(same, torch.zeros(5))        # and none between a response and itself


def test_micro_batches_give_the_loss_and_gradient_of_one_pass(sft_dir, tokenizer):
    batch = batch_of(tokenizer, ROWS[:6])
    whole, parts = module(sft_dir), module(sft_dir, micro_batch_tokens=1)
    for m in (whole, parts):
        m.training_step(batch, 0).backward()
    torch.testing.assert_close(parts.pair_margins(batch), whole.pair_margins(batch), rtol=0, atol=1e-6)
    for (name, a), b in zip(whole.scorer.named_parameters(), parts.scorer.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def fitted_preference_dir(sft_dir, tokenizer, tmp_path_factory) -> str:
    """A preference model fitted on separable pairs and exported; its training accuracy is checked in the test."""
    import lightning as L
    from torch.utils.data import DataLoader

    m = module(sft_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = [b for b in (batch_of(tokenizer, ROWS[i: i + 8]) for i in range(0, len(ROWS), 8))]
    L.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(m, DataLoader(data, batch_size=None, shuffle=False))
    path = str(tmp_path_factory.mktemp("pm") / "preference")
    m.export(path)
    with torch.no_grad():
        m.fitted_margins = m.pair_margins(batch_of(tokenizer, ROWS))
    pytest.preference_module = m
    return path


def test_a_tiny_fit_learns_the_pairs_and_the_export_reads_the_same_in_plain_transformers(fitted_preference_dir):
    m = pytest.preference_module
    assert torch.all(m.fitted_margins > 0)                              # every training pair learnt
    judge = PreferenceModel(fitted_preference_dir, normalize=False)
    prompts, chosen, rejected = zip(*ROWS)
    ours = torch.tensor(judge(list(prompts), list(chosen), list(rejected)))
    torch.testing.assert_close(ours, m.fitted_margins, rtol=0, atol=1e-5)
    assert torch.equal(torch.tensor(judge(list(prompts), list(rejected), list(chosen))), -ours)

    card = open(f"{fitted_preference_dir}/README.md").read()
    scope = {}
    exec(card.split("```python\n")[1].split("```")[0], scope)           # the export's README code, as pasted
    plain = torch.tensor([scope["preference"](p, c, r) for p, c, r in ROWS[:4]])
    torch.testing.assert_close(plain, ours[:4], rtol=0, atol=1e-5)


def test_calibration_stores_the_spread_on_sft_pairs_and_normalize_rescales_by_it(sft_dir, tokenizer, tmp_path):
    import json
    import math

    from modules.sampling import SamplingConfig

    m = PreferenceModule(BackboneSpec(pretrained=sft_dir), sft_dir, calibration_prompts=8,
                         sampling=SamplingConfig(max_new_tokens=8))
    m.configure_model()
    examples = [{"prompt": p, "prompt_ids": encode_prompt(tokenizer, p)} for p, _, _ in ROWS[:8]]
    cal = m.calibrate(examples)
    assert len(cal["pair_margins"]) == 8 and cal["std"] == pytest.approx(cal["pair_margins"].std().item())
    m.export(str(tmp_path / "pm"))
    stored = json.load(open(tmp_path / "pm" / "preference.json"))
    assert stored["std"] == pytest.approx(cal["std"]) and stored["n"] == 8
    args = (cal["prompts"], cal["responses_a"], cal["responses_b"])
    raw, normalised = (torch.tensor(PreferenceModel(str(tmp_path / "pm"), normalize=n)(*args)) for n in (False, True))
    torch.testing.assert_close(raw, cal["pair_margins"], rtol=0, atol=1e-5)   # calibration reads texts as the reward does
    torch.testing.assert_close(normalised, raw * math.sqrt(2) / cal["std"])
    assert normalised.std().item() == pytest.approx(math.sqrt(2), rel=1e-4)


def test_a_scalar_reward_export_is_refused_as_a_preference_model(reward_dir):
    with pytest.raises(FileNotFoundError, match="not a preference-model export"):
        PreferenceModel(reward_dir)


def test_the_stage_reports_label_and_gold_accuracy_through_the_cli(sft_dir, tmp_path, capsys):
    base = yaml.safe_load(open("configs/quickstart/preference.yaml"))
    callbacks = base["trainer"]["callbacks"]
    callbacks[1]["init_args"]["dirpath"] = str(tmp_path / "export")
    config = derived_config("configs/quickstart/preference.yaml", tmp_path, {
        "trainer": {"max_epochs": 1, "callbacks": callbacks[:2], "enable_progress_bar": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": {"backbone": {"pretrained": sft_dir}, "calibration_prompts": 8,
                                "sampling": {"max_new_tokens": 8}}},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 8,
                               "source": {"init_args": {"num_train": 16, "num_val": 16,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }, "preference.yaml")
    cli = cli_main(["fit", "--config", config])
    assert float(cli.trainer.callback_metrics["train/lr"]) == pytest.approx(cli.trainer.optimizers[0].param_groups[0]["lr"])
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[reward report]")]
    assert report and "label_accuracy=" in report[0] and "gold_order_accuracy=" in report[0]
    assert "sample_gold_order_accuracy=" in report[0] and "calibration_std=" in report[0]
    assert "spearman" not in report[0]        # a pairwise model has no per-response score to correlate
    PreferenceModel(str(tmp_path / "export"))  # loads as the RL stage's pairwise reward


def test_pairs_longer_than_the_models_positions_stop_before_training(sft_dir, tmp_path, capsys):
    """The model reads prompt + a + b, up to about twice max_length: the longest pair of the data is checked against
    its positions (here a random-init scorer of 24 positions). Before: trained on positions it never had, silently
    (a rotary model), or an index error at the first long batch (learned positions)."""
    from tests.conftest import TINY
    from train import main

    config = derived_config("configs/quickstart/preference.yaml", tmp_path, {
        "trainer": {"max_epochs": 1, "callbacks": [], "enable_progress_bar": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": {"backbone": {"pretrained": None, "config": dict(TINY, max_position_embeddings=24)},
                                "calibration_policy": sft_dir}},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 8,
                               "source": {"init_args": {"num_train": 16, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }, "preference.yaml")
    assert main(["fit", "--config", config]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: PreferenceModule: prompt \+ chosen \+ rejected \(the longest pair of the data, at "
                        r"max_length 48\) = (\d+) tokens per sequence, more than the preference model's "
                        r"max_position_embeddings \(24\); lower them", line), line
    assert 24 < int(re.search(r"= (\d+) tokens", line).group(1)) <= 2 * 48


def test_p3o_trains_on_the_preference_model_export(sft_dir, fitted_preference_dir, tmp_path):
    config = tiny_rl_config(tmp_path, sft_dir, source="configs/quickstart/p3o_pairwise.yaml",
                            model={"reward": {"class_path": "modules.rewards.PreferenceModel",
                                              "init_args": {"path": fitted_preference_dir}}})
    cli = cli_main(["fit", "--config", config])
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["train/loss"].item()))
    with torch.no_grad():
        roll = cli.model.make_rollout(next(iter(cli.datamodule.train_dataloader())))
    M, _, agreement = score_pairs(cli.model.reward, roll)
    assert agreement is None                                      # antisymmetric: each pair asked once
    torch.testing.assert_close(roll.pair_rewards, M)              # P3O's pair differences are the model's logits
    assert torch.all(M.view(-1, 2, 2)[:, 0, 1] == -M.view(-1, 2, 2)[:, 1, 0]) and M.abs().sum() > 0
