"""What only a GPU can check: CPU tests of the suite run again on CUDA, and FSDP2 on one GPU against the unsharded run
on the same GPU. Marked `gpu` and skipped where torch sees no CUDA device (CI has none); `.ci/gpu` runs them on a
lent GPU machine (`docs/development.md`). The 2-process FSDP2 tests (`test_sharding.py`) need two ranks: on one
GPU they stay on CPU with gloo. `P3O_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py` runs the same checks on the
CPU, to test these tests where no GPU is."""
from __future__ import annotations

import os

import pytest
import torch

from tests.test_checkpoint import _resume_case
from tests.test_sampling import sampler_case
from tests.test_sharding import CASES, FSDP2, _exported_params, run_case

DEVICE = "cpu" if os.environ.get("P3O_GPU_TESTS_ON_CPU") else "cuda"
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_samplers_logprobs_equal_a_forward_pass_on_cuda(tiny_spec, tokenizer):
    """`test_sampling`'s check on CUDA (fp32): 1e-4 (GPU kernels reduce in other orders than a CPU thread, where
    the suite asks 1e-5); greedy responses equal `generate`'s."""
    sampler_case(DEVICE, tiny_spec, tokenizer, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_on_one_gpu_trains_like_the_unsharded_run_and_exports_whole_weights(tmp_path, sft_dir, reward_dir,
                                                                                  preference_dir, case):
    """`test_sharding`'s stages (SFT, reward, P3O in micro-batches with a reward model, PPO with its value model,
    LoRA P3O with an LLM judge as its reward and a preference model as its evaluation's judge) on one GPU, under
    `FSDP2Strategy` (a mesh of one rank: the sharded code path, DTensor parameters on CUDA, the gathers for sampling
    and export) and under the default single-device strategy: the same weights within 1e-5; the FSDP2 export loads
    with plain transformers and holds the trained weights (LoRA merged: against the unsharded export, 1e-5)."""
    stage = CASES[case][0]
    digests, exports = {}, {}
    for name, strategy in (("single", "auto"), ("fsdp2", FSDP2)):
        (digests[name],), exports[name] = run_case(tmp_path, sft_dir, reward_dir, case, name, preference_dir,
                                                   accelerator=ACCELERATOR, devices=1, strategy=strategy)
    single, fsdp2 = digests["single"], digests["fsdp2"]
    assert single["prompts"] == fsdp2["prompts"] and torch.equal(single["initial"], fsdp2["initial"])
    assert not torch.equal(fsdp2["params"], fsdp2["initial"])
    assert (fsdp2["params"] - single["params"]).abs().max() < 1e-5
    scorer = stage == "reward"
    exported = _exported_params(exports["fsdp2"], scorer)
    if case == "p3o_lora":
        assert (exported - _exported_params(exports["single"], scorer)).abs().max() < 1e-5
    else:
        assert torch.equal(exported, fsdp2["params"][: exported.numel()].cpu())


@pytest.mark.parametrize("strategy", [None, FSDP2], ids=["single", "fsdp2"])
def test_sigkill_mid_epoch_resume_on_a_gpu_is_bit_exact(tmp_path, sft_dir, strategy):
    """`test_checkpoint`'s SIGKILL case on CUDA, unsharded and under FSDP2 on one GPU: resumed from the last
    checkpoint, the weights equal the uninterrupted run's bit for bit. Under `trainer.deterministic: warn`: some
    CUDA kernels reduce with atomics in an order that varies from run to run (PyTorch's reproducibility notes list
    them), so two runs from the same state can differ in the last bit; Lightning's flag makes torch pick
    deterministic kernels, and warn where an op has none."""
    _resume_case(tmp_path, sft_dir, devices=1, interrupt="SIGKILL", strategy=strategy, accelerator=ACCELERATOR,
                 deterministic="warn")
