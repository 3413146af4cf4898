"""Checks of a parsed run config before anything is built or trained: each problem is one line naming the field.

`config_problem` returns what stops the run (a missing model path, settings that cannot train); `config_warnings`
what runs but is probably not what the user meant. `train.py` calls both before instantiating anything.
"""
from __future__ import annotations

import importlib
import math
import os

from modules.backbone import PATH_FIELDS, how_to_make, is_local


class ConfigError(ValueError):
    """A setting or a checkpoint that does not fit the run; the message names the field or the file."""


def import_object(class_path: str):
    """The object a config's class path (`package.module.Name`) names; ImportError, AttributeError or ValueError
    (an empty module name) saying why not."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def import_class(class_path: str):
    """The object a config's class path (`package.module.Name`) names, or None when it does not import."""
    try:
        return import_object(class_path)
    except (ImportError, AttributeError, ValueError):
        return None


def _walk(node, path: str = ""):
    """(dotted path, key, value) of every entry of a nested config."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        yield where, key, value
        yield from _walk(value, where)


# Counts that must be >= 1 wherever they appear (data module, reward and judge models, callbacks, stages).
COUNTS = {"batch_size": "items per batch or forward", "max_pairs": "pairs scored for the report"}


def config_problem(config: dict) -> str | None:
    """The first setting that cannot give a working run, as one line; None when there is none."""
    for where, key, value in _walk(config):
        # model and data paths are inputs; a callback's `path` may name an output (trainer.* is not checked, but
        # for the models of a callback's judge or reward: `Evaluation`'s)
        read = not where.startswith("trainer.") or ".judge." in where or ".reward." in where
        if key in PATH_FIELDS and read and isinstance(value, str) and is_local(value) and not os.path.exists(value):
            return f"{where}: {value} does not exist{how_to_make(value)}"
        if key == "max_new_tokens" and isinstance(value, int) and value < 1:
            return f"{where}: {value}; expected at least 1 (tokens sampled per response)"
        if key in COUNTS and isinstance(value, int) and value < 1:
            return f"{where}: {value}; expected at least 1 ({COUNTS[key]})"
        if key == "calibration_prompts" and isinstance(value, int) and value < 2:
            return f"{where}: {value}; expected at least 2 (the std of their scores is the reward's scale)"
        if key == "micro_batch_tokens" and isinstance(value, int) and value < 1:
            return f"{where}: {value}; expected at least 1 (real tokens per forward), or null for one pass"
        if key == "logprob_chunk" and isinstance(value, int) and value < 0:
            return f"{where}: {value}; expected >= 0 (tokens per LM-head chunk; 0: the whole logits at once), or null"
        if key == "lr" and ".optimizer." in f".{where}" and isinstance(value, (int, float)) \
                and not (math.isfinite(value) and value >= 0):
            return f"{where}: {value}; expected a finite learning rate >= 0"
    ckpt = config.get("ckpt_path")
    if isinstance(ckpt, str) and ckpt not in ("last", "best", "hpc", "registry") and "://" not in ckpt \
            and not ckpt.startswith("registry:") and not os.path.exists(ckpt):
        return f"ckpt_path: {ckpt} does not exist"
    strategy = (config.get("trainer") or {}).get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    if name.split(".")[-1] == "FSDPStrategy" or name.startswith("fsdp"):
        return (f"trainer.strategy: {name} is FSDP1, which no stage supports any more; shard with FSDP2: "
                "--config configs/presets/fsdp.yaml (strategy modules.sharding.FSDP2Strategy)")
    model = (config.get("model") or {}).get("init_args") or {}
    for key, meaning in (("epochs", "passes of updates over each rollout; 0 samples rollouts and never updates"),
                         ("minibatch_groups", "prompts per update")):
        if isinstance(model.get(key), int) and model[key] < 1:
            return f"model.init_args.{key}: {model[key]}; expected at least 1 ({meaning})"
    return None


def check_positions(owner: str, tokens: int, why: str, models: dict) -> None:
    """Sequences of `tokens` tokens (`why`: the settings they come from) fit the positions of every model in
    `models` (name -> model or None), or a ConfigError naming both. Past its `max_position_embeddings` a model
    with learned positions fails at the first long sequence (an index error; a device assert on a GPU), and a
    rotary one samples and trains, silently, on positions it has never seen."""
    for name, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and tokens > limit:
            raise ConfigError(f"{owner}: {why} = {tokens} tokens per sequence, more than the {name}'s "
                              f"max_position_embeddings ({limit}); lower them")


def training_mode_noise(model, tokens: int = 16) -> float:
    """How much two training-mode forwards of `model` over the same `tokens` tokens differ: the largest difference
    of their logits over the largest logit (0.0 for a network that is a function of its input). RL reads the
    policy's logprobs of the same tokens in the sampler or the pi_old pass and again in the update; with dropout
    left on (an attribute the builder did not recognise, as Seed-OSS's `residual_dropout` once was), the update
    sees another network each time, and its ratios and KL are noise. Deterministic kernels draw nothing from the
    random generators, so a run without noise is unchanged by the check. Every process calls it (a sharded model's
    forward gathers its layers)."""
    import torch

    was = model.training
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device)[None]           # (any vocabulary has the first 16 ids)
    model.train()
    try:
        with torch.no_grad():
            first, second = (model(input_ids=ids).logits.float() for _ in range(2))
    finally:
        model.train(was)
    return float((first - second).abs().max() / first.abs().max().clamp(min=1e-12))


RESPONSES = {"pairs": "chosen and rejected responses", "chosen": "a chosen response", "none": "no response"}


def check_responses(owner: str, datamodule, need: str) -> None:
    """The data's records hold what the stage trains on (`need`: 'chosen' for SFT, 'pairs' for the reward,
    preference and offline DPO stages), or a ConfigError before anything runs. Before: an AttributeError traceback
    at the first batch (SFT on `prompts_only: true` data)."""
    has = getattr(datamodule, "responses", None)
    if has is None or has == need or (need == "chosen" and has == "pairs"):
        return
    setting = "prompts_only: true" if has == "none" else "chosen_only: true"
    fix = ("set it false (records {prompt, chosen} need data chosen_only: true)" if need == "chosen"
           else "set it false: records {prompt, chosen, rejected}")
    raise ConfigError(f"{owner} trains on {RESPONSES[need]}; data {setting} reads {RESPONSES[has]}: {fix}")


def check_calibration_prompts(owner: str, datamodule) -> None:
    """The validation split holds the 2 prompts a reward or preference calibration needs at least (the std of
    their scores is the scale the export stores; of one score it is NaN), or a ConfigError before training."""
    held_out = len(datamodule.splits["val"])
    if held_out < 2:
        raise ConfigError(f"{owner}: the validation split has {held_out} record; the calibration after training needs "
                          "at least 2 held-out prompts (the std of their scores is the export's scale): add records")


NULLS = ("null", "Null", "NULL", "~", "None")


def command_line_problem(args: list[str]) -> str | None:
    """A command-line null that jsonargparse (through 4.53, the newest) would misread, as one line; else None.

    Below a `model` or `data` class's own arguments (a field of a backbone, of the objective, of the reward, of a
    LoRA dict), `--model.init_args.policy.lora=null` reaches the field as the string 'None': a `str` field keeps
    it (a model path named None), a dict entry too, and any other type fails with a page of union errors. The same
    override written as a dict of the enclosing block, `--model.init_args.policy='{lora: null}'`, reads null
    correctly and keeps the block's other fields (a dict-valued field, such as `lora` itself, is replaced whole).
    A class's own arguments (`--model.init_args.value_model=null`) and YAML files are not affected.

    Also LightningCLI's `--optimizer` and `--lr_scheduler`, which this CLI does not take: each stage's optimizer
    and scheduler are its `model.init_args.optimizer` and `model.init_args.scheduler`."""
    for arg in args:
        option = arg.partition("=")[0].split(".")[0]
        if option in ("--optimizer", "--lr_scheduler"):
            field = "optimizer" if option == "--optimizer" else "scheduler"
            return (f"{arg}: each stage takes its {field} in its model block: --model.init_args.{field}=<class path> "
                    f"and --model.init_args.{field}.<argument>=<value>")
    for i, arg in enumerate(args):
        if not arg.startswith(("--model.", "--data.")):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value not in NULLS:
            continue
        parent, _, field = key.rpartition(".")
        parent = parent.removesuffix(".init_args")
        if "." in parent:
            return (f"--{key}={value}: jsonargparse reads a null below a class's own arguments as the string 'None'; "
                    f"write the enclosing block as a dict, which keeps its other fields: --{parent}='{{{field}: null}}'")
    return None


def config_warnings(config: dict) -> list[str]:
    """Settings that run but silently do less than they say."""
    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    groups, prompts, epochs = model.get("minibatch_groups"), data.get("batch_size"), model.get("epochs")
    where = "data.init_args.batch_size"
    if isinstance(model.get("keep_groups"), int) and isinstance(prompts, int) and 0 < model["keep_groups"] < prompts:
        prompts, where = model["keep_groups"], "model.init_args.keep_groups"       # (the prompts trained on)
    out = [f"trainer.{key}={trainer[key]}: the run stops before its first batch; nothing is trained and no export is "
           "written (`python train.py validate` evaluates without training)"
           for key in ("max_steps", "max_epochs", "limit_train_batches")
           if trainer.get(key) == 0 and not isinstance(trainer.get(key), bool)]
    if all(isinstance(v, int) and v > 0 for v in (groups, prompts, epochs)) and groups > prompts:
        out.append(f"model.init_args.minibatch_groups={groups} is more than the {prompts} prompts of a rollout "
                   f"({where}): each epoch is one minibatch of {prompts} prompts, {epochs} optimizer "
                   f"steps per rollout")
    return out
