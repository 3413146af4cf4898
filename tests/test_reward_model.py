"""Reward stage: last-token scoring, BT loss, a tiny separable fit, export round-trip, calibration stats."""
import json

import pytest
import torch

from datamodules.collate import PairCollator, encode_prompt, encode_response, stack_pair
from modules.backbone import BackboneSpec, build_causal_lm
from modules.forward import score_texts, sequence_rewards, token_scores
from modules.layout import shares_prompts
from modules.reward_model import RewardModule


def examples(tokenizer, rows):
    return [{"prompt": p, "prompt_ids": encode_prompt(tokenizer, p), "chosen": c, "rejected": r,
             "chosen_ids": encode_response(tokenizer, c), "rejected_ids": encode_response(tokenizer, r)}
            for p, c, r in rows]


def test_reward_is_read_at_the_last_real_token_for_either_padding_side(sft_dir, tokenizer):
    module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir)
    module.configure_model()
    ids = torch.tensor([[4, 5, 6, 7]])
    full = token_scores(module.scorer, ids, torch.ones_like(ids))[0]            # (4,)
    pad = tokenizer.pad_token_id
    right = torch.tensor([[4, 5, 6, 7, pad, pad]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[pad, pad, 4, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    for seq, mask in (right, left):
        assert torch.allclose(sequence_rewards(module.scorer, seq, mask), full[-1:], atol=1e-5)


def test_stack_pair_scores_chosen_and_rejected_in_one_batch(tokenizer):
    batch = PairCollator(tokenizer.pad_token_id)(examples(tokenizer, [
        ("write a review of the cafe :", "the food was great .", "the food was bad and the staff was rude .")]))
    both = stack_pair(batch.chosen, batch.rejected, tokenizer.pad_token_id)
    ids, mask = both.input_ids, both.attention_mask
    assert torch.equal(both.loss_mask[1, : mask[1].sum()], batch.rejected.loss_mask[0, : mask[1].sum()])
    assert ids.shape[0] == 2 and mask[0].sum() < mask[1].sum()
    assert torch.equal(ids[1, : mask[1].sum()], batch.rejected.input_ids[0, : mask[1].sum()])


def test_tiny_fit_learns_a_separable_preference_and_export_round_trips(sft_dir, tokenizer, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    rows = [(f"write a review of the {place} :", f"the {s} was great .", f"the {s} was awful .")
            for place in ("cafe", "hotel", "park", "zoo") for s in ("food", "staff", "view", "room")]
    data = examples(tokenizer, rows)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=PairCollator(tokenizer.pad_token_id))
    module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), calibration_prompts=8)
    module.configure_model()
    batch = PairCollator(tokenizer.pad_token_id)(data)

    def accuracy():
        with torch.no_grad():
            c, r = module.pair_rewards(batch)
        return (c > r).float().mean().item(), c

    before, _ = accuracy()
    L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    after, scores = accuracy()
    assert after == 1.0 and after > before

    module.export(str(tmp_path / "rm"))  # no datamodule: uncalibrated stats
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1
    with torch.no_grad():
        hf_scores = hf(input_ids=batch.chosen.input_ids, attention_mask=batch.chosen.attention_mask).logits[:, 0]
    assert torch.allclose(hf_scores, scores, atol=1e-5)
    assert json.load(open(tmp_path / "rm" / "reward_stats.json"))["source"] == "uncalibrated"


def test_calibration_stats_are_exported_and_used_for_normalisation(sft_dir, tokenizer, tmp_path):
    from modules.rewards import RewardModel
    from modules.sampling import SamplingConfig, sample

    module = RewardModule(BackboneSpec(pretrained=sft_dir), sft_dir, calibration_prompts=16,
                          sampling=SamplingConfig(max_new_tokens=8))
    module.configure_model()
    data = examples(tokenizer, [(f"write a review of the {p} :", "the food was ok .", "the food was bad .")
                                for p in ("cafe", "hotel", "park", "zoo")] * 4)
    cal = module.calibrate(data)
    assert len(cal["rewards"]) == 16 and cal["std"] > 0
    module.export(str(tmp_path / "rm"))
    stats = json.load(open(tmp_path / "rm" / "reward_stats.json"))
    assert stats["mean"] == pytest.approx(cal["mean"]) and stats["n"] == 16

    reward = RewardModel(str(tmp_path / "rm"))
    collated = PairCollator(tokenizer.pad_token_id)(data[:4])
    policy = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    roll = sample(policy, tokenizer, collated.prompt_ids, collated.prompt_mask, collated.prompts,
                  SamplingConfig(max_new_tokens=8))
    raw = sequence_rewards(reward.model, roll.input_ids, roll.attention_mask)
    assert torch.allclose(reward.score(roll, tokenizer), (raw - stats["mean"]) / stats["std"], atol=1e-5)
    # Two responses per prompt: each prompt is scored once per group, with the same numbers as one row each.
    pairs = sample(policy, tokenizer, collated.prompt_ids, collated.prompt_mask, collated.prompts,
                   SamplingConfig(max_new_tokens=8), num_samples=2)
    assert shares_prompts(reward.model, pairs.input_ids, pairs.attention_mask, pairs.prompt_length, 2)
    raw = sequence_rewards(reward.model, pairs.input_ids, pairs.attention_mask)
    assert torch.allclose(reward.score(pairs, tokenizer), (raw - stats["mean"]) / stats["std"], atol=1e-5)
    by_text = RewardModel(str(tmp_path / "rm"))
    by_text._shares_vocab[id(tokenizer)] = False  # force the re-tokenizing path: same numbers where the text
    # round-trips (a random policy can draw special tokens, which decoding drops)
    same = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids
                         == roll.input_ids[i, roll.prompt_length:][roll.response_mask[i].bool()].tolist()
                         for i, text in enumerate(roll.responses)])
    assert same.sum() >= 2
    assert torch.allclose(by_text.score(roll, tokenizer)[same], reward.score(roll, tokenizer)[same], atol=1e-4)

    # The export's README.md recipe (plain transformers, EOS appended) gives the same normalised rewards.
    card = (tmp_path / "rm" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code, scope)     # as pasted: it names its own folder (before: NameError: path)
    plain = torch.tensor([scope["reward"](p, r) for p, r in zip(roll.prompts, roll.responses)])
    ours = (score_texts(reward.model, tokenizer, roll.prompts, roll.responses) - stats["mean"]) / stats["std"]
    assert torch.allclose(plain, ours, atol=1e-4)
    assert not torch.allclose(plain, (score_texts(reward.model, tokenizer, roll.prompts, roll.responses,
                                                  has_eos=[False] * len(roll)) - stats["mean"]) / stats["std"])


@pytest.mark.parametrize("module", ["modules.reward_model.RewardModule", "modules.preference_model.PreferenceModule"])
def test_a_random_init_scorer_needs_a_calibration_policy_before_it_trains(sft_dir, module):
    """The calibration policy defaults to the backbone's pretrained model; a random-init backbone has none. Before,
    the stage trained, then failed where it first calibrated (the RewardReport, or the export after the last
    batch: 'set calibration_policy'). Now the constructor says so (one line from train.py); given one, it builds."""
    import importlib

    from tests.conftest import TINY

    cls = getattr(importlib.import_module(module.rsplit(".", 1)[0]), module.rsplit(".", 1)[1])
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: a random-init backbone \(config\) gives no default "
                                         "calibration_policy; set model.init_args.calibration_policy"):
        cls(BackboneSpec(config=dict(TINY)), sft_dir)
    assert cls(BackboneSpec(config=dict(TINY)), sft_dir, calibration_policy=sft_dir).calibration_policy == sft_dir
