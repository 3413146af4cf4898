"""Offline DPO / IPO / SimPO: the losses on literal tensors (TRL 1.16's formulas), micro-batches equal one pass,
the reference is the starting policy, and a tiny fit through the CLI learns the pairs and exports."""
import math

import pytest
import torch
import torch.nn.functional as TF
import yaml

from datamodules.collate import PairCollator, encode_prompt, encode_response
from modules import functional as F
from modules.backbone import BackboneSpec
from modules.offline_dpo import OfflineDPOModule
from tests.helpers import derived_config
from train import cli_main

LP_C, LP_R, REF_C, REF_R, N_C, N_R = (torch.tensor([v]) for v in (-4.0, -6.0, -5.0, -5.0, 2.0, 4.0))


@pytest.mark.parametrize("loss,gamma,smoothing,expected_loss,expected_margin", [
    ("sigmoid", 0.0, 0.0, 0.31326, 2.0),
    ("sigmoid", 0.0, 0.1, 0.41326, 2.0),
    ("ipo", 0.0, 0.0, 0.0625, 0.75),
    ("simpo", 0.5, 0.0, 1.13687, -1.5),
])
def test_preference_loss_matches_the_worked_example(loss, gamma, smoothing, expected_loss, expected_margin):
    per_pair, margin = F.preference_loss(LP_C, LP_R, N_C, N_R, REF_C, REF_R, loss=loss, beta=0.5, gamma=gamma,
                                         label_smoothing=smoothing)
    assert per_pair.item() == pytest.approx(expected_loss, abs=1e-5)
    assert margin.item() == pytest.approx(expected_margin, abs=1e-6)


def trl_losses(lp_c, lp_r, ref_c, ref_r, n_c, n_r, beta, gamma, ls):
    """TRL 1.16's lines, transcribed: DPOTrainer._compute_loss ('sigmoid', 'ipo' with its per-token normalisation)
    and the experimental CPOTrainer.cpo_loss ('simpo', on average logprobs)."""
    delta_score = (lp_c - ref_c) - (lp_r - ref_r)
    sigmoid = -TF.logsigmoid(beta * delta_score)                      # DPOTrainer keeps no label smoothing here
    ipo_delta = (lp_c - ref_c) / n_c.clamp(min=1.0) - (lp_r - ref_r) / n_r.clamp(min=1.0)
    ipo = (ipo_delta - 1 / (2 * beta)) ** 2
    logits = lp_c / n_c - lp_r / n_r - gamma / beta
    simpo = -TF.logsigmoid(beta * logits) * (1 - ls) - TF.logsigmoid(-beta * logits) * ls
    return {"sigmoid": sigmoid, "ipo": ipo, "simpo": simpo}


def test_preference_loss_equals_trls_formulas_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    lp_c, lp_r, ref_c, ref_r = (-20 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    n_c, n_r = (torch.randint(1, 30, (64,), generator=g).double() for _ in range(2))
    want = trl_losses(lp_c, lp_r, ref_c, ref_r, n_c, n_r, beta=0.2, gamma=0.4, ls=0.15)
    for loss, reference in want.items():
        ls = 0.15 if loss == "simpo" else 0.0
        got, _ = F.preference_loss(lp_c, lp_r, n_c, n_r, ref_c, ref_r, loss=loss, beta=0.2, gamma=0.4,
                                   label_smoothing=ls)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)


def test_preference_loss_refuses_an_unknown_loss_and_a_missing_reference():
    with pytest.raises(ValueError, match="expected one of"):
        F.preference_loss(LP_C, LP_R, N_C, N_R, REF_C, REF_R, loss="hinge")
    with pytest.raises(ValueError, match="needs the reference"):
        F.preference_loss(LP_C, LP_R, N_C, N_R, loss="sigmoid")


def pair_batch(tokenizer):
    rows = [("write a review of the cafe :", "the food was great .", "the food was bad and the staff was rude ."),
            ("write a review of the hotel :", "the room was clean and quiet .", "dirty ."),
            ("write a review of the park :", "lovely trees .", "the paths were muddy and the benches broken .")]
    examples = [{"prompt": p, "chosen": c, "rejected": r, "prompt_ids": encode_prompt(tokenizer, p),
                 "chosen_ids": encode_response(tokenizer, c), "rejected_ids": encode_response(tokenizer, r)}
                for p, c, r in rows]
    return PairCollator(tokenizer.pad_token_id)(examples)


def module(sft_dir, **kwargs) -> OfflineDPOModule:
    m = OfflineDPOModule(BackboneSpec(pretrained=sft_dir, **kwargs.pop("spec", {})), sft_dir, **kwargs)
    m.configure_model()
    return m


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_is_the_starting_policy_so_the_first_dpo_loss_is_log_2(sft_dir, tokenizer, lora):
    spec = {"lora": {"r": 4, "target_modules": "all-linear"}} if lora else {}
    m = module(sft_dir, spec=spec)
    loss, margin, _ = m.pair_loss(pair_batch(tokenizer))
    assert torch.all(margin == 0) and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (m.reference is None) == lora


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_micro_batches_give_the_loss_and_gradient_of_one_pass(sft_dir, tokenizer, loss):
    """One micro-batch per pair against one pass: the loss within float32 rounding relative to its size (IPO's is
    about 25 here, where float32 holds 7 significant digits: 25.288061 and 25.288063 with 2 threads, equal with 1;
    an absolute 1e-6 alone failed with 2 threads), the gradients within 1e-4 relative."""
    batch = pair_batch(tokenizer)
    whole, parts = module(sft_dir, loss=loss), module(sft_dir, loss=loss, micro_batch_tokens=1)
    for m in (whole, parts):
        with torch.no_grad():       # move the policy off the reference so that every loss has a gradient
            for p in m.policy.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
        m.pair_loss(batch)[0].backward()
    assert parts.pair_loss(batch)[0].item() == pytest.approx(whole.pair_loss(batch)[0].item(), rel=1e-6, abs=1e-6)
    for (name, a), b in zip(whole.policy.named_parameters(), parts.policy.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_tiny_offline_dpo_fit_learns_the_pairs_and_exports(sft_dir, tmp_path, capsys):
    base = yaml.safe_load(open("configs/quickstart/offline_dpo.yaml"))
    callbacks = base["trainer"]["callbacks"]
    callbacks[0]["init_args"].update(num_prompts=8, every_n_batches=None, show=0)
    callbacks[1]["init_args"]["dirpath"] = str(tmp_path / "export")
    config = derived_config("configs/quickstart/offline_dpo.yaml", tmp_path, {
        "trainer": {"max_epochs": 3, "callbacks": callbacks[:2], "enable_progress_bar": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": {"policy": {"pretrained": sft_dir}, "beta": 0.5,
                                "optimizer": {"init_args": {"lr": 3e-3}}}},
        "data": {"init_args": {"tokenizer": sft_dir, "batch_size": 8,
                               "source": {"init_args": {"num_train": 16, "num_val": 8,
                                                        "cache_dir": str(tmp_path / "tok")}}}},
    }, "offline_dpo.yaml")
    cli = cli_main(["fit", "--config", config])
    assert float(cli.trainer.callback_metrics["train/lr"]) == pytest.approx(3e-3)          # logged by every stage
    m, batch = cli.model, next(iter(cli.datamodule.train_dataloader()))
    with torch.no_grad():
        loss, margin, _ = m.pair_loss(batch)
    assert loss.item() < math.log(2) - 0.05 and (margin > 0).float().mean() > 0.5   # learnt its training pairs
    out = capsys.readouterr().out
    assert "kl=" in out and "win_rate=" in out       # the evaluation against the reference, as in the RL stage

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, p in exported.state_dict().items():
        assert torch.equal(p, m.policy.state_dict()[name]), name
