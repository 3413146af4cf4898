"""Writing a stage's model out as a plain Hugging Face directory (the model is built in `modules.backbone`).

`export_model` is what every stage's `export` calls: whole weights gathered from FSDP2 shards, LoRA merged (or
saved as adapter + base), a QLoRA adapter (or one whose base mixed precision held in 16 bits) put back over its
float base. `save_pretrained` writes one model +
tokenizer and refuses non-finite weights.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from datamodules.collate import stop_ids
from modules.backbone import BackboneSpec, build_causal_lm, build_scorer, is_lora


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model to save: LoRA merged into a copy of the base when the model is a peft model."""
    if is_lora(model):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _float_twin(model: nn.Module, spec: BackboneSpec, tokenizer) -> nn.Module:
    """A LoRA model over a 4/8-bit base, or over a base whose linears mixed precision holds in 16 bits
    (`modules.backbone.linears_in`), rebuilt over its float base (`spec`, unquantized) with the same adapter weights.

    Adapters are merged into (or saved next to) the original float weights, as usual for QLoRA; merging into
    the de-quantized or 16-bit base instead would bake its rounding into the export.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    plain = dataclasses.replace(spec, quantization=None)
    twin = build_scorer(plain, tokenizer) if _is_scorer(model) else build_causal_lm(plain, tokenizer)
    # (the adapters alone: the twin's base, embeddings included, is built as the model's was; and no question to
    # the hub about the base's vocabulary, peft's 'auto')
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, save_embedding_layers=False))
    return twin


def _rounded_base(model: nn.Module, spec: BackboneSpec) -> bool:
    """Whether a LoRA model's frozen base is not as `spec` loads it: quantized, or linears held in another dtype."""
    dtype = getattr(torch, spec.dtype)
    return bool(spec.quantization) or any(p.dtype != dtype for p in model.parameters()
                                          if not p.requires_grad and p.is_floating_point())


def _rebuilt(model: nn.Module, spec: BackboneSpec, tokenizer, state: dict) -> nn.Module:
    """A plain (unsharded) model built from `spec` like `model`, holding `state`."""
    twin = build_scorer(spec, tokenizer) if _is_scorer(model) else build_causal_lm(spec, tokenizer)
    twin.load_state_dict(state)
    return twin


def _is_scorer(model: nn.Module) -> bool:
    return "ForSequenceClassification" in type(getattr(model, "get_base_model", lambda: model)()).__name__


def export_model(model: nn.Module, spec: BackboneSpec | None, tokenizer, directory: str, merge_lora: bool = True,
                 final_dir: str | None = None) -> None:
    """Export a stage's model + tokenizer as a plain Hugging Face directory.

    A LoRA model is merged by default. With `merge_lora=False` the directory holds the adapter
    (adapter_config.json, adapter_model.safetensors) and the tokenizer, and `<directory>/base` the base model;
    `AutoModelForCausalLM.from_pretrained(directory)` loads both (peft installed), or
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{directory}/base"), directory)`.
    A quantized (QLoRA) model, or one whose frozen linears were held in 16 bits for mixed precision, is exported
    over its float base weights as `spec` loads them. `final_dir`: the folder `directory` will be
    renamed to (an atomic export writes elsewhere first); the adapter records its base there.
    """
    from modules.sharding import whole_state

    state = whole_state(model)
    if state is not None:                     # FSDP2: a plain model from the whole weights gathered on rank 0
        model = _rebuilt(model, spec, tokenizer, state)
    if is_lora(model) and spec is not None and _rounded_base(model, spec):
        model = _float_twin(model, spec, tokenizer)
        if merge_lora:                        # (a copy of our own: merged in place, no second one)
            model = model.merge_and_unload()
    if not is_lora(model) or merge_lora:
        save_pretrained(model, tokenizer, directory)
        return
    base = os.path.join(directory, "base")
    save_pretrained(copy.deepcopy(model).unload(), tokenizer, base)
    config = model.peft_config[model.active_adapter]
    original = config.base_model_name_or_path
    config.base_model_name_or_path = os.path.abspath(os.path.join(final_dir or directory, "base"))
    try:
        model.save_pretrained(directory, save_embedding_layers=False)     # (`base` holds them, resized or not)
    finally:
        config.base_model_name_or_path = original
    tokenizer.save_pretrained(directory)


def save_pretrained(model: nn.Module, tokenizer, directory: str) -> None:
    """Export model + tokenizer in Hugging Face format (LoRA merged).

    GGUF-loaded models refuse `save_pretrained`; rebuilding from the config and loading the state dict works.
    The weights written are float, so a quantization record in the config (GGUF's) is dropped: it would make
    transformers refuse to load the export with a different quantization (QLoRA on an SFT export).
    """
    model = plain_model(model)
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(model.config)
    if "quantization_config" in vars(config):
        del config.quantization_config
    state = model.state_dict()
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"export to {directory}: parameter {bad!r} holds NaN or inf; nothing was written")
    fresh = type(model)(config)
    fresh.load_state_dict(state)
    if getattr(fresh, "generation_config", None) is not None:
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id
        stops = stop_ids(tokenizer)             # (a Gemma keeps <end_of_turn> beside <eos>, as it came)
        fresh.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    fresh.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
