"""modules/cpu.py: the CPU-only speed shims (prepacked linears, the allocator setting) give the same numbers and
switch off."""
import subprocess
import sys

import pytest
import torch

from modules.backbone import BackboneSpec, build_causal_lm, frozen_copy, linears_in
from tests.helpers import TINY_SHAPE, child_env


def test_cpu_runs_reuse_freed_memory_unless_switched_off(monkeypatch, tmp_path, sft_dir):
    """The CLI applies `reuse_freed_memory` when the trainer runs on CPU. On Linux/glibc it returns True (both
    mallopt calls accepted); with P3O_REUSE_FREED_MEMORY=0, or with tcmalloc or jemalloc preloaded (glibc's malloc
    then serves nothing), it does nothing and returns False."""
    import train
    from tests.helpers import tiny_rl_config

    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: calls.append(1) or True)
    train.cli_main(["--config", tiny_rl_config(tmp_path, sft_dir)], run=False)
    assert calls == [1]
    monkeypatch.undo()
    monkeypatch.delenv("LD_PRELOAD", raising=False)               # the suite itself may run under tcmalloc
    assert train.reuse_freed_memory() is (train.sys.platform.startswith("linux"))
    for preload in ("libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"):
        monkeypatch.setenv("LD_PRELOAD", preload)
        assert train.reuse_freed_memory() is False
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("P3O_REUSE_FREED_MEMORY", "0")
    assert train.reuse_freed_memory() is False


CAST_IN_A_CHILD = """
import sys, torch
from modules.backbone import linears_in
from modules.cpu import reuse_freed_memory
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 2**20
assert reuse_freed_memory()
model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(32))).requires_grad_(False)
before = rss()
if sys.argv[1] == "without":
    import modules.cpu
    modules.cpu.release_freed_memory = lambda: False
linears_in(model, torch.bfloat16)
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_casting_frozen_linears_hands_the_fp32_pages_back_to_the_os_under_glibc():
    """Under `reuse_freed_memory` glibc keeps freed blocks mapped, so `linears_in` replacing 512 MB of fp32 weights by
    their 256 MB bf16 copies would leave the process larger, not smaller (measured: +0.08 to +0.17 GB, the copies
    partly placed in freed blocks; +1.4 GB at the peak of a 1.07B LoRA RL step); it calls `release_freed_memory`
    (`malloc_trim`), and the process is 0.25 GB smaller instead. In a child process (glibc, nothing preloaded)."""
    env = {**child_env(), "LD_PRELOAD": ""}
    grown = {how: float(subprocess.run([sys.executable, "-c", CAST_IN_A_CHILD, how], env=env, capture_output=True,
                                       text=True, check=True, timeout=120).stdout)
             for how in ("with", "without")}
    assert grown["without"] > 0 and grown["with"] < -0.2, grown


def test_fsdp2_on_cpu_leaves_glibc_as_it_is_and_logs_one_line_naming_tcmalloc(monkeypatch, tmp_path, sft_dir,
                                                                               caplog):
    """Under FSDP2 on CPU glibc's malloc holds 1.2-1.5 GB more per process than tcmalloc, and `reuse_freed_memory`
    0.4-1 GB more again at no gain in speed (measured): the CLI does not apply it there and logs one warning line
    with the LD_PRELOAD recipe. Under DDP it applies it and logs nothing; with an allocator preloaded, no line."""
    import logging

    import train
    from modules.cpu import sharded_allocator_warning
    from tests.helpers import tiny_rl_config

    config = tiny_rl_config(tmp_path, sft_dir)
    monkeypatch.delenv("LD_PRELOAD", raising=False)               # the suite itself may run under tcmalloc
    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: calls.append(1) or True)
    expected = sharded_allocator_warning() if train.sys.platform.startswith("linux") else None
    for preset, logged, reused in (("fsdp_cpu", expected, []), ("ddp_cpu", None, [1])):
        caplog.clear()
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            train.cli_main(["--config", config, "--config", f"configs/presets/{preset}.yaml"], run=False)
        lines = [r.getMessage() for r in caplog.records if "malloc" in r.getMessage()]
        assert lines == ([f"warning: {logged}"] if logged else []), preset
        assert calls == reused, preset
    if expected:
        assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in expected and "\n" not in expected
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    assert sharded_allocator_warning() is None


def test_prepacked_linears_give_the_same_forward_and_draws_and_apply_only_to_cpu_fp32(tiny_spec, tokenizer):
    """Inside `prepacked_linears` a tiny model's logits equal the plain forward's within 1e-5 (Llama, Llama + LoRA,
    Qwen2 for linears with a bias), the
    layers' own forwards come back afterwards, and `sample` draws identical tokens from the same random state with
    `prepack_weights` on and off (recorded logprobs within 1e-5). Under CPU bf16 autocast, and for bf16 weights, it
    computes in bf16 like the plain forward (logits within 0.02 at a scale of ~0.5) where oneDNN has bf16 kernels and
    does not apply where it has none (a frozen model whose linears are stored in bf16, `linears_in`, gives the
    same bits); under fp16 autocast it changes nothing."""
    from datamodules.collate import PairCollator, encode_prompt
    from modules.cpu import prepacked_linears
    from modules.sampling import SamplingConfig, sample

    ids = torch.randint(3, 40, (3, 7))
    patched = lambda model: [m for m in model.modules() if "forward" in m.__dict__]  # noqa: E731
    qwen2 = BackboneSpec(config={**TINY_SHAPE, "model_type": "qwen2", "num_key_value_heads": 1})
    for spec in (tiny_spec, BackboneSpec(config=tiny_spec.config, lora={"r": 4}), qwen2):
        model = build_causal_lm(spec, tokenizer).eval()
        if spec is qwen2:                                           # random biases (they start at 0)
            biases = [m.bias for m in model.modules() if type(m) is torch.nn.Linear and m.bias is not None]
            assert biases and [torch.nn.init.normal_(b) for b in biases]
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with prepacked_linears(model, 3):
                assert len(patched(model)) == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
                fast = model(input_ids=ids).logits
        assert patched(model) == [] and torch.allclose(fast, plain, atol=1e-5, rtol=0)

    model = build_causal_lm(tiny_spec, tokenizer).eval()
    texts = ["write a review of the cafe :", "write a review of the hotel , please :"]
    batch = PairCollator(tokenizer.pad_token_id)([{"prompt": t, "prompt_ids": encode_prompt(tokenizer, t)} for t in texts])
    rolls = {}
    for prepack in (True, False):
        torch.manual_seed(0)
        rolls[prepack] = sample(model, tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                                SamplingConfig(temperature=0.7, max_new_tokens=10, prepack_weights=prepack),
                                num_samples=4, record_logprobs=True)
    assert torch.equal(rolls[True].input_ids, rolls[False].input_ids)
    assert torch.allclose(rolls[True].old_logp, rolls[False].old_logp, atol=1e-5, rtol=0)

    # bf16 prepacking needs oneDNN's bf16 kernels (AVX512-BF16 / AMX); on CPUs without them it must not apply.
    n_linears = sum(type(m) is torch.nn.Linear for m in model.modules()) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(input_ids=ids).logits
            with prepacked_linears(model, 3):
                assert len(patched(model)) == n_linears
                fast = model(input_ids=ids).logits
        assert fast.dtype == plain.dtype and (fast.float() - plain.float()).abs().max() < 0.02
        tied = frozen_copy(build_causal_lm(BackboneSpec(config={**tiny_spec.config, "tie_word_embeddings": True}),
                                           tokenizer))
        halved = linears_in(frozen_copy(tied), torch.bfloat16)          # bf16 linears beside the fp32 tied head
        assert {m.weight.dtype for m in halved.modules() if type(m) is torch.nn.Linear} == {torch.bfloat16, torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = []
            for each in (tied, halved):
                with prepacked_linears(each, 3):
                    assert len(patched(each)) == n_linears
                    logits.append(each(input_ids=ids).logits)
        assert torch.equal(*logits)                                     # the same packed bf16 weights
        with torch.autocast("cpu", dtype=torch.float16), prepacked_linears(model, 3):
            assert patched(model) == []
        model.to(torch.bfloat16)
        plain = model(input_ids=ids).logits
        with prepacked_linears(model, 3):
            assert len(patched(model)) == n_linears
            fast = model(input_ids=ids).logits
        assert fast.dtype == torch.bfloat16 and (fast.float() - plain.float()).abs().max() < 0.02
    assert patched(model) == []
