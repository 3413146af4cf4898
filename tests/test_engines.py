"""The generation engine seam (`modules.engines`): the RL module and evaluation generate through `engine`; an
engine whose logprobs are not the trainer's gets a forward pi_old, the logged and guarded gap, and the
correction. Here with a stand-in engine (`tests.helpers.ShiftedSampler`); vLLM itself: tests/test_vllm.py."""
import subprocess
import sys

import pytest
import torch

from modules.engines import Sampler, hf_weights
from tests.helpers import tiny_rl_config
from train import cli_main

ENGINE = "tests.helpers.ShiftedSampler"


def test_an_inexact_engine_gets_a_forward_pi_old_and_its_gap_logged_and_corrected(tmp_path, sft_dir):
    """With shift 0 the stand-in's logprobs are the trainer's up to rounding: the run trains, pi_old comes from
    the forward (so `old_logp` is the trainer's, `sampler_logp` the engine's), train/sampler_logprob_diff is
    ~1e-7, and the correction's weights are ~1 with none masked."""
    engine = {"class_path": ENGINE, "init_args": {"shift": 0.0, "correction": {"level": "token", "mode": "mask"}}}
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir, model={"engine": engine})])
    metrics = cli.trainer.callback_metrics
    assert not cli.model.logprobs_from_sampler
    assert 0 <= float(metrics["train/sampler_logprob_diff"]) < 1e-4
    assert abs(float(metrics["train/sampler_weight_mean"]) - 1) < 1e-3
    assert float(metrics["train/sampler_weight_zero"]) == 0.0
    assert cli.model.engine.calls == 4 + 2          # 4 rollouts, then evaluation of the policy and the reference


@pytest.mark.slow
def test_a_stale_engine_stops_the_run_with_one_line(tmp_path, sft_dir):
    """A gap of 4 nats per token (a stale layer) stops the run before its first update: exit 1, one line."""
    engine = {"class_path": ENGINE, "init_args": {"shift": -4.0}}
    config = tiny_rl_config(tmp_path, sft_dir, model={"engine": engine})
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", config], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: engine ShiftedSampler: the sampler's logprobs differ from the trainer's by 4")
    assert "Traceback" not in proc.stderr


def test_the_default_engine_is_our_sampler_and_its_logprobs_are_pi_old(tmp_path, sft_dir):
    cli = cli_main(["fit", "--config", tiny_rl_config(tmp_path, sft_dir)])
    assert isinstance(cli.model.engine, Sampler) and cli.model.logprobs_from_sampler
    assert "train/sampler_logprob_diff" not in cli.trainer.callback_metrics


def test_the_sampler_engine_equals_sample(sft_dir, tokenizer):
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.sampling import SamplingConfig, sample

    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    enc = tokenizer(["a film", "the plot was"], return_tensors="pt", padding=True)
    config = SamplingConfig(max_new_tokens=6)
    torch.manual_seed(3)
    a = sample(model, tokenizer, enc.input_ids, enc.attention_mask, ["a", "b"], config, 2, True)
    torch.manual_seed(3)
    b = Sampler().generate(model, tokenizer, enc.input_ids, enc.attention_mask, ["a", "b"], config, 2, True)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logp, b.old_logp)


def test_vllm_with_several_processes_is_refused_in_one_line(sft_dir, tokenizer, monkeypatch):
    """Refused when the engine starts (the first rollout), before vllm is imported: so in every environment.
    (A ConfigError is what train.py prints as one `error:` line, exit 1.)"""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.checks import ConfigError
    from modules.engines import VLLM

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    with pytest.raises(ConfigError, match="VLLM runs in single-process training for now; with 2 processes"):
        VLLM().start(model, tokenizer)


@pytest.mark.parametrize("options, message", [
    (dict(max_model_len=100_000), "engine: VLLM max_model_len=100000; this model holds at most 128 positions "
                                  "(max_position_embeddings)"),
    pytest.param(dict(tensor_parallel_size=2), "engine: VLLM tensor_parallel_size=2; on CPU the engine runs in this "
                 "one process: 1 (the option spans GPUs)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")),
], ids=["max_model_len", "tensor_parallel"])
def test_vllm_settings_the_model_or_the_cpu_cannot_take_are_refused_before_start(sft_dir, tokenizer, options, message):
    """Before: vLLM's own errors at the first rollout, after the models were built: a pydantic ValidationError of
    ModelConfig (max_model_len over the model's positions) or an AssertionError about NUMA nodes (two tensor
    parallel workers on CPU), each under a stack trace. Checked before vllm is imported: in every environment."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.checks import ConfigError
    from modules.engines import VLLM

    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)
    assert model.config.max_position_embeddings == 128
    with pytest.raises(ConfigError) as raised:
        VLLM(**options).start(model, tokenizer)
    assert str(raised.value) == message


def test_a_lora_push_merges_a_base_held_in_bf16_in_fp32(tiny_spec, tokenizer):
    """`hf_weights` (what the vLLM engine is pushed): a LoRA layer's weight is its base plus B A scale. Over an fp32
    base it is W + delta in fp32, as before; over a base `linears_in` holds in bf16 (bf16-mixed) it is
    fp32(bf16 W) + delta, in fp32 (not rounded to bf16 again with the delta in it); an untouched tensor is pushed as
    it is held. Inside bf16 autocast (where the engine is pushed) the same: B A is not computed in bf16."""
    from modules.backbone import build_causal_lm, linears_in

    tiny_spec.lora = {"r": 4, "lora_alpha": 8}
    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    for model in models:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
    fp32, bf16 = models[0], linears_in(models[1], torch.bfloat16)
    layer = fp32.get_base_model().model.layers[0].self_attn.q_proj
    delta, weight = layer.get_delta_weight("default"), layer.base_layer.weight.detach()
    name = "model.layers.0.self_attn.q_proj.weight"
    ours, held = dict(hf_weights(fp32))[name], dict(hf_weights(bf16))[name]
    assert ours.dtype == held.dtype == torch.float32 and delta.abs().min() > 0
    assert torch.equal(ours, weight + delta)
    assert torch.equal(held, weight.bfloat16().float() + delta)
    with torch.autocast("cpu", torch.bfloat16):                      # (the engine is pushed inside the run's autocast)
        assert all(torch.equal(dict(hf_weights(m))[name], pushed) for m, pushed in ((fp32, ours), (bf16, held)))
    assert not torch.equal(held, (weight.bfloat16() + delta.bfloat16()).float())     # (the old push: rounded twice)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(dict(hf_weights(bf16))[norm], dict(fp32.get_base_model().state_dict())[norm])
