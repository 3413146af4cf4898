"""RLModule: on-policy RL fine-tuning with a swappable objective (P3O, PPO, DPO, RLOO, GRPO, yours).

Holds the trainable policy, a frozen reference (a frozen copy; or, for a LoRA policy, the same weights with the
adapters disabled: no second copy), a frozen reward and the `objective`. The `OnPolicyRollout` callback fills
`self.rollout` before each training step (`make_rollout` is the routine it calls); `training_step` then runs
`epochs` passes of minibatch updates over it with manual optimization. All logprobs are computed from logits
divided by the sampling temperature, through `modules.forward.response_logprobs`.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections import defaultdict
from typing import Callable, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

from datamodules.batch import PairBatch
from datamodules.tools import Tools
from modules import functional as F
from modules import layout
from modules.accumulate import accumulate
from modules.backbone import (
    BackboneSpec,
    autocast_dtype,
    build_causal_lm,
    build_scorer,
    load_tokenizer,
    reference_of,
    use_data_template,
)
from modules.batch import ObjectiveInput, ObjectiveOutput, Rollout, loss_mask
from modules.checkpoints import TrainedOnlyCheckpoints, frozen_names, is_frozen
from modules.checks import ConfigError, check_positions, training_mode_noise
from modules.engines import Engine, Sampler, SamplerMismatchError
from modules.entropy import EntropyControl
from modules.export import export_model
from modules.forward import response_logprobs, router_losses, token_scores
from modules.objectives.base import Objective
from modules.optimizers import checked, learning_rate
from modules.process import names_on_every_process
from modules.rewards import (
    DEFAULT_TIMEOUT,
    Composed,
    FrozenModel,
    check_environments,
    check_fields,
    is_pairwise,
    lightning_state,
    metric_means,
    qualified_name,
    reward_extras,
    reward_metrics,
    reward_timeout,
    score_pairs,
    term_means,
    tournament_scores,
    trainer_state,
)
from modules.rewards import score as score_rewards
from modules.sampling import SamplingConfig, generate_with_tools
from modules.sharding import build_sharded, build_with_reference, fsdp_mesh, fsdp_units, gathered, is_partitioned, is_sharded

log = logging.getLogger(__name__)
OLD_LOGPROBS = ("auto", "sampler", "forward")
# Precision plugins whose gradients are the true gradients (no loss scaler, no engine of their own): clipped directly.
PLAIN_GRADIENTS = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on a CUDA device; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or inf: the update stops before `optimizer.step`."""


class RLModule(TrainedOnlyCheckpoints, L.LightningModule):
    """On-policy RL fine-tuning: rollouts from `engine`, rewards, then epochs of minibatch updates of `objective`.

    Args:
        policy: the policy backbone, usually `pretrained: <SFT export>` (optionally with `lora`).
        tokenizer: linked from the datamodule.
        reward: `modules.rewards.RewardModel` (a reward-stage export), any callable
            `(prompts, responses) -> list[float]`, or a pairwise reward `(prompts, responses_a, responses_b) ->
            list[float]` (`modules.rewards.PairwiseReward`: P3O and online DPO use each pair's number as the
            reward difference; other objectives get the tournament's win fractions), selected by class_path. A
            callable may take record fields by keyword (data `reward_fields`), be `async def`, and be a term of
            `modules.rewards.Composed` (docs/rewards.md).
        objective: the RL objective (`modules.objectives.p3o.P3O`, ...).
        optimizer: the optimizer factory (class_path + init_args).
        scheduler: a learning-rate scheduler factory, stepped once per rollout (None: constant).
        sampling: how rollouts are sampled (temperature also divides the logits for every logprob).
        epochs: passes over each rollout.
        minibatch_groups: prompts (groups of K responses) per update.
        max_grad_norm: gradient clipping (None = off).
        missing_eos_penalty: subtracted from the reward of responses that never emit EOS (None = off).
        mask_truncated: responses cut off at `sampling.max_new_tokens` before EOS carry no loss (DAPO's overlong
            filtering, TRL's `mask_truncated_completions`): no gradient reaches their tokens, and token-level means
            and counts (GRPO's loss types, PPO's means, P3O's `avg_tokenwise`) leave them out; their rewards still
            set their group's baseline and their pairs' differences. Off by default.
        keep_groups: DAPO's dynamic sampling (veRL's `filter_groups`): of each rollout's prompts (the data's
            `batch_size`, all sampled and scored), train on this many: those whose K rewards are not all equal first
            (a pairwise reward: whose pairs do not all tie), in batch order, then tied ones if fewer differ (the
            rollout's `train/tied_groups` then above 0). A tied group gives a comparison-based objective no reward
            signal; it is dropped before the pi_ref, pi_old and value passes, which it would cost. Logged over every
            sampled response: `train/sampled_reward` and `train/sampled_tied_groups`. Needs K >= 2. None (default):
            train on every prompt.
        nonfinite_reward: a reward that is NaN or +-inf stops the run with an error naming the response (None,
            the default); set a number to replace such rewards by it instead (a penalty), counted (over all
            processes) in `train/nonfinite_rewards` and in a console warning. A reward must return exactly one number
            per response either way.
        ref_sync_steps: every this many optimizer steps the reference moves towards the policy, ref <- alpha policy +
            (1 - alpha) ref (TR-DPO; TRL's `sync_ref_model` with `ref_model_sync_steps`), applied after the rollout
            whose updates reach the count; with `ref_sync_alpha: 1` a reset of the reference to the policy (ProRL's
            reference reset). The KL terms and `val/kl` are then to the moved reference; checkpoints hold it. Needs a
            full fine-tune (a LoRA policy's reference is its base). None (default): the reference stays the start.
        ref_sync_alpha: alpha of `ref_sync_steps` (TRL's `ref_model_mixup_alpha`, 0.6), in (0, 1].
        seed: seeds the minibatch shuffling.
        reward_timeout: seconds an `async` reward's (a composed term's, a judge's) call on one rollout or evaluation
            batch may take before it is cancelled and the run stops naming it (null: no limit; 600 by default). A
            synchronous reward has its own: `modules.remote.RemoteReward`'s timeout, `PythonTests`' per test.
        value_model: backbone of the value head, built only for objectives with `needs_values` (PPO); usually
            `pretrained: <reward export>`. Default: a fresh head on the policy's pretrained weights.
        old_logprobs: where pi_old's logprobs come from. 'sampler': recorded while sampling (no extra forward
            pass; the KV-cached decode equals a full forward up to float rounding, tested); 'forward': a separate
            forward pass over the rollout; 'auto' (default): the sampler at full fp32 precision, the forward pass
            under mixed precision (there the decode and the forward round differently).
        share_prompts: compute each prompt once for its K responses: in the sampler's prefill (one KV cache per
            prompt, repeated K times) and in every logprob forward (pi_ref, pi_old, the updates;
            `modules.forward.response_logprobs` with the group size, where `modules.layout.shares_prompts`
            allows it). On by default: the same numbers up to float rounding, fewer FLOPs.
        prompt_layout: how a logprob forward lays out a group that shares its prompt: 'packed' (default) drops
            the padding after each response's EOS; 'padded' keeps it (what models partitioned by DeepSpeed ZeRO-3
            always run; `benchmarks/layout.py` compares the two). The same numbers on real tokens.
        micro_batch_tokens: real tokens (prompt + response, summed over rows) per forward and backward: every pass
            over a rollout or a minibatch (pi_ref, a forward pi_old, values, the update) runs in micro-batches of whole
            groups up to this many tokens (a larger group alone), the same number on every rank. An update then
            accumulates the exact gradient of the whole minibatch's loss (`backward_minibatch`): the objective's
            normalisers are the minibatch's, with one forward per micro-batch for an objective that is
            `separable_groups` (all shipped ones). Default 1024: peak memory set by the micro-batch, not by the
            responses per rollout or their length (`benchmarks/results/memory`). None: one pass per rollout and per
            minibatch (the default before 0.3.0; the same numbers up to float rounding).
        engine: what generates the rollouts and the evaluation samples (`modules.engines`): `Sampler` (default,
            our sampler over the policy) or `VLLM` (colocated vLLM, weights pushed before every generation). With an
            engine whose logprobs are not the trainer's, pi_old comes from a forward pass (unless `old_logprobs:
            sampler`), `train/sampler_logprob_diff` is logged and checked against `engine.max_logprob_diff`, and
            `engine.correction` weights every objective's policy loss by pi_old / pi_sampler.
        logprob_chunk: tokens per LM-head chunk in every logprob pass (policy, reference, evaluation;
            `modules.forward.head_chunk`): None (default) keeps each chunk's fp32 logits under 2**24 values, so the
            (tokens, vocabulary) logits never exist whole; 0 computes them whole. Exact up to float rounding.
        entropy_coef: an entropy bonus (TRL's `entropy_coef`, veRL's `entropy_coeff`, OpenRLHF's
            `entropy_loss_coef`): the loss becomes the objective's minus entropy_coef x the current policy's mean
            per-token entropy (of softmax(logits / T), computed with the logprobs and differentiated) over the tokens
            the policy loss trains on (with `top_entropy_quantile`, its forking tokens), whatever the objective's own
            normalisation; the minibatch's mean, micro-batched or not. Logged as `train/update_entropy`, the
            coefficient as `train/entropy_coef`. 0 (default): off, and no entropy is computed in the update (unless
            `entropy_target` is set). A negative coefficient is an entropy penalty.
        entropy_target: adaptive entropy control (Skywork-OR1; TRL's `use_adaptive_entropy` with its
            `entropy_target`), in nats: `entropy_coef` is then the starting coefficient, moved by
            `entropy_coef_delta` after every optimizer step, up while that step's mean entropy (every process's
            trained tokens) is at or below the target, down otherwise, within [`entropy_coef_min`,
            `entropy_coef_max`]; the bonus applies only while the last step's entropy was at or below the target
            (`modules.entropy.EntropyControl`; checkpointed). Set it near the entropy you see early in training
            (`train/entropy`). None (default): the coefficient stays `entropy_coef`.
        entropy_coef_delta: the adaptive coefficient's step (TRL's default 0.005).
        entropy_coef_min: the adaptive coefficient's lower bound (0).
        entropy_coef_max: the adaptive coefficient's upper bound (1).
        top_entropy_quantile: rho of Wang et al. 2025, "Beyond the 80/20 rule" (TRL's `top_entropy_quantile`,
            which it recommends at 0.2): the policy gradient flows through the "forking" tokens alone, those whose
            entropy under pi_old is in the top rho of the rollout's trained tokens (every process's;
            `functional.high_entropy_mask`). Token-level losses (GRPO's, PPO's) weight the other tokens' policy terms
            by 0, as TRL does; sequence-level ones (P3O, RLOO, online DPO) take their logprobs without a gradient
            there. KL terms and normalisers are unchanged. The mask is set once per rollout from pi_old's entropies
            (the sampler's, or those of pi_old's forward pass); TRL takes the current policy's per micro-batch, the
            same tokens on a rollout's first update. `train/forking_tokens` logs the share kept. 1 (default): off.
            With P3O set its `kl_in_loss`: its KL pull is otherwise in the reward difference, which then reaches the
            forks alone, and the KL ran away on the embedded task (benchmarks/results/frontier/forks).
        router_aux_loss_coef: for a mixture-of-experts policy (Qwen3-MoE, Mixtral, OLMoE, gpt-oss...), the router's
            load-balancing loss (the architecture's own, `output_router_logits`) times this is added to the loss,
            averaged over an update's micro-batch forwards (each over its own tokens, one row per response), as TRL
            1.16's `router_aux_loss_coef` adds it (the forward's loss over its micro-batch); logged as
            `train/router_aux_loss`. Those forwards then run one row per response. 0 (default): off, as OpenRLHF's
            `aux_loss_coef` (TRL's default is the architecture's coefficient, e.g. 0.001 for Qwen3-MoE; set it to
            match). A policy that is not a mixture of experts is refused in one line.
    """

    def __init__(self, policy: BackboneSpec, tokenizer: str, reward: Callable, objective: Objective,
                 optimizer: OptimizerCallable = torch.optim.AdamW, scheduler: LRSchedulerCallable | None = None,
                 sampling: SamplingConfig | None = None, epochs: int = 4, minibatch_groups: int = 8,
                 max_grad_norm: float | None = 1.0, missing_eos_penalty: float | None = None,
                 mask_truncated: bool = False, keep_groups: int | None = None, ref_sync_steps: int | None = None,
                 ref_sync_alpha: float = 0.6, seed: int = 0,
                 value_model: BackboneSpec | None = None, nonfinite_reward: float | None = None,
                 old_logprobs: str = "auto", share_prompts: bool = True, logprob_chunk: int | None = None,
                 micro_batch_tokens: int | None = 1024, engine: Engine | None = None,
                 prompt_layout: Literal["packed", "padded"] = "packed", reward_timeout: float | None = DEFAULT_TIMEOUT,
                 entropy_coef: float = 0.0, top_entropy_quantile: float = 1.0, entropy_target: float | None = None,
                 entropy_coef_delta: float = 0.005, entropy_coef_min: float = 0.0, entropy_coef_max: float = 1.0,
                 router_aux_loss_coef: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["reward", "objective", "engine"])
        self.automatic_optimization = False
        self.policy_spec, self.reward, self.objective = policy, reward, objective
        self.tokenizer = load_tokenizer(tokenizer)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sampling = sampling or SamplingConfig()
        self.epochs, self.minibatch_groups, self.max_grad_norm = epochs, minibatch_groups, max_grad_norm
        self.missing_eos_penalty, self.seed, self.value_spec = missing_eos_penalty, seed, value_model
        self.nonfinite_reward, self.mask_truncated, self.keep_groups = nonfinite_reward, mask_truncated, keep_groups
        self._order_warned = False      # a judge whose two orders disagree is reported once per run
        self._cut_off_warned = False    # so is a rollout that mask_truncated leaves nothing to train on
        if max_grad_norm is not None and not max_grad_norm > 0:     # (0 would zero every gradient, < 0 flip them)
            raise ValueError(f"RLModule: max_grad_norm={max_grad_norm}; expected > 0, or null for no clipping")
        if keep_groups is not None and keep_groups < 1:
            raise ValueError(f"RLModule: keep_groups={keep_groups}; expected prompts >= 1, or null to train on all")
        if keep_groups is not None and objective.responses_per_prompt < 2:
            raise ValueError(f"RLModule: keep_groups keeps the prompts whose responses' rewards differ; "
                             f"{type(objective).__name__} samples {objective.responses_per_prompt} response per prompt "
                             "(needs K >= 2)")
        terms = getattr(objective, "needs_reward_terms", False)
        if terms and not isinstance(reward, Composed):
            raise ValueError(f"RLModule: {type(objective).__name__} normalises each term of the reward apart "
                             f"(GRPO's multi_objective_aggregation 'normalize_then_sum', P3O's normalize_terms), so the "
                             f"reward must be a modules.rewards.Composed of named terms; got {qualified_name(reward)}")
        if terms and (missing_eos_penalty, nonfinite_reward) != (None, None):
            raise ValueError(f"RLModule: {type(objective).__name__} normalises each term of the composed reward apart, "
                             "so missing_eos_penalty and nonfinite_reward, which replace or shift their sum, would be "
                             "lost; set them to null (a length term in the composed reward, e.g. "
                             "modules.verifiable.OverlongPenalty, penalises cut-off responses)")
        if ref_sync_steps is not None and ref_sync_steps < 1:
            raise ValueError(f"RLModule: ref_sync_steps={ref_sync_steps}; expected optimizer steps >= 1, or null (off)")
        if not 0 < ref_sync_alpha <= 1:
            raise ValueError(f"RLModule: ref_sync_alpha={ref_sync_alpha}; expected 0 < alpha <= 1 (1: a reset)")
        if ref_sync_steps is not None and policy is not None and policy.lora:
            raise ValueError("RLModule: ref_sync_steps moves the reference copy towards the policy; a LoRA policy's "
                             "reference is its base weights (no copy): train without LoRA, or without ref_sync_steps")
        self.ref_sync_steps, self.ref_sync_alpha = ref_sync_steps, ref_sync_alpha
        if reward_timeout is not None and not reward_timeout > 0:
            raise ValueError(f"RLModule: reward_timeout={reward_timeout}; expected seconds > 0, or null for no limit")
        self.reward_timeout = reward_timeout
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"RLModule: micro_batch_tokens={micro_batch_tokens}; expected >= 1, or null for one pass")
        if logprob_chunk is not None and logprob_chunk < 0:
            raise ValueError(f"RLModule: logprob_chunk={logprob_chunk}; expected >= 0 (0: whole logits), or null")
        if old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"RLModule: old_logprobs={old_logprobs!r}; expected one of {OLD_LOGPROBS}")
        self.old_logprobs, self.share_prompts, self.logprob_chunk = old_logprobs, share_prompts, logprob_chunk
        self.micro_batch_tokens = micro_batch_tokens
        if prompt_layout not in ("packed", "padded"):
            raise ValueError(f"RLModule: prompt_layout={prompt_layout!r}; expected 'packed' or 'padded'")
        self.prompt_layout = prompt_layout
        if not math.isfinite(entropy_coef):
            raise ValueError(f"RLModule: entropy_coef={entropy_coef}; expected a finite number (0: off)")
        if not 0 <= top_entropy_quantile <= 1:
            raise ValueError(f"RLModule: top_entropy_quantile={top_entropy_quantile}; expected 0 <= rho <= 1 (TRL "
                             "recommends 0.2; 1: every token)")
        if entropy_target is not None and not (math.isfinite(entropy_target) and entropy_target >= 0):
            raise ValueError(f"RLModule: entropy_target={entropy_target}; expected an entropy >= 0 in nats, or null "
                             "(a constant entropy_coef)")
        if entropy_target is not None and not (entropy_coef_delta > 0 and entropy_coef_min <= entropy_coef_max):
            raise ValueError(f"RLModule: entropy_coef_delta={entropy_coef_delta}, entropy_coef_min={entropy_coef_min}, "
                             f"entropy_coef_max={entropy_coef_max}; expected delta > 0 and min <= max")
        self.top_entropy_quantile = top_entropy_quantile
        if not (math.isfinite(router_aux_loss_coef) and router_aux_loss_coef >= 0):
            raise ValueError(f"RLModule: router_aux_loss_coef={router_aux_loss_coef}; expected a finite number >= 0 "
                             "(0: off)")
        self.router_aux_loss_coef = router_aux_loss_coef
        self._router_loss: torch.Tensor | None = None     # (the last micro-batch forward's, until its backward)
        self._router_scale, self._router_losses = 1.0, []
        self.entropy_control = EntropyControl(entropy_coef, entropy_target, entropy_coef_delta, entropy_coef_min,
                                              entropy_coef_max)
        self._entropy_sums: tuple[float, float] | None = None   # (entropy sum, tokens) of the last minibatch's bonus
        self.engine = engine or Sampler()
        self.policy = self.reference = self.value = None
        self.rollout: Rollout | None = None

    def configure_model(self) -> None:
        mesh = fsdp_mesh(self)        # FSDP2 under ModelParallelStrategy: every model is sharded, the reward's too
        if self.policy is None:       # (frozen models' linears in bf16 under bf16-mixed: the same numbers, half the bytes)
            linears = autocast_dtype(self._trainer)
            self.policy, self.reference = build_with_reference(      # reference None: LoRA's base
                build_causal_lm, self.policy_spec, self.tokenizer, mesh,
                linears if self.ref_sync_steps is None else None)     # (a moving reference stays fp32)
            for frozen in (m for m in self.modules() if isinstance(m, FrozenModel)):   # the reward's model
                frozen.configure(mesh, linears)
        if self.objective.needs_values and self.value is None:
            spec = self.value_spec or BackboneSpec(pretrained=self.policy_spec.pretrained, config=self.policy_spec.config)
            self.value = build_sharded(build_scorer, spec, self.tokenizer, mesh, autocast_dtype(self._trainer))
        config = self.policy.config
        if self.router_aux_loss_coef and not (hasattr(config, "output_router_logits") and
                                              hasattr(config, "router_aux_loss_coef")):
            raise ConfigError(f"RLModule: router_aux_loss_coef={self.router_aux_loss_coef}, but the policy "
                              f"({config.model_type}) is not a mixture of experts with a router load-balancing loss "
                              "(its config has no output_router_logits and router_aux_loss_coef); expected 0")

    def setup(self, stage: str) -> None:
        use_data_template(self.tokenizer, self.trainer.datamodule)

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        tools = getattr(data, "tools", None)
        if data is not None:        # a reward that reads a record field the data does not keep: before any rollout
            check_fields(self.reward, getattr(data, "reward_fields", ()), is_pairwise(self.reward))
            if tools is not None:
                tools.check_fields(getattr(data, "reward_fields", ()))
            check_environments(self.reward, getattr(tools, "environment", None))
        if tools is not None and is_partitioned(self.policy):
            raise ConfigError("data tools: DeepSpeed ZeRO-3 generates in lockstep on every rank, and with tools ranks run "
                              "different numbers of turns; use FSDP2 (configs/presets/fsdp.yaml), ZeRO-2 or DDP")
        if self.ref_sync_steps is not None and is_partitioned(self.policy):
            raise ConfigError("RLModule: ref_sync_steps moves the reference weights in place, which DeepSpeed ZeRO-3 "
                              "holds only inside each forward; use FSDP2 (configs/presets/fsdp.yaml) or ZeRO-2")
        prompts = getattr(data, "batch_size", None)
        if self.keep_groups is not None and isinstance(prompts, int) and self.keep_groups >= prompts:
            if self.keep_groups > prompts:
                raise ConfigError(f"RLModule: keep_groups={self.keep_groups} keeps more prompts per rollout than it "
                                  f"samples (data batch_size={prompts}); sample more (DAPO: about 3x) or keep fewer")
            if self.global_rank == 0:
                log.warning("RLModule: keep_groups=%d equals the data's batch_size: every prompt is kept, none filtered; "
                            "sample more prompts per rollout than you keep", prompts)
        if hasattr(data, "max_prompt_length"):
            terms = self.reward.rewards if isinstance(self.reward, Composed) else {"": self.reward}
            rewards = {f"reward model{' ' + name if name else ''}": term.model for name, term in terms.items()
                       if isinstance(term, FrozenModel) and not is_pairwise(term)}
            check_positions("RLModule", data.max_prompt_length + self.sampling.max_new_tokens,
                            f"data max_prompt_length ({data.max_prompt_length}) + model sampling.max_new_tokens "
                            f"({self.sampling.max_new_tokens})",
                            {"policy": self.policy, "value model": self.value, **rewards})
        # A frozen reward the CLI made is a plain submodule that a strategy may leave where it was built
        # (FSDP2 has sharded a reward's model, `FrozenModel`, onto the device in `configure_model`).
        device = self.trainer.strategy.root_device
        if isinstance(self.reward, torch.nn.Module) and any(p.device != device for p in self.reward.parameters()):
            self.reward.to(device)

    def on_train_start(self) -> None:
        # (after a resumed run's weights are loaded: FSDP2 restores them after `on_fit_start`, into resharded units)
        if not self.policy_spec.dropout and not is_partitioned(self.policy):
            with self.trainer.precision_plugin.forward_context():    # (as the updates run: bf16-mixed's autocast)
                noise = training_mode_noise(self.policy)
            for unit in fsdp_units(self.policy):          # FSDP2: as the forward found them
                unit.reshard()
            if noise > 1e-4 and self.global_rank == 0:    # (float rounding: 1e-7; GPU kernels with atomics: 1e-6)
                log.warning("RLModule: two training-mode forwards of the policy (%s) over the same tokens differ by %.2g "
                            "of its largest logit: the updates see another network than the sampler and pi_old, so "
                            "ratios and KL are noise (dropout the builder did not switch off, or another random draw in "
                            "the model's training-mode forward)", self.policy.config.model_type, noise)

    def reference_model(self):
        """The frozen reference policy, as a context: the copy, or the LoRA policy with its adapters disabled."""
        return reference_of(self.policy, self.reference)

    @property
    def logprobs_from_sampler(self) -> bool:
        """Whether pi_old is the sampler's recorded logprobs (no forward pass); see `old_logprobs`."""
        if self.old_logprobs != "auto":
            return self.old_logprobs == "sampler"
        if not self.engine.exact:
            return False
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return precision in ("32-true", "32", "64-true", "64")

    def micro_batches(self, roll: Rollout, agree: bool = False) -> list[torch.Tensor]:
        """Row indices of each micro-batch (`micro_batch_tokens`): consecutive whole groups. With `agree` (the
        update: every backward syncs gradients) or a sharded policy (every forward is collective), as many on every
        rank: the most any rank needs."""
        rows = torch.arange(len(roll), device=roll.input_ids.device)
        if self.micro_batch_tokens is None:
            return [rows]
        K = roll.group_size
        tokens = roll.attention_mask.view(len(roll) // K, -1).sum(-1)                      # (groups,)
        count = len(layout.micro_batch_groups(tokens, self.micro_batch_tokens))
        if self._trainer is not None and self.trainer.world_size > 1 and (agree or is_sharded(self.policy)):
            count = int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="max"))
        return [rows[a * K: b * K] for a, b in layout.micro_batch_groups(tokens, self.micro_batch_tokens, count)]

    def logprobs(self, model, rollout: Rollout, temperature: float | None = None,
                 entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token response logprobs (N, L) at the sampling temperature (or `temperature`): the one place they
        are computed, one forward per micro-batch. `entropy`: (logprobs, entropies), both (N, L).

        0 after each response (outside `response_mask`), as the sampler records pi_old: the padding positions'
        values mean nothing, and exactly 0 keeps every objective's ratio and KL finite there (exp(logp - ref) of
        two arbitrary pad logprobs could overflow, and inf x mask 0 is NaN). No gradient reaches those positions."""
        T = self.sampling.temperature if temperature is None else temperature
        parts = [self._part_logprobs(model, rollout.select(rows), T, entropy) for rows in self.micro_batches(rollout)]
        return tuple(torch.cat(column) for column in zip(*parts)) if entropy else torch.cat(parts)

    def values(self, rollout: Rollout) -> torch.Tensor:
        """Value estimates (N, L): V of the state before each response token (read at the previous position)."""
        return torch.cat([self._part_values(rollout.select(rows)) for rows in self.micro_batches(rollout)])

    def _part_logprobs(self, model, part: Rollout, temperature: float,
                       entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`logprobs` of one micro-batch, in one forward."""
        out = response_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length, temperature,
                                part.group_size if self.share_prompts else 1, self.logprob_chunk,
                                packed=self.prompt_layout == "packed", entropy=entropy)
        outside = ~part.response_mask.bool()
        return tuple(x.masked_fill(outside, 0.0) for x in out) if entropy else out.masked_fill(outside, 0.0)

    def _part_values(self, part: Rollout) -> torch.Tensor:
        """`values` of one micro-batch, in one forward."""
        return token_scores(self.value, part.input_ids, part.attention_mask)[:, part.prompt_length - 1: -1]

    def score(self, rollout: Rollout) -> torch.Tensor:
        """Training reward (N,): the reward (validated: one finite number per response), minus
        `missing_eos_penalty` where no EOS was emitted. A pairwise reward also fills `rollout.pair_rewards` (N, K)
        (`modules.rewards.score_pairs`; the penalty enters as f - pen_a + pen_b) and returns the tournament's win
        fractions (`tournament_scores`)."""
        if is_pairwise(self.reward):
            return self._score_pairs(rollout)
        rewards, replaced = score_rewards(self.reward, rollout, self.tokenizer, self.nonfinite_reward,
                                          self.micro_batches(rollout))
        rewards = rewards.to(self.device)
        scored = len(rollout)
        if self.nonfinite_reward is not None:   # (else a non-finite reward has stopped the run): all processes' counts
            replaced, scored = (int(n) for n in self.over_ranks([replaced, scored]))
        rollout.timings["train/nonfinite_rewards"] = float(replaced)
        if replaced and self.global_rank == 0:
            log.warning("reward %s: %d of %d rewards were NaN or inf, replaced by nonfinite_reward=%s",
                        qualified_name(self.reward), replaced, scored, self.nonfinite_reward)
        if self.missing_eos_penalty is not None:
            rewards = rewards - self.missing_eos_penalty * (~rollout.has_eos).float()
        return rewards

    def _score_pairs(self, rollout: Rollout) -> torch.Tensor:
        pairs, replaced, agreement = score_pairs(self.reward, rollout, self.nonfinite_reward)
        if self.nonfinite_reward is not None:
            replaced = int(self.over_ranks([replaced])[0])
        rollout.timings["train/nonfinite_rewards"] = float(replaced)
        if agreement is not None:                                  # asked in both orders: how often they agree
            agreement = self.over_ranks([agreement], "mean")[0]   # (every rank scores as many pairs)
            rollout.timings["train/pair_order_agreement"] = agreement
            if agreement < 0.5 and not self._order_warned and self.global_rank == 0:      # once, from one rank
                self._order_warned = True
                log.warning("pairwise reward %s: asked in both orders, it named the same winner for %.0f%% of this "
                            "rollout's pairs (one answering at random would for half): its verdicts follow the "
                            "position more than the responses, and what is left after the bias cancels is small "
                            "(train/pair_order_agreement, train/pair_reward_abs)", qualified_name(self.reward),
                            100 * agreement)
        if replaced and self.global_rank == 0:
            log.warning("pairwise reward %s: %d pairs were NaN or inf, replaced by nonfinite_reward=%s",
                        qualified_name(self.reward), replaced, self.nonfinite_reward)
        if self.missing_eos_penalty is not None:
            K = rollout.group_size
            penalty = self.missing_eos_penalty * (~rollout.has_eos).float().to(pairs.device)      # (N,)
            pairs = pairs - penalty[:, None] + penalty.view(-1, K).repeat_interleave(K, 0)      # f - pen_a + pen_b
        rollout.pair_rewards = pairs.to(self.device)
        rollout.timings["train/pair_reward_abs"] = float(pairs.abs().sum() / max(pairs.numel() - len(pairs), 1))
        return tournament_scores(rollout.pair_rewards, rollout.group_size)

    def over_ranks(self, values: list[float], reduce_op: str = "sum") -> list[float]:
        """`values` summed (or averaged: "mean") over the processes, in one reduce; themselves in one process. Every
        rank calls it at the same point: each scores its own rollout (or evaluation batch) at once, so the counts
        logged and warned about (by the first rank alone) are those of all processes."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        values = torch.tensor(values, dtype=torch.float32, device=self.device)
        return self.trainer.strategy.reduce(values, reduce_op=reduce_op).tolist()

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes (a new tensor); every process calls it at the same point (an
        objective's `prepare`: `ObjectiveInput.sum_over_ranks`)."""
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    @torch.no_grad()
    def make_rollout(self, batch: PairBatch) -> Rollout:
        """Sample K responses per prompt, score them, and record pi_old / pi_ref logprobs (and timings)."""
        t0 = time.perf_counter()
        from_sampler = self.logprobs_from_sampler
        roll = self.generate(self.policy, self.tokenizer, batch.prompt_ids, batch.prompt_mask, batch.prompts,
                             self.sampling, self.objective.responses_per_prompt,
                             record_logprobs=from_sampler or not self.engine.exact,
                             share_prompts=self.share_prompts, fields=batch.fields).with_fields(batch.fields)
        t1, tokens = time.perf_counter(), roll.response_mask.sum().item()
        if "tools/calls" in roll.timings:              # (sums over the rollout: per response, per call)
            calls, failed = roll.timings.pop("tools/calls"), roll.timings.pop("tools/failed")
            roll.timings.update({"train/tool_calls": calls / len(roll), "train/tool_failures": failed / max(calls, 1)})
            if "tools/user_turns" in roll.timings:     # (a simulated user's messages per response)
                roll.timings["train/user_turns"] = roll.timings.pop("tools/user_turns") / len(roll)
        with (reward_timeout(self.reward_timeout), trainer_state(self.progress(len(batch))), reward_metrics() as logged,
              reward_extras() as extras):                      # (extra columns: the rollout's samples table shows them)
            roll.rewards = self.score(roll)
        roll.extras = {name: values for name, values in extras.items() if len(values) == len(roll)}
        roll.timings.update({f"train/{name}": mean for name, mean in self.logged_means(logged).items()})
        if self.keep_groups is not None:
            roll = self.keep_informative(roll)
        forks = self.top_entropy_quantile < 1                 # (the mask needs pi_old's entropies)
        if not from_sampler:
            roll.sampler_logp = roll.old_logp
            if forks:
                roll.old_logp, roll.entropy = self.logprobs(self.policy, roll, entropy=True)
            else:
                roll.old_logp = self.logprobs(self.policy, roll)
        elif forks and roll.entropy is None:                 # (an engine that records no entropies)
            roll.entropy = self.logprobs(self.policy, roll, entropy=True)[1]
        if roll.sampler_logp is not None:
            self.check_sampler(roll)
        with self.reference_model() as ref:
            roll.ref_logp = self.logprobs(ref, roll)
        if self.value is not None:
            roll.values = self.values(roll)
        roll.timings.update({"perf/rollout_s": t1 - t0, "perf/score_s": time.perf_counter() - t1,
                             "perf/tokens_per_s": tokens / max(t1 - t0, 1e-9)})
        return roll

    @property
    def tools(self) -> Tools | None:
        """The data's tools (`datamodules.pairs.PairDataModule tools`), which generation runs; None without."""
        return getattr(self.trainer.datamodule, "tools", None) if self._trainer is not None else None

    def generate(self, model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list,
                 config: SamplingConfig, num_samples: int = 1, record_logprobs: bool = False,
                 share_prompts: bool = True, fields: dict[str, list] | None = None) -> Rollout:
        """The one entry point of this stage's generation, rollouts and evaluation alike: `engine`, turn after turn
        with the data's tools when it has them (`modules.sampling.generate_with_tools`; `fields`, the prompts' record
        fields, reset a tools environment). A model sharded by FSDP2 is gathered once for all the turns: ranks may
        run different numbers of turns."""
        tools = self.tools
        if tools is None:
            return self.engine.generate(model, tokenizer, prompt_ids, prompt_mask, prompts, config, num_samples,
                                        record_logprobs, share_prompts)
        with gathered(model):
            return generate_with_tools(functools.partial(self.engine.generate, model, tokenizer), tools, tokenizer,
                                       prompt_ids, prompt_mask, prompts, config, num_samples, fields,
                                       getattr(model.config, "max_position_embeddings", None),
                                       getattr(self.trainer.datamodule, "chat_template_kwargs", None),
                                       record_logprobs=record_logprobs, share_prompts=share_prompts)

    def logged_means(self, logged: dict[str, list[float]]) -> dict[str, float]:
        """The means of what the rewards logged (TRL's `log_metric`) over the processes (`metric_means`)."""
        return metric_means(logged, self.over_ranks, names_on_every_process)

    def progress(self, prompts: int | None = None):
        """TRL's `trainer_state` for the rewards (`modules.rewards.lightning_state`), counting optimizer steps:
        `epochs` x the minibatches of a rollout of `prompts` (the data's batch size by default; `keep_groups` where
        fewer). None outside a trainer."""
        if self._trainer is None:
            return None
        prompts = prompts or getattr(self.trainer.datamodule, "batch_size", None) or self.minibatch_groups
        kept = min(self.keep_groups or prompts, prompts)
        return lightning_state(self.trainer, self.epochs * math.ceil(kept / self.minibatch_groups))

    def keep_informative(self, roll: Rollout) -> Rollout:
        """The `keep_groups` groups of a scored rollout that training keeps (`functional.kept_groups`): those whose
        rewards (pairwise: pairs) do not all tie first. Logs the sampled rollout's mean reward and share of tied
        groups."""
        K = roll.group_size
        tied = F.pair_ties(roll.pair_rewards, K) if roll.pair_rewards is not None else F.group_ties(roll.rewards, K)
        groups = F.kept_groups(~tied.cpu(), self.keep_groups)
        rows = (groups[:, None] * K + torch.arange(K)).flatten().to(roll.input_ids.device)
        kept = roll.select(rows)
        kept.timings = {**roll.timings, "train/sampled_reward": roll.rewards.mean().item(),
                        "train/sampled_tied_groups": tied.float().mean().item()}
        return kept

    def check_sampler(self, roll: Rollout) -> None:
        """The sampler/trainer gap of a rollout whose pi_old is a forward pass: `train/sampler_logprob_diff` (mean
        |sampler - trainer| logprob over response tokens), the run stopped (every rank at once) above
        `engine.max_logprob_diff`, and the mismatch weights of `engine.correction` (their mean and the fraction
        masked to 0 logged as `train/sampler_weight_mean` / `train/sampler_weight_zero`)."""
        mask = roll.response_mask
        diff = F.masked_mean((roll.sampler_logp - roll.old_logp).abs(), mask)
        roll.timings["train/sampler_logprob_diff"] = float(diff)
        limit = self.engine.max_logprob_diff
        fine = limit is None or bool(diff <= limit)
        if self._trainer is not None:
            fine = self.trainer.strategy.reduce_boolean_decision(fine, all=True)
        if not fine:
            raise SamplerMismatchError(
                f"engine {type(self.engine).__name__}: the sampler's logprobs differ from the trainer's by {float(diff):.4g} "
                f"per token on average (max_logprob_diff={limit}) at step {self.global_step}: its weights are not the "
                "policy's (a stale or incomplete push); stopped before training on its samples")
        if self.engine.correction is not None:
            roll.sampler_weights = self.engine.correction.weights(roll.old_logp, roll.sampler_logp, mask)
            roll.timings["train/sampler_weight_mean"] = float(F.masked_mean(roll.sampler_weights, mask))
            roll.timings["train/sampler_weight_zero"] = float(F.masked_mean((roll.sampler_weights == 0).float(), mask))

    def objective_input(self, roll: Rollout, logp: torch.Tensor, extra: dict, values=None,
                        tokens_per_rank: float | None = None) -> ObjectiveInput:
        """What the objective sees of `roll` with the current `logp` (and `values`). With `mask_truncated`, the
        rows without EOS are not `trained`: their logp and values enter detached (no gradient reaches them; every
        other number is as without the option) and `ObjectiveInput.loss_mask` leaves their tokens out."""
        trained = self.trained_rows(roll)
        if trained is not None:
            keep = trained.to(logp.device)[:, None]
            logp = torch.where(keep, logp, logp.detach())
            values = None if values is None else torch.where(keep, values, values.detach())
        return ObjectiveInput(logp=logp, old_logp=roll.old_logp, ref_logp=roll.ref_logp, mask=roll.response_mask,
                              rewards=roll.rewards, group_size=roll.group_size, values=values,
                              old_values=roll.values, extra=extra, max_new_tokens=self.sampling.max_new_tokens,
                              tokens_per_rank=tokens_per_rank, sampler_weights=roll.sampler_weights,
                              pair_rewards=roll.pair_rewards, trained=trained, sampler_logp=roll.sampler_logp,
                              forks=roll.forks, **self.reward_terms(roll))

    def reward_terms(self, roll: Rollout) -> dict[str, torch.Tensor]:
        """`ObjectiveInput`'s `reward_terms` (N, T) and `reward_weights` (T,), in the composed reward's order, for an
        objective with `needs_reward_terms`; nothing otherwise."""
        if not self.objective.needs_reward_terms:
            return {}
        names, device = list(self.reward.weights), roll.rewards.device
        return {"reward_terms": torch.stack([roll.reward_terms[n].to(device).float() for n in names], -1),
                "reward_weights": torch.tensor([self.reward.weights[n] for n in names], device=device)}

    def forking_tokens(self, roll: Rollout) -> torch.Tensor:
        """(N, L) bool: the trained tokens whose pi_old entropy is in the top `top_entropy_quantile` of every
        process's (`functional.high_entropy_mask`, the quantile over all of them, as TRL gathers them)."""
        mask = loss_mask(roll.response_mask, self.trained_rows(roll)).bool()
        pool = roll.entropy[mask].float()
        if self._trainer is not None and self.trainer.world_size > 1:           # (-1: padding; entropies are >= 0)
            longest = int(self.over_ranks([float(len(pool))], "max")[0])
            padded = torch.cat([pool, pool.new_full((longest - len(pool),), -1.0)])
            pool = self.all_gather(padded).flatten()
            pool = pool[pool >= 0]
        forks = F.high_entropy_mask(roll.entropy, mask, self.top_entropy_quantile, pool)
        roll.timings["train/forking_tokens"] = float(forks.sum() / mask.sum().clamp(min=1))
        return forks

    def trained_rows(self, roll: Rollout) -> torch.Tensor | None:
        """(N,) bool: the responses the loss trains on (those that emitted EOS, with `mask_truncated`); None: all."""
        return roll.has_eos.to(roll.response_mask.device) if self.mask_truncated else None

    def minibatches(self, roll: Rollout) -> list[torch.Tensor]:
        """Row indices of each minibatch for one epoch: whole groups, shuffled by (seed, step)."""
        K, groups = roll.group_size, len(roll) // roll.group_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        order = torch.randperm(groups, generator=gen)
        rows = (order[:, None] * K + torch.arange(K)).flatten()          # (N,) whole groups
        return list(rows.split(self.minibatch_groups * K))

    def training_step(self, batch: PairBatch, batch_idx: int) -> None:
        if self.rollout is None:
            raise ConfigError("RLModule has no rollout: add callbacks.rollout.OnPolicyRollout to trainer.callbacks")
        roll, self.rollout = self.rollout, None
        if self.mask_truncated:
            self.warn_if_all_cut_off(roll)
        t0, sums, updates = time.perf_counter(), defaultdict(float), 0
        if self.top_entropy_quantile < 1:
            roll.forks = self.forking_tokens(roll)
        inputs = self.objective_input(roll, roll.old_logp, {})
        if self._trainer is not None and self.trainer.world_size > 1:
            inputs.sum_over_ranks = self.sum_over_ranks     # the rollout's statistics over every process's rows
        extra = self.objective.prepare(inputs)
        for epoch in range(self.epochs):
            for index, rows in enumerate(self.minibatches(roll)):
                where = f"rollout {batch_idx}, epoch {epoch}, minibatch {index}"
                first = epoch == 0 and index == 0           # no optimizer step since the rollout's passes
                for key, value in self.update(roll.select(rows.to(roll.input_ids.device)),
                                              {k: v[rows] for k, v in extra.items()}, where, first).items():
                    sums[f"train/{key}"] += float(value)
                updates += 1
        if self.ref_sync_steps is not None and (self.global_step // self.ref_sync_steps
                                                > (self.global_step - updates) // self.ref_sync_steps):
            self.sync_reference()
        lr = learning_rate(self)                                  # the rate of this rollout's updates
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        metrics = {**{k: v / updates for k, v in sums.items()}, "train/lr": lr}
        metrics.update(self.rollout_metrics(roll), **{"perf/update_s": time.perf_counter() - t0,
                                                      "perf/peak_memory_gb": peak_memory_gb(self.device)})
        reward = metrics.pop("train/reward")
        self.log_dict(metrics, sync_dist=True, batch_size=len(batch))
        self.log("train/reward", reward, prog_bar=True, sync_dist=True, batch_size=len(batch))

    @property
    def checkpointed_frozen(self) -> tuple[str, ...]:
        """Frozen weights a checkpoint holds (`modules.checkpoints`): the reference, when `ref_sync_steps` moves it."""
        return ("reference.",) if self.ref_sync_steps is not None else ()

    @torch.no_grad()
    def sync_reference(self) -> None:
        """ref <- alpha policy + (1 - alpha) ref, parameter by parameter. Under FSDP2 each rank its own shards: every
        unit of both models is put back to its sharded state first (the root stays gathered after a forward), so
        the two hold the same shards."""
        for unit in fsdp_units(self.policy) + fsdp_units(self.reference):
            unit.reshard()
        policy = dict(self.policy.named_parameters())
        for name, ref in self.reference.named_parameters():
            ref.lerp_(policy[name].to(ref.dtype), self.ref_sync_alpha)

    def warn_if_all_cut_off(self, roll: Rollout) -> None:
        """With `mask_truncated`, a rollout whose every response (on every process) was cut off trains on nothing:
        said once per run, by the first process, instead of a run that silently stands still."""
        ended = self.over_ranks([float(roll.has_eos.sum())])[0]
        if ended == 0 and not self._cut_off_warned and self.global_rank == 0:
            self._cut_off_warned = True
            log.warning("mask_truncated: every response of rollout %d reached sampling.max_new_tokens=%d before EOS, "
                        "so none carries a loss and the policy does not learn from it (train/eos_rate); raise "
                        "max_new_tokens, or train a while without mask_truncated", self.global_step,
                        self.sampling.max_new_tokens)

    def update(self, sub: Rollout, extra: dict, where: str, first: bool = False) -> dict[str, torch.Tensor]:
        """One optimizer step on a minibatch; stops before the step if the loss or the gradient is not finite.
        `first`: no step has happened since the rollout (see `backward_minibatch`)."""
        optimizer = self.optimizers()
        mask = loss_mask(sub.response_mask, self.trained_rows(sub))                    # (the tokens the loss trains on)
        tokens = self.trainer.strategy.reduce(mask.sum().float(), reduce_op="mean")
        optimizer.zero_grad()
        out = self.backward_minibatch(sub, extra, float(tokens), where, first)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP2: all shards
        self.stop_unless_finite(grad_norm, "gradient norm", where)
        if self.max_grad_norm is not None:
            self.clip_grad_norm(optimizer, params, grad_norm)
        optimizer.step()
        optimizer.zero_grad()     # (set to None: no gradient held through the next rollout's sampling and passes)
        if self.entropy_control.target is not None:         # the adaptive coefficient, on every process's tokens
            total, tokens = self.over_ranks(list(self._entropy_sums))
            self.entropy_control.step(total / max(tokens, 1.0))
        return {**out.metrics, "grad_norm": grad_norm}

    def backward_minibatch(self, sub: Rollout, extra: dict, tokens: float, where: str,
                           first: bool = False) -> ObjectiveOutput:
        """The objective on the minibatch, its gradient added to the parameters' `.grad`; stops (before the
        optimizer step, and before the backward of the micro-batch whose loss it is) when the loss is not finite.

        One micro-batch: forward, loss, backward. Several (`micro_batch_tokens`): the same gradient exactly (up to
        float rounding) with one micro-batch's activations at a time, and every normaliser (token counts, means over
        pairs or groups) the minibatch's (`modules.accumulate`): one forward per micro-batch for an objective with
        `separable_groups` (all shipped ones), two for any other, except on the `first` minibatch after a rollout
        without dropout (`rollout_passes_reusable`): no step has happened since the rollout's passes, so the first
        of the two is the rollout's pi_old and old values (equal within float rounding, tested) and is skipped
        (not with an entropy bonus). With one (`entropy_coef`), the forward gives the current entropies too, and the
        loss is the objective's minus the coefficient times their mean over the minibatch's trained tokens."""
        def loss(logp: torch.Tensor, values: torch.Tensor | None, entropy: torch.Tensor | None) -> ObjectiveOutput:
            batch = self.objective_input(sub, logp, extra, values, tokens)
            out = self.objective(batch)
            if entropy is not None:                                   # the entropy bonus (`entropy_coef`)
                mask = batch.policy_mask()
                self._entropy_sums = (float(F.masked_sum(entropy, mask)), float(mask.sum()))
                bonus, coef = F.masked_mean(entropy, mask), self.entropy_control.applied()
                out = ObjectiveOutput(out.loss - coef * bonus, {**out.metrics, "update_entropy": bonus.detach(),
                                                                "entropy_coef": torch.tensor(coef)})
            self.stop_unless_finite(out.loss.detach(), "loss", where)
            return out

        parts = self.micro_batches(sub, agree=True)
        self._router_scale, self._router_losses = self.router_aux_loss_coef / len(parts), []
        if len(parts) == 1:
            out = loss(*self._forward_part(sub))
            self._backward(out.loss)
            return self._with_router_loss(out)
        entropy = None
        if self.entropy_control.enabled:  # (rows not yet run hold these; the bonus is linear in them: exact either way)
            entropy = sub.entropy if sub.entropy is not None else torch.zeros_like(sub.old_logp)
        # (the rollout's entropies may be another pass's than its pi_old: with the bonus, step (1) always runs)
        reuse = first and self.rollout_passes_reusable(sub) and not self.entropy_control.enabled
        return self._with_router_loss(accumulate(
            parts, lambda rows: self._forward_part(sub.select(rows)), loss, self._backward,
            (sub.old_logp, sub.values if self.value is not None else None, entropy), self.objective.separable_groups,
            reuse, self.device))

    def _with_router_loss(self, out: ObjectiveOutput) -> ObjectiveOutput:
        """`out` with the router loss's mean over the update's micro-batch forwards in its metrics (with
        `router_aux_loss_coef`); the loss stays the objective's."""
        if not self._router_losses:
            return out
        return ObjectiveOutput(out.loss, {**out.metrics, "router_aux_loss": torch.stack(self._router_losses).mean()})

    def rollout_passes_reusable(self, sub: Rollout) -> bool:
        """Whether the rollout's pi_old (and old values) are what a forward of the unchanged policy (and value model)
        gives now: no dropout anywhere, so a forward is deterministic, and PPO's old values recorded."""
        no_dropout = not self.policy_spec.dropout and not (self.value_spec is not None and self.value_spec.dropout)
        return no_dropout and sub.old_logp is not None and (self.value is None or sub.values is not None)

    def _forward_part(self, part: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logprobs, values or None, entropies or None: with `entropy_coef`) of one micro-batch, in one forward
        each. With `router_aux_loss_coef`, a forward with a graph leaves its router loss for the next `_backward`."""
        with router_losses(self.policy, on=self.router_aux_loss_coef > 0) as routed:
            if self.entropy_control.enabled:
                logp, entropy = self._part_logprobs(self.policy, part, self.sampling.temperature, entropy=True)
            else:
                logp, entropy = self._part_logprobs(self.policy, part, self.sampling.temperature), None
        if routed and torch.is_grad_enabled():
            self._router_loss = torch.stack(routed).mean()
            self._router_losses.append(self._router_loss.detach())
        return logp, self._part_values(part) if self.value is not None else None, entropy

    def _backward(self, loss: torch.Tensor) -> None:
        """`loss`'s gradient added to the parameters', with the router loss of the micro-batch forward it follows
        (`router_aux_loss_coef` / micro-batches x that loss; every forward with a graph is followed by one
        backward: `backward_minibatch`, `modules.accumulate`)."""
        if self._router_loss is not None:
            loss, self._router_loss = loss + self._router_scale * self._router_loss, None
        self.manual_backward(loss) if self._trainer is not None else loss.backward()

    def stop_unless_finite(self, value: torch.Tensor, what: str, where: str) -> None:
        """Raise `NonFiniteError` (on every rank at once) when `value` is NaN or inf, before the optimizer step."""
        finite = bool(torch.isfinite(value).all())
        if (self.trainer.strategy.reduce_boolean_decision(finite, all=True) if self._trainer is not None else finite):
            return
        raise NonFiniteError(f"{type(self.objective).__name__}: non-finite {what} ({value.item()}) at {where}; the "
                             "optimizer step was skipped and the weights are unchanged by it (the last checkpoint "
                             "holds the last good state)")

    def clip_grad_norm(self, optimizer, params: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Clip the gradient norm to `max_grad_norm`.
        - Plain gradients (32/64/16-true, or mixed precision without a loss scaler: bf16-mixed; FSDP2's sharded
          gradients included, `grad_norm` being over all shards): scaled by the norm
          `update` already computed, as `torch.nn.utils.clip_grad_norm_` does after computing it. One norm pass
          instead of two, and it works with fused optimizers, which Lightning's mixed-precision plugin refuses to
          clip for even when no scaler is involved.
        - Otherwise through Lightning (fp16 loss scaling; DeepSpeed clips itself, from `gradient_clipping`)."""
        plugin = self.trainer.precision_plugin
        if type(plugin) in PLAIN_GRADIENTS and getattr(plugin, "scaler", None) is None:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, grad_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def rollout_metrics(self, roll: Rollout) -> dict[str, float]:
        old, ref = (F.sequence_logprobs(x, roll.response_mask) for x in (roll.old_logp, roll.ref_logp))
        return {"train/reward": roll.rewards.mean().item(), "train/reward_std": roll.rewards.std().item(),
                "train/kl": (old - ref).mean().item(), "train/length": roll.response_mask.sum(-1).float().mean().item(),
                "train/eos_rate": roll.has_eos.float().mean().item(), **roll.timings,
                **({"train/entropy": F.masked_mean(roll.entropy, roll.response_mask).item()}   # (our sampler's)
                   if roll.entropy is not None else {}),
                **{f"train/reward_{name}": mean for name, mean in term_means(roll.reward_terms, self.over_ranks).items()},
                **({"train/tied_groups": F.tied_groups(roll.rewards, roll.group_size).item()}   # scalar rewards, K > 1
                   if roll.group_size > 1 and roll.pair_rewards is None else {})}

    def configure_optimizers(self):
        models = [self.policy] + ([self.value] if self.value is not None else [])
        optimizer = checked(self.optimizer_factory([p for m in models for p in m.parameters() if p.requires_grad]))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["objective"] = qualified_name(self.objective)
        super().on_save_checkpoint(checkpoint)        # the frozen weights left out (`modules.checkpoints`)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another objective (PPO resumed as P3O, P3O as RLOO) stops with one line naming both,
        before torch's list of unexpected keys; checkpoints without the record are compared by their keys."""
        ours, theirs = qualified_name(self.objective), checkpoint.get("objective")
        frozen = frozen_names(self)
        trained = lambda keys: {k for k in keys if not is_frozen(k, frozen) and not k.startswith("reward.")}  # noqa: E731
        saved = trained(checkpoint.get("state_dict", {}))
        if theirs is None and saved and saved != trained(self.state_dict()):
            theirs = "another objective (its parameters differ from this run's)"
        if theirs is not None and theirs != ours:
            raise ConfigError(f"the checkpoint was written by a run of {theirs}; this run's objective is {ours}: "
                              "resume with the config that wrote it, or train this objective without --ckpt_path")
        super().on_load_checkpoint(checkpoint)

    def export(self, directory: str, merge_lora: bool = True, final_dir: str | None = None) -> None:
        """The trained policy + tokenizer in Hugging Face format (LoRA merged unless `merge_lora=False`)."""
        export_model(self.policy, self.policy_spec, self.tokenizer, directory, merge_lora, final_dir)
